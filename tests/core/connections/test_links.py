"""Connect links end to end through the Starlette routes: GET changes nothing, CSRF, the CRM test and
identity check, consumption, replay, expiry, forgery, lock-out, revoke, the SSO and OAuth hooks."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlmodel import Session, select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.clock import utcnow
from core.connections import links as connect
from core.connections.link_routes import connect_link_routes
from core.connections.links import CredentialCheck, parse_login_secret, same_crm_user
from core.errors import AccessDenied, AuthenticationFailed, InvalidInput, LinkInvalid
from core.tenants.access import Principal
from core.tenants.models import AuditEvent
from core.vault import service
from core.vault.models import VaultConnectLink, VaultCredential
from core.web import csrf_token_for
from tests.conftest import admin_of, make_tenant
from tests.fixtures.vault import make_vault_world

pytestmark = pytest.mark.usefixtures("vault_keys")
STAFF = Principal(role="staff", email="cs@crmbridge.example")
GOOD_PASSWORD = "Corr3ct-Horse!"


class FakeCrm:
    """A credential tester standing in for a provider: one good password per username."""

    def __init__(self) -> None:
        self.logins: dict[str, tuple[str, str]] = {}  # username -> (password, crm user id)
        self.checks: list[CredentialCheck] = []

    def __call__(self, check: CredentialCheck) -> str:
        self.checks.append(check)
        login = check.login
        known = self.logins.get(login.username)
        if known is None or known[0] != login.password.get_secret_value():
            raise AuthenticationFailed("INVALID_LOGIN: Invalid username, password, security token; or user locked out.")
        return known[1]


@pytest.fixture
def crm() -> Iterator[FakeCrm]:
    yield FakeCrm()


@pytest.fixture
def world(app_db):
    with Session(app_db, expire_on_commit=False) as s:
        w = make_vault_world(s, make_tenant(s, "tinyco"))
    return w


@pytest.fixture
def client(app_db, crm) -> TestClient:
    return TestClient(Starlette(routes=connect_link_routes(tester=crm)))


def _link(app_db, world, *, user=0, ttl=timedelta(hours=24), now=None) -> str:
    with Session(app_db) as s:
        url = connect.create_connect_link(s, principal=STAFF, tenant_id=world.tenant.id,
                                          app_user_id=world.users[user].id, crm_account_id=world.account.id,
                                          ttl=ttl, now=now)
        s.commit()
    assert url.startswith("http://127.0.0.1:8501/connect/")
    return url.rsplit("/", 1)[1]


def _csrf(html: str) -> str:
    return re.search(r"name=csrf value='([^']+)'", html).group(1)


def _post(client, token, **form):
    page = client.get(f"/connect/{token}")
    found = re.search(r"name=csrf value='([^']+)'", page.text)
    # a closed link's page has no form: act as a user who opened the page while it was still open
    csrf = found.group(1) if found else csrf_token_for(f"{client.cookies['crmbridge_connect_csrf']}|"
                                                       f"{connect.token_hash(token)}")
    return client.post(f"/connect/{token}", data={"csrf": csrf, "action": "store", **form})


def _events(app_db, action):
    with Session(app_db) as s:
        return s.exec(select(AuditEvent).where(AuditEvent.action == action)).all()


def _creds(app_db):
    with Session(app_db) as s:
        return s.exec(select(VaultCredential)).all()


def test_get_explains_and_changes_nothing(app_db, world, client, crm):
    token = _link(app_db, world)
    for _ in range(2):
        page = client.get(f"/connect/{token}")
        assert page.status_code == 200
        assert page.headers["cache-control"] == "no-store" and page.headers["referrer-policy"] == "no-referrer"
    text = page.text
    assert "user1@tinyco.example" in text and "At most 30 days" in text and "unused for 14 days" in text
    assert "Revoke it now" in text and "security token" in text.lower()
    assert "crmbridge_connect_csrf" in page.headers["set-cookie"] and "samesite=strict" in page.headers[
        "set-cookie"].lower()
    with Session(app_db) as s:
        link = s.exec(select(VaultConnectLink)).one()
        assert link.consumed_at is None and link.token_hash != token and token not in link.token_hash
    assert _creds(app_db) == [] and crm.checks == []
    assert len(_events(app_db, "vault.link.open")) == 2


def test_successful_post_tests_stores_and_consumes(app_db, world, client, crm):
    crm.logins["tom@tinyco.my.salesforce.com"] = (GOOD_PASSWORD, "005TINY00000001AAA")  # 18-char form
    token = _link(app_db, world)
    resp = _post(client, token, username="tom@tinyco.my.salesforce.com", password=GOOD_PASSWORD,
                 security_token="tok123")
    assert resp.status_code == 200 and "Connected" in resp.text
    assert GOOD_PASSWORD not in resp.text and "tok123" not in resp.text
    (check,) = crm.checks
    assert check.expected_crm_user_id == "005TINY00000001" and check.provider == "salesforce"
    (cred,) = _creds(app_db)
    assert (cred.app_user_id, cred.purpose, cred.kind) == (world.users[0].id, "crm-login", "password")
    with Session(app_db) as s:
        with service.use(s, cred.id, principal=STAFF, reason="test") as secret:
            login = parse_login_secret(secret)
        assert login.username == "tom@tinyco.my.salesforce.com"
        assert login.password_with_token.get_secret_value() == GOOD_PASSWORD + "tok123"
        assert s.exec(select(VaultConnectLink)).one().credential_id == cred.id
    store = [e for e in _events(app_db, "vault.credential.store") if e.via == "connect-link"]
    assert store and store[0].actor == "user1@tinyco.example"
    # replay: the link worked once
    again = _post(client, token, username="tom@tinyco.my.salesforce.com", password=GOOD_PASSWORD)
    assert again.status_code == 410 and "already used" in again.text
    assert len(crm.checks) == 1 and len(_creds(app_db)) == 1
    assert "already used" in client.get(f"/connect/{token}").text


def test_post_without_csrf_is_refused(app_db, world, client, crm):
    crm.logins["tom"] = (GOOD_PASSWORD, "005TINY00000001")
    token = _link(app_db, world)
    form = {"action": "store", "username": "tom", "password": GOOD_PASSWORD}
    assert client.post(f"/connect/{token}", data={**form, "csrf": "forged"}).status_code == 403
    page = client.get(f"/connect/{token}")
    client.cookies.clear()  # a cross-site post carries the form but not our SameSite=Strict cookie
    assert client.post(f"/connect/{token}", data={**form, "csrf": _csrf(page.text)}).status_code == 403
    other = _link(app_db, world, user=1)  # a token from one link does not fit another
    page = client.get(f"/connect/{other}")
    assert client.post(f"/connect/{token}", data={**form, "csrf": _csrf(page.text)}).status_code == 403
    assert _creds(app_db) == [] and crm.checks == []
    assert len(_events(app_db, "vault.link.refused")) == 3


def test_wrong_password_and_someone_elses_login_are_refused(app_db, world, client, crm):
    crm.logins["tom"] = (GOOD_PASSWORD, "005TINY00000001")
    crm.logins["uma"] = ("umas-password", "005TINY00000002")
    token = _link(app_db, world)
    bad = _post(client, token, username="tom", password="wrong-password")
    assert bad.status_code == 400 and "did not accept this login" in bad.text and "4 attempt(s) left" in bad.text
    assert "wrong-password" not in bad.text
    other = _post(client, token, username="uma", password="umas-password")  # valid, but Uma's login
    assert other.status_code == 400 and "different Salesforce user than user1@tinyco.example" in other.text
    assert _creds(app_db) == []
    ok = _post(client, token, username="tom", password=GOOD_PASSWORD)  # the link is still open
    assert ok.status_code == 200 and len(_creds(app_db)) == 1
    failed = _events(app_db, "vault.link.test_failed")
    assert [e.details for e in failed] and "AuthenticationFailed" in failed[0].details
    assert "identity_mismatch" in failed[1].details


def test_five_failures_burn_the_link(app_db, world, client, crm):
    token = _link(app_db, world)
    for _ in range(connect.MAX_ATTEMPTS):
        assert _post(client, token, username="tom", password="guess").status_code == 400
    page = client.get(f"/connect/{token}")
    assert page.status_code == 410 and "after 5 failed attempts" in page.text
    assert _post(client, token, username="tom", password="guess").status_code == 410
    assert len(crm.checks) == connect.MAX_ATTEMPTS


def test_expired_link_says_so_and_how_to_get_a_new_one(app_db, world, client, crm):
    crm.logins["tom"] = (GOOD_PASSWORD, "005TINY00000001")
    token = _link(app_db, world, now=utcnow() - timedelta(hours=25))
    page = client.get(f"/connect/{token}")
    assert page.status_code == 410 and "expired" in page.text and "new connect link" in page.text
    assert "Test and store" not in page.text
    assert _post(client, token, username="tom", password=GOOD_PASSWORD).status_code == 410
    assert crm.checks == [] and _creds(app_db) == []


def test_forged_links_are_refused(app_db, world, client, crm):
    token = _link(app_db, world)
    random_part, sig = token.split(".")
    for forged in (f"{random_part}.{'A' * len(sig)}", f"{'B' * len(random_part)}.{sig}", "nothing", "a.b.c"):
        resp = client.get(f"/connect/{forged}")
        assert resp.status_code == 404 and "not valid" in resp.text
    unknown = connect.new_token()  # signed by us, never issued
    assert client.get(f"/connect/{unknown}").status_code == 404
    # a post without our CSRF token is refused before the link is even looked up
    assert client.post(f"/connect/{unknown}", data={"action": "revoke", "csrf": "x"}).status_code == 403


def test_user_revokes_from_the_same_link_even_after_use(app_db, world, client, crm):
    crm.logins["tom"] = (GOOD_PASSWORD, "005TINY00000001")
    token = _link(app_db, world)
    assert _post(client, token, username="tom", password=GOOD_PASSWORD).status_code == 200
    page = client.get(f"/connect/{token}")
    assert page.status_code == 410 and "What we hold now" in page.text
    resp = client.post(f"/connect/{token}", data={"csrf": _csrf(page.text), "action": "revoke"})
    assert resp.status_code == 200 and "no longer holds" in resp.text
    assert _creds(app_db) == []
    (ev,) = [e for e in _events(app_db, "vault.credential.destroy") if e.via == "connect-link"]
    assert ev.actor == "user1@tinyco.example"
    assert "What we hold now" not in client.get(f"/connect/{token}").text
    with Session(app_db) as s:
        states = {c.owner: c.state for c in service.list_credentials(s, principal=STAFF, tenant_id=world.tenant.id)}
    assert states["user1@tinyco.example"] == "reconnect needed"


def test_sso_gate_comes_first(app_db, world, client, crm):
    crm.logins["tom"] = (GOOD_PASSWORD, "005TINY00000001")
    token = _link(app_db, world)
    seen = []
    tenant_has_sso = []

    def gate(req):
        if not tenant_has_sso:
            return None
        seen.append(req)
        return None if req.request.cookies.get("sso_ok") else "http://127.0.0.1:8501/sso/tinyco/login?next=x"

    client = TestClient(Starlette(routes=connect_link_routes(tester=crm, sso_gate=gate)))
    page = client.get(f"/connect/{token}")  # before the tenant has SSO
    tenant_has_sso.append(True)
    resp = client.get(f"/connect/{token}", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"].endswith("/sso/tinyco/login?next=x")
    assert seen[0].app_user_email == "user1@tinyco.example" and seen[0].link_url.endswith(token)
    form = {"csrf": _csrf(page.text), "action": "store", "username": "tom", "password": GOOD_PASSWORD}
    assert client.post(f"/connect/{token}", data=form).status_code == 403
    assert crm.checks == []
    client.cookies.set("sso_ok", "1")
    assert _post(client, token, username="tom", password=GOOD_PASSWORD).status_code == 200


@pytest.fixture
def loopback_crm_allowed(monkeypatch):  # type: ignore[no-untyped-def]
    """The account's loopback "CRM" origin passes the URL policy (as the sandbox's does)."""
    from core.settings import get_settings

    monkeypatch.setenv("CRMBRIDGE_SANDBOX_CA_FILE", __file__)
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_URL", "https://127.0.0.1:1")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_oauth_state_is_bound_to_the_link(app_db, world, client, crm, loopback_crm_allowed):
    """"Sign in with Salesforce" goes straight to the provider's authorize URL (no starter hook), with a
    signed state whose binding is this link."""
    from urllib.parse import parse_qs, urlsplit

    from core.connections.routes import read_state

    password_link = _link(app_db, world, user=1)
    page = client.get(f"/connect/{password_link}").text
    assert "Sign in with Salesforce" not in page and "name=password" in page  # no OAuth app on this account
    with Session(app_db) as s:
        from core.tenants.models import CrmAccount

        acc = s.get(CrmAccount, world.account.id)
        acc.credential_mode = "per_user_oauth"
        acc.settings_json = json.dumps({"auth_mode": "oauth_authorization_code", "client_id": "c"})
        s.add(acc)
        s.commit()
    token = _link(app_db, world)
    page = client.get(f"/connect/{token}").text
    assert "Sign in with Salesforce" in page and "Never your password" in page
    assert "name=password" not in page  # an OAuth account never asks for the password
    resp = client.get(f"/connect/{token}/oauth", follow_redirects=False)
    assert resp.status_code == 303, resp.text
    signed = parse_qs(urlsplit(resp.headers["location"]).query)["state"][0]
    binding = read_state(signed, now=utcnow())["b"]
    assert binding.startswith("link:")
    state = binding.split(":", 1)[1]
    with Session(app_db) as s:
        with pytest.raises(LinkInvalid):
            connect.complete_oauth(s, state=state[:-2] + "xx", secret="refresh-token", crm_user_id="005TINY00000001")
        with pytest.raises(LinkInvalid, match="different"):
            connect.complete_oauth(s, state=state, secret="refresh-token", crm_user_id="005TINY00000002")
    with Session(app_db) as s:
        ref = connect.complete_oauth(s, state=state, secret="refresh-token", crm_user_id="005TINY00000001")
        s.commit()
        assert s.get(VaultCredential, ref.id).kind == "oauth_refresh"
        with pytest.raises(LinkInvalid, match="already used"):  # a replayed callback
            connect.complete_oauth(s, state=state, secret="other-token", crm_user_id="005TINY00000001")
        link_row = s.exec(select(VaultConnectLink)).all()  # the password-account link and this one
        assert sorted(r.failed_attempts for r in link_row) == [0, 1]


def test_links_only_for_per_user_accounts_with_a_crm_identity(app_db, world):
    with Session(app_db) as s:
        api = make_vault_world(s, world.tenant, mode="api_user", label="API org", user_prefix="api")
        with pytest.raises(InvalidInput, match="API user"):
            connect.create_connect_link(s, principal=STAFF, tenant_id=world.tenant.id,
                                        app_user_id=api.users[0].id, crm_account_id=api.account.id)
        with pytest.raises(InvalidInput, match="no CRM user id"):  # user 1 of the API org has no id in this account
            connect.create_connect_link(s, principal=STAFF, tenant_id=world.tenant.id,
                                        app_user_id=api.users[0].id, crm_account_id=world.account.id)
        other = make_tenant(s, "elsewhere")
        with pytest.raises(AccessDenied):
            connect.create_connect_link(s, principal=admin_of(other), tenant_id=world.tenant.id,
                                        app_user_id=world.users[0].id, crm_account_id=world.account.id)
        with pytest.raises(InvalidInput, match="10 minutes to 7 days"):
            connect.create_connect_link(s, principal=STAFF, tenant_id=world.tenant.id, app_user_id=world.users[0].id,
                                        crm_account_id=world.account.id, ttl=timedelta(days=30))
        targets = connect.connect_link_targets(s, principal=admin_of(world.tenant), tenant_id=world.tenant.id)
        assert [(t.email, t.account_label) for t in targets] == [
            ("user1@tinyco.example", "Salesforce"), ("user2@tinyco.example", "Salesforce")]


def test_salesforce_ids_match_in_either_length():
    assert same_crm_user("005TINY00000001", "005TINY00000001AAA")
    assert same_crm_user("005TINY00000001AAA", "005TINY00000001")
    assert not same_crm_user("005TINY00000001", "005tiny00000001AAA")  # case matters in 15-char ids
    assert not same_crm_user("101", "102") and not same_crm_user("101", None) and not same_crm_user("", "")
