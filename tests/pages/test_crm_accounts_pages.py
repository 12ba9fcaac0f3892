"""AppTests for the CRM-account pieces (pages/_crm_accounts.py): the catalog form (non-secret fields
only; secrets go through the secure HTML form it links to), the connection test against the sandbox,
and the quota gauge."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlmodel import Session, select
from streamlit.testing.v1 import AppTest

from core.clock import utcnow
from core.connections import service
from core.providers.base import ApiUsage
from core.providers.catalog import get_catalog
from core.settings import get_settings
from core.tenants.access import Principal
from core.tenants.models import AuditEvent, CrmAccount
from core.vault import service as vault
from tests.conftest import make_tenant, unescape_md

STAFF = Principal(role="staff", email="cs@crmbridge.example", account_id=1)


def _script_add() -> None:
    import streamlit as st

    from pages._crm_accounts import render_add_crm_account

    render_add_crm_account(st.session_state["tenant_under_test"])


def _script_test() -> None:
    import streamlit as st

    from pages._crm_accounts import render_connection_test

    render_connection_test(st.session_state["account_under_test"])


def _script_quota() -> None:
    import streamlit as st

    from pages._crm_accounts import render_quota

    render_quota(st.session_state["account_under_test"])


def _run(script, principal: Principal, **state) -> AppTest:  # type: ignore[no-untyped-def]
    at = AppTest.from_function(script, default_timeout=60)
    at.session_state["principal"] = principal
    for k, v in state.items():
        at.session_state[k] = v
    return at.run()


def _all_text(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [m.value for m in at.caption] + [e.value for e in at.error]
    parts += [s.value for s in at.success] + [w.value for w in at.warning] + [i.value for i in at.info]
    parts = [unescape_md(x) for x in parts]
    return "\n".join(str(p) for p in parts)


@pytest.fixture
def sandbox_settings(monkeypatch: pytest.MonkeyPatch, sandbox):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_CA_FILE", str(sandbox.ca_file))
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_URL", sandbox.base_url)  # the one loopback origin CRM calls may use
    get_settings.cache_clear()
    yield sandbox
    get_settings.cache_clear()


def _link_buttons(at: AppTest) -> list[tuple[str, str]]:
    return [(b.proto.label, b.proto.url) for b in at.get("link_button")]


def _form_url(account_id: int) -> str:
    return get_settings().public(f"/crm-accounts/{account_id}/credentials")


def test_no_catalog_secret_field_ever_gets_a_streamlit_widget(app_db):
    with Session(app_db) as s:
        tenant = make_tenant(s, "acme")
    at = _run(_script_add, STAFF, tenant_under_test=tenant.id)
    cat = get_catalog()
    checked = 0
    for slug in cat.slugs():
        at.selectbox[0].set_value(slug).run()
        for mode in cat.provider(slug).auth_modes:
            at.selectbox[2].set_value(mode.mode).run()
            assert not at.exception
            shown = {w.label.removesuffix(" (optional)") for w in [*at.text_input, *at.text_area, *at.selectbox]}
            for f in cat.form_fields(slug, mode.mode):
                assert (f.title in shown) is (not f.secret), (slug, mode.mode, f.name)
            assert all(t.proto.type != t.proto.PASSWORD for t in at.text_input), (slug, mode.mode)
            if mode.secret_fields:  # the form says where they go instead
                assert any("secure form" in unescape_md(c.value) for c in at.caption), (slug, mode.mode)
            checked += 1
    assert checked >= 7  # every auth mode of every CRM in the catalog


def test_adding_an_account_then_links_to_the_secure_credentials_form(app_db, vault_keys, sandbox_server):
    with Session(app_db) as s:
        tenant = make_tenant(s, "acme")
    at = _run(_script_add, STAFF, tenant_under_test=tenant.id)
    assert "Salesforce" in at.selectbox[0].options  # every catalog provider is offered
    at.selectbox[0].set_value("salesforce").run()
    at.selectbox[2].set_value("oauth_client_credentials").run()
    labels = [t.label for t in at.text_input]
    assert labels[:2] == ["Label", "My Domain URL"] and "Consumer key" in labels
    assert "Consumer secret" not in labels
    values = {"Label": "EMEA sales", "My Domain URL": "https://bigcorp-emea.my.salesforce.com",
              "Consumer key": "bigcorp-emea-integration"}
    for box in at.text_input:
        if box.label in values:
            box.input(values[box.label])
    at.button[0].click().run()
    assert not at.exception
    assert any("Added EMEA sales" in unescape_md(s.value) and "consumer secret" in unescape_md(s.value)
               for s in at.success), _all_text(at)
    with Session(app_db) as s:
        acc = s.exec(select(CrmAccount).where(CrmAccount.label == "EMEA sales")).one()
        assert json.loads(acc.settings_json)["client_id"] == "bigcorp-emea-integration"
        assert vault.find_credential(s, tenant_id=tenant.id, crm_account_id=acc.id, purpose="crm-login") is None
        created = s.exec(select(AuditEvent).where(AuditEvent.action == "crm_account.create")).one()
        assert json.loads(created.details)["credentials_pending"] == ["client_secret"]
        account_id = acc.id
    assert _link_buttons(at) == [("Enter credentials (secure form)", _form_url(account_id))]
    # on the next visit the account is still flagged until its credentials are entered
    at.run()
    assert any("EMEA sales" in unescape_md(w.value) and "no credentials yet" in unescape_md(w.value)
               for w in at.warning), _all_text(at)
    assert ("Enter credentials (secure form)", _form_url(account_id)) in _link_buttons(at)


def test_a_per_user_password_account_has_nothing_to_enter_in_the_console(app_db, vault_keys):
    with Session(app_db) as s:
        tenant = make_tenant(s, "acme")
    at = _run(_script_add, STAFF, tenant_under_test=tenant.id)
    at.selectbox[0].set_value("salesforce").run()
    at.selectbox[2].set_value("password").run()
    next(t for t in at.text_input if t.label == "Label").input("Tiny")
    next(t for t in at.text_input if t.label == "My Domain URL").input("https://tinyco.my.salesforce.com")
    at.button[0].click().run()
    assert any("Added Tiny" in unescape_md(s.value) and "connect link" in unescape_md(s.value)
               for s in at.success), _all_text(at)
    assert _link_buttons(at) == []


def test_a_bad_field_is_shown_with_its_fix(app_db, vault_keys):
    with Session(app_db) as s:
        tenant = make_tenant(s, "acme")
    at = _run(_script_add, STAFF, tenant_under_test=tenant.id)
    at.selectbox[0].set_value("salesforce").run()
    at.selectbox[2].set_value("password").run()
    assert any("Retiring" in unescape_md(w.value) and "Summer '27" in unescape_md(w.value) for w in at.warning)
    next(t for t in at.text_input if t.label == "Label").input("Legacy")
    next(t for t in at.text_input if t.label == "My Domain URL").input("acme.my.salesforce.com")
    at.button[0].click().run()
    assert at.error and "My Domain URL does not look right" in unescape_md(at.error[0].value)


def _api_account(engine, sandbox, org: str = "bigcorp-emea", secret: str = "demo-bigcorp-emea-secret") -> int:
    with Session(engine, expire_on_commit=False) as s:
        tenant = make_tenant(s, "acme")
        acc = service.add_crm_account(
            session=s, principal=STAFF, tenant_id=tenant.id, provider="salesforce", edition="enterprise",
            label="EMEA", auth_mode="oauth_client_credentials",
            values={"instance_url": f"{sandbox.base_url}/salesforce/{org}", "client_id": f"{org}-integration",
                    "client_secret": secret})
        s.commit()
        return int(acc.id)  # type: ignore[arg-type]


def test_connection_test_shows_each_step(app_db, vault_keys, sandbox_settings):
    account_id = _api_account(app_db, sandbox_settings)
    at = _run(_script_test, STAFF, account_under_test=account_id)
    assert "Not tested yet" in _all_text(at)
    at.button[0].click().run()
    assert not at.exception
    assert len(at.success) == 5, _all_text(at)
    text = _all_text(at)
    assert "passed" in text and "integration@bigcorp-emea.example" in text and "372 of 400" in text


def test_a_failed_connection_test_names_the_fix(app_db, vault_keys, sandbox_settings):
    account_id = _api_account(app_db, sandbox_settings, secret="wrong-secret")
    at = _run(_script_test, STAFF, account_under_test=account_id)
    at.button[0].click().run()
    assert at.error, _all_text(at)
    assert "Fix:" in unescape_md(at.error[0].value) and "consumer key and secret" in unescape_md(at.error[0].value)


def test_a_test_without_credentials_asks_for_them_first(app_db, vault_keys, sandbox_settings):
    with Session(app_db, expire_on_commit=False) as s:
        tenant = make_tenant(s, "acme")
        acc = service.add_crm_account_settings(
            session=s, principal=STAFF, tenant_id=tenant.id, provider="salesforce", edition="enterprise",
            label="EMEA", auth_mode="oauth_client_credentials",
            values={"instance_url": f"{sandbox_settings.base_url}/salesforce/bigcorp-emea",
                    "client_id": "bigcorp-emea-integration"})
        s.commit()
        account_id = int(acc.id)  # type: ignore[arg-type]
    at = _run(_script_test, STAFF, account_under_test=account_id)
    assert any("Credentials missing" in unescape_md(w.value) for w in at.warning), _all_text(at)
    at.button[0].click().run()
    assert not at.exception
    assert any("enter the credentials first" in unescape_md(w.value) for w in at.warning), _all_text(at)
    assert _link_buttons(at) == [("Enter credentials (secure form)", _form_url(account_id))]
    with Session(app_db) as s:
        assert s.get(CrmAccount, account_id).last_test_at is None  # no test ran against the CRM


def test_stored_credentials_can_be_replaced_through_the_secure_form(app_db, vault_keys, sandbox_settings):
    account_id = _api_account(app_db, sandbox_settings)
    at = _run(_script_test, STAFF, account_under_test=account_id)
    assert not at.warning and "Credentials: stored" in _all_text(at)
    assert _link_buttons(at) == [("Replace credentials (secure form)", _form_url(account_id))]


def test_quota_gauge_and_forecast(app_db):
    with Session(app_db) as s:
        tenant = make_tenant(s, "acme")
        acc = CrmAccount(tenant_id=tenant.id, provider="salesforce", edition="enterprise", label="Q",
                         instance_url="https://a.my.salesforce.com")
        s.add(acc)
        s.commit()
        now = utcnow()
        for i in range(4):
            service.record_api_usage(session=s, principal=STAFF, account_id=acc.id, usage=ApiUsage(
                used=70_000 + 5_000 * i, limit=100_000, window="24h rolling",
                observed_at=now - timedelta(hours=3 - i)))
        s.commit()
        account_id = acc.id
    at = _run(_script_quota, STAFF, account_under_test=account_id)
    assert not at.exception
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    figure = json.loads(charts[0].proto.spec)
    assert figure["data"][0]["type"] == "indicator" and figure["data"][0]["value"] == 85_000
    assert any("24-hour allocation is used up by" in unescape_md(w.value) for w in at.warning), _all_text(at)


def test_another_tenants_admin_sees_an_error_not_the_account(app_db):
    with Session(app_db) as s:
        tenant = make_tenant(s, "acme")
        other = make_tenant(s, "globex")
        acc = CrmAccount(tenant_id=tenant.id, provider="salesforce", edition="enterprise", label="Q",
                         instance_url="https://a.my.salesforce.com")
        s.add(acc)
        s.commit()
        account_id, other_id = acc.id, other.id
    stranger = Principal(role="tenant_admin", email="admin@globex.example", tenant_id=other_id)
    at = _run(_script_quota, stranger, account_under_test=account_id)
    assert at.error and "do not have access" in unescape_md(at.error[0].value)
