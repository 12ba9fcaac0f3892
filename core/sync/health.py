"""Sync health per user (per job) and per CRM account, derived from jobs, runs and the vault.

Two separate answers, because they call for different people to act:

- **auth health** — can we act in the CRM for this owner? ``ok``; ``expiring`` (the stored credential
  self-destructs within 7 days, TTL or idle); ``reconnect needed`` (destroyed, never connected, or the
  job parked after an authentication failure: the user must reconnect); ``failed`` (an API-user
  credential the CRM rejected, held back for the admin; or a tampered one).
- **sync health** — is data flowing? ``paused`` (an admin paused the user or the account, the CRM
  rate-limited the account, or the job waits for a reconnect); ``failing`` (3 failed runs in a row —
  one or two transient failures never flip it); ``lagging`` (no success for longer than
  ``lag_limit``: three intervals, at least 15 minutes); ``healthy``.

``user_health`` and ``account_health`` read everything in a few grouped queries (no per-user query)
and leave access checks to ``core.sync.service``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import func
from sqlmodel import Session, col, select

from core.clock import aware
from core.errors import (
    ApiDisabled,
    AuthenticationFailed,
    ConfigurationError,
    CredentialDestroyed,
    CredentialExpired,
    CredentialInvalid,
    CrmBridgeError,
    MalformedResponse,
    ProviderUnavailable,
    RateLimited,
    RecordError,
    SessionExpired,
)
from core.sync.models import CREDENTIAL_PURPOSE, FAILING_AFTER, JobState, SyncAccountState, SyncJob, SyncRun
from core.tenants.access import Principal
from core.tenants.models import AppUser, CrmAccount

EXPIRING_WITHIN = timedelta(days=7)
MIN_LAG_LIMIT = timedelta(minutes=15)


class AuthHealth(StrEnum):
    ok = "ok"
    expiring = "expiring"
    reconnect_needed = "reconnect needed"
    failed = "failed"


class SyncHealth(StrEnum):
    healthy = "healthy"
    lagging = "lagging"
    failing = "failing"
    paused = "paused"


AUTH_STATES = tuple(s.value for s in AuthHealth)
SYNC_STATES = tuple(s.value for s in SyncHealth)

_FIXES: tuple[tuple[type[BaseException], str], ...] = (
    (CredentialExpired, "The stored credential expired and was destroyed: ask the user to reconnect "
                        "(Users & sync → Ask to reconnect)."),
    (CredentialDestroyed, "No usable credential is stored: ask the user to reconnect (Users & sync → Ask to "
                          "reconnect), or store the API user's secret again on the tenant page."),
    (CredentialInvalid, "The credential is held back (rejected by the CRM or altered): fix the API user in the "
                        "CRM and store its secret again on the tenant page, or ask the user to reconnect."),
    (AuthenticationFailed, "The CRM rejected the credential, so the vault destroyed it: ask the user to reconnect "
                           "(Users & sync → Ask to reconnect); for an API user, fix it in the CRM and store "
                           "the new secret on the tenant page."),
    (RateLimited, "The CRM's API limit is reached: the whole account is paused and resumes by itself when the "
                  "limit resets; if it recurs, raise the org's API allocation or sync less often."),
    (ApiDisabled, "API access is off for this org or user: enable the API (Professional edition needs the API "
                  "add-on) or give the user the 'API Enabled' permission."),
    (SessionExpired, "The CRM session expired and could not be renewed: sync retries by itself; if it persists, "
                     "ask the user to reconnect."),
    (ProviderUnavailable, "The CRM could not be reached (timeout or server error): sync retries by itself with "
                          "backoff; check the CRM's status page if it lasts."),
    (MalformedResponse, "The CRM answered something unreadable: sync retries by itself; if it persists, check the "
                        "instance URL on the tenant page."),
    (ConfigurationError, "The CRM account's settings are incomplete: fix them on the tenant page."),
    (RecordError, "The CRM rejected the record: correct it (see the outbox entry's message) and retry it."),
)


def fix_for(exc: BaseException) -> str | None:
    """What the admin should do about ``exc`` (the error's own fix when it names one)."""
    if isinstance(exc, CrmBridgeError) and exc.fix:
        return exc.fix[:1000]
    for cls, fix in _FIXES:
        if isinstance(exc, cls):
            return fix
    return None


def lag_limit(interval: timedelta) -> timedelta:
    return max(3 * interval, MIN_LAG_LIMIT)


def auth_health(*, job_state: str, credential_state: str | None, ends_at: datetime | None, now: datetime,
                per_user: bool) -> AuthHealth:
    """``credential_state`` as ``core.vault.service.credential_state`` names it ("connected", "failed",
    "invalid", "reconnect needed", "not connected"), or None when nothing is known."""
    if credential_state in ("failed", "invalid"):
        return AuthHealth.failed
    if job_state == JobState.reconnect_needed:
        return AuthHealth.failed if not per_user else AuthHealth.reconnect_needed
    if credential_state in (None, "reconnect needed", "not connected"):
        return AuthHealth.reconnect_needed
    ends = aware(ends_at)
    if ends is not None and ends - now <= EXPIRING_WITHIN:
        return AuthHealth.expiring
    return AuthHealth.ok


def sync_health(*, job_state: str, account_paused: bool, consecutive_failures: int,
                last_success_at: datetime | None, created_at: datetime | None, interval: timedelta,
                now: datetime) -> tuple[SyncHealth, str]:
    """(state, reason in words)."""
    if job_state == JobState.paused:
        return SyncHealth.paused, "paused by an admin"
    if job_state == JobState.reconnect_needed:
        return SyncHealth.paused, "waiting for the user to reconnect"
    if job_state == JobState.disabled:
        return SyncHealth.paused, "disabled (user or account inactive)"
    if account_paused:
        return SyncHealth.paused, "the CRM account is paused"
    if consecutive_failures >= FAILING_AFTER:
        return SyncHealth.failing, f"{consecutive_failures} failed runs in a row"
    since = aware(last_success_at) or aware(created_at)
    if since is not None and now - since > lag_limit(interval):
        what = "no successful run" if last_success_at is None else "last success"
        return SyncHealth.lagging, f"{what} for {_span(now - since)}"
    if consecutive_failures:
        return SyncHealth.healthy, f"{consecutive_failures} failed run(s), retrying"
    return SyncHealth.healthy, "up to date"


def _span(td: timedelta) -> str:
    secs = int(td.total_seconds())
    if secs >= 86400:
        return f"{secs // 86400} d {secs % 86400 // 3600} h"
    if secs >= 3600:
        return f"{secs // 3600} h {secs % 3600 // 60} min"
    return f"{max(secs // 60, 0)} min"


@dataclass
class UserHealth:
    job_id: int
    tenant_id: int
    crm_account_id: int
    account_label: str
    provider: str
    credential_mode: str
    app_user_id: int | None
    owner: str  # the user's email, or "API user"
    owner_name: str
    auth: str
    sync: str
    sync_reason: str
    job_state: str
    last_success_at: datetime | None
    lag: timedelta | None
    records_in_24h: int
    records_out_24h: int
    consecutive_failures: int
    last_error: str | None
    last_error_fix: str | None
    last_error_at: datetime | None
    credential_state: str | None
    credential_ends_at: datetime | None
    next_run_at: datetime | None
    paused_until: datetime | None
    reconnect_requested_at: datetime | None


@dataclass
class AccountHealth:
    crm_account_id: int
    label: str
    provider: str
    credential_mode: str
    jobs: int = 0
    by_sync: dict[str, int] = field(default_factory=dict)
    by_auth: dict[str, int] = field(default_factory=dict)
    records_in_24h: int = 0
    records_out_24h: int = 0
    last_success_at: datetime | None = None
    paused_until: datetime | None = None
    paused_by: str | None = None
    pause_reason: str | None = None

    @property
    def sync(self) -> str:
        """The account's state: paused if paused, else the worst of its users."""
        if self.paused_by or self.paused_until:
            return SyncHealth.paused.value
        for state in (SyncHealth.failing, SyncHealth.lagging, SyncHealth.paused):
            if self.by_sync.get(state.value):
                return state.value
        return SyncHealth.healthy.value


def _credentials(session: Session, tenant_id: int, now: datetime) -> dict[tuple[int | None, int | None],
                                                                          tuple[str, datetime | None]]:
    """(crm_account_id, app_user_id) → (state, self-destructs at) from the vault."""
    try:
        from core.vault.service import list_credentials
    except ImportError:  # pragma: no cover - the vault ships with the product
        return {}
    out: dict[tuple[int | None, int | None], tuple[str, datetime | None]] = {}
    for info in list_credentials(session, principal=Principal.system("sync-health"), tenant_id=tenant_id, now=now):
        if info.purpose != CREDENTIAL_PURPOSE:
            continue
        state = "connected" if info.state == "active" else info.state
        out[(info.crm_account_id, info.app_user_id)] = (state, info.ends_at)
    return out


def _account_states(session: Session, tenant_id: int) -> dict[int, SyncAccountState]:
    return {a.crm_account_id: a for a in session.exec(
        select(SyncAccountState).where(SyncAccountState.tenant_id == tenant_id))}


def account_paused(state: SyncAccountState | None, now: datetime) -> bool:
    if state is None:
        return False
    until = aware(state.paused_until)
    return bool(state.paused_by) or (until is not None and until > now)


def user_health(session: Session, *, tenant_id: int, now: datetime) -> list[UserHealth]:
    """One row per sync job of the tenant (per user for per-user accounts, per account for an API user)."""
    accounts = {a.id: a for a in session.exec(select(CrmAccount).where(CrmAccount.tenant_id == tenant_id))}
    users = {u.id: u for u in session.exec(select(AppUser).where(AppUser.tenant_id == tenant_id))}
    jobs = list(session.exec(select(SyncJob).where(SyncJob.tenant_id == tenant_id).order_by(col(SyncJob.id))))
    since = now - timedelta(hours=24)
    volume = {row[0]: (int(row[1] or 0), int(row[2] or 0)) for row in session.exec(
        select(SyncRun.job_id, func.sum(SyncRun.records_in), func.sum(SyncRun.records_out))
        .where(SyncRun.tenant_id == tenant_id, col(SyncRun.started_at) >= since)
        .group_by(col(SyncRun.job_id)))}
    creds = _credentials(session, tenant_id, now)
    states = _account_states(session, tenant_id)
    out: list[UserHealth] = []
    for job in jobs:
        acc = accounts.get(job.crm_account_id)
        if acc is None or job.id is None:
            continue
        per_user = acc.credential_mode != "api_user"
        user = users.get(job.app_user_id) if job.app_user_id is not None else None
        cred_state, ends = creds.get((job.crm_account_id, job.app_user_id), (None, None))
        if cred_state is None and job.app_user_id is not None:
            cred_state = "not connected"
        st = states.get(job.crm_account_id)
        interval = timedelta(seconds=job.interval_seconds)
        sync, reason = sync_health(job_state=job.state, account_paused=account_paused(st, now),
                                   consecutive_failures=job.consecutive_failures,
                                   last_success_at=job.last_success_at, created_at=job.created_at,
                                   interval=interval, now=now)
        if sync == SyncHealth.paused and st is not None and account_paused(st, now) and job.state == JobState.active:
            reason = ("paused by " + st.paused_by) if st.paused_by else (
                f"the CRM rate-limited the account until {aware(st.paused_until):%Y-%m-%d %H:%M} UTC")
        last_ok = aware(job.last_success_at)
        ins, outs = volume.get(job.id, (0, 0))
        out.append(UserHealth(
            job_id=job.id, tenant_id=tenant_id, crm_account_id=job.crm_account_id, account_label=acc.label,
            provider=acc.provider, credential_mode=acc.credential_mode, app_user_id=job.app_user_id,
            owner=user.email if user else "API user", owner_name=user.name if user else acc.label,
            auth=auth_health(job_state=job.state, credential_state=cred_state, ends_at=ends, now=now,
                             per_user=per_user).value,
            sync=sync.value, sync_reason=reason, job_state=job.state, last_success_at=last_ok,
            lag=(now - last_ok) if last_ok else None, records_in_24h=ins, records_out_24h=outs,
            consecutive_failures=job.consecutive_failures, last_error=job.last_error,
            last_error_fix=job.last_error_fix, last_error_at=aware(job.last_error_at), credential_state=cred_state,
            credential_ends_at=aware(ends), next_run_at=aware(job.next_run_at),
            paused_until=aware(st.paused_until) if st else None,
            reconnect_requested_at=aware(job.reconnect_requested_at),
        ))
    return out


def account_health(session: Session, *, tenant_id: int, now: datetime,
                   rows: list[UserHealth] | None = None) -> list[AccountHealth]:
    """One summary per CRM account of the tenant (the page's tiles)."""
    rows = rows if rows is not None else user_health(session, tenant_id=tenant_id, now=now)
    states = _account_states(session, tenant_id)
    out: dict[int, AccountHealth] = {}
    for acc in session.exec(select(CrmAccount).where(CrmAccount.tenant_id == tenant_id).order_by(col(CrmAccount.id))):
        assert acc.id is not None
        st = states.get(acc.id)
        until = aware(st.paused_until) if st else None
        out[acc.id] = AccountHealth(
            crm_account_id=acc.id, label=acc.label, provider=acc.provider, credential_mode=acc.credential_mode,
            paused_until=until if until and until > now else None, paused_by=st.paused_by if st else None,
            pause_reason=st.pause_reason if st and (st.paused_by or (until and until > now)) else None,
        )
    counts: dict[int, dict[str, dict[str, int]]] = defaultdict(lambda: {"sync": {}, "auth": {}})
    for r in rows:
        a = out.get(r.crm_account_id)
        if a is None:
            continue
        a.jobs += 1
        c = counts[r.crm_account_id]
        c["sync"][r.sync] = c["sync"].get(r.sync, 0) + 1
        c["auth"][r.auth] = c["auth"].get(r.auth, 0) + 1
        a.records_in_24h += r.records_in_24h
        a.records_out_24h += r.records_out_24h
        if r.last_success_at and (a.last_success_at is None or r.last_success_at > a.last_success_at):
            a.last_success_at = r.last_success_at
    for acc_id, c in counts.items():
        out[acc_id].by_sync = c["sync"]
        out[acc_id].by_auth = c["auth"]
    return list(out.values())
