"""Per-user OAuth (web-server flow + PKCE): the authorize link and the callback route.

    url = begin_authorization(account=crm_account, binding="app_user:42")   # or the connect link's own
    # the user's browser goes to url, approves in the CRM, and comes back to
    #   GET /oauth/{provider}/callback?code=…&state=…

``state`` is signed with the server secret and carries the CRM account, the ``binding`` (who the
grant is for: an opaque string from the connect link) and an expiry; each state is redeemed once
(``OAuthStateUse``). The PKCE verifier is never stored: it is derived from the state with the server
secret, so only this server can finish the flow it started. The callback exchanges the code, tests
the new access token with one real API call, and hands the grant to the completion for the
binding's prefix (the part before the first ``:``) in the fixed ``COMPLETIONS`` table: ``app_user``
stores the refresh token in the vault for that app user (purpose ``crm-login``), ``install`` adds an
app install's token to the account's secret, ``link`` lets the connect link store it for its user.
Every absolute URL comes from ``get_settings().public(...)``.

The secure credentials form, ``GET/POST /crm-accounts/{account_id}/credentials``: a plain HTML form
(never a Streamlit widget) for a CRM account's secret fields — generated from the catalog auth
mode's ``secret`` fields, so no CRM is named here. It needs a signed-in console principal with
access to the account's tenant (else a redirect to /auth/login, or 403), and a CSRF token bound to
the console session and the account. The POST puts the fields in the vault through
``service.store_account_credentials`` (replacing any held; audited) and, unless unticked, runs the
connection test at once and shows each step with its fix. Secrets are never echoed back, logged
or audited; a bad field re-renders the empty form with the message and stores nothing.

The app install, ``GET /crm-accounts/{account_id}/install?csrf=…``: for an account that signs in by
an app install (HubSpot's OAuth), once the app's secret is stored the form page links here; it sends
the admin to the CRM's install page with a state bound to ``install:<account>:<console email>``, and
the ``install`` completion handler adds the install's refresh token to the account's app secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from pydantic import SecretStr
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from core.clock import utcnow
from core.connections import service
from core.connections.models import OAuthStateUse
from core.db import session_scope
from core.errors import AccessDenied, ConfigurationError, CrmBridgeError, InvalidInput, LinkInvalid, NotFound
from core.keys import OAUTH_STATE, derive_key
from core.providers.base import AuthorizationCodeSupport, ConnectionReport, TokenGrant
from core.providers.catalog import FieldSpec
from core.providers.config import AccountConfig
from core.providers.transport import CrmUrlPolicy, check_account_urls
from core.settings import get_settings
from core.tenants.access import Principal
from core.tenants.audit import record_event
from core.tenants.models import AppUser, CrmAccount
from core.tenants.routes import principal_from_request
from core.web import SESSION_COOKIE, csrf_ok, csrf_token_for, esc, html_page

log = logging.getLogger(__name__)

STATE_TTL = timedelta(minutes=15)
START_AGAIN = "start again from your connect link (or, for an app install, from the account's credentials page)"
CALLBACK_PATH = "/oauth/{provider}/callback"


@dataclass
class OAuthCompletion:
    session: Session
    account: CrmAccount
    binding: str
    grant: TokenGrant
    identity: str | None
    now: datetime
    crm_user_id: str | None = None  # the CRM user id the token belongs to (from the probe call)


CompletionHandler = Callable[[OAuthCompletion], "Response | str"]


def _key() -> bytes:
    return derive_key(OAUTH_STATE)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_state(*, account_id: int, provider: str, binding: str, now: datetime) -> str:
    payload = {"a": account_id, "p": provider, "b": binding, "n": secrets.token_urlsafe(12),
               "e": int((now + STATE_TTL).timestamp())}
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    sig = _b64(hmac.new(_key(), body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}"


def read_state(state: str, *, now: datetime) -> dict[str, Any]:
    """The state's payload, or LinkInvalid (forged, malformed or expired)."""
    body, _, sig = (state or "").partition(".")
    expected = _b64(hmac.new(_key(), body.encode(), hashlib.sha256).digest())
    if not body or not hmac.compare_digest(expected, sig):
        raise LinkInvalid(f"This sign-in link is not valid: {START_AGAIN}.")
    try:
        payload = json.loads(_unb64(body))
    except ValueError:
        raise LinkInvalid(f"This sign-in link is not valid: {START_AGAIN}.") from None
    if int(payload.get("e", 0)) < int(now.timestamp()):
        raise LinkInvalid(f"This sign-in link has expired (15 minutes): {START_AGAIN}.")
    return dict(payload)


def code_verifier(state: str) -> str:
    """The PKCE verifier for ``state`` (43 URL-safe characters, derived; never stored)."""
    return _b64(hmac.new(_key(), b"pkce|" + state.encode(), hashlib.sha256).digest())


def code_challenge(verifier: str) -> str:
    return _b64(hashlib.sha256(verifier.encode()).digest())


def redirect_uri(provider: str) -> str:
    return get_settings().public(CALLBACK_PATH.format(provider=provider))


def _provider_class(provider: str) -> Any:
    from core.providers.registry import get_provider_class

    cls = get_provider_class(provider)
    if not isinstance(cls, AuthorizationCodeSupport) and not (
        hasattr(cls, "authorization_url") and hasattr(cls, "exchange_code")
    ):
        raise InvalidInput(f"{provider} does not support per-user OAuth here: choose another credential mode.")
    return cls


def begin_authorization(
    *, account: CrmAccount, binding: str, login_hint: str | None = None, now: datetime | None = None,
    url_policy: CrmUrlPolicy | None = None,
) -> str:
    """The CRM's authorize URL for ``account``, with a signed state and a PKCE challenge.

    Raises:
        ConfigurationError (``url_refused``): the account's URLs or the sign-in page are not on the vendor's
            hosts (``url_policy``, by default the product's: ``CrmUrlPolicy.from_settings()``).
    """
    if not binding or len(binding) > 200:
        raise InvalidInput("An OAuth binding (who the grant is for) is required.")
    assert account.id is not None
    now = now or utcnow()
    cls = _provider_class(account.provider)
    config = AccountConfig.from_crm_account(account)
    policy = url_policy or CrmUrlPolicy.from_settings()  # a user is sent to sign in there: the vendor's own hosts only
    check_account_urls(policy, account.provider, config.instance_url, config.settings)
    state = make_state(account_id=account.id, provider=account.provider, binding=binding, now=now)
    url = str(cls.authorization_url(
        config, redirect_uri=redirect_uri(account.provider), state=state,
        code_challenge=code_challenge(code_verifier(state)), login_hint=login_hint,
    ))
    refusal = policy.refusal(url, account.provider, what="The CRM sign-in page")
    if refusal:
        raise ConfigurationError(refusal, fix="Check the account's URLs.", code="url_refused")
    return get_settings().browser_facing(url)  # demo: the sandbox's consent page without a TLS warning


def _redeem(session: Session, state: str, payload: dict[str, Any], now: datetime) -> None:
    digest = hashlib.sha256(state.encode()).hexdigest()
    if session.get(OAuthStateUse, digest) is not None:
        raise LinkInvalid(f"This sign-in was already completed: {START_AGAIN}.")
    session.add(OAuthStateUse(state_hash=digest, used_at=now,
                              expires_at=datetime.fromtimestamp(int(payload["e"]), tz=now.tzinfo)))
    try:
        session.flush()
    except IntegrityError:
        raise LinkInvalid(f"This sign-in was already completed: {START_AGAIN}.") from None


def _account_secret(session: Session, account: CrmAccount, principal: Principal) -> dict[str, Any]:
    from core.connections.service import CREDENTIAL_PURPOSE, credential_fields
    from core.vault import service as vault

    ref = vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                app_user_id=None, purpose=CREDENTIAL_PURPOSE)
    if ref is None:
        return {}
    with vault.use(session, ref, principal=principal, reason="OAuth code exchange") as secret:
        return credential_fields(secret)


def complete_authorization(
    session: Session, *, provider: str, code: str, state: str, now: datetime | None = None,
    transport: Any = None,
) -> Response | str:
    """Verify ``state``, exchange ``code`` with the derived verifier, test the token, hand it over."""
    from core.connections.service import default_transport
    from core.providers.registry import create_provider

    now = now or utcnow()
    payload = read_state(state, now=now)
    if payload.get("p") != provider:
        raise LinkInvalid(f"This sign-in link belongs to another CRM: {START_AGAIN}.")
    _redeem(session, state, payload, now)
    account = session.get(CrmAccount, int(payload["a"]))
    if account is None:
        raise NotFound("The CRM account of this sign-in no longer exists: ask your admin.")
    principal = Principal.system("oauth-callback")
    cls = _provider_class(provider)
    config = AccountConfig.from_crm_account(account)
    http = transport or default_transport()
    app_secret = _account_secret(session, account, principal)
    grant = cls.exchange_code(config, app_secret, http, code=code, code_verifier=code_verifier(state),
                              redirect_uri=redirect_uri(provider))
    # test the credential before anything is stored: one real API call with the new access token
    probe = create_provider(account=config, transport=http, credential={
        **app_secret, "access_token": SecretStr(grant.access_token),
        "refresh_token": SecretStr(grant.refresh_token or "")})
    report = probe.test_connection()
    access = next((s for s in report.steps if s.name == "api_access"), None)
    if access is None or not access.ok:
        failed = report.failed_step
        raise InvalidInput(
            "The CRM accepted the sign-in but refused an API call with it"
            + (f": {failed.detail}" if failed else ""), fix=failed.fix if failed else None)
    prefix = str(payload["b"]).split(":", 1)[0]
    handler = COMPLETIONS.get(prefix)
    if handler is None:
        raise InvalidInput(f"No handler for OAuth bindings of kind {prefix!r}: this is a server setup error.")
    return handler(OAuthCompletion(session=session, account=account, binding=str(payload["b"]), grant=grant,
                                   identity=report.identity, now=now, crm_user_id=report.crm_user_id))


def _store_for_app_user(done: OAuthCompletion) -> str:
    """Built-in handler for ``app_user:<id>``: the refresh token goes to the vault for that user."""
    from core.connections.service import CREDENTIAL_PURPOSE
    from core.vault import service as vault

    try:
        user_id = int(done.binding.split(":", 1)[1])
    except (IndexError, ValueError):
        raise LinkInvalid(f"This sign-in link is not valid: {START_AGAIN}.") from None
    user = done.session.get(AppUser, user_id)
    if user is None or user.tenant_id != done.account.tenant_id:
        raise LinkInvalid("This sign-in link does not belong to this CRM account.")
    if not done.grant.refresh_token:
        raise InvalidInput("The CRM gave no refresh token", fix="Add the refresh_token scope to the app.")
    fields = {"refresh_token": done.grant.refresh_token}
    vault.store(done.session, actor=user.email, tenant_id=done.account.tenant_id, purpose=CREDENTIAL_PURPOSE,
                secret=json.dumps(fields), crm_account_id=done.account.id, app_user_id=user.id,
                kind="oauth_refresh", via="oauth", now=done.now)
    who = f" as {done.identity}" if done.identity else ""
    return f"{done.account.label} is connected{who}. You can close this page."


def _store_install(done: OAuthCompletion) -> Response:
    """Built-in handler for ``install:<account id>:<console email>``: an app install (HubSpot) started
    from the account's credentials page; the refresh token joins the account's app secret."""
    try:
        _, account_id, who = done.binding.split(":", 2)
        same = int(account_id) == done.account.id
    except ValueError:
        same, who = False, ""
    if not same:
        raise LinkInvalid("This install link belongs to another CRM account: start again from the console.")
    if not done.grant.refresh_token:
        raise InvalidInput("The CRM gave no refresh token", fix="Check the app's scopes, then install it again.")
    service.store_install_grant(session=done.session, account=done.account, refresh_token=done.grant.refresh_token,
                                installed_by=who, identity=done.identity, now=done.now)
    as_who = f" as <b>{esc(done.identity)}</b>" if done.identity else ""
    body = (f"<h1>App installed</h1><p>The CRM Bridge app is installed for <b>{esc(done.account.label)}</b>{as_who}, "
            "and a first API call with it passed. CRM Bridge keeps the install's refresh token in the vault; "
            "uninstalling the app in the CRM revokes it.</p>"
            + _console_link(service.tenant_slug_of(done.session, done.account)))
    return html_page("App installed", body)


def _complete_link(done: OAuthCompletion) -> str:
    """``link:<state>``: a connect link's "Sign in with <CRM>"; the link stores the token for its user
    (core.connections.links.complete_oauth checks the identity and consumes the link)."""
    from core.connections.links import complete_oauth

    state = done.binding.split(":", 1)[1]
    if not done.grant.refresh_token:
        raise InvalidInput("The CRM gave no refresh token", fix="Add the refresh_token scope to the connected app.")
    complete_oauth(done.session, state=state,
                   secret=SecretStr(json.dumps({"refresh_token": done.grant.refresh_token})),
                   crm_user_id=done.crm_user_id or done.identity or "", now=done.now)
    return f"{done.account.label} is connected. You can close this page."


# Who a grant is for, by its binding's prefix (a fixed table: no handlers registered at start).
COMPLETIONS: dict[str, CompletionHandler] = {
    "app_user": _store_for_app_user,
    "install": _store_install,
    "link": _complete_link,
}


async def oauth_callback(request: Request) -> Response:
    provider = request.path_params["provider"]
    q = request.query_params
    if q.get("error"):
        msg = f"{provider} did not grant access ({q.get('error')}: {q.get('error_description', '')})."
        return html_page("Not connected", f"<h1>Not connected</h1><p class=error>{esc(msg)}</p>"
                         "<p class=note>Start again from your connect link to try once more.</p>", 400)
    code, state = q.get("code", ""), q.get("state", "")
    if not code or not state:
        return html_page("Not connected", "<h1>Not connected</h1><p class=error>The CRM sent no code: start "
                         "again from your connect link.</p>", 400)
    try:
        with session_scope() as s:
            outcome = complete_authorization(s, provider=provider, code=code, state=state)
    except CrmBridgeError as exc:
        log.info("oauth callback for %s failed: %s", provider, exc.code or type(exc).__name__)
        return html_page("Not connected", f"<h1>Not connected</h1><p class=error>{esc(str(exc))}</p>", 400)
    if isinstance(outcome, Response):
        return outcome
    return html_page("Connected", f"<h1>Connected</h1><p>{esc(outcome)}</p>")


# -- the secure credentials form ----------------------------------------------------------------------
CREDENTIALS_ROUTE = "/crm-accounts/{account_id:int}/credentials"
INSTALL_ROUTE = "/crm-accounts/{account_id:int}/install"
MAX_CREDENTIALS_BODY = 72 * 1024  # a PEM private key fits; the vault caps a secret at 64 KiB
CSRF_FAILED = ("This form expired or was not sent from the CRM Bridge console: nothing was stored. "
               "Enter the credentials again below.")


def _csrf_binding(session_token: str, account_id: int, purpose: str = "crm-credentials") -> str:
    """Bound to this console session (its hash: the token itself goes nowhere), this account and the
    form or link it protects (``crm-credentials``, ``crm-install``)."""
    return f"{purpose}|{account_id}|" + hashlib.sha256(session_token.encode()).hexdigest()


def _install_html(view: service.AccountCredentials, session_token: str) -> str:
    """The install step of an app-install account: a link (not a form: the CSP's form-action would stop
    the redirect to the CRM) carrying a CSRF token bound to this session and account."""
    if not view.installs_app:
        return ""
    if not view.stored:
        return ("<h2>Then install the app</h2><p class=note>Once the app's secret is saved, an admin of the "
                f"{esc(view.provider_name)} account installs the app from here.</p>")
    token = csrf_token_for(_csrf_binding(session_token, view.account_id, "crm-install"))
    href = get_settings().public(f"/crm-accounts/{view.account_id}/install") + "?csrf=" + token
    return (f"<h2>Install the app</h2><p>An admin of the {esc(view.provider_name)} account approves the install on "
            f"{esc(view.provider_name)}'s own page; CRM Bridge then keeps the install's refresh token in the vault "
            "with the app's secret (replacing the secret keeps the install).</p>"
            f"<p><a href='{esc(href)}'>Install the app in {esc(view.provider_name)}</a></p>")


def _origin() -> str:
    scheme, _, rest = get_settings().public_url.rstrip("/").partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _credentials_page(title: str, body: str, status: int = 200) -> Response:
    resp = html_page(title, body, status)
    resp.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'unsafe-inline'; form-action {_origin()}; frame-ancestors 'none'"
    )
    return resp


def console_url(tenant_slug: str | None = None) -> str:
    """The console's Tenant page with this tenant in focus (``?tenant=``): coming back from a hand-off
    never lands on another tenant."""
    query = "?" + urlencode({"tenant": tenant_slug}) if tenant_slug else ""
    return get_settings().public("/tenant") + query


def _console_link(tenant_slug: str | None = None) -> str:
    return f"<p class=note><a href='{esc(console_url(tenant_slug))}'>Back to the console</a></p>"


def _to_sign_in(account_id: int) -> Response:
    """Not signed in: to the console's sign-in, then back to the account's credentials page."""
    path = service.CREDENTIALS_PATH.format(account_id=account_id)
    return RedirectResponse(get_settings().public("/auth/login") + "?next=" + quote(path, safe="/"), status_code=303)


def _refusal_for(exc: CrmBridgeError, title: str) -> Response:
    """The page for an error loading the account: no access (403), no such account (404), else 400."""
    if isinstance(exc, AccessDenied):
        return _refusal("Not allowed", str(exc), 403)
    if isinstance(exc, NotFound):
        return _refusal("Not found", str(exc), 404)
    return _refusal(title, str(exc), 400)


def _refusal(title: str, message: str, status: int) -> Response:
    return _credentials_page(title, f"<h1>{esc(title)}</h1><p class=error role=alert>{esc(message)}</p>"
                             + _console_link(), status)


def _when(dt: datetime | None) -> str:
    return f"{dt:%Y-%m-%d %H:%M} UTC" if dt else "—"


def _field_html(f: FieldSpec) -> str:
    """One secret field: never pre-filled, never autofilled with the console's own password."""
    fid = f"f_{f.name}"
    required = " required" if f.required else ""
    label = esc(f.title) + ("" if f.required else " (optional)")
    note = f"<div class=note>{esc(f.help)}</div>" if f.help else ""
    if f.type == "text":
        control = (f"<textarea id={fid} name={esc(f.name)} rows=8 autocomplete=off spellcheck=false "
                   f"maxlength=65536 style='width:100%;box-sizing:border-box;font-family:monospace'{required}>"
                   "</textarea>")
    elif f.type == "select" and f.options:
        options = "".join(f"<option value='{esc(o)}'>{esc(o)}</option>" for o in f.options)
        control = f"<select id={fid} name={esc(f.name)}{required}>{options}</select>"
    else:
        control = (f"<input type=password id={fid} name={esc(f.name)} autocomplete=new-password "
                   f"spellcheck=false maxlength=8192{required}>")
    return f"<label for={fid}>{label}</label>{control}{note}"


def _state_html(view: service.AccountCredentials) -> str:
    if view.state == "connected":
        return (f"<p class=note>Credentials were stored {esc(_when(view.stored_at))}"
                + (f" by {esc(view.stored_by)}" if view.stored_by else "")
                + ". Saving this form replaces them.</p>")
    if view.state == "failed":
        return ("<p class=error>The CRM rejected the stored credentials: enter new ones (saving replaces "
                "them).</p>")
    if view.state == "invalid":
        return "<p class=error>The stored credentials could not be decrypted: enter them again.</p>"
    if view.state == "reconnect needed":
        return "<p class=error>The stored credentials were destroyed: enter them again.</p>"
    if view.missing:
        return ("<p class=error>No credentials are stored yet: this CRM account cannot connect until you "
                "enter them.</p>")
    return "<p class=note>No credentials are stored yet (they are optional for this sign-in method).</p>"


def _form_page(view: service.AccountCredentials, csrf: str, *, session_token: str, error: str = "",
               run_test: bool = True, status: int = 200) -> Response:
    title = f"Credentials for {view.label}"
    head = (f"<h1>{esc(title)}</h1><p>{esc(view.provider_name)} · {esc(view.auth_mode_title)}</p>"
            + (f"<p class=error role=alert>{esc(error)}</p>" if error else ""))
    per_user = ("<p class=note>Each user enters their own " + esc(", ".join(f.title.lower() for f in view.user_fields))
                + " through their connect link, never here.</p>") if view.user_fields else ""
    if not view.needs_secret:
        body = (head + f"<p>{esc(view.label)} signs in with {esc(view.auth_mode_title)}, which has no "
                "account-level secret: there is nothing to enter here.</p>" + per_user
                + _console_link(view.tenant_slug))
        return _credentials_page(title, body, status)
    action = get_settings().public(service.CREDENTIALS_PATH.format(account_id=view.account_id))
    checked = " checked" if run_test else ""
    button = "Replace credentials" if view.stored else "Save credentials"
    body = (
        head + _state_html(view)
        + "<p class=note>What you enter goes straight to the vault, encrypted with a key that belongs to this "
        "tenant alone. It is never shown again, here or in the console.</p>"
        + f"<form method=post action='{esc(action)}' autocomplete=off>"
        f"<input type=hidden name=csrf value='{esc(csrf)}'>"
        + "".join(_field_html(f) for f in view.fields)
        + ("" if view.installs_app else
           f"<label><input type=checkbox name=test value=1{checked}> Test the connection right away</label>")
        + f"<button type=submit>{esc(button)}</button></form>" + _install_html(view, session_token) + per_user
        + _console_link(view.tenant_slug)
    )
    return _credentials_page(title, body, status)


def _report_html(report: ConnectionReport) -> str:
    rows = []
    for step in report.steps:
        name = step.name.replace("_", " ").capitalize()
        timing = f" ({step.latency_ms:.0f} ms)" if step.latency_ms is not None else ""
        verdict = "passed" if step.ok else "failed"
        fix = f"<br><b>Fix:</b> {esc(step.fix)}" if (step.fix and not step.ok) else ""
        rows.append(f"<tr><td>{'✅' if step.ok else '❌'} {esc(name)}{esc(timing)}</td><td>{verdict}</td>"
                    f"<td>{esc(step.detail)}{fix}</td></tr>")
    who = f" as {esc(report.identity)}" if report.identity else ""
    verdict = (f"<p>The connection test <b>passed</b>{who}.</p>" if report.ok
               else "<p class=error role=alert>The connection test <b>failed</b>: see the fix below.</p>")
    return (verdict + "<table><tr><th>Step</th><th>Result</th><th>Detail and fix</th></tr>"
            + "".join(rows) + "</table>")


def _result_page(view: service.AccountCredentials, *, replaced: bool, report: ConnectionReport | None,
                 test_error: str | None, session_token: str) -> Response:
    title = f"Credentials {'replaced' if replaced else 'saved'}"
    body = (f"<h1>{esc(title)}</h1><p>The credentials for <b>{esc(view.label)}</b> ({esc(view.provider_name)}) "
            f"are {'replaced' if replaced else 'stored'} in the vault.</p>")
    if test_error is not None:
        body += f"<p class=error role=alert>The connection test could not run: {esc(test_error)}</p>"
    elif report is not None:
        body += _report_html(report)
    else:
        body += "<p class=note>Run the connection test from the console when you are ready.</p>"
    return _credentials_page(title, body + _install_html(view, session_token)
                             + _console_link(view.tenant_slug))


def _credentials(request: Request, account_id: int, form: dict[str, str] | None) -> Response:
    principal = _principal(request)
    if principal is None:
        return _to_sign_in(account_id)
    session_token = request.cookies.get(SESSION_COOKIE) or ""
    try:
        with session_scope() as s:
            view = service.account_credentials(session=s, principal=principal, account_id=account_id)
    except CrmBridgeError as exc:
        return _refusal_for(exc, "Credentials")
    binding = _csrf_binding(session_token, account_id)
    csrf = csrf_token_for(binding)
    if form is None:
        return _form_page(view, csrf, session_token=session_token)
    run_test = form.get("test") == "1" and not view.installs_app  # nothing to test before the install
    if not csrf_ok(binding, form.get("csrf")):
        log.warning("crm account %s credentials: refused a POST without a valid CSRF token", account_id)
        return _form_page(view, csrf, session_token=session_token, error=CSRF_FAILED, run_test=run_test, status=403)
    if not view.needs_secret:
        return _form_page(view, csrf, session_token=session_token, status=400)
    # browsers send a textarea's line breaks as CRLF: a PEM key is stored with the LF it was written in
    secrets_ = {f.name: (form.get(f.name, "").replace("\r\n", "\n") if f.type == "text" else form.get(f.name, ""))
                for f in view.fields}
    try:
        with session_scope() as s:
            stored = service.store_account_credentials(session=s, principal=principal, account_id=account_id,
                                                       secrets=secrets_)
    except AccessDenied as exc:
        return _refusal("Not allowed", str(exc), 403)
    except InvalidInput as exc:
        return _form_page(view, csrf, session_token=session_token, error=str(exc), run_test=run_test, status=400)
    except CrmBridgeError as exc:  # vault keys missing and the like: a server-side problem
        log.warning("crm account %s credentials: not stored (%s)", account_id, type(exc).__name__)
        return _form_page(view, csrf, session_token=session_token, error=str(exc), run_test=run_test, status=503)
    finally:
        secrets_.clear()
        form.clear()
    report: ConnectionReport | None = None
    test_error: str | None = None
    if run_test:
        try:
            with session_scope() as s:
                report = service.test_crm_account(session=s, principal=principal, account_id=account_id)
        except CrmBridgeError as exc:
            log.info("crm account %s: connection test did not run (%s)", account_id, type(exc).__name__)
            test_error = str(exc)
    return _result_page(stored, replaced=view.stored, report=report, test_error=test_error,
                        session_token=session_token)


def _principal(request: Request) -> Principal | None:
    found = principal_from_request(request)
    return found if isinstance(found, Principal) else None


def _install(request: Request, account_id: int) -> Response:
    """GET /crm-accounts/{id}/install?csrf=…: start the app install (the CRM's consent page)."""
    principal = _principal(request)
    if principal is None:
        return _to_sign_in(account_id)
    session_token = request.cookies.get(SESSION_COOKIE) or ""
    try:
        with session_scope() as s:
            view = service.account_credentials(session=s, principal=principal, account_id=account_id)
            if not view.installs_app:
                return _refusal("Install", f"{view.label} does not sign in by an app install.", 400)
            if not csrf_ok(_csrf_binding(session_token, account_id, "crm-install"), request.query_params.get("csrf")):
                return _refusal("Install", "This install link was not opened from your console session: open the "
                                "credentials page and press Install again.", 403)
            if not view.stored:
                return _refusal("Install", "Enter the app's client secret first, then install the app.", 400)
            account = s.get(CrmAccount, account_id)
            assert account is not None
            if not AccountConfig.from_crm_account(account).setting("client_id"):
                return _refusal("Install", f"{view.label} has no app client ID: set it on the account first "
                                "(remove the account and add it again with the client ID).", 400)
            url = begin_authorization(account=account, binding=f"install:{account_id}:{principal.email}")
            record_event(s, principal=principal, action="crm_account.app_install.start",
                         tenant_id=account.tenant_id, target=f"crm_account:{account_id}")
    except CrmBridgeError as exc:
        return _refusal_for(exc, "Install")
    resp = RedirectResponse(url, status_code=303)
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def install_page(request: Request) -> Response:
    return await run_in_threadpool(_install, request, int(request.path_params["account_id"]))


async def credentials_page(request: Request) -> Response:
    account_id = int(request.path_params["account_id"])
    form: dict[str, str] | None = None
    if request.method == "POST":
        if int(request.headers.get("content-length") or 0) > MAX_CREDENTIALS_BODY:
            return _refusal("Credentials", "The form is too large: a secret is at most 64 KiB.", 413)
        raw = await request.form(max_files=0, max_fields=50)
        form = {k: v for k, v in raw.items() if isinstance(v, str)}
    return await run_in_threadpool(_credentials, request, account_id, form)


routes: list[BaseRoute] = [
    Route(CALLBACK_PATH, oauth_callback, methods=["GET"]),
    Route(CREDENTIALS_ROUTE, credentials_page, methods=["GET", "POST"]),
    Route(INSTALL_ROUTE, install_page, methods=["GET"]),
]
