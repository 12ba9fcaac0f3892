"""Tenant-scoped services over the providers: add a CRM account from the catalog form, test its
connection with the real credential, and keep the API-quota gauge (samples + forecast).

Credentials: an account's secret fields (API user: client secret / private key; per-user OAuth: the
app's secret) are one JSON object in the vault under purpose ``crm-login`` with no app user; each
user's own credential (password + token, or OAuth refresh token) is the same purpose with their
``app_user_id``. They are read only inside ``vault.use()`` for the length of one piece of work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import SecretStr
from sqlmodel import Session, col, select

from core.clock import aware, utcnow
from core.errors import Conflict, CrmBridgeError, InvalidInput, NotFound
from core.providers.base import ApiUsage, ConnectionReport, LicenseSnapshot, Provider, StepResult
from core.providers.catalog import get_catalog
from core.providers.config import AccountConfig, Credential, HttpTransport
from core.providers.models import ApiUsageSample
from core.settings import get_settings
from core.tenants.access import Principal, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import CrmAccount

log = logging.getLogger(__name__)

CREDENTIAL_PURPOSE = "crm-login"
KIND_BY_MODE = {
    "oauth_client_credentials": "client_secret",
    "jwt_bearer": "private_key",
    "oauth_authorization_code": "client_secret",
    "password": "password",
    "api_token": "api_token",
}
FORECAST_WINDOW = timedelta(hours=6)

ProviderFactory = Callable[..., Provider]


# -- helpers -----------------------------------------------------------------------------------------
def default_transport() -> HttpTransport:
    """The HTTP seam for console and workers: trusts the sandbox CA when one is configured."""
    s = get_settings()
    return HttpTransport(verify=str(s.sandbox_ca_file) if s.sandbox_ca_file else True)


def account_config(account: CrmAccount) -> AccountConfig:
    return AccountConfig.from_crm_account(account)


def credential_fields(secret: SecretStr | str) -> dict[str, Any]:
    """A vault secret (a JSON object of fields) as a provider credential mapping of SecretStr."""
    text = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return {"password": SecretStr(text)}
    return {k: SecretStr(v) if isinstance(v, str) else v for k, v in data.items()}


def _load(session: Session, principal: Principal, account_id: int) -> CrmAccount:
    account = session.get(CrmAccount, account_id)
    if account is None:
        raise NotFound(f"CRM account {account_id} does not exist: pick one from the tenant page.")
    require_tenant(principal, account.tenant_id)
    return account


def _vault() -> Any:
    from core.vault import service as vault

    return vault


# -- add an account --------------------------------------------------------------------------------
def add_crm_account(
    *,
    session: Session,
    principal: Principal,
    tenant_id: int,
    provider: str,
    edition: str,
    label: str,
    auth_mode: str,
    values: dict[str, str | None],
    now: datetime | None = None,
) -> CrmAccount:
    """Create a CRM account from the catalog form; secret fields go straight to the vault.

    Raises:
        AccessDenied, NotFound (provider/edition/mode), InvalidInput (a field), Conflict (label taken).
    """
    require_tenant(principal, tenant_id)
    now = now or utcnow()
    cat = get_catalog()
    entry = cat.provider(provider)
    entry.edition(edition)
    mode = entry.auth_mode(auth_mode)
    label = (label or "").strip()
    if not label or len(label) > 120:
        raise InvalidInput("Give the CRM account a label of 1–120 characters (e.g. 'EMEA sales').")
    settings, secrets = cat.validate_values(provider, auth_mode, values)
    taken = session.exec(select(CrmAccount.id).where(CrmAccount.tenant_id == tenant_id,
                                                     CrmAccount.label == label)).first()
    if taken is not None:
        raise Conflict(f"This tenant already has a CRM account labelled {label!r}: choose another label.")
    instance_url = settings.pop("instance_url")
    settings["auth_mode"] = auth_mode
    account = CrmAccount(
        tenant_id=tenant_id, provider=provider, edition=edition, label=label, instance_url=instance_url,
        credential_mode=mode.credential_mode, settings_json=json.dumps(settings, sort_keys=True),
        created_at=now,
    )
    session.add(account)
    session.flush()
    if secrets:
        _vault().put(session, principal=principal, tenant_id=tenant_id, purpose=CREDENTIAL_PURPOSE,
                     secret=json.dumps(secrets), crm_account_id=account.id,
                     kind=KIND_BY_MODE.get(auth_mode, "password"), now=now)
    record_event(session, principal=principal, action="crm_account.create", tenant_id=tenant_id,
                 target=f"crm_account:{account.id}", at=now, details={
                     "provider": provider, "edition": edition, "label": label, "auth_mode": auth_mode,
                     "credential_mode": mode.credential_mode, "secret_fields": sorted(secrets)})
    return account


# -- connection test -------------------------------------------------------------------------------
def _per_user_ref(session: Session, account: CrmAccount, app_user_id: int | None) -> tuple[Any, int | None]:
    vault = _vault()
    if app_user_id is not None:
        return vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                     app_user_id=app_user_id, purpose=CREDENTIAL_PURPOSE), app_user_id
    from core.vault.models import VaultCredential

    user_ids = session.exec(
        select(VaultCredential.app_user_id).where(
            VaultCredential.crm_account_id == account.id, VaultCredential.purpose == CREDENTIAL_PURPOSE,
            col(VaultCredential.app_user_id).is_not(None),
        ).order_by(col(VaultCredential.id))
    ).all()
    for uid in user_ids:
        ref = vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                    app_user_id=uid, purpose=CREDENTIAL_PURPOSE)
        if ref is not None:
            return ref, uid
    return None, None


def _missing_credential_report(account: CrmAccount) -> ConnectionReport:
    if account.credential_mode == "api_user":
        fix = "Enter the API user's secret on the tenant page (Add CRM account), then test again."
    else:
        fix = "Send a user a connect link (Users & sync) so they connect their own credential, then test again."
    step = StepResult("authenticate", False, "No credential is stored for this CRM account", fix)
    return ConnectionReport(ok=False, steps=[step])


def test_crm_account(
    *,
    session: Session,
    principal: Principal,
    account_id: int,
    app_user_id: int | None = None,
    transport: HttpTransport | None = None,
    provider_factory: ProviderFactory | None = None,
    now: datetime | None = None,
) -> ConnectionReport:
    """Run the provider's connection test with the stored credential and keep the result on the account.

    For per-user modes the credential of ``app_user_id`` (or the first user who connected) is used; a
    definitive rejection of that per-user credential is reported to the vault (it self-destructs).

    Raises:
        AccessDenied, NotFound; vault errors (CredentialDestroyed, CredentialExpired, …) as they are.
    """
    from core.providers.registry import create_provider

    now = now or utcnow()
    account = _load(session, principal, account_id)
    config = account_config(account)
    vault = _vault()
    if account.credential_mode == "api_user":
        ref = vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                    app_user_id=None, purpose=CREDENTIAL_PURPOSE)
        user_id = None
    else:
        ref, user_id = _per_user_ref(session, account, app_user_id)
    failures: list[CrmBridgeError] = []
    usage: ApiUsage | None = None
    licenses: LicenseSnapshot | None = None
    if ref is None:
        report = _missing_credential_report(account)
    else:
        factory = provider_factory or create_provider
        with vault.use(session, ref, principal=principal, reason=f"connection test of {account.label}",
                       now=now) as secret:
            credential: Credential = credential_fields(secret)
            provider = factory(account=config, credential=credential, transport=transport or default_transport(),
                               on_auth_failure=failures.append)
            try:
                report = provider.test_connection()
                usage = getattr(provider, "last_api_usage", None)
                licenses = getattr(provider, "last_license_snapshot", None)
            finally:
                provider.close()
        if failures and user_id is not None:
            vault.report_auth_failure(session, ref, principal=principal, now=now)
    failed = report.failed_step
    summary: dict[str, Any] = {
        "ok": report.ok, "identity": report.identity, "org_id": report.org_id,
        "detected_edition": report.detected_edition, "latency_ms": report.latency_ms, "app_user_id": user_id,
        "error_code": failed.code if failed else None,
        "steps": [{"name": s.name, "ok": s.ok, "detail": s.detail, "fix": s.fix, "latency_ms": s.latency_ms,
                   "code": s.code} for s in report.steps],
    }
    if licenses is not None:
        summary["licenses"] = {"total": licenses.total, "used": licenses.used,
                               "integration_total": licenses.integration_total,
                               "integration_used": licenses.integration_used, "observed_at": now.isoformat()}
    account = _load(session, principal, account_id)  # vault.use() committed; reload
    if usage is not None:
        _add_sample(session, account, usage, now)
        session.flush()
        gauge = quota_gauge(session=session, principal=principal, account_id=account_id, now=now)
        summary["api_usage"] = {
            "used": usage.used, "limit": usage.limit, "window": usage.window,
            "observed_at": (usage.observed_at or now).isoformat(), "rate_per_hour": gauge.rate_per_hour,
            "exhausts_at": gauge.exhausted_at.isoformat() if gauge.exhausted_at else None,
        }
    account.last_test_at = now
    account.last_test_ok = report.ok
    account.last_test_summary = json.dumps(summary, default=str)[:20_000]
    account.status = "connected" if report.ok else "failing"
    session.add(account)
    record_event(session, principal=principal, action="crm_account.test", tenant_id=account.tenant_id,
                 target=f"crm_account:{account.id}", at=now, details={
                     "ok": report.ok, "failed_step": failed.name if failed else None,
                     "detected_edition": report.detected_edition})
    session.flush()
    return report


def check_credential(
    *,
    session: Session,
    principal: Principal,
    account_id: int,
    fields: dict[str, str],
    transport: HttpTransport | None = None,
    provider_factory: ProviderFactory | None = None,
) -> ConnectionReport:
    """Test a credential a user just entered (connect link) *before* it is stored: the account's own
    secret (e.g. the OAuth app's) is added from the vault; nothing is stored, reported or audited —
    the caller stores the fields only when ``report.ok`` (or its ``api_access`` step) says so.
    """
    from core.providers.registry import create_provider

    account = _load(session, principal, account_id)
    config = account_config(account)
    credential: dict[str, Any] = {}
    vault = _vault()
    ref = vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                app_user_id=None, purpose=CREDENTIAL_PURPOSE)
    if ref is not None and account.credential_mode != "api_user":
        with vault.use(session, ref, principal=principal, reason="check a user's new credential") as secret:
            credential.update(credential_fields(secret))
    credential.update({k: SecretStr(v) for k, v in fields.items()})
    provider = (provider_factory or create_provider)(account=config, credential=credential,
                                                     transport=transport or default_transport())
    try:
        return provider.test_connection()
    finally:
        provider.close()


@dataclass
class StoredTest:
    ok: bool | None
    at: datetime | None
    steps: list[StepResult] = field(default_factory=list)
    identity: str | None = None
    detected_edition: str | None = None


def last_connection_test(*, session: Session, principal: Principal, account_id: int) -> StoredTest:
    """The last connection test stored on the account (for the page; no CRM call)."""
    account = _load(session, principal, account_id)
    data: dict[str, Any] = {}
    if account.last_test_summary:
        try:
            data = json.loads(account.last_test_summary)
        except ValueError:
            data = {}
    steps = [StepResult(s["name"], bool(s["ok"]), s.get("detail", ""), s.get("fix"), s.get("latency_ms"),
                        code=s.get("code")) for s in data.get("steps", [])]
    return StoredTest(ok=account.last_test_ok, at=aware(account.last_test_at), steps=steps,
                      identity=data.get("identity"), detected_edition=data.get("detected_edition"))


# -- API usage and the quota gauge -----------------------------------------------------------------
def _add_sample(session: Session, account: CrmAccount, usage: ApiUsage, now: datetime) -> ApiUsageSample:
    assert account.id is not None
    sample = ApiUsageSample(
        tenant_id=account.tenant_id, crm_account_id=account.id, observed_at=usage.observed_at or now,
        used=max(usage.used, 0), limit=max(usage.limit, 0), window=usage.window[:30],
        source=str(usage.extra.get("source", ""))[:40],
    )
    session.add(sample)
    return sample


def record_api_usage(
    *, session: Session, principal: Principal, account_id: int, usage: ApiUsage, now: datetime | None = None
) -> ApiUsageSample:
    """Keep one reading of the CRM's own API counter (workers call this after each run)."""
    account = _load(session, principal, account_id)
    sample = _add_sample(session, account, usage, now or utcnow())
    session.flush()
    return sample


@dataclass
class QuotaGauge:
    used: int | None
    limit: int | None
    observed_at: datetime | None
    window: str = "24h rolling"
    rate_per_hour: float | None = None
    exhausted_at: datetime | None = None
    samples: list[tuple[datetime, int]] = field(default_factory=list)

    @property
    def fraction(self) -> float | None:
        if self.used is None or not self.limit:
            return None
        return self.used / self.limit

    @property
    def status(self) -> str:
        f = self.fraction
        if f is None:
            return "unknown"
        if f >= 1:
            return "exhausted"
        if f >= 0.9:
            return "critical"
        if f >= 0.75:
            return "warning"
        return "ok"

    def forecast_text(self, now: datetime) -> str:
        if self.used is None:
            return "No API usage recorded yet: run a connection test."
        if self.status == "exhausted":
            return "The allocation is used up: calls fail with REQUEST_LIMIT_EXCEEDED until the window frees."
        if self.exhausted_at is None:
            return "At the current rate the allocation does not run out."
        hours = (self.exhausted_at - now).total_seconds() / 3600
        when = self.exhausted_at.strftime("%Y-%m-%d %H:%M UTC")
        return f"At {self.rate_per_hour:,.0f} calls/hour the allocation runs out in {hours:,.1f} h ({when})."


def quota_gauge(
    *, session: Session, principal: Principal, account_id: int, now: datetime | None = None
) -> QuotaGauge:
    """Latest usage and a forecast of when the allocation runs out at the recent rate (least squares
    over the last six hours of samples; no forecast when usage is flat or falling)."""
    now = now or utcnow()
    account = _load(session, principal, account_id)
    rows = session.exec(
        select(ApiUsageSample).where(ApiUsageSample.crm_account_id == account.id,
                                     col(ApiUsageSample.observed_at) >= now - timedelta(hours=24),
                                     col(ApiUsageSample.observed_at) <= now)
        .order_by(col(ApiUsageSample.observed_at))
    ).all()
    if not rows:
        latest = session.exec(select(ApiUsageSample).where(ApiUsageSample.crm_account_id == account.id)
                              .order_by(col(ApiUsageSample.observed_at).desc())).first()
        rows = [latest] if latest else []
    if not rows:
        return QuotaGauge(None, None, None)
    last = rows[-1]
    gauge = QuotaGauge(used=last.used, limit=last.limit, observed_at=aware(last.observed_at), window=last.window,
                       samples=[(aware(r.observed_at) or now, r.used) for r in rows])
    recent = [r for r in rows if (aware(r.observed_at) or now) >= now - FORECAST_WINDOW]
    if len(recent) >= 2:
        t0 = aware(recent[0].observed_at) or now
        xs = [((aware(r.observed_at) or now) - t0).total_seconds() / 3600 for r in recent]
        ys = [float(r.used) for r in recent]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var > 0:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
            if slope > 0:
                gauge.rate_per_hour = slope
                if last.used < last.limit:
                    base = aware(last.observed_at) or now
                    gauge.exhausted_at = base + timedelta(hours=(last.limit - last.used) / slope)
    return gauge


# ``test_crm_account`` is a service, not a pytest test: keep test modules that import it from collecting it.
test_crm_account.__test__ = False  # type: ignore[attr-defined]
