"""The periodic jobs a deployment runs, each at its interval (a setting), once per interval overall.

Each job is one call into its package's service, in its own transaction(s), as the system principal
``scheduler``; it returns a one-line summary for the job's row (shown on the Overview).

| job               | default interval | what it does                                                      |
|-------------------|------------------|-------------------------------------------------------------------|
| sync-schedule     | 60 s             | create, disable and re-enable sync jobs; wake reconnected ones    |
| sync-wake         | 5 s              | wake only the jobs whose user reconnected (cheap)                 |
| vault-sweep       | 1 h              | destroy expired and idle credentials                              |
| alerts-run        | 5 min            | evaluate alert rules; deliver and retry email and webhooks        |
| alerts-digest     | 1 day            | the cross-tenant digest to staff channels                         |
| sso-watch         | 1 day            | IdP certificate watch, SP key rollover, replay-cache purge        |
| posture-snapshot  | 1 day            | one posture row per tenant (trends, adoption, landing pages)      |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from core.db import session_scope
from core.settings import Settings, get_settings
from core.tenants.access import Principal

SCHEDULER = Principal.system("scheduler")


@dataclass(frozen=True)
class JobSpec:
    name: str
    title: str
    what: str
    setting: str  # the Settings field holding the interval in seconds (CRMBRIDGE_<SETTING>)
    run: Callable[[Engine, datetime], str]
    quiet: bool = False  # frequent: a run that found nothing to do is logged at DEBUG only


def _sync_schedule(engine: Engine, now: datetime) -> str:
    from core.sync.scheduler import run_scheduler

    for attempt in range(3):
        try:
            r = run_scheduler(engine, now=now, sweep=False)  # the vault sweep is its own job
            return (f"sync jobs: {r.created} created, {r.disabled} disabled, {r.enabled} re-enabled, "
                    f"{r.reconnected} woken after a reconnect")
        except IntegrityError:  # a worker created the same job at the same moment: look again
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _sync_wake(engine: Engine, now: datetime) -> str:
    from core.sync.scheduler import wake_reconnected

    with session_scope(engine) as s:
        n = wake_reconnected(s, now=now, principal=SCHEDULER)
    return f"{n} sync job(s) woken after a reconnect"


def _vault_sweep(engine: Engine, now: datetime) -> str:
    from core.vault import service

    with session_scope(engine) as s:
        service.check_keys(s, now=now)
        r = service.sweep(s, now=now, principal=SCHEDULER)
    return f"destroyed {r.expired} expired and {r.idle} idle credential(s)"


def _alerts_run(engine: Engine, now: datetime) -> str:
    from core.alerts.service import run_alerts

    with session_scope(engine) as s:
        r = run_alerts(session=s, principal=SCHEDULER, now=now, deliver=True)
    rep = r.report
    skipped = f"; skipped {', '.join(r.skipped)}" if r.skipped else ""
    return (f"{r.observations} observation(s), {len(r.notices)} notice(s); deliveries: {rep.sent} sent, "
            f"{rep.retrying} retrying, {rep.failed} failed{skipped}")


def _alerts_digest(engine: Engine, now: datetime) -> str:
    from core.alerts.service import send_staff_digest

    with session_scope(engine) as s:
        digest = send_staff_digest(session=s, principal=SCHEDULER, now=now)
    return digest.title if digest else "nothing new since the last digest"


def _sso_watch(engine: Engine, now: datetime) -> str:
    from core.sso.watch import purge_expired, watch_certificates

    with session_scope(engine) as s:
        findings = watch_certificates(session=s, principal=SCHEDULER, now=now)
        purged = purge_expired(session=s, now=now)
    new = sum(1 for f in findings if f.new)
    return f"{len(findings)} certificate finding(s), {new} new; {purged} expired replay-cache row(s) purged"


def _posture_snapshot(engine: Engine, now: datetime) -> str:
    from core.posture.service import record_daily_snapshots

    with session_scope(engine) as s:
        n = record_daily_snapshots(session=s, principal=SCHEDULER, now=now)
    return f"today's posture snapshot recorded for {n} tenant(s)"


JOBS: tuple[JobSpec, ...] = (
    JobSpec("sync-schedule", "Sync schedule", "Creates, disables and re-enables sync jobs to match the tenants, "
            "accounts and users; wakes jobs whose credential came back.", "schedule_sync_seconds", _sync_schedule),
    JobSpec("sync-wake", "Reconnect wake-up", "Wakes the sync jobs of users who just reconnected.",
            "schedule_sync_wake_seconds", _sync_wake, quiet=True),
    JobSpec("vault-sweep", "Vault sweep", "Destroys expired and idle credentials.", "schedule_vault_sweep_seconds",
            _vault_sweep),
    JobSpec("alerts-run", "Alerts", "Evaluates the alert rules; delivers and retries email and webhooks.",
            "schedule_alerts_seconds", _alerts_run),
    JobSpec("alerts-digest", "Staff digest", "Sends the cross-tenant digest to the staff channels.",
            "schedule_alerts_digest_seconds", _alerts_digest),
    JobSpec("sso-watch", "SSO watch", "IdP certificate watch (90/30/7 days), SP key rollover, replay-cache purge.",
            "schedule_sso_watch_seconds", _sso_watch),
    JobSpec("posture-snapshot", "Posture snapshot", "Records one posture row per tenant for trends and adoption.",
            "schedule_posture_seconds", _posture_snapshot),
)
BY_NAME = {j.name: j for j in JOBS}


def configured_intervals(settings: Settings | None = None) -> dict[str, int]:
    """Each job's interval in seconds, from the settings (CRMBRIDGE_SCHEDULE_…_SECONDS)."""
    s = settings or get_settings()
    return {j.name: int(getattr(s, j.setting)) for j in JOBS}
