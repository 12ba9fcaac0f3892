"""What every SSO module shares: the purposes of a login, the views they return, and lookups of a
tenant and its IdP configuration. Imports nothing else from core.sso but its models and the SAML glue."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from core.clock import utcnow
from core.errors import NotFound
from core.sso.models import SsoConfig
from core.sso.sp import IdpConfig
from core.tenants.access import OFFBOARDED_CODE, Principal, offboarded_message
from core.tenants.models import Tenant, TenantStatus

PURPOSE_TEST = "test"
PURPOSE_SIGN_IN = "sign_in"
PURPOSE_CONNECT = "connect"  # an app user proves who they are before a connect link takes their CRM login
SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,61}[a-z0-9]$")
ACS_PRINCIPAL = Principal.system("sso-acs")
OFFBOARDED_SSO = "single sign-on to CRM Bridge is closed for its accounts"


@dataclass
class CertSummary:
    use: str
    subject: str
    sha256: str
    not_before: datetime
    not_after: datetime

    def label(self) -> str:
        return f"{self.subject} (SHA-256 {self.sha256[:16]}…, valid until {self.not_after.date().isoformat()})"



@dataclass
class AcsOutcome:
    ok: bool
    purpose: str | None
    redirect: str | None = None
    token: str | None = None
    message: str = ""
    fix: str = ""
    code: str = ""
    trace_id: int | None = None
    status_code: int = 200


@dataclass
class AcsTarget:
    """The tenant an ACS post names and the version of its configuration (one light query)."""

    tenant_id: int
    slug: str
    name: str
    status: str
    config_id: int | None
    config_version: int | None
    allow_idp_initiated: bool


@dataclass
class RequestRow:
    """An AuthnRequest we sent, as the ACS reads it."""

    id: int
    tenant_id: int
    purpose: str
    relay_state: str | None
    started_by: str | None
    used_at: datetime | None
    expires_at: datetime


def now_or(now: datetime | None) -> datetime:
    return now or utcnow()


def get_tenant(session: Session, tenant_id: int) -> Tenant:
    t = session.get(Tenant, tenant_id)
    if t is None:
        raise NotFound(f"Tenant {tenant_id} does not exist: pick one from the Tenants page.")
    return t


def get_config(session: Session, tenant_id: int) -> SsoConfig | None:
    return session.exec(select(SsoConfig).where(SsoConfig.tenant_id == tenant_id)).first()


def cert_summaries(certs_json: str) -> list[CertSummary]:
    out = []
    for c in json.loads(certs_json or "[]"):
        out.append(CertSummary(
            use=c["use"], subject=c["subject"], sha256=c["sha256"],
            not_before=datetime.fromisoformat(c["not_before"]), not_after=datetime.fromisoformat(c["not_after"]),
        ))
    return out


def _signing_der(config: SsoConfig) -> tuple[str, ...]:
    return tuple(c["der_b64"] for c in json.loads(config.certs_json or "[]") if c["use"] in ("signing", "both"))


def idp_config(config: SsoConfig) -> IdpConfig:
    return IdpConfig(
        entity_id=config.idp_entity_id,
        sso_url=config.sso_url,
        sso_binding=config.sso_binding,
        signing_certs=_signing_der(config),
        slo_url=config.slo_url,
        want_authn_requests_signed=config.want_authn_requests_signed,
    )


def safe_relay_state(value: str | None) -> str | None:
    """Only a relative path on this server may follow a sign-in (no scheme, no //host, no \\)."""
    if not value or len(value) > 500:
        return None
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return None
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value) or ":" in value.split("?", 1)[0]:
        return None
    return value



def tenant_by_slug(session: Session, slug: str) -> Tenant:
    if not SLUG_RE.match(slug or ""):
        raise NotFound("Unknown tenant: check the address.")
    t = session.exec(select(Tenant).where(Tenant.slug == slug)).first()
    if t is None:
        raise NotFound("Unknown tenant: check the address.")
    if t.status == TenantStatus.offboarded.value:
        raise NotFound(offboarded_message(t.name, OFFBOARDED_SSO), code=OFFBOARDED_CODE)
    return t



def rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def refused(code: str, message: str, fix: str, *, purpose: str | None = None, status: int = 403,
             trace_id: int | None = None) -> AcsOutcome:
    return AcsOutcome(ok=False, purpose=purpose, message=message, fix=fix, code=code, status_code=status,
                      trace_id=trace_id)

