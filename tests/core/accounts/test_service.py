"""Account lists per scope, audited changes, the webhook secret page, and the demo staff enrolment."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from core.accounts import mfa, service
from core.accounts.demo import DEMO_TOTP_SECRET, enrol_demo_staff
from core.errors import AccessDenied, InvalidInput, NotFound
from core.tenants import auth
from core.tenants.access import Principal
from core.tenants.models import AuditEvent
from tests.conftest import admin_of

PW = "correct horse battery"


def _accounts(session, tenant, other_tenant):
    made = {}
    for email, role, tid in (("cs@crmbridge.example", "staff", None), ("vp@crmbridge.example", "leadership", None),
                             ("ana@acme.example", "tenant_admin", tenant.id),
                             ("bob@globex.example", "tenant_admin", other_tenant.id)):
        made[email] = auth.create_console_account(session, principal=Principal.system(), email=email, role=role,
                                                  tenant_id=tid, password=PW).id
    session.commit()
    return made


def test_account_list_is_per_tenant_for_admins_and_across_tenants_for_staff(session, tenant, other_tenant, staff,
                                                                          leadership):
    _accounts(session, tenant, other_tenant)
    mine = service.list_accounts(session=session, principal=admin_of(tenant))
    assert [r.email for r in mine] == ["ana@acme.example"]
    everyone = service.list_accounts(session=session, principal=staff)
    assert {r.email for r in everyone} == {"cs@crmbridge.example", "vp@crmbridge.example", "ana@acme.example",
                                          "bob@globex.example"}
    by_email = {r.email: r for r in everyone}
    assert by_email["cs@crmbridge.example"].mfa == "required — not set up"
    assert by_email["ana@acme.example"].mfa == "off" and by_email["ana@acme.example"].tenant == "Acme"
    # staff filter one tenant; an admin cannot widen their scope
    assert [r.email for r in service.list_accounts(session=session, principal=staff, tenant_id=other_tenant.id)] == [
        "bob@globex.example"]
    assert [r.email for r in service.list_accounts(session=session, principal=admin_of(tenant),
                                                   tenant_id=other_tenant.id)] == ["ana@acme.example"]
    with pytest.raises(AccessDenied):
        service.list_accounts(session=session, principal=leadership)


def test_account_changes_are_scoped_and_audited(session, tenant, other_tenant, staff, clock):
    ids = _accounts(session, tenant, other_tenant)
    admin = admin_of(tenant)
    with pytest.raises(NotFound):
        service.set_disabled(session=session, principal=admin, account_id=ids["bob@globex.example"], disabled=True)
    with pytest.raises(NotFound):
        service.set_disabled(session=session, principal=admin, account_id=ids["cs@crmbridge.example"], disabled=True)
    service.set_disabled(session=session, principal=admin, account_id=ids["ana@acme.example"], disabled=True)
    service.set_disabled(session=session, principal=staff, account_id=ids["ana@acme.example"], disabled=False)
    service.unlock_account(session=session, principal=staff, account_id=ids["bob@globex.example"])
    session.commit()
    actions = [(e.action, e.actor) for e in session.exec(select(AuditEvent)) if e.action.startswith("console_account.")]
    assert ("console_account.disable", "admin@acme.example") in actions
    assert ("console_account.enable", "cs@crmbridge.example") in actions
    assert ("console_account.unlock", "cs@crmbridge.example") in actions


def test_nobody_resets_their_own_second_factor(session, tenant, other_tenant):
    ids = _accounts(session, tenant, other_tenant)
    me = Principal(role="staff", email="cs@crmbridge.example", account_id=ids["cs@crmbridge.example"])
    enrol_demo_staff(session)
    with pytest.raises(InvalidInput, match="your own"):
        service.reset_account_mfa(session=session, principal=me, account_id=ids["cs@crmbridge.example"])


def test_demo_staff_enrolment_uses_the_published_secret(session, tenant, other_tenant, clock):
    ids = _accounts(session, tenant, other_tenant)
    assert enrol_demo_staff(session, now=clock()) == ["cs@crmbridge.example"]
    assert enrol_demo_staff(session, now=clock()) == []  # idempotent
    session.commit()
    token = mfa.start_challenge(session, account_id=ids["cs@crmbridge.example"], now=clock())
    v = mfa.verify_challenge(session, token=token, code=mfa.code_at(DEMO_TOTP_SECRET, clock()), now=clock())
    assert v.method == "password+totp"
    assert not mfa.has_active_factor(session, ids["ana@acme.example"])  # only staff


# --- the webhook secret page ---------------------------------------------------------------------


def test_webhook_secret_page_reveals_once_to_the_tenant_admin(app_db, vault_keys, monkeypatch):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from core.alerts import service as alerts
    from core.alerts.routes import routes
    from core.settings import get_settings
    from core.tenants.models import Tenant

    monkeypatch.setenv("CRMBRIDGE_DEMO", "1")
    get_settings.cache_clear()
    with Session(app_db) as s:
        t = Tenant(name="Acme", slug="acme", status="live")
        s.add(t)
        s.commit()
        acc = auth.create_console_account(s, principal=Principal.system(), email="ana@acme.example",
                                          role="tenant_admin", tenant_id=t.id, password=PW)
        other = auth.create_console_account(s, principal=Principal.system(), email="zed@acme.example",
                                            role="leadership", password=PW)
        ch = alerts.add_webhook_channel(session=s, principal=admin_of(t), tenant_id=t.id, name="Hook",
                                        url="http://127.0.0.1:9/hook")
        token = auth.start_session(s, account_id=acc.id)
        lead_token = auth.start_session(s, account_id=other.id)
        s.commit()
    client = TestClient(Starlette(routes=routes), base_url="http://127.0.0.1:8501")
    url = f"/alerts/webhooks/{ch.id}/secret"
    assert client.get(url).status_code == 401
    client.cookies.set("crmbridge_session", lead_token)
    assert client.get(url).status_code == 404  # leadership: not in scope
    client.cookies.set("crmbridge_session", token)
    page = client.get(url)
    assert page.status_code == 200 and "whsec_" not in page.text
    csrf = page.text.split('name=csrf value="', 1)[1].split('"', 1)[0]
    assert client.post(url, data={"csrf": "forged"}).status_code == 400
    shown = client.post(url, data={"csrf": csrf})
    assert shown.status_code == 200 and "whsec_" in shown.text
    assert client.get(url).status_code == 410 and client.post(url, data={"csrf": csrf}).status_code == 400
    get_settings.cache_clear()
