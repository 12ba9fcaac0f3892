"""Tables of core.accounts: invitations, password-reset links, TOTP factors, recovery codes and the
short-lived "second factor pending" step of a sign-in.

No column holds a secret in plaintext: link tokens, challenge tokens and recovery codes are stored as
their SHA-256 (each is at least 128 random bits, so a fast hash is enough); the TOTP secret is a
reference into the vault (``vault:<id>``) or, for accounts without a tenant, a ciphertext sealed with
a platform key (see core.accounts.secrets).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlmodel import Field, SQLModel

from core.clock import utcnow
from core.db import utc_column


class FactorState(StrEnum):
    pending = "pending"  # secret shown, first code not yet confirmed
    active = "active"


class ConsoleInvitation(SQLModel, table=True):
    """A single-use, expiring invitation to create a console account."""

    __tablename__ = "console_invitation"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    email: str = Field(max_length=254, index=True)
    name: str = Field(default="", max_length=200)
    role: str = Field(max_length=20)
    tenant_id: int | None = Field(default=None, foreign_key="tenant.id", index=True)
    invited_by: str = Field(default="", max_length=254)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    expires_at: datetime = Field(sa_column=utc_column(nullable=False))
    accepted_at: datetime | None = Field(default=None, sa_column=utc_column())
    revoked_at: datetime | None = Field(default=None, sa_column=utc_column())
    account_id: int | None = Field(default=None, foreign_key="console_account.id")


class PasswordResetLink(SQLModel, table=True):
    """A single-use, expiring password-reset link. A newer link revokes the older ones."""

    __tablename__ = "console_password_reset"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    account_id: int = Field(foreign_key="console_account.id", index=True)
    requested_by: str = Field(default="", max_length=254)  # "self" or the admin's email
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    expires_at: datetime = Field(sa_column=utc_column(nullable=False))
    used_at: datetime | None = Field(default=None, sa_column=utc_column())
    revoked_at: datetime | None = Field(default=None, sa_column=utc_column())


class MfaFactor(SQLModel, table=True):
    """One TOTP factor per console account. ``last_step`` is the last accepted time step: a code is
    accepted once per step, so a replayed (or shoulder-surfed, already used) code is refused."""

    __tablename__ = "console_mfa_factor"

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="console_account.id", unique=True, index=True)
    state: str = Field(default=FactorState.pending.value, max_length=10)
    secret_ref: str = Field(max_length=2000)
    last_step: int | None = Field(default=None)
    failures: int = Field(default=0)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    confirmed_at: datetime | None = Field(default=None, sa_column=utc_column())
    last_used_at: datetime | None = Field(default=None, sa_column=utc_column())


class MfaRecoveryCode(SQLModel, table=True):
    """A single-use recovery code (SHA-256 of an 80-bit random code)."""

    __tablename__ = "console_mfa_recovery_code"

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="console_account.id", index=True)
    code_hash: str = Field(max_length=64, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    used_at: datetime | None = Field(default=None, sa_column=utc_column())


class MfaChallenge(SQLModel, table=True):
    """The step between a correct password and the second factor. Server-side, short-lived and
    single-use; it is not a session and grants nothing but the right to enter a code."""

    __tablename__ = "console_mfa_challenge"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    account_id: int = Field(foreign_key="console_account.id", index=True)
    next_path: str = Field(default="/", max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    expires_at: datetime = Field(sa_column=utc_column(nullable=False))
    consumed_at: datetime | None = Field(default=None, sa_column=utc_column())
    failures: int = Field(default=0)
