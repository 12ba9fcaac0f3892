"""The database work of ``use()``, on the driver's own connection.

``use()`` runs before every call to a CRM, so its cost is on every sync. It reads the credential with
its tenant key and policy in one statement, records the last use, and appends the access event to the
tenant's audit chain (the same row and HMAC ``core.tenants.audit.record_event`` would write, computed
by that module's own ``compute_hmac``, and the same head MAC, from its ``head_mac``),
then commits — all in one short transaction of its own on a DB-API connection of the engine.
Through an ORM session the same work cost 3 to 15 times as much (session begin and commit alone
cost more than the SQL); bench/vault.py holds this path to 1.3×
hand-written DB-API SQL.

Owning the transaction also means: the access record is durable before the secret is released (a
caller that rolls back cannot erase it), and no write lock is held while the CRM call runs.

Only the happy path lives here. Every refusal (destroyed, expired, tampered, failed) is returned to
``core.vault.service``, which handles it through the ORM.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from core.errors import ConfigurationError, CredentialInvalid
from core.settings import Settings, get_settings
from core.tenants.access import Principal, can_access_tenant
from core.tenants.audit import add_chain, audit_key, chain_name, compute_hmac, head_key, head_mac
from core.tenants.models import AuditEvent
from core.vault import keys
from core.vault.crypto import credential_aad, malformed, open_sealed, unwrap_dek
from core.vault.models import CredentialState
from core.vault.policy import DEFAULT_POLICY

USE_ACTION = "vault.credential.use"
_ACTIVE = CredentialState.active.value
_FAILED = CredentialState.failed.value
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"

_SELECT = (
    "SELECT c.tenant_id, c.crm_account_id, c.app_user_id, c.purpose, c.kind, c.version, c.ciphertext, c.state,"
    " c.expires_at, c.last_used_at, c.created_at, c.failed_at, k.kek_id, k.wrapped_dek, k.dek_version, p.idle_days"
    " FROM vault_credential c JOIN vault_tenant_key k ON k.tenant_id = c.tenant_id"
    " LEFT JOIN vault_policy p ON p.tenant_id = c.tenant_id WHERE c.id = ?"
)
_UPDATE = "UPDATE vault_credential SET last_used_at = ?, use_count = use_count + 1 WHERE id = ?"
_SEAL = "SELECT chains, digest FROM audit_seal WHERE id = 1"
_HEAD = "SELECT seq, last_hmac, mac FROM audit_head WHERE chain = ?"
_INSERT_EVENT = (
    "INSERT INTO audit_event (chain, seq, occurred_at, tenant_id, actor, actor_role, action, target, details, via,"
    " prev_hmac, hmac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_HEAD = "UPDATE audit_head SET seq = ?, last_hmac = ?, mac = ? WHERE chain = ?"
_INSERT_HEAD = "INSERT INTO audit_head (chain, seq, last_hmac, mac) VALUES (?, ?, ?, ?)"
_UPDATE_SEAL = "UPDATE audit_seal SET chains = ?, digest = ?, mac = ? WHERE id = 1"


def _from_db(value: Any) -> datetime | None:
    """SQLite hands back SQLAlchemy's text format; PostgreSQL an aware datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass
class Found:
    """The credential row as ``use()`` read it (no plaintext). Times stay as the driver gave them
    until asked for: the happy path parses only what its checks need."""

    id: int
    tenant_id: int
    crm_account_id: int | None
    app_user_id: int | None
    purpose: str
    kind: str
    version: int
    state: str
    raw_expires_at: Any
    raw_last_used_at: Any
    raw_created_at: Any
    raw_failed_at: Any
    idle_days: int
    kek_id: str = ""
    raw_ciphertext: Any = field(default=None, repr=False)

    @property
    def expires_at(self) -> datetime | None:
        return _from_db(self.raw_expires_at)

    @property
    def failed_at(self) -> datetime | None:
        return _from_db(self.raw_failed_at)

    @property
    def idle_deadline(self) -> datetime | None:
        if self.app_user_id is None:
            return None
        last = _from_db(self.raw_last_used_at or self.raw_created_at)
        return last + timedelta(days=self.idle_days) if last is not None else None


@dataclass
class Outcome:
    """``status``: "ok" (``plaintext`` and ``tenant_id`` set), or the refusal: "missing", "denied",
    "failed", "invalid", "expired", "idle", "dek" (the tenant's data key did not unwrap), "unreadable"
    (the ciphertext is not a ciphertext: wrong type, truncated) or "tampered" (``found`` set unless
    missing)."""

    status: str
    found: Found | None = None
    plaintext: bytes | None = None
    tenant_id: int | None = None


def _found(credential_id: int, row: Any) -> Found:
    return Found(credential_id, row[0], row[1], row[2], row[3], row[4], row[5], row[7], row[8], row[9], row[10],
                 row[11], row[15] or DEFAULT_POLICY.idle_days, row[12], row[6])


class HotPath:
    """``use()``'s statements for one engine's driver (qmark for SQLite, format for psycopg), and the
    DB-API connections it keeps on SQLite.

    On SQLite a checkout from SQLAlchemy's pool costs about a sixth of the whole use(), so the hot
    path keeps up to ``KEEP_IDLE`` of the engine's own connections (opened by the engine: same
    pragmas) and reuses them; each serves one thread at a time (list.pop/append are atomic) and
    ``engine.dispose()`` closes them. Elsewhere (PostgreSQL: pre-ping, network round trips) it
    borrows from the engine's pool.
    """

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        self.sqlite = dialect.name == "sqlite"
        if dialect.paramstyle not in ("qmark", "format", "pyformat"):
            raise ConfigurationError(
                f"The vault does not support the {dialect.driver} driver (paramstyle {dialect.paramstyle}): "
                "use SQLite or PostgreSQL with psycopg."
            )
        marker = "?" if dialect.paramstyle == "qmark" else "%s"

        def conv(sql: str) -> str:
            return sql.replace("?", marker)

        self.select = conv(_SELECT)
        self.update = conv(_UPDATE)
        self.head = conv(_HEAD) + ("" if self.sqlite else " FOR UPDATE")
        self.seal = conv(_SEAL) + ("" if self.sqlite else " FOR UPDATE")
        self.insert_event = conv(_INSERT_EVENT)
        self.update_head = conv(_UPDATE_HEAD)
        self.insert_head = conv(_INSERT_HEAD)
        self.update_seal = conv(_UPDATE_SEAL)
        self._settings: Settings | None = None
        self._audit_key = b""
        self._head_key = b""
        self.keep = self.sqlite and not isinstance(engine.pool, StaticPool)
        self.idle: list[Any] = []
        if self.keep:
            event.listen(engine, "engine_disposed", self._close_idle)

    def _close_idle(self, _engine: Engine) -> None:
        while self.idle:
            self.idle.pop().close()

    def use(self, engine: Engine, credential_id: int, *, principal: Principal, reason: str,
            now: datetime) -> Outcome:
        pooled = None
        if self.keep:
            try:
                conn = self.idle.pop()
            except IndexError:
                pooled = engine.raw_connection()
                conn = pooled.driver_connection
                pooled.detach()  # ours now: the pool neither counts nor resets it
                pooled = None
        else:
            pooled = engine.raw_connection()
            conn = pooled.driver_connection
        clean = False
        try:
            if self.sqlite:
                conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(self.select, (credential_id,)).fetchone()
            at = now.astimezone(UTC).strftime(_SQLITE_TIME) if self.sqlite else now
            status = "missing" if row is None else self._refusal(row, principal, now, at)
            if status is None:
                tenant_id, kek_id = row[0], row[12]
                try:
                    dek = unwrap_dek(keys.ring_with(kek_id).key(kek_id), row[13], tenant_id=tenant_id, kek_id=kek_id,
                                     dek_version=row[14])
                except CredentialInvalid:
                    status = "dek"  # the tenant key (or the vault key) is wrong: never the credential's fault
                else:
                    try:
                        plaintext = open_sealed(dek, row[6], credential_aad(
                            tenant_id=tenant_id, crm_account_id=row[1], app_user_id=row[2], purpose=row[3],
                            credential_id=credential_id, version=row[5]))
                    except CredentialInvalid:
                        status = "unreadable" if malformed(row[6]) is not None else "tampered"
            if status is not None:
                conn.rollback()
                clean = True
                return Outcome(status, None if row is None else _found(credential_id, row))
            conn.execute(self.update, (at, credential_id))
            self._append_audit(conn, credential_id, tenant_id, row[3], principal, reason, now, at)
            conn.commit()
            clean = True
            return Outcome("ok", plaintext=plaintext, tenant_id=tenant_id)
        finally:
            if not clean:
                try:
                    conn.rollback()
                except Exception:  # the connection is closed below either way
                    pass
            if pooled is not None:
                pooled.close()
            elif clean and len(self.idle) < KEEP_IDLE:
                self.idle.append(conn)
            else:
                conn.close()

    def _refusal(self, row: Any, principal: Principal, now: datetime, at: Any) -> str | None:
        """Why this row may not be used now, or None. Times are compared as the database holds them
        (``at`` is now in that form): SQLAlchemy's fixed-width text on SQLite orders like time."""
        if not can_access_tenant(principal, row[0]):
            return "denied"
        if row[7] != _ACTIVE:
            return "failed" if row[7] == _FAILED else "invalid"
        if row[8] is not None and row[8] <= at:
            return "expired"
        if row[2] is not None:  # per-user: the idle limit applies
            cutoff = now - timedelta(days=row[15] or DEFAULT_POLICY.idle_days)
            if (row[9] or row[10]) <= (cutoff.astimezone(UTC).strftime(_SQLITE_TIME) if self.sqlite else cutoff):
                return "idle"
        return None

    def _append_audit(self, conn: Any, credential_id: int, tenant_id: int, purpose: str, principal: Principal,
                      reason: str, now: datetime, at: Any) -> None:
        """Append exactly the row ``record_event`` would (same columns, same HMAC function)."""
        chain = chain_name(tenant_id)
        settings = get_settings()
        if settings is not self._settings:  # audit_key() re-decodes the server secret on every call
            self._audit_key, self._head_key, self._settings = audit_key(), head_key(), settings
        head = conn.execute(self.head, (chain,)).fetchone()
        prev = head[1] if head else ""
        ev = SimpleNamespace(
            chain=chain, seq=(head[0] if head else 0) + 1, occurred_at=now, tenant_id=tenant_id,
            actor=principal.email[:254], actor_role=principal.role, action=USE_ACTION,
            target=f"credential:{credential_id}",
            details=json.dumps({"purpose": purpose, "reason": reason}, sort_keys=True, default=str), via=None,
        )
        mac = compute_hmac(cast(AuditEvent, ev), prev, self._audit_key)
        conn.execute(self.insert_event, (
            chain, ev.seq, at, tenant_id, ev.actor, ev.actor_role, USE_ACTION, ev.target, ev.details, None, prev, mac,
        ))
        if head:  # the head's MAC as advance_head computes it (none for a head from before head MACs)
            conn.execute(self.update_head, (ev.seq, mac, head_mac(self._head_key, chain, ev.seq, mac)
                                            if head[2] is not None else None, chain))
        else:  # rare (store() opens the tenant's chain first): a new chain joins the global seal
            seal = conn.execute(self.seal).fetchone()
            new_mac = None
            if seal is not None:
                chains, digest, seal_mac = add_chain(self._head_key, seal[0], seal[1], chain)
                conn.execute(self.update_seal, (chains, digest, seal_mac))
                new_mac = head_mac(self._head_key, chain, ev.seq, mac)
            conn.execute(self.insert_head, (chain, ev.seq, mac, new_mac))


KEEP_IDLE = 8
_paths: dict[int, tuple[weakref.ref[Engine], HotPath]] = {}


def hot_path(engine: Engine) -> HotPath:
    entry = _paths.get(id(engine))
    if entry is None or entry[0]() is not engine:
        key = id(engine)
        entry = _paths[key] = (weakref.ref(engine, lambda _r: _paths.pop(key, None)), HotPath(engine))
    return entry[1]
