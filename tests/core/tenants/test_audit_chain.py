"""The audit chain: editing, inserting or deleting any row — the newest included — is detected and named,
both by verify_chain and by `crmbridge audit verify`."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
from sqlmodel import Session

from core.cli import main
from core.tenants.audit import record_event, verify_chain
from core.tenants.models import AuditEvent


def _seed(session: Session, tenant_id: int, n: int = 5) -> list[AuditEvent]:
    evs = [record_event(session, principal="ops@x", action="thing.change", tenant_id=tenant_id, target=f"t{i}",
                        details={"i": i}) for i in range(n)]
    session.commit()
    return evs


def test_intact_chain_verifies(session, tenant):
    _seed(session, tenant.id)
    assert verify_chain(session) == []


@pytest.mark.parametrize("which", [0, 2, -1])
def test_edit_is_detected_and_named(session, tenant, which):
    evs = _seed(session, tenant.id)
    target = evs[which]
    session.exec(text("UPDATE audit_event SET actor='someone-else' WHERE id=:i").bindparams(i=target.id))
    session.commit()
    problems = verify_chain(session)
    assert problems and any(p.event_id == target.id for p in problems)


@pytest.mark.parametrize("which", [0, 2, -1])
def test_delete_is_detected_including_the_newest(session, tenant, which):
    evs = _seed(session, tenant.id)
    session.exec(text("DELETE FROM audit_event WHERE id=:i").bindparams(i=evs[which].id))
    session.commit()
    problems = verify_chain(session)
    assert problems, "deleting a row must break the chain"
    if which == -1:
        assert any("newest rows deleted" in p.problem for p in problems)


def test_insert_is_detected(session, tenant):
    evs = _seed(session, tenant.id, 3)
    forged = AuditEvent(chain=evs[1].chain, seq=99, occurred_at=evs[1].occurred_at, tenant_id=tenant.id,
                        actor="mallory", action="cover.up", prev_hmac=evs[2].hmac, hmac="0" * 64)
    session.add(forged)
    session.commit()
    problems = verify_chain(session)
    assert any(p.event_id == forged.id for p in problems)


def test_cli_verify_exits_nonzero_and_names_row(app_db, capsys):
    from core.db import session_scope

    with session_scope() as s:
        evs = [record_event(s, principal="ops@x", action="a", tenant_id=None, target=str(i)) for i in range(3)]
        victim = evs[1].id
    assert main(["audit", "verify"]) == 0
    with app_db.begin() as conn:
        conn.execute(text("UPDATE audit_event SET target='x' WHERE id=:i"), {"i": victim})
    assert main(["audit", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"event id {victim}" in out


def test_concurrent_writers_do_not_fork_the_chain(file_engine, tenant_factory=None):
    """Several threads append to one tenant's chain at once; the chain stays linear."""
    from core.tenants.models import Tenant

    with Session(file_engine) as s:
        t = Tenant(name="Conc", slug="conc")
        s.add(t)
        s.commit()
        tid = t.id
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(10):
                with Session(file_engine) as s:
                    record_event(s, principal=f"w{k}", action="x", tenant_id=tid, target=str(i))
                    s.commit()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    with Session(file_engine) as s:
        assert verify_chain(s) == []
        assert s.query(AuditEvent).filter(AuditEvent.tenant_id == tid).count() == 40
