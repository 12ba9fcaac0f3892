"""The wizard's "Create a sandbox org" service (core.tenants.sandbox_org) against the real sandbox
process: demo mode only, tenant-scoped, audited without secrets, and what it shows really signs in."""

from __future__ import annotations

import pytest

from core.errors import AccessDenied, ConfigurationError, InvalidInput
from core.settings import Settings
from core.tenants.models import AuditEvent
from core.tenants.sandbox_org import create_sandbox_org, list_sandbox_orgs
from tests.conftest import admin_of, make_tenant


@pytest.fixture
def demo_settings(sandbox) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(demo=True, sandbox_url=sandbox.base_url, sandbox_ca_file=sandbox.ca_file)


def test_staff_make_a_sandbox_org_whose_values_sign_in(session, staff, sandbox, demo_settings):
    t = make_tenant(session, "wonka")
    org = create_sandbox_org(session=session, principal=staff, tenant_id=t.id, crm="salesforce",
                             settings=demo_settings)
    session.commit()
    fields = {f.title: f for f in org.fields}
    assert org.instance_url == f"{sandbox.base_url}/salesforce/{org.org}"
    assert fields["Consumer secret (API user — client credentials)"].secret
    tok = sandbox.http.post(f"/salesforce/{org.org}/services/oauth2/token", data={
        "grant_type": "client_credentials", "client_id": fields["Consumer key (API user — client credentials)"].value,
        "client_secret": fields["Consumer secret (API user — client credentials)"].value})
    assert tok.status_code == 200, tok.text
    assert sandbox.http.get(org.idp_metadata_url.removeprefix(sandbox.base_url)).status_code == 200
    assert f"admin@{t.slug}.example" in org.idp_users
    events = [e for e in session.query(AuditEvent) if e.action == "sandbox_org.create"]
    assert len(events) == 1 and fields["Consumer secret (API user — client credentials)"].value not in \
        events[0].details
    # shown again from the sandbox (nothing stored by the console), and made once
    again = create_sandbox_org(session=session, principal=staff, tenant_id=t.id, crm="salesforce",
                               settings=demo_settings)
    assert again == org
    assert list_sandbox_orgs(session=session, principal=staff, tenant_id=t.id, settings=demo_settings) == [org]
    assert len([e for e in session.query(AuditEvent) if e.action == "sandbox_org.create"]) == 1


def test_a_tenant_admin_reaches_only_their_own_tenants_sandbox_org(session, sandbox, demo_settings):
    mine, theirs = make_tenant(session, "mine-co"), make_tenant(session, "their-co")
    made = create_sandbox_org(session=session, principal=admin_of(mine), tenant_id=mine.id, crm="dynamics",
                              settings=demo_settings)
    assert made.crm_name == "Dynamics 365"
    with pytest.raises(AccessDenied):
        create_sandbox_org(session=session, principal=admin_of(mine), tenant_id=theirs.id, crm="dynamics",
                           settings=demo_settings)
    with pytest.raises(AccessDenied):
        list_sandbox_orgs(session=session, principal=admin_of(mine), tenant_id=theirs.id, settings=demo_settings)


def test_outside_demo_mode_or_for_an_unknown_crm_nothing_is_made(session, staff, sandbox, demo_settings):
    t = make_tenant(session, "realco")
    real = Settings(demo=False, sandbox_url=sandbox.base_url, sandbox_ca_file=sandbox.ca_file)
    with pytest.raises(ConfigurationError, match="demo mode only"):
        create_sandbox_org(session=session, principal=staff, tenant_id=t.id, crm="salesforce", settings=real)
    assert list_sandbox_orgs(session=session, principal=staff, tenant_id=t.id, settings=real) == []
    with pytest.raises(InvalidInput, match="Salesforce, Dynamics 365, HubSpot"):
        create_sandbox_org(session=session, principal=staff, tenant_id=t.id, crm="zoho", settings=demo_settings)
    r = sandbox.http.get("/_sandbox/provision/realco")
    assert r.status_code == 404


def test_demo_mode_sends_browsers_to_the_sandboxs_plain_http_origin_only_for_sandbox_pages():
    s = Settings(demo=True, sandbox_url="https://127.0.0.1:7002", sandbox_browser_url="http://127.0.0.1:7003")
    url = "https://127.0.0.1:7002/salesforce/acme/services/oauth2/authorize?client_id=x"
    assert s.browser_facing(url) == "http://127.0.0.1:7003/salesforce/acme/services/oauth2/authorize?client_id=x"
    assert s.browser_facing("https://acme.my.salesforce.com/services/oauth2/authorize") == \
        "https://acme.my.salesforce.com/services/oauth2/authorize"
    assert s.browser_facing("https://127.0.0.1:70021/x") == "https://127.0.0.1:70021/x"
    prod = Settings(demo=False, sandbox_url="https://127.0.0.1:7002")
    assert prod.browser_facing(url) == url
