"""Issue 14, Medium 2: the audit log cannot be shortened or erased undetected.

Each test performs the attack with plain SQL — what someone with write access to the database but
without the server secret can do — and shows `verify_chain` / `crmbridge audit verify` report it.
Before head MACs and the global seal, every one of these verified as intact.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlmodel import Session

from core.cli import main
from core.tenants.access import Principal
from core.tenants.audit import record_event, verify_chain
from core.tenants.models import AuditEvent


def _seed(session: Session, tenant_id: int | None, n: int) -> list[AuditEvent]:
    evs = [record_event(session, principal="ops@x", action="thing.change", tenant_id=tenant_id, target=f"t{i}")
           for i in range(n)]
    session.commit()
    return evs


def _sql(session: Session, stmt: str, **params: object) -> None:
    session.exec(text(stmt).bindparams(**params))  # type: ignore[call-overload]
    session.commit()


def test_truncating_newest_rows_and_rewriting_the_head_is_detected(session, tenant, other_tenant):
    evs = _seed(session, tenant.id, 5)
    _seed(session, other_tenant.id, 2)
    keep = evs[2]
    # Delete the two newest rows and make the head match the new last row (no secret needed for that).
    _sql(session, "DELETE FROM audit_event WHERE chain = :c AND seq > 3", c=keep.chain)
    _sql(session, "UPDATE audit_head SET seq = 3, last_hmac = :h WHERE chain = :c", h=keep.hmac, c=keep.chain)
    problems = verify_chain(session)
    assert any(p.chain == keep.chain and "head row rewritten" in p.problem for p in problems), problems


def test_truncating_and_restoring_an_older_genuine_head_is_caught_by_a_checkpoint(session, tenant):
    """The attacker kept a copy of the head (MAC included) from when the chain had 3 rows: that head
    is genuine, so the database alone cannot tell; the checkpoint taken since can."""
    from core.tenants.audit import make_checkpoint, verify_checkpoint

    evs = _seed(session, tenant.id, 3)
    old = session.exec(text("SELECT seq, last_hmac, mac FROM audit_head WHERE chain = :c")  # type: ignore[call-overload]
                       .bindparams(c=evs[0].chain)).one()
    _seed(session, tenant.id, 2)
    line = make_checkpoint(session)
    _sql(session, "DELETE FROM audit_event WHERE chain = :c AND seq > 3", c=evs[0].chain)
    _sql(session, "UPDATE audit_head SET seq = :s, last_hmac = :h, mac = :m WHERE chain = :c",
         s=old[0], h=old[1], m=old[2], c=evs[0].chain)
    problems = verify_checkpoint(session, line)
    assert [str(p) for p in problems] == [
        f"chain {evs[0].chain}: seq 5: rolled back behind the checkpoint of {line.split()[1][3:]}: it recorded "
        "seq 5, the chain now ends at seq 3"]


def test_deleting_a_tenants_whole_chain_with_its_head_is_detected(session, tenant, other_tenant):
    _seed(session, tenant.id, 3)
    evs = _seed(session, other_tenant.id, 4)
    assert verify_chain(session) == []
    _sql(session, "DELETE FROM audit_event WHERE chain = :c", c=evs[0].chain)
    _sql(session, "DELETE FROM audit_head WHERE chain = :c", c=evs[0].chain)
    problems = verify_chain(session)
    assert any("1 whole chain(s) are missing" in p.problem for p in problems), problems


def test_wiping_every_row_and_head_is_detected(session, tenant, other_tenant):
    _seed(session, tenant.id, 3)
    _seed(session, other_tenant.id, 2)
    _seed(session, None, 2)
    _sql(session, "DELETE FROM audit_event")
    _sql(session, "DELETE FROM audit_head")
    problems = verify_chain(session)
    assert any("3 whole chain(s) are missing" in p.problem for p in problems), problems
    # ... and the seal row with them: the tenants remain as witnesses.
    _sql(session, "DELETE FROM audit_seal")
    problems = verify_chain(session)
    assert any("audit log was wiped" in p.problem for p in problems), problems


def test_a_rewritten_seal_is_detected(session, tenant):
    _seed(session, tenant.id, 3)
    _sql(session, "UPDATE audit_seal SET chains = chains + 1")
    assert any("global audit seal was rewritten" in p.problem for p in verify_chain(session))


def test_appends_from_many_writers_keep_the_seal_valid(session, tenant, other_tenant):
    for i in range(6):
        record_event(session, principal=Principal.system("t"), action="x", tenant_id=(tenant.id, other_tenant.id,
                                                                                         None)[i % 3])
    session.commit()
    assert verify_chain(session) == []


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_reports_each_attack(app_db, capsys):
    from core.db import session_scope
    from tests.conftest import make_tenant

    with session_scope() as s:
        a, b = make_tenant(s, "acme"), make_tenant(s, "globex")
        for i in range(4):
            record_event(s, principal="ops@x", action="a", tenant_id=a.id, target=str(i))
            record_event(s, principal="ops@x", action="a", tenant_id=b.id, target=str(i))
    assert _cli(capsys, "audit", "verify") == (0, "audit log intact\n")
    with app_db.begin() as conn:
        conn.execute(text("DELETE FROM audit_event WHERE chain = :c"), {"c": f"t{b.id}"})
        conn.execute(text("DELETE FROM audit_head WHERE chain = :c"), {"c": f"t{b.id}"})
    code, out = _cli(capsys, "audit", "verify")
    assert code == 1 and "TAMPERED 1 whole chain(s) are missing" in out


def test_checkpoint_reports_a_rollback_of_the_whole_log(app_db, capsys, tmp_path):
    """Copy every audit row, head and the seal; write more; restore the copy. The restored log is a
    genuine earlier state, so it verifies on its own — the checkpoint taken in between catches it."""
    from core.db import session_scope
    from tests.conftest import make_tenant

    with session_scope() as s:
        t = make_tenant(s, "acme")
        for i in range(3):
            record_event(s, principal="ops@x", action="a", tenant_id=t.id, target=str(i))
    with app_db.connect() as conn:
        saved = {tbl: [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {tbl}"))]
                 for tbl in ("audit_event", "audit_head", "audit_seal")}
    with session_scope() as s:
        record_event(s, principal="ops@x", action="evidence", tenant_id=t.id, target="x")
    code, line = _cli(capsys, "audit", "checkpoint")
    assert code == 0 and line.startswith("crmbridge-audit-checkpoint/v1 ")
    line = line.strip()
    assert _cli(capsys, "audit", "verify", "--checkpoint", line) == (
        0, "audit log intact (and not rolled back behind the checkpoint)\n")
    with app_db.begin() as conn:  # roll the audit tables back to the copy
        for tbl, rows in saved.items():
            conn.execute(text(f"DELETE FROM {tbl}"))
            for r in rows:
                cols = ", ".join(r)
                conn.execute(text(f"INSERT INTO {tbl} ({cols}) VALUES ({', '.join(':' + c for c in r)})"), r)
    assert _cli(capsys, "audit", "verify")[0] == 0  # consistent on its own...
    kept = tmp_path / "checkpoints.txt"
    kept.write_text(f"# kept off-site\n{line}\n")
    code, out = _cli(capsys, "audit", "verify", "--checkpoint", str(kept))
    assert code == 1
    assert f"chain t{t.id}: seq 4: rolled back behind the checkpoint" in out and "ends at seq 3" in out
    # the whole log wiped: every chain of the checkpoint is gone
    with app_db.begin() as conn:
        for tbl in ("audit_event", "audit_head", "audit_seal"):
            conn.execute(text(f"DELETE FROM {tbl}"))
    code, out = _cli(capsys, "audit", "verify", "--checkpoint", line)
    assert code == 1 and "the whole chain is gone" in out and "audit log was wiped" in out


def test_a_forged_checkpoint_is_refused(app_db, capsys):
    from core.db import session_scope

    with session_scope() as s:
        record_event(s, principal="ops@x", action="a", target="x")
    _code, line = _cli(capsys, "audit", "checkpoint")
    forged = line.strip().replace("heads=global:1", "heads=global:0")
    code, out = _cli(capsys, "audit", "verify", "--checkpoint", forged)
    assert code == 1 and "signature does not verify" in out
    code, out = _cli(capsys, "audit", "verify", "--checkpoint", "no such thing")
    assert code == 1 and "No audit checkpoint found" in out


def test_a_log_from_before_head_macs_is_reported_then_sealed_on_request(app_db, capsys):
    from core.db import session_scope

    with session_scope() as s:
        for i in range(3):
            record_event(s, principal="ops@x", action="a", target=str(i), at=datetime(2026, 1, 1, tzinfo=UTC))
    with app_db.begin() as conn:  # what the migration leaves when it has no secret
        conn.execute(text("UPDATE audit_head SET mac = NULL"))
        conn.execute(text("DELETE FROM audit_seal"))
    code, out = _cli(capsys, "audit", "verify")
    assert code == 1 and "UNSEALED" in out and "--seal-legacy" in out
    with session_scope() as s:  # appends go on, and do not seal it behind the operator's back
        record_event(s, principal="ops@x", action="a", target="more")
    assert _cli(capsys, "audit", "verify")[0] == 1
    code, out = _cli(capsys, "audit", "verify", "--seal-legacy")
    assert code == 0 and "sealed 1 chain head(s)" in out
    assert _cli(capsys, "audit", "verify") == (0, "audit log intact\n")
