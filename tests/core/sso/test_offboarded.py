"""Issue 14, medium 5: single sign-on for an offboarded tenant is refused, saying so: a response to a
sign-in started before the offboarding starts no session, and a new sign-in does not start."""

from __future__ import annotations

from sqlmodel import func, select

from core.db import session_scope
from core.tenants.access import Principal
from core.tenants.models import ConsoleSession
from core.tenants.service import set_tenant_status
from core.web import SESSION_COOKIE
from tests.core.sso.conftest import SsoWorld


def _offboard(w: SsoWorld) -> None:
    with session_scope(w.engine) as s:
        set_tenant_status(session=s, principal=Principal(role="staff", email="cs@crmbridge.example"),
                          tenant_id=w.bigcorp.id, status="offboarded")  # type: ignore[arg-type]


def test_sso_sign_in_is_refused_for_an_offboarded_tenant(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    start = w.console.get("/sso/bigcorp/login", follow_redirects=False)
    assert start.status_code == 302
    action, fields = w.idp_login(start.headers["location"], "admin@bigcorp.example")

    _offboard(w)  # between the AuthnRequest and the IdP's answer

    done = w.post_acs(action, fields)
    assert done.status_code == 403, done.text
    assert "BigCorp has been offboarded from CRM Bridge" in done.text
    assert SESSION_COOKIE not in done.cookies
    with w.session() as s:
        assert s.exec(select(func.count()).select_from(ConsoleSession)).one() == 0

    again = w.console.get("/sso/bigcorp/login", follow_redirects=False)
    assert again.status_code == 404
    assert "BigCorp has been offboarded from CRM Bridge" in again.text
