"""The secure credentials form beside the console: GET/POST /crm-accounts/{id}/credentials.

Driven through Starlette's TestClient against the app database (``app_db``), with real console
sessions (cookie ``crmbridge_session``) and the sandbox CRM for the connection test.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.connections import routes as provider_routes
from core.connections import service
from core.settings import get_settings
from core.tenants import auth
from core.tenants.access import Principal
from core.tenants.models import AuditEvent, ConsoleAccount, CrmAccount
from core.vault import service as vault
from core.web import SESSION_COOKIE
from tests.conftest import make_tenant

STAFF = Principal(role="staff", email="cs@crmbridge.example")
GOOD_SECRET = "demo-bigcorp-emea-secret"  # what the sandbox's bigcorp-emea org accepts
CSRF_RE = re.compile(r"name=csrf value='([0-9a-f]{64})'")


@pytest.fixture
def client(app_db: Engine) -> Iterator[TestClient]:
    app = Starlette(routes=provider_routes.routes)
    with TestClient(app, base_url="http://127.0.0.1:8501", follow_redirects=False) as c:
        yield c


def _account(engine: Engine, base_url: str, *, tenant_slug: str = "acme") -> tuple[int, int]:
    """A Salesforce API-user account (client credentials) pointing at the sandbox org, no secret yet."""
    with Session(engine, expire_on_commit=False) as s:
        tenant = make_tenant(s, tenant_slug)
        acc = service.add_crm_account_settings(
            session=s, principal=STAFF, tenant_id=tenant.id, provider="salesforce", edition="enterprise",
            label="EMEA", auth_mode="oauth_client_credentials",
            values={"instance_url": f"{base_url}/salesforce/bigcorp-emea", "client_id": "bigcorp-emea-integration"})
        s.commit()
        return int(acc.id), int(tenant.id)  # type: ignore[arg-type]


def _signed_in(engine: Engine, *, email: str, role: str, tenant_id: int | None) -> str:
    """A console account and a live session for it; returns the cookie value."""
    with Session(engine) as s:
        account = ConsoleAccount(email=email, role=role, tenant_id=tenant_id)
        s.add(account)
        s.flush()
        method = "password+totp" if role == "staff" else "password"
        token = auth.start_session(s, account_id=int(account.id), method=method)  # type: ignore[arg-type]
        s.commit()
    return token


def _url(account_id: int) -> str:
    return f"/crm-accounts/{account_id}/credentials"


def _csrf(html: str) -> str:
    found = CSRF_RE.search(html)
    assert found, html
    return found.group(1)


def _stored_secret(engine: Engine, account_id: int) -> dict[str, str] | None:
    with Session(engine) as s:
        acc = s.get(CrmAccount, account_id)
        ref = vault.find_credential(s, tenant_id=acc.tenant_id, crm_account_id=account_id, purpose="crm-login")
        if ref is None:
            return None
        with vault.use(s, ref, principal=STAFF, reason="test") as secret:
            return dict(json.loads(secret.get_secret_value()))


def _audit(engine: Engine) -> list[AuditEvent]:
    with Session(engine) as s:
        return list(s.exec(select(AuditEvent)).all())


def test_not_signed_in_is_sent_to_sign_in_and_nothing_is_stored(client, app_db, vault_keys):
    account_id, _ = _account(app_db, "https://crm-example.my.salesforce.com")
    answer = client.get(_url(account_id))
    assert answer.status_code == 303
    assert answer.headers["location"] == get_settings().public(f"/auth/login?next={_url(account_id)}")
    client.cookies.set(SESSION_COOKIE, "forged-or-expired-token")
    answer = client.post(_url(account_id), data={"client_secret": "zz-nobody-zz", "csrf": "x"})
    assert answer.status_code == 303 and "/auth/login" in answer.headers["location"]
    assert _stored_secret(app_db, account_id) is None


def test_another_tenants_admin_gets_403_even_with_their_own_csrf_token(client, app_db, vault_keys):
    account_id, _ = _account(app_db, "https://crm-example.my.salesforce.com")
    with Session(app_db) as s:
        globex = make_tenant(s, "globex")
    token = _signed_in(app_db, email="admin@globex.example", role="tenant_admin", tenant_id=globex.id)
    client.cookies.set(SESSION_COOKIE, token)
    answer = client.get(_url(account_id))
    assert answer.status_code == 403
    assert "do not have access" in answer.text and "client_secret" not in answer.text
    # a token that is genuinely valid for this session and account still does not open the account
    csrf = provider_routes.csrf_token_for(provider_routes._csrf_binding(token, account_id))
    answer = client.post(_url(account_id), data={"csrf": csrf, "client_secret": "zz-stranger-zz", "test": "1"})
    assert answer.status_code == 403
    assert _stored_secret(app_db, account_id) is None
    assert "zz-stranger-zz" not in answer.text


def test_missing_or_forged_csrf_is_refused_and_nothing_is_stored(client, app_db, vault_keys, caplog):
    account_id, tenant_id = _account(app_db, "https://crm-example.my.salesforce.com")
    token = _signed_in(app_db, email="admin@acme.example", role="tenant_admin", tenant_id=tenant_id)
    other_token = _signed_in(app_db, email="admin2@acme.example", role="tenant_admin", tenant_id=tenant_id)
    caplog.set_level(logging.DEBUG)
    client.cookies.set(SESSION_COOKIE, other_token)
    other_sessions_csrf = _csrf(client.get(_url(account_id)).text)
    client.cookies.set(SESSION_COOKIE, token)
    assert _csrf(client.get(_url(account_id)).text) != other_sessions_csrf  # bound to the session
    for csrf in (None, "", "0" * 64, other_sessions_csrf):
        data = {"client_secret": "zz-csrf-secret-zz", "test": "1"}
        if csrf is not None:
            data["csrf"] = csrf
        answer = client.post(_url(account_id), data=data)
        assert answer.status_code == 403, csrf
        assert "nothing was stored" in answer.text
        assert "zz-csrf-secret-zz" not in answer.text
    assert _stored_secret(app_db, account_id) is None
    assert not [e for e in _audit(app_db) if e.action.startswith("crm_account.credentials")]
    with Session(app_db) as s:
        assert s.get(CrmAccount, account_id).last_test_at is None
    assert "zz-csrf-secret-zz" not in caplog.text


def test_the_form_is_generated_from_the_catalogs_secret_fields(client, app_db, vault_keys):
    account_id, tenant_id = _account(app_db, "https://crm-example.my.salesforce.com")
    client.cookies.set(SESSION_COOKIE, _signed_in(app_db, email="cs@crmbridge.example", role="staff",
                                                  tenant_id=None))
    page = client.get(_url(account_id))
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in \
        page.headers["content-security-policy"]
    assert "Consumer secret" in page.text and "No credentials are stored yet" in page.text
    assert re.search(r"<input type=password id=f_client_secret name=client_secret autocomplete=new-password", page.text)
    assert "Consumer key" not in page.text  # non-secret fields stay in the console form
    assert re.search(r"name=test value=1 checked", page.text)  # test right away: on by default
    assert f"action='{get_settings().public(_url(account_id))}'" in page.text
    assert client.get("/crm-accounts/999999/credentials").status_code == 404


def test_a_bad_field_rerenders_the_form_and_stores_nothing(client, app_db, vault_keys):
    account_id, tenant_id = _account(app_db, "https://crm-example.my.salesforce.com")
    client.cookies.set(SESSION_COOKIE, _signed_in(app_db, email="admin@acme.example", role="tenant_admin",
                                                  tenant_id=tenant_id))
    csrf = _csrf(client.get(_url(account_id)).text)
    answer = client.post(_url(account_id), data={"csrf": csrf, "client_secret": "   "})
    assert answer.status_code == 400
    assert "Consumer secret is required" in answer.text and "<form" in answer.text
    assert not re.search(r"name=test value=1 checked", answer.text)  # the unticked box stays unticked
    assert _stored_secret(app_db, account_id) is None


def test_storing_runs_the_connection_test_and_never_echoes_the_secret(
    client, app_db, vault_keys, sandbox_app, caplog
):
    account_id, tenant_id = _account(app_db, sandbox_app.base_url)
    client.cookies.set(SESSION_COOKIE, _signed_in(app_db, email="admin@acme.example", role="tenant_admin",
                                                  tenant_id=tenant_id))
    caplog.set_level(logging.DEBUG)
    csrf = _csrf(client.get(_url(account_id)).text)
    answer = client.post(_url(account_id), data={"csrf": csrf, "client_secret": GOOD_SECRET, "test": "1"})
    assert answer.status_code == 200, answer.text
    assert "Credentials saved" in answer.text and "connection test <b>passed</b>" in answer.text
    assert "integration@bigcorp-emea.example" in answer.text
    for step in ("Reach", "Authenticate", "Api access", "Licenses", "Quota"):
        assert step in answer.text
    assert GOOD_SECRET not in answer.text and GOOD_SECRET not in caplog.text
    assert get_settings().public("/tenant") in answer.text  # the way back to the console
    assert _stored_secret(app_db, account_id) == {"client_secret": GOOD_SECRET}
    with Session(app_db) as s:
        acc = s.get(CrmAccount, account_id)
        assert acc.last_test_ok is True and acc.status == "connected"

    # replacing is allowed, audited, and a wrong secret shows the failing step with its fix
    page = client.get(_url(account_id))
    assert "Saving this form replaces them" in page.text and "Replace credentials" in page.text
    answer = client.post(_url(account_id), data={"csrf": _csrf(page.text), "client_secret": "zz-wrong-zz",
                                                 "test": "1"})
    assert answer.status_code == 200
    assert "Credentials replaced" in answer.text and "connection test <b>failed</b>" in answer.text
    assert "Fix:" in answer.text and "consumer key and secret" in answer.text
    assert "zz-wrong-zz" not in answer.text and "zz-wrong-zz" not in caplog.text
    assert _stored_secret(app_db, account_id) == {"client_secret": "zz-wrong-zz"}
    events = _audit(app_db)
    actions = [e.action for e in events]
    assert "crm_account.credentials.store" in actions and "crm_account.credentials.replace" in actions
    replace = next(e for e in events if e.action == "crm_account.credentials.replace")
    assert replace.actor == "admin@acme.example" and json.loads(replace.details)["secret_fields"] == ["client_secret"]
    everything = " ".join(e.details for e in events)
    assert GOOD_SECRET not in everything and "zz-wrong-zz" not in everything


def test_the_test_is_skipped_when_unticked(client, app_db, vault_keys, sandbox_app):
    account_id, tenant_id = _account(app_db, sandbox_app.base_url)
    client.cookies.set(SESSION_COOKIE, _signed_in(app_db, email="admin@acme.example", role="tenant_admin",
                                                  tenant_id=tenant_id))
    csrf = _csrf(client.get(_url(account_id)).text)
    answer = client.post(_url(account_id), data={"csrf": csrf, "client_secret": GOOD_SECRET})
    assert answer.status_code == 200 and "Run the connection test from the console" in answer.text
    assert _stored_secret(app_db, account_id) == {"client_secret": GOOD_SECRET}
    with Session(app_db) as s:
        assert s.get(CrmAccount, account_id).last_test_at is None
