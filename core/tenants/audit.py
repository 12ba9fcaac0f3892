"""The append-only, tamper-evident audit log.

Each event carries ``hmac = HMAC-SHA256(key, prev_hmac || canonical(content))`` where the key is
derived from the server secret (outside the database). Each chain (one per tenant, plus "global")
has a head row holding its sequence number and last HMAC; an append locks the head row (``FOR UPDATE``
on PostgreSQL; SQLite's write lock serialises writers), so concurrent writers cannot fork the chain.
``verify_chain`` detects an edited, inserted or deleted row — the newest included, because the head
must match the last row.

Shortening or erasing the log is detected too (issue 14):

- each head carries ``mac = HMAC(head key, chain | seq | last HMAC)``, so a head rewritten to match
  a truncated chain does not verify without the server secret;
- one global seal row (``audit_seal``) holds how many chains exist and a digest of their names,
  itself MACed, and changes only when a chain is created (once per tenant), so appends of
  different tenants never queue on it. Deleting a whole chain with its head, or wiping every head,
  no longer matches it. An append locks its chain's head only; ``advance_head`` is the one head
  update, taking the new (count, last HMAC), so a batch of appends updates it once;
- what the database alone cannot show — a database (or one head with its rows) put back to an
  earlier genuine copy — a checkpoint does: ``make_checkpoint`` prints one signed line (every
  chain's length and a digest of their heads) for the operator to keep elsewhere, and
  ``verify_checkpoint`` reports any chain cut back, deleted or rewritten behind it.
"""
from __future__ import annotations

import hashlib
import hmac as hmac_mod
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import func, insert
from sqlmodel import Session, col, select

from core.clock import utcnow
from core.db import DriverStatements
from core.errors import InvalidInput
from core.keys import AUDIT_CHAIN, AUDIT_HEAD, derive_key
from core.tenants.access import Principal
from core.tenants.models import AuditEvent, AuditHead, AuditSeal, Tenant


def audit_key(secret: bytes | None = None) -> bytes:
    """The key of every row's HMAC (derived from the server secret: ``core.keys.AUDIT_CHAIN``)."""
    return derive_key(AUDIT_CHAIN, secret)


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


def head_key(secret: bytes | None = None) -> bytes:
    """The key that seals chain heads, the global seal and checkpoints (derived from the server secret:
    ``core.keys.AUDIT_HEAD``)."""
    return derive_key(AUDIT_HEAD, secret)


ZERO_DIGEST = "0" * 64


def head_mac(key: bytes, chain: str, seq: int, last_hmac: str) -> str:
    """THE head update's MAC: a chain head (its chain — the tenant —, row count and last row's
    HMAC). A batch of appends computes it once, for its final (count, last HMAC)."""
    return hmac_mod.new(key, f"head|{chain}|{seq}|{last_hmac}".encode(), hashlib.sha256).hexdigest()


def chain_term(key: bytes, chain: str) -> str:
    """One chain's share of the global seal's digest (the XOR over every chain that exists)."""
    return hmac_mod.new(key, f"chain|{chain}".encode(), hashlib.sha256).hexdigest()


def seal_mac(key: bytes, chains: int, digest: str) -> str:
    return hmac_mod.new(key, f"seal|{chains}|{digest}".encode(), hashlib.sha256).hexdigest()


def _xor(a: str, b: str) -> str:
    return f"{int(a or ZERO_DIGEST, 16) ^ int(b or ZERO_DIGEST, 16):064x}"


def add_chain(key: bytes, chains: int, digest: str, chain: str) -> tuple[int, str, str]:
    """The global seal after ``chain`` is created: (chains, digest, mac)."""
    digest = _xor(digest, chain_term(key, chain))
    return chains + 1, digest, seal_mac(key, chains + 1, digest)


def _is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def lock_head(session: Session, chain: str) -> AuditHead:
    """Lock the chain's head in the caller's transaction. A chain's first append creates its head
    and adds the chain to the global seal (the seal is locked first, then, only for that rare
    moment — once per tenant; the appends that follow lock their head only, so writers of
    different tenants never queue behind one another).

    A log from before head MACs, not sealed yet (no seal row, heads without MAC), goes on as before,
    unsealed: ``verify_chain`` says so and ``seal_legacy`` seals it on the operator's word."""
    pg = _is_pg(session)
    stmt = select(AuditHead).where(AuditHead.chain == chain)
    if pg:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    head = session.exec(stmt).first()
    if head is not None:
        return head
    seal_q = select(AuditSeal).where(AuditSeal.id == 1).execution_options(populate_existing=True)
    if pg:
        seal_q = seal_q.with_for_update()
    seal = session.exec(seal_q).first()
    key = head_key()
    if seal is None and not session.exec(select(func.count()).select_from(AuditHead)
                                         .where(col(AuditHead.mac).is_(None), AuditHead.seq > 0)).one():
        values: dict[str, Any] = {"id": 1, "chains": 0, "digest": ZERO_DIGEST, "mac": seal_mac(key, 0, ZERO_DIGEST)}
        if pg:  # two first writers may start it at once
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            session.execute(pg_insert(AuditSeal).values(**values).on_conflict_do_nothing(index_elements=["id"]))
            seal = session.exec(seal_q).first()
        else:
            seal = AuditSeal(**values)
            session.add(seal)
    created = True
    if pg:
        # Two writers may create a chain's head at once: insert-if-absent, then lock the one row.
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        created = session.execute(pg_insert(AuditHead).values(chain=chain, seq=0, last_hmac="")
                                  .on_conflict_do_nothing(index_elements=["chain"])
                                  .returning(col(AuditHead.chain))).first() is not None
        head = session.exec(stmt).one()
    else:
        head = AuditHead(chain=chain, seq=0, last_hmac="")
        session.add(head)
    if created and seal is not None:
        seal.chains, seal.digest, seal.mac = add_chain(key, seal.chains, seal.digest, chain)
        head.mac = head_mac(key, chain, 0, "")
        session.add(seal)
        session.add(head)
    session.flush()
    return head


def advance_head(session: Session, head: AuditHead, count: int, last_hmac: str, *, key: bytes | None = None) -> None:
    """Move a head locked by ``lock_head`` to (``count``, ``last_hmac``) with its new MAC: once per
    append, or once for a whole batch of appends to the chain."""
    if head.mac is not None:  # else a head from before head MACs, in a log not sealed yet
        head.mac = head_mac(key or head_key(), head.chain, count, last_hmac)
    head.seq = count
    head.last_hmac = last_hmac
    session.add(head)


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
    head = lock_head(session, chain)
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
    advance_head(session, head, ev.seq, ev.hmac)
    session.add(ev)
    session.flush()
    return ev


_LEAN_HEAD_SQL = "SELECT seq, last_hmac, mac FROM audit_head WHERE chain = ?"
_LEAN_INSERT_SQL = (
    "INSERT INTO audit_event (chain, seq, occurred_at, tenant_id, actor, actor_role, action, target, details, via,"
    " prev_hmac, hmac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_LEAN_ADVANCE_SQL = "UPDATE audit_head SET seq = ?, last_hmac = ?, mac = ? WHERE chain = ?"


def record_event_lean(
    session: Session,
    *,
    principal: Principal | str,
    action: str,
    tenant_id: int | None,
    target: str = "",
    details: dict[str, Any] | None = None,
    via: str | None = None,
    at: datetime,
    driver: DriverStatements | None = None,
) -> None:
    """``record_event`` in three hand-written statements on the session's DB-API connection, in its
    transaction (head locked, row inserted, head advanced with its MAC), with no ORM object: the same row,
    HMAC and head MAC, for hot paths (the ACS's sign-in; SQLAlchemy's own work per statement cost more
    than the statement). A chain without a head yet goes through ``record_event`` (it joins the global
    seal). Use it only in a transaction that has not loaded this chain's head through the ORM (the ORM
    copy would be stale)."""
    chain = chain_name(tenant_id)
    db = driver or DriverStatements(session.connection())
    head = db.execute(_LEAN_HEAD_SQL + (" FOR UPDATE" if db.pg else ""), (chain,)).fetchone()
    if head is None:
        record_event(session, principal=principal, action=action, tenant_id=tenant_id, target=target,
                     details=details, via=via, at=at)
        return
    ev = SimpleNamespace(
        chain=chain, seq=head[0] + 1, occurred_at=at, tenant_id=tenant_id,
        actor=(principal.email if isinstance(principal, Principal) else str(principal))[:254],
        actor_role=principal.role if isinstance(principal, Principal) else "app_user", action=action,
        target=target[:300], details=json.dumps(details or {}, sort_keys=True, default=str), via=via,
    )
    mac = compute_hmac(cast(AuditEvent, ev), head[1], audit_key())
    db.execute(_LEAN_INSERT_SQL, (chain, ev.seq, db.time(at), tenant_id, ev.actor, ev.actor_role, action, ev.target,
                                  ev.details, via, head[1], mac))
    db.execute(_LEAN_ADVANCE_SQL, (ev.seq, mac, head_mac(head_key(), chain, ev.seq, mac) if head[2] is not None
                                   else None, chain))


@dataclass(frozen=True)
class NewEvent:
    """One event for ``record_events``: the same fields ``record_event`` takes."""

    principal: Principal | str
    action: str
    tenant_id: int | None = None
    target: str = ""
    details: dict[str, Any] | None = None
    via: str | None = None
    at: datetime | None = None


#: Rows per INSERT statement (12 columns each: well under SQLite's and PostgreSQL's parameter limits).
INSERT_ROWS = 500


def record_events(session: Session, events: Sequence[NewEvent], *, key: bytes | None = None) -> int:
    """Append many events in the caller's transaction: the rows ``record_event`` would write one by
    one, in the same order, with the same HMAC chain — computed in memory — in one multi-row INSERT
    per ``INSERT_ROWS`` rows, each chain's head locked once and advanced once (one head MAC for the
    batch's final count and HMAC). Chains are locked in name order, so two batches touching the
    same chains cannot deadlock. Returns the number of events written."""
    if not events:
        return 0
    key = key or audit_key()
    hkey = head_key()
    by_chain: dict[str, list[NewEvent]] = {}
    for ne in events:
        by_chain.setdefault(chain_name(ne.tenant_id), []).append(ne)
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for chain in sorted(by_chain):
        head = lock_head(session, chain)
        seq, prev = head.seq, head.last_hmac
        for ne in by_chain[chain]:
            p = ne.principal
            seq += 1
            ev = AuditEvent(
                chain=chain, seq=seq, occurred_at=ne.at or now, tenant_id=ne.tenant_id,
                actor=(p.email if isinstance(p, Principal) else str(p))[:254],
                actor_role=p.role if isinstance(p, Principal) else "app_user", action=ne.action,
                target=ne.target[:300], details=json.dumps(ne.details or {}, sort_keys=True, default=str),
                via=ne.via, prev_hmac=prev, hmac="",
            )
            ev.hmac = prev = compute_hmac(ev, ev.prev_hmac, key)
            rows.append({c: getattr(ev, c) for c in _EVENT_COLUMNS})
        advance_head(session, head, seq, prev, key=hkey)
    table = AuditEvent.__table__  # type: ignore[attr-defined]
    for start in range(0, len(rows), INSERT_ROWS):
        session.execute(insert(table).values(rows[start:start + INSERT_ROWS]))
    session.flush()
    return len(rows)


_EVENT_COLUMNS = ("chain", "seq", "occurred_at", "tenant_id", "actor", "actor_role", "action", "target", "details",
                  "via", "prev_hmac", "hmac")


@dataclass
class ChainProblem:
    chain: str
    event_id: int | None
    seq: int | None
    problem: str
    legacy: bool = False  # only "not sealed yet" (a log from before head MACs), not tampering

    def __str__(self) -> str:
        if self.chain == "*":
            return self.problem
        where = f"event id {self.event_id} (seq {self.seq})" if self.event_id else f"seq {self.seq}"
        return f"chain {self.chain}: {where}: {self.problem}"


@dataclass(frozen=True)
class HeadsState:
    """Every chain head as it stands, for a checkpoint: lengths, and the XOR of their MACs."""

    events: int
    digest: str
    heads: dict[str, tuple[int, str]]


def _heads(session: Session) -> dict[str, AuditHead]:
    return {h.chain: h for h in session.exec(select(AuditHead).execution_options(populate_existing=True))}


def current_state(heads: dict[str, AuditHead], key: bytes) -> HeadsState:
    digest = ZERO_DIGEST
    for h in heads.values():
        if h.seq > 0:
            digest = _xor(digest, head_mac(key, h.chain, h.seq, h.last_hmac))
    return HeadsState(sum(h.seq for h in heads.values()), digest,
                      {h.chain: (h.seq, h.last_hmac) for h in heads.values()})


def verify_chain(session: Session, *, key: bytes | None = None, hkey: bytes | None = None) -> list[ChainProblem]:
    """Check every chain against its head, every head against its MAC, and all heads against the
    global seal. Returns the problems found (empty when intact)."""
    key = key or audit_key()
    hkey = hkey or head_key()
    problems: list[ChainProblem] = []
    heads = _heads(session)
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
            continue
        if head.seq != last_seq or head.last_hmac != prev:
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
        if head.mac is not None and not hmac_mod.compare_digest(head.mac, head_mac(hkey, chain, head.seq,
                                                                                    head.last_hmac)):
            problems.append(ChainProblem(
                chain, None, head.seq, "head row rewritten without the server secret (its MAC does not match): "
                "the newest rows were deleted or replaced and the head made to match"))
    problems.extend(_check_seal(session, heads, hkey))
    return problems


def _check_seal(session: Session, heads: dict[str, AuditHead], hkey: bytes) -> list[ChainProblem]:
    seal = session.exec(select(AuditSeal).where(AuditSeal.id == 1).execution_options(populate_existing=True)).first()
    unsealed = sorted(c for c, h in heads.items() if h.mac is None and h.seq > 0)
    if seal is None:
        if any(h.mac is not None for h in heads.values()):
            return [ChainProblem("*", None, None, "the global audit seal row is gone while the chain heads are "
                                 "sealed: it was deleted (the audit log was wiped or rolled back)")]
        if unsealed:
            return [ChainProblem("*", None, None, f"{len(unsealed)} chain head(s) were written before head MACs "
                                 "existed and are not sealed yet: check that the rest of this report is clean, "
                                 "then run `crmbridge audit verify --seal-legacy` once", legacy=True)]
        tenants = session.exec(select(func.count()).select_from(Tenant)).one()
        if tenants:
            return [ChainProblem("*", None, None, f"the audit log is empty (no rows, heads or seal) but the "
                                 f"database holds {tenants} tenant(s): the audit log was wiped")]
        return []
    out: list[ChainProblem] = []
    if not hmac_mod.compare_digest(seal.mac, seal_mac(hkey, seal.chains, seal.digest)):
        out.append(ChainProblem("*", None, None, "the global audit seal was rewritten without the server secret "
                                "(its MAC does not match)"))
    for chain in unsealed:
        out.append(ChainProblem(chain, None, heads[chain].seq, "head row has no MAC in a sealed log: "
                                "it was replaced"))
    digest = ZERO_DIGEST
    for chain in heads:
        digest = _xor(digest, chain_term(hkey, chain))
    if len(heads) < seal.chains:
        out.append(ChainProblem("*", None, None, f"{seal.chains - len(heads)} whole chain(s) are missing: the "
                                f"global seal records {seal.chains} chains, {len(heads)} remain (a tenant's "
                                "audit rows were deleted with their head)"))
    elif len(heads) > seal.chains:
        out.append(ChainProblem("*", None, None, f"{len(heads) - seal.chains} chain head(s) were added outside "
                                "the log (the global seal does not know them)"))
    elif digest != seal.digest:
        out.append(ChainProblem("*", None, None, "the set of chains does not match the global seal: a chain was "
                                "deleted and another head put in its place"))
    return out


def seal_legacy(session: Session, *, hkey: bytes | None = None) -> int:
    """Seal a log written before head MACs (as it stands: run after ``verify_chain`` reports it clean
    apart from that). Returns the number of heads sealed. Refuses when a seal already exists."""
    hkey = hkey or head_key()
    if session.get(AuditSeal, 1) is not None:
        raise InvalidInput("The audit log is already sealed: nothing to do.")
    heads = _heads(session)
    digest = ZERO_DIGEST
    for h in heads.values():
        h.mac = head_mac(hkey, h.chain, h.seq, h.last_hmac)
        digest = _xor(digest, chain_term(hkey, h.chain))
        session.add(h)
    session.add(AuditSeal(id=1, chains=len(heads), digest=digest, mac=seal_mac(hkey, len(heads), digest)))
    session.flush()
    return len(heads)


# --- checkpoints -----------------------------------------------------------------------------------
# A checkpoint is one signed line an operator keeps outside the database. It names every chain's
# length at that moment and a digest over their heads, so a later verify can tell whether any chain
# was cut back (or deleted, or rewritten) behind it — even when the whole database, seal included,
# was restored to an earlier copy.

CHECKPOINT_PREFIX = "crmbridge-audit-checkpoint/v1"


def _checkpoint_sig(hkey: bytes, at: str, events: int, heads: str, digest: str) -> str:
    msg = f"{CHECKPOINT_PREFIX}|{at}|{events}|{heads}|{digest}".encode()
    return hmac_mod.new(hkey, b"checkpoint|" + msg, hashlib.sha256).hexdigest()


def make_checkpoint(session: Session, *, now: datetime | None = None, hkey: bytes | None = None) -> str:
    """The signed line for the log as it stands (call ``verify_chain`` first)."""
    hkey = hkey or head_key()
    state = current_state(_heads(session), hkey)
    at = (now or utcnow()).strftime("%Y-%m-%dT%H:%M:%SZ")
    heads = ",".join(f"{c}:{seq}" for c, (seq, _h) in sorted(state.heads.items()) if seq > 0) or "-"
    sig = _checkpoint_sig(hkey, at, state.events, heads, state.digest)
    return f"{CHECKPOINT_PREFIX} at={at} events={state.events} heads={heads} digest={state.digest} sig={sig}"


def read_checkpoint(text: str) -> str:
    """The checkpoint line in ``text`` (a line, or a file's content: its last checkpoint line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(CHECKPOINT_PREFIX)]
    if not lines:
        raise InvalidInput(f"No audit checkpoint found: give the line `crmbridge audit checkpoint` printed "
                           f"(it starts with {CHECKPOINT_PREFIX}) or a file holding it.")
    return lines[-1]


def verify_checkpoint(session: Session, line: str, *, hkey: bytes | None = None) -> list[ChainProblem]:
    """Report any chain cut back, deleted or rewritten behind a checkpoint line."""
    hkey = hkey or head_key()
    fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
    try:
        at, events, heads, digest, sig = (fields["at"], int(fields["events"]), fields["heads"], fields["digest"],
                                          fields["sig"])
        recorded = {} if heads == "-" else {c: int(n) for c, n in (h.rsplit(":", 1) for h in heads.split(","))}
    except (KeyError, ValueError):
        raise InvalidInput("The audit checkpoint is malformed: give the whole line `crmbridge audit checkpoint` "
                           "printed, unchanged.") from None
    if not hmac_mod.compare_digest(sig, _checkpoint_sig(hkey, at, events, heads, digest)):
        return [ChainProblem("*", None, None, "the checkpoint's signature does not verify: it was edited, or made "
                             "with another server secret")]
    problems: list[ChainProblem] = []
    acc = ZERO_DIGEST
    for chain, seq in sorted(recorded.items()):
        row = session.exec(select(AuditEvent.hmac).where(AuditEvent.chain == chain, AuditEvent.seq == seq)).first()
        last = session.exec(select(func.max(AuditEvent.seq)).where(AuditEvent.chain == chain)).one()
        if last is None:
            problems.append(ChainProblem(chain, None, seq, f"the whole chain is gone: the checkpoint of {at} "
                                         f"recorded {seq} event(s)"))
            continue
        if row is None:
            problems.append(ChainProblem(chain, None, seq, f"rolled back behind the checkpoint of {at}: it recorded "
                                         f"seq {seq}, the chain now ends at seq {last}"))
            continue
        acc = _xor(acc, head_mac(hkey, chain, seq, row))
    if not problems and acc != digest:
        problems.append(ChainProblem("*", None, None, f"the rows up to the checkpoint of {at} were rewritten "
                                     "(they no longer match its digest)"))
    return problems
