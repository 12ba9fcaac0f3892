"""The credential vault: store a secret, use it for one CRM call, and destroy it at the first sign of trouble.

A secret goes from a form (or an admin's upload) into ``put()`` and comes back only inside
``with use(...) as secret:``. Each tenant has its own data key (DEK), stored only wrapped by a
key-encryption key (KEK) from ``core.vault.keys``; each ciphertext is bound to its tenant, account,
user, purpose, id and version (see ``core.vault.crypto``).

Self-destruct: a per-user credential is destroyed when its TTL passes, when it has been idle too
long, at its first definitive authentication failure (the tenant's threshold, default 1), when the
user or an admin revokes it, and when its CRM account moves to an API user or OAuth. Destroyed means
gone: the row is deleted (SQLite runs with ``secure_delete``) and a tombstone (reference, reason,
time) remains, so the user shows as "reconnect needed". ``shred_tenant`` deletes the tenant's data
key, which makes every ciphertext of the tenant unreadable, then the rows.

Transactions: most functions work in the caller's transaction. Four commit on their own, because
what they record must survive whatever the caller does next: ``use()`` (it commits the caller's open
transaction first, then records the access in its own transaction before the secret is released, so
no write lock is held during the CRM call), ``report_auth_failure`` and the refusals inside
``use()`` (a destroyed or tampered credential stays destroyed or flagged even when the caller
rolls back), and ``shred_tenant``. ``rotate_kek`` runs its own transactions, one per batch.

Every mutating function writes an audit event; no secret ever reaches the database, a log line, an
exception message or an audit entry.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

from pydantic import SecretStr
from sqlalchemy import delete, func
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.util import identity_key
from sqlmodel import Session, col, select

from core.clock import utcnow
from core.db import session_scope
from core.errors import (
    AuthenticationFailed,
    ConfigurationError,
    CredentialDestroyed,
    CredentialExpired,
    CredentialInvalid,
    InvalidInput,
    KeyMissing,
    NotFound,
)
from core.tenants.access import Principal, require_not_offboarded, require_staff, require_tenant
from core.tenants.audit import chain_name, record_event
from core.tenants.models import AppUser, AuditEvent, AuditHead, AuditSeal, CredentialMode, CrmAccount, Tenant
from core.vault import keys
from core.vault.crypto import (
    credential_aad,
    invalid,
    malformed,
    new_dek,
    open_sealed,
    seal,
    unwrap_dek,
    wrap_dek,
)
from core.vault.hotpath import Found, hot_path
from core.vault.keys import KeyProvider, KeyRing, check_value
from core.vault.models import (
    CredentialKind,
    CredentialRef,
    CredentialState,
    KekState,
    VaultConnectLink,
    VaultCredential,
    VaultKek,
    VaultPolicy,
    VaultTenantKey,
    VaultTombstone,
)
from core.vault.policy import DEFAULT_POLICY, Policy, from_row, get_policy

log = logging.getLogger("crmbridge.vault")
_T = TypeVar("_T")

MAX_SECRET_BYTES = 64 * 1024
PURPOSE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
KINDS = frozenset(k.value for k in CredentialKind)
PER_USER_MODES = (CredentialMode.per_user_password.value, CredentialMode.per_user_oauth.value)
RECONNECT_NEEDED = "reconnect needed"


def resolve_now(now: datetime | None) -> datetime:
    """``now`` as aware UTC, or the current time: every vault function takes an injectable ``now``."""
    value = now or utcnow()
    if value.tzinfo is None:
        raise InvalidInput("naive datetime given to the vault: pass an aware UTC time (core.clock.utcnow()).")
    return value.astimezone(UTC)


def _ref_id(ref: CredentialRef | int | str) -> int:
    return ref if type(ref) is int else CredentialRef.parse(ref).id


def _label(principal: Principal | str) -> str:
    return (principal.email if isinstance(principal, Principal) else str(principal))[:254]


# --- keys ------------------------------------------------------------------------------------------


def _register_active_kek(session: Session, ring: KeyRing, now: datetime) -> None:
    """Record the ring's active KEK (its check value) the first time it is seen; older active keys
    become "retiring" until a rotation has re-wrapped every data key they hold."""
    cv = check_value(ring.active_key)
    row = session.get(VaultKek, ring.active)
    if row is not None:
        if row.check_value != cv:
            raise _wrong_key(ring.active, ring)
        if row.state == KekState.retired:
            raise ConfigurationError(
                f"Vault key {ring.active!r} was retired on {row.retired_at:%Y-%m-%d}: make a new key active in "
                f"{ring.source} (a retired key never wraps data keys again)."
            )
        if row.state == KekState.active:
            return
    for other in session.exec(select(VaultKek).where(VaultKek.state == KekState.active.value)):
        if other.kek_id != ring.active:
            other.state = KekState.retiring.value
            session.add(other)
    if row is None:
        row = VaultKek(kek_id=ring.active, check_value=cv, created_at=now)
    row.state = KekState.active.value
    session.add(row)
    session.flush()
    record_event(session, principal=Principal.system("vault"), action="vault.kek.activate",
                 target=f"kek:{ring.active}", details={"source": ring.source}, at=now)


def _wrong_key(kek_id: str, ring: KeyRing) -> ConfigurationError:
    return ConfigurationError(
        f"Vault key {kek_id!r} in {ring.source} is not the key the vault was set up with (its check value "
        f"differs): restore the original bytes of {kek_id!r}; a different key is never accepted."
    )


def check_keys(session: Session, *, ring: KeyRing | None = None, now: datetime | None = None) -> KeyRing:
    """Refuse to run on missing or wrong keys, naming the key id; register the active key.

    Raises:
        KeyMissing: a KEK that wraps tenant data keys is not in the ring.
        ConfigurationError: a KEK in the ring has the right id but the wrong bytes.
    """
    now = resolve_now(now)
    ring = ring or keys.current_ring(reload=True)
    in_use = dict(session.exec(
        select(VaultTenantKey.kek_id, func.count()).group_by(col(VaultTenantKey.kek_id))
    ).all())
    for kek_id, count in sorted(in_use.items()):
        if kek_id not in ring.keys:
            raise KeyMissing(
                f"Vault key {kek_id!r} wraps the data keys of {count} tenant(s) but is not in {ring.source}: "
                f"restore key {kek_id!r} (keys are never re-created; without it those credentials are lost)."
            )
    known = {k.kek_id: k for k in session.exec(select(VaultKek))}
    for kek_id, material in ring.keys.items():
        row = known.get(kek_id)
        if row is not None and row.state != KekState.retired and row.check_value != check_value(material):
            raise _wrong_key(kek_id, ring)
    for kek_id in in_use:
        if kek_id not in known:  # wrapped before check values existed: prove the key on one data key
            sample = session.exec(select(VaultTenantKey).where(VaultTenantKey.kek_id == kek_id).limit(1)).one()
            try:
                unwrap_dek(ring.key(kek_id), sample.wrapped_dek, tenant_id=sample.tenant_id, kek_id=kek_id,
                           dek_version=sample.dek_version)
            except CredentialInvalid:
                raise _wrong_key(kek_id, ring) from None
            session.add(VaultKek(kek_id=kek_id, check_value=check_value(ring.key(kek_id)),
                                 state=KekState.retiring.value, created_at=now))
    _register_active_kek(session, ring, now)
    return ring


def _tenant_dek(session: Session, tenant_id: int, *, now: datetime) -> bytes:
    """The tenant's data key, created (wrapped by the active KEK) on first use."""
    row = session.get(VaultTenantKey, tenant_id)
    if row is not None:
        ring = keys.ring_with(row.kek_id)
        return unwrap_dek(ring.key(row.kek_id), row.wrapped_dek, tenant_id=tenant_id, kek_id=row.kek_id,
                          dek_version=row.dek_version)
    ring = keys.current_ring(reload=True)  # wrap with the newest active key, even if another process rotated
    _register_active_kek(session, ring, now)
    dek = new_dek()
    session.add(VaultTenantKey(
        tenant_id=tenant_id, kek_id=ring.active, dek_version=1, created_at=now,
        wrapped_dek=wrap_dek(ring.active_key, dek, tenant_id=tenant_id, kek_id=ring.active, dek_version=1),
    ))
    session.flush()
    record_event(session, principal=Principal.system("vault"), action="vault.dek.create", tenant_id=tenant_id,
                 target=f"tenant:{tenant_id}", details={"kek": ring.active}, at=now)
    return dek


# --- store -----------------------------------------------------------------------------------------


def _secret_bytes(secret: SecretStr | str | bytes) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not raw.strip():
        raise InvalidInput("The secret is empty: enter the password, token or key to store.")
    if len(raw) > MAX_SECRET_BYTES:
        raise InvalidInput(f"The secret is {len(raw):,} bytes: the vault stores at most {MAX_SECRET_BYTES:,}.")
    return raw


def _check_owner(session: Session, tenant_id: int, crm_account_id: int | None, app_user_id: int | None) -> None:
    if session.get(Tenant, tenant_id) is None:
        raise NotFound(f"Tenant {tenant_id} does not exist: pick a tenant from the Tenants page.")
    require_not_offboarded(session, tenant_id, "the vault stores no new credentials for it")
    if crm_account_id is not None:
        account = session.get(CrmAccount, crm_account_id)
        if account is None or account.tenant_id != tenant_id:
            raise NotFound(f"CRM account {crm_account_id} is not an account of tenant {tenant_id}: pick one of its "
                           "accounts on the tenant page.")
    if app_user_id is not None:
        user = session.get(AppUser, app_user_id)
        if user is None or user.tenant_id != tenant_id:
            raise NotFound(f"App user {app_user_id} is not a user of tenant {tenant_id}: add the user first.")
        if crm_account_id is None:
            raise InvalidInput("A per-user credential belongs to one CRM account: give crm_account_id.")


def _slot_query(tenant_id: int, crm_account_id: int | None, app_user_id: int | None, purpose: str) -> Any:
    acc = col(VaultCredential.crm_account_id)
    usr = col(VaultCredential.app_user_id)
    return select(VaultCredential).where(
        VaultCredential.tenant_id == tenant_id, VaultCredential.purpose == purpose,
        acc.is_(None) if crm_account_id is None else acc == crm_account_id,
        usr.is_(None) if app_user_id is None else usr == app_user_id,
    )


def put(
    session: Session,
    *,
    principal: Principal,
    tenant_id: int,
    purpose: str,
    secret: SecretStr | str | bytes,
    crm_account_id: int | None = None,
    app_user_id: int | None = None,
    kind: str = CredentialKind.password.value,
    ttl: timedelta | None = None,
    now: datetime | None = None,
) -> CredentialRef:
    """Encrypt and store a secret; replaces (same id, next version) the one already held for the same
    tenant, account, user and purpose. ``ttl`` defaults to the tenant policy for the kind.

    Raises:
        AccessDenied, NotFound, InvalidInput, KeyMissing.
    """
    require_tenant(principal, tenant_id)
    return store(session, actor=principal, tenant_id=tenant_id, purpose=purpose, secret=secret,
                 crm_account_id=crm_account_id, app_user_id=app_user_id, kind=kind, ttl=ttl, now=now)


def store(
    session: Session,
    *,
    actor: Principal | str,
    tenant_id: int,
    purpose: str,
    secret: SecretStr | str | bytes,
    crm_account_id: int | None = None,
    app_user_id: int | None = None,
    kind: str = CredentialKind.password.value,
    ttl: timedelta | None = None,
    via: str | None = None,
    now: datetime | None = None,
) -> CredentialRef:
    """``put`` without the access check, for callers that proved who acts another way (a connect link)."""
    now = resolve_now(now)
    if not isinstance(purpose, str) or not PURPOSE_RE.match(purpose):
        raise InvalidInput(f"Purpose {purpose!r} is not valid: use lowercase letters, digits and '-' (e.g. crm-login).")
    if kind not in KINDS:
        raise InvalidInput(f"Unknown credential kind {kind!r}: use one of {', '.join(sorted(KINDS))}.")
    raw = _secret_bytes(secret)
    _check_owner(session, tenant_id, crm_account_id, app_user_id)
    ttl = ttl if ttl is not None else get_policy(session, tenant_id).default_ttl(kind)
    if ttl is not None and ttl <= timedelta(0):
        raise InvalidInput("The TTL must be positive: give a timedelta such as timedelta(days=30).")
    dek = _tenant_dek(session, tenant_id, now=now)
    row = session.exec(_slot_query(tenant_id, crm_account_id, app_user_id, purpose)).first()
    replaced = row is not None
    if row is None:
        row = VaultCredential(tenant_id=tenant_id, crm_account_id=crm_account_id, app_user_id=app_user_id,
                              purpose=purpose, kind=kind, version=1, ciphertext=b"", created_at=now)
        session.add(row)
        session.flush()  # the id is part of the associated data
    else:
        row.version += 1
    row.kind = kind
    row.state = CredentialState.active.value
    row.failures = 0
    row.failed_at = None
    row.last_used_at = None
    row.created_at = now
    row.expires_at = now + ttl if ttl is not None else None
    row.stored_by = _label(actor)
    assert row.id is not None
    row.ciphertext = seal(dek, raw, credential_aad(
        tenant_id=tenant_id, crm_account_id=crm_account_id, app_user_id=app_user_id, purpose=purpose,
        credential_id=row.id, version=row.version))
    session.add(row)
    session.flush()
    record_event(session, principal=actor, action="vault.credential.store", tenant_id=tenant_id,
                 target=f"credential:{row.id}", via=via, at=now, details={
                     "purpose": purpose, "kind": kind, "crm_account_id": crm_account_id, "app_user_id": app_user_id,
                     "version": row.version, "replaced": replaced, "expires_at": row.expires_at})
    log.info("vault: stored credential %s (%s, tenant %s)", row.id, purpose, tenant_id)
    return CredentialRef(row.id)


# --- use -------------------------------------------------------------------------------------------


def _forget_stale(session: Session, credential_id: int, tenant_id: int) -> None:
    """The hot path wrote past the ORM: expire what this session may hold of those rows."""
    if not len(session.identity_map):
        return
    for key in (identity_key(VaultCredential, credential_id), identity_key(AuditHead, chain_name(tenant_id)),
                identity_key(AuditSeal, 1)):
        obj = session.identity_map.get(key)
        if obj is not None:
            session.expire(obj)


class _Use:
    """The context manager ``use()`` returns (a class: this is the hottest path of the vault)."""

    __slots__ = ("session", "credential_id", "principal", "reason", "now")

    def __init__(self, session: Session, credential_id: int, principal: Principal, reason: str,
                 now: datetime) -> None:
        self.session = session
        self.credential_id = credential_id
        self.principal = principal
        self.reason = reason
        self.now = now

    def __enter__(self) -> SecretStr:
        session = self.session
        if session.in_transaction():
            session.commit()
        engine = (session.bind or session.get_bind()).engine
        outcome = hot_path(engine).use(engine, self.credential_id, principal=self.principal, reason=self.reason,
                                       now=self.now)
        if outcome.status != "ok":
            _refuse(session, self.credential_id, outcome.status, outcome.found, principal=self.principal,
                    now=self.now)
        assert outcome.tenant_id is not None and outcome.plaintext is not None
        _forget_stale(session, self.credential_id, outcome.tenant_id)
        log.debug("vault: credential %s used by %s", self.credential_id, self.principal.email)
        return SecretStr(outcome.plaintext.decode())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is not None and issubclass(exc_type, AuthenticationFailed):
            report_auth_failure(self.session, CredentialRef(self.credential_id), principal=self.principal,
                                now=self.now)


def use(
    session: Session, ref: CredentialRef | int | str, *, principal: Principal, reason: str,
    now: datetime | None = None,
) -> AbstractContextManager[SecretStr]:
    """``with use(session, ref, principal=..., reason=...) as secret:`` — the secret for one piece of
    work, as a SecretStr; nothing is cached.

    Before the secret is released, the last use and an access audit event (who, why) are committed.
    If the body raises ``AuthenticationFailed`` (a definitive failed login or token refresh), the
    failure is reported (see ``report_auth_failure``) before the error propagates; ``SessionExpired``
    and every other error pass through untouched.

    Raises (on entering):
        CredentialDestroyed: destroyed (self-destruct, revoke, shred) or never stored.
        CredentialExpired: TTL or idle limit passed (the credential is destroyed now).
        CredentialInvalid: tampered (now flagged), or an API-user credential marked failed.
        AccessDenied, KeyMissing.
    """
    reason = (reason or "").strip()
    if not reason or len(reason) > 200:
        raise InvalidInput("Say why the credential is used (reason, 1-200 characters): it goes to the audit log.")
    return _Use(session, _ref_id(ref), principal, reason, resolve_now(now))


def _refuse(session: Session, credential_id: int, status: str, found: Found | None, *, principal: Principal,
            now: datetime) -> NoReturn:
    """Turn a refused use into its error, destroying or flagging the credential where that is the rule."""
    if status == "missing":
        tomb = session.exec(
            select(VaultTombstone).where(VaultTombstone.credential_id == credential_id)
            .order_by(col(VaultTombstone.destroyed_at).desc())
        ).first()
        if tomb is None:
            raise CredentialDestroyed(
                f"There is no credential vault:{credential_id}: it was never stored or its tenant was shredded. "
                "Store the secret again (or send the user a connect link)."
            )
        require_tenant(principal, tomb.tenant_id)
        raise CredentialDestroyed(
            f"Credential vault:{credential_id} was destroyed on {tomb.destroyed_at:%Y-%m-%d %H:%M} UTC "
            f"({tomb.reason}): {_reconnect_fix(tomb.app_user_id)}"
        )
    assert found is not None
    if status == "denied":
        require_tenant(principal, found.tenant_id)
        raise AssertionError("unreachable: require_tenant refused")
    if status == "failed":
        raise CredentialInvalid(
            f"Credential vault:{credential_id} (the API user's {found.purpose}) failed authentication on "
            f"{found.failed_at or now:%Y-%m-%d %H:%M} UTC and is held back so the CRM does not lock the user out: "
            "fix the API user in the CRM, then store its secret again on the tenant page."
        )
    if status == "invalid":
        raise CredentialInvalid(
            f"Credential vault:{credential_id} did not decrypt earlier (altered or moved) and is never used again: "
            f"{_reconnect_fix(found.app_user_id)}"
        )
    row = session.exec(
        select(VaultCredential).where(VaultCredential.id == credential_id).execution_options(populate_existing=True)
    ).first()
    if row is None:  # destroyed meanwhile by another process
        raise CredentialDestroyed(f"Credential vault:{credential_id} was just destroyed: "
                                  f"{_reconnect_fix(found.app_user_id)}")
    if status in ("expired", "idle"):
        if status == "expired":
            why = f"expired (TTL) on {found.expires_at:%Y-%m-%d %H:%M} UTC"
        else:
            why = f"idle for {found.idle_days} days"
        _destroy(session, row, reason=why, actor=Principal.system("vault"), now=now)
        session.commit()
        raise CredentialExpired(f"Credential vault:{credential_id} {why} and was destroyed: "
                                f"{_reconnect_fix(found.app_user_id)}")
    if status == "unreadable":
        # Not a ciphertext at all (text where bytes belong, cut short): damaged outside the vault.
        # Flag it and keep it as it is, so it can be restored from a backup; nothing is destroyed.
        why = malformed(found.raw_ciphertext) or "it is damaged"
        row.state = CredentialState.invalid.value
        session.add(row)
        record_event(session, principal=principal, action="vault.credential.unreadable", tenant_id=row.tenant_id,
                     target=f"credential:{credential_id}", at=now,
                     details={"purpose": row.purpose, "app_user_id": row.app_user_id, "problem": why})
        session.commit()
        log.error("vault: credential %s is unreadable (%s); flagged, kept as it is", credential_id, why)
        raise CredentialInvalid(
            f"Credential vault:{credential_id} is unreadable: {why}. The row was damaged outside the vault (a bad "
            "restore or a manual edit); it is kept as it is, flagged and not used. Restore the vault_credential "
            f"row {credential_id} from a backup, or {_reconnect_fix(found.app_user_id)}"
        )
    # A decrypt failure is only taken for tampering once the vault key is proven right: a process
    # started with the wrong key must never flag, destroy or falsely report anything.
    _require_proven_key(session, found.kek_id)
    if status == "dek":
        record_event(session, principal=principal, action="vault.dek.unreadable", tenant_id=row.tenant_id,
                     target=f"tenant:{row.tenant_id}", at=now, details={"kek": found.kek_id})
        session.commit()
        log.error("vault: the data key of tenant %s did not unwrap with the right vault key %s", row.tenant_id,
                  found.kek_id)
        raise CredentialInvalid(
            f"The data key of tenant {row.tenant_id} did not decrypt although vault key {found.kek_id!r} is the right "
            f"one: its vault_tenant_key row was altered or damaged. Restore that row from a backup; no credential was "
            "changed or destroyed."
        )
    # tampered: flag it (keep the row as evidence), audit, and refuse with the one opaque error
    row.state = CredentialState.invalid.value
    session.add(row)
    record_event(session, principal=principal, action="vault.credential.tampered", tenant_id=row.tenant_id,
                 target=f"credential:{credential_id}", at=now,
                 details={"purpose": row.purpose, "app_user_id": row.app_user_id})
    session.commit()
    log.warning("vault: credential %s did not decrypt (tampered or moved); flagged invalid", credential_id)
    raise invalid()


def _require_proven_key(session: Session, kek_id: str) -> None:
    """Raise (changing nothing) unless this process's key ``kek_id`` matches the check value the
    database holds for it. Called before any decrypt failure is held against a credential."""
    ring = keys.current_ring()
    material = ring.keys.get(kek_id)
    row = session.exec(select(VaultKek).where(VaultKek.kek_id == kek_id)
                       .execution_options(populate_existing=True)).first()
    if material is not None and row is not None and hmac.compare_digest(row.check_value, check_value(material)):
        return
    session.rollback()
    log.error("vault: a decrypt failed and vault key %r is not proven right; nothing was flagged", kek_id)
    if material is None:
        raise KeyMissing(f"Vault key {kek_id!r} is not in {ring.source}: restore that key; nothing was changed.")
    if row is None:
        raise ConfigurationError(
            f"Vault key {kek_id!r} has no check value in the database, so a decrypt failure cannot be told from a "
            "wrong key: nothing was flagged or destroyed. Run `crmbridge vault status` with the right key ring to "
            "check it.")
    raise ConfigurationError(str(_wrong_key(kek_id, ring)) + " Nothing was flagged or destroyed.")


def _reconnect_fix(app_user_id: int | None) -> str:
    if app_user_id is not None:
        return "the user must reconnect: create a new connect link for them on the tenant page."
    return "store the secret again on the tenant page."


# --- destroy ---------------------------------------------------------------------------------------


def _destroy(session: Session, row: VaultCredential, *, reason: str, actor: Principal | str, now: datetime,
             via: str | None = None, audit: bool = True) -> None:
    assert row.id is not None
    session.add(VaultTombstone(
        credential_id=row.id, tenant_id=row.tenant_id, crm_account_id=row.crm_account_id,
        app_user_id=row.app_user_id, purpose=row.purpose, kind=row.kind, reason=reason[:200],
        destroyed_by=_label(actor), destroyed_at=now,
    ))
    session.delete(row)
    session.flush()
    if audit:
        record_event(session, principal=actor, action="vault.credential.destroy", tenant_id=row.tenant_id,
                     target=f"credential:{row.id}", via=via, at=now, details={
                         "reason": reason[:200], "purpose": row.purpose, "kind": row.kind,
                         "crm_account_id": row.crm_account_id, "app_user_id": row.app_user_id})
    log.info("vault: destroyed credential %s (%s)", row.id, reason[:200])


def _fresh(session: Session, credential_id: int) -> VaultCredential | None:
    return session.exec(
        select(VaultCredential).where(VaultCredential.id == credential_id).execution_options(populate_existing=True)
    ).first()


def report_auth_failure(
    session: Session, ref: CredentialRef | int | str, *, principal: Principal, now: datetime | None = None,
) -> str:
    """Report a definitive authentication failure (a failed login or token refresh — never an expired
    session, never a timeout). ``use()`` calls this itself when its body raises AuthenticationFailed.

    A per-user credential is destroyed once its failures reach the tenant's threshold (default 1); an
    API-user credential is marked failed and held back for the admin. Commits, so the destruction
    survives the caller's rollback. Returns "destroyed", "failed", "counted" or "gone".
    """
    now = resolve_now(now)
    credential_id = _ref_id(ref)
    row = _fresh(session, credential_id)
    if row is None:
        return "gone"
    require_tenant(principal, row.tenant_id)
    policy = get_policy(session, row.tenant_id)
    row.failures += 1
    row.failed_at = now
    if row.app_user_id is not None and row.failures >= policy.failure_threshold:
        _destroy(session, row, reason=f"authentication failed ({row.failures} of {policy.failure_threshold})",
                 actor=principal, now=now)
        outcome = "destroyed"
    elif row.app_user_id is None:
        row.state = CredentialState.failed.value
        session.add(row)
        record_event(session, principal=principal, action="vault.credential.failed", tenant_id=row.tenant_id,
                     target=f"credential:{credential_id}", at=now,
                     details={"purpose": row.purpose, "crm_account_id": row.crm_account_id})
        log.warning("vault: API-user credential %s failed authentication; held back for the admin", credential_id)
        outcome = "failed"
    else:
        session.add(row)
        record_event(session, principal=principal, action="vault.credential.auth_failure", tenant_id=row.tenant_id,
                     target=f"credential:{credential_id}", at=now,
                     details={"failures": row.failures, "threshold": policy.failure_threshold})
        outcome = "counted"
    session.commit()
    return outcome


def revoke(
    session: Session, ref: CredentialRef | int | str, *, principal: Principal | str, reason: str,
    now: datetime | None = None, via: str | None = None,
) -> bool:
    """Destroy a credential now (the user or an admin). False when it was already gone."""
    now = resolve_now(now)
    row = _fresh(session, _ref_id(ref))
    if row is None:
        return False
    if isinstance(principal, Principal):
        require_tenant(principal, row.tenant_id)
    reason = (reason or "").strip() or "no reason given"
    _destroy(session, row, reason=f"revoked: {reason}", actor=principal, now=now, via=via)
    return True


def _policies(session: Session) -> dict[int, Policy]:
    return {p.tenant_id: from_row(p) for p in session.exec(select(VaultPolicy))}


@dataclass
class SweepResult:
    expired: int = 0
    idle: int = 0

    @property
    def destroyed(self) -> int:
        return self.expired + self.idle


def sweep(session: Session, *, now: datetime, principal: Principal | None = None) -> SweepResult:
    """Destroy every credential past its TTL and every per-user credential idle past its tenant's limit."""
    now = resolve_now(now)
    principal = principal or Principal.system("vault-sweep")
    require_staff(principal)
    result = SweepResult()
    for row in session.exec(select(VaultCredential).where(col(VaultCredential.expires_at) <= now)).all():
        _destroy(session, row, reason=f"expired (TTL) on {row.expires_at:%Y-%m-%d %H:%M} UTC", actor=principal,
                 now=now)
        result.expired += 1
    policies = _policies(session)
    shortest = min([p.idle_days for p in policies.values()] + [DEFAULT_POLICY.idle_days])
    last = func.coalesce(col(VaultCredential.last_used_at), col(VaultCredential.created_at))
    candidates = session.exec(select(VaultCredential).where(
        col(VaultCredential.app_user_id).is_not(None), last <= now - timedelta(days=shortest))).all()
    for row in candidates:
        policy = policies.get(row.tenant_id, DEFAULT_POLICY)
        if (row.last_used_at or row.created_at) + policy.idle_limit <= now:
            _destroy(session, row, reason=f"idle for {policy.idle_days} days", actor=principal, now=now)
            result.idle += 1
    record_event(session, principal=principal, action="vault.sweep", target="vault", at=now,
                 details={"expired": result.expired, "idle": result.idle})
    if result.destroyed:
        log.info("vault sweep: destroyed %d expired and %d idle credential(s)", result.expired, result.idle)
    return result


def require_keys_at_start(engine: Engine | None = None, *, process: str, now: datetime | None = None) -> KeyRing:
    """Every process that touches the vault calls this first: the key ring must hold every key that
    wraps a tenant key, each with the check value the database holds for its id. On a mismatch it
    raises (changing nothing), with the process named and the fix, so the process exits non-zero
    before it reads a single credential.

    Raises:
        KeyMissing, ConfigurationError.
    """
    try:
        return _first_registration_retried(lambda: _check_in_own_session(engine, now))
    except ConfigurationError as exc:
        raise type(exc)(f"{process} refuses to start: {exc}") from None


def _check_in_own_session(engine: Engine | None, now: datetime | None) -> KeyRing:
    with session_scope(engine) as s:
        return check_keys(s, now=now)


def _first_registration_retried(start: Callable[[], _T]) -> _T:
    """Processes started together on a new database (two schedulers, two consoles) may both register
    the active key's check value: the loser's insert hits the primary key. The winner's row is then
    there, so checking again verifies against it instead of failing the start."""
    try:
        return start()
    except IntegrityError:
        return start()


def sweep_on_start(engine: Engine | None = None, *, now: datetime | None = None) -> SweepResult:
    """Console start-up: refuse to run on missing or wrong keys, then sweep. Commits."""
    now = resolve_now(now)

    def start() -> SweepResult:
        with session_scope(engine) as s:
            check_keys(s, now=now)
            return sweep(s, now=now, principal=Principal.system("console-start"))

    return _first_registration_retried(start)


def destroy_for_mode_change(
    session: Session, *, principal: Principal, crm_account_id: int,
    kinds: tuple[str, ...] = (CredentialKind.password.value,), now: datetime | None = None,
) -> int:
    """The account moved to an API user or OAuth: destroy its stored per-user passwords. Returns how many."""
    now = resolve_now(now)
    account = session.get(CrmAccount, crm_account_id)
    if account is None:
        raise NotFound(f"CRM account {crm_account_id} does not exist: pick one from the tenant page.")
    require_tenant(principal, account.tenant_id)
    rows = session.exec(select(VaultCredential).where(
        VaultCredential.crm_account_id == crm_account_id, col(VaultCredential.app_user_id).is_not(None),
        col(VaultCredential.kind).in_(kinds))).all()
    for row in rows:
        _destroy(session, row, reason=f"credential mode changed to {account.credential_mode}", actor=principal,
                 now=now)
    return len(rows)


def shred_tenant(session: Session, *, principal: Principal, tenant_id: int, now: datetime | None = None) -> int:
    """Crypto-shred a tenant: delete its data key first (every ciphertext becomes unreadable), then its
    credentials and connect links; tombstones remain. Staff only. Commits, then (SQLite) checkpoints
    the WAL so the wrapped key's bytes leave it. Returns the number of credentials destroyed.

    Backups taken earlier still hold the wrapped key: rotate the KEK afterwards (``rotate_kek``) and
    the retired KEK takes those copies with it.
    """
    now = resolve_now(now)
    require_staff(principal)
    key = session.get(VaultTenantKey, tenant_id)
    if key is not None:
        session.delete(key)
        session.flush()
    rows = session.exec(select(VaultCredential).where(VaultCredential.tenant_id == tenant_id)).all()
    for row in rows:
        _destroy(session, row, reason="tenant shredded", actor=principal, now=now, audit=False)
    session.execute(delete(VaultConnectLink).where(col(VaultConnectLink.tenant_id) == tenant_id))
    record_event(session, principal=principal, action="vault.tenant.shred", tenant_id=tenant_id,
                 target=f"tenant:{tenant_id}", at=now, details={"credentials": len(rows), "had_key": key is not None})
    session.commit()
    _checkpoint(session)
    log.warning("vault: shredded tenant %s (%d credential(s))", tenant_id, len(rows))
    return len(rows)


def _checkpoint(session: Session) -> None:
    engine = session.get_bind().engine
    if engine.dialect.name != "sqlite":
        return
    pooled = engine.raw_connection()
    try:
        pooled.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
    finally:
        pooled.close()


# --- rotation --------------------------------------------------------------------------------------


@dataclass
class KekRotation:
    active: str
    rewrapped: int = 0
    retired: list[str] = field(default_factory=list)
    new_key: bool = False


def _pending(session: Session, active: str) -> int:
    return session.exec(
        select(func.count()).select_from(VaultTenantKey).where(VaultTenantKey.kek_id != active)
    ).one()


def rotate_kek(
    *,
    principal: Principal,
    engine: Engine | None = None,
    provider: KeyProvider | None = None,
    new_key: bool = True,
    batch_size: int = 200,
    now: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KekRotation:
    """Make a new KEK active and re-wrap every tenant data key under it, ``batch_size`` tenants per
    transaction; then retire the old KEK (and drop it from a writable ring). Cost grows with tenants,
    never with credentials: ciphertexts are untouched.

    Resumable: if a previous run stopped half-way (crash, Ctrl-C), this one re-wraps what is left with
    the key that run made active instead of making another. Every data key stays readable throughout:
    the old KEK is removed only after nothing is wrapped by it. With a read-only ring (environment,
    KMS) the operator adds and activates the new key first; this then re-wraps and retires.
    ``progress(done, total)`` is called after each batch.

    Raises:
        AccessDenied (staff only), KeyMissing, ConfigurationError (read-only ring with nothing to re-wrap).
    """
    require_staff(principal)
    if batch_size < 1:
        raise InvalidInput("batch_size must be at least 1.")
    now = resolve_now(now)
    provider = provider or keys.get_provider()
    ring = provider.load()
    with session_scope(engine) as s:
        check_keys(s, ring=ring, now=now)
        pending = _pending(s, ring.active)
    result = KekRotation(active=ring.active)
    if pending == 0 and new_key:
        ring = ring.with_key(keys.generate_key_id(now), secrets.token_bytes(keys.KEY_BYTES))
        provider.save(ring)  # the new key is durable before anything is wrapped with it
        keys.current_ring(reload=True)
        result = KekRotation(active=ring.active, new_key=True)
        with session_scope(engine) as s:
            _register_active_kek(s, ring, now)
            pending = _pending(s, ring.active)
    with session_scope(engine) as s:
        record_event(s, principal=principal, action="vault.kek.rotate", target=f"kek:{ring.active}", at=now,
                     details={"phase": "start", "tenants": pending, "new_key": result.new_key})
    total = pending
    while True:
        with session_scope(engine) as s:
            batch = s.exec(select(VaultTenantKey).where(VaultTenantKey.kek_id != ring.active)
                           .order_by(col(VaultTenantKey.tenant_id)).limit(batch_size)).all()
            for row in batch:
                dek = unwrap_dek(ring.key(row.kek_id), row.wrapped_dek, tenant_id=row.tenant_id,
                                 kek_id=row.kek_id, dek_version=row.dek_version)
                row.wrapped_dek = wrap_dek(ring.active_key, dek, tenant_id=row.tenant_id, kek_id=ring.active,
                                           dek_version=row.dek_version)
                row.kek_id = ring.active
                row.rotated_at = now
                s.add(row)
        if not batch:
            break
        result.rewrapped += len(batch)
        if progress is not None:
            progress(result.rewrapped, max(total, result.rewrapped))
    with session_scope(engine) as s:
        wrapping = set(s.exec(select(VaultTenantKey.kek_id).distinct()).all())
        for kek in s.exec(select(VaultKek).where(VaultKek.state != KekState.retired.value)).all():
            if kek.kek_id != ring.active and kek.kek_id not in wrapping:
                kek.state = KekState.retired.value
                kek.retired_at = now
                s.add(kek)
                result.retired.append(kek.kek_id)
        record_event(s, principal=principal, action="vault.kek.rotate", target=f"kek:{ring.active}", at=now,
                     details={"phase": "finish", "rewrapped": result.rewrapped, "retired": result.retired})
    leftover = [k for k in ring.keys if k != ring.active]
    if provider.writable and leftover:
        with session_scope(engine) as s:
            wrapping = set(s.exec(select(VaultTenantKey.kek_id).distinct()).all())
        drop = [k for k in leftover if k not in wrapping]
        if drop:
            provider.save(ring.without(drop))
            keys.current_ring(reload=True)
    log.info("vault: KEK rotation to %s re-wrapped %d tenant key(s); retired %s", ring.active,
             result.rewrapped, result.retired or "none")
    return result


def rotate_dek(session: Session, *, principal: Principal, tenant_id: int, now: datetime | None = None) -> int:
    """Give a tenant a new data key and re-encrypt its credentials under it (one transaction).
    A credential that no longer decrypts is flagged invalid. Returns how many were re-encrypted."""
    now = resolve_now(now)
    require_tenant(principal, tenant_id)
    key = session.get(VaultTenantKey, tenant_id)
    if key is None:
        return 0
    old = unwrap_dek(keys.ring_with(key.kek_id).key(key.kek_id), key.wrapped_dek, tenant_id=tenant_id,
                     kek_id=key.kek_id, dek_version=key.dek_version)
    ring = keys.current_ring(reload=True)
    _register_active_kek(session, ring, now)
    new = new_dek()
    done = invalid = 0
    for row in session.exec(select(VaultCredential).where(VaultCredential.tenant_id == tenant_id)).all():
        assert row.id is not None
        aad = credential_aad(tenant_id=tenant_id, crm_account_id=row.crm_account_id, app_user_id=row.app_user_id,
                             purpose=row.purpose, credential_id=row.id, version=row.version)
        if row.state == CredentialState.invalid:
            continue
        try:
            plaintext = open_sealed(old, row.ciphertext, aad)
        except CredentialInvalid:
            row.state = CredentialState.invalid.value
            invalid += 1
        else:
            row.ciphertext = seal(new, plaintext, aad)
            done += 1
        session.add(row)
    key.dek_version += 1
    key.kek_id = ring.active
    key.wrapped_dek = wrap_dek(ring.active_key, new, tenant_id=tenant_id, kek_id=ring.active,
                               dek_version=key.dek_version)
    key.rotated_at = now
    session.add(key)
    record_event(session, principal=principal, action="vault.dek.rotate", tenant_id=tenant_id,
                 target=f"tenant:{tenant_id}", at=now,
                 details={"credentials": done, "invalid": invalid, "dek_version": key.dek_version})
    return done


# --- read ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CredentialInfo:
    """One row of the credentials table. Never the secret. ``ref`` is None for a "reconnect needed"
    slot (the credential was destroyed and not replaced)."""

    ref: CredentialRef | None
    tenant_id: int
    crm_account_id: int | None
    crm_account: str
    app_user_id: int | None
    owner: str
    purpose: str
    kind: str
    state: str
    stored_at: datetime | None
    expires_at: datetime | None
    last_used_at: datetime | None
    idle_deadline: datetime | None
    destroyed_reason: str | None = None

    @property
    def ends_at(self) -> datetime | None:
        """When it self-destructs at the latest (TTL or idle, whichever comes first)."""
        dates = [d for d in (self.expires_at, self.idle_deadline) if d is not None]
        return min(dates) if dates else None


def _owner(user: AppUser | None, account_id: int | None) -> str:
    if user is not None:
        return user.email
    return "API user" if account_id is not None else "tenant"


def _reconnect_needed(session: Session, tenant_id: int | None = None) -> list[VaultTombstone]:
    """The latest tombstone of each per-user slot that holds no credential now, in accounts that still
    act with each user's own credentials: those users must reconnect."""
    tombs = select(VaultTombstone).where(col(VaultTombstone.app_user_id).is_not(None))
    live = select(VaultCredential.crm_account_id, VaultCredential.app_user_id, VaultCredential.purpose).where(
        col(VaultCredential.app_user_id).is_not(None))
    per_user = select(CrmAccount.id).where(col(CrmAccount.credential_mode).in_(PER_USER_MODES))
    if tenant_id is not None:
        tombs = tombs.where(VaultTombstone.tenant_id == tenant_id)
        live = live.where(VaultCredential.tenant_id == tenant_id)
        per_user = per_user.where(CrmAccount.tenant_id == tenant_id)
    held = set(session.exec(live).all())
    accounts = set(session.exec(per_user).all())
    out: list[VaultTombstone] = []
    for t in session.exec(tombs.order_by(col(VaultTombstone.destroyed_at).desc(), col(VaultTombstone.id).desc())):
        slot = (t.crm_account_id, t.app_user_id, t.purpose)
        if slot not in held:
            held.add(slot)  # only the latest tombstone of a slot counts
            if t.crm_account_id in accounts:
                out.append(t)
    return out


def list_credentials(
    session: Session, *, principal: Principal, tenant_id: int, now: datetime | None = None,
) -> list[CredentialInfo]:
    """Every credential of a tenant (owner, state, dates), plus per-user slots needing a reconnect."""
    require_tenant(principal, tenant_id)
    policy = get_policy(session, tenant_id)
    users = {u.id: u for u in session.exec(select(AppUser).where(AppUser.tenant_id == tenant_id))}
    accounts = {a.id: a for a in session.exec(select(CrmAccount).where(CrmAccount.tenant_id == tenant_id))}
    out: list[CredentialInfo] = []
    for row in session.exec(select(VaultCredential).where(VaultCredential.tenant_id == tenant_id)
                            .order_by(col(VaultCredential.id))):
        idle = (row.last_used_at or row.created_at) + policy.idle_limit if row.app_user_id is not None else None
        acc = accounts.get(row.crm_account_id) if row.crm_account_id is not None else None
        out.append(CredentialInfo(
            ref=CredentialRef(row.id) if row.id is not None else None, tenant_id=tenant_id,
            crm_account_id=row.crm_account_id, crm_account=acc.label if acc else "—", app_user_id=row.app_user_id,
            owner=_owner(users.get(row.app_user_id) if row.app_user_id else None, row.crm_account_id),
            purpose=row.purpose, kind=row.kind, state=row.state, stored_at=row.created_at,
            expires_at=row.expires_at, last_used_at=row.last_used_at, idle_deadline=idle,
        ))
    for t in _reconnect_needed(session, tenant_id):
        acc = accounts.get(t.crm_account_id) if t.crm_account_id is not None else None
        user = users.get(t.app_user_id) if t.app_user_id is not None else None
        if acc is None or user is None:
            continue
        out.append(CredentialInfo(
            ref=None, tenant_id=tenant_id, crm_account_id=t.crm_account_id, crm_account=acc.label,
            app_user_id=t.app_user_id, owner=user.email, purpose=t.purpose, kind=t.kind, state=RECONNECT_NEEDED,
            stored_at=None, expires_at=None, last_used_at=None, idle_deadline=None,
            destroyed_reason=f"{t.reason} ({t.destroyed_at:%Y-%m-%d %H:%M} UTC)",
        ))
    return out


def find_credential(
    session: Session, *, tenant_id: int, crm_account_id: int | None = None, app_user_id: int | None = None,
    purpose: str,
) -> CredentialRef | None:
    """The reference of the credential held for this slot, or None (never stored, or destroyed)."""
    row = session.exec(_slot_query(tenant_id, crm_account_id, app_user_id, purpose)).first()
    return CredentialRef(row.id) if row is not None and row.id is not None else None


def credential_state(
    session: Session, *, tenant_id: int, crm_account_id: int | None, app_user_id: int | None,
    purpose: str = "crm-login",
) -> str:
    """"connected", "failed", "invalid", "reconnect needed" (destroyed, not replaced) or "not connected"."""
    row = session.exec(_slot_query(tenant_id, crm_account_id, app_user_id, purpose)).first()
    if row is not None:
        return "connected" if row.state == CredentialState.active else row.state
    acc = col(VaultTombstone.crm_account_id)
    usr = col(VaultTombstone.app_user_id)
    tomb = session.exec(select(VaultTombstone.id).where(
        VaultTombstone.tenant_id == tenant_id, VaultTombstone.purpose == purpose,
        acc.is_(None) if crm_account_id is None else acc == crm_account_id,
        usr.is_(None) if app_user_id is None else usr == app_user_id).limit(1)).first()
    return RECONNECT_NEEDED if tomb is not None else "not connected"


@dataclass(frozen=True)
class KekInfo:
    kek_id: str
    state: str
    in_ring: bool
    tenant_keys: int
    created_at: datetime | None
    retired_at: datetime | None


@dataclass(frozen=True)
class ExpiringCredential:
    ref: CredentialRef
    tenant: str
    owner: str
    purpose: str
    ends_at: datetime
    cause: str  # "TTL" or "idle"


@dataclass(frozen=True)
class VaultStatus:
    active_kek: str
    key_source: str
    keks: list[KekInfo]
    rotation_pending: int
    by_state: dict[str, int]
    tenants_with_keys: int
    expiring: list[ExpiringCredential]
    reconnect_needed: int
    last_sweep_at: datetime | None
    last_sweep: dict[str, Any]


def vault_status(
    session: Session, *, principal: Principal, now: datetime | None = None, soon: timedelta = timedelta(days=7),
    limit: int = 50,
) -> VaultStatus:
    """What the staff Vault page and ``crmbridge vault status`` show. Never a secret or key material."""
    require_staff(principal)
    now = resolve_now(now)
    ring = keys.current_ring()
    counts = dict(session.exec(
        select(VaultTenantKey.kek_id, func.count()).group_by(col(VaultTenantKey.kek_id))).all())
    rows = {k.kek_id: k for k in session.exec(select(VaultKek))}
    keks = [
        KekInfo(kek_id=k, state=(rows[k].state if k in rows else ("active" if k == ring.active else "unused")),
                in_ring=k in ring.keys, tenant_keys=counts.get(k, 0),
                created_at=rows[k].created_at if k in rows else None,
                retired_at=rows[k].retired_at if k in rows else None)
        for k in sorted(set(ring.keys) | set(rows) | set(counts), key=lambda k: (k != ring.active, k))
    ]
    by_state = Counter(dict(session.exec(
        select(VaultCredential.state, func.count()).group_by(col(VaultCredential.state))).all()))
    policies = _policies(session)
    tenants = {t.id: t.slug for t in session.exec(select(Tenant))}
    expiring: list[ExpiringCredential] = []
    horizon = now + soon
    last = func.coalesce(col(VaultCredential.last_used_at), col(VaultCredential.created_at))
    shortest = min([p.idle_days for p in policies.values()] + [DEFAULT_POLICY.idle_days])
    candidates = session.exec(
        select(VaultCredential, AppUser).join(AppUser, col(AppUser.id) == col(VaultCredential.app_user_id),
                                              isouter=True)
        .where((col(VaultCredential.expires_at) <= horizon)
               | (col(VaultCredential.app_user_id).is_not(None) & (last <= horizon - timedelta(days=shortest))))
    ).all()
    for row, user in candidates:
        policy = policies.get(row.tenant_id, DEFAULT_POLICY)
        ends: list[tuple[datetime, str]] = []
        if row.expires_at is not None:
            ends.append((row.expires_at, "TTL"))
        if row.app_user_id is not None:
            ends.append(((row.last_used_at or row.created_at) + policy.idle_limit, "idle"))
        at, cause = min(ends)
        if at <= horizon and row.id is not None:
            expiring.append(ExpiringCredential(CredentialRef(row.id), tenants.get(row.tenant_id, "?"),
                                               _owner(user, row.crm_account_id), row.purpose, at, cause))
    expiring.sort(key=lambda e: e.ends_at)
    sweep_ev = session.exec(select(AuditEvent).where(AuditEvent.action == "vault.sweep")
                            .order_by(col(AuditEvent.occurred_at).desc()).limit(1)).first()
    reconnect = len(_reconnect_needed(session))
    return VaultStatus(
        active_kek=ring.active, key_source=ring.source, keks=keks,
        rotation_pending=sum(n for k, n in counts.items() if k != ring.active), by_state=dict(by_state),
        tenants_with_keys=sum(counts.values()), expiring=expiring[:limit], reconnect_needed=reconnect,
        last_sweep_at=sweep_ev.occurred_at if sweep_ev else None,
        last_sweep=json.loads(sweep_ev.details) if sweep_ev else {},
    )
