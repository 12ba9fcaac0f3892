"""SSO services: import and lint IdP metadata per tenant, SP keys in the vault, SP-initiated logins,
the ACS (test logins, tenant-admin sign-in, and the sign-in a connect link asks of an app user
first), pasted-response checks and the certificate watch.

Every service checks access with core.tenants.access first (the ACS and the SP metadata are the
public ends of the protocol and check the SAML instead), writes an audit event for each change,
and keeps secrets out of rows, logs and messages: the SP private keys live in the vault.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from onelogin.saml2.settings import OneLogin_Saml2_Settings
from sqlalchemy import bindparam, insert, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.accounts.secrets import open_platform, seal_platform
from core.clock import aware, utcnow
from core.errors import CredentialInvalid, InvalidInput, MetadataInvalid, NotFound
from core.ratelimit import NoiseAggregator
from core.settings import get_settings
from core.sso.fetch import FetchResult, Resolver, fetch_metadata
from core.sso.lint import (
    BINDING_POST,
    BINDING_REDIRECT,
    LintReport,
    cert_pem,
    lint_metadata,
)
from core.sso.models import SsoCertNotice, SsoConfig, SsoRequest, SsoSeenResponse, SsoSpKey, SsoTrace
from core.sso.sp import (
    REQUEST_TTL,
    AuthnStart,
    IdpConfig,
    ResponseCheck,
    build_authn_request,
    build_settings_dict,
    inspect_response,
    make_settings,
    make_sp_key,
    request_data_for,
    response_in_response_to,
    sp_endpoints,
    sp_metadata_xml,
    validate_saml_response,
)
from core.tenants.access import OFFBOARDED_CODE, Principal, offboarded_message, require_staff, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import ConsoleAccount, Role, Tenant, TenantStatus

log = logging.getLogger(__name__)

PURPOSE_TEST = "test"
PURPOSE_SIGN_IN = "sign_in"
PURPOSE_CONNECT = "connect"  # an app user proves who they are before a connect link takes their CRM login
CONNECT_PASS_COOKIE = "crmbridge_connect_sso"
CONNECT_PASS_TTL = timedelta(minutes=15)
CONNECT_START_TTL = timedelta(minutes=10)
SP_ROLLOVER_DAYS = 30  # start publishing the next SP key this long before the active one expires
SP_ACTIVATE_AFTER = timedelta(days=7)  # IdPs refresh metadata daily: switch a week after publishing
CERT_THRESHOLDS = ((0, "expired"), (7, "7"), (30, "30"), (90, "90"))
SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,61}[a-z0-9]$")
ACS_PRINCIPAL = Principal.system("sso-acs")
VAULT_PURPOSE = "saml-sp-key-{id}"


# --- views --------------------------------------------------------------------------------------------------


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


# --- helpers ------------------------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    return now or utcnow()


def _tenant(session: Session, tenant_id: int) -> Tenant:
    t = session.get(Tenant, tenant_id)
    if t is None:
        raise NotFound(f"Tenant {tenant_id} does not exist: pick one from the Tenants page.")
    return t


def _config(session: Session, tenant_id: int) -> SsoConfig | None:
    return session.exec(select(SsoConfig).where(SsoConfig.tenant_id == tenant_id)).first()


def _cert_summaries(certs_json: str) -> list[CertSummary]:
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


_settings_lock = threading.Lock()
_settings_cache: OrderedDict[tuple[Any, ...], OneLogin_Saml2_Settings] = OrderedDict()
_metadata_cache: dict[tuple[Any, ...], tuple[str, datetime]] = {}


def acs_settings(tenant: Tenant, config: SsoConfig) -> OneLogin_Saml2_Settings:
    """The tenant's validation settings (strict, no private key), cached per configuration version.

    Holds no secret, so sharing it between requests is safe."""
    assert tenant.id is not None and config.id is not None
    return _cached_acs_settings(tenant.id, tenant.slug, config.id, config.version, lambda: config)


def _cached_acs_settings(
    tenant_id: int, slug: str, config_id: int, version: int, load: Callable[[], SsoConfig]
) -> OneLogin_Saml2_Settings:
    key = (tenant_id, slug, config_id, version, get_settings().public_url)
    with _settings_lock:
        cached = _settings_cache.get(key)
        if cached is not None:
            _settings_cache.move_to_end(key)
            return cached
    config = load()
    d = build_settings_dict(sp=sp_endpoints(slug), idp=idp_config(config))
    d["security"]["authnRequestsSigned"] = False  # validation never signs
    s = make_settings(d)
    with _settings_lock:
        _settings_cache[key] = s
        while len(_settings_cache) > 512:
            _settings_cache.popitem(last=False)
    return s


# --- lint and import ----------------------------------------------------------------------------------------


def lint_document(
    data: bytes, *, entity_id: str | None = None, pinned_cert_pem: str | None = None, now: datetime | None = None
) -> LintReport:
    return lint_metadata(data, entity_id=entity_id, pinned_certs=[pinned_cert_pem] if pinned_cert_pem else None,
                         now=_now(now))


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
    old = {c.sha256: c for c in _cert_summaries(config.certs_json)}
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
    config = _config(session, tenant_id)
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
    force unchanged. A change of entity ID, endpoint or certificate resets the "tested" state.

    Raises:
        AccessDenied; MetadataInvalid naming the first error and its fix.
    """
    require_tenant(principal, tenant_id)
    now = _now(now)
    tenant = _tenant(session, tenant_id)
    config = _config(session, tenant_id)
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
    ensure_sp_keys(session=session, principal=principal, tenant_id=tenant_id, now=now)
    return config


def set_idp_initiated(*, session: Session, principal: Principal, tenant_id: int, allowed: bool) -> SsoConfig:
    """Opt in (or out) of IdP-initiated sign-in. Staff only: it weakens the request-id binding."""
    require_staff(principal)
    config = _config(session, tenant_id)
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

    config = _config(session, tenant_id)
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
    tenant = _tenant(session, tenant_id)
    config = _config(session, tenant_id)
    keys = _published_keys(session, tenant_id)
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
        certs=_cert_summaries(config.certs_json),
        lint=json.loads(config.lint_json or "{}"),
        sp=sp,
    )


def sso_summary(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> dict[str, Any]:
    """What posture needs: configured, tested, last test, earliest signing-certificate expiry."""
    require_tenant(principal, tenant_id)
    config = _config(session, tenant_id)
    if config is None:
        return {"configured": False, "tested": False, "tested_at": None, "last_test_ok": None,
                "signing_cert_expires": None, "metadata_valid_until": None}
    signing = [c for c in _cert_summaries(config.certs_json) if c.use in ("signing", "both")]
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


# --- SP keys (private keys in the vault) --------------------------------------------------------------------


def _published_keys(session: Session, tenant_id: int) -> list[SsoSpKey]:
    rows = session.exec(
        select(SsoSpKey).where(SsoSpKey.tenant_id == tenant_id, col(SsoSpKey.state).in_(("active", "next")))
        .order_by(col(SsoSpKey.id))
    ).all()
    return list(rows)


def _active_key(keys: list[SsoSpKey]) -> SsoSpKey | None:
    active = [k for k in keys if k.state == "active"]
    return active[-1] if active else None


def _new_key(session: Session, *, principal: Principal, tenant: Tenant, state: str, now: datetime) -> SsoSpKey:
    from core.vault import service as vault
    from core.vault.models import CredentialKind

    material = make_sp_key(f"CRM Bridge SP {tenant.slug}", now=now)
    row = SsoSpKey(
        tenant_id=tenant.id,  # type: ignore[arg-type]
        state=state, cert_pem=material.cert_pem, cert_sha256=material.cert_sha256, vault_ref="",
        not_before=material.not_before, not_after=material.not_after, created_at=now,
        activated_at=now if state == "active" else None,
    )
    session.add(row)
    session.flush()
    ref = vault.put(
        session, principal=principal, tenant_id=tenant.id,  # type: ignore[arg-type]
        purpose=VAULT_PURPOSE.format(id=row.id), secret=material.key_pem,
        kind=CredentialKind.private_key.value, ttl=(material.not_after - now) + timedelta(days=30), now=now,
    )
    row.vault_ref = str(ref)
    session.add(row)
    record_event(session, principal=principal, action="sso.sp_key.create", tenant_id=tenant.id,
                 target=f"sso_sp_key:{row.id}", details={"state": state, "sha256": row.cert_sha256,
                                                          "not_after": row.not_after}, at=now)
    return row


def ensure_sp_keys(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> list[SsoSpKey]:
    """The tenant's published SP keys, creating and rolling them as their dates require:

    no key → an active one; the active key within 30 days of expiry → a next key, published beside it;
    a next key published for 7 days (or the active one about to expire) → it becomes active and the
    old one is retired (no longer published; its vault credential expires on its own)."""
    require_tenant(principal, tenant_id)
    now = _now(now)
    tenant = _tenant(session, tenant_id)
    keys = _published_keys(session, tenant_id)
    active = _active_key(keys)
    nxt = next((k for k in keys if k.state == "next"), None)
    if active is None:
        if nxt is not None:
            return complete_sp_rollover(session=session, principal=principal, tenant_id=tenant_id, now=now)
        _new_key(session, principal=principal, tenant=tenant, state="active", now=now)
        return _published_keys(session, tenant_id)
    expires = aware(active.not_after)
    assert expires is not None
    if nxt is None and expires - now <= timedelta(days=SP_ROLLOVER_DAYS):
        _new_key(session, principal=principal, tenant=tenant, state="next", now=now)
        return _published_keys(session, tenant_id)
    if nxt is not None:
        published = aware(nxt.created_at)
        assert published is not None
        if now - published >= SP_ACTIVATE_AFTER or expires - now <= timedelta(days=1):
            return complete_sp_rollover(session=session, principal=principal, tenant_id=tenant_id, now=now)
    return keys


def start_sp_rollover(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> list[SsoSpKey]:
    """Publish a next SP key beside the active one (both appear in the SP metadata)."""
    require_tenant(principal, tenant_id)
    now = _now(now)
    keys = _published_keys(session, tenant_id)
    if any(k.state == "next" for k in keys):
        return keys
    if _active_key(keys) is None:
        return ensure_sp_keys(session=session, principal=principal, tenant_id=tenant_id, now=now)
    _new_key(session, principal=principal, tenant=_tenant(session, tenant_id), state="next", now=now)
    return _published_keys(session, tenant_id)


def complete_sp_rollover(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> list[SsoSpKey]:
    """Make the next SP key active and retire the old one."""
    require_tenant(principal, tenant_id)
    now = _now(now)
    keys = _published_keys(session, tenant_id)
    nxt = next((k for k in keys if k.state == "next"), None)
    if nxt is None:
        return keys
    for k in keys:
        if k.state == "active":
            k.state, k.retired_at = "retired", now
            session.add(k)
    nxt.state, nxt.activated_at = "active", now
    session.add(nxt)
    session.flush()
    record_event(session, principal=principal, action="sso.sp_key.rollover", tenant_id=tenant_id,
                 target=f"sso_sp_key:{nxt.id}", details={"active_sha256": nxt.cert_sha256}, at=now)
    return _published_keys(session, tenant_id)


@contextmanager
def _private_keys(
    session: Session, keys: list[SsoSpKey], *, principal: Principal, reason: str, now: datetime | None = None
) -> Iterator[list[str]]:
    """The PEM private keys of ``keys`` from the vault, for the duration of the block only.

    Note: ``vault.use`` commits the caller's open transaction before it releases a secret."""
    from core.vault import service as vault

    with ExitStack() as stack:
        pems = [
            stack.enter_context(
                vault.use(session, k.vault_ref, principal=principal, reason=reason, now=now)
            ).get_secret_value()
            for k in keys
        ]
        yield pems


def sp_metadata(*, session: Session, tenant_slug: str, now: datetime | None = None) -> str:
    """The tenant's signed SP metadata (public). Cached for a day per key set; no secret is cached.

    Raises:
        NotFound: unknown tenant.
    """
    now = _now(now)
    tenant = _tenant_by_slug(session, tenant_slug)
    keys = _published_keys(session, tenant.id)  # type: ignore[arg-type]
    if _active_key(keys) is None:
        keys = ensure_sp_keys(session=session, principal=ACS_PRINCIPAL, tenant_id=tenant.id, now=now)  # type: ignore[arg-type]
    active = _active_key(keys)
    assert active is not None
    nxt = next((k for k in keys if k.state == "next"), None)
    cache_key = (tenant.id, tenant.slug, active.cert_sha256, nxt.cert_sha256 if nxt else None,
                 get_settings().public_url)
    cached = _metadata_cache.get(cache_key)
    if cached is not None and now - cached[1] < timedelta(hours=24) and cached[1] <= now:
        return cached[0]
    with _private_keys(session, [active], principal=ACS_PRINCIPAL, reason="sign SAML SP metadata",
                       now=now) as (key_pem,):
        xml = sp_metadata_xml(sp=sp_endpoints(tenant.slug), cert_pem_active=active.cert_pem,
                              cert_pem_next=nxt.cert_pem if nxt else None, key_pem=key_pem, now=now)
    _metadata_cache[cache_key] = (xml, now)
    return xml


OFFBOARDED_SSO = "single sign-on to CRM Bridge is closed for its accounts"


def _tenant_by_slug(session: Session, slug: str) -> Tenant:
    if not SLUG_RE.match(slug or ""):
        raise NotFound("Unknown tenant: check the address.")
    t = session.exec(select(Tenant).where(Tenant.slug == slug)).first()
    if t is None:
        raise NotFound("Unknown tenant: check the address.")
    if t.status == TenantStatus.offboarded.value:
        raise NotFound(offboarded_message(t.name, OFFBOARDED_SSO), code=OFFBOARDED_CODE)
    return t


# --- logins -------------------------------------------------------------------------------------------------


def _start(
    session: Session, *, tenant: Tenant, config: SsoConfig, purpose: str, relay_state: str | None,
    started_by: str | None, now: datetime, send_relay: bool = True,
) -> AuthnStart:
    """Build and remember an AuthnRequest. ``relay_state`` is kept on the request row; it goes to the
    IdP too unless ``send_relay`` is False (a connect link's address stays with us)."""
    idp = idp_config(config)
    to_idp = relay_state if send_relay else None
    keys = _published_keys(session, tenant.id)  # type: ignore[arg-type]
    active = _active_key(keys)
    d = build_settings_dict(sp=sp_endpoints(tenant.slug), idp=idp,
                            sp_cert_pem=active.cert_pem if active else None)
    if idp.want_authn_requests_signed and active is not None:
        with _private_keys(session, [active], principal=ACS_PRINCIPAL, reason="sign SAML AuthnRequest",
                           now=now) as (pem,):
            d["sp"]["privateKey"] = pem
            start = build_authn_request(settings=make_settings(d), idp=idp, relay_state=to_idp,
                                        force_authn=purpose == PURPOSE_TEST, sign_key_pem=pem,
                                        sign_cert_pem=active.cert_pem, now=now)
            d["sp"]["privateKey"] = ""
    else:
        d["security"]["authnRequestsSigned"] = False
        start = build_authn_request(settings=make_settings(d), idp=idp, relay_state=to_idp,
                                    force_authn=purpose == PURPOSE_TEST, now=now)
    session.add(SsoRequest(
        request_id=start.request_id, tenant_id=tenant.id, purpose=purpose,  # type: ignore[arg-type]
        relay_state=relay_state, started_by=started_by, created_at=now, expires_at=now + REQUEST_TTL,
    ))
    session.flush()
    return start


def start_login(
    *, session: Session, tenant_slug: str, relay_state: str | None = None, now: datetime | None = None
) -> AuthnStart:
    """An SP-initiated console sign-in through the tenant's IdP (anyone may start one; only a
    tenant admin of this tenant gets a session at the end).

    Raises:
        NotFound: unknown tenant, or no SSO configured.
    """
    now = _now(now)
    tenant = _tenant_by_slug(session, tenant_slug)
    config = _config(session, tenant.id)  # type: ignore[arg-type]
    if config is None or tenant.status == TenantStatus.suspended.value:
        raise NotFound(f"{tenant.name} does not sign in through SSO yet: sign in with your password at /auth/login.")
    return _start(session, tenant=tenant, config=config, purpose=PURPOSE_SIGN_IN,
                  relay_state=safe_relay_state(relay_state), started_by=None, now=now)


def start_test_login(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> AuthnStart:
    """Start a test login: the ACS validates the answer, stores a trace, never creates a session."""
    require_tenant(principal, tenant_id)
    now = _now(now)
    tenant = _tenant(session, tenant_id)
    config = _config(session, tenant_id)
    if config is None:
        raise NotFound("Import the IdP metadata before testing the login.")
    ensure_sp_keys(session=session, principal=principal, tenant_id=tenant_id, now=now)
    start = _start(session, tenant=tenant, config=config, purpose=PURPOSE_TEST, relay_state=None,
                   started_by=principal.email, now=now)
    record_event(session, principal=principal, action="sso.test.start", tenant_id=tenant_id,
                 target=f"sso_request:{start.request_id}", at=now)
    return start


# --- connect links: the app user signs in through the tenant's SSO first -----------------------------------
#
# The vault's connect link calls a gate (core.wiring) before it shows its form or takes a submission.
# Where the tenant has tested SSO and the browser holds no pass for this app user, the gate sends the
# browser to /sso/{tenant}/connect?r=<sealed>, which starts an AuthnRequest; the ACS checks that the IdP
# signed in the link's own app user, sets a short pass cookie (path /connect/) and returns to the link.
# The link's address (a bearer token) never goes to the IdP and is stored sealed, never in clear.


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
    now = _now(now)
    tenant = session.get(Tenant, tenant_id)
    config = _config(session, tenant_id)
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
    now = _now(now)
    tenant = _tenant_by_slug(session, tenant_slug)
    again = "Open your connect link again."
    try:
        data = json.loads(open_platform(sealed or "", owner=_seal_owner(tenant.id),  # type: ignore[arg-type]
                                        purpose="sso-connect-start"))
        path, email, expires = str(data["p"]), str(data["e"]), int(data["x"])
    except (CredentialInvalid, ValueError, KeyError, TypeError):
        raise InvalidInput("This single sign-on step is damaged or belongs to another company.", fix=again) from None
    if expires < now.timestamp():
        raise InvalidInput("This single sign-on step expired (10 minutes).", fix=again)
    config = _config(session, tenant.id)  # type: ignore[arg-type]
    if config is None:
        raise NotFound(f"{tenant.name} no longer signs in through SSO: open your connect link again.")
    sealed_path = seal_platform(path, owner=_seal_owner(tenant.id), purpose="sso-connect-return")  # type: ignore[arg-type]
    start = _start(session, tenant=tenant, config=config, purpose=PURPOSE_CONNECT, relay_state=sealed_path,
                   started_by=email, now=now, send_relay=False)
    record_event(session, principal=email, action="sso.connect.start", tenant_id=tenant.id,
                 target=f"sso_request:{start.request_id}", at=now)
    return start


def _pass_mac(tenant_id: int, email: str, expires: int) -> str:
    msg = f"crmbridge/sso/connect-pass/v1|{tenant_id}|{email.strip().lower()}|{expires}".encode()
    return hmac.new(get_settings().server_secret(), msg, hashlib.sha256).hexdigest()


def connect_pass(tenant_id: int, email: str, now: datetime | None = None) -> str:
    """The cookie value proving this browser signed in through the tenant's SSO as ``email``."""
    expires = int((_now(now) + CONNECT_PASS_TTL).timestamp())
    return f"{expires}.{_pass_mac(tenant_id, email, expires)}"


def connect_pass_ok(value: str | None, *, tenant_id: int, email: str, now: datetime | None = None) -> bool:
    """True when ``value`` is an unexpired pass for this tenant's app user ``email``."""
    expires, _, mac = (value or "").partition(".")
    if not expires.isdigit() or int(expires) < _now(now).timestamp():
        return False
    return hmac.compare_digest(_pass_mac(tenant_id, email, int(expires)), mac)


def _connect_outcome(
    session: Session, *, tenant: _AcsTarget, result: ResponseCheck, request: _RequestRow, now: datetime
) -> AcsOutcome:
    expected = (request.started_by or "").lower()
    again = "Open your connect link again."
    if not result.ok:
        record_event(session, principal=expected or ACS_PRINCIPAL.email, action="sso.connect.refused",
                     tenant_id=tenant.tenant_id, target=f"tenant:{tenant.slug}", details={"code": result.code},
                     at=now)
        return _refused(result.code, f"Single sign-on failed: {result.error}", result.fix or again,
                        purpose=PURPOSE_CONNECT)
    signed_in = (result.email or "").strip().lower()
    if not expected or signed_in != expected:
        record_event(session, principal=expected or ACS_PRINCIPAL.email, action="sso.connect.refused",
                     tenant_id=tenant.tenant_id, target=f"tenant:{tenant.slug}",
                     details={"code": "wrong_user", "signed_in_as": signed_in or None}, at=now)
        return _refused(
            "wrong_user",
            f"Your company's single sign-on signed you in as {signed_in or 'an identity without an email address'}, "
            f"but this connect link is for {expected}.",
            f"Sign out of your company's single sign-on and open the link again as {expected}, or ask your admin "
            "for a link of your own.", purpose=PURPOSE_CONNECT)
    try:
        path = open_platform(request.relay_state or "", owner=_seal_owner(tenant.tenant_id),
                             purpose="sso-connect-return")
    except CredentialInvalid:
        return _refused("damaged", "This sign-in request lost its way back to the connect link.", again,
                        purpose=PURPOSE_CONNECT)
    if not _is_link_url(path):  # the public URL changed since the request was sent
        return _refused("damaged", "This sign-in request lost its way back to the connect link.", again,
                        purpose=PURPOSE_CONNECT)
    record_event(session, principal=expected, action="sso.connect.passed", tenant_id=tenant.tenant_id,
                 target=f"tenant:{tenant.slug}", at=now)
    return AcsOutcome(ok=True, purpose=PURPOSE_CONNECT, redirect=path,
                      token=connect_pass(tenant.tenant_id, expected, now), code="ok", status_code=303)


# --- the ACS ------------------------------------------------------------------------------------------------


@contextmanager
def _decrypting(
    session: Session, tenant_id: int, slug: str, load_config: Callable[[], SsoConfig], now: datetime
) -> Iterator[Any]:
    """A factory yielding settings with each published SP key (the vault releases them one block)."""

    @contextmanager
    def factory() -> Iterator[list[OneLogin_Saml2_Settings]]:
        keys = _published_keys(session, tenant_id)
        if not keys:
            yield []
            return
        config = load_config()
        with _private_keys(session, keys, principal=ACS_PRINCIPAL, reason="decrypt SAML assertion",
                           now=now) as pems:
            out = []
            for k, pem in zip(keys, pems, strict=True):
                d = build_settings_dict(sp=sp_endpoints(slug), idp=idp_config(config),
                                        sp_cert_pem=k.cert_pem, sp_key_pem=pem)
                d["security"]["authnRequestsSigned"] = False
                out.append(make_settings(d))
            yield out

    yield factory


def _store_trace(
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


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _refused(code: str, message: str, fix: str, *, purpose: str | None = None, status: int = 403,
             trace_id: int | None = None) -> AcsOutcome:
    return AcsOutcome(ok=False, purpose=purpose, message=message, fix=fix, code=code, status_code=status,
                      trace_id=trace_id)


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
_CONSUME_SQL = (
    update(_REQUEST_T)
    .where(_REQUEST_T.c.id == bindparam("pk"), _REQUEST_T.c.used_at.is_(None))
    .values(used_at=bindparam("consumed_at"))
)
_ACCOUNT_SQL = select(ConsoleAccount).where(
    ConsoleAccount.email == bindparam("email"),
    ConsoleAccount.role == Role.tenant_admin.value,
    ConsoleAccount.tenant_id == bindparam("tenant_id"),
    col(ConsoleAccount.disabled).is_(False),
)
_SEEN_INSERT: dict[str, Any] = {}


def _seen_insert(dialect: str) -> Any:
    """INSERT … ON CONFLICT DO NOTHING RETURNING id, for the dialect (built once)."""
    stmt = _SEEN_INSERT.get(dialect)
    if stmt is None:
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
        stmt = _SEEN_INSERT[dialect] = (
            dialect_insert(_SEEN_T).on_conflict_do_nothing(index_elements=["tenant_id", "message_id"])
            .returning(_SEEN_T.c.id)
        )
    return stmt


def _remember_ids(session: Session, tenant_id: int, result: ResponseCheck, now: datetime) -> bool:
    """Record the response and assertion ids under their unique key; False when one was seen before
    (on this replica or any other: the database's unique key decides, in one statement)."""
    expires = result.expires_at or (now + REQUEST_TTL)
    ids = list(dict.fromkeys([f"r:{result.response_id}"] + [f"a:{a}" for a in result.assertion_ids]))
    rows = [{"tenant_id": tenant_id, "message_id": mid[:300], "expires_at": expires} for mid in ids]
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        # One statement; rows returned = rows inserted (psycopg reports no rowcount for it).
        inserted = 0
        for row in rows:
            inserted += len(session.connection().execute(_seen_insert(dialect), row).all())
        return inserted == len(rows)
    try:  # other databases: a savepoint around a plain insert
        with session.begin_nested():
            session.connection().execute(insert(_SEEN_T), rows)
    except IntegrityError:
        return False
    return True


@dataclass
class _RequestRow:
    id: int
    tenant_id: int
    purpose: str
    relay_state: str | None
    started_by: str | None
    used_at: datetime | None
    expires_at: datetime


def _request_row(session: Session, request_id: str) -> _RequestRow | None:
    row = session.connection().execute(_REQUEST_SQL, {"request_id": request_id[:100]}).first()
    return _RequestRow(*row) if row is not None else None


@dataclass
class _AcsTarget:
    tenant_id: int
    slug: str
    name: str
    status: str
    config_id: int | None
    config_version: int | None
    allow_idp_initiated: bool


def _acs_target(session: Session, slug: str) -> _AcsTarget | None:
    """The tenant and the version of its configuration in one light query (the configuration itself is
    loaded only when the cached settings are stale, or for a test's bookkeeping)."""
    if not SLUG_RE.match(slug or ""):
        return None
    row = session.connection().execute(_ACS_TARGET_SQL, {"slug": slug}).first()
    if row is None:
        return None
    return _AcsTarget(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]))


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
    now = _now(now)
    public = get_settings().public
    # Parse first (no database work for junk), then one query for the tenant and its configuration.
    try:
        raw, root = inspect_response(saml_response)
    except Exception as exc:  # InvalidInput from our parser walls; never a crash
        message = getattr(exc, "message", str(exc))
        return _refused(getattr(exc, "code", None) or "malformed", f"The SAML response was refused: {message}",
                        getattr(exc, "fix", None) or "Sign in again.", status=400)
    tenant = _acs_target(session, tenant_slug)
    if tenant is None:
        return _refused("unknown_tenant", "Unknown tenant.", "Check the ACS URL configured at the IdP.", status=404)
    if tenant.status == TenantStatus.offboarded.value:
        return _refused(OFFBOARDED_CODE, offboarded_message(tenant.name, OFFBOARDED_SSO),
                        "Ask CRM Bridge staff to restore the tenant if this is a mistake.", status=403)
    if tenant.config_id is None or tenant.config_version is None:
        return _refused("not_configured", f"{tenant.name} has no SSO configuration.",
                        "Import the IdP metadata on the SSO page first.", status=404)
    config_id = tenant.config_id

    def load_config() -> SsoConfig:
        cfg = session.get(SsoConfig, config_id)
        assert cfg is not None
        return cfg
    irt = response_in_response_to(root)
    request: _RequestRow | None = None
    if irt:
        request = _request_row(session, irt)
        if request is None:
            return _refused("unknown_request", "This response answers a sign-in request CRM Bridge did not send.",
                            "Start the sign-in again from CRM Bridge.")
        if request.tenant_id != tenant.tenant_id:
            return _refused("other_tenant", "This response answers a sign-in request of another tenant.",
                            "Start the sign-in again from your own company's sign-in link.")
        if request.used_at is not None:
            return _refused("request_used", "This sign-in request was already answered (a response can be used "
                            "once).", "Start the sign-in again.", purpose=request.purpose)
        if (aware(request.expires_at) or now) <= now:
            return _refused("request_expired", "This sign-in request expired (10 minutes).", "Start the sign-in "
                            "again.", purpose=request.purpose)
        if started_here is not None and not started_here(irt):
            log.info("sso: response for request %s posted from a browser that did not start it", irt[:40])
            return _refused("other_browser", "This sign-in was not started in this browser, so it cannot finish "
                            "here (a sign-in response is only accepted from the browser that asked for it).",
                            f"Start the sign-in again in this browser: {public(f'/sso/{tenant.slug}/login')}",
                            purpose=request.purpose)
        purpose = request.purpose
    else:
        if not tenant.allow_idp_initiated:
            _noisy_event(session, source=source, principal=ACS_PRINCIPAL, action="sso.idp_initiated_refused",
                         tenant_id=tenant.tenant_id, target=f"tenant:{tenant.slug}", details={}, at=now)
            return _refused("idp_initiated", "IdP-initiated sign-in is not enabled for this tenant: the response "
                            "does not answer a request from CRM Bridge.",
                            f"Start from CRM Bridge: {public(f'/sso/{tenant.slug}/login')}")
        purpose = PURPOSE_SIGN_IN

    is_test = purpose == PURPOSE_TEST
    with _decrypting(session, tenant.tenant_id, tenant.slug, load_config, now) as decrypting:
        result = validate_saml_response(
            settings=_cached_acs_settings(tenant.tenant_id, tenant.slug, config_id, tenant.config_version,
                                          load_config),
            saml_response=saml_response,
            request_data=request_data_for(sp_endpoints(tenant.slug).acs_url),
            request_id=irt,
            now=now,
            decrypting=decrypting,
            trace=is_test,
            parsed=(raw, root),
        )
    if request is not None:
        # Consume the request whatever the verdict: one answer per request, on every replica.
        consumed = _rowcount(session.connection().execute(_CONSUME_SQL, {"pk": request.id, "consumed_at": now}))
        if consumed != 1:
            return _refused("request_used", "This sign-in request was already answered.", "Start the sign-in again.",
                            purpose=purpose)
    if result.ok and not _remember_ids(session, tenant.tenant_id, result, now):
        result.ok = False
        result.add("Not a replay", False, "this response (or its assertion) was already used")
        result.fail("replay", "This SAML response was already used (replay refused).", "Sign in again.")
    elif result.ok:
        result.add("Not a replay", True)

    if is_test:
        assert request is not None
        trace = _store_trace(session, tenant_id=tenant.tenant_id, source="test", result=result,
                             request_id=irt, created_by=request.started_by, now=now)
        config = load_config()
        config.last_test_ok = result.ok
        if result.ok:
            config.tested_at = now
        session.add(config)
        record_event(session, principal=request.started_by or ACS_PRINCIPAL.email,
                     action="sso.test.passed" if result.ok else "sso.test.failed", tenant_id=tenant.tenant_id,
                     target=f"sso_trace:{trace.id}",
                     details={"code": result.code, "name_id": trace.name_id, "skew_s": result.skew_seconds}, at=now)
        back = public(f"/sso?trace={trace.id}&tenant={tenant.slug}")  # staff land on this tenant's page
        return AcsOutcome(ok=result.ok, purpose=PURPOSE_TEST, redirect=back,
                          message="Test login passed: no session was created." if result.ok else (result.error or ""),
                          fix=result.fix or "", code=result.code, trace_id=trace.id)

    if purpose == PURPOSE_CONNECT:
        assert request is not None  # a connect sign-in always answers our request
        return _connect_outcome(session, tenant=tenant, result=result, request=request, now=now)
    if not result.ok:
        _noisy_event(session, source=source, principal=result.email or ACS_PRINCIPAL.email,
                     action="sso.sign_in.refused", tenant_id=tenant.tenant_id, target=f"tenant:{tenant.slug}",
                     details={"code": result.code}, at=now)
        return _refused(result.code, f"Single sign-on failed: {result.error}", result.fix or "Sign in again.",
                        purpose=purpose)
    return _sign_in(session, tenant=tenant, result=result,
                    relay=request.relay_state if request is not None else safe_relay_state(relay_state), now=now)


def _sign_in(
    session: Session, *, tenant: _AcsTarget, result: ResponseCheck, relay: str | None, now: datetime
) -> AcsOutcome:
    from core.tenants.auth import start_session

    email = result.email
    account = None
    if email:
        account = session.exec(_ACCOUNT_SQL, params={"email": email, "tenant_id": tenant.tenant_id}).first()
    if account is None or tenant.status == TenantStatus.suspended.value:
        record_event(session, principal=email or ACS_PRINCIPAL.email, action="sso.sign_in.refused",
                     tenant_id=tenant.tenant_id, target=f"tenant:{tenant.slug}", details={"code": "no_account"},
                     at=now)
        return _refused(
            "no_account",
            f"The IdP signed you in as {email or 'an identity without an email address'}, but that is not a "
            f"tenant-admin console account of {tenant.name}.",
            "Ask your CRM Bridge contact to invite this email as a tenant admin (CRM Bridge staff sign in with "
            "their password at /auth/login).",
            purpose=PURPOSE_SIGN_IN,
        )
    token = start_session(session, account_id=account.id, method="sso", now=now)  # type: ignore[arg-type]
    account.last_sign_in_at = now  # flushed with the commit
    return AcsOutcome(ok=True, purpose=PURPOSE_SIGN_IN, redirect=get_settings().public(relay or "/"), token=token,
                      code="ok", status_code=303)


# --- pasted responses and traces ----------------------------------------------------------------------------


def check_pasted_response(
    *, session: Session, principal: Principal, tenant_id: int, saml_response: str, now: datetime | None = None
) -> SsoTrace:
    """Check a captured SAMLResponse (base64) against the tenant's configuration and store a trace.

    Consumes no request, records no replay id, never creates a session, never marks SSO tested."""
    require_tenant(principal, tenant_id)
    now = _now(now)
    tenant = _tenant(session, tenant_id)
    config = _config(session, tenant_id)
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
    with _decrypting(session, tenant_id, tenant.slug, lambda: config, now) as decrypting:
        result = validate_saml_response(
            settings=acs_settings(tenant, config), saml_response=saml_response,
            request_data=request_data_for(sp_endpoints(tenant.slug).acs_url), request_id=irt, now=now,
            decrypting=decrypting, trace=True,
        )
    trace = _store_trace(session, tenant_id=tenant_id, source="paste", result=result, request_id=irt,
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


# --- certificate watch --------------------------------------------------------------------------------------


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
    rolls the tenants' SP keys when their dates require (see ``ensure_sp_keys``). ``record=False``
    only computes the findings (pages): nothing is written.

    Staff (or the system scheduler) for every tenant; a tenant admin for their own."""
    now = _now(now)
    if tenant_id is None:
        require_staff(principal)
        configs = list(session.exec(select(SsoConfig)).all())
    else:
        require_tenant(principal, tenant_id)
        configs = [c for c in [_config(session, tenant_id)] if c is not None]
    findings: list[CertFinding] = []
    for config in configs:
        certs = _cert_summaries(config.certs_json)
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
    now = _now(now)
    out: list[TimelineEntry] = []
    config = _config(session, tenant_id)
    if config is not None:
        for c in _cert_summaries(config.certs_json):
            days = int((c.not_after - now).total_seconds() // 86400)
            state = "expired" if days < 0 else ("not yet valid" if c.not_before > now else "valid")
            out.append(TimelineEntry("IdP", c.use, c.subject, c.sha256, c.not_before, c.not_after, days, state))
    for k in _published_keys(session, tenant_id):
        nb, na = aware(k.not_before), aware(k.not_after)
        assert nb is not None and na is not None
        out.append(TimelineEntry("SP", "signing+encryption", f"CRM Bridge SP ({k.state})", k.cert_sha256, nb, na,
                                 int((na - now).total_seconds() // 86400), k.state))
    return out


def purge_expired(*, session: Session, now: datetime | None = None) -> int:
    """Delete replay-cache rows and AuthnRequests past their expiry (kept a day for traces)."""
    from sqlalchemy import delete

    now = _now(now)
    n = _rowcount(session.execute(delete(SsoSeenResponse).where(col(SsoSeenResponse.expires_at) < now)))
    n += _rowcount(session.execute(
        delete(SsoRequest).where(col(SsoRequest.expires_at) < now - timedelta(days=1))
    ))
    return int(n)
