"""The whole SAML round trip through the real routes: SP metadata → sandbox IdP → signed response →
ACS. Test logins, tenant-admin sign-in, and every way a response must be refused."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from sqlmodel import func, select

from core.clock import aware
from core.sso.lint import lint_metadata
from core.sso.models import SsoConfig, SsoRequest, SsoTrace
from core.tenants.audit import verify_chain
from core.tenants.auth import principal_from_token
from core.tenants.models import AuditEvent, ConsoleSession
from core.web import SESSION_COOKIE
from tests.core.sso.conftest import CONSOLE, SsoWorld


def _sessions(world: SsoWorld) -> int:
    with world.session() as s:
        return int(s.exec(select(func.count()).select_from(ConsoleSession)).one())


def _config(world: SsoWorld) -> SsoConfig:
    with world.session() as s:
        return s.exec(select(SsoConfig).where(SsoConfig.tenant_id == world.bigcorp.id)).one()


def test_full_round_trip_marks_tenant_tested_and_creates_no_session(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    # The SP metadata is signed and names our ACS; the IdP registers the application from it.
    md = w.console.get("/sso/bigcorp/metadata")
    assert md.status_code == 200 and md.headers["content-type"].startswith("application/samlmetadata+xml")
    assert f"{CONSOLE}/sso/bigcorp/acs" in md.text
    assert lint_metadata(md.content).signature == {"present": True, "valid": True, "trusted": None}
    w.idp.register_sp("bigcorp", md.content)
    assert _config(w).tested_at is None

    token = w.token_for("admin@bigcorp.example")
    before = _sessions(w)
    start = w.console.get("/sso/bigcorp/test", cookies={SESSION_COOKIE: token}, follow_redirects=False)
    assert start.status_code == 302
    assert start.headers["location"].startswith("https://sandbox.test/idp/bigcorp/sso?SAMLRequest=")
    action, fields = w.idp_login(start.headers["location"], "admin@bigcorp.example")
    assert action == f"{CONSOLE}/sso/bigcorp/acs"
    done = w.post_acs(action, fields)

    assert done.status_code == 303
    assert done.headers["location"].startswith(f"{CONSOLE}/sso?trace=")
    assert SESSION_COOKIE not in done.cookies  # a test never signs anyone in
    assert _sessions(w) == before
    config = _config(w)
    assert config.tested_at is not None and config.last_test_ok is True
    with w.session() as s:
        trace = s.exec(select(SsoTrace)).one()
    assert trace.ok and trace.source == "test" and trace.name_id == "admin@bigcorp.example"
    assert trace.skew_seconds is not None and abs(trace.skew_seconds) < 60
    assert "samlp:Response" in trace.decoded_xml and "(removed)" in trace.decoded_xml
    names = {c["name"] for c in __import__("json").loads(trace.checks_json)}
    assert {"Safe, well-formed SAML 2.0 Response", "python3-saml strict validation", "Clock skew",
            "Not a replay", "Signature by an IdP signing certificate"} <= names

    # The same response again: the request is used up, nothing changes.
    again = w.post_acs(action, fields)
    assert again.status_code == 403 and "already answered" in again.text


def test_tenant_admin_signs_in_through_sso_with_relative_relay_state(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    start = w.console.get("/sso/bigcorp/login", params={"next": "/tenant?tab=users"}, follow_redirects=False)
    assert start.status_code == 302
    assert parse_qs(urlsplit(start.headers["location"]).query)["RelayState"] == ["/tenant?tab=users"]
    action, fields = w.idp_login(start.headers["location"], "Admin@BigCorp.example")
    done = w.post_acs(action, fields)
    assert done.status_code == 303, done.text
    assert done.headers["location"] == f"{CONSOLE}/tenant?tab=users"
    token = done.cookies.get(SESSION_COOKIE)
    assert token
    set_cookie = done.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie
    with w.session() as s:
        p = principal_from_token(s, token)
        row = s.exec(select(ConsoleSession)).one()
    assert (p.role, p.email, p.tenant_id) == ("tenant_admin", "admin@bigcorp.example", w.bigcorp.id)
    assert row.method == "sso"
    # The ACS writes its session.start event on a lean path (prebuilt statements, no ORM object): it is
    # the event record_event writes, in its place in the tenant's chain, which still verifies end to end.
    with w.session() as s:
        ev = s.exec(select(AuditEvent).where(AuditEvent.action == "session.start")).one()
        assert (ev.actor, ev.actor_role, ev.tenant_id, json.loads(ev.details)) == (
            "admin@bigcorp.example", "tenant_admin", w.bigcorp.id, {"method": "sso"})
        assert ev.occurred_at is not None and abs((aware(ev.occurred_at) - aware(row.created_at)).total_seconds()) < 1
        assert verify_chain(s) == []


def test_absolute_relay_state_is_never_followed(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    start = w.console.get("/sso/bigcorp/login", params={"next": "https://evil.example/phish"},
                          follow_redirects=False)
    assert "RelayState" not in parse_qs(urlsplit(start.headers["location"]).query)
    action, fields = w.idp_login(start.headers["location"], "admin@bigcorp.example")
    fields["RelayState"] = "//evil.example/x"  # tampered on the way back: the stored value wins
    done = w.post_acs(action, fields)
    assert done.status_code == 303 and done.headers["location"] == f"{CONSOLE}/"


def test_staff_leadership_and_other_tenant_admins_are_refused_through_sso(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    for email in ("cs@crmbridge.example", "vp@crmbridge.example", "admin@acme.example", "nobody@bigcorp.example"):
        start = w.console.get("/sso/bigcorp/login", follow_redirects=False)
        action, fields = w.idp_login(start.headers["location"], email)
        done = w.post_acs(action, fields)
        assert done.status_code == 403, email
        assert SESSION_COOKIE not in done.cookies
        assert "not a tenant-admin console account of BigCorp" in done.text
    assert _sessions(w) == 0


def _pending_request(w: SsoWorld, slug: str = "bigcorp") -> str:
    start = w.console.get(f"/sso/{slug}/login", follow_redirects=False)
    assert start.status_code == 302
    with w.session() as s:
        return s.exec(select(SsoRequest).order_by(SsoRequest.id.desc())).first().request_id  # type: ignore[union-attr]


def _response(w: SsoWorld, *, slug: str = "bigcorp", idp_tenant: str | None = None, irt: str | None,
              email: str = "admin@bigcorp.example", **kw: object) -> dict[str, str]:
    from core.sso.sp import sp_endpoints

    ep = sp_endpoints(slug)
    b64 = w.idp.issue_response(idp_tenant or slug, email=email, acs_url=ep.acs_url, audience=ep.entity_id,
                               in_response_to=irt, **kw)  # type: ignore[arg-type]
    return {"SAMLResponse": b64}


def test_unknown_request_id_is_refused(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    r = w.console.post("/sso/bigcorp/acs", data=_response(w, irt="ONELOGIN_never_sent"), follow_redirects=False)
    assert r.status_code == 403 and "did not send" in r.text
    assert _sessions(w) == 0


def test_replayed_response_is_refused(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    data = _response(w, irt=_pending_request(w))
    first = w.console.post("/sso/bigcorp/acs", data=data, follow_redirects=False)
    assert first.status_code == 303 and first.cookies.get(SESSION_COOKIE)
    replay = w.console.post("/sso/bigcorp/acs", data=data, follow_redirects=False)
    assert replay.status_code == 403 and "already answered" in replay.text
    assert _sessions(w) == 1


def test_response_for_another_tenant_is_refused(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    w.import_idp("acme")
    acme_request = _pending_request(w, "acme")
    # acme's IdP answers acme's request, and the response is posted to bigcorp's ACS.
    data = _response(w, slug="acme", irt=acme_request, email="admin@acme.example")
    r = w.console.post("/sso/bigcorp/acs", data=data, follow_redirects=False)
    assert r.status_code == 403 and "another tenant" in r.text
    # A response signed by acme's IdP for bigcorp's own request fails validation (wrong issuer, key).
    data = _response(w, idp_tenant="acme", irt=_pending_request(w))
    r = w.console.post("/sso/bigcorp/acs", data=data, follow_redirects=False)
    assert r.status_code == 403 and "Single sign-on failed" in r.text
    assert _sessions(w) == 0


def test_idp_initiated_response_refused_without_opt_in_and_replay_refused_with_it(sso_world: SsoWorld) -> None:
    from core.db import session_scope
    from core.sso.metadata import set_idp_initiated
    from tests.core.sso.conftest import staff_principal

    w = sso_world
    w.import_idp("bigcorp")
    data = _response(w, irt=None)
    r = w.console.post("/sso/bigcorp/acs", data=data, follow_redirects=False)
    assert r.status_code == 403 and "IdP-initiated sign-in is not enabled" in r.text

    with session_scope(w.engine) as s:
        set_idp_initiated(session=s, principal=staff_principal(), tenant_id=w.bigcorp.id, allowed=True)  # type: ignore[arg-type]
    data = _response(w, irt=None)
    ok = w.console.post("/sso/bigcorp/acs", data={**data, "RelayState": "/audit"}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == f"{CONSOLE}/audit"
    # No request to consume: the replay cache (a unique database key) is what stops a second use.
    replay = w.console.post("/sso/bigcorp/acs", data=data, follow_redirects=False)
    assert replay.status_code == 403 and "already used" in replay.text
    assert _sessions(w) == 1


def test_replay_refused_across_replicas(sso_world: SsoWorld) -> None:
    """Two console replicas (separate apps, one database): the second sees the first's replay key."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from core.db import session_scope
    from core.sso.authn import _settings_cache
    from core.sso.metadata import set_idp_initiated
    from core.sso.routes import routes
    from tests.core.sso.conftest import staff_principal

    w = sso_world
    w.import_idp("bigcorp")
    with session_scope(w.engine) as s:
        set_idp_initiated(session=s, principal=staff_principal(), tenant_id=w.bigcorp.id, allowed=True)  # type: ignore[arg-type]
    data = _response(w, irt=None)
    assert w.console.post("/sso/bigcorp/acs", data=data, follow_redirects=False).status_code == 303
    _settings_cache.clear()  # the other replica has its own process memory
    with TestClient(Starlette(routes=routes), base_url=CONSOLE) as replica:
        r = replica.post("/sso/bigcorp/acs", data=data, follow_redirects=False)
    assert r.status_code == 403 and "already used" in r.text


def test_clock_skew_is_bounded(sso_world: SsoWorld) -> None:
    from datetime import timedelta

    from core.clock import utcnow

    w = sso_world
    w.import_idp("bigcorp")
    # Issued 10 minutes in the future (the IdP's clock is fast), valid for an hour.
    data = _response(w, irt=_pending_request(w), now=utcnow() + timedelta(minutes=10), lifetime=timedelta(hours=1))
    r = w.console.post("/sso/bigcorp/acs", data=data, follow_redirects=False)
    assert r.status_code == 403 and ("clock" in r.text.lower() or "NotBefore" in r.text or "timestamp" in r.text)
    assert _sessions(w) == 0


def test_tampered_and_garbage_posts_are_refused_without_a_crash(sso_world: SsoWorld) -> None:
    import base64

    w = sso_world
    w.import_idp("bigcorp")
    data = _response(w, irt=_pending_request(w))
    xml = base64.b64decode(data["SAMLResponse"]).replace(b"admin@bigcorp.example", b"admin@bigcorp.examplf")
    r = w.console.post("/sso/bigcorp/acs", data={"SAMLResponse": base64.b64encode(xml).decode()},
                       follow_redirects=False)
    assert r.status_code == 403 and "Signature validation failed" in r.text
    for junk in ("not base64 at all!", base64.b64encode(b"<a>").decode(),
                 base64.b64encode(b'<!DOCTYPE a [<!ENTITY x SYSTEM "http://evil.example/">]><a>&x;</a>').decode()):
        r = w.console.post("/sso/bigcorp/acs", data={"SAMLResponse": junk}, follow_redirects=False)
        assert r.status_code == 400, r.text
    assert w.console.post("/sso/nosuchtenant/acs", data=data, follow_redirects=False).status_code == 404
    assert _sessions(w) == 0


def test_test_start_requires_a_console_session_of_that_tenant(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    anon = w.console.get("/sso/bigcorp/test", follow_redirects=False)
    assert anon.status_code == 303 and anon.headers["location"].startswith("/auth/login")
    other = w.console.get("/sso/bigcorp/test", cookies={SESSION_COOKIE: w.token_for("admin@acme.example")},
                          follow_redirects=False)
    assert other.status_code == 403
    staff = w.console.get("/sso/bigcorp/test", cookies={SESSION_COOKIE: w.token_for("cs@crmbridge.example")},
                          follow_redirects=False)
    assert staff.status_code == 302
    from_elsewhere = w.console.get("/sso/bigcorp/test", headers={"Sec-Fetch-Site": "cross-site"},
                                   cookies={SESSION_COOKIE: w.token_for("cs@crmbridge.example")},
                                   follow_redirects=False)
    assert from_elsewhere.status_code == 403 and "Single sign-on page" in from_elsewhere.text


def test_offset_timestamps_are_refused_with_what_is_wrong_and_the_fix(sso_world: SsoWorld) -> None:
    """An IdP writing "+00:00" instead of "Z" (SAML Core §1.3.3 wants UTC with no zone): still refused, but
    the test-login trace names the attributes, the rule, and what the IdP admin changes."""
    import json

    w = sso_world
    w.import_idp("bigcorp")
    w.idp.register_sp("bigcorp", w.console.get("/sso/bigcorp/metadata").content)
    w.idp.offset_timestamps = True
    token = w.token_for("admin@bigcorp.example")
    before = _sessions(w)
    start = w.console.get("/sso/bigcorp/test", cookies={SESSION_COOKIE: token}, follow_redirects=False)
    action, fields = w.idp_login(start.headers["location"], "admin@bigcorp.example")
    done = w.post_acs(action, fields)
    assert done.status_code == 303 and _sessions(w) == before
    with w.session() as s:
        trace = s.exec(select(SsoTrace)).one()
        event = s.exec(select(AuditEvent).where(AuditEvent.action == "sso.test.failed")).one()
    assert json.loads(event.details)["code"] == "timestamp_format"
    error = trace.error or ""
    assert not trace.ok and "+00:00" in error and "UTC" in error and "does not match format" not in error
    assert "NotOnOrAfter" in error and "'Z'" in error
    assert "2026-12-04T10:00:00Z" in error and "test login" in error  # the fix, for the IdP admin
    checks = {c["name"]: c for c in json.loads(trace.checks_json)}
    assert checks["SAML time values in UTC ('Z')"]["ok"] is False
    assert _config(w).last_test_ok is False
