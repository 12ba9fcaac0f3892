"""The certificate watch: IdP certificates expiring or expired and metadata past validUntil as
findings (an audit event the first time each threshold is crossed), the SP key rollover their dates
require, a timeline of every certificate for the SSO page, and the purge of expired replay-cache and
request rows. Run daily (``crmbridge sso watch``, the scheduler)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from core.clock import aware
from core.sso.common import cert_summaries, get_config, now_or, rowcount
from core.sso.keys import ensure_sp_keys, published_keys
from core.sso.models import SsoCertNotice, SsoConfig, SsoRequest, SsoSeenResponse
from core.tenants.access import Principal, require_staff, require_tenant
from core.tenants.audit import record_event

CERT_THRESHOLDS = ((0, "expired"), (7, "7"), (30, "30"), (90, "90"))


@dataclass
class CertFinding:
    tenant_id: int
    severity: str
    code: str
    message: str
    fix: str
    sha256: str | None = None
    not_after: datetime | None = None
    new: bool = False



def _threshold(days_left: float) -> str | None:
    for limit, name in CERT_THRESHOLDS:
        if days_left <= limit:
            return name
    return None


def watch_certificates(
    *, session: Session, principal: Principal, now: datetime | None = None, tenant_id: int | None = None,
    record: bool = True,
) -> list[CertFinding]:
    """IdP certificates expiring within 90/30/7 days or expired, and metadata past validUntil, as
    findings; each certificate crossing a threshold for the first time writes an audit event. Also
    rolls the SP keys of tenants that have them when their dates require (see ``ensure_sp_keys``). ``record=False``
    only computes the findings (pages): nothing is written.

    Staff (or the system scheduler) for every tenant; a tenant admin for their own."""
    now = now_or(now)
    if tenant_id is None:
        require_staff(principal)
        configs = list(session.exec(select(SsoConfig)).all())
    else:
        require_tenant(principal, tenant_id)
        configs = [c for c in [get_config(session, tenant_id)] if c is not None]
    findings: list[CertFinding] = []
    for config in configs:
        certs = cert_summaries(config.certs_json)
        signing = [c for c in certs if c.use in ("signing", "both")]
        # During a rollover, sign-in keeps working while any signing certificate is current.
        any_current = any(c.not_after > now for c in signing)
        for c in certs:
            days = (c.not_after - now).total_seconds() / 86400
            level = _threshold(days)
            if level is None:
                continue
            if level == "expired":
                severity = "warning" if any_current or c.use == "encryption" else "error"
                code, msg = "idp_cert_expired", f"IdP {c.use} certificate {c.label()} has expired."
                fix = ("Sign-in still verifies (SAML trusts keys, not dates) but the IdP will replace it: roll it "
                       "over at the IdP and re-import the metadata.")
            else:
                severity = {"7": "error", "30": "warning", "90": "info"}[level]
                code = f"idp_cert_expiring_{level}"
                msg = f"IdP {c.use} certificate {c.label()} expires in {int(days)} day(s)."
                fix = ("Add the new certificate at the IdP, re-import the metadata so both are trusted during the "
                       "rollover, then remove the old one.")
            exists = session.exec(select(SsoCertNotice.id).where(
                SsoCertNotice.tenant_id == config.tenant_id, SsoCertNotice.cert_sha256 == c.sha256,
                SsoCertNotice.threshold == level)).first()
            new = exists is None
            if new and record:
                session.add(SsoCertNotice(tenant_id=config.tenant_id, cert_sha256=c.sha256, threshold=level,
                                          not_after=c.not_after, noticed_at=now))
                record_event(session, principal=principal,
                             action="sso.cert.expired" if level == "expired" else "sso.cert.expiring",
                             tenant_id=config.tenant_id, target=f"cert:{c.sha256[:16]}",
                             details={"threshold": level, "use": c.use, "subject": c.subject,
                                      "not_after": c.not_after, "sha256": c.sha256}, at=now)
            findings.append(CertFinding(config.tenant_id, severity, code, msg, fix, c.sha256, c.not_after, new))
        vu = aware(config.valid_until)
        if vu is not None and vu <= now:
            findings.append(CertFinding(config.tenant_id, "error", "metadata_expired",
                                        f"The IdP metadata expired on {vu.isoformat()} (validUntil).",
                                        "Re-import fresh metadata from the IdP (its metadata URL)."))
        if record:
            config.last_cert_check_at = now
            session.add(config)
            if published_keys(session, config.tenant_id):  # roll keys that exist; creating them is a tenant's step
                ensure_sp_keys(session=session, principal=principal, tenant_id=config.tenant_id, now=now)
    if record:
        session.flush()
    return findings


@dataclass
class TimelineEntry:
    owner: str  # "IdP" | "SP"
    use: str
    subject: str
    sha256: str
    not_before: datetime
    not_after: datetime
    days_left: int
    state: str


def certificate_timeline(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> list[TimelineEntry]:
    """Every IdP certificate of the configuration and every published SP key, with dates."""
    require_tenant(principal, tenant_id)
    now = now_or(now)
    out: list[TimelineEntry] = []
    config = get_config(session, tenant_id)
    if config is not None:
        for c in cert_summaries(config.certs_json):
            days = int((c.not_after - now).total_seconds() // 86400)
            state = "expired" if days < 0 else ("not yet valid" if c.not_before > now else "valid")
            out.append(TimelineEntry("IdP", c.use, c.subject, c.sha256, c.not_before, c.not_after, days, state))
    for k in published_keys(session, tenant_id):
        nb, na = aware(k.not_before), aware(k.not_after)
        assert nb is not None and na is not None
        out.append(TimelineEntry("SP", "signing+encryption", f"CRM Bridge SP ({k.state})", k.cert_sha256, nb, na,
                                 int((na - now).total_seconds() // 86400), k.state))
    return out


def purge_expired(*, session: Session, now: datetime | None = None) -> int:
    """Delete replay-cache rows and AuthnRequests past their expiry (kept a day for traces)."""
    from sqlalchemy import delete

    now = now_or(now)
    n = rowcount(session.execute(delete(SsoSeenResponse).where(col(SsoSeenResponse.expires_at) < now)))
    n += rowcount(session.execute(
        delete(SsoRequest).where(col(SsoRequest.expires_at) < now - timedelta(days=1))
    ))
    return int(n)
