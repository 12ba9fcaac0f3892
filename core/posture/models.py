"""Tables of core.posture: one posture row per tenant per day, for trends.

Written by ``core.posture.service.record_daily_snapshots`` (the scheduler, ``crmbridge posture-snapshot``,
the demo). Counts only: no user-level data, so adoption trends can be read by leadership.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from core.clock import utcnow
from core.db import utc_column


class PostureSnapshot(SQLModel, table=True):
    __tablename__ = "posture_snapshot"
    __table_args__ = (
        UniqueConstraint("tenant_id", "day", name="uq_posture_snapshot_tenant_day"),
        # Covers the adoption trend (core.posture.service.get_adoption): its sampled days are read from
        # the index alone, not from 90 days of full rows (8x faster with 2,000 tenants).
        Index("ix_posture_snapshot_trend", "day", "level", "editions", "sso_state", "users_total", "users_sso"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    day: date = Field(index=True)
    taken_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    level: int = Field(ge=0, le=4)
    next_rule: str | None = Field(default=None, max_length=60)  # the rule gating the next level
    one_step_away: bool = Field(default=False)
    world: str = Field(default="unknown", max_length=10)  # 2013 | today | mixed | unknown
    sso_state: str = Field(default="missing", max_length=10)  # missing | untested | failing | tested
    users_total: int = Field(default=0, ge=0)
    users_sso: int = Field(default=0, ge=0)
    accounts_api_user: int = Field(default=0, ge=0)
    accounts_per_user_oauth: int = Field(default=0, ge=0)
    accounts_per_user_password: int = Field(default=0, ge=0)
    stored_passwords: int = Field(default=0, ge=0)
    findings_blocking: int = Field(default=0, ge=0)
    findings_high: int = Field(default=0, ge=0)
    findings_medium: int = Field(default=0, ge=0)
    findings_low: int = Field(default=0, ge=0)
    # "provider:edition" of each CRM account, sorted and comma-separated (for by-provider trends).
    editions: str = Field(default="", max_length=2000)
    # The credential mode of each CRM account, in the same order as ``editions``.
    account_modes: str = Field(default="", max_length=2000)
    # The single next step (its headline and who acts), for the upgrade pipeline. Never a user's name.
    next_title: str | None = Field(default=None, max_length=300)
    next_who: str | None = Field(default=None, max_length=40)
    to_level: int | None = Field(default=None)
