"""Composition: connects the vault's connect links to the providers without either package importing
the other (arrows stay one way). Called once by server.py at start, and by tests that drive a
connect link against the sandbox.

- the credential tester: a password entered on a connect link is tested against the CRM before it
  is stored, and the CRM identity it logs in as must be the link's app user;
- the OAuth starter and completion: a connect link offers the CRM's OAuth consent where the provider
  supports it, with the provider's signed ``state`` bound to the link;
- the SSO gate: where the tenant has tested SSO, the link's app user signs in through it first.
"""

from __future__ import annotations

import json
import logging

from pydantic import SecretStr

from core.db import session_scope
from core.errors import AuthenticationFailed, InvalidInput, ProviderRejected
from core.tenants.access import Principal
from core.tenants.models import CrmAccount

log = logging.getLogger(__name__)
_wired = False


def _test_link_credential(check):  # type: ignore[no-untyped-def]
    from core.connections.links import parse_login_secret
    from core.connections.service import check_credential

    login = parse_login_secret(check.secret)
    fields = {"username": login.username, "password": login.password.get_secret_value()}
    token = login.security_token.get_secret_value()
    if token:
        fields["security_token"] = token
    with session_scope() as s:
        report = check_credential(session=s, principal=Principal.system("connect-link"),
                                  account_id=check.crm_account_id, fields=fields)
    if not report.ok:
        step = report.failed_step
        message = f"{step.name}: {step.detail}" if step else "the CRM refused this login"
        error = AuthenticationFailed if step is None or step.name in ("authenticate", "reach") else ProviderRejected
        raise error(message, fix=step.fix if step else None, code=getattr(step, "code", None))
    return report.crm_user_id or report.identity or ""


def _start_link_oauth(start):  # type: ignore[no-untyped-def]
    from core.connections.routes import begin_authorization

    if start.session is not None:  # inside the link's transaction (a second one would wait on SQLite's lock)
        account = start.session.get(CrmAccount, start.crm_account_id)
    else:
        with session_scope() as s:
            account = s.get(CrmAccount, start.crm_account_id)
    if account is None:
        raise InvalidInput("This CRM account no longer exists: ask your admin for a new link.")
    return begin_authorization(account=account, binding=f"link:{start.state}")


def _complete_link_oauth(done):  # type: ignore[no-untyped-def]
    from core.connections.links import complete_oauth

    state = done.binding.split(":", 1)[1]
    if not done.grant.refresh_token:
        raise InvalidInput("The CRM gave no refresh token", fix="Add the refresh_token scope to the connected app.")
    crm_user_id = getattr(done, "crm_user_id", None) or done.identity or ""
    complete_oauth(done.session, state=state, secret=SecretStr(json.dumps({"refresh_token": done.grant.refresh_token})),
                   crm_user_id=crm_user_id, now=done.now)
    return f"{done.account.label} is connected. You can close this page."


def _sso_gate(req):  # type: ignore[no-untyped-def]
    from core.sso.service import CONNECT_PASS_COOKIE, connect_gate_target, connect_pass_ok

    if connect_pass_ok(req.request.cookies.get(CONNECT_PASS_COOKIE), tenant_id=req.tenant_id,
                       email=req.app_user_email):
        return None
    with session_scope() as s:
        return connect_gate_target(session=s, tenant_id=req.tenant_id, app_user_email=req.app_user_email,
                                   link_url=req.link_url)


def wire() -> None:
    """Register the hooks (idempotent)."""
    global _wired
    if _wired:
        return
    from core.connections import links as connect
    from core.connections.routes import register_completion_handler
    from core.providers.base import AuthorizationCodeSupport
    from core.providers.registry import available_providers, get_provider_class

    connect.set_credential_tester(_test_link_credential)
    connect.set_sso_gate(_sso_gate)
    for slug in available_providers():
        try:
            cls = get_provider_class(slug)
        except ImportError:  # an optional provider that is not installed
            continue
        if issubclass(cls, AuthorizationCodeSupport):
            connect.set_oauth_starter(slug, _start_link_oauth)
    register_completion_handler("link", _complete_link_oauth, clobber=True)
    _wired = True
