"""Tables of core.providers: API-usage samples (the quota gauge and its forecast) and used OAuth states."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index
from sqlmodel import Field, SQLModel

from core.clock import utcnow
from core.db import utc_column


class ApiUsageSample(SQLModel, table=True):
    """The CRM's own API counter for one account at one moment (LimitInfoHeader, /limits, headers)."""

    __tablename__ = "api_usage_sample"
    __table_args__ = (Index("ix_api_usage_account_time", "crm_account_id", "observed_at"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    crm_account_id: int = Field(foreign_key="crm_account.id")
    observed_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    used: int = Field(ge=0)
    limit: int = Field(ge=0)
    window: str = Field(default="24h rolling", max_length=30)
    source: str = Field(default="", max_length=40)


class OAuthStateUse(SQLModel, table=True):
    """An OAuth ``state`` already redeemed at the callback (only its SHA-256): no replay."""

    __tablename__ = "oauth_state_use"

    state_hash: str = Field(primary_key=True, max_length=64)
    used_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    expires_at: datetime = Field(sa_column=utc_column(nullable=False, index=True))
