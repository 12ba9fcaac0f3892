"""The scheduler: keeps one job per (CRM account, credential owner), wakes parked jobs, sweeps the vault.

- An API-user account has one job for the whole account; a per-user account one job per active app
  user who has a CRM identity or a stored credential in it. Switching the account's credential mode
  disables the jobs of the other mode (their history stays).
- Jobs of tenants that are not live, and of users who are not active, are disabled; they come back
  when the tenant goes live or the user is active again.
- A job parked as "reconnect needed" wakes (due at once) when a credential newer than the park is in
  the vault — the user used their connect link, or the admin stored the API user's secret again.
- Jobs become due by ``next_run_at``; "sync now" sets it to now. Workers claim due jobs.
- ``run_scheduler`` also runs the vault sweep (expired and idle credentials are destroyed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.clock import aware
from core.sync.models import CREDENTIAL_PURPOSE, JobState, SyncJob
from core.tenants.access import Principal
from core.tenants.audit import record_event
from core.tenants.models import AppUser, AppUserCrmIdentity, CrmAccount, Tenant, TenantStatus

log = logging.getLogger("crmbridge.sync")

DEFAULT_INTERVAL_SECONDS = 300


@dataclass
class ScheduleResult:
    created: int = 0
    disabled: int = 0
    enabled: int = 0
    reconnected: int = 0
    swept: int = 0

    def __str__(self) -> str:
        return (f"jobs created {self.created}, disabled {self.disabled}, enabled {self.enabled}, "
                f"reconnected {self.reconnected}; vault sweep destroyed {self.swept}")


def owner_key(app_user_id: int | None) -> str:
    return "account" if app_user_id is None else f"user:{app_user_id}"


def _credentials(session: Session, tenant_ids: list[int]) -> dict[tuple[int | None, int | None], tuple[str, datetime]]:
    """(crm_account_id, app_user_id) → (state, stored at) of the crm-login credentials (no secret read)."""
    try:
        from core.vault.models import VaultCredential
    except ImportError:  # pragma: no cover
        return {}
    out: dict[tuple[int | None, int | None], tuple[str, datetime]] = {}
    if not tenant_ids:
        return out
    for row in session.exec(select(VaultCredential).where(
            col(VaultCredential.tenant_id).in_(tenant_ids), VaultCredential.purpose == CREDENTIAL_PURPOSE)):
        out[(row.crm_account_id, row.app_user_id)] = (row.state, aware(row.created_at))  # type: ignore[assignment]
    return out


def interval_for(account: CrmAccount) -> int:
    import json

    try:
        value = int(json.loads(account.settings_json or "{}").get("sync_interval_seconds") or 0)
    except (TypeError, ValueError):
        value = 0
    return value if value >= 10 else DEFAULT_INTERVAL_SECONDS


def ensure_jobs(session: Session, *, now: datetime, tenant_id: int | None = None,
                principal: Principal | None = None) -> ScheduleResult:
    """Create, disable, re-enable and wake jobs so they match the accounts, users and credentials."""
    principal = principal or Principal.system("sync-scheduler")
    result = ScheduleResult()
    tq = select(Tenant)
    if tenant_id is not None:
        tq = tq.where(Tenant.id == tenant_id)
    tenants = {t.id: t for t in session.exec(tq)}
    tenant_ids = [t for t in tenants if t is not None]
    if not tenant_ids:
        return result
    accounts = list(session.exec(select(CrmAccount).where(col(CrmAccount.tenant_id).in_(tenant_ids))))
    users = {u.id: u for u in session.exec(select(AppUser).where(col(AppUser.tenant_id).in_(tenant_ids)))}
    identities: dict[int, set[int]] = {}
    for ident in session.exec(select(AppUserCrmIdentity).where(
            col(AppUserCrmIdentity.crm_account_id).in_([a.id for a in accounts] or [-1]))):
        identities.setdefault(ident.crm_account_id, set()).add(ident.app_user_id)
    creds = _credentials(session, tenant_ids)
    existing = {(j.crm_account_id, j.owner_key): j for j in session.exec(
        select(SyncJob).where(col(SyncJob.tenant_id).in_(tenant_ids)))}
    wanted: set[tuple[int, str]] = set()
    for acc in accounts:
        assert acc.id is not None
        live = tenants[acc.tenant_id].status == TenantStatus.live
        if acc.credential_mode == "api_user":
            owners: list[int | None] = [None]
        else:
            holders = {u for (a, u) in creds if a == acc.id and u is not None}
            owners = []
            owners.extend(sorted((identities.get(acc.id, set()) | holders) & {i for i in users if i}))
        for uid in owners:
            key = owner_key(uid)
            wanted.add((acc.id, key))
            user_ok = uid is None or users[uid].status == "active"
            cred = creds.get((acc.id, uid))
            job = existing.get((acc.id, key))
            if job is None:
                if not (live and user_ok):
                    continue
                job = SyncJob(tenant_id=acc.tenant_id, crm_account_id=acc.id, app_user_id=uid, owner_key=key,
                              interval_seconds=interval_for(acc), next_run_at=now, created_at=now)
                if cred is None and uid is not None:
                    job.state = JobState.reconnect_needed.value
                    job.reconnect_since = now
                session.add(job)
                existing[(acc.id, key)] = job
                result.created += 1
                continue
            if not (live and user_ok):
                if job.state != JobState.disabled:
                    job.state = JobState.disabled.value
                    session.add(job)
                    result.disabled += 1
                continue
            if job.state == JobState.disabled:
                job.state = JobState.active.value if (cred or uid is None) else JobState.reconnect_needed.value
                job.next_run_at = now
                session.add(job)
                result.enabled += 1
            if job.state == JobState.reconnect_needed and cred is not None and cred[0] == "active":
                if _wake(session, job, stored_at=cred[1], now=now, principal=principal):
                    result.reconnected += 1
    for slot, job in existing.items():
        if slot not in wanted and job.state != JobState.disabled and job.id is not None:
            job.state = JobState.disabled.value
            session.add(job)
            result.disabled += 1
    session.flush()
    return result


def _wake(session: Session, job: SyncJob, *, stored_at: datetime, now: datetime, principal: Principal) -> bool:
    """Wake a job parked as "reconnect needed" when its credential was stored after the park."""
    since = aware(job.reconnect_since)
    if since is not None and aware(stored_at) < since:  # type: ignore[operator]
        return False
    job.state = JobState.active.value
    job.next_run_at = now
    job.attempts = 0
    job.reconnect_since = None
    session.add(job)
    record_event(session, principal=principal, action="sync.reconnected", tenant_id=job.tenant_id,
                 target=f"app_user:{job.app_user_id}" if job.app_user_id is not None
                 else f"crm_account:{job.crm_account_id}",
                 details={"job_id": job.id, "crm_account_id": job.crm_account_id}, at=now)
    return True


def wake_reconnected(session: Session, *, now: datetime, principal: Principal | None = None) -> int:
    """Wake (due at once) only the jobs parked as "reconnect needed" whose owner stored a credential since.

    The cheap, frequent half of ``ensure_jobs``: it reads just the parked jobs and their credentials, so a
    user who used their connect link (or an admin who stored the API user's secret again) syncs within
    seconds, without the full pass over every tenant. Returns how many jobs woke.
    """
    from core.vault.models import VaultCredential

    principal = principal or Principal.system("sync-scheduler")
    same_owner = or_(col(VaultCredential.app_user_id) == col(SyncJob.app_user_id),
                     and_(col(VaultCredential.app_user_id).is_(None), col(SyncJob.app_user_id).is_(None)))
    rows = session.exec(
        select(SyncJob, VaultCredential.created_at)
        .join(VaultCredential, and_(col(VaultCredential.crm_account_id) == col(SyncJob.crm_account_id), same_owner))
        .where(SyncJob.state == JobState.reconnect_needed.value, VaultCredential.purpose == CREDENTIAL_PURPOSE,
               VaultCredential.state == "active")
        .order_by(col(SyncJob.id), col(VaultCredential.created_at).desc())
    ).all()
    woken = 0
    seen: set[int] = set()
    for job, stored_at in rows:
        assert job.id is not None
        if job.id in seen:  # the newest credential of the job's owner decides
            continue
        seen.add(job.id)
        if _wake(session, job, stored_at=stored_at, now=now, principal=principal):
            woken += 1
    session.flush()
    return woken


def run_scheduler(engine: Engine, *, now: datetime, sweep: bool = True) -> ScheduleResult:
    """One scheduler pass: ensure jobs (one transaction), then the vault sweep (another)."""
    with Session(engine, expire_on_commit=False) as s:
        result = ensure_jobs(s, now=now)
        s.commit()
    if sweep:
        from core.vault.service import sweep as vault_sweep

        with Session(engine, expire_on_commit=False) as s:
            swept = vault_sweep(s, now=now, principal=Principal.system("sync-scheduler"))
            s.commit()
        result.swept = swept.destroyed
    log.info("sync: scheduler pass: %s", result)
    return result
