"""Sign-in and sign-out routes (Starlette, beside the console) and /healthz.

Streamlit cannot set cookies, so these routes create and end the server-side session and set the
HttpOnly, SameSite=Lax cookie that dashboard.py reads on every rerun. The password never passes
through Streamlit.
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from core.db import get_engine, session_scope
from core.errors import SessionInvalid, SignInFailed
from core.settings import get_settings
from core.tenants import auth
from core.web import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    clear_session_cookie,
    client_address,
    csrf_ok,
    csrf_pair,
    csrf_token_for,
    esc,
    html_page,
    set_csrf_cookie,
)

log = logging.getLogger(__name__)

# Shown on the sign-in page in demo mode only (data/demo/tenants.yaml creates these accounts).
DEMO_ACCOUNTS = (
    ("staff", "cs@crmbridge.example", "Customer success (staff)"),
    ("tenant_admin", "admin@bigcorp.example", "Tenant admin of BigCorp"),
    ("leadership", "vp.sales@crmbridge.example", "Sales leadership"),
)
DEMO_PASSWORD = "demo-password-1234"


def safe_next(value: str | None) -> str:
    """Only relative paths on this server (no scheme, no //host) may follow a sign-in."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _login_form(error: str | None = None, next_path: str = "/", status: int = 200) -> Response:
    nonce, token = csrf_pair()
    demo = ""
    if get_settings().demo:
        rows = "".join(
            f"<tr><td>{esc(label)}</td><td><code>{esc(email)}</code></td></tr>" for _, email, label in DEMO_ACCOUNTS
        )
        from core.accounts.demo import demo_mfa_note

        demo = (f"<p class=note><b>Demo mode.</b> Every demo account's password is "
                f"<code>{DEMO_PASSWORD}</code>.</p><table>{rows}</table>{demo_mfa_note()}")
    err = f"<p class=error role=alert>{esc(error)}</p>" if error else ""
    body = f"""<h1>Sign in to CRM Bridge</h1>{err}
<form method=post action="/auth/login">
<input type=hidden name=csrf value="{token}"><input type=hidden name=next value="{esc(next_path)}">
<label for=email>Email</label><input id=email name=email type=email autocomplete=username required maxlength=254>
<label for=password>Password</label>
<input id=password name=password type=password autocomplete=current-password required maxlength=1024>
<button type=submit>Sign in</button></form>
<p class=note><a href="/auth/reset">Forgot your password?</a></p>
<p class=note>Tenant admins whose company uses single sign-on can sign in through it at
<code>/sso/&lt;tenant&gt;/login</code>.</p>{demo}"""
    resp = html_page("Sign in", body, status)
    set_csrf_cookie(resp, nonce)
    return resp


async def login_get(request: Request) -> Response:
    from core.accounts.signin import enrolment_pending

    with session_scope() as s:
        if enrolment_pending(s, request.cookies.get(SESSION_COOKIE)):
            return RedirectResponse("/auth/mfa/enrol", status_code=303)
    return _login_form(next_path=safe_next(request.query_params.get("next")))


async def login_post(request: Request) -> Response:
    form = await request.form()
    next_path = safe_next(str(form.get("next") or "/"))
    if not csrf_ok(request.cookies.get(CSRF_COOKIE), str(form.get("csrf") or "")):
        return _login_form("The form expired or was not sent from this page: try signing in again.", next_path, 400)
    from core.accounts.signin import after_password, lock_notifier

    try:
        with session_scope() as s:
            account = auth.authenticate(
                s, email=str(form.get("email") or ""), password=str(form.get("password") or ""),
                address=client_address(request), on_lock=lock_notifier(),
            )
            # second factor, enrolment-only session (staff not enrolled yet) or a console session
            resp = after_password(s, account=account, next_path=next_path)
    except SignInFailed as exc:
        return _login_form(str(exc), next_path, 401)
    resp.delete_cookie(CSRF_COOKIE, path="/")
    return resp


def _logout_binding(token: str) -> str:
    return "logout|" + token[:16]


async def logout_get(request: Request) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return RedirectResponse("/auth/login", status_code=303)
    body = f"""<h1>Sign out</h1><p>End your CRM Bridge session on this browser?</p>
<form method=post action="/auth/logout"><input type=hidden name=csrf value="{csrf_token_for(_logout_binding(token))}">
<button type=submit>Sign out</button></form><p class=note><a href="/">Back to the console</a></p>"""
    return html_page("Sign out", body)


async def logout_post(request: Request) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    form = await request.form()
    if token and not csrf_ok(_logout_binding(token), str(form.get("csrf") or "")):
        msg = "<p class=error>The sign-out form expired: <a href=/auth/logout>try again</a>.</p>"
        return html_page("Sign out", msg, 400)
    with session_scope() as s:
        auth.end_session(s, token)
    resp = RedirectResponse("/auth/login", status_code=303)
    clear_session_cookie(resp)
    return resp


async def healthz(request: Request) -> Response:
    """ok only when the database answers AND accepts a write (the probe row is rewritten and
    committed); otherwise 503 naming what failed."""
    from starlette.concurrency import run_in_threadpool

    from core.clock import utcnow
    from core.db import describe_db_failure
    from core.tenants.models import HealthProbe

    def check() -> tuple[str, str | None]:
        try:
            with get_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - health reports any database failure
            return "unreachable", describe_db_failure(exc) or type(exc).__name__
        try:
            with session_scope() as s:
                probe = s.get(HealthProbe, 1) or HealthProbe(id=1, checked_at=utcnow())
                probe.checked_at, probe.checks = utcnow(), probe.checks + 1
                s.add(probe)
        except Exception as exc:  # noqa: BLE001
            return "write_failed", describe_db_failure(exc) or f"the database refused a write ({type(exc).__name__})"
        return "ok", None

    state, error = await run_in_threadpool(check)
    if state != "ok":
        log.warning("healthz: database %s: %s", state, error)
        return JSONResponse({"status": "error", "database": state, "error": error}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})


def principal_from_request(request: Request):  # type: ignore[no-untyped-def]
    """For other routes: the console principal of this request, or None."""
    token = request.cookies.get(SESSION_COOKIE)
    try:
        with session_scope() as s:
            return auth.principal_from_token(s, token)
    except SessionInvalid:
        return None


routes: list[BaseRoute] = [
    Route("/auth/login", login_get, methods=["GET"]),
    Route("/auth/login", login_post, methods=["POST"]),
    Route("/auth/logout", logout_get, methods=["GET"]),
    Route("/auth/logout", logout_post, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
]
