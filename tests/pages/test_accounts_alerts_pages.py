"""AppTests: the Console accounts and Alerts pages for each role (staff, tenant admin, leadership)."""

from __future__ import annotations

from sqlmodel import Session, select

from core.alerts import engine
from core.alerts.rules import Observation
from core.clock import utcnow
from core.demo import load_scenario, read_scenario
from core.tenants.access import Principal
from core.tenants.models import ConsoleAccount
from tests.conftest import page_text, run_page, unescape_md


def _demo(engine_) -> tuple[dict[str, int], dict[str, int]]:  # type: ignore[no-untyped-def]
    with Session(engine_) as s:
        slugs = load_scenario(s, read_scenario())
        s.commit()
        ids = {a.email: a.id for a in s.exec(select(ConsoleAccount))}
    return slugs, ids  # type: ignore[return-value]


def _smtp_to(sink, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from core.settings import get_settings

    monkeypatch.setenv("CRMBRIDGE_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("CRMBRIDGE_SMTP_PORT", str(sink.port))
    get_settings.cache_clear()


def _staff(ids: dict[str, int]) -> Principal:
    return Principal(role="staff", email="cs@crmbridge.example", account_id=ids["cs@crmbridge.example"])


def _admin(ids: dict[str, int], slugs: dict[str, int]) -> Principal:
    return Principal(role="tenant_admin", email="admin@bigcorp.example", account_id=ids["admin@bigcorp.example"],
                     tenant_id=slugs["bigcorp"])


LEAD = Principal(role="leadership", email="vp.sales@crmbridge.example", account_id=2)


def _button(at, label: str):  # type: ignore[no-untyped-def]
    return next(b for b in at.button if b.label == label)


# --- Console accounts ------------------------------------------------------------------------------


def test_accounts_page_staff_sees_every_account_and_invites(app_db, smtp_sink, monkeypatch):
    slugs, ids = _demo(app_db)
    _smtp_to(smtp_sink, monkeypatch)
    at = run_page("accounts.py", _staff(ids))
    assert not at.exception
    text = page_text(at)
    for email in ("cs@crmbridge.example", "vp.sales@crmbridge.example", "admin@bigcorp.example",
                  "admin@tinyco.example", "admin@dynco.example"):
        assert email in text
    assert "required — not set up" in text and "it is required for staff" in text
    at.text_input(key="invite_email").input("new.admin@bigcorp.example")
    at.selectbox(key="invite_role").select("tenant_admin")
    at.selectbox(key="invite_tenant").select(slugs["bigcorp"])
    _button(at, "Send invitation").click().run()
    assert any("Invitation emailed to new.admin@bigcorp.example" in unescape_md(s.value) for s in at.success)
    link = smtp_sink.link_to("new.admin@bigcorp.example", "/auth/invite/")
    assert link not in page_text(at)  # the link went by email, not onto the page
    assert "new.admin@bigcorp.example" in page_text(at)  # pending invitations


def test_accounts_page_staff_disables_an_account(app_db):
    _slugs, ids = _demo(app_db)
    at = run_page("accounts.py", _staff(ids))
    at.selectbox(key="accounts_pick").select(ids["admin@tinyco.example"]).run()
    _button(at, "Disable").click().run()
    assert any("admin@tinyco.example is disabled: every session ended" in unescape_md(s.value) for s in at.success)
    with Session(app_db) as s:
        assert s.get(ConsoleAccount, ids["admin@tinyco.example"]).disabled  # type: ignore[union-attr]


def test_accounts_page_tenant_admin_sees_only_their_tenant(app_db, smtp_sink, monkeypatch):
    slugs, ids = _demo(app_db)
    _smtp_to(smtp_sink, monkeypatch)
    at = run_page("accounts.py", _admin(ids, slugs))
    assert not at.exception
    text = page_text(at)
    assert "admin@bigcorp.example" in text
    assert "admin@tinyco.example" not in text and "cs@crmbridge.example" not in text
    assert "Two-factor authentication is off for your account." in text
    assert not [s for s in at.selectbox if s.key == "invite_role"]  # admins invite admins only
    at.text_input(key="invite_email").input("second@bigcorp.example")
    _button(at, "Send invitation").click().run()
    assert any("Invitation emailed to second@bigcorp.example" in unescape_md(s.value) for s in at.success)
    assert _button(at, "Disable").disabled  # not your own account


def test_accounts_page_shows_the_link_once_when_email_fails(app_db, monkeypatch):
    from core.settings import get_settings

    slugs, ids = _demo(app_db)
    monkeypatch.setenv("CRMBRIDGE_SMTP_PORT", "1")  # nothing listens there
    get_settings.cache_clear()
    at = run_page("accounts.py", _admin(ids, slugs))
    at.text_input(key="invite_email").input("third@bigcorp.example")
    _button(at, "Send invitation").click().run()
    assert any("could not be sent" in unescape_md(w.value) for w in at.warning)
    assert "/auth/invite/" in at.code[0].value
    at.run()
    assert not at.code  # shown only once


def test_accounts_page_refuses_leadership(app_db):
    _demo(app_db)
    at = run_page("accounts.py", LEAD)
    assert at.error and "staff and tenant admins" in unescape_md(at.error[-1].value)


# --- Alerts ----------------------------------------------------------------------------------------


def test_alerts_page_tenant_admin_adds_recipients_and_test_sends(app_db, smtp_sink, monkeypatch):
    slugs, ids = _demo(app_db)
    _smtp_to(smtp_sink, monkeypatch)
    at = run_page("alerts.py", _admin(ids, slugs))
    assert not at.exception
    text = page_text(at)
    assert "Credentials destroyed in bulk" in text and "IdP certificate expiring" in text
    at.text_area(key="email_recipients").input("it@bigcorp.example, ops@bigcorp.example")
    _button(at, "Add email channel").click().run()
    assert any("Added Admins" in unescape_md(s.value) for s in at.success)
    _button(at, "Send a test").click().run()
    assert any("Test delivered to Admins" in unescape_md(s.value) for s in at.success)
    rcpts, msg = smtp_sink.messages[-1]
    assert sorted(rcpts) == ["it@bigcorp.example", "ops@bigcorp.example"] and "TEST" in msg["Subject"]
    at.run()
    assert "sent" in page_text(at)  # the delivery log


def test_alerts_page_shows_a_failing_channel(app_db, monkeypatch):
    from core.settings import get_settings

    slugs, ids = _demo(app_db)
    monkeypatch.setenv("CRMBRIDGE_SMTP_PORT", "1")
    get_settings.cache_clear()
    at = run_page("alerts.py", _admin(ids, slugs))
    at.text_area(key="email_recipients").input("it@bigcorp.example")
    _button(at, "Add email channel").click().run()
    _button(at, "Send a test").click().run()
    assert any("retried with backoff" in unescape_md(w.value) for w in at.warning)
    at.run()
    text = page_text(at)
    assert "retrying" in text and "failing" in text
    assert any("1 delivery(ies) failing" in unescape_md(e.value) for e in at.error)


def test_alerts_page_staff_sees_every_tenant_and_the_digest(app_db):
    slugs, ids = _demo(app_db)
    with Session(app_db) as s:
        for slug in ("bigcorp", "tinyco"):
            engine.evaluate(s, observations=[Observation("sync_failing", slugs[slug], "sync_job:1", True,
                                                         title=f"Sync failing in {slug}")], now=utcnow())
        s.commit()
    at = run_page("alerts.py", _staff(ids), tenant_id=slugs["bigcorp"])
    assert not at.exception
    text = page_text(at)
    assert "Sync failing in bigcorp" in text and "Across every tenant: 2 firing." in text
    assert "Sync failing in tinyco" in text
    at.text_area(key="staff_recipients").input("cs@crmbridge.example")
    _button(at, "Add digest recipients").click().run()
    assert any("Added Customer success" in unescape_md(s.value) for s in at.success)


def test_alerts_page_admin_sees_only_their_tenant(app_db):
    slugs, ids = _demo(app_db)
    with Session(app_db) as s:
        engine.evaluate(s, observations=[Observation("sync_failing", slugs["tinyco"], "sync_job:1", True,
                                                     title="Sync failing in tinyco")], now=utcnow())
        s.commit()
    at = run_page("alerts.py", _admin(ids, slugs), tenant_id=slugs["tinyco"])
    text = page_text(at)
    assert "Sync failing in tinyco" not in text and "Nothing is firing for this tenant." in text
    assert "Staff digest" not in [t.label for t in at.tabs]


def test_alerts_page_refuses_leadership(app_db):
    _demo(app_db)
    at = run_page("alerts.py", LEAD)
    assert at.error and "staff and tenant admins" in unescape_md(at.error[0].value)
