"""Plain HTML routes (Starlette, beside the console) for everything that carries a secret: signing in
and out, accepting an invitation, resetting a password, the second-factor step of a sign-in, and TOTP
enrolment. None of these secrets ever passes through Streamlit.

Streamlit cannot set cookies, so sign-in and sign-out create and end the server-side session here and
set the HttpOnly, SameSite=Lax cookie that dashboard.py reads on every rerun.

GETs change nothing (mail scanners open links); every form is protected by a CSRF token bound to
the link, challenge or session it belongs to.
"""

from __future__ import annotations

import logging

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from core.accounts import invitations, mfa, reset
from core.accounts.demo import demo_mfa_note
from core.accounts.service import email_reset_link
from core.accounts.signin import MFA_COOKIE, after_password, clear_mfa_cookie, enrolment_pending, lock_notifier
from core.db import session_scope
from core.errors import Conflict, DeliveryFailed, InvalidInput, LinkInvalid, SessionInvalid, SignInFailed
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
    safe_next,
    set_csrf_cookie,
    set_session_cookie,
)

log = logging.getLogger(__name__)

EXPIRED_FORM = "The form expired or was not sent from this page: reload the page and try again."


def _error(msg: str | None) -> str:
    return f"<p class=error role=alert>{esc(msg)}</p>" if msg else ""


def _password_fields() -> str:
    return """<label for=password>New password (at least 12 characters)</label>
<input id=password name=password type=password autocomplete=new-password required minlength=12 maxlength=1024>
<label for=confirm>Repeat the password</label>
<input id=confirm name=confirm type=password autocomplete=new-password required minlength=12 maxlength=1024>"""


def _check_passwords(form: dict[str, str]) -> str:
    password = form.get("password", "")
    if password != form.get("confirm", ""):
        raise InvalidInput("The two passwords differ: type the same password twice.")
    return password


async def _form(request: Request) -> dict[str, str]:
    data = await request.form()
    return {k: str(v) for k, v in data.items() if isinstance(v, str)}


def _dead_link(message: str) -> Response:
    return html_page("Link not valid", f"<h1>This link cannot be used</h1>{_error(message)}"
                     "<p class=note><a href=/auth/login>Go to the sign-in page</a></p>", 410)


# --- invitations -----------------------------------------------------------------------------------


def _invite_form(token: str, email: str, name: str, error: str | None = None, status: int = 200) -> Response:
    body = f"""<h1>Welcome to CRM Bridge</h1>{_error(error)}
<p>You were invited as <b>{esc(email)}</b>. Choose your password to create your account.</p>
<form method=post action="/auth/invite/{esc(token)}">
<input type=hidden name=csrf value="{csrf_token_for('invite|' + token)}">
<label for=name>Your name</label><input id=name name=name type=text maxlength=200 value="{esc(name)}">
{_password_fields()}<button type=submit>Create my account</button></form>"""
    return html_page("Accept invitation", body, status)


async def invite_get(request: Request) -> Response:
    token = request.path_params["token"]
    try:
        with session_scope() as s:
            inv = invitations.invitation_for_token(s, token)
            return _invite_form(token, inv.email, inv.name)
    except LinkInvalid as exc:
        return _dead_link(str(exc))


async def invite_post(request: Request) -> Response:
    token = request.path_params["token"]
    form = await _form(request)
    try:
        with session_scope() as s:
            inv = invitations.invitation_for_token(s, token)
            email, name = inv.email, form.get("name", "")
    except LinkInvalid as exc:
        return _dead_link(str(exc))
    if not csrf_ok("invite|" + token, form.get("csrf")):
        return _invite_form(token, email, name, EXPIRED_FORM, 400)
    try:
        with session_scope() as s:
            account = invitations.accept_invitation(s, token=token, password=_check_passwords(form), name=name)
            assert account.id is not None
            if mfa.mfa_required(account):
                session_token = auth.start_session(s, account_id=account.id, method=auth.ENROL_ONLY_METHOD,
                                                   lifetime=auth.ENROL_ONLY_LIFETIME)
                location = "/auth/mfa/enrol"
            else:
                session_token = auth.start_session(s, account_id=account.id, method="invite")
                location = "/"
    except LinkInvalid as exc:
        return _dead_link(str(exc))
    except InvalidInput as exc:
        return _invite_form(token, email, name, str(exc), 400)
    resp = RedirectResponse(location, status_code=303)
    set_session_cookie(resp, session_token)
    return resp


# --- sign-in and sign-out ---------------------------------------------------------------------


# Shown on the sign-in page in demo mode only (data/demo/tenants.yaml creates these accounts).
DEMO_ACCOUNTS = (
    ("staff", "cs@crmbridge.example", "Customer success (staff)"),
    ("tenant_admin", "admin@bigcorp.example", "Tenant admin of BigCorp"),
    ("leadership", "vp.sales@crmbridge.example", "Sales leadership"),
)
DEMO_PASSWORD = "demo-password-1234"


def _login_form(error: str | None = None, next_path: str = "/", status: int = 200) -> Response:
    nonce, token = csrf_pair()
    demo = ""
    if get_settings().demo:
        rows = "".join(
            f"<tr><td>{esc(label)}</td><td><code>{esc(email)}</code></td></tr>" for _, email, label in DEMO_ACCOUNTS
        )
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
    with session_scope() as s:
        if enrolment_pending(s, request.cookies.get(SESSION_COOKIE)):
            return RedirectResponse("/auth/mfa/enrol", status_code=303)
    return _login_form(next_path=safe_next(request.query_params.get("next")))


async def login_post(request: Request) -> Response:
    form = await request.form()
    next_path = safe_next(str(form.get("next") or "/"))
    if not csrf_ok(request.cookies.get(CSRF_COOKIE), str(form.get("csrf") or "")):
        return _login_form("The form expired or was not sent from this page: try signing in again.", next_path, 400)
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


# --- password reset --------------------------------------------------------------------------------


def _request_form(message: str | None = None, error: str | None = None, status: int = 200) -> Response:
    nonce, token = csrf_pair()
    done = f"<p class=note role=status>{esc(message)}</p>" if message else ""
    body = f"""<h1>Reset your password</h1>{_error(error)}{done}
<form method=post action="/auth/reset"><input type=hidden name=csrf value="{token}">
<label for=email>Your account's email</label>
<input id=email name=email type=email autocomplete=username required maxlength=254>
<button type=submit>Email me a reset link</button></form>
<p class=note><a href=/auth/login>Back to sign-in</a></p>"""
    resp = html_page("Reset password", body, status)
    set_csrf_cookie(resp, nonce)
    return resp


SENT = ("If an account exists for that address, we emailed it a link to choose a new password. The link "
        "works once, within 1 hour.")


def _send_reset_mail(address: str, url: str) -> None:
    try:
        email_reset_link(address, url)
    except DeliveryFailed as exc:
        log.warning("password reset email not sent: %s", exc.message)


async def reset_request_get(request: Request) -> Response:
    return _request_form()


async def reset_request_post(request: Request) -> Response:
    form = await _form(request)
    if not csrf_ok(request.cookies.get(CSRF_COOKIE), form.get("csrf")):
        return _request_form(error=EXPIRED_FORM, status=400)
    with session_scope() as s:
        found = reset.request_reset(s, email=form.get("email", ""))
    resp = _request_form(message=SENT)
    if found is not None:
        # sent after the answer, so the answer takes the same time whether or not the account exists
        resp.background = BackgroundTask(_send_reset_mail, *found)
    return resp


def _reset_form(token: str, error: str | None = None, status: int = 200) -> Response:
    body = f"""<h1>Choose a new password</h1>{_error(error)}
<form method=post action="/auth/reset/{esc(token)}">
<input type=hidden name=csrf value="{csrf_token_for('reset|' + token)}">{_password_fields()}
<button type=submit>Set the new password</button></form>
<p class=note>Every session of your account ends when the password changes. Two-factor authentication
stays as it is.</p>"""
    return html_page("New password", body, status)


async def reset_get(request: Request) -> Response:
    token = request.path_params["token"]
    try:
        with session_scope() as s:
            reset.link_for_token(s, token)
    except LinkInvalid as exc:
        return _dead_link(str(exc))
    return _reset_form(token)


async def reset_post(request: Request) -> Response:
    token = request.path_params["token"]
    form = await _form(request)
    if not csrf_ok("reset|" + token, form.get("csrf")):
        return _reset_form(token, EXPIRED_FORM, 400)
    try:
        with session_scope() as s:
            reset.complete_reset(s, token=token, password=_check_passwords(form))
    except LinkInvalid as exc:
        return _dead_link(str(exc))
    except InvalidInput as exc:
        return _reset_form(token, str(exc), 400)
    return html_page("Password changed", "<h1>Your password was changed</h1><p>Every session of your account "
                     "has ended.</p><p><a href=/auth/login>Sign in with the new password</a></p>")


# --- second factor at sign-in ----------------------------------------------------------------------


def _mfa_form(token: str, error: str | None = None, status: int = 200) -> Response:
    body = f"""<h1>Two-factor authentication</h1>{_error(error)}
<form method=post action="/auth/mfa"><input type=hidden name=csrf value="{csrf_token_for('mfa|' + token)}">
<label for=code>The 6-digit code from your authenticator app</label>
<input id=code name=code type=text inputmode=numeric autocomplete=one-time-code required maxlength=40 autofocus>
<button type=submit>Continue</button></form>
<p class=note>Lost your device? Enter one of your recovery codes (xxxx-xxxx-xxxx-xxxx) instead, or ask an
admin to reset your two-factor authentication.</p>"""
    return html_page("Second factor", body, status)


def _step_over(message: str) -> Response:
    resp = html_page("Sign in again", f"<h1>Sign in again</h1>{_error(message)}"
                     "<p><a href=/auth/login>Go to the sign-in page</a></p>", 401)
    clear_mfa_cookie(resp)
    return resp


async def mfa_get(request: Request) -> Response:
    token = request.cookies.get(MFA_COOKIE)
    try:
        with session_scope() as s:
            mfa.open_challenge(s, token)
    except SessionInvalid as exc:
        return _step_over(str(exc))
    assert token is not None
    return _mfa_form(token)


async def mfa_post(request: Request) -> Response:
    token = request.cookies.get(MFA_COOKIE)
    form = await _form(request)
    if not token:
        return _step_over(mfa.EXPIRED_STEP)
    if not csrf_ok("mfa|" + token, form.get("csrf")):
        return _mfa_form(token, EXPIRED_FORM, 400)
    try:
        with session_scope() as s:
            verified = mfa.verify_challenge(s, token=token, code=form.get("code", ""))
            assert verified.account.id is not None
            session_token = auth.start_session(s, account_id=verified.account.id, method=verified.method)
    except SignInFailed as exc:
        return _mfa_form(token, str(exc), 401)
    except SessionInvalid as exc:
        return _step_over(str(exc))
    resp = RedirectResponse(safe_next(verified.next_path), status_code=303)
    set_session_cookie(resp, session_token)
    clear_mfa_cookie(resp)
    return resp


# --- enrolment -------------------------------------------------------------------------------------


def _enrol_binding(session_token: str) -> str:
    return "mfa-enrol|" + session_token[:16]


def _code_form(action: str, session_token: str, label: str, button: str) -> str:
    return f"""<form method=post action="{action}">
<input type=hidden name=csrf value="{csrf_token_for(_enrol_binding(session_token))}">
<label for=code>{esc(label)}</label>
<input id=code name=code type=text inputmode=numeric autocomplete=one-time-code required maxlength=10>
<button type=submit>{esc(button)}</button></form>"""


def _not_signed_in(message: str) -> Response:
    return html_page("Sign in first", f"<h1>Sign in first</h1>{_error(message)}"
                     "<p><a href=/auth/login>Go to the sign-in page</a></p>", 401)


def _codes_html(codes: list[str]) -> str:
    items = "".join(f"<li><code>{esc(c)}</code></li>" for c in codes)
    return (f"<p><b>Your recovery codes</b> — each works once, in place of a code from the app. Keep them "
            f"somewhere safe now: they are shown only this once.</p><ul>{items}</ul>")


async def enrol_get(request: Request) -> Response:
    session_token = request.cookies.get(SESSION_COOKIE)
    try:
        with session_scope() as s:
            _row, account = auth.session_from_token(s, session_token)
            assert session_token is not None
            if mfa.has_active_factor(s, account.id):  # type: ignore[arg-type]
                left = mfa.recovery_codes_left(s, account.id)  # type: ignore[arg-type]
                body = (f"<h1>Two-factor authentication is on</h1><p>{esc(account.email)} signs in with a code "
                        f"from an authenticator app. Recovery codes left: <b>{left}</b>.</p>"
                        + _code_form("/auth/mfa/recovery-codes", session_token,
                                     "To replace your recovery codes, enter a code from your app",
                                     "Make new recovery codes")
                        + "<p class=note><a href=/>Back to the console</a></p>")
                return html_page("Two-factor authentication", body)
            enrolment = mfa.begin_enrolment(s, account=account)
    except SessionInvalid as exc:
        return _not_signed_in(str(exc))
    qr = enrolment.qr_svg()
    qr_html = f"<div aria-label='QR code'>{qr}</div>" if qr else ""
    required = " Staff accounts must have it before the console opens." if mfa.mfa_required(account) else ""
    body = f"""<h1>Set up two-factor authentication</h1>
<p>Scan this code with an authenticator app (any TOTP app), or type the key below into it.{esc(required)}</p>
{qr_html}<p>Key: <code>{esc(enrolment.grouped)}</code></p>
<p class=note>This key is shown once: reloading this page makes a new one.</p>
{_code_form("/auth/mfa/enrol", session_token, "Then enter the 6-digit code the app shows", "Turn on")}"""
    return html_page("Two-factor authentication", body)


async def enrol_post(request: Request) -> Response:
    session_token = request.cookies.get(SESSION_COOKIE)
    form = await _form(request)
    if not session_token:
        return _not_signed_in("You are not signed in: open /auth/login to sign in.")
    retry = _code_form("/auth/mfa/enrol", session_token, "Enter the 6-digit code the app shows now", "Turn on")
    if not csrf_ok(_enrol_binding(session_token), form.get("csrf")):
        return html_page("Two-factor authentication", _error(EXPIRED_FORM) + retry, 400)
    try:
        with session_scope() as s:
            row, account = auth.session_from_token(s, session_token)
            codes = mfa.confirm_enrolment(s, account=account, code=form.get("code", ""))
            new_token = None
            if row.method not in auth.MFA_METHODS:  # upgrade: a session earned with both factors
                auth.end_session(s, session_token)
                new_token = auth.start_session(s, account_id=account.id, method=mfa.TOTP_METHOD)  # type: ignore[arg-type]
    except SessionInvalid as exc:
        return _not_signed_in(str(exc))
    except InvalidInput as exc:
        return html_page("Two-factor authentication", "<h1>Set up two-factor authentication</h1>"
                         + _error(str(exc)) + retry
                         + "<p class=note><a href=/auth/mfa/enrol>Start again with a new key</a></p>", 400)
    body = ("<h1>Two-factor authentication is on</h1>" + _codes_html(codes)
            + "<p><a href=/>Continue to the console</a></p>")
    resp = html_page("Two-factor authentication", body)
    if new_token:
        set_session_cookie(resp, new_token)
    return resp


async def recovery_codes_post(request: Request) -> Response:
    session_token = request.cookies.get(SESSION_COOKIE)
    form = await _form(request)
    if not session_token or not csrf_ok(_enrol_binding(session_token), form.get("csrf")):
        return html_page("Recovery codes", _error(EXPIRED_FORM) + "<p><a href=/auth/mfa/enrol>Back</a></p>", 400)
    try:
        with session_scope() as s:
            row, account = auth.session_from_token(s, session_token)
            if row.method == auth.ENROL_ONLY_METHOD:
                raise SessionInvalid(auth.ENROL_FIRST)
            codes = mfa.regenerate_recovery_codes(s, account=account, code=form.get("code", ""))
    except SessionInvalid as exc:
        return _not_signed_in(str(exc))
    except (InvalidInput, Conflict) as exc:
        return html_page("Recovery codes", _error(str(exc)) + "<p><a href=/auth/mfa/enrol>Back</a></p>", 400)
    return html_page("Recovery codes", "<h1>New recovery codes</h1><p>The old codes no longer work.</p>"
                     + _codes_html(codes) + "<p><a href=/>Back to the console</a></p>")


routes: list[BaseRoute] = [
    Route("/auth/login", login_get, methods=["GET"]),
    Route("/auth/login", login_post, methods=["POST"]),
    Route("/auth/logout", logout_get, methods=["GET"]),
    Route("/auth/logout", logout_post, methods=["POST"]),
    Route("/auth/invite/{token}", invite_get, methods=["GET"]),
    Route("/auth/invite/{token}", invite_post, methods=["POST"]),
    Route("/auth/reset", reset_request_get, methods=["GET"]),
    Route("/auth/reset", reset_request_post, methods=["POST"]),
    Route("/auth/reset/{token}", reset_get, methods=["GET"]),
    Route("/auth/reset/{token}", reset_post, methods=["POST"]),
    Route("/auth/mfa", mfa_get, methods=["GET"]),
    Route("/auth/mfa", mfa_post, methods=["POST"]),
    Route("/auth/mfa/enrol", enrol_get, methods=["GET"]),
    Route("/auth/mfa/enrol", enrol_post, methods=["POST"]),
    Route("/auth/mfa/recovery-codes", recovery_codes_post, methods=["POST"]),
]
