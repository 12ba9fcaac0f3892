"""A connect link asks its app user to sign in through the tenant's tested SSO first (the vault's gate,
handed to the link routes by server.py): the real SSO routes, the real connect-link routes and the sandbox IdP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from sqlmodel import Session, select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.connections import links as connect
from core.connections.link_routes import connect_link_routes
from core.sso.connect import CONNECT_PASS_COOKIE
from core.sso.connect_gate import connect_gate
from core.sso.models import SsoConfig, SsoRequest
from core.sso.routes import routes as sso_routes
from core.tenants.access import Principal
from core.tenants.models import AuditEvent
from core.vault.models import VaultCredential
from tests.core.connections.test_links import GOOD_PASSWORD, FakeCrm
from tests.core.sso.conftest import CONSOLE, SANDBOX, SsoWorld
from tests.fixtures.vault import VaultWorld, make_vault_world

STAFF = Principal(role="staff", email="cs@crmbridge.example")


@pytest.fixture
def crm() -> Iterator[FakeCrm]:
    yield FakeCrm()


@pytest.fixture
def people(sso_world: SsoWorld) -> VaultWorld:
    with Session(sso_world.engine, expire_on_commit=False) as s:
        return make_vault_world(s, sso_world.bigcorp)


@pytest.fixture
def browser(sso_world: SsoWorld, crm: FakeCrm) -> Iterator[TestClient]:
    """One app user's browser: the console's SSO and connect-link routes on one origin (shared cookies)."""
    routes = sso_routes + connect_link_routes(tester=crm, sso_gate=connect_gate)  # as server.py builds them
    with TestClient(Starlette(routes=routes), base_url=CONSOLE) as client:
        yield client


def _tested_sso(w: SsoWorld) -> None:
    """Import the sandbox IdP for BigCorp and pass a real test login, as staff do during onboarding."""
    w.import_idp("bigcorp")
    w.idp.register_sp("bigcorp", w.console.get("/sso/bigcorp/metadata").content)
    from core.web import SESSION_COOKIE

    start = w.console.get("/sso/bigcorp/test", cookies={SESSION_COOKIE: w.token_for("admin@bigcorp.example")},
                          follow_redirects=False)
    assert w.post_acs(*w.idp_login(start.headers["location"], "admin@bigcorp.example")).status_code == 303
    with w.session() as s:
        assert s.exec(select(SsoConfig)).one().last_test_ok is True


def _link(w: SsoWorld, people: VaultWorld, user: int = 0) -> str:
    with Session(w.engine) as s:
        url = connect.create_connect_link(s, principal=STAFF, tenant_id=people.tenant.id,  # type: ignore[arg-type]
                                          app_user_id=people.users[user].id,  # type: ignore[arg-type]
                                          crm_account_id=people.account.id)  # type: ignore[arg-type]
        s.commit()
    return url.rsplit("/", 1)[1]


def _sso_round(w: SsoWorld, browser: TestClient, token: str, as_email: str):  # type: ignore[no-untyped-def]
    """Open the link, follow it to the IdP, sign in there as ``as_email``; the ACS's answer."""
    opened = browser.get(f"/connect/{token}", follow_redirects=False)
    assert opened.status_code == 303, opened.text
    gate = opened.headers["location"]
    assert gate.startswith(f"{CONSOLE}/sso/bigcorp/connect?r=") and token not in gate
    to_idp = browser.get(urlsplit(gate).path + "?" + urlsplit(gate).query, follow_redirects=False)
    assert to_idp.status_code == 302 and to_idp.headers["location"].startswith(f"{SANDBOX}/idp/bigcorp/sso?")
    assert token not in to_idp.headers["location"] and "RelayState" not in to_idp.headers["location"]
    action, fields = w.idp_login(to_idp.headers["location"], as_email)
    assert "RelayState" not in fields  # the link's address never went to the IdP
    return browser.post(urlsplit(action).path, data=fields, follow_redirects=False)


def _csrf(html: str) -> str:
    return re.search(r"name=csrf value='([^']+)'", html).group(1)  # type: ignore[union-attr]


def test_no_sso_step_until_the_tenant_has_tested_sso(sso_world, people, browser, crm) -> None:  # type: ignore[no-untyped-def]
    token = _link(sso_world, people)
    sso_world.import_idp("bigcorp")  # imported, not yet tested: users are not sent to an untested IdP
    page = browser.get(f"/connect/{token}", follow_redirects=False)
    assert page.status_code == 200 and "name=password" in page.text


def test_app_user_signs_in_through_sso_then_stores_their_login(sso_world, people, browser, crm) -> None:  # type: ignore[no-untyped-def]
    w = sso_world
    _tested_sso(w)
    crm.logins["user1"] = (GOOD_PASSWORD, "005BIGC00000001")
    token = _link(w, people)

    # Without the SSO step, neither the password form nor the OAuth start is reachable.
    gated_oauth = browser.get(f"/connect/{token}/oauth", follow_redirects=False)
    assert gated_oauth.status_code == 303 and gated_oauth.headers["location"] == f"{CONSOLE}/connect/{token}"
    with w.session() as s:
        assert token not in " ".join(r.relay_state or "" for r in s.exec(select(SsoRequest)).all())

    done = _sso_round(w, browser, token, "user1@bigcorp.example")
    assert done.status_code == 303 and done.headers["location"] == f"{CONSOLE}/connect/{token}"
    assert browser.cookies.get(CONNECT_PASS_COOKIE, path="/connect/")
    with w.session() as s:
        stored = [r.relay_state or "" for r in s.exec(select(SsoRequest)).all()]
    assert stored and all(token not in r for r in stored)  # kept sealed, never in clear

    page = browser.get(f"/connect/{token}", follow_redirects=False)
    assert page.status_code == 200 and "name=password" in page.text
    stored_now = browser.post(f"/connect/{token}", data={"csrf": _csrf(page.text), "action": "store",
                                                         "username": "user1", "password": GOOD_PASSWORD})
    assert stored_now.status_code == 200 and "Connected" in stored_now.text
    with w.session() as s:
        held = s.exec(select(VaultCredential).where(VaultCredential.crm_account_id == people.account.id)).all()
        assert len(held) == 1
        actions = [e.action for e in s.exec(select(AuditEvent)).all()]
    assert "sso.connect.start" in actions and "sso.connect.passed" in actions


def test_signing_in_as_someone_else_is_refused_and_names_who_the_link_is_for(  # type: ignore[no-untyped-def]
    sso_world, people, browser, crm
) -> None:
    w = sso_world
    _tested_sso(w)
    token = _link(w, people)
    done = _sso_round(w, browser, token, "user2@bigcorp.example")
    assert done.status_code == 403
    assert "signed you in as user2@bigcorp.example" in done.text and "for user1@bigcorp.example" in done.text
    assert "Sign out of your company" in done.text and "/auth/login" not in done.text  # app users have no console
    assert not browser.cookies.get(CONNECT_PASS_COOKIE, path="/connect/")
    assert browser.get(f"/connect/{token}", follow_redirects=False).status_code == 303  # still gated
    with w.session() as s:
        refused = s.exec(select(AuditEvent).where(AuditEvent.action == "sso.connect.refused")).one()
    assert "wrong_user" in refused.details and refused.actor == "user1@bigcorp.example"


def test_a_pass_opens_only_its_own_users_links(sso_world, people, browser, crm) -> None:  # type: ignore[no-untyped-def]
    w = sso_world
    _tested_sso(w)
    first, second = _link(w, people, 0), _link(w, people, 1)
    assert _sso_round(w, browser, first, "user1@bigcorp.example").status_code == 303
    assert browser.get(f"/connect/{first}", follow_redirects=False).status_code == 200
    assert browser.get(f"/connect/{second}", follow_redirects=False).status_code == 303  # user2 signs in too
    page = browser.get(f"/connect/{first}")  # the first user's own form, then a post to the second link
    refused = browser.post(f"/connect/{second}", data={"csrf": _csrf(page.text), "action": "store",
                                                       "username": "user2", "password": GOOD_PASSWORD})
    assert refused.status_code == 403 and crm.checks == []


def test_a_damaged_or_foreign_sso_step_is_refused_with_the_fix(sso_world, people, browser, crm) -> None:  # type: ignore[no-untyped-def]
    w = sso_world
    _tested_sso(w)
    gate = browser.get(f"/connect/{_link(w, people)}", follow_redirects=False).headers["location"]
    query = urlsplit(gate).query
    tampered = browser.get(f"/sso/bigcorp/connect?{query[:-6]}AAAAAA", follow_redirects=False)
    assert tampered.status_code == 400 and "Open your connect link again" in tampered.text
    other_tenant = browser.get(f"/sso/acme/connect?{query}", follow_redirects=False)  # sealed for BigCorp only
    assert other_tenant.status_code == 400 and "another company" in other_tenant.text


def test_a_used_link_shows_what_we_hold_and_revokes_only_after_sso(sso_world, people, browser, crm) -> None:  # type: ignore[no-untyped-def]
    """A leaked used link must not let someone else read what we hold or revoke the user's login."""
    w = sso_world
    _tested_sso(w)
    crm.logins["user1"] = (GOOD_PASSWORD, "005BIGC00000001")
    token = _link(w, people)
    assert _sso_round(w, browser, token, "user1@bigcorp.example").status_code == 303
    page = browser.get(f"/connect/{token}")
    csrf = _csrf(page.text)
    assert browser.post(f"/connect/{token}", data={"csrf": csrf, "action": "store", "username": "user1",
                                                   "password": GOOD_PASSWORD}).status_code == 200

    def held() -> int:
        with w.session() as s:
            return len(s.exec(select(VaultCredential).where(
                VaultCredential.crm_account_id == people.account.id, VaultCredential.state == "active")).all())

    browser.cookies.delete(CONNECT_PASS_COOKIE, path="/connect/")  # the pass lapses (or another browser)
    assert browser.get(f"/connect/{token}", follow_redirects=False).status_code == 303  # used link: SSO first
    refused = browser.post(f"/connect/{token}", data={"csrf": csrf, "action": "revoke"})
    assert refused.status_code == 403 and "single sign-on first" in refused.text and held() == 1

    assert _sso_round(w, browser, token, "user1@bigcorp.example").status_code == 303
    page = browser.get(f"/connect/{token}")
    assert page.status_code == 410 and "Revoke it now" in page.text
    revoked = browser.post(f"/connect/{token}", data={"csrf": _csrf(page.text), "action": "revoke"})
    assert revoked.status_code == 200 and "Revoked" in revoked.text and held() == 0


def test_a_failed_later_test_or_a_suspension_does_not_open_links_without_sso(  # type: ignore[no-untyped-def]
    sso_world, people, browser, crm
) -> None:
    w = sso_world
    _tested_sso(w)
    token = _link(w, people)
    with w.session() as s:
        config = s.exec(select(SsoConfig)).one()
        config.last_test_ok = False  # someone cancelled a later test login at the IdP
        s.add(config)
        tenant = s.get(type(w.bigcorp), w.bigcorp.id)
        tenant.status = "suspended"
        s.add(tenant)
        s.commit()
    assert browser.get(f"/connect/{token}", follow_redirects=False).status_code == 303
