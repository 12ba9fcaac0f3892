"""Tables of core.sync: the opportunity mirror, the outbox, jobs with leases, runs, conflicts.

- ``sync_opportunity``: our mirror of each CRM account's opportunities. The CRM owns ``name``,
  ``stage``, ``amount``, ``close_date`` and ``owner_crm_id`` (stamped by ``crm_modified_at``); our app
  owns the fields in ``app_fields_json`` (see ``APP_OWNED_FIELDS``). A record created in our app and not
  yet pushed has no ``crm_id``, only its ``external_key`` (the idempotency key of its create).
- ``sync_outbox``: every change made in our app, with its real actor (an app user), an idempotency key,
  the values it was based on (for the three-way merge), attempts and status. Rows are never deleted.
- ``sync_job``: one per (CRM account, credential owner): the account for an API user, each user for a
  per-user account. Workers claim due jobs with a lease (``lease_token`` fences late writers).
- ``sync_account_state``: per CRM account pause (a rate limit pauses every job of the account, or an
  admin pauses it).
- ``sync_run``: one per job run, for health and the runs timeline.
- ``sync_conflict``: each conflict resolution (field, both values, who won).
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import Column, Index, Numeric, UniqueConstraint
from sqlmodel import Field, SQLModel

from core.clock import utcnow
from core.db import utc_column

#: Fields the CRM owns: on a conflict the CRM's value wins.
CRM_OWNED_FIELDS: tuple[str, ...] = ("name", "stage", "amount", "close_date", "owner_id")
#: Fields our app owns: kept in the mirror; on a conflict our value wins. Pushed to the CRM only when
#: the account maps them to a CRM field (``settings_json["app_field_map"]``, e.g. {"next_step": "NextStep"}).
APP_OWNED_FIELDS: tuple[str, ...] = ("next_step", "forecast_note", "priority")
#: The vault purpose of a sync job's CRM login (the engine uses it, health reads its state).
CREDENTIAL_PURPOSE = "crm-login"
#: Failed runs in a row after which a job is "failing" (the engine flips it, health shows it).
FAILING_AFTER = 3


class JobState(StrEnum):
    active = "active"  # runs when due
    paused = "paused"  # an admin paused it
    reconnect_needed = "reconnect_needed"  # the credential failed or is gone: waits for a reconnect
    disabled = "disabled"  # the user or account is gone / inactive


class OutboxStatus(StrEnum):
    pending = "pending"
    applied = "applied"  # the CRM has it (pushed, or confirmed by a pull after an unacknowledged push)
    failed = "failed"  # the CRM rejected the record; the message is on the row
    superseded = "superseded"  # every field lost a conflict to the CRM (recorded in sync_conflict)
    local = "local"  # only app-owned fields not mapped to the CRM: nothing to push


class RunStatus(StrEnum):
    running = "running"
    success = "success"
    partial = "partial"  # ran, but some records were rejected (see the outbox rows)
    failed = "failed"
    rate_limited = "rate_limited"
    reconnect_needed = "reconnect_needed"
    lease_lost = "lease_lost"  # another worker took the job over (this worker was too slow)
    abandoned = "abandoned"  # the worker died; its lease lapsed and the job was claimed again
    skipped = "skipped"  # the account was paused after the job was claimed: nothing was called


class SyncOpportunity(SQLModel, table=True):
    __tablename__ = "sync_opportunity"
    __table_args__ = (
        UniqueConstraint("crm_account_id", "crm_id", name="uq_sync_opp_account_crm_id"),
        UniqueConstraint("crm_account_id", "external_key", name="uq_sync_opp_account_key"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    crm_account_id: int = Field(foreign_key="crm_account.id", index=True)
    crm_id: str | None = Field(default=None, max_length=64)
    external_key: str | None = Field(default=None, max_length=100)
    name: str = Field(default="", max_length=255)
    stage: str | None = Field(default=None, max_length=80)
    amount: Decimal | None = Field(default=None, sa_column=Column(Numeric(18, 2), nullable=True))
    close_date: date | None = Field(default=None)
    owner_crm_id: str | None = Field(default=None, max_length=64)
    crm_modified_at: datetime | None = Field(default=None, sa_column=utc_column())
    app_fields_json: str = Field(default="{}", max_length=20_000)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))


class SyncOutbox(SQLModel, table=True):
    __tablename__ = "sync_outbox"
    __table_args__ = (Index("ix_sync_outbox_account_status", "crm_account_id", "status"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    crm_account_id: int = Field(foreign_key="crm_account.id")
    opportunity_id: int = Field(foreign_key="sync_opportunity.id", index=True)
    idempotency_key: str = Field(max_length=100, unique=True)
    operation: str = Field(max_length=10)  # "create" | "update"
    actor_app_user_id: int = Field(foreign_key="app_user.id", index=True)
    actor_label: str = Field(max_length=254)
    fields_json: str = Field(default="{}", max_length=20_000)  # what is still to push (conflict losers removed)
    base_json: str = Field(default="{}", max_length=20_000)  # the values the change was made on
    status: str = Field(default=OutboxStatus.pending.value, max_length=12)
    attempts: int = Field(default=0)
    last_error: str | None = Field(default=None, max_length=2000)
    last_error_code: str | None = Field(default=None, max_length=80)
    via: str | None = Field(default=None, max_length=40)
    applied_run_id: int | None = Field(default=None)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    applied_at: datetime | None = Field(default=None, sa_column=utc_column())


class SyncJob(SQLModel, table=True):
    __tablename__ = "sync_job"
    __table_args__ = (
        UniqueConstraint("crm_account_id", "owner_key", name="uq_sync_job_account_owner"),
        Index("ix_sync_job_due", "state", "next_run_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    crm_account_id: int = Field(foreign_key="crm_account.id", index=True)
    app_user_id: int | None = Field(default=None, foreign_key="app_user.id", index=True)
    owner_key: str = Field(max_length=40)  # "account" (API user) or "user:<app_user_id>"
    state: str = Field(default=JobState.active.value, max_length=20)
    interval_seconds: int = Field(default=300, ge=10)
    next_run_at: datetime = Field(sa_column=utc_column(nullable=False))
    lease_owner: str | None = Field(default=None, max_length=120)
    lease_token: str | None = Field(default=None, max_length=40)
    lease_expires_at: datetime | None = Field(default=None, sa_column=utc_column())
    attempts: int = Field(default=0)  # transient failures in a row (drives the backoff)
    consecutive_failures: int = Field(default=0)
    failing_since: datetime | None = Field(default=None, sa_column=utc_column())
    watermark: datetime | None = Field(default=None, sa_column=utc_column())
    last_run_at: datetime | None = Field(default=None, sa_column=utc_column())
    last_success_at: datetime | None = Field(default=None, sa_column=utc_column())
    last_error: str | None = Field(default=None, max_length=2000)
    last_error_code: str | None = Field(default=None, max_length=80)
    last_error_fix: str | None = Field(default=None, max_length=1000)
    last_error_at: datetime | None = Field(default=None, sa_column=utc_column())
    paused_by: str | None = Field(default=None, max_length=254)
    paused_at: datetime | None = Field(default=None, sa_column=utc_column())
    reconnect_since: datetime | None = Field(default=None, sa_column=utc_column())
    reconnect_requested_at: datetime | None = Field(default=None, sa_column=utc_column())
    reconnect_requested_by: str | None = Field(default=None, max_length=254)
    runs_total: int = Field(default=0)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))


class SyncAccountState(SQLModel, table=True):
    __tablename__ = "sync_account_state"

    crm_account_id: int = Field(primary_key=True, foreign_key="crm_account.id")
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    paused_until: datetime | None = Field(default=None, sa_column=utc_column())  # rate limit
    pause_reason: str | None = Field(default=None, max_length=1000)
    paused_by: str | None = Field(default=None, max_length=254)  # an admin's pause (until resumed)
    paused_at: datetime | None = Field(default=None, sa_column=utc_column())
    rate_limited_count: int = Field(default=0)
    updated_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))


class SyncRun(SQLModel, table=True):
    __tablename__ = "sync_run"
    __table_args__ = (Index("ix_sync_run_job_started", "job_id", "started_at"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="sync_job.id")
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    crm_account_id: int = Field(foreign_key="crm_account.id", index=True)
    app_user_id: int | None = Field(default=None)
    worker: str = Field(default="", max_length=120)
    lease_token: str = Field(default="", max_length=40)
    status: str = Field(default=RunStatus.running.value, max_length=20)
    started_at: datetime = Field(sa_column=utc_column(nullable=False, index=True))
    finished_at: datetime | None = Field(default=None, sa_column=utc_column())
    records_in: int = Field(default=0)
    records_out: int = Field(default=0)
    records_failed: int = Field(default=0)
    duplicates: int = Field(default=0)
    conflicts: int = Field(default=0)
    api_calls: int = Field(default=0)
    auth_calls: int = Field(default=0)
    error: str | None = Field(default=None, max_length=2000)
    error_code: str | None = Field(default=None, max_length=80)
    fix: str | None = Field(default=None, max_length=1000)


class SyncConflict(SQLModel, table=True):
    __tablename__ = "sync_conflict"

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    crm_account_id: int = Field(foreign_key="crm_account.id")
    opportunity_id: int = Field(foreign_key="sync_opportunity.id", index=True)
    crm_id: str | None = Field(default=None, max_length=64)
    outbox_id: int | None = Field(default=None)
    run_id: int | None = Field(default=None)
    field: str = Field(max_length=80)
    app_value: str | None = Field(default=None, max_length=2000)
    crm_value: str | None = Field(default=None, max_length=2000)
    winner: str = Field(max_length=10)  # "crm" | "app"
    resolved_at: datetime = Field(sa_column=utc_column(nullable=False))
