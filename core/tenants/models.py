"""Tenants, their CRM accounts and users, console accounts, sessions and the audit log tables."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum

from pydantic import field_validator
from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from core.clock import utcnow
from core.db import utc_column


class TenantStatus(StrEnum):
    onboarding = "onboarding"
    live = "live"
    suspended = "suspended"
    offboarded = "offboarded"


class CredentialMode(StrEnum):
    api_user = "api_user"
    per_user_oauth = "per_user_oauth"
    per_user_password = "per_user_password"


class Role(StrEnum):
    staff = "staff"
    tenant_admin = "tenant_admin"
    leadership = "leadership"


ONBOARDING_STEPS = ("tenant", "crm_accounts", "credential_mode", "connection_test", "sso", "users", "go_live")


class TenantBase(SQLModel):
    name: str = Field(min_length=1, max_length=200)
    slug: str = Field(min_length=2, max_length=63)


SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")


class TenantCreate(TenantBase):
    @field_validator("slug")
    @classmethod
    def _slug_shape(cls, v: str) -> str:
        if not SLUG_RE.match(v):
            raise ValueError("use lowercase letters, digits and dashes, starting and ending with a letter or digit")
        return v

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class Tenant(TenantBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    slug: str = Field(max_length=63, unique=True, index=True)
    status: str = Field(default=TenantStatus.onboarding.value, max_length=20, index=True)
    onboarding_step: str = Field(default="tenant", max_length=32)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))


class CrmAccountBase(SQLModel):
    provider: str = Field(min_length=2, max_length=40)
    edition: str = Field(min_length=1, max_length=60)
    label: str = Field(min_length=1, max_length=120)
    instance_url: str | None = Field(default=None, max_length=500)
    credential_mode: str = Field(default=CredentialMode.api_user.value, max_length=30)


class CrmAccount(CrmAccountBase, table=True):
    __tablename__ = "crm_account"
    __table_args__ = (UniqueConstraint("tenant_id", "label", name="uq_crm_account_tenant_label"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    # Non-secret fields from the catalog form (JSON). Secret fields live in the vault.
    settings_json: str = Field(default="{}", max_length=20_000)
    status: str = Field(default="new", max_length=30)
    last_test_at: datetime | None = Field(default=None, sa_column=utc_column())
    last_test_ok: bool | None = Field(default=None)
    last_test_summary: str | None = Field(default=None, max_length=20_000)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))


class AppUserBase(SQLModel):
    email: str = Field(min_length=3, max_length=254)
    name: str = Field(min_length=1, max_length=200)
    sso_subject: str | None = Field(default=None, max_length=254)


class AppUserCreate(AppUserBase):
    pass


class AppUser(AppUserBase, table=True):
    __tablename__ = "app_user"
    __table_args__ = (UniqueConstraint("tenant_id", "email", name="uq_app_user_tenant_email"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    status: str = Field(default="active", max_length=20)
    signs_in_by_sso: bool = Field(default=False)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))


class AppUserCrmIdentity(SQLModel, table=True):
    """The CRM user id of an app user in one CRM account (a user may be in several)."""

    __tablename__ = "app_user_crm_identity"
    __table_args__ = (UniqueConstraint("app_user_id", "crm_account_id", name="uq_identity_user_account"),)

    id: int | None = Field(default=None, primary_key=True)
    app_user_id: int = Field(foreign_key="app_user.id", index=True)
    crm_account_id: int = Field(foreign_key="crm_account.id", index=True)
    crm_user_id: str = Field(max_length=100)


class ConsoleAccount(SQLModel, table=True):
    __tablename__ = "console_account"

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=254, unique=True, index=True)
    name: str = Field(default="", max_length=200)
    password_hash: str | None = Field(default=None, max_length=300)
    role: str = Field(max_length=20)
    tenant_id: int | None = Field(default=None, foreign_key="tenant.id", index=True)
    failed_attempts: int = Field(default=0)
    locked_until: datetime | None = Field(default=None, sa_column=utc_column())
    disabled: bool = Field(default=False)
    last_sign_in_at: datetime | None = Field(default=None, sa_column=utc_column())
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))


class ConsoleSession(SQLModel, table=True):
    """A server-side console session. Only the SHA-256 of the cookie value is stored."""

    __tablename__ = "console_session"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    account_id: int = Field(foreign_key="console_account.id", index=True)
    method: str = Field(default="password", max_length=20)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    last_seen_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    expires_at: datetime = Field(sa_column=utc_column(nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=utc_column())


class SignInThrottle(SQLModel, table=True):
    """Failed sign-ins per client address in a sliding window (no wholesale lock-outs)."""

    __tablename__ = "sign_in_throttle"

    address: str = Field(primary_key=True, max_length=64)
    window_start: datetime = Field(sa_column=utc_column(nullable=False))
    failures: int = Field(default=0)


class SignInLock(SQLModel, table=True):
    """Wrong passwords for one console account from one client address, and the lock they earned
    (15 minutes, doubling with each further lock up to a day): a lock pauses sign-in to that account
    from that address only, so nobody can lock the holder out from elsewhere."""

    __tablename__ = "console_sign_in_lock"

    account_id: int = Field(foreign_key="console_account.id", primary_key=True)
    address: str = Field(primary_key=True, max_length=64)
    failures: int = Field(default=0)
    locks: int = Field(default=0)
    locked_until: datetime | None = Field(default=None, sa_column=utc_column())
    last_failure_at: datetime = Field(sa_column=utc_column(nullable=False))


class AuditEvent(SQLModel, table=True):
    """Append-only. ``hmac`` covers the content and ``prev_hmac``; see core.tenants.audit."""

    __tablename__ = "audit_event"
    __table_args__ = (UniqueConstraint("chain", "seq", name="uq_audit_chain_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    chain: str = Field(max_length=40, index=True)
    seq: int
    occurred_at: datetime = Field(sa_column=utc_column(nullable=False, index=True))
    tenant_id: int | None = Field(default=None, index=True)
    actor: str = Field(max_length=254, index=True)
    actor_role: str = Field(default="", max_length=20)
    action: str = Field(max_length=80, index=True)
    target: str = Field(default="", max_length=300)
    details: str = Field(default="{}", max_length=20_000)
    via: str | None = Field(default=None, max_length=40)
    prev_hmac: str = Field(max_length=64)
    hmac: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """Per-chain head (sequence, last HMAC), updated under a row lock with every append."""

    __tablename__ = "audit_head"

    chain: str = Field(primary_key=True, max_length=40)
    seq: int = Field(default=0)
    last_hmac: str = Field(default="", max_length=64)


class HealthProbe(SQLModel, table=True):
    """One row /healthz rewrites on every check, so the check proves the database accepts a write
    (a full disk or a read-only database fails it) and not only that it answers a SELECT."""

    __tablename__ = "health_probe"

    id: int = Field(primary_key=True)
    checked_at: datetime = Field(sa_column=utc_column(nullable=False))
    checks: int = Field(default=0)
