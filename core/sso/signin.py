"""Console sign-in through the tenant's IdP and the ACS every SAML answer comes back to.

``start_login`` sends a tenant admin to their IdP; ``consume_response`` handles a POST to
``/sso/{tenant}/acs``: the checks every answer passes (request binding, login-CSRF cookie, strict
python3-saml validation, replay), then the purpose's outcome: a test login's trace
(core.sso.testlogin), a connect link's pass (core.sso.connect) or a console session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from core.clock import aware
from core.db import DriverStatements
from core.errors import NotFound
from core.ratelimit import NoiseAggregator
from core.settings import get_settings
from core.sso.authn import cached_acs_settings, sp_key_settings, start_authn
from core.sso.common import (
    ACS_PRINCIPAL,
    OFFBOARDED_SSO,
    PURPOSE_CONNECT,
    PURPOSE_SIGN_IN,
    PURPOSE_TEST,
    SLUG_RE,
    AcsOutcome,
    AcsTarget,
    RequestRow,
    get_config,
    now_or,
    refused,
    safe_relay_state,
    tenant_by_slug,
)
from core.sso.connect import connect_outcome
from core.sso.models import SsoConfig, SsoRequest, SsoSeenResponse
from core.sso.sp import (
    REQUEST_TTL,
    AuthnStart,
    ResponseCheck,
    inspect_response,
    request_data_for,
    response_in_response_to,
    sp_endpoints,
    validate_saml_response,
)
from core.sso.testlogin import test_outcome
from core.tenants.access import OFFBOARDED_CODE, Principal, offboarded_message
from core.tenants.audit import record_event
from core.tenants.models import ConsoleAccount, Role, Tenant, TenantStatus

log = logging.getLogger(__name__)


def start_login(
    *, session: Session, tenant_slug: str, relay_state: str | None = None, now: datetime | None = None
) -> AuthnStart:
    """An SP-initiated console sign-in through the tenant's IdP (anyone may start one; only a
    tenant admin of this tenant gets a session at the end).

    Raises:
        NotFound: unknown tenant, or no SSO configured.
    """
    now = now_or(now)
    tenant = tenant_by_slug(session, tenant_slug)
    config = get_config(session, tenant.id)  # type: ignore[arg-type]
    if config is None or tenant.status == TenantStatus.suspended.value:
        raise NotFound(f"{tenant.name} does not sign in through SSO yet: sign in with your password at /auth/login.")
    return start_authn(session, tenant=tenant, config=config, purpose=PURPOSE_SIGN_IN,
                  relay_state=safe_relay_state(relay_state), started_by=None, now=now)



# --- the ACS's statements, built once (building SQLAlchemy statements costs more than running them) ----

_TENANT_T = Tenant.__table__  # type: ignore[attr-defined]
_CONFIG_T = SsoConfig.__table__  # type: ignore[attr-defined]
_REQUEST_T = SsoRequest.__table__  # type: ignore[attr-defined]
_SEEN_T = SsoSeenResponse.__table__  # type: ignore[attr-defined]
_ACS_TARGET_SQL = (
    sa_select(_TENANT_T.c.id, _TENANT_T.c.slug, _TENANT_T.c.name, _TENANT_T.c.status, _CONFIG_T.c.id,
              _CONFIG_T.c.version, _CONFIG_T.c.allow_idp_initiated)
    .select_from(_TENANT_T.outerjoin(_CONFIG_T, _CONFIG_T.c.tenant_id == _TENANT_T.c.id))
    .where(_TENANT_T.c.slug == bindparam("slug"))
)
_REQUEST_SQL = sa_select(
    _REQUEST_T.c.id, _REQUEST_T.c.tenant_id, _REQUEST_T.c.purpose, _REQUEST_T.c.relay_state,
    _REQUEST_T.c.started_by, _REQUEST_T.c.used_at, _REQUEST_T.c.expires_at,
).where(_REQUEST_T.c.request_id == bindparam("request_id"))
_ACCOUNT_SQL = sa_select(
    col(ConsoleAccount.id), col(ConsoleAccount.role), col(ConsoleAccount.email), col(ConsoleAccount.tenant_id),
).where(
    col(ConsoleAccount.email) == bindparam("email"),
    col(ConsoleAccount.role) == Role.tenant_admin.value,
    col(ConsoleAccount.tenant_id) == bindparam("tenant_id"),
    col(ConsoleAccount.disabled).is_(False),
)
# The ACS's writes as hand-written SQL on the session's DB-API connection (core.db.DriverStatements): the
# statement is cheaper than SQLAlchemy's work around it. SQLite (3.35+) and PostgreSQL both take these.
_SEEN_SQL = ("INSERT INTO sso_seen_response (tenant_id, message_id, expires_at) VALUES (?, ?, ?)"
             " ON CONFLICT (tenant_id, message_id) DO NOTHING RETURNING id")
_CONSUME_SQL = "UPDATE sso_request SET used_at = ? WHERE id = ? AND used_at IS NULL"


def _remember_ids(
    session: Session, db: DriverStatements, tenant_id: int, result: ResponseCheck, now: datetime
) -> bool:
    """Record the response and assertion ids under their unique key; False when one was seen before
    (on this replica or any other: the database's unique key decides)."""
    expires = result.expires_at or (now + REQUEST_TTL)
    ids = list(dict.fromkeys([f"r:{result.response_id}"] + [f"a:{a}" for a in result.assertion_ids]))
    if db.dialect in ("sqlite", "postgresql"):
        # Rows returned = rows inserted (psycopg reports no rowcount for it).
        at = db.time(expires)
        return sum(len(db.execute(_SEEN_SQL, (tenant_id, mid[:300], at)).fetchall()) for mid in ids) == len(ids)
    rows = [{"tenant_id": tenant_id, "message_id": mid[:300], "expires_at": expires} for mid in ids]
    try:  # other databases: a savepoint around a plain insert
        with session.begin_nested():
            session.connection().execute(insert(_SEEN_T), rows)
    except IntegrityError:
        return False
    return True


def _request_row(conn: Connection, request_id: str) -> RequestRow | None:
    row = conn.execute(_REQUEST_SQL, {"request_id": request_id[:100]}).first()
    return RequestRow(*row) if row is not None else None



def _acs_target(conn: Connection, slug: str) -> AcsTarget | None:
    """The tenant and the version of its configuration in one light query (the configuration itself is
    loaded only when the cached settings are stale, or for a test's bookkeeping)."""
    if not SLUG_RE.match(slug or ""):
        return None
    row = conn.execute(_ACS_TARGET_SQL, {"slug": slug}).first()
    if row is None:
        return None
    return AcsTarget(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]))


# Refusals an anonymous poster can provoke at will: one audit row per (event, tenant, source, code) and
# window, carrying how many were held back since the previous row (the log has each one).
NOISE_WINDOW_SECONDS = 600
_noise = NoiseAggregator(NOISE_WINDOW_SECONDS)


def _noisy_event(session: Session, *, source: str | None, principal: Principal | str, action: str,
                 tenant_id: int, target: str, details: dict[str, Any], at: datetime) -> None:
    if source is None:
        record_event(session, principal=principal, action=action, tenant_id=tenant_id, target=target,
                     details=details or None, at=at)
        return
    held = _noise.admit((action, tenant_id, source, details.get("code")))
    if held is None:
        log.info("sso: %s for tenant %s from %s (audited once per %d s)", action, tenant_id, source,
                 NOISE_WINDOW_SECONDS)
        return
    record_event(session, principal=principal, action=action, tenant_id=tenant_id, target=target,
                 details={**details, "source": source, "held_back_since_last": held,
                          "window_s": NOISE_WINDOW_SECONDS}, at=at)


def consume_response(
    *,
    session: Session,
    tenant_slug: str,
    saml_response: str,
    relay_state: str | None = None,
    now: datetime | None = None,
    started_here: Callable[[str], bool] | None = None,
    source: str | None = None,
) -> AcsOutcome:
    """Handle a POST to ``/sso/{tenant}/acs``. Never raises for a bad response: the outcome says why.

    ``started_here(request_id)`` says whether the browser posting holds the binding set when it was sent
    to the IdP for that request (core.sso.routes; None for callers without a browser: demo seeding). An
    answer to a request another browser started is refused as ``other_browser`` and the request is left
    unused — a captured response posted from a victim's browser signs nobody in (login CSRF).

    ``source`` is the client address of an anonymous post: the refusals anyone can provoke are then
    audited once per (event, tenant, source) and window, with the number held back since (``_noise``).

    The response must answer an AuthnRequest this tenant sent (unused, unexpired; the request is
    consumed whatever the verdict), unless the tenant opted in to IdP-initiated sign-in; it must pass
    python3-saml's strict validation against the tenant's IdP with bounded clock skew; its ids must
    not have been seen before. A test stores a trace and marks the tenant tested when valid; a
    sign-in resolves the user to a tenant_admin console account of this same tenant and starts a
    session.
    """
    now = now_or(now)
    public = get_settings().public
    # Parse first (no database work for junk), then one query for the tenant and its configuration.
    try:
        raw, root = inspect_response(saml_response)
    except Exception as exc:  # InvalidInput from our parser walls; never a crash
        message = getattr(exc, "message", str(exc))
        return refused(getattr(exc, "code", None) or "malformed", f"The SAML response was refused: {message}",
                        getattr(exc, "fix", None) or "Sign in again.", status=400)
    conn = session.connection()  # once: each session.connection() call costs more than a cached statement
    tenant = _acs_target(conn, tenant_slug)
    if tenant is None:
        return refused("unknown_tenant", "Unknown tenant.", "Check the ACS URL configured at the IdP.", status=404)
    if tenant.status == TenantStatus.offboarded.value:
        return refused(OFFBOARDED_CODE, offboarded_message(tenant.name, OFFBOARDED_SSO),
                        "Ask CRM Bridge staff to restore the tenant if this is a mistake.", status=403)
    if tenant.config_id is None or tenant.config_version is None:
        return refused("not_configured", f"{tenant.name} has no SSO configuration.",
                        "Import the IdP metadata on the SSO page first.", status=404)
    config_id = tenant.config_id

    def load_config() -> SsoConfig:
        cfg = session.get(SsoConfig, config_id)
        assert cfg is not None
        return cfg
    irt = response_in_response_to(root)
    request: RequestRow | None = None
    if irt:
        request = _request_row(conn, irt)
        if request is None:
            return refused("unknown_request", "This response answers a sign-in request CRM Bridge did not send.",
                            "Start the sign-in again from CRM Bridge.")
        if request.tenant_id != tenant.tenant_id:
            return refused("other_tenant", "This response answers a sign-in request of another tenant.",
                            "Start the sign-in again from your own company's sign-in link.")
        if request.used_at is not None:
            return refused("request_used", "This sign-in request was already answered (a response can be used "
                            "once).", "Start the sign-in again.", purpose=request.purpose)
        if (aware(request.expires_at) or now) <= now:
            return refused("request_expired", "This sign-in request expired (10 minutes).", "Start the sign-in "
                            "again.", purpose=request.purpose)
        if started_here is not None and not started_here(irt):
            log.info("sso: response for request %s posted from a browser that did not start it", irt[:40])
            return refused("other_browser", "This sign-in was not started in this browser, so it cannot finish "
                            "here (a sign-in response is only accepted from the browser that asked for it).",
                            f"Start the sign-in again in this browser: {public(f'/sso/{tenant.slug}/login')}",
                            purpose=request.purpose)
        purpose = request.purpose
    else:
        if not tenant.allow_idp_initiated:
            _noisy_event(session, source=source, principal=ACS_PRINCIPAL, action="sso.idp_initiated_refused",
                         tenant_id=tenant.tenant_id, target=f"tenant:{tenant.slug}", details={}, at=now)
            return refused("idp_initiated", "IdP-initiated sign-in is not enabled for this tenant: the response "
                            "does not answer a request from CRM Bridge.",
                            f"Start from CRM Bridge: {public(f'/sso/{tenant.slug}/login')}")
        purpose = PURPOSE_SIGN_IN

    is_test = purpose == PURPOSE_TEST
    with sp_key_settings(session, tenant.tenant_id, tenant.slug, load_config, now) as decrypting:
        result = validate_saml_response(
            settings=cached_acs_settings(tenant.tenant_id, tenant.slug, config_id, tenant.config_version,
                                          load_config),
            saml_response=saml_response,
            request_data=request_data_for(sp_endpoints(tenant.slug).acs_url),
            request_id=irt,
            now=now,
            decrypting=decrypting,
            trace=is_test,
            parsed=(raw, root),
        )
    # Decrypting commits the transaction first (core.vault's use): take its connection anew.
    db = DriverStatements(session.connection())
    if request is not None:
        # Consume the request whatever the verdict: one answer per request, on every replica.
        consumed = db.execute(_CONSUME_SQL, (db.time(now), request.id)).rowcount
        if consumed != 1:
            return refused("request_used", "This sign-in request was already answered.", "Start the sign-in again.",
                            purpose=purpose)
    if result.ok and not _remember_ids(session, db, tenant.tenant_id, result, now):
        result.ok = False
        result.add("Not a replay", False, "this response (or its assertion) was already used")
        result.fail("replay", "This SAML response was already used (replay refused).", "Sign in again.")
    elif result.ok:
        result.add("Not a replay", True)

    if is_test:
        assert request is not None and irt
        return test_outcome(session, tenant=tenant, result=result, request=request, request_id=irt,
                            load_config=load_config, now=now)

    if purpose == PURPOSE_CONNECT:
        assert request is not None  # a connect sign-in always answers our request
        return connect_outcome(session, tenant=tenant, result=result, request=request, now=now)
    if not result.ok:
        _noisy_event(session, source=source, principal=result.email or ACS_PRINCIPAL.email,
                     action="sso.sign_in.refused", tenant_id=tenant.tenant_id, target=f"tenant:{tenant.slug}",
                     details={"code": result.code}, at=now)
        return refused(result.code, f"Single sign-on failed: {result.error}", result.fix or "Sign in again.",
                        purpose=purpose)
    return _sign_in(session, tenant=tenant, result=result,
                    relay=request.relay_state if request is not None else safe_relay_state(relay_state), now=now)


def _sign_in(
    session: Session, *, tenant: AcsTarget, result: ResponseCheck, relay: str | None, now: datetime
) -> AcsOutcome:
    from core.tenants.auth import start_session_lean

    email = result.email
    account = None
    if email:
        account = session.connection().execute(_ACCOUNT_SQL, {"email": email, "tenant_id": tenant.tenant_id}).first()
    if account is None or tenant.status == TenantStatus.suspended.value:
        record_event(session, principal=email or ACS_PRINCIPAL.email, action="sso.sign_in.refused",
                     tenant_id=tenant.tenant_id, target=f"tenant:{tenant.slug}", details={"code": "no_account"},
                     at=now)
        return refused(
            "no_account",
            f"The IdP signed you in as {email or 'an identity without an email address'}, but that is not a "
            f"tenant-admin console account of {tenant.name}.",
            "Ask your CRM Bridge contact to invite this email as a tenant admin (CRM Bridge staff sign in with "
            "their password at /auth/login).",
            purpose=PURPOSE_SIGN_IN,
        )
    # The session row, its audit event and the last sign-in in Core statements (the ORM's unit of work
    # cost this route about 1.5 ms: bench/sso.py's acs_ratio).
    token = start_session_lean(session, account=Principal(role=account[1], email=account[2], account_id=account[0],
                                                          tenant_id=account[3]), method="sso", now=now)
    return AcsOutcome(ok=True, purpose=PURPOSE_SIGN_IN, redirect=get_settings().public(relay or "/"), token=token,
                      code="ok", status_code=303)

