"""HubSpot's app install from the console: the admin stores the app's secret in the secure form, follows
"Install the app" to HubSpot's install page (the sandbox, over real HTTPS), approves, and the callback
adds the install's refresh token to the account's app secret; the connection test then passes as the
installing user."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.connections import routes as provider_routes
from core.connections import service
from core.tenants.access import Principal
from core.web import SESSION_COOKIE
from tests.conftest import make_tenant
from tests.core.connections.test_credentials_route import _audit, _signed_in, _stored_secret

STAFF = Principal(role="staff", email="cs@crmbridge.example")
APP_SECRET = "demo-hubspot-app-secret"  # what the sandbox's crmbridge-hubspot-app accepts
INSTALL_RE = re.compile(r"href='([^']*/install\?csrf=[0-9a-f]{64})'")


@pytest.fixture
def client(app_db: Engine) -> Iterator[TestClient]:
    with TestClient(Starlette(routes=provider_routes.routes), base_url="http://127.0.0.1:8501",
                    follow_redirects=False) as c:
        yield c


def _hubspot_account(engine: Engine, sandbox, slug: str = "hubco") -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with Session(engine, expire_on_commit=False) as s:
        tenant = make_tenant(s, slug)
        acc = service.add_crm_account_settings(
            session=s, principal=STAFF, tenant_id=tenant.id, provider="hubspot", edition="professional",  # type: ignore[arg-type]
            label="HubSpot", auth_mode="oauth_authorization_code",
            values={"instance_url": sandbox.url("/hubspot"), "client_id": "crmbridge-hubspot-app",
                    "authorize_url": sandbox.url("/hubspot/oauth/authorize")})
        s.commit()
        return int(acc.id), int(tenant.id)  # type: ignore[arg-type]


def _save_secret(client: TestClient, account_id: int) -> str:
    """Store the app's secret through the secure form; the result page's HTML."""
    page = client.get(f"/crm-accounts/{account_id}/credentials")
    assert page.status_code == 200 and "Then install the app" in page.text  # the next step is announced
    assert "Test the connection right away" not in page.text  # nothing can pass before the install
    csrf = re.search(r"name=csrf value='([0-9a-f]{64})'", page.text).group(1)  # type: ignore[union-attr]
    saved = client.post(f"/crm-accounts/{account_id}/credentials", data={"csrf": csrf, "client_secret": APP_SECRET})
    assert saved.status_code == 200, saved.text
    return saved.text


def _approve_at_hubspot(sandbox, location: str, user: str = "ivy@hubco.example") -> str:  # type: ignore[no-untyped-def]
    """The admin picks the portal on HubSpot's install page and approves; the callback URL it sends back."""
    assert location.startswith(sandbox.url("/hubspot/oauth/authorize?"))
    page = sandbox.http.get(location)
    assert page.status_code == 200 and "Connect CRM Bridge to HubSpot" in page.text
    form = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    approved = sandbox.http.post("/hubspot/oauth/authorize", data={**form, "portal": "hubco", "user": user,
                                                                   "decision": "approve"})
    assert approved.status_code == 302
    return approved.headers["location"]


def test_admin_installs_the_app_and_the_account_connects_as_the_installer(  # type: ignore[no-untyped-def]
    client, app_db, vault_keys, sandbox_app
) -> None:
    sandbox = sandbox_app
    account_id, tenant_id = _hubspot_account(app_db, sandbox)
    client.cookies.set(SESSION_COOKIE, _signed_in(app_db, email="admin@hubco.example", role="tenant_admin",
                                                  tenant_id=tenant_id))
    result = _save_secret(client, account_id)
    with Session(app_db) as s:  # the secret alone is not enough: the test says the install is missing
        before = service.test_crm_account(session=s, principal=STAFF, account_id=account_id)
        s.commit()
    step = before.failed_step
    assert not before.ok and step is not None and step.name == "configuration"
    assert "install of the app" in step.detail and "Install the app in HubSpot" in step.fix

    install = html.unescape(INSTALL_RE.search(result).group(1))  # type: ignore[union-attr]
    started = client.get(urlsplit(install).path + "?" + urlsplit(install).query)
    assert started.status_code == 303
    back = _approve_at_hubspot(sandbox, started.headers["location"])
    assert back.startswith("http://127.0.0.1:8501/oauth/hubspot/callback?")
    done = client.get(urlsplit(back).path + "?" + urlsplit(back).query)
    assert done.status_code == 200 and "App installed" in done.text and "ivy@hubco.example" in done.text

    stored = _stored_secret(app_db, account_id)
    assert stored is not None and stored["client_secret"] == APP_SECRET and stored["refresh_token"].startswith("na1-")
    assert stored["refresh_token"] not in done.text
    with Session(app_db) as s:
        after = service.test_crm_account(session=s, principal=STAFF, account_id=account_id)
        s.commit()
    assert after.ok and after.identity == "ivy@hubco.example"
    installed = [e for e in _audit(app_db) if e.action == "crm_account.app_installed"]
    assert len(installed) == 1 and installed[0].actor == "admin@hubco.example"  # the real actor, not the system
    assert stored["refresh_token"] not in " ".join(e.details for e in _audit(app_db))

    # The same callback again: the state is used up and nothing changes.
    again = client.get(urlsplit(back).path + "?" + urlsplit(back).query)
    assert again.status_code == 400 and "already completed" in again.text
    assert _stored_secret(app_db, account_id) == stored

    # Replacing the app's secret keeps the install (HubSpot keeps refresh tokens across a new secret).
    page = client.get(f"/crm-accounts/{account_id}/credentials")
    csrf = re.search(r"name=csrf value='([0-9a-f]{64})'", page.text).group(1)  # type: ignore[union-attr]
    assert client.post(f"/crm-accounts/{account_id}/credentials",
                       data={"csrf": csrf, "client_secret": APP_SECRET}).status_code == 200
    assert _stored_secret(app_db, account_id)["refresh_token"] == stored["refresh_token"]  # type: ignore[index]


def test_a_form_error_page_still_offers_a_working_install_link(client, app_db, vault_keys, sandbox_app) -> None:  # type: ignore[no-untyped-def]
    account_id, tenant_id = _hubspot_account(app_db, sandbox_app)
    client.cookies.set(SESSION_COOKIE, _signed_in(app_db, email="admin@hubco.example", role="tenant_admin",
                                                  tenant_id=tenant_id))
    _save_secret(client, account_id)
    expired = client.post(f"/crm-accounts/{account_id}/credentials", data={"csrf": "0" * 64, "client_secret": "x"})
    assert expired.status_code == 403
    install = html.unescape(INSTALL_RE.search(expired.text).group(1))  # type: ignore[union-attr]
    started = client.get(urlsplit(install).path + "?" + urlsplit(install).query)
    assert started.status_code == 303 and started.headers["location"].startswith(
        sandbox_app.url("/hubspot/oauth/authorize?"))


def test_install_link_needs_the_console_session_that_got_it_and_the_app_secret_first(  # type: ignore[no-untyped-def]
    client, app_db, vault_keys, sandbox_app
) -> None:
    account_id, tenant_id = _hubspot_account(app_db, sandbox_app)
    client.cookies.set(SESSION_COOKIE, _signed_in(app_db, email="admin@hubco.example", role="tenant_admin",
                                                  tenant_id=tenant_id))
    assert client.get(f"/crm-accounts/{account_id}/install?csrf=" + "0" * 64).status_code == 403
    install = html.unescape(INSTALL_RE.search(_save_secret(client, account_id)).group(1))  # type: ignore[union-attr]
    path = urlsplit(install).path + "?" + urlsplit(install).query

    # another tenant's admin, even holding this link, is refused; so is a signed-out browser
    with Session(app_db) as s:
        globex = make_tenant(s, "globex")
    client.cookies.set(SESSION_COOKIE, _signed_in(app_db, email="admin@globex.example", role="tenant_admin",
                                                  tenant_id=globex.id))
    assert client.get(path).status_code == 403
    client.cookies.delete(SESSION_COOKIE)
    signed_out = client.get(path)
    assert signed_out.status_code == 303 and "/auth/login" in signed_out.headers["location"]
    assert not [e for e in _audit(app_db) if e.action == "crm_account.app_install.start"]


def test_a_declined_install_stores_nothing_and_says_so(client, app_db, vault_keys, sandbox_app) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_app
    account_id, tenant_id = _hubspot_account(app_db, sandbox)
    client.cookies.set(SESSION_COOKIE, _signed_in(app_db, email="admin@hubco.example", role="tenant_admin",
                                                  tenant_id=tenant_id))
    install = html.unescape(INSTALL_RE.search(_save_secret(client, account_id)).group(1))  # type: ignore[union-attr]
    location = client.get(urlsplit(install).path + "?" + urlsplit(install).query).headers["location"]
    form = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    declined = sandbox.http.post("/hubspot/oauth/authorize", data={**form, "decision": "deny"})
    back = declined.headers["location"]
    answer = client.get(urlsplit(back).path + "?" + urlsplit(back).query)
    assert answer.status_code == 400 and "did not grant access" in answer.text
    assert "refresh_token" not in (_stored_secret(app_db, account_id) or {})
