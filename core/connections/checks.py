"""Connection tests: the stored credential against the CRM (kept on the account with the provider's typed
licenses and API usage), and a just-entered credential before it is stored (``check_credential``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import SecretStr
from sqlmodel import Session, col, select

from core.clock import aware, utcnow
from core.connections.accounts import (
    CREDENTIAL_PURPOSE,
    ProviderFactory,
    _load,
    _vault,
    account_config,
    credential_fields,
    credentials_form_url,
    default_transport,
)
from core.connections.quota import _add_sample, quota_gauge
from core.errors import ConfigurationError, CrmBridgeError
from core.providers.base import ApiUsage, ConnectionReport, LicenseSnapshot, StepResult
from core.providers.config import Credential, HttpTransport
from core.tenants.access import Principal
from core.tenants.audit import record_event
from core.tenants.models import CrmAccount

log = logging.getLogger(__name__)


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
        fix = (f"Enter the credentials first in the secure form ({credentials_form_url(account.id or 0)}), "
               "then test again.")
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
            try:
                provider = factory(account=config, credential=credential,
                                   transport=transport or default_transport(), on_auth_failure=failures.append)
            except ConfigurationError as exc:  # the account is not set up far enough to try: say what is missing
                provider = None
                report = ConnectionReport(ok=False, steps=[StepResult("configuration", False, exc.message,
                                                                      exc.fix or "")])
            if provider is not None:
                try:
                    report = provider.test_connection()
                    usage, licenses = report.api_usage, report.licenses
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
    fields: Mapping[str, SecretStr],
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
    credential.update(fields)  # typed SecretStr values, straight to the provider
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


# ``test_crm_account`` is a service, not a pytest test: keep test modules that import it from collecting it.
test_crm_account.__test__ = False  # type: ignore[attr-defined]
