"""Claims, leases and the status of the periodic jobs (the ``periodic_job`` row per job).

Time is cut into windows aligned on the epoch: a job with a 300 s interval has windows 12:00–12:05,
12:05–12:10, … and a daily job one window per UTC day. A scheduler may run a job only after it won the
job's row with one conditional UPDATE:

    UPDATE periodic_job SET lease…, last_window_start = <this window>, last_outcome = 'running'
     WHERE name = :job
       AND (last_window_start IS NULL OR last_window_start < <this window>          -- not run in it yet
            OR (last_outcome = 'running' AND lease_expires_at <= :now))             -- its runner died
       AND (lease_expires_at IS NULL OR lease_expires_at <= :now)                   -- nobody holds it

The database decides: on PostgreSQL a second UPDATE of the row waits for the first to commit and then
re-checks the WHERE clause against the new row (READ COMMITTED), so it matches nothing; on SQLite every
transaction starts with ``BEGIN IMMEDIATE`` (one writer at a time). So each job runs once per window
however many schedulers run, on however many machines. The winner holds a lease it renews while the
job runs; a scheduler that dies stops renewing, and once the lease lapses another one takes the job
over in the same window (the dead one's run is recorded as ``abandoned``).

The windows follow each scheduler's clock: keep the machines' clocks in sync (NTP), as for the leases.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.clock import aware
from core.scheduler.models import Outcome, PeriodicJob, PeriodicRun
from core.tenants.access import Principal, require_staff

log = logging.getLogger("crmbridge.scheduler")

KEEP_RUNS = 500  # history rows kept per job (older ones are pruned when a run finishes)


def window_start(now: datetime, interval_seconds: int) -> datetime:
    """Start of the interval window holding ``now`` (windows are aligned on the Unix epoch, in UTC)."""
    interval = max(1, int(interval_seconds))
    return datetime.fromtimestamp(math.floor(now.timestamp() / interval) * interval, UTC)


def next_window(now: datetime, interval_seconds: int) -> datetime:
    return window_start(now, interval_seconds) + timedelta(seconds=max(1, int(interval_seconds)))


@dataclass(frozen=True)
class Claim:
    job: str
    run_id: int
    token: str
    owner: str
    window_start: datetime
    started_at: datetime
    lease: timedelta


def ensure_rows(engine: Engine, names: Sequence[str]) -> None:
    """Create the row of each job that has none yet (two schedulers starting together: one wins)."""
    with Session(engine) as s:
        have = set(s.exec(select(PeriodicJob.name)).all())
    for name in names:
        if name in have:
            continue
        with Session(engine) as s:
            s.add(PeriodicJob(name=name))
            try:
                s.commit()
            except IntegrityError:  # another scheduler made it a moment ago
                s.rollback()


def claim(engine: Engine, *, job: str, interval_seconds: int, owner: str, now: datetime,
          lease: timedelta) -> Claim | None:
    """Win ``job`` for the current window, or None (it ran in this window, or someone holds it)."""
    window = window_start(now, interval_seconds)
    token = uuid.uuid4().hex
    free = or_(col(PeriodicJob.lease_expires_at).is_(None), col(PeriodicJob.lease_expires_at) <= now)
    due = or_(col(PeriodicJob.last_window_start).is_(None), col(PeriodicJob.last_window_start) < window,
              and_(col(PeriodicJob.last_outcome) == Outcome.running.value,
                   col(PeriodicJob.lease_expires_at) <= now))
    with Session(engine) as s:
        won = s.connection().execute(
            update(PeriodicJob).where(col(PeriodicJob.name) == job, due, free).values(
                lease_owner=owner[:120], lease_token=token, lease_expires_at=now + lease,
                last_window_start=window, last_started_at=now, last_finished_at=None,
                last_outcome=Outcome.running.value, last_owner=owner[:120], interval_seconds=int(interval_seconds),
            ).execution_options(synchronize_session=False)
        ).rowcount
        if won != 1:
            s.rollback()
            return None
        # A run still "running" now belongs to a scheduler that died: its lease lapsed, we hold the job.
        s.execute(update(PeriodicRun).where(col(PeriodicRun.job) == job,
                                            col(PeriodicRun.outcome) == Outcome.running.value).values(
            outcome=Outcome.abandoned.value, finished_at=now,
            error="Its scheduler stopped renewing the lease (it died or stalled); another scheduler took "
                  "the job over.").execution_options(synchronize_session=False))
        run = PeriodicRun(job=job, window_start=window, owner=owner[:120], lease_token=token, started_at=now)
        s.add(run)
        s.commit()
        assert run.id is not None
        return Claim(job=job, run_id=run.id, token=token, owner=owner, window_start=window, started_at=now,
                     lease=lease)


def renew(engine: Engine, c: Claim, *, now: datetime) -> bool:
    """Extend the lease while the job runs; False when another scheduler took it over meanwhile."""
    with Session(engine) as s:
        mine = and_(col(PeriodicJob.name) == c.job, col(PeriodicJob.lease_token) == c.token)
        n = s.connection().execute(update(PeriodicJob).where(mine).values(lease_expires_at=now + c.lease)).rowcount
        s.commit()
    return n == 1


def finish(engine: Engine, c: Claim, *, now: datetime, outcome: Outcome, summary: str | None = None,
           error: str | None = None) -> bool:
    """Record the run's end on the job row (if still ours) and in its history; prune old history."""
    ok = outcome == Outcome.success
    with Session(engine) as s:
        row = s.exec(select(PeriodicJob).where(PeriodicJob.name == c.job, PeriodicJob.lease_token == c.token)
                     .with_for_update()).first()
        if row is not None:
            row.lease_owner = row.lease_token = None
            row.lease_expires_at = None
            row.last_finished_at = now
            row.last_outcome = outcome.value
            row.last_error = (error or None) and error[:1000]
            row.last_summary = (summary or None) and summary[:500]
            row.runs_total += 1
            row.failures_in_a_row = 0 if ok else row.failures_in_a_row + 1
            if ok:
                row.last_success_at = now
            s.add(row)
        else:
            log.warning("scheduler: %s finished after its lease was taken over (%s)", c.job, outcome.value)
        s.execute(update(PeriodicRun).where(col(PeriodicRun.id) == c.run_id).values(
            finished_at=now, outcome=outcome.value, error=(error or None) and error[:1000],
            summary=(summary or None) and summary[:500]).execution_options(synchronize_session=False))
        cutoff = s.exec(select(PeriodicRun.id).where(PeriodicRun.job == c.job)
                        .order_by(col(PeriodicRun.id).desc()).offset(KEEP_RUNS).limit(1)).first()
        if cutoff is not None:
            s.execute(delete(PeriodicRun).where(col(PeriodicRun.job) == c.job, col(PeriodicRun.id) <= cutoff))
        s.commit()
    return row is not None


# -- status (the Overview) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class JobStatus:
    name: str
    title: str
    what: str
    interval_seconds: int
    status: str  # "on time" | "late" | "running" | "failed" | "never ran" | "stalled"
    late: bool
    last_started_at: datetime | None
    last_finished_at: datetime | None
    last_outcome: str | None
    last_error: str | None
    last_summary: str | None
    last_owner: str | None
    last_success_at: datetime | None
    next_due_at: datetime | None
    runs_total: int


def grace(interval_seconds: int) -> timedelta:
    """How long past its window a job may start before it counts as late: half an interval, at least
    30 s (a scheduler's tick and a busy database), at most an hour."""
    return timedelta(seconds=min(max(interval_seconds * 0.5, 30.0), 3600.0))


def job_status(row: PeriodicJob | None, *, name: str, title: str, what: str, interval_seconds: int,
               now: datetime) -> JobStatus:
    started = aware(row.last_started_at) if row else None
    lease = aware(row.lease_expires_at) if row else None
    outcome = row.last_outcome if row else None
    due = next_window(started, interval_seconds) if started else None
    if started is None:
        status, late = "never ran", True
    elif outcome == Outcome.running:
        status = "running" if lease is not None and lease > now else "stalled"
        late = status == "stalled"
    else:
        assert due is not None
        late = now > due + grace(interval_seconds)
        status = "late" if late else ("failed" if outcome == Outcome.failed else "on time")
    return JobStatus(
        name=name, title=title, what=what, interval_seconds=interval_seconds, status=status, late=late,
        last_started_at=started, last_finished_at=aware(row.last_finished_at) if row else None,
        last_outcome=outcome, last_error=row.last_error if row else None,
        last_summary=row.last_summary if row else None, last_owner=row.last_owner if row else None,
        last_success_at=aware(row.last_success_at) if row else None, next_due_at=due,
        runs_total=row.runs_total if row else 0,
    )


def periodic_status(*, session: Session, principal: Principal, now: datetime | None = None,
                    intervals: dict[str, int] | None = None) -> list[JobStatus]:
    """When each periodic job last ran, how it ended and whether it is late (staff only)."""
    from core.clock import utcnow
    from core.scheduler.jobs import JOBS, configured_intervals

    require_staff(principal)
    now = now or utcnow()
    intervals = intervals or configured_intervals()
    rows = {r.name: r for r in session.exec(select(PeriodicJob))}
    return [job_status(rows.get(spec.name), name=spec.name, title=spec.title, what=spec.what,
                       interval_seconds=intervals[spec.name], now=now) for spec in JOBS]
