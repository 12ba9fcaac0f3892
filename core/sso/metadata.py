"""IdP metadata per tenant: lint, fetch (SSRF rules), preview and import, the options of an imported
configuration (IdP-initiated sign-in, a pinned signing certificate), and its status for pages,
posture and onboarding. Importing writes the configuration and an audit event, nothing else: SP
keys are a separate step (core.sso.keys.ensure_sp_keys)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel import Session

from core.clock import aware
from core.errors import MetadataInvalid, NotFound
from core.settings import get_settings
from core.sso.common import CertSummary, cert_summaries, get_config, get_tenant, now_or
from core.sso.fetch import FetchResult, Resolver, fetch_metadata
from core.sso.keys import published_keys
from core.sso.lint import BINDING_POST, BINDING_REDIRECT, LintReport, cert_pem, lint_metadata
from core.sso.models import SsoConfig, SsoSpKey
from core.sso.sp import sp_endpoints
from core.tenants.access import Principal, require_staff, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import Tenant


@dataclass
class ImportDiff:
    entity_id: tuple[str | None, str | None] | None = None
    endpoints_added: list[tuple[str, str]] = field(default_factory=list)
    endpoints_removed: list[tuple[str, str]] = field(default_factory=list)
    certs_added: list[CertSummary] = field(default_factory=list)
    certs_removed: list[CertSummary] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.entity_id or self.endpoints_added or self.endpoints_removed or self.certs_added
                    or self.certs_removed)


@dataclass
class ImportPreview:
    report: LintReport
    diff: ImportDiff | None  # None when the tenant has no configuration yet
    sha256: str


@dataclass
class SpInfo:
    entity_id: str
    acs_url: str
    metadata_url: str
    login_url: str
    test_url: str
    certs: list[dict[str, Any]]


@dataclass
class SsoStatus:
    configured: bool
    tested: bool
    tested_at: datetime | None
    last_test_ok: bool | None
    idp_entity_id: str | None
    sso_url: str | None
    sso_binding: str | None
    source: str | None
    source_url: str | None
    imported_at: datetime | None
    imported_by: str | None
    allow_idp_initiated: bool
    certs: list[CertSummary]
    lint: dict[str, Any]
    sp: SpInfo



def lint_document(
    data: bytes, *, entity_id: str | None = None, pinned_cert_pem: str | None = None, now: datetime | None = None
) -> LintReport:
    return lint_metadata(data, entity_id=entity_id, pinned_certs=[pinned_cert_pem] if pinned_cert_pem else None,
                         now=now_or(now))


def fetch_document(
    url: str, *, resolver: Resolver | None = None, transport: Any = None, verify: Any = None
) -> FetchResult:
    """Fetch metadata from a URL under the SSRF rules (core.sso.fetch). In demo mode the sandbox's CA
    is trusted too.

    Raises:
        MetadataInvalid: the URL or a hop is refused, too large, too slow or unreachable.
    """
    s = get_settings()
    if verify is None:
        verify = True
        if s.demo and s.sandbox_ca_file and s.sandbox_ca_file.exists():
            import ssl

            ctx = ssl.create_default_context()
            ctx.load_verify_locations(cafile=str(s.sandbox_ca_file))
            verify = ctx
    return fetch_metadata(url, demo=s.demo, resolver=resolver, transport=transport, verify=verify)


def _diff(config: SsoConfig | None, report: LintReport) -> ImportDiff | None:
    if config is None:
        return None
    d = ImportDiff()
    if config.idp_entity_id != report.entity_id:
        d.entity_id = (config.idp_entity_id, report.entity_id)
    old_eps = {(e["binding"], e["url"]) for e in json.loads(config.endpoints_json or "[]")}
    new_eps = {(e.binding, e.url) for e in report.sso}
    d.endpoints_added = sorted(new_eps - old_eps)
    d.endpoints_removed = sorted(old_eps - new_eps)
    old = {c.sha256: c for c in cert_summaries(config.certs_json)}
    new = {c.sha256: CertSummary(c.use, c.subject, c.sha256, c.not_before, c.not_after) for c in report.certs}
    d.certs_added = [new[h] for h in new if h not in old]
    d.certs_removed = [old[h] for h in old if h not in new]
    return d


def preview_import(
    *,
    session: Session,
    principal: Principal,
    tenant_id: int,
    data: bytes,
    entity_id: str | None = None,
    now: datetime | None = None,
) -> ImportPreview:
    """Lint ``data`` and show what replacing the tenant's configuration would change. Writes nothing."""
    require_tenant(principal, tenant_id)
    config = get_config(session, tenant_id)
    report = lint_document(data, entity_id=entity_id, pinned_cert_pem=config.pinned_cert_pem if config else None,
                           now=now)
    diff = _diff(config, report) if report.usable else None
    return ImportPreview(report=report, diff=diff, sha256=hashlib.sha256(data).hexdigest())


def _pick_sso(report: LintReport) -> tuple[str, str]:
    for binding in (BINDING_REDIRECT, BINDING_POST):
        for e in report.sso:
            if e.binding == binding and e.url.lower().startswith(("https://", "http://")):
                return binding, e.url
    raise MetadataInvalid("No usable SSO endpoint.", code="no_usable_sso_binding")


def apply_import(
    *,
    session: Session,
    principal: Principal,
    tenant_id: int,
    data: bytes,
    entity_id: str | None = None,
    source: str = "upload",
    source_url: str | None = None,
    now: datetime | None = None,
) -> SsoConfig:
    """Replace (or create) the tenant's IdP configuration with ``data``.

    Nothing is written unless the document is usable: a rejected import leaves the configuration in
    force unchanged. A change of entity ID, endpoint or certificate resets the "tested" state. SP keys
    are not touched: generating them is its own step (core.sso.keys.ensure_sp_keys).

    Raises:
        AccessDenied; MetadataInvalid naming the first error and its fix.
    """
    require_tenant(principal, tenant_id)
    now = now_or(now)
    tenant = get_tenant(session, tenant_id)
    config = get_config(session, tenant_id)
    report = lint_document(data, entity_id=entity_id, pinned_cert_pem=config.pinned_cert_pem if config else None,
                           now=now)
    if not report.usable:
        first = report.errors[0]
        more = f" ({len(report.errors) - 1} more error(s) in the lint report)" if len(report.errors) > 1 else ""
        raise MetadataInvalid(
            f"The metadata cannot be used: {first.message}{more} The configuration in force is unchanged.",
            fix=first.fix,
            code=first.code,
        )
    diff = _diff(config, report)
    binding, url = _pick_sso(report)
    slo = next((e.url for e in report.slo if e.binding == BINDING_REDIRECT), None)
    certs = [{**c.to_json(), "der_b64": c.der_b64} for c in report.certs]
    fields: dict[str, Any] = {
        "idp_entity_id": report.entity_id or "",
        "sso_url": url,
        "sso_binding": binding,
        "slo_url": slo,
        "certs_json": json.dumps(certs),
        "endpoints_json": json.dumps([e.to_json() for e in report.sso]),
        "name_id_formats_json": json.dumps(report.name_id_formats)[:4000],
        "want_authn_requests_signed": report.want_authn_requests_signed,
        "metadata_xml": data.decode("utf-8", errors="replace"),
        "metadata_sha256": hashlib.sha256(data).hexdigest(),
        "source": source,
        "source_url": source_url,
        "valid_until": report.valid_until,
        "lint_json": json.dumps(report.to_json()),
        "imported_at": now,
        "imported_by": principal.email,
    }
    if config is None:
        config = SsoConfig(tenant_id=tenant_id, version=1, **fields)
        changed = True
    else:
        changed = diff is not None and not diff.empty
        for k, v in fields.items():
            setattr(config, k, v)
        config.version += 1
        if changed:
            config.tested_at = None
            config.last_test_ok = None
    session.add(config)
    session.flush()
    details: dict[str, Any] = {"entity_id": report.entity_id, "source": source, "sha256": fields["metadata_sha256"]}
    if source_url:
        details["url"] = source_url
    if diff is not None:
        details["diff"] = {
            "entity_id": list(diff.entity_id) if diff.entity_id else None,
            "endpoints_added": diff.endpoints_added,
            "endpoints_removed": diff.endpoints_removed,
            "certs_added": [c.sha256 for c in diff.certs_added],
            "certs_removed": [c.sha256 for c in diff.certs_removed],
        }
    record_event(session, principal=principal, action="sso.metadata.import" if diff is None else "sso.metadata.replace",
                 tenant_id=tenant_id, target=f"tenant:{tenant.slug}", details=details, at=now)
    return config


def set_idp_initiated(*, session: Session, principal: Principal, tenant_id: int, allowed: bool) -> SsoConfig:
    """Opt in (or out) of IdP-initiated sign-in. Staff only: it weakens the request-id binding."""
    require_staff(principal)
    config = get_config(session, tenant_id)
    if config is None:
        raise NotFound("This tenant has no SSO configuration yet: import the IdP metadata first.")
    config.allow_idp_initiated = allowed
    config.version += 1
    session.add(config)
    record_event(session, principal=principal, action="sso.idp_initiated", tenant_id=tenant_id,
                 target=f"tenant:{tenant_id}", details={"allowed": allowed})
    return config


def set_pinned_certificate(
    *, session: Session, principal: Principal, tenant_id: int, cert_pem_text: str | None
) -> SsoConfig:
    """Pin (or unpin) the certificate re-imported metadata must be signed with."""
    require_tenant(principal, tenant_id)
    from core.sso.lint import load_certificate

    config = get_config(session, tenant_id)
    if config is None:
        raise NotFound("This tenant has no SSO configuration yet: import the IdP metadata first.")
    pem = None
    sha = None
    if cert_pem_text and cert_pem_text.strip():
        try:
            cert, _ = load_certificate(cert_pem_text)
        except ValueError as exc:
            raise MetadataInvalid("That is not an X.509 certificate.", fix="Paste the PEM (-----BEGIN "
                                  "CERTIFICATE-----…) of the IdP's metadata-signing certificate.") from exc
        from cryptography.hazmat.primitives import serialization

        der = cert.public_bytes(serialization.Encoding.DER)
        import base64

        pem = cert_pem(base64.b64encode(der).decode())
        sha = hashlib.sha256(der).hexdigest()
    config.pinned_cert_pem = pem
    session.add(config)
    record_event(session, principal=principal, action="sso.metadata.pin", tenant_id=tenant_id,
                 target=f"tenant:{tenant_id}", details={"sha256": sha})
    return config


# --- status -------------------------------------------------------------------------------------------------


def sp_info(tenant: Tenant, keys: list[SsoSpKey]) -> SpInfo:
    ep = sp_endpoints(tenant.slug)
    return SpInfo(
        entity_id=ep.entity_id, acs_url=ep.acs_url, metadata_url=ep.metadata_url, login_url=ep.login_url,
        test_url=get_settings().public(f"/sso/{tenant.slug}/test"),
        certs=[{"state": k.state, "sha256": k.cert_sha256, "not_after": aware(k.not_after)} for k in keys],
    )


def get_status(*, session: Session, principal: Principal, tenant_id: int) -> SsoStatus:
    require_tenant(principal, tenant_id)
    tenant = get_tenant(session, tenant_id)
    config = get_config(session, tenant_id)
    keys = published_keys(session, tenant_id)
    sp = sp_info(tenant, keys)
    if config is None:
        return SsoStatus(False, False, None, None, None, None, None, None, None, None, None, False, [], {}, sp)
    return SsoStatus(
        configured=True,
        tested=config.tested_at is not None and bool(config.last_test_ok),
        tested_at=aware(config.tested_at),
        last_test_ok=config.last_test_ok,
        idp_entity_id=config.idp_entity_id,
        sso_url=config.sso_url,
        sso_binding=config.sso_binding,
        source=config.source,
        source_url=config.source_url,
        imported_at=aware(config.imported_at),
        imported_by=config.imported_by,
        allow_idp_initiated=config.allow_idp_initiated,
        certs=cert_summaries(config.certs_json),
        lint=json.loads(config.lint_json or "{}"),
        sp=sp,
    )


def sso_summary(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> dict[str, Any]:
    """What posture needs: configured, tested, last test, earliest signing-certificate expiry."""
    require_tenant(principal, tenant_id)
    config = get_config(session, tenant_id)
    if config is None:
        return {"configured": False, "tested": False, "tested_at": None, "last_test_ok": None,
                "signing_cert_expires": None, "metadata_valid_until": None}
    signing = [c for c in cert_summaries(config.certs_json) if c.use in ("signing", "both")]
    latest = max((c.not_after for c in signing), default=None)
    return {
        "configured": True,
        "tested": config.tested_at is not None and bool(config.last_test_ok),
        "tested_at": aware(config.tested_at),
        "last_test_ok": config.last_test_ok,
        # With several signing certificates (a rollover), sign-in breaks only when the last one goes.
        "signing_cert_expires": latest,
        "metadata_valid_until": aware(config.valid_until),
    }

