"""Connect-link pages, served beside the console (outside its sign-in): ``GET/POST /connect/{token}``
and ``GET /connect/{token}/oauth``.

Plain HTML forms: the secret goes from the form straight into the vault and never passes through
Streamlit widgets or session state. Every form carries a CSRF token bound to the link and to a
cookie set with the page (SameSite=Strict, path /connect/). Pages are never cached and send no
referrer (the token is in the URL). Every absolute URL comes from CRMBRIDGE_PUBLIC_URL.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from core.clock import utcnow
from core.connections import links as connect
from core.connections.links import CredentialTester, LinkView, SubmitResult
from core.db import session_scope
from core.errors import ConfigurationError, CrmBridgeError, InvalidInput, LinkInvalid, NotFound
from core.providers.catalog import FieldSpec, get_catalog
from core.settings import get_settings
from core.web import csrf_ok, csrf_token_for, esc, html_page

log = logging.getLogger("crmbridge.connections.link_routes")

CSRF_COOKIE = "crmbridge_connect_csrf"
MAX_BODY = 16 * 1024


@dataclass(frozen=True)
class SsoGateRequest:
    tenant_id: int
    app_user_id: int
    app_user_email: str
    link_url: str
    request: Request  # its cookies, for a gate that checks an SSO session


# Where the tenant has tested SSO: the sign-in URL the link's user must pass first (coming back to
# ``link_url``), or None to proceed. server.py passes core.sso's gate to ``connect_link_routes``.
SsoGate = Callable[[SsoGateRequest], "str | None"]


def _crm(view: LinkView) -> str:
    """The CRM's display name, from the catalog."""
    try:
        return get_catalog().provider(view.provider).name
    except NotFound:
        return view.provider


def _crm_host(view: LinkView) -> str:
    """The CRM host the user's login goes to (host, and port when not the default), as the page shows it."""
    try:
        parts = urlsplit(view.instance_url or "")
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "an invalid address"
    default = 443 if parts.scheme == "https" else 80
    return f"{host}:{port}" if port and port != default else host or "an unknown address"


def _binding(nonce: str, token: str) -> str:
    return f"{nonce}|{connect.token_hash(token)}"


def _page(title: str, body: str, *, token: str | None = None, status: int = 200) -> Response:
    """An HTML page; with ``token`` its forms get a fresh CSRF token and the matching cookie."""
    nonce = secrets.token_urlsafe(24)
    csrf = csrf_token_for(_binding(nonce, token)) if token else ""
    resp = html_page(title, body.replace("{csrf}", esc(csrf)), status_code=status)
    resp.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'unsafe-inline'; form-action {_origin()}; frame-ancestors 'none'"
    )
    if token:
        resp.set_cookie(CSRF_COOKIE, nonce, max_age=3600, httponly=True, samesite="strict",
                        secure=get_settings().public_url.startswith("https://"), path="/connect/")
    return resp


def _origin() -> str:
    url = get_settings().public_url.rstrip("/")
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _when(dt: datetime | None) -> str:
    return f"{dt:%Y-%m-%d %H:%M} UTC" if dt else "—"


def _revoke_form(view: LinkView, action: str) -> str:
    if view.held is None:
        return ""
    return (
        f"<h2>What we hold now</h2><p>Your {esc(_crm(view))} login for <b>{esc(view.account_label)}</b>, stored "
        f"{esc(_when(view.held.stored_at))}, self-destructs by {esc(_when(view.held.ends_at))} at the latest.</p>"
        f"<form method=post action='{esc(action)}'><input type=hidden name=csrf value='{{csrf}}'>"
        "<input type=hidden name=action value=revoke><button type=submit>Revoke it now</button></form>"
    )


def _explain(view: LinkView) -> str:
    p = view.policy
    crm = esc(_crm(view))
    if view.mode == "per_user_oauth":
        return (
            f"<p><b>{esc(view.tenant_name)}</b> uses CRM Bridge to sync your opportunities with "
            f"<b>{esc(view.account_label)}</b> ({crm}). CRM Bridge acts in {crm} as you, with your consent.</p>"
            "<h2>What will be stored</h2><ul>"
            f"<li>Never your password: you sign in at {crm} itself (<b>{esc(_crm_host(view))}</b>) and approve "
            f"access. {crm} then gives CRM "
            f"Bridge a token, encrypted with a key that belongs to {esc(view.tenant_name)} alone.</li>"
            f"<li>The sign-in must be yours ({esc(view.user_email)}).</li></ul>"
            "<h2>For how long</h2><ul>"
            f"<li>At most {p.oauth_ttl_days} days; then you will be asked again.</li>"
            f"<li>It self-destructs earlier: the first time {crm} rejects it, when unused for {p.idle_days} days, "
            "or when you or your admin revoke it. You can also revoke the app's access in your "
            f"{crm} settings.</li></ul>"
            "<h2>How to revoke</h2><p>Open this link again at any time and press <b>Revoke it now</b>, or ask your "
            "admin.</p>"
        )
    return (
        f"<p><b>{esc(view.tenant_name)}</b> uses CRM Bridge to sync your opportunities with "
        f"<b>{esc(view.account_label)}</b> ({crm}). Your company has no spare API user there, so CRM Bridge "
        f"acts in {crm} with your own login.</p>"
        "<h2>What will be stored</h2><ul>"
        f"<li>Your {crm} username and password (and security token, if you give one), encrypted with a key that "
        f"belongs to {esc(view.tenant_name)} alone. Nobody at CRM Bridge can read them.</li>"
        f"<li>We test them once against {crm} first; they must log in as you ({esc(view.user_email)}).</li></ul>"
        "<h2>For how long</h2><ul>"
        f"<li>At most {p.password_ttl_days} days; then you will be asked again.</li>"
        f"<li>They self-destruct earlier: the first time {crm} rejects them (for example after you change your "
        f"password), when unused for {p.idle_days} days, when you or your admin revoke them, or when your company "
        "moves to an API user.</li></ul>"
        "<h2>How to revoke</h2><p>Open this link again at any time and press <b>Revoke it now</b>, or ask your "
        "admin.</p>"
    )


_FALLBACK_FIELDS = (FieldSpec(name="username", type="string", title="Username", level="user"),
                    FieldSpec(name="password", type="password", title="Password", secret=True, level="user"))
_AUTOCOMPLETE = {"username": "username", "password": "current-password"}
_MAX_LENGTH = {"username": 254, "password": 1024}


def _user_fields(view: LinkView) -> tuple[FieldSpec, ...]:
    """What a user enters for this account: its catalog auth mode's ``user_fields`` (no CRM named here)."""
    try:
        entry = get_catalog().provider(view.provider)
        mode = str(json.loads(view.settings_json or "{}").get("auth_mode") or "")
    except (ValueError, AttributeError, NotFound):
        return _FALLBACK_FIELDS
    # the account's auth mode; for an account that names none, the catalog's mode for its credential mode
    spec = next((m for m in entry.auth_modes if m.mode == mode), None) or next(
        (m for m in entry.auth_modes if m.credential_mode == view.mode), None)
    return tuple(spec.user_fields) if spec is not None and spec.user_fields else _FALLBACK_FIELDS


def _field_html(f: FieldSpec) -> str:
    kind = "password" if f.secret else "text"
    auto = _AUTOCOMPLETE.get(f.name, "off")
    label = f.title + ("" if f.required else " (optional)")
    help_ = f"<p class=note>{esc(f.help)}</p>" if f.help else ""
    return (f"<label for={esc(f.name)}>{esc(label)}</label>"
            f"<input type={kind} id={esc(f.name)} name={esc(f.name)} autocomplete={auto}"
            f"{' required' if f.required else ''} maxlength={_MAX_LENGTH.get(f.name, 256)}>" + help_)


def _form(view: LinkView, token: str, *, error: str = "") -> str:
    action = get_settings().public(f"/connect/{token}")
    crm = esc(_crm(view))
    oauth = (f"<p><a href='{esc(get_settings().public(f'/connect/{token}/oauth'))}'>Sign in with {crm} "
             "instead</a></p>" if view.oauth else "")
    if view.oauth and view.mode == "per_user_oauth":
        return (
            (f"<p class=error>{esc(error)}</p>" if error else "")
            + f"<p><a class=button href='{esc(get_settings().public(f'/connect/{token}/oauth'))}'>"
            f"<button type=button>Sign in with {crm}</button></a></p>"
            + f"<p class=note>This link works once and expires {esc(_when(view.expires_at))}.</p>"
        )
    return (
        (f"<p class=error>{esc(error)}</p>" if error else "")
        + f"<form method=post action='{esc(action)}'><input type=hidden name=csrf value='{{csrf}}'>"
        "<input type=hidden name=action value=store>"
        f"<p class=note>Your login goes to <b>{esc(_crm_host(view))}</b>, the {crm} address set for "
        f"{esc(view.account_label)}. Enter your password only if this is your company's {crm} address.</p>"
        + "".join(_field_html(f) for f in _user_fields(view))
        + "<button type=submit>Test and store</button></form>"
        + oauth
        + f"<p class=note>This link works once and expires {esc(_when(view.expires_at))}.</p>"
    )


def _link_page(view: LinkView, token: str, *, error: str = "", status: int = 200) -> Response:
    action = get_settings().public(f"/connect/{token}")
    title = f"Connect {_crm(view)} for {view.user_name}"
    if view.is_open:
        body = f"<h1>{esc(title)}</h1>" + _explain(view) + _form(view, token, error=error)
    else:
        status = 410 if status == 200 else status
        body = (f"<h1>{esc(title)}</h1>" + (f"<p class=error>{esc(error)}</p>" if error else "")
                + f"<p class=error>{esc(connect.closed_message(view))}</p>")
    return _page(title, body + _revoke_form(view, action), token=token, status=status)


def _invalid(message: str, status: int = 404) -> Response:
    return _page("Connect link", f"<h1>This link cannot be used</h1><p class=error>{esc(message)}</p>",
                 status=status)


def _gate(gate: SsoGate | None, view: LinkView, token: str, request: Request) -> str | None:
    if gate is None:
        return None
    return gate(SsoGateRequest(tenant_id=view.tenant_id, app_user_id=view.app_user_id, app_user_email=view.user_email,
                               link_url=get_settings().public(f"/connect/{token}"), request=request))


def _get(gate: SsoGate | None, request: Request, token: str, now: datetime) -> Response:
    try:
        with session_scope() as s:
            view = connect.open_link(s, token, now=now)
    except LinkInvalid as exc:
        return _invalid(str(exc))
    # SSO first, for a used or expired link too: its page shows what we hold and offers to revoke it
    redirect = _gate(gate, view, token, request)
    if redirect:
        return RedirectResponse(redirect, status_code=303)
    return _link_page(view, token)


def _refused(token: str, reason: str, now: datetime) -> None:
    try:
        with session_scope() as s:
            connect.refuse(s, token, reason=reason, now=now)
    except LinkInvalid:
        pass


def _post(gate: SsoGate | None, tester: CredentialTester | None, request: Request, token: str,
          form: dict[str, str], now: datetime) -> Response:
    if not connect.authentic(token):
        return _invalid(connect.FORGED)
    nonce = request.cookies.get(CSRF_COOKIE)
    if not nonce or not csrf_ok(_binding(nonce, token), form.get("csrf")):
        _refused(token, "csrf", now)
        return _page("Connect link", "<h1>Please try again</h1><p class=error>This form expired or was sent from "
                     "another site. Open your connect link again and resubmit.</p>", status=403)
    action = form.get("action")
    if action not in ("revoke", "store"):
        return _invalid("Unknown action: use the buttons on the connect page.", status=400)
    try:
        with session_scope() as s:
            view = connect.open_link(s, token, now=now, audit=False)
    except LinkInvalid as exc:
        return _invalid(str(exc))
    # SSO first: to revoke from any link (its page says what we hold), to store through an open one
    if (action == "revoke" or view.is_open) and _gate(gate, view, token, request):
        _refused(token, "sso", now)
        return _invalid("Sign in with your company's single sign-on first: open your connect link again.", 403)
    if action == "revoke":
        try:
            with session_scope() as s:
                held = connect.revoke_via_link(s, token, now=now)
        except LinkInvalid as exc:
            return _invalid(str(exc))
        text = ("CRM Bridge no longer holds your CRM login; syncing on your behalf has stopped. To connect again, "
                "ask your admin for a new connect link." if held else "CRM Bridge holds no CRM login of yours for "
                "this account: there was nothing to revoke.")
        return _page("Revoked", f"<h1>{'Revoked' if held else 'Nothing to revoke'}</h1><p>{esc(text)}</p>")
    password = SecretStr(form.get("password", ""))
    try:
        result: SubmitResult = connect.submit_link(
            token, username=form.get("username", ""), password=password,
            security_token=SecretStr(form.get("security_token", "")), now=now, tester=tester)
    except LinkInvalid as exc:
        with session_scope() as s:
            view = connect.open_link(s, token, now=now, audit=False)
        return _link_page(view, token, error=str(exc), status=410)
    except InvalidInput as exc:
        return _link_page(view, token, error=str(exc), status=400)
    except ConfigurationError as exc:
        return _invalid(str(exc), status=503)
    if not result.ok:
        left = f" {result.attempts_left} attempt(s) left on this link." if result.attempts_left is not None else ""
        with session_scope() as s:
            view = connect.open_link(s, token, now=now, audit=False)
        return _link_page(view, token, error=result.message + left, status=400)
    body = (
        f"<h1>Connected</h1><p>{esc(result.message)}</p><p>CRM Bridge now acts in {esc(_crm(view))} as "
        f"{esc(view.user_email)}. The login self-destructs by {esc(_when(result.expires_at))} at the latest, on "
        f"the first rejected login, or after {view.policy.idle_days} days unused.</p>"
        "<p>To revoke it, open this link again and press <b>Revoke it now</b>.</p>"
    )
    return _page("Connected", body)


def connect_link_routes(*, sso_gate: SsoGate | None = None,
                        tester: CredentialTester | None = None) -> list[BaseRoute]:
    """The connect-link routes. ``sso_gate`` runs before a page is shown or a submission accepted (None:
    no SSO step); ``tester`` logs in at the CRM (None: ``core.connections.testing.test_link_login``)."""

    async def connect_page(request: Request) -> Response:
        token = request.path_params["token"]
        now = utcnow()
        try:
            if request.method == "GET":
                return await run_in_threadpool(_get, sso_gate, request, token, now)
            if int(request.headers.get("content-length") or 0) > MAX_BODY:
                return _invalid("The form is too large.", status=413)
            raw = await request.form(max_files=0, max_fields=10)
            form = {k: v for k, v in raw.items() if isinstance(v, str)}
            return await run_in_threadpool(_post, sso_gate, tester, request, token, form, now)
        except CrmBridgeError as exc:
            log.warning("connect link: %s", type(exc).__name__)
            return _invalid(str(exc), status=400)

    async def connect_oauth(request: Request) -> Response:
        token = request.path_params["token"]

        def start() -> Response:
            now = utcnow()
            try:
                with session_scope() as s:
                    view = connect.open_link(s, token, now=now, audit=False)
                if view.is_open and _gate(sso_gate, view, token, request):  # SSO first: back to the link
                    return RedirectResponse(get_settings().public(f"/connect/{token}"), status_code=303)
                with session_scope() as s:
                    url = connect.oauth_start_url(s, token, now=now)
            except LinkInvalid as exc:
                return _invalid(str(exc))
            except ConfigurationError as exc:  # e.g. the account's CRM address is not the vendor's: send nobody
                return _invalid(str(exc), status=503)
            return RedirectResponse(url, status_code=303)

        return await run_in_threadpool(start)

    return [
        Route("/connect/{token}", connect_page, methods=["GET", "POST"]),
        Route("/connect/{token}/oauth", connect_oauth, methods=["GET"]),
    ]
