"""AppTests: the foundation pages for each role that may see them."""

from __future__ import annotations

from sqlmodel import Session

from core.demo import load_scenario, read_scenario
from core.tenants.access import Principal
from tests.conftest import page_text, run_page, unescape_md


def _demo(engine) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        slugs = load_scenario(s, read_scenario())
        s.commit()
    return slugs


_texts = page_text


STAFF = Principal(role="staff", email="cs@crmbridge.example", account_id=1)
LEAD = Principal(role="leadership", email="vp.sales@crmbridge.example", account_id=2)


def test_tenants_page_staff_sees_all_and_can_create(app_db):
    _demo(app_db)
    at = run_page("tenants.py", STAFF)
    assert not at.exception
    text = _texts(at)
    assert "BigCorp" in text and "Tiny Co" in text and "6 tenant(s)" in text
    at.text_input[1].input("Initech")
    at.text_input[2].input("initech")
    at.button[0].click().run()
    assert any("Created Initech" in unescape_md(s.value) for s in at.success)


def test_tenants_page_refuses_leadership(app_db):
    _demo(app_db)
    at = run_page("tenants.py", LEAD)
    assert at.error and "staff and tenant admins" in unescape_md(at.error[0].value)


def test_tenant_page_admin_sees_only_own_tenant(app_db):
    slugs = _demo(app_db)
    admin = Principal(role="tenant_admin", email="admin@bigcorp.example", tenant_id=slugs["bigcorp"])
    at = run_page("tenant.py", admin)
    assert not at.exception
    text = _texts(at)
    assert "BigCorp" in text and "EMEA sales" in text and "anna@bigcorp.example" in text
    assert "Tiny Co" not in text and "tom@tinyco.example" not in text


def test_tenant_page_admin_cannot_reach_another_tenant_by_state(app_db):
    slugs = _demo(app_db)
    admin = Principal(role="tenant_admin", email="admin@bigcorp.example", tenant_id=slugs["bigcorp"])
    at = run_page("tenant.py", admin, tenant_id=slugs["tinyco"])
    assert "Tiny Co" not in _texts(at)


def test_tenant_page_staff_picks_a_tenant(app_db):
    slugs = _demo(app_db)
    at = run_page("tenant.py", STAFF, tenant_id=slugs["dynco"])
    assert "Dyn Manufacturing" in _texts(at)


def test_audit_page_scopes(app_db):
    slugs = _demo(app_db)
    at = run_page("audit.py", STAFF)
    assert not at.exception and "tenant.create" in _texts(at)
    admin = Principal(role="tenant_admin", email="admin@tinyco.example", tenant_id=slugs["tinyco"])
    at = run_page("audit.py", admin)
    text = _texts(at)
    assert "tenant:tinyco" in text and "tenant:bigcorp" not in text
    at = run_page("audit.py", LEAD)
    assert at.error


def test_overview_per_role(app_db):
    slugs = _demo(app_db)
    at = run_page("overview.py", STAFF)
    assert not at.exception and "Onboardings in flight" in _texts(at) and "NewCo" in _texts(at)
    at = run_page("overview.py", LEAD)
    text = _texts(at)
    assert "Tenants" in text and "NewCo" not in text and "@" not in text
    admin = Principal(role="tenant_admin", email="admin@bigcorp.example", tenant_id=slugs["bigcorp"])
    assert "BigCorp" in _texts(run_page("overview.py", admin))


def test_page_without_principal_asks_to_sign_in(app_db):
    at = run_page("tenants.py", None)
    assert at.error and "not signed in" in unescape_md(at.error[0].value)


def test_onboarding_wizard_resumes_at_the_current_step(app_db):
    slugs = _demo(app_db)
    at = run_page("onboarding.py", STAFF, tenant_id=slugs["newco"])  # NewCo in focus
    assert not at.exception
    text = _texts(at)
    assert "NewCo" in text and at.query_params["tenant"] == "newco"
    assert "steps settled" in str(at.get("progress")[0].proto.text) if at.get("progress") else True
    assert "Connection test" in text
    # the step shown is the first unsettled one: newco has its CRM account but no passed test
    assert at.radio[0].value == "crm_accounts"


def test_onboarding_defer_keeps_reason_visible(app_db):
    slugs = _demo(app_db)
    at = run_page("onboarding.py", STAFF, tenant_id=slugs["newco"])
    at.radio[0].set_value("sso").run()
    at.text_input(key="reason_sso").input("IdP admin away until Monday").run()
    at.button(key="defer_sso").click().run()
    assert any("IdP admin away until Monday" in unescape_md(w.value) for w in at.warning)
    at2 = run_page("onboarding.py", STAFF, tenant_id=slugs["newco"])
    assert any("IdP admin away until Monday" in unescape_md(w.value) for w in at2.warning)
    assert slugs


def test_onboarding_not_for_tenant_admin_or_leadership(app_db):
    slugs = _demo(app_db)
    admin = Principal(role="tenant_admin", email="admin@newco.example", tenant_id=slugs["newco"])
    at = run_page("onboarding.py", admin)
    # the wizard lists only tenants in the principal's scope; newco's admin sees newco only
    assert "BigCorp" not in _texts(at)
    at = run_page("onboarding.py", LEAD)
    assert at.error


def test_overview_staff_sees_tenants_needing_attention(app_db):
    from sqlmodel import select

    from core.tenants.models import CrmAccount

    slugs = _demo(app_db)
    with Session(app_db) as s:
        acc = s.exec(select(CrmAccount).where(CrmAccount.tenant_id == slugs["profco"])).first()
        acc.last_test_ok = False
        s.add(acc)
        s.commit()
    text = _texts(run_page("overview.py", STAFF))
    assert "Tenants needing attention" in text
    assert "Prof Services Ltd" in text and "failing connection test" in text


def test_overview_tenant_admin_sees_level_and_next_step(app_db):
    slugs = _demo(app_db)
    admin = Principal(role="tenant_admin", email="admin@tinyco.example", tenant_id=slugs["tinyco"])
    at = run_page("overview.py", admin)
    assert not at.exception
    text = _texts(at)
    assert "Maturity level" in text and "Next step" in text
    assert "BigCorp" not in text


def test_onboarding_users_step_invites_the_tenant_admin(app_db, monkeypatch):
    monkeypatch.setenv("CRMBRIDGE_SMTP_PORT", "9")  # nothing listens: the link is shown for manual delivery
    from core.settings import get_settings

    get_settings.cache_clear()
    slugs = _demo(app_db)
    at = run_page("onboarding.py", STAFF, tenant_id=slugs["newco"])
    at.radio[0].set_value("users").run()
    email_box = next(t for t in at.text_input if t.label == "Admin's email")
    email_box.input("admin@newco.example")
    next(b for b in at.button if b.label == "Invite the tenant's admin").click().run()
    assert not at.exception
    shown = "\n".join(unescape_md(w.value) for w in at.warning) + "\n".join(c.value for c in at.code)
    assert "admin@newco.example" in shown and "/auth/invite/" in shown
