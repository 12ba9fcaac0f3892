"""Tables of core.scheduler: one leased row per periodic job, and the history of its runs.

- ``periodic_job``: one row per job name (``sync-schedule``, ``vault-sweep``, …). A scheduler runs a job
  only after it won the row with a conditional UPDATE (the database's exclusion, on SQLite and
  PostgreSQL alike): the job has not started in the current interval window and nobody holds a live
  lease. The row keeps the last run's start, end, outcome, error and summary for the Overview.
- ``periodic_run``: one row per run (kept for a while, then pruned), for "ran exactly once per interval"
  and the run history.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Index
from sqlmodel import Field, SQLModel

from core.db import utc_column


class Outcome(StrEnum):
    running = "running"
    success = "success"
    failed = "failed"
    abandoned = "abandoned"  # its scheduler died (stopped renewing the lease); another one took over


class PeriodicJob(SQLModel, table=True):
    __tablename__ = "periodic_job"

    name: str = Field(primary_key=True, max_length=40)
    interval_seconds: int = Field(default=0)  # the interval of the last claim (settings may change it)
    lease_owner: str | None = Field(default=None, max_length=120)
    lease_token: str | None = Field(default=None, max_length=40)
    lease_expires_at: datetime | None = Field(default=None, sa_column=utc_column())
    last_window_start: datetime | None = Field(default=None, sa_column=utc_column())
    last_started_at: datetime | None = Field(default=None, sa_column=utc_column())
    last_finished_at: datetime | None = Field(default=None, sa_column=utc_column())
    last_outcome: str | None = Field(default=None, max_length=20)
    last_error: str | None = Field(default=None, max_length=1000)
    last_summary: str | None = Field(default=None, max_length=500)
    last_owner: str | None = Field(default=None, max_length=120)
    last_success_at: datetime | None = Field(default=None, sa_column=utc_column())
    runs_total: int = Field(default=0)
    failures_in_a_row: int = Field(default=0)


class PeriodicRun(SQLModel, table=True):
    __tablename__ = "periodic_run"
    __table_args__ = (Index("ix_periodic_run_job_started", "job", "started_at"),)

    id: int | None = Field(default=None, primary_key=True)
    job: str = Field(foreign_key="periodic_job.name", max_length=40)
    window_start: datetime = Field(sa_column=utc_column(nullable=False))
    owner: str = Field(max_length=120)
    lease_token: str = Field(max_length=40)
    started_at: datetime = Field(sa_column=utc_column(nullable=False))
    finished_at: datetime | None = Field(default=None, sa_column=utc_column())
    outcome: str = Field(default=Outcome.running.value, max_length=20)
    error: str | None = Field(default=None, max_length=1000)
    summary: str | None = Field(default=None, max_length=500)
