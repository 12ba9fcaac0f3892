"""Per-user OAuth (web-server flow + PKCE): the authorize link and the callback route.

    url = begin_authorization(account=crm_account, binding="app_user:42")   # or the connect link's own
    # the user's browser goes to url, approves in the CRM, and comes back to
    #   GET /oauth/{provider}/callback?code=…&state=…

``state`` is signed with the server secret and carries the CRM account, the ``binding`` (who the
grant is for: an opaque string from the connect link) and an expiry; each state is redeemed once
(``OAuthStateUse``). The PKCE verifier is never stored: it is derived from the state with the server
secret, so only this server can finish the flow it started. The callback exchanges the code, tests
the new access token with one real API call, and hands the grant to the **completion handler**
registered for the binding's prefix (the part before the first ``:``)::

    register_completion_handler("link", handle)   # the connect-link code (vault) registers this
    def handle(done: OAuthCompletion) -> Response | str: ...

The built-in ``app_user`` handler stores the refresh token in the vault for that app user (purpose
``crm-login``), bound to the account; anything else needs its own handler. Every absolute URL comes
from ``get_settings().public(...)``.
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

from pydantic import SecretStr
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from core.clock import utcnow
from core.db import session_scope
from core.errors import CrmBridgeError, InvalidInput, LinkInvalid, NotFound
from core.providers.base import AuthorizationCodeSupport, TokenGrant
from core.providers.config import AccountConfig
from core.providers.models import OAuthStateUse
from core.settings import get_settings
from core.tenants.access import Principal
from core.tenants.models import AppUser, CrmAccount
from core.web import esc, html_page

log = logging.getLogger(__name__)

STATE_TTL = timedelta(minutes=15)
CALLBACK_PATH = "/oauth/{provider}/callback"


@dataclass
class OAuthCompletion:
    session: Session
    account: CrmAccount
    binding: str
    grant: TokenGrant
    identity: str | None
    now: datetime


CompletionHandler = Callable[[OAuthCompletion], "Response | str"]
_handlers: dict[str, CompletionHandler] = {}


def register_completion_handler(prefix: str, handler: CompletionHandler, *, clobber: bool = False) -> None:
    """Handle grants whose binding starts with ``prefix:`` (refuses to replace one silently)."""
    if prefix in _handlers and not clobber and _handlers[prefix] is not handler:
        raise ValueError(f"an OAuth completion handler for {prefix!r} exists; pass clobber=True")
    _handlers[prefix] = handler


def _key() -> bytes:
    return hmac.new(get_settings().server_secret(), b"crmbridge/oauth-state/v1", hashlib.sha256).digest()


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
        raise LinkInvalid("This sign-in link is not valid: start again from your connect link.")
    try:
        payload = json.loads(_unb64(body))
    except ValueError:
        raise LinkInvalid("This sign-in link is not valid: start again from your connect link.") from None
    if int(payload.get("e", 0)) < int(now.timestamp()):
        raise LinkInvalid("This sign-in link has expired (15 minutes): start again from your connect link.")
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
    *, account: CrmAccount, binding: str, login_hint: str | None = None, now: datetime | None = None
) -> str:
    """The CRM's authorize URL for ``account``, with a signed state and a PKCE challenge."""
    if not binding or len(binding) > 200:
        raise InvalidInput("An OAuth binding (who the grant is for) is required.")
    assert account.id is not None
    now = now or utcnow()
    cls = _provider_class(account.provider)
    state = make_state(account_id=account.id, provider=account.provider, binding=binding, now=now)
    return str(cls.authorization_url(
        AccountConfig.from_crm_account(account), redirect_uri=redirect_uri(account.provider), state=state,
        code_challenge=code_challenge(code_verifier(state)), login_hint=login_hint,
    ))


def _redeem(session: Session, state: str, payload: dict[str, Any], now: datetime) -> None:
    digest = hashlib.sha256(state.encode()).hexdigest()
    if session.get(OAuthStateUse, digest) is not None:
        raise LinkInvalid("This sign-in was already completed: start again from your connect link.")
    session.add(OAuthStateUse(state_hash=digest, used_at=now,
                              expires_at=datetime.fromtimestamp(int(payload["e"]), tz=now.tzinfo)))
    try:
        session.flush()
    except IntegrityError:
        raise LinkInvalid("This sign-in was already completed: start again from your connect link.") from None


def _account_secret(session: Session, account: CrmAccount, principal: Principal) -> dict[str, Any]:
    from core.providers.service import CREDENTIAL_PURPOSE, credential_fields
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
    from core.providers.registry import create_provider
    from core.providers.service import default_transport

    now = now or utcnow()
    payload = read_state(state, now=now)
    if payload.get("p") != provider:
        raise LinkInvalid("This sign-in link belongs to another CRM: start again from your connect link.")
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
    handler = _handlers.get(prefix)
    if handler is None:
        raise InvalidInput(f"No handler for OAuth bindings of kind {prefix!r}: this is a server setup error.")
    return handler(OAuthCompletion(session=session, account=account, binding=str(payload["b"]), grant=grant,
                                   identity=report.identity, now=now))


def _store_for_app_user(done: OAuthCompletion) -> str:
    """Built-in handler for ``app_user:<id>``: the refresh token goes to the vault for that user."""
    from core.providers.service import CREDENTIAL_PURPOSE
    from core.vault import service as vault

    try:
        user_id = int(done.binding.split(":", 1)[1])
    except (IndexError, ValueError):
        raise LinkInvalid("This sign-in link is not valid: start again from your connect link.") from None
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


register_completion_handler("app_user", _store_for_app_user)


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


routes: list[BaseRoute] = [Route(CALLBACK_PATH, oauth_callback, methods=["GET"])]
