"""Tables of core.alerts.

- ``alert_rule_setting``: per-tenant switch and thresholds of a rule (defaults when absent).
- ``alert_channel``: where a tenant's alerts go (email recipients, or a webhook whose URL and signing
  secret live in the vault — only their references and the URL's masked form are here: receivers
  such as Slack put their token in the URL); ``tenant_id`` NULL is a staff channel that receives the
  cross-tenant digest.
- ``alert_state``: one row per (tenant, rule, subject): firing or clear, so each condition alerts once.
- ``alert_notice``: what happened (fired, escalated, recovered, test, digest), for the log and digest.
- ``alert_delivery``: one notice to one channel, with its attempts, backoff and last error.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from core.clock import utcnow
from core.db import utc_column


class ChannelKind(StrEnum):
    email = "email"
    webhook = "webhook"


class StateStatus(StrEnum):
    firing = "firing"
    clear = "clear"


class NoticeKind(StrEnum):
    fired = "fired"
    escalated = "escalated"
    recovered = "recovered"
    test = "test"
    digest = "digest"


class DeliveryStatus(StrEnum):
    pending = "pending"  # not tried yet
    retrying = "retrying"  # failed, another attempt is scheduled
    sent = "sent"
    failed = "failed"  # gave up after the last attempt


class AlertRuleSetting(SQLModel, table=True):
    __tablename__ = "alert_rule_setting"
    __table_args__ = (UniqueConstraint("tenant_id", "rule", name="uq_alert_rule_tenant_rule"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    rule: str = Field(max_length=40)
    enabled: bool = Field(default=True)
    params_json: str = Field(default="{}", max_length=2000)
    updated_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    updated_by: str = Field(default="", max_length=254)


class AlertChannel(SQLModel, table=True):
    __tablename__ = "alert_channel"

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int | None = Field(default=None, foreign_key="tenant.id", index=True)
    kind: str = Field(max_length=10)
    name: str = Field(max_length=120)
    target: str = Field(max_length=2000)  # recipients (comma-separated), or the webhook URL masked (https://host/…)
    # the webhook's full URL: a vault reference, or (staff channels) sealed with the platform key, which
    # makes a 2,000-character URL about 2,700 characters
    url_ref: str | None = Field(default=None, max_length=4000)
    secret_ref: str | None = Field(default=None, max_length=2000)  # webhook signing secret (vault reference)
    secret_revealed_at: datetime | None = Field(default=None, sa_column=utc_column())
    rules_json: str = Field(default="[]", max_length=2000)  # [] = every rule
    enabled: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    created_by: str = Field(default="", max_length=254)
    last_status: str | None = Field(default=None, max_length=10)  # ok | failing
    last_error: str | None = Field(default=None, max_length=1000)
    last_attempt_at: datetime | None = Field(default=None, sa_column=utc_column())


class AlertState(SQLModel, table=True):
    __tablename__ = "alert_state"
    __table_args__ = (UniqueConstraint("tenant_id", "rule", "subject", name="uq_alert_state"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    rule: str = Field(max_length=40, index=True)
    subject: str = Field(max_length=200)
    status: str = Field(default=StateStatus.firing.value, max_length=10, index=True)
    level: str = Field(default="", max_length=20)
    title: str = Field(default="", max_length=300)
    summary: str = Field(default="", max_length=2000)
    first_fired_at: datetime = Field(sa_column=utc_column(nullable=False))
    last_changed_at: datetime = Field(sa_column=utc_column(nullable=False))
    last_seen_at: datetime = Field(sa_column=utc_column(nullable=False))
    cleared_at: datetime | None = Field(default=None, sa_column=utc_column())


class AlertNotice(SQLModel, table=True):
    __tablename__ = "alert_notice"

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int | None = Field(default=None, foreign_key="tenant.id", index=True)
    state_id: int | None = Field(default=None, foreign_key="alert_state.id")
    rule: str = Field(default="", max_length=40)
    subject: str = Field(default="", max_length=200)
    kind: str = Field(max_length=12)
    level: str = Field(default="", max_length=20)
    title: str = Field(max_length=300)
    summary: str = Field(default="", sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=utc_column(nullable=False, index=True))
    digested_at: datetime | None = Field(default=None, sa_column=utc_column())


class AlertDelivery(SQLModel, table=True):
    __tablename__ = "alert_delivery"

    id: int | None = Field(default=None, primary_key=True)
    notice_id: int = Field(foreign_key="alert_notice.id", index=True)
    channel_id: int = Field(foreign_key="alert_channel.id", index=True)
    tenant_id: int | None = Field(default=None, index=True)
    status: str = Field(default=DeliveryStatus.pending.value, max_length=10, index=True)
    attempts: int = Field(default=0)
    next_attempt_at: datetime | None = Field(default=None, sa_column=utc_column(index=True))
    last_error: str | None = Field(default=None, max_length=1000)
    last_http_status: int | None = Field(default=None)
    created_at: datetime = Field(sa_column=utc_column(nullable=False, index=True))
    last_attempt_at: datetime | None = Field(default=None, sa_column=utc_column())
    sent_at: datetime | None = Field(default=None, sa_column=utc_column())
