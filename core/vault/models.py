"""Tables of core.vault. No column ever holds a secret in plaintext.

- ``vault_kek``: every key-encryption key (KEK) the vault has used, by id, with a check value (an HMAC
  of a fixed label under the key) so a wrong key is caught at start-up, and its state.
- ``vault_tenant_key``: one data key (DEK) per tenant, stored only wrapped by a KEK (AES-256-GCM).
- ``vault_credential``: one ciphertext per credential, bound by AES-GCM associated data to its tenant,
  CRM account, app user (or the API user), purpose, id and version.
- ``vault_tombstone``: what remains of a destroyed credential (reference, reason, time) — never bytes.
- ``vault_policy``: per-tenant TTLs, idle limit and failure threshold (defaults when absent).
- ``vault_connect_link``: connect links for app users; only the SHA-256 of the token is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column, LargeBinary
from sqlmodel import Field, SQLModel

from core.clock import utcnow
from core.db import utc_column
from core.errors import InvalidInput


class KekState(StrEnum):
    active = "active"  # wraps new tenant keys
    retiring = "retiring"  # still wraps some tenant keys; a rotation is re-wrapping them
    retired = "retired"  # wraps nothing; may be removed from the key ring


class CredentialState(StrEnum):
    active = "active"
    failed = "failed"  # an API-user credential failed authentication: flagged for the admin
    invalid = "invalid"  # the ciphertext did not decrypt (tampered): never used again


class CredentialKind(StrEnum):
    password = "password"
    oauth_refresh = "oauth_refresh"
    oauth_access = "oauth_access"
    client_secret = "client_secret"
    private_key = "private_key"
    api_token = "api_token"
    session_id = "session_id"


class VaultKek(SQLModel, table=True):
    __tablename__ = "vault_kek"

    kek_id: str = Field(primary_key=True, max_length=64)
    check_value: str = Field(max_length=64)
    state: str = Field(default=KekState.active.value, max_length=10)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    retired_at: datetime | None = Field(default=None, sa_column=utc_column())


class VaultTenantKey(SQLModel, table=True):
    """A tenant's data key, wrapped (nonce || AES-GCM ciphertext) by KEK ``kek_id``."""

    __tablename__ = "vault_tenant_key"

    tenant_id: int = Field(primary_key=True, foreign_key="tenant.id")
    kek_id: str = Field(max_length=64, index=True)
    wrapped_dek: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    dek_version: int = Field(default=1)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    rotated_at: datetime | None = Field(default=None, sa_column=utc_column())


class VaultCredential(SQLModel, table=True):
    """One stored secret. ``app_user_id`` None means the account's API user (or a tenant-level key
    such as the SAML SP signing key when ``crm_account_id`` is None too)."""

    __tablename__ = "vault_credential"
    # AUTOINCREMENT: an id is never reused on SQLite, so a stale reference can never reach
    # another user's credential stored after the first was destroyed.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    crm_account_id: int | None = Field(default=None, foreign_key="crm_account.id", index=True)
    app_user_id: int | None = Field(default=None, foreign_key="app_user.id", index=True)
    purpose: str = Field(max_length=63)
    kind: str = Field(max_length=20)
    version: int = Field(default=1)
    ciphertext: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    state: str = Field(default=CredentialState.active.value, max_length=10)
    failures: int = Field(default=0)
    use_count: int = Field(default=0)
    stored_by: str = Field(default="", max_length=254)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    expires_at: datetime | None = Field(default=None, sa_column=utc_column(index=True))
    last_used_at: datetime | None = Field(default=None, sa_column=utc_column())
    failed_at: datetime | None = Field(default=None, sa_column=utc_column())


class VaultTombstone(SQLModel, table=True):
    """A destroyed credential: who it belonged to, why and when it went. Holds no key material."""

    __tablename__ = "vault_tombstone"

    id: int | None = Field(default=None, primary_key=True)
    credential_id: int = Field(index=True)
    tenant_id: int = Field(index=True)
    crm_account_id: int | None = Field(default=None)
    app_user_id: int | None = Field(default=None)
    purpose: str = Field(max_length=63)
    kind: str = Field(max_length=20)
    reason: str = Field(max_length=200)
    destroyed_by: str = Field(default="", max_length=254)
    destroyed_at: datetime = Field(sa_column=utc_column(nullable=False, index=True))


class VaultPolicy(SQLModel, table=True):
    """Per-tenant self-destruct policy. A tenant without a row gets the defaults below."""

    __tablename__ = "vault_policy"

    tenant_id: int = Field(primary_key=True, foreign_key="tenant.id")
    password_ttl_days: int = Field(default=30, ge=1, le=365)
    oauth_ttl_days: int = Field(default=90, ge=1, le=730)
    idle_days: int = Field(default=14, ge=1, le=365)
    failure_threshold: int = Field(default=1, ge=1, le=10)
    updated_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    updated_by: str = Field(default="", max_length=254)


class VaultConnectLink(SQLModel, table=True):
    """A connect link for one app user and one CRM account. Consumed only by a successful submission."""

    __tablename__ = "vault_connect_link"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    app_user_id: int = Field(foreign_key="app_user.id", index=True)
    crm_account_id: int = Field(foreign_key="crm_account.id")
    created_by: str = Field(default="", max_length=254)
    created_at: datetime = Field(sa_column=utc_column(nullable=False))
    expires_at: datetime = Field(sa_column=utc_column(nullable=False))
    consumed_at: datetime | None = Field(default=None, sa_column=utc_column())
    credential_id: int | None = Field(default=None)
    failed_attempts: int = Field(default=0)


@dataclass(frozen=True)
class CredentialRef:
    """What callers keep instead of a secret. Store ``str(ref)`` ("vault:12") or ``ref.id``;
    ``CredentialRef.parse`` reads either back."""

    id: int

    def __str__(self) -> str:
        return f"vault:{self.id}"

    @classmethod
    def parse(cls, value: CredentialRef | int | str) -> CredentialRef:
        if isinstance(value, CredentialRef):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        text = str(value).strip()
        if text.startswith("vault:"):
            text = text[len("vault:"):]
        if not text.isdigit():
            raise InvalidInput(f"{value!r} is not a vault reference: expected 'vault:<id>' as put() returned it.")
        return cls(int(text))
