"""Services for the Users & sync page: health tables, a user's drill-down, and the admin's actions.

Every function checks access first: staff, or the tenant's own admin (user-level data: leadership
never sees it). Every action writes an audit event in the caller's transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from core.clock import aware, utcnow
from core.errors import InvalidInput, NotFound
from core.sync.health import (
    AUTH_STATES,
    SYNC_STATES,
    AccountHealth,
    UserHealth,
    account_health,
    user_health,
)
from core.sync.models import (
    JobState,
    OutboxStatus,
    RunStatus,
    SyncAccountState,
    SyncConflict,
    SyncJob,
    SyncOpportunity,
    SyncOutbox,
    SyncRun,
)
from core.tenants.access import Principal, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import CrmAccount


@dataclass
class SyncOverview:
    users: list[UserHealth]
    accounts: list[AccountHealth]
    providers: list[str]
    account_labels: dict[int, str]
    total: int  # rows before filters


def sync_overview(
    *,
    session: Session,
    principal: Principal,
    tenant_id: int,
    now: datetime | None = None,
    auth_state: str | None = None,
    sync_state: str | None = None,
    provider: str | None = None,
    crm_account_id: int | None = None,
) -> SyncOverview:
    """Per-user health rows (filtered) and the per-account tiles of one tenant."""
    require_tenant(principal, tenant_id)
    now = now or utcnow()
    rows = user_health(session, tenant_id=tenant_id, now=now)
    accounts = account_health(session, tenant_id=tenant_id, now=now, rows=rows)
    shown = filter_users(rows, auth_state=auth_state, sync_state=sync_state, provider=provider,
                         crm_account_id=crm_account_id)
    return SyncOverview(users=shown, accounts=accounts, providers=sorted({a.provider for a in accounts}),
                        account_labels={a.crm_account_id: a.label for a in accounts}, total=len(rows))


def filter_users(rows: list[UserHealth], *, auth_state: str | None = None, sync_state: str | None = None,
                 provider: str | None = None, crm_account_id: int | None = None) -> list[UserHealth]:
    """The rows matching every filter given (None: any)."""
    for name, value, allowed in (("auth state", auth_state, AUTH_STATES), ("sync state", sync_state, SYNC_STATES)):
        if value is not None and value not in allowed:
            raise InvalidInput(f"Unknown {name} {value!r}: use one of {', '.join(allowed)}.")
    return [r for r in rows
            if (auth_state is None or r.auth == auth_state) and (sync_state is None or r.sync == sync_state)
            and (provider is None or r.provider == provider)
            and (crm_account_id is None or r.crm_account_id == crm_account_id)]


@dataclass
class RunView:
    id: int
    started_at: datetime
    finished_at: datetime | None
    status: str
    records_in: int
    records_out: int
    records_failed: int
    conflicts: int
    api_calls: int
    error: str | None
    fix: str | None
    worker: str


@dataclass
class ErrorView:
    at: datetime
    what: str  # "run" or "record"
    error: str
    fix: str | None


@dataclass
class ConflictView:
    at: datetime
    crm_id: str | None
    field: str
    app_value: str | None
    crm_value: str | None
    winner: str


@dataclass
class UserDetail:
    health: UserHealth
    runs: list[RunView]
    errors: list[ErrorView]
    conflicts: list[ConflictView]
    pending: int
    failed_records: int
    credential: dict[str, str | None] = field(default_factory=dict)


RECORD_FIX = "Correct the record in the app (or the CRM's validation rule), then retry it from the outbox."


def _job(session: Session, principal: Principal, job_id: int) -> SyncJob:
    job = session.get(SyncJob, job_id)
    if job is None:
        raise NotFound(f"Sync job {job_id} does not exist: pick a user from the table.")
    require_tenant(principal, job.tenant_id)
    return job


def user_detail(
    *, session: Session, principal: Principal, job_id: int, now: datetime | None = None, runs: int = 50,
) -> UserDetail:
    """One user's (one job's) runs timeline, recent errors with their fix, conflicts and credential state."""
    now = now or utcnow()
    job = _job(session, principal, job_id)
    health = next((r for r in user_health(session, tenant_id=job.tenant_id, now=now) if r.job_id == job_id), None)
    if health is None:
        raise NotFound(f"Sync job {job_id} has no CRM account any more.")
    run_rows = list(session.exec(select(SyncRun).where(SyncRun.job_id == job_id)
                                 .order_by(col(SyncRun.started_at).desc(), col(SyncRun.id).desc()).limit(runs)))
    views = [RunView(id=r.id or 0, started_at=aware(r.started_at), finished_at=aware(r.finished_at),  # type: ignore[arg-type]
                     status=r.status, records_in=r.records_in, records_out=r.records_out,
                     records_failed=r.records_failed, conflicts=r.conflicts, api_calls=r.api_calls, error=r.error,
                     fix=r.fix, worker=r.worker) for r in reversed(run_rows)]
    conds = [col(SyncOutbox.crm_account_id) == job.crm_account_id]
    if job.app_user_id is not None:
        conds.append(col(SyncOutbox.actor_app_user_id) == job.app_user_id)
    failed = list(session.exec(select(SyncOutbox).where(*conds, SyncOutbox.status == OutboxStatus.failed.value)
                               .order_by(col(SyncOutbox.updated_at).desc()).limit(20)))
    pending = int(session.exec(select(func.count()).select_from(SyncOutbox).where(
        *conds, SyncOutbox.status == OutboxStatus.pending.value)).one())
    errors = [ErrorView(at=aware(r.started_at), what="run", error=r.error, fix=r.fix)  # type: ignore[arg-type]
              for r in run_rows if r.error and r.status not in (RunStatus.success, RunStatus.skipped)][:10]
    names = dict(session.exec(select(SyncOpportunity.id, SyncOpportunity.name).where(
        col(SyncOpportunity.id).in_([o.opportunity_id for o in failed] or [-1]))).all())
    for o in failed:
        name = json.loads(o.fields_json or "{}").get("name") or names.get(o.opportunity_id)
        errors.append(ErrorView(at=aware(o.updated_at), what="record",  # type: ignore[arg-type]
                                error=f"{name or o.idempotency_key}: {o.last_error or o.last_error_code}",
                                fix=RECORD_FIX))
    errors.sort(key=lambda e: e.at, reverse=True)
    cq = select(SyncConflict).where(SyncConflict.crm_account_id == job.crm_account_id)
    if job.app_user_id is not None:
        mine = select(SyncOutbox.id).where(*conds)
        cq = cq.where(col(SyncConflict.outbox_id).in_(mine))
    conflicts = [ConflictView(at=aware(c.resolved_at), crm_id=c.crm_id, field=c.field, app_value=c.app_value,  # type: ignore[arg-type]
                              crm_value=c.crm_value, winner=c.winner)
                 for c in session.exec(cq.order_by(col(SyncConflict.resolved_at).desc()).limit(20))]
    credential: dict[str, str | None] = {
        "state": health.credential_state or "—",
        "self-destructs": f"{health.credential_ends_at:%Y-%m-%d %H:%M} UTC" if health.credential_ends_at else None,
        "reconnect asked": f"{health.reconnect_requested_at:%Y-%m-%d %H:%M} UTC"
        if health.reconnect_requested_at else None,
    }
    return UserDetail(health=health, runs=views, errors=errors[:20], conflicts=conflicts, pending=pending,
                      failed_records=len(failed), credential=credential)


def _event(session: Session, principal: Principal, job: SyncJob, action: str, now: datetime,
           details: dict[str, object] | None = None) -> None:
    target = f"app_user:{job.app_user_id}" if job.app_user_id is not None else f"crm_account:{job.crm_account_id}"
    record_event(session, principal=principal, action=action, tenant_id=job.tenant_id, target=target,
                 details={"job_id": job.id, "crm_account_id": job.crm_account_id, **(details or {})}, at=now)


def sync_now(*, session: Session, principal: Principal, job_id: int, now: datetime | None = None) -> SyncJob:
    """Make the job due now (the next worker poll runs it)."""
    now = now or utcnow()
    job = _job(session, principal, job_id)
    if job.state == JobState.reconnect_needed:
        raise InvalidInput("This sync waits for a reconnect: ask the user to reconnect first (its credential is gone).")
    if job.state == JobState.paused:
        raise InvalidInput("This sync is paused: resume it first.")
    if job.state == JobState.disabled:
        raise InvalidInput("This sync is disabled (the user or the account is inactive): activate them first.")
    job.next_run_at = now
    job.attempts = 0
    session.add(job)
    _event(session, principal, job, "sync.run_now", now)
    return job


def pause_job(*, session: Session, principal: Principal, job_id: int, now: datetime | None = None) -> SyncJob:
    now = now or utcnow()
    job = _job(session, principal, job_id)
    if job.state == JobState.paused:
        return job
    if job.state != JobState.active:
        raise InvalidInput(f"Only an active sync can be paused (this one is {job.state.replace('_', ' ')}).")
    job.state = JobState.paused.value
    job.paused_by = principal.email[:254]
    job.paused_at = now
    session.add(job)
    _event(session, principal, job, "sync.pause", now)
    return job


def resume_job(*, session: Session, principal: Principal, job_id: int, now: datetime | None = None) -> SyncJob:
    now = now or utcnow()
    job = _job(session, principal, job_id)
    if job.state != JobState.paused:
        raise InvalidInput("This sync is not paused.")
    job.state = JobState.active.value
    job.paused_by = None
    job.paused_at = None
    job.next_run_at = now
    session.add(job)
    _event(session, principal, job, "sync.resume", now)
    return job


def _account(session: Session, principal: Principal, crm_account_id: int) -> CrmAccount:
    account = session.get(CrmAccount, crm_account_id)
    if account is None:
        raise NotFound(f"CRM account {crm_account_id} does not exist.")
    require_tenant(principal, account.tenant_id)
    return account


def pause_account(*, session: Session, principal: Principal, crm_account_id: int,
                  now: datetime | None = None) -> SyncAccountState:
    """Pause every sync of a CRM account until resumed."""
    now = now or utcnow()
    account = _account(session, principal, crm_account_id)
    state = session.get(SyncAccountState, crm_account_id) or SyncAccountState(
        crm_account_id=crm_account_id, tenant_id=account.tenant_id)
    state.paused_by = principal.email[:254]
    state.paused_at = now
    state.pause_reason = f"paused by {principal.email}"
    state.updated_at = now
    session.add(state)
    record_event(session, principal=principal, action="sync.account.pause", tenant_id=account.tenant_id,
                 target=f"crm_account:{crm_account_id}", details={"label": account.label}, at=now)
    return state


def resume_account(*, session: Session, principal: Principal, crm_account_id: int,
                   now: datetime | None = None) -> SyncAccountState:
    now = now or utcnow()
    account = _account(session, principal, crm_account_id)
    state = session.get(SyncAccountState, crm_account_id)
    if state is None or not state.paused_by:
        raise InvalidInput(f"{account.label} is not paused by an admin (a rate-limit pause ends by itself).")
    state.paused_by = None
    state.paused_at = None
    state.pause_reason = None
    state.updated_at = now
    session.add(state)
    record_event(session, principal=principal, action="sync.account.resume", tenant_id=account.tenant_id,
                 target=f"crm_account:{crm_account_id}", details={"label": account.label}, at=now)
    return state


@dataclass(frozen=True)
class ReconnectRequest:
    url: str
    expires_at: datetime
    email: str


def ask_to_reconnect(
    *, session: Session, principal: Principal, job_id: int, now: datetime | None = None,
) -> ReconnectRequest:
    """Create a connect link for the job's user (via the vault) and record that they were asked.

    Raises:
        InvalidInput: the job runs as an API user (there is nobody to reconnect: store its secret again).
    """
    from core.connections.links import LINK_TTL, create_connect_link
    from core.tenants.models import AppUser

    now = now or utcnow()
    job = _job(session, principal, job_id)
    if job.app_user_id is None:
        raise InvalidInput("This account syncs as an API user: there is no user to reconnect — store the API user's "
                           "secret again on the tenant page.")
    user = session.get(AppUser, job.app_user_id)
    url = create_connect_link(session, principal=principal, tenant_id=job.tenant_id, app_user_id=job.app_user_id,
                              crm_account_id=job.crm_account_id, now=now)
    job.reconnect_requested_at = now
    job.reconnect_requested_by = principal.email[:254]
    session.add(job)
    _event(session, principal, job, "sync.reconnect_requested", now, {"expires_at": now + LINK_TTL})
    return ReconnectRequest(url=url, expires_at=now + LINK_TTL, email=user.email if user else "")


def outbox_summary(*, session: Session, principal: Principal, tenant_id: int) -> dict[str, int]:
    """Outbox entries of the tenant by status."""
    require_tenant(principal, tenant_id)
    out: dict[str, int] = {}
    for status in session.exec(select(SyncOutbox.status).where(SyncOutbox.tenant_id == tenant_id)):
        out[status] = out.get(status, 0) + 1
    return out


def lag_text(lag: timedelta | None) -> str:
    if lag is None:
        return "never synced"
    secs = int(lag.total_seconds())
    if secs < 60:
        return "just now"
    if secs < 3600:
        return f"{secs // 60} min"
    if secs < 86400:
        return f"{secs // 3600} h {secs % 3600 // 60} min"
    return f"{secs // 86400} d {secs % 86400 // 3600} h"


@dataclass(frozen=True)
class AccountStatus:
    """A CRM account's status as a person reads it, from whichever is newer: its latest connection
    test or its latest finished sync run (so a live, syncing account never reads "never tested")."""

    crm_account_id: int
    state: str  # new | connected | failing | syncing | sync failing | rate limited | paused
    label: str  # "syncing (last run 5 min ago)", "never tested", ...
    at: datetime | None
    source: str  # "test" | "sync" | "none"


_RUN_STATES = {RunStatus.success.value: "syncing", RunStatus.partial.value: "syncing (some records rejected)",
               RunStatus.failed.value: "sync failing", RunStatus.reconnect_needed.value: "sync failing",
               RunStatus.rate_limited.value: "rate limited"}


def _ago(at: datetime, now: datetime) -> str:
    secs = max((now - at).total_seconds(), 0)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= n:
            return f"{int(secs // n)} {unit} ago"
    return "just now"


def account_statuses(*, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
                     ) -> dict[int, AccountStatus]:
    """Each of the tenant's CRM accounts' status (one definition, for every page that shows it).

    Raises:
        AccessDenied: another tenant's admin, or leadership.
    """
    require_tenant(principal, tenant_id)
    now = now or utcnow()
    accounts = session.exec(select(CrmAccount).where(CrmAccount.tenant_id == tenant_id)).all()
    newest = dict(session.exec(
        select(SyncRun.crm_account_id, func.max(SyncRun.finished_at))  # type: ignore[call-overload]
        .where(SyncRun.tenant_id == tenant_id, col(SyncRun.finished_at).is_not(None),
               col(SyncRun.status).in_(list(_RUN_STATES)))
        .group_by(col(SyncRun.crm_account_id))).all())
    paused = {s.crm_account_id for s in session.exec(
        select(SyncAccountState).where(SyncAccountState.tenant_id == tenant_id)).all() if s.paused_by}
    out: dict[int, AccountStatus] = {}
    for a in accounts:
        assert a.id is not None
        run_at = aware(newest.get(a.id))
        test_at = aware(a.last_test_at)
        if a.id in paused:
            out[a.id] = AccountStatus(a.id, "paused", "paused by an admin", run_at or test_at,
                                      "sync" if run_at else "test" if test_at else "none")
        elif run_at is not None and (test_at is None or run_at >= test_at):
            status = session.exec(select(SyncRun.status).where(SyncRun.crm_account_id == a.id,
                                                               SyncRun.finished_at == newest[a.id])).first()
            state = _RUN_STATES.get(str(status), "syncing")
            out[a.id] = AccountStatus(a.id, state.split(" (")[0], f"{state} · last sync {_ago(run_at, now)}",
                                      run_at, "sync")
        elif test_at is not None:
            state = "connected" if a.last_test_ok else "failing"
            verdict = "passed" if a.last_test_ok else "failed"
            out[a.id] = AccountStatus(a.id, state, f"{state} · connection test {verdict} {_ago(test_at, now)}",
                                      test_at, "test")
        else:
            out[a.id] = AccountStatus(a.id, "new", "new · never tested", None, "none")
    return out
