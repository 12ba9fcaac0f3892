"""The append-only, tamper-evident audit log.

Each event carries ``hmac = HMAC-SHA256(key, prev_hmac || canonical(content))`` where the key is
derived from the server secret (outside the database). Each chain (one per tenant, plus "global")
has a head row holding its sequence number and last HMAC; an append locks the head row (``FOR UPDATE``
on PostgreSQL; SQLite's write lock serialises writers), so concurrent writers cannot fork the chain.
``verify_chain`` detects an edited, inserted or deleted row — the newest included, because the head
must match the last row.
"""

from __future__ import annotations

import hashlib
import hmac as hmac_mod
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from core.clock import utcnow
from core.settings import get_settings
from core.tenants.access import Principal
from core.tenants.models import AuditEvent, AuditHead

_key_cache: dict[bytes, bytes] = {}


def audit_key(secret: bytes | None = None) -> bytes:
    secret = secret if secret is not None else get_settings().server_secret()
    key = _key_cache.get(secret)
    if key is None:
        key = hmac_mod.new(secret, b"crmbridge/audit-chain/v1", hashlib.sha256).digest()
        _key_cache[secret] = key
    return key


def chain_name(tenant_id: int | None) -> str:
    return f"t{tenant_id}" if tenant_id is not None else "global"


def _canonical(ev: AuditEvent) -> bytes:
    content = {
        "chain": ev.chain,
        "seq": ev.seq,
        "at": ev.occurred_at.isoformat(),
        "tenant": ev.tenant_id,
        "actor": ev.actor,
        "role": ev.actor_role,
        "action": ev.action,
        "target": ev.target,
        "details": ev.details,
        "via": ev.via,
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def compute_hmac(ev: AuditEvent, prev: str, key: bytes) -> str:
    return hmac_mod.new(key, prev.encode() + b"|" + _canonical(ev), hashlib.sha256).hexdigest()


def record_event(
    session: Session,
    *,
    principal: Principal | str,
    action: str,
    tenant_id: int | None = None,
    target: str = "",
    details: dict[str, Any] | None = None,
    via: str | None = None,
    at: datetime | None = None,
    key: bytes | None = None,
) -> AuditEvent:
    """Append one event in the caller's transaction (it commits or rolls back with the change).

    ``principal`` is the real actor: a Principal, or an actor label such as an app user's email when
    a worker pushes that user's change through an API user (``via="api-user"``). Never put a secret
    in ``details``.
    """
    actor = principal.email if isinstance(principal, Principal) else str(principal)
    role = principal.role if isinstance(principal, Principal) else "app_user"
    chain = chain_name(tenant_id)
    stmt = select(AuditHead).where(AuditHead.chain == chain)
    if session.get_bind().dialect.name == "postgresql":
        # Two writers may create a chain's head at once: insert-if-absent, then lock the one row.
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        session.execute(pg_insert(AuditHead).values(chain=chain, seq=0, last_hmac="")
                        .on_conflict_do_nothing(index_elements=["chain"]))
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    head = session.exec(stmt).first()
    if head is None:
        head = AuditHead(chain=chain, seq=0, last_hmac="")
        session.add(head)
        session.flush()
    ev = AuditEvent(
        chain=chain,
        seq=head.seq + 1,
        occurred_at=at or utcnow(),
        tenant_id=tenant_id,
        actor=actor[:254],
        actor_role=role,
        action=action,
        target=target[:300],
        details=json.dumps(details or {}, sort_keys=True, default=str),
        via=via,
        prev_hmac=head.last_hmac,
        hmac="",
    )
    ev.hmac = compute_hmac(ev, head.last_hmac, key or audit_key())
    head.seq = ev.seq
    head.last_hmac = ev.hmac
    session.add(ev)
    session.add(head)
    session.flush()
    return ev


@dataclass
class ChainProblem:
    chain: str
    event_id: int | None
    seq: int | None
    problem: str

    def __str__(self) -> str:
        where = f"event id {self.event_id} (seq {self.seq})" if self.event_id else f"seq {self.seq}"
        return f"chain {self.chain}: {where}: {self.problem}"


def verify_chain(session: Session, *, key: bytes | None = None) -> list[ChainProblem]:
    """Check every chain against its head. Returns the problems found (empty when intact)."""
    key = key or audit_key()
    problems: list[ChainProblem] = []
    heads = {h.chain: h for h in session.exec(select(AuditHead).execution_options(populate_existing=True))}
    chains = set(heads) | set(session.exec(select(AuditEvent.chain).distinct()))
    for chain in sorted(chains):
        prev = ""
        expected_seq = 1
        last_seq = 0
        rows = session.exec(
            select(AuditEvent).where(AuditEvent.chain == chain).order_by(col(AuditEvent.seq))
            .execution_options(populate_existing=True)
        )
        for ev in rows:
            if ev.seq != expected_seq:
                problems.append(
                    ChainProblem(chain, ev.id, ev.seq, f"expected seq {expected_seq}: rows deleted before it")
                )
            if ev.prev_hmac != prev:
                problems.append(ChainProblem(chain, ev.id, ev.seq, "does not link to its predecessor"))
            if not hmac_mod.compare_digest(compute_hmac(ev, ev.prev_hmac, key), ev.hmac):
                problems.append(ChainProblem(chain, ev.id, ev.seq, "content edited or row inserted (HMAC)"))
            prev = ev.hmac
            expected_seq = ev.seq + 1
            last_seq = ev.seq
        head = heads.get(chain)
        if head is None:
            problems.append(ChainProblem(chain, None, last_seq, "no head row: chain created outside the log"))
        elif head.seq != last_seq or head.last_hmac != prev:
            problems.append(
                ChainProblem(
                    chain,
                    None,
                    head.seq,
                    f"head says seq {head.seq} but the last row is seq {last_seq}: newest rows deleted"
                    if head.seq != last_seq
                    else "last row does not match the head (edited or replaced)",
                )
            )
    return problems
