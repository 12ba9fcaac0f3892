"""The connect-link SSO gate: an app user signs in through the tenant's SSO before a connect link takes
their CRM login.
The vault's connect link calls a gate (core.wiring) before it shows its form or takes a submission.
Where the tenant has tested SSO and the browser holds no pass for this app user, the gate sends the
browser to /sso/{tenant}/connect?r=<sealed>, which starts an AuthnRequest; the ACS checks that the IdP
signed in the link's own app user, sets a short pass cookie (path /connect/) and returns to the link.
The link's address (a bearer token) never goes to the IdP and is stored sealed, never in clear.
"""

from __future__ import annotations

import hmac
import json
from datetime import datetime, timedelta
from urllib.parse import quote

from sqlmodel import Session

from core import keys
from core.accounts.secrets import open_platform, seal_platform
from core.errors import CredentialInvalid, InvalidInput, NotFound
from core.settings import get_settings
from core.sso.authn import start_authn
from core.sso.common import (
    ACS_PRINCIPAL,
    PURPOSE_CONNECT,
    AcsOutcome,
    AcsTarget,
    RequestRow,
    get_config,
    now_or,
    refused,
    tenant_by_slug,
)
from core.sso.sp import AuthnStart, ResponseCheck
from core.tenants.audit import record_event
from core.tenants.models import Tenant

CONNECT_PASS_COOKIE = "crmbridge_connect_sso"
CONNECT_PASS_TTL = timedelta(minutes=15)
CONNECT_START_TTL = timedelta(minutes=10)


def _seal_owner(tenant_id: int) -> str:
    return f"tenant:{tenant_id}"


def _is_link_url(url: str) -> bool:
    prefix = get_settings().public("/connect/")
    return url.startswith(prefix) and "/" not in url[len(prefix):].strip("/") and len(url) > len(prefix)


def connect_gate_target(
    *, session: Session, tenant_id: int, app_user_email: str, link_url: str, now: datetime | None = None
) -> str | None:
    """Where a connect link must send its user first: the tenant's SSO sign-in, once the tenant's current
    IdP configuration has passed a test login; else None (the link works with no SSO step).

    A later failed test does not switch the step off (that would open every link to whoever holds it),
    nor does suspending the tenant; importing changed metadata does, until it is tested again, so users
    are never sent to an IdP configuration nobody has seen work."""
    now = now_or(now)
    tenant = session.get(Tenant, tenant_id)
    config = get_config(session, tenant_id)
    if tenant is None or config is None or config.tested_at is None:
        return None
    if not _is_link_url(link_url):
        raise InvalidInput(f"A connect link's address must start with {get_settings().public('/connect/')}.")
    blob = json.dumps({"p": link_url, "e": app_user_email.strip().lower(),
                       "x": int((now + CONNECT_START_TTL).timestamp())})
    sealed = seal_platform(blob, owner=_seal_owner(tenant_id), purpose="sso-connect-start")
    return get_settings().public(f"/sso/{tenant.slug}/connect?r={quote(sealed, safe='')}")


def start_connect_login(
    *, session: Session, tenant_slug: str, sealed: str | None, now: datetime | None = None
) -> AuthnStart:
    """Start the SSO sign-in a connect link asked for (``sealed`` comes from ``connect_gate_target``).

    Raises:
        NotFound: unknown tenant, or no SSO configured.
        InvalidInput: a damaged or expired start (the fix: open the connect link again).
    """
    now = now_or(now)
    tenant = tenant_by_slug(session, tenant_slug)
    again = "Open your connect link again."
    try:
        data = json.loads(open_platform(sealed or "", owner=_seal_owner(tenant.id),  # type: ignore[arg-type]
                                        purpose="sso-connect-start"))
        path, email, expires = str(data["p"]), str(data["e"]), int(data["x"])
    except (CredentialInvalid, ValueError, KeyError, TypeError):
        raise InvalidInput("This single sign-on step is damaged or belongs to another company.", fix=again) from None
    if expires < now.timestamp():
        raise InvalidInput("This single sign-on step expired (10 minutes).", fix=again)
    config = get_config(session, tenant.id)  # type: ignore[arg-type]
    if config is None:
        raise NotFound(f"{tenant.name} no longer signs in through SSO: open your connect link again.")
    sealed_path = seal_platform(path, owner=_seal_owner(tenant.id), purpose="sso-connect-return")  # type: ignore[arg-type]
    start = start_authn(session, tenant=tenant, config=config, purpose=PURPOSE_CONNECT, relay_state=sealed_path,
                   started_by=email, now=now, send_relay=False)
    record_event(session, principal=email, action="sso.connect.start", tenant_id=tenant.id,
                 target=f"sso_request:{start.request_id}", at=now)
    return start


def _pass_mac(tenant_id: int, email: str, expires: int) -> str:
    return keys.mac(keys.SSO_CONNECT_PASS, f"{tenant_id}|{email.strip().lower()}|{expires}".encode()).hex()


def connect_pass(tenant_id: int, email: str, now: datetime | None = None) -> str:
    """The cookie value proving this browser signed in through the tenant's SSO as ``email``."""
    expires = int((now_or(now) + CONNECT_PASS_TTL).timestamp())
    return f"{expires}.{_pass_mac(tenant_id, email, expires)}"


def connect_pass_ok(value: str | None, *, tenant_id: int, email: str, now: datetime | None = None) -> bool:
    """True when ``value`` is an unexpired pass for this tenant's app user ``email``."""
    expires, _, mac = (value or "").partition(".")
    if not expires.isdigit() or int(expires) < now_or(now).timestamp():
        return False
    return hmac.compare_digest(_pass_mac(tenant_id, email, int(expires)), mac)


def connect_outcome(
    session: Session, *, tenant: AcsTarget, result: ResponseCheck, request: RequestRow, now: datetime
) -> AcsOutcome:
    expected = (request.started_by or "").lower()
    again = "Open your connect link again."
    if not result.ok:
        record_event(session, principal=expected or ACS_PRINCIPAL.email, action="sso.connect.refused",
                     tenant_id=tenant.tenant_id, target=f"tenant:{tenant.slug}", details={"code": result.code},
                     at=now)
        return refused(result.code, f"Single sign-on failed: {result.error}", result.fix or again,
                        purpose=PURPOSE_CONNECT)
    signed_in = (result.email or "").strip().lower()
    if not expected or signed_in != expected:
        record_event(session, principal=expected or ACS_PRINCIPAL.email, action="sso.connect.refused",
                     tenant_id=tenant.tenant_id, target=f"tenant:{tenant.slug}",
                     details={"code": "wrong_user", "signed_in_as": signed_in or None}, at=now)
        return refused(
            "wrong_user",
            f"Your company's single sign-on signed you in as {signed_in or 'an identity without an email address'}, "
            f"but this connect link is for {expected}.",
            f"Sign out of your company's single sign-on and open the link again as {expected}, or ask your admin "
            "for a link of your own.", purpose=PURPOSE_CONNECT)
    try:
        path = open_platform(request.relay_state or "", owner=_seal_owner(tenant.tenant_id),
                             purpose="sso-connect-return")
    except CredentialInvalid:
        return refused("damaged", "This sign-in request lost its way back to the connect link.", again,
                        purpose=PURPOSE_CONNECT)
    if not _is_link_url(path):  # the public URL changed since the request was sent
        return refused("damaged", "This sign-in request lost its way back to the connect link.", again,
                        purpose=PURPOSE_CONNECT)
    record_event(session, principal=expected, action="sso.connect.passed", tenant_id=tenant.tenant_id,
                 target=f"tenant:{tenant.slug}", at=now)
    return AcsOutcome(ok=True, purpose=PURPOSE_CONNECT, redirect=path,
                      token=connect_pass(tenant.tenant_id, expected, now), code="ok", status_code=303)

