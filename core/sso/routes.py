"""The SAML SP endpoints beside the console (mounted by server.py through ``st.App(routes=...)``):

    GET  /sso/{tenant}/metadata   the tenant's signed SP metadata
    GET  /sso/{tenant}/login      SP-initiated console sign-in (``?next=/relative/path``)
    GET  /sso/{tenant}/test       start a test login (needs a console session of staff or that tenant's admin)
    GET  /sso/{tenant}/connect    the sign-in a connect link asks of its app user first (``?r=`` sealed)
    POST /sso/{tenant}/acs        the assertion consumer service

Every absolute URL comes from CRMBRIDGE_PUBLIC_URL (core.sso.sp.sp_endpoints), never from the Host
header. Database and crypto work runs in the thread pool, one transaction per request.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from core.db import session_scope
from core.errors import CrmBridgeError, NotFound, SessionInvalid
from core.http_guard import SAML_AUTOSUBMIT_SCRIPT
from core.ratelimit import RateLimiter
from core.settings import get_settings
from core.sso.common import PURPOSE_CONNECT, PURPOSE_TEST, AcsOutcome, tenant_by_slug
from core.sso.connect import CONNECT_PASS_COOKIE, CONNECT_PASS_TTL, start_connect_login
from core.sso.keys import sp_metadata
from core.sso.signin import consume_response, start_login
from core.sso.sp import MAX_RESPONSE_B64, REQUEST_TTL, AuthnStart
from core.sso.testlogin import start_test_login
from core.web import (
    SESSION_COOKIE,
    client_address,
    cross_site,
    csrf_ok,
    csrf_token_for,
    esc,
    html_page,
    set_session_cookie,
)

log = logging.getLogger(__name__)

MAX_ACS_BODY = MAX_RESPONSE_B64 * 2 + 16_384  # form-encoding can double base64's size
# Anonymous ends, per client address and replica: each sign-in start writes a request row, each ACS
# post costs a validation (and its refusals are audited, aggregated in core.sso.signin._noisy_event).
START_LIMIT = RateLimiter(limit=20, window=60)
ACS_LIMIT = RateLimiter(limit=30, window=60)


def _too_many(request: Request, limiter: RateLimiter, *, console: bool = True) -> Response | None:
    verdict = limiter.hit(client_address(request))
    if verdict.allowed:
        return None
    resp = _error_page("Single sign-on", "Too many single sign-on attempts from your network address.",
                       f"Wait {verdict.retry_after} seconds and try again.", 429, console=console)
    resp.headers["Retry-After"] = str(verdict.retry_after)
    return resp


def _error_page(title: str, message: str, fix: str, status: int, *, console: bool = True) -> Response:
    """An error page; ``console`` adds the console's password sign-in (not for an app user on a
    connect link, who has no console account)."""
    body = (f"<h1>{esc(title)}</h1><p class=error role=alert>{esc(message)}</p>"
            + (f"<p>{esc(fix)}</p>" if fix else "")
            + ("<p class=note><a href='/auth/login'>Sign in with a password</a></p>" if console else ""))
    return html_page(title, body, status)


# --- binding a sign-in to the browser that started it (login CSRF) ---------------------------------------
# Sending a browser to the IdP sets a cookie named after the AuthnRequest id holding a MAC of it (path: the
# tenant's ACS). The ACS accepts an answer to that request only from a browser holding the cookie. An IdP
# posts cross-site, where a SameSite=Lax cookie is not sent: then the ACS answers with a form that posts
# the same response again from our own origin (the cookie goes along), marked relayed; a relayed post
# without the cookie is refused.

BINDING_COOKIE_PREFIX = "crmbridge_saml_"
RELAYED_FIELD = "crmbridge_relayed"


def binding_cookie_name(request_id: str) -> str:
    return BINDING_COOKIE_PREFIX + hashlib.sha256(request_id.encode()).hexdigest()[:20]


def binding_value(request_id: str) -> str:
    return csrf_token_for("saml-browser|" + request_id)


def _started_here(request: Request) -> Callable[[str], bool]:
    def check(request_id: str) -> bool:
        return csrf_ok("saml-browser|" + request_id, request.cookies.get(binding_cookie_name(request_id)))
    return check


def _auto_post(action: str, fields: dict[str, str], title: str, button: str) -> Response:
    inputs = "".join(f"<input type=hidden name='{esc(k)}' value='{esc(v)}'>" for k, v in fields.items())
    body = (f"<h1>{esc(title)}</h1><form id=saml method=post action='{esc(action)}'>{inputs}"
            f"<noscript><button type=submit>{esc(button)}</button></noscript></form>"
            f"<script>{SAML_AUTOSUBMIT_SCRIPT}</script>")
    return html_page(title, body)


def _send_to_idp(start: AuthnStart, slug: str) -> Response:
    """Redirect binding: 302 to the IdP. POST binding: an auto-submitting form (POST-only IdPs).
    Either way the browser gets the binding cookie for this request."""
    if not start.form:
        resp: Response = RedirectResponse(start.url, status_code=302)
        resp.headers["Cache-Control"] = "no-store"
    else:
        resp = _auto_post(start.url, start.form, "Signing in…", "Continue to your identity provider")
    resp.set_cookie(binding_cookie_name(start.request_id), binding_value(start.request_id),
                    max_age=int(REQUEST_TTL.total_seconds()), httponly=True, samesite="lax",
                    secure=get_settings().public_url.startswith("https://"), path=f"/sso/{slug}/acs")
    return resp


async def metadata(request: Request) -> Response:
    slug = request.path_params["tenant"]

    def work() -> str:
        with session_scope() as s:
            return sp_metadata(session=s, tenant_slug=slug)

    try:
        xml = await run_in_threadpool(work)
    except NotFound as exc:  # unknown tenant, or no SP keys yet (the message says who generates them)
        text = f"{exc.message} {exc.fix}" if exc.fix else exc.message
        return Response(text, status_code=404, media_type="text/plain")
    return Response(xml, media_type="application/samlmetadata+xml",
                    headers={"Content-Disposition": f'inline; filename="crmbridge-sp-{slug}.xml"'})


async def login(request: Request) -> Response:
    slug = request.path_params["tenant"]
    if (limited := _too_many(request, START_LIMIT)) is not None:
        return limited
    relay = request.query_params.get("next")

    def work() -> AuthnStart:
        with session_scope() as s:
            return start_login(session=s, tenant_slug=slug, relay_state=relay)

    try:
        start = await run_in_threadpool(work)
    except CrmBridgeError as exc:
        return _error_page("Single sign-on", str(exc), "", 404)
    return _send_to_idp(start, slug)


async def test(request: Request) -> Response:
    slug = request.path_params["tenant"]
    token = request.cookies.get(SESSION_COOKIE)
    if cross_site(request):  # a link on another site must not start a test login in an admin's name
        return _error_page("Test login", "This test login was started from another website.",
                           "Start it from the Single sign-on page of the console.", 403)

    def work() -> AuthnStart:
        from core.tenants.auth import principal_from_token

        with session_scope() as s:
            principal = principal_from_token(s, token)
            tenant = tenant_by_slug(s, slug)  # start_test_login checks the principal may act for it
            return start_test_login(session=s, principal=principal, tenant_id=tenant.id)  # type: ignore[arg-type]

    try:
        start = await run_in_threadpool(work)
    except SessionInvalid:
        return RedirectResponse(f"/auth/login?next=/sso/{slug}/test", status_code=303)
    except CrmBridgeError as exc:
        return _error_page("Test login", str(exc), "", 403)
    return _send_to_idp(start, slug)


async def connect_start(request: Request) -> Response:
    slug = request.path_params["tenant"]
    if (limited := _too_many(request, START_LIMIT, console=False)) is not None:
        return limited
    sealed = request.query_params.get("r")

    def work() -> AuthnStart:
        with session_scope() as s:
            return start_connect_login(session=s, tenant_slug=slug, sealed=sealed)

    try:
        start = await run_in_threadpool(work)
    except CrmBridgeError as exc:
        return _error_page("Single sign-on", str(exc), "", 404 if isinstance(exc, NotFound) else 400,
                           console=False)
    return _send_to_idp(start, slug)


async def acs(request: Request) -> Response:
    slug = request.path_params["tenant"]
    if (limited := _too_many(request, ACS_LIMIT)) is not None:
        return limited
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_ACS_BODY):
        return _error_page("Single sign-on", "The SAML response is too large.", "Sign in again.", 413)
    try:
        form = await request.form(max_files=0, max_fields=20, max_part_size=MAX_ACS_BODY)
    except Exception:
        return _error_page("Single sign-on", "The request is not a SAML POST.", "Sign in again.", 400)
    saml_response = form.get("SAMLResponse")
    relay = form.get("RelayState")
    if not isinstance(saml_response, str) or not saml_response:
        return _error_page("Single sign-on", "No SAMLResponse was posted.", "Sign in again from the IdP.", 400)

    relayed = form.get(RELAYED_FIELD) == "1"

    def work() -> AcsOutcome:
        with session_scope() as s:
            return consume_response(session=s, tenant_slug=slug, saml_response=saml_response,
                                    relay_state=relay if isinstance(relay, str) else None,
                                    started_here=_started_here(request),
                                    source=client_address(request))

    try:
        outcome = await run_in_threadpool(work)
    except CrmBridgeError as exc:  # configuration problems (keys), never a bad response
        log.warning("sso: ACS for %s failed: %s", slug, exc)
        return _error_page("Single sign-on", str(exc), "", 500)
    if outcome.code == "other_browser" and not relayed:
        # Posted cross-site (the IdP's page), so the SameSite=Lax binding cookie stayed behind: post the
        # same response again from our own origin, where the browser sends it.
        fields = {"SAMLResponse": saml_response, RELAYED_FIELD: "1"}
        if isinstance(relay, str):
            fields["RelayState"] = relay
        return _auto_post(get_settings().public(f"/sso/{slug}/acs"), fields, "Signing in…", "Continue")
    if outcome.code == "other_browser":
        return _error_page("Single sign-on failed", outcome.message, outcome.fix, 403,
                           console=outcome.purpose != PURPOSE_CONNECT)
    if outcome.purpose == PURPOSE_TEST and outcome.redirect:
        return RedirectResponse(outcome.redirect, status_code=303)
    if outcome.purpose == PURPOSE_CONNECT:
        if not (outcome.ok and outcome.token and outcome.redirect):
            return _error_page("Single sign-on failed", outcome.message, outcome.fix, outcome.status_code or 403,
                               console=False)
        resp = RedirectResponse(outcome.redirect, status_code=303)
        resp.set_cookie(CONNECT_PASS_COOKIE, outcome.token,
                        max_age=int(CONNECT_PASS_TTL.total_seconds()), httponly=True, samesite="lax",
                        secure=get_settings().public_url.startswith("https://"), path="/connect/")
        return resp
    if outcome.ok and outcome.token and outcome.redirect:
        resp = RedirectResponse(outcome.redirect, status_code=303)
        set_session_cookie(resp, outcome.token)
        return resp
    return _error_page("Single sign-on failed", outcome.message, outcome.fix, outcome.status_code or 403)


routes: list[BaseRoute] = [
    Route("/sso/{tenant}/metadata", metadata, methods=["GET"]),
    Route("/sso/{tenant}/login", login, methods=["GET"]),
    Route("/sso/{tenant}/test", test, methods=["GET"]),
    Route("/sso/{tenant}/connect", connect_start, methods=["GET"]),
    Route("/sso/{tenant}/acs", acs, methods=["POST"]),
]
