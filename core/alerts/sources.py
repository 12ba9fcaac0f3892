"""Where alert observations come from: one function per package, the only place that knows how that
package's data maps to the rules (core.alerts.rules). Alerts read the other packages; they never
push into alerts, so no package depends on this one. A package that is absent, or whose read fails,
is skipped for this run and covers nothing (its alerts neither fire nor recover on missing data).

- ``vault_observations``  core.vault: ``list_credentials`` (states, self-destruct dates) and the
                          tombstones of destroyed credentials → credentials_destroyed,
                          credentials_expiring, api_user_auth (an API-user credential the CRM rejected
                          is marked "failed" by ``vault.report_auth_failure``; storing a new secret
                          makes it active again: the recovery)
- ``sync_observations``   core.sync.health ``user_health``: the sync state already applies the flap
                          damping (failing after 3 failed runs in a row) → sync_failing
- ``sso_observations``    core.sso.watch ``certificate_timeline`` (IdP certificates) → idp_cert_expiring
- ``quota_observations``  core.posture.gather snapshots: each account's last API-usage read with its
                          forecast → crm_quota (accounts with no read keep their state)

Push-style reports (``core.alerts.service.report``) remain possible for anything else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from core.alerts import rules
from core.alerts.rules import Observation
from core.tenants.access import Principal
from core.tenants.models import CrmAccount, Tenant, TenantStatus

log = logging.getLogger("crmbridge.alerts.sources")

SYSTEM = Principal.system("alerts")
# Console-side secrets the accounts and alerts packages keep in the vault: not CRM credentials.
OWN_PURPOSES = ("console-mfa-", "alert-webhook-")
# Destructions someone chose (not a self-destruct): never counted as a bulk loss.
DELIBERATE = ("revoked", "credential mode changed", "shred")

Params = Callable[[int, str], dict[str, Any]]


@dataclass
class Collected:
    observations: list[Observation] = field(default_factory=list)
    covered: set[tuple[str, int]] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)


def _tenant_ids(session: Session) -> list[int]:
    return [t.id for t in session.exec(select(Tenant).where(Tenant.status != TenantStatus.offboarded.value))
            if t.id is not None]


def vault_observations(session: Session, *, now: datetime, tenant_ids: list[int], params: Params) -> Collected:
    from core.vault import service as vault
    from core.vault.models import VaultTombstone

    out = Collected()
    longest = max([float(params(t, "credentials_destroyed")["window_hours"]) for t in tenant_ids] + [24.0])
    destroyed: dict[int, list[datetime]] = {}
    for tomb in session.exec(select(VaultTombstone).where(
            col(VaultTombstone.destroyed_at) > now - timedelta(hours=longest))):
        if tomb.purpose.startswith(OWN_PURPOSES) or tomb.reason.lower().startswith(DELIBERATE):
            continue
        destroyed.setdefault(tomb.tenant_id, []).append(tomb.destroyed_at)
    api_accounts: dict[int, list[CrmAccount]] = {}
    for acc in session.exec(select(CrmAccount).where(CrmAccount.credential_mode == "api_user")):
        api_accounts.setdefault(acc.tenant_id, []).append(acc)
    for tid in tenant_ids:
        infos = vault.list_credentials(session, principal=SYSTEM, tenant_id=tid, now=now)
        mine = [i for i in infos if i.ref is not None and not i.purpose.startswith(OWN_PURPOSES)]
        out.observations.append(rules.destroyed_in_bulk(
            tenant_id=tid, destroyed_at=destroyed.get(tid, []), now=now, params=params(tid, "credentials_destroyed")))
        out.observations.append(rules.expiring_in_bulk(
            tenant_id=tid, ends_at=[i.ends_at for i in mine if i.ends_at is not None], now=now,
            params=params(tid, "credentials_expiring")))
        failed = {i.crm_account_id for i in mine if i.app_user_id is None and i.state == "failed"}
        for acc in api_accounts.get(tid, []):
            assert acc.id is not None
            out.observations.append(rules.api_user_auth(tenant_id=tid, crm_account_id=acc.id, label=acc.label,
                                                        failed=acc.id in failed))
        out.covered |= {("credentials_destroyed", tid), ("credentials_expiring", tid), ("api_user_auth", tid)}
    return out


def sync_observations(session: Session, *, now: datetime, tenant_ids: list[int], params: Params) -> Collected:
    from core.sync.health import user_health

    out = Collected()
    for tid in tenant_ids:
        for row in user_health(session, tenant_id=tid, now=now):
            out.observations.append(rules.sync_failing(
                tenant_id=tid, job_id=row.job_id, owner=row.owner, account_label=row.account_label, state=row.sync,
                reason=row.sync_reason, last_error=row.last_error, fix=row.last_error_fix))
        out.covered.add(("sync_failing", tid))
    return out


def sso_observations(session: Session, *, now: datetime, tenant_ids: list[int], params: Params) -> Collected:
    from core.sso.models import SsoConfig
    from core.sso.watch import certificate_timeline

    out = Collected()
    with_sso = set(session.exec(select(SsoConfig.tenant_id)).all())
    for tid in tenant_ids:
        if tid in with_sso:
            for e in certificate_timeline(session=session, principal=SYSTEM, tenant_id=tid, now=now):
                if e.owner == "IdP":
                    out.observations.append(rules.idp_cert(tenant_id=tid, sha256=e.sha256, subject=e.subject,
                                                           not_after=e.not_after, now=now))
        out.covered.add(("idp_cert_expiring", tid))  # a replaced or removed certificate recovers
    return out


def quota_observations(session: Session, *, now: datetime, tenant_ids: list[int], params: Params) -> Collected:
    from core.posture.gather import gather_tenants

    out = Collected()
    for snap in gather_tenants(session, tenant_ids, now=now):
        for a in snap.accounts:
            u = a.api_usage
            if u is None or u.limit <= 0:
                continue
            out.observations.append(rules.crm_quota(
                tenant_id=snap.tenant_id, crm_account_id=a.id, label=a.label, used=u.used, limit=u.limit,
                window=u.window, runs_out_before_reset=u.runs_out_before_reset, exhausts_at=u.exhausts_at,
                params=params(snap.tenant_id, "crm_quota")))
    return out


SOURCES: tuple[tuple[str, Callable[..., Collected]], ...] = (
    ("vault", vault_observations),
    ("sync", sync_observations),
    ("sso", sso_observations),
    ("quota", quota_observations),
)


def collect(session: Session, *, now: datetime, params: Params) -> Collected:
    """Every source's observations. A failing source is logged and skipped (it covers nothing)."""
    tenant_ids = _tenant_ids(session)
    total = Collected()
    for name, fn in SOURCES:
        try:
            with session.begin_nested():  # a failing source rolls back to here, not the caller's work
                got = fn(session, now=now, tenant_ids=tenant_ids, params=params)
        except Exception as exc:  # noqa: BLE001 - one broken source must not silence the others
            log.warning("alerts: source %s skipped: %s: %s", name, type(exc).__name__, exc)
            total.skipped.append(f"{name}: {type(exc).__name__}")
            continue
        total.observations += got.observations
        total.covered |= got.covered
    return total
