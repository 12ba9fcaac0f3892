"""Issue 14 (low): wrong passwords from one address pause only that address, and the account holder
is told by email (the existing SMTP path) and can see the audit event; the holder still signs in."""

from __future__ import annotations

from sqlmodel import Session, select

from core.tenants import auth
from core.tenants.access import Principal
from core.tenants.models import AuditEvent

PW = "correct horse battery"


def _post(web, email: str, password: str):  # type: ignore[no-untyped-def]
    page = web.get("/auth/login")
    csrf = page.text.split('name=csrf value="', 1)[1].split('"', 1)[0]
    return web.post("/auth/login", data={"email": email, "password": password, "csrf": csrf},
                    follow_redirects=False)


def test_staff_lockout_by_a_stranger_is_emailed_and_does_not_stop_the_holder(web, app_db, smtp_sink):
    with Session(app_db) as s:
        auth.create_console_account(s, principal=Principal.system(), email="cs@crmbridge.example", role="staff",
                                    password=PW)
        s.commit()
    for _ in range(auth.MAX_FAILURES):  # the test client's address: "testclient"
        assert _post(web, "cs@crmbridge.example", "guessing-wrong-1").status_code == 401
    refused = _post(web, "cs@crmbridge.example", PW)  # this address is paused, right password or not
    assert refused.status_code == 401

    bodies = smtp_sink.bodies_to("cs@crmbridge.example")
    assert len(bodies) == 1 and "testclient" in bodies[0] and "paused" in bodies[0]
    with Session(app_db) as s:
        event = s.exec(select(AuditEvent).where(AuditEvent.action == "account.locked")).one()
        assert "testclient" in event.details

    with Session(app_db) as s:  # the holder, from their own address
        assert auth.authenticate(s, email="cs@crmbridge.example", password=PW, address="198.51.100.7")
