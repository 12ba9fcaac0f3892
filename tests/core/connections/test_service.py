"""Provider services: add an account from the catalog (secrets to the vault), test it against the
sandbox, the quota gauge and its forecast, and the per-user OAuth callback."""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlmodel import select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.connections import routes as oauth
from core.connections import service
from core.connections.models import ApiUsageSample
from core.errors import AccessDenied, Conflict, InvalidInput, LinkInvalid
from core.providers.base import ApiUsage
from core.tenants.access import Principal
from core.tenants.models import AuditEvent, CrmAccount
from core.vault import service as vault
from tests.conftest import admin_of, make_app_user, make_tenant


def _add_api_user(session, principal, tenant, sandbox, *, secret="demo-bigcorp-emea-secret", label="EMEA"):
    return service.add_crm_account(
        session=session, principal=principal, tenant_id=tenant.id, provider="salesforce", edition="enterprise",
        label=label, auth_mode="oauth_client_credentials", values={
            "instance_url": f"{sandbox.base_url}/salesforce/bigcorp-emea", "client_id": "bigcorp-emea-integration",
            "client_secret": secret, "external_id_field": "", "attribution_field": "CrmBridge_Actor__c"},
        url_policy=sandbox.url_policy())


def test_adding_an_account_sends_secrets_to_the_vault_only(session, staff, tenant, vault_keys, sandbox_server):
    acc = _add_api_user(session, staff, tenant, sandbox_server, secret="zz-very-secret-zz")
    session.commit()
    settings = json.loads(acc.settings_json)
    assert settings["auth_mode"] == "oauth_client_credentials" and settings["client_id"] == "bigcorp-emea-integration"
    assert acc.credential_mode == "api_user" and acc.instance_url.endswith("/salesforce/bigcorp-emea")
    everything = json.dumps([e.details for e in session.exec(select(AuditEvent))]) + acc.settings_json
    assert "zz-very-secret-zz" not in everything
    ref = vault.find_credential(session, tenant_id=tenant.id, crm_account_id=acc.id, purpose="crm-login")
    with vault.use(session, ref, principal=staff, reason="test") as secret:
        assert json.loads(secret.get_secret_value()) == {"client_secret": "zz-very-secret-zz"}
    with pytest.raises(Conflict):
        _add_api_user(session, staff, tenant, sandbox_server)
    with pytest.raises(InvalidInput, match="My Domain URL"):
        service.add_crm_account(session=session, principal=staff, tenant_id=tenant.id, provider="salesforce",
                                edition="enterprise", label="Other", auth_mode="password",
                                values={"instance_url": "not a url"})
    other = make_tenant(session, "globex")
    with pytest.raises(AccessDenied):
        _add_api_user(session, admin_of(other), tenant, sandbox_server, label="X")


def test_connection_test_is_stored_on_the_account_with_a_usage_sample(session, staff, tenant, vault_keys, sandbox):
    acc = _add_api_user(session, staff, tenant, sandbox)
    session.commit()
    report = service.test_crm_account(session=session, principal=staff, account_id=acc.id,
                                      transport=sandbox.transport())
    session.commit()
    assert report.ok, report.failed_step
    stored = service.last_connection_test(session=session, principal=staff, account_id=acc.id)
    assert stored.ok is True and stored.identity == "integration@bigcorp-emea.example"
    assert [s.name for s in stored.steps] == ["reach", "authenticate", "api_access", "licenses", "quota"]
    stored_row = session.get(CrmAccount, acc.id)
    assert stored_row.status == "connected"
    summary = json.loads(stored_row.last_test_summary)  # what posture reads
    assert summary["licenses"]["total"] == 400 and summary["licenses"]["integration_total"] == 5
    assert summary["api_usage"]["limit"] == 500_000 and summary["error_code"] is None
    gauge = service.quota_gauge(session=session, principal=staff, account_id=acc.id)
    assert gauge.limit == 500_000 and 61_200 < (gauge.used or 0) < 61_300
    assert session.exec(select(AuditEvent).where(AuditEvent.action == "crm_account.test")).one()


def test_a_rejected_per_user_password_destroys_the_credential(session, staff, tenant, vault_keys, sandbox):
    acc = service.add_crm_account(session=session, principal=staff, tenant_id=tenant.id, provider="salesforce",
                                  edition="enterprise", label="Tiny", auth_mode="password",
                                  values={"instance_url": f"{sandbox.base_url}/salesforce/tinyco"},
        url_policy=sandbox.url_policy())
    user = make_app_user(session, tenant, "tom@acme.example")
    vault.put(session, principal=staff, tenant_id=tenant.id, purpose="crm-login", crm_account_id=acc.id,
              app_user_id=user.id, secret=json.dumps({"username": "tom@tinyco.example", "password": "stale",
                                                     "security_token": "TKNTOM0001"}))
    session.commit()
    report = service.test_crm_account(session=session, principal=staff, account_id=acc.id,
                                      transport=sandbox.transport())
    session.commit()
    assert not report.ok and report.failed_step.name == "authenticate"
    assert "security token" in (report.failed_step.fix or "")
    assert json.loads(session.get(CrmAccount, acc.id).last_test_summary)["error_code"] == "INVALID_LOGIN"
    assert vault.find_credential(session, tenant_id=tenant.id, crm_account_id=acc.id, app_user_id=user.id,
                                 purpose="crm-login") is None
    again = service.test_crm_account(session=session, principal=staff, account_id=acc.id)
    assert not again.ok and "connect link" in (again.failed_step.fix or "")


def test_quota_forecast_from_recent_samples(session, staff, tenant, clock):
    acc = CrmAccount(tenant_id=tenant.id, provider="salesforce", edition="enterprise", label="Q",
                     instance_url="https://a.example")
    session.add(acc)
    session.commit()
    empty = service.quota_gauge(session=session, principal=staff, account_id=acc.id, now=clock())
    assert empty.status == "unknown" and "connection test" in empty.forecast_text(clock())
    start = clock() - timedelta(hours=3)
    for i in range(4):
        service.record_api_usage(session=session, principal=staff, account_id=acc.id, now=clock(), usage=ApiUsage(
            used=1000 * (i + 1), limit=10_000, window="24h rolling", observed_at=start + timedelta(hours=i)))
    g = service.quota_gauge(session=session, principal=staff, account_id=acc.id, now=clock())
    assert g.used == 4000 and g.fraction == pytest.approx(0.4) and g.status == "ok"
    assert g.rate_per_hour == pytest.approx(1000)
    assert g.exhausted_at == clock() + timedelta(hours=6)
    text = g.forecast_text(clock())
    assert "the 24-hour allocation is used up by" in text and " h " not in text
    assert (clock() + timedelta(hours=6)).strftime("%H:%M") in text
    service.record_api_usage(session=session, principal=staff, account_id=acc.id, usage=ApiUsage(
        used=9_500, limit=10_000, window="24h rolling", observed_at=clock()))
    assert service.quota_gauge(session=session, principal=staff, account_id=acc.id, now=clock()).status == "critical"
    assert session.exec(select(ApiUsageSample)).all()
    with pytest.raises(AccessDenied):
        service.quota_gauge(session=session, principal=admin_of(make_tenant(session, "globex")), account_id=acc.id)


def _per_user_oauth_account(session, staff, tenant, sandbox, org="newco"):
    acc = service.add_crm_account(
        session=session, principal=staff, tenant_id=tenant.id, provider="salesforce", edition="enterprise",
        label=f"OAuth {org}", auth_mode="oauth_authorization_code",
        values={"instance_url": f"{sandbox.base_url}/salesforce/{org}", "client_id": f"{org}-connected-app",
                "client_secret": f"demo-{org}-app-secret"},
        url_policy=sandbox.url_policy())
    session.commit()
    return acc


def _approve(sandbox, url, username, password):
    form = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    form.update(username=username, password=password, action="allow")
    path = urlsplit(url).path
    answer = sandbox.http.post(path, data=form)
    assert answer.status_code == 302, answer.text
    return {k: v[0] for k, v in parse_qs(urlsplit(answer.headers["location"]).query).items()}


def test_oauth_callback_tests_the_grant_and_stores_the_refresh_token(session, staff, tenant, vault_keys, sandbox):
    acc = _per_user_oauth_account(session, staff, tenant, sandbox)
    user = make_app_user(session, tenant, "nora@acme.example")
    url = oauth.begin_authorization(
        account=acc, url_policy=sandbox.url_policy(), binding=f"app_user:{user.id}", login_hint="nora@newco.example")
    assert url.startswith(f"{sandbox.base_url}/salesforce/newco/services/oauth2/authorize?")
    assert "code_challenge_method=S256" in url and "redirect_uri=http%3A%2F%2F127.0.0.1%3A8501%2Foauth" in url
    params = _approve(sandbox, url, "nora@newco.example", "Demo-Nora-2026")
    message = oauth.complete_authorization(session, provider="salesforce", code=params["code"],
                                           state=params["state"], transport=sandbox.transport())
    session.commit()
    assert "connected as nora@newco.example" in str(message)
    ref = vault.find_credential(session, tenant_id=tenant.id, crm_account_id=acc.id, app_user_id=user.id,
                                purpose="crm-login")
    assert ref is not None
    report = service.test_crm_account(session=session, principal=staff, account_id=acc.id, app_user_id=user.id,
                                      transport=sandbox.transport())
    assert report.ok and report.identity == "nora@newco.example"
    with pytest.raises(LinkInvalid, match="already completed"):
        oauth.complete_authorization(session, provider="salesforce", code=params["code"],
                                     state=params["state"], transport=sandbox.transport())


def test_oauth_state_is_signed_expires_and_binds_the_verifier(session, staff, tenant, vault_keys, sandbox, clock):
    acc = _per_user_oauth_account(session, staff, tenant, sandbox, org="tinyco")
    user = make_app_user(session, tenant, "ben@acme.example")
    url = oauth.begin_authorization(
        account=acc, url_policy=sandbox.url_policy(), binding=f"app_user:{user.id}", now=clock())
    state = parse_qs(urlsplit(url).query)["state"][0]
    with pytest.raises(LinkInvalid, match="not valid"):
        oauth.read_state(state[:-2] + "xx", now=clock())
    with pytest.raises(LinkInvalid, match="expired"):
        oauth.read_state(state, now=clock() + timedelta(minutes=16))
    assert oauth.read_state(state, now=clock())["b"] == f"app_user:{user.id}"
    # a code obtained for another state (another PKCE challenge) fails the verifier check at the CRM
    other = oauth.begin_authorization(
        account=acc, url_policy=sandbox.url_policy(), binding=f"app_user:{user.id}")
    code = _approve(sandbox, other, "ben@tinyco.example", "Demo-Ben-2026")["code"]
    fresh = oauth.begin_authorization(
        account=acc, url_policy=sandbox.url_policy(), binding=f"app_user:{user.id}")
    fresh_state = parse_qs(urlsplit(fresh).query)["state"][0]
    from core.errors import AuthenticationFailed

    with pytest.raises(AuthenticationFailed, match="invalid_grant"):
        oauth.complete_authorization(session, provider="salesforce", code=code, state=fresh_state,
                                     transport=sandbox.transport())


def test_callback_route_shows_the_crm_refusal(app_db):
    client = TestClient(Starlette(routes=oauth.routes))
    r = client.get("/oauth/salesforce/callback?error=access_denied&error_description=end-user+denied")
    assert r.status_code == 400 and "access_denied" in r.text
    r2 = client.get("/oauth/salesforce/callback?code=abc&state=forged.sig")
    assert r2.status_code == 400 and "not valid" in r2.text


def test_the_demo_accounts_connect_to_the_sandbox(session, staff, vault_keys, sandbox, clock):
    from core.connections import demo
    from core.demo import load_scenario, read_scenario

    slugs = load_scenario(session, read_scenario(), sandbox_url=sandbox.base_url)
    demo.load_demo(session, scenario={}, principal=Principal.system("demo"), now=clock(), tenants=slugs)
    session.commit()
    accounts = {a.label: a for a in session.exec(select(CrmAccount).where(CrmAccount.tenant_id == slugs["bigcorp"]))}
    emea = accounts["EMEA sales"]
    assert json.loads(emea.settings_json)["attribution_field"] == "CrmBridge_Actor__c"
    gauge = service.quota_gauge(session=session, principal=staff, account_id=emea.id, now=clock())
    assert gauge.used == 61_200 and gauge.rate_per_hour == pytest.approx(9_000)
    report = service.test_crm_account(session=session, principal=staff, account_id=emea.id,
                                      transport=sandbox.transport(), now=clock())
    assert report.ok, report.failed_step
    newco = session.exec(select(CrmAccount).where(CrmAccount.tenant_id == slugs["newco"])).one()
    assert service.test_crm_account(session=session, principal=staff, account_id=newco.id,
                                    transport=sandbox.transport(), now=clock()).ok


def test_a_new_user_credential_is_checked_before_it_is_stored(session, staff, tenant, vault_keys, sandbox):
    acc = service.add_crm_account(session=session, principal=staff, tenant_id=tenant.id, provider="salesforce",
                                  edition="enterprise", label="Tiny", auth_mode="password",
                                  values={"instance_url": f"{sandbox.base_url}/salesforce/tinyco"},
        url_policy=sandbox.url_policy())
    session.commit()
    good = service.check_credential(session=session, principal=staff, account_id=acc.id, transport=sandbox.transport(),
                                    fields={"username": "uma@tinyco.example", "password": "Demo-Uma-2026",
                                            "security_token": "TKNUMA0002"})
    assert good.ok and good.crm_user_id == "005TINY0000000002"
    bad = service.check_credential(session=session, principal=staff, account_id=acc.id, transport=sandbox.transport(),
                                   fields={"username": "uma@tinyco.example", "password": "typo",
                                           "security_token": "TKNUMA0002"})
    assert not bad.ok and bad.failed_step.code == "INVALID_LOGIN"
    assert session.get(CrmAccount, acc.id).last_test_at is None  # a check is not a stored test


def test_quota_forecast_speaks_in_the_vendors_window_not_in_thousands_of_hours(session, staff, tenant, clock):
    """Issue 16: a slow trickle forecast "runs out in 8,313 h" for a rolling 24-hour limit; at a rate
    whose 24 hours stay under the limit the allocation lasts the window."""
    acc = CrmAccount(tenant_id=tenant.id, provider="salesforce", edition="enterprise", label="Slow",
                     instance_url="https://a.example")
    session.add(acc)
    session.commit()
    start = clock() - timedelta(hours=3)
    for i in range(4):
        service.record_api_usage(session=session, principal=staff, account_id=acc.id, now=clock(), usage=ApiUsage(
            used=1000 + 5 * i, limit=100_000, window="24h rolling", observed_at=start + timedelta(hours=i)))
    g = service.quota_gauge(session=session, principal=staff, account_id=acc.id, now=clock())
    text = g.forecast_text(clock())
    assert text == "At this rate (5 calls/hour) the 24-hour allocation will last the window."
    assert "h (" not in text and "8," not in text


def test_editing_an_accounts_settings_is_scoped_checked_and_audited(session, staff, tenant):
    """Issue 16: posture tells an admin to set the attribution field; the edit service does it, with the
    catalog's checks, the tenant's scope and an audit entry, and never takes a secret."""
    acc = service.add_crm_account_settings(
        session=session, principal=staff, tenant_id=tenant.id, provider="salesforce", edition="enterprise",
        label="EMEA", auth_mode="oauth_client_credentials",
        values={"instance_url": "https://emea.my.salesforce.com", "client_id": "3MVG9abc"})
    admin = admin_of(tenant)
    form = service.account_settings_form(session=session, principal=admin, account_id=acc.id)
    assert "attribution_field" in {f.name for f in form.fields}
    assert not any(f.secret for f in form.fields) and form.values["client_id"] == "3MVG9abc"
    with pytest.raises(InvalidInput, match="Attribution field"):
        service.update_crm_account_settings(session=session, principal=admin, account_id=acc.id,
                                            values={"attribution_field": "not a field"})
    with pytest.raises(InvalidInput, match="secure"):
        service.update_crm_account_settings(session=session, principal=admin, account_id=acc.id,
                                            values={"client_secret": "s3cret-canary"})
    other = admin_of(make_tenant(session, "globex"))
    with pytest.raises(AccessDenied):
        service.update_crm_account_settings(session=session, principal=other, account_id=acc.id,
                                            values={"attribution_field": "CrmBridge_Actor__c"})
    service.update_crm_account_settings(session=session, principal=admin, account_id=acc.id, label="EMEA sales",
                                        values={"attribution_field": "CrmBridge_Actor__c"})
    session.commit()
    saved = session.get(CrmAccount, acc.id)
    assert saved.label == "EMEA sales"
    assert json.loads(saved.settings_json)["attribution_field"] == "CrmBridge_Actor__c"
    assert json.loads(saved.settings_json)["client_id"] == "3MVG9abc"
    event = session.exec(select(AuditEvent).where(AuditEvent.action == "crm_account.update")).one()
    assert event.actor == admin.email and "attribution_field" in event.details
    assert "s3cret-canary" not in event.details
