"""A push writes its audit events a batch at a time (one INSERT per CRM write batch, the head
advanced once); the chain still verifies with `crmbridge audit verify`, and a row tampered inside a
batch is named."""

from __future__ import annotations

import json

from sqlalchemy import event, text
from sqlmodel import col, select

from core.cli import main
from core.sync.models import OutboxStatus, SyncOutbox
from core.sync.outbox import record_change
from core.tenants.access import Principal
from core.tenants.audit import verify_chain
from core.tenants.models import AuditEvent, AuditHead
from tests.core.sync.test_engine import run, schedule
from tests.fixtures.sync import make_sync_world

SYSTEM = Principal.system("test")


def test_a_batched_push_verifies_and_a_tampered_row_in_a_batch_is_named(app_db, clock, capsys) -> None:  # type: ignore[no-untyped-def]
    w = make_sync_world(app_db, clock)
    schedule(w)
    with w.session() as s:
        for i in range(450):
            record_change(session=s, principal=SYSTEM, crm_account_id=w.account.id,  # type: ignore[arg-type]
                          actor_app_user_id=w.users[i % 2].id, fields={"name": f"Deal {i}", "stage": "Prospecting"},  # type: ignore[arg-type]
                          now=w.clock())
        s.commit()
    inserts: list[int] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("INSERT INTO AUDIT_EVENT"):
            inserts.append(1)

    event.listen(app_db, "before_cursor_execute", count)
    try:
        [r] = run(w)
    finally:
        event.remove(app_db, "before_cursor_execute", count)
    assert r.stats.records_out == 450 and [p.batches for p in w.providers] == [[200, 200, 50]]
    assert len(inserts) == 3  # one audit INSERT per CRM write batch, not one per record

    with w.session() as s:
        assert all(o.status == OutboxStatus.applied for o in s.exec(select(SyncOutbox)))
        evs = list(s.exec(select(AuditEvent).where(AuditEvent.action == "opportunity.create")
                          .order_by(col(AuditEvent.seq))))
        assert len(evs) == 450
        # the real actor on every row, in outbox order, and a chain without gaps
        assert [e.actor for e in evs[:4]] == ["user1@acme.example", "user2@acme.example"] * 2
        assert all(e.via == "api-user" for e in evs)
        assert [json.loads(e.details)["fields"]["name"] for e in evs[:2]] == ["Deal 0", "Deal 1"]
        seqs = [e.seq for e in evs]
        assert seqs == list(range(seqs[0], seqs[0] + 450))
        head = s.get(AuditHead, evs[-1].chain)
        assert head is not None and head.seq == evs[-1].seq and head.last_hmac == evs[-1].hmac
        assert verify_chain(s) == []
        victim = evs[300].id  # inside the second batch
    assert main(["audit", "verify"]) == 0
    assert "audit log intact" in capsys.readouterr().out

    with app_db.begin() as conn:
        conn.execute(text("UPDATE audit_event SET actor = 'someone-else' WHERE id = :i"), {"i": victim})
    assert main(["audit", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"event id {victim} " in out and "TAMPERED" in out
