"""Issue 14 (Low): login CSRF on SAML. An attacker signs in at the IdP through a sign-in they started, keeps
the signed response instead of posting it, and makes a victim's browser post it to the ACS: the victim
must not end up signed in to the attacker's account. SP-initiated answers are bound to the browser that
started the request (a cookie named after the AuthnRequest id, checked at the ACS)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.sso.routes import RELAYED_FIELD
from core.web import SESSION_COOKIE
from tests.core.sso.conftest import CONSOLE, SsoWorld, form_fields
from tests.core.sso.test_round_trip import _sessions


def _victim() -> TestClient:
    from core.sso.routes import routes

    return TestClient(Starlette(routes=routes), base_url=CONSOLE)


def test_captured_response_posted_from_a_victims_browser_signs_nobody_in(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    start = w.console.get("/sso/bigcorp/login", follow_redirects=False)  # the attacker's browser
    assert start.status_code == 302
    action, captured = w.idp_login(start.headers["location"], "admin@bigcorp.example")

    with _victim() as victim:  # an auto-submitting form on the attacker's site, in the victim's browser
        first = victim.post("/sso/bigcorp/acs", data=captured, follow_redirects=False)
        assert SESSION_COOKIE not in first.cookies
        # The cross-site post came without the binding cookie: the ACS re-posts from its own origin...
        relay_action, relay_fields = form_fields(first.text)
        assert relay_action == f"{CONSOLE}/sso/bigcorp/acs" and relay_fields[RELAYED_FIELD] == "1"
        # ...and there the victim's browser has no binding either: refused, nobody signed in.
        second = victim.post("/sso/bigcorp/acs", data=relay_fields, follow_redirects=False)
        assert second.status_code == 403
        assert "not started in this browser" in second.text and SESSION_COOKIE not in second.cookies
        # Forging the relayed marker straight away changes nothing.
        forged = victim.post("/sso/bigcorp/acs", data={**captured, RELAYED_FIELD: "1"}, follow_redirects=False)
        assert forged.status_code == 403 and SESSION_COOKIE not in forged.cookies
    assert _sessions(w) == 0

    # The attack did not burn the request: the browser that started it still finishes its sign-in.
    done = w.post_acs(action, captured)
    assert done.status_code == 303 and done.cookies.get(SESSION_COOKIE)
    assert _sessions(w) == 1


def test_the_starting_browser_finishes_through_the_same_origin_relay(sso_world: SsoWorld) -> None:
    """A real IdP posts cross-site, so the browser leaves the SameSite=Lax binding cookie behind on that
    first post; the relayed same-origin post carries it and signs the user in."""
    w = sso_world
    w.import_idp("bigcorp")
    start = w.console.get("/sso/bigcorp/login?next=/audit", follow_redirects=False)
    binding = {k: v for k, v in w.console.cookies.items() if k.startswith("crmbridge_saml_")}
    assert len(binding) == 1
    cookie = start.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/sso/bigcorp/acs" in cookie
    action, fields = w.idp_login(start.headers["location"], "admin@bigcorp.example")

    w.console.cookies.clear()  # the cross-site POST from the IdP's page
    first = w.post_acs(action, fields)
    assert first.status_code == 200 and SESSION_COOKIE not in first.cookies
    _, relay_fields = form_fields(first.text)
    for name, value in binding.items():  # the same-origin relay: the browser sends its cookie
        w.console.cookies.set(name, value, domain="127.0.0.1", path="/sso/bigcorp/acs")
    done = w.console.post("/sso/bigcorp/acs", data=relay_fields, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"{CONSOLE}/audit"
    assert done.cookies.get(SESSION_COOKIE)
