"""Jobs, claims and leases.

A job is due when it is active, ``next_run_at`` has come, its CRM account is not paused and nobody
holds a live lease on it. ``claim_jobs`` takes due jobs for one worker:

- on PostgreSQL with ``SELECT … FOR UPDATE SKIP LOCKED``, so any number of workers on any number of
  machines share one queue without waiting on each other and never take the same job;
- on SQLite inside the ``BEGIN IMMEDIATE`` transaction every session starts with (one writer at a
  time): a single worker is the supported set-up there.

A claim writes a lease (owner, random token, expiry on the injected clock) and a ``running`` run row
in the same transaction. A worker that dies simply stops renewing: once ``lease_expires_at`` has
passed, the job is due again, the next claim marks the dead worker's run ``abandoned`` and hands out a
new token. Every later write of a run goes through ``fence()``, which locks the job row and checks the
token, so a worker that was only slow (not dead) cannot overwrite its successor's results.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, func, or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.sync.models import JobState, RunStatus, SyncAccountState, SyncJob, SyncRun

DEFAULT_LEASE = timedelta(minutes=5)
BACKOFF_BASE = timedelta(seconds=30)
BACKOFF_CAP = timedelta(hours=1)


class LeaseLost(RuntimeError):
    """This worker's lease on the job was taken over (it lapsed and another worker claimed the job)."""


@dataclass(frozen=True)
class Claim:
    job_id: int
    run_id: int
    token: str
    worker: str
    claimed_at: datetime
    lease: timedelta


def is_postgres(engine_or_session: Engine | Session) -> bool:
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else engine_or_session
    return bind.dialect.name == "postgresql"


def due_jobs_query(now: datetime):  # type: ignore[no-untyped-def]
    """Active, due, unleased (or lease lapsed) jobs whose account is not paused, oldest due first."""
    paused = exists().where(
        col(SyncAccountState.crm_account_id) == col(SyncJob.crm_account_id),
        or_(col(SyncAccountState.paused_by).is_not(None), col(SyncAccountState.paused_until) > now),
    )
    return (
        select(SyncJob)
        .where(
            SyncJob.state == JobState.active.value,
            col(SyncJob.next_run_at) <= now,
            or_(col(SyncJob.lease_expires_at).is_(None), col(SyncJob.lease_expires_at) <= now),
            ~paused,
        )
        .order_by(col(SyncJob.next_run_at), col(SyncJob.id))
    )


def claim_jobs(
    engine: Engine, *, worker: str, now: datetime, limit: int = 1, lease: timedelta = DEFAULT_LEASE,
) -> list[Claim]:
    """Claim up to ``limit`` due jobs for ``worker`` (one committed transaction)."""
    with Session(engine, expire_on_commit=False) as session:
        stmt = due_jobs_query(now).limit(limit)
        if is_postgres(engine):
            stmt = stmt.with_for_update(skip_locked=True, of=SyncJob)  # type: ignore[arg-type]
        jobs = list(session.exec(stmt))
        claims: list[Claim] = []
        for job in jobs:
            assert job.id is not None
            token = uuid.uuid4().hex
            # A run still "running" under an older lease belongs to a worker that died or stalled.
            stale_runs: list[SyncRun] = list(session.exec(select(SyncRun).where(
                SyncRun.job_id == job.id, SyncRun.status == RunStatus.running.value))) if job.lease_token else []
            for stale in stale_runs:
                stale.status = RunStatus.abandoned.value
                stale.finished_at = now
                stale.error = (f"Worker {stale.worker} stopped renewing its lease (it died or stalled); the job "
                               "was taken over and nothing it did is lost.")
                session.add(stale)
            job.lease_owner = worker[:120]
            job.lease_token = token
            job.lease_expires_at = now + lease
            session.add(job)
            run = SyncRun(job_id=job.id, tenant_id=job.tenant_id, crm_account_id=job.crm_account_id,
                          app_user_id=job.app_user_id, worker=worker[:120], lease_token=token, started_at=now)
            session.add(run)
            session.flush()
            assert run.id is not None
            claims.append(Claim(job.id, run.id, token, worker, now, lease))
        session.commit()
        return claims


def fence(session: Session, claim: Claim, now: datetime) -> SyncJob:
    """Lock the job row, check this worker still holds the lease and renew it (heartbeat).

    Raises:
        LeaseLost: another worker took the job over; the caller must stop and write nothing.
    """
    stmt = select(SyncJob).where(SyncJob.id == claim.job_id, SyncJob.lease_token == claim.token)
    if is_postgres(session):
        stmt = stmt.with_for_update()
    job = session.exec(stmt.execution_options(populate_existing=True)).first()
    if job is None:
        raise LeaseLost(f"job {claim.job_id}: lease {claim.token[:8]} was taken over")
    expires = job.lease_expires_at
    if expires is None or (expires if expires.tzinfo else expires.replace(tzinfo=now.tzinfo)) - now < claim.lease / 2:
        job.lease_expires_at = now + claim.lease  # renew once half the lease is gone (one write, not one per step)
        session.add(job)
    return job


def release(job: SyncJob) -> None:
    job.lease_owner = None
    job.lease_token = None
    job.lease_expires_at = None


def backoff_delay(attempts: int, *, job_id: int, seed: int = 0, base: timedelta = BACKOFF_BASE,
                  cap: timedelta = BACKOFF_CAP) -> timedelta:
    """Exponential backoff with equal jitter, seeded per (seed, job, attempt): the same inputs always
    give the same delay (deterministic tests), different jobs spread out (no thundering herd)."""
    attempts = max(1, attempts)
    raw = min(cap.total_seconds(), base.total_seconds() * 2 ** min(attempts - 1, 30))
    rng = random.Random(f"{seed}:{job_id}:{attempts}")
    return timedelta(seconds=raw / 2 + rng.uniform(0, raw / 2))


def count_due(session: Session, now: datetime) -> int:
    sub = due_jobs_query(now).subquery()
    return int(session.exec(select(func.count()).select_from(sub)).one())
