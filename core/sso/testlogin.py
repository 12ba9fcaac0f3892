"""Test logins and traces: a tenant admin checks the IdP configuration end to end (the ACS validates
the answer, stores a trace and marks SSO tested; no session is created), or pastes a captured
SAMLResponse to see every check the ACS would make."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from core.clock import aware
from core.errors import NotFound
from core.settings import get_settings
from core.sso.authn import acs_settings, sp_key_settings, start_authn
from core.sso.common import (
    ACS_PRINCIPAL,
    PURPOSE_TEST,
    AcsOutcome,
    AcsTarget,
    RequestRow,
    get_config,
    get_tenant,
    now_or,
)
from core.sso.keys import ensure_sp_keys
from core.sso.models import SsoConfig, SsoRequest, SsoTrace
from core.sso.sp import (
    AuthnStart,
    ResponseCheck,
    inspect_response,
    request_data_for,
    response_in_response_to,
    sp_endpoints,
    validate_saml_response,
)
from core.tenants.access import Principal, require_tenant
from core.tenants.audit import record_event


def start_test_login(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> AuthnStart:
    """Start a test login: the ACS validates the answer, stores a trace, never creates a session."""
    require_tenant(principal, tenant_id)
    now = now_or(now)
    tenant = get_tenant(session, tenant_id)
    config = get_config(session, tenant_id)
    if config is None:
        raise NotFound("Import the IdP metadata before testing the login.")
    ensure_sp_keys(session=session, principal=principal, tenant_id=tenant_id, now=now)
    start = start_authn(session, tenant=tenant, config=config, purpose=PURPOSE_TEST, relay_state=None,
                   started_by=principal.email, now=now)
    record_event(session, principal=principal, action="sso.test.start", tenant_id=tenant_id,
                 target=f"sso_request:{start.request_id}", at=now)
    return start



def store_trace(
    session: Session, *, tenant_id: int, source: str, result: ResponseCheck, request_id: str | None,
    created_by: str | None, now: datetime, extra: list[dict[str, Any]] | None = None,
) -> SsoTrace:
    checks = [c.to_json() for c in result.checks] + (extra or [])
    trace = SsoTrace(
        tenant_id=tenant_id, source=source, request_id=request_id, ok=result.ok,
        error=(result.error or None) and f"{result.error} — {result.fix}"[:2000],
        name_id=(result.name_id or "").strip()[:500] or None, skew_seconds=result.skew_seconds,
        checks_json=json.dumps(checks), decoded_xml=result.decoded_xml, created_by=created_by, created_at=now,
    )
    session.add(trace)
    session.flush()
    return trace



def test_outcome(
    session: Session, *, tenant: AcsTarget, result: ResponseCheck, request: RequestRow, request_id: str,
    load_config: Callable[[], SsoConfig], now: datetime,
) -> AcsOutcome:
    """The ACS's answer to a test login: a trace, the tested state, an audit event; never a session."""
    trace = store_trace(session, tenant_id=tenant.tenant_id, source="test", result=result,
                         request_id=request_id, created_by=request.started_by, now=now)
    config = load_config()
    config.last_test_ok = result.ok
    if result.ok:
        config.tested_at = now
    session.add(config)
    record_event(session, principal=request.started_by or ACS_PRINCIPAL.email,
                 action="sso.test.passed" if result.ok else "sso.test.failed", tenant_id=tenant.tenant_id,
                 target=f"sso_trace:{trace.id}",
                 details={"code": result.code, "name_id": trace.name_id, "skew_s": result.skew_seconds}, at=now)
    back = get_settings().public(f"/sso?trace={trace.id}&tenant={tenant.slug}")  # staff land on this tenant's page
    return AcsOutcome(ok=result.ok, purpose=PURPOSE_TEST, redirect=back,
                      message="Test login passed: no session was created." if result.ok else (result.error or ""),
                      fix=result.fix or "", code=result.code, trace_id=trace.id)


def check_pasted_response(
    *, session: Session, principal: Principal, tenant_id: int, saml_response: str, now: datetime | None = None
) -> SsoTrace:
    """Check a captured SAMLResponse (base64) against the tenant's configuration and store a trace.

    Consumes no request, records no replay id, never creates a session, never marks SSO tested."""
    require_tenant(principal, tenant_id)
    now = now_or(now)
    tenant = get_tenant(session, tenant_id)
    config = get_config(session, tenant_id)
    if config is None:
        raise NotFound("Import the IdP metadata before checking a response.")
    irt = None
    extra: list[dict[str, Any]] = []
    try:
        _raw, root = inspect_response(saml_response)
        irt = response_in_response_to(root)
    except Exception:
        root = None
    if root is not None:
        if irt:
            req = session.exec(select(SsoRequest).where(SsoRequest.request_id == irt[:100])).first()
            if req is None:
                extra.append({"name": "Answers a request CRM Bridge sent", "ok": False,
                              "detail": f"{irt}: unknown (the ACS would refuse it)"})
            elif req.tenant_id != tenant_id:
                extra.append({"name": "Answers a request CRM Bridge sent", "ok": False,
                              "detail": f"{irt}: a request of another tenant"})
            else:
                state = "already used" if req.used_at else "unused"
                extra.append({"name": "Answers a request CRM Bridge sent", "ok": req.used_at is None,
                              "detail": f"{irt} ({req.purpose}; {state})"})
        else:
            extra.append({"name": "Answers a request CRM Bridge sent", "ok": config.allow_idp_initiated,
                          "detail": "IdP-initiated (no InResponseTo): "
                          + ("allowed for this tenant" if config.allow_idp_initiated else "refused by the ACS")})
    with sp_key_settings(session, tenant_id, tenant.slug, lambda: config, now) as decrypting:
        result = validate_saml_response(
            settings=acs_settings(tenant, config), saml_response=saml_response,
            request_data=request_data_for(sp_endpoints(tenant.slug).acs_url), request_id=irt, now=now,
            decrypting=decrypting, trace=True,
        )
    trace = store_trace(session, tenant_id=tenant_id, source="paste", result=result, request_id=irt,
                         created_by=principal.email, now=now, extra=extra)
    record_event(session, principal=principal, action="sso.response.checked", tenant_id=tenant_id,
                 target=f"sso_trace:{trace.id}", details={"ok": result.ok, "code": result.code}, at=now)
    return trace


@dataclass
class TraceView:
    id: int
    source: str
    ok: bool
    error: str | None
    name_id: str | None
    skew_seconds: float | None
    checks: list[dict[str, Any]]
    decoded_xml: str
    created_by: str | None
    created_at: datetime


def list_traces(*, session: Session, principal: Principal, tenant_id: int, limit: int = 10) -> list[TraceView]:
    require_tenant(principal, tenant_id)
    rows = session.exec(
        select(SsoTrace).where(SsoTrace.tenant_id == tenant_id).order_by(col(SsoTrace.id).desc()).limit(limit)
    ).all()
    return [
        TraceView(id=r.id, source=r.source, ok=r.ok, error=r.error, name_id=r.name_id,  # type: ignore[arg-type]
                  skew_seconds=r.skew_seconds, checks=json.loads(r.checks_json or "[]"), decoded_xml=r.decoded_xml,
                  created_by=r.created_by, created_at=aware(r.created_at))  # type: ignore[arg-type]
        for r in rows
    ]

