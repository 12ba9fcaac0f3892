"""Tables of core.sso: each tenant's IdP configuration and SP keys, AuthnRequests we sent, responses
we have consumed (replay cache), test-login traces and certificate-watch notices."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from core.clock import utcnow
from core.db import utc_column


class SsoConfig(SQLModel, table=True):
    """The IdP configuration in force for one tenant (one row per tenant; replaced on re-import)."""

    __tablename__ = "sso_config"

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", unique=True, index=True)
    version: int = Field(default=1)  # bumped on every replace: cached SAML settings key on it
    idp_entity_id: str = Field(max_length=1024)
    sso_url: str = Field(max_length=2048)
    sso_binding: str = Field(max_length=100)
    slo_url: str | None = Field(default=None, max_length=2048)
    # JSON: [{"use","subject","not_before","not_after","sha256","der_b64","key_type","key_bits"}]
    certs_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    endpoints_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    name_id_formats_json: str = Field(default="[]", max_length=4000)
    want_authn_requests_signed: bool = Field(default=False)
    metadata_xml: str = Field(sa_column=Column(Text, nullable=False))
    metadata_sha256: str = Field(max_length=64)
    source: str = Field(default="upload", max_length=20)  # upload | url
    source_url: str | None = Field(default=None, max_length=2048)
    valid_until: datetime | None = Field(default=None, sa_column=utc_column())
    lint_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    # Optional pin for the metadata signature (PEM); re-imports must verify against it.
    pinned_cert_pem: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    allow_idp_initiated: bool = Field(default=False)
    imported_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    imported_by: str = Field(default="", max_length=254)
    tested_at: datetime | None = Field(default=None, sa_column=utc_column())
    last_test_ok: bool | None = Field(default=None)
    last_cert_check_at: datetime | None = Field(default=None, sa_column=utc_column())


class SsoSpKey(SQLModel, table=True):
    """One SP signing/encryption key pair of a tenant. The private key lives in the vault
    (``vault_ref``); the certificate is public. ``state``: next (published, not yet signing),
    active (signing; at most one), retired (no longer published)."""

    __tablename__ = "sso_sp_key"

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    state: str = Field(default="active", max_length=10, index=True)
    cert_pem: str = Field(sa_column=Column(Text, nullable=False))
    cert_sha256: str = Field(max_length=64)
    vault_ref: str = Field(max_length=2000)
    not_before: datetime = Field(sa_column=utc_column(nullable=False))
    not_after: datetime = Field(sa_column=utc_column(nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    activated_at: datetime | None = Field(default=None, sa_column=utc_column())
    retired_at: datetime | None = Field(default=None, sa_column=utc_column())


class SsoRequest(SQLModel, table=True):
    """An AuthnRequest we sent. Single use: ``used_at`` is set in the same transaction that accepts
    (or rejects) the response answering it."""

    __tablename__ = "sso_request"

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(max_length=100, unique=True, index=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    purpose: str = Field(max_length=10)  # test | sign_in
    relay_state: str | None = Field(default=None, max_length=500)
    started_by: str | None = Field(default=None, max_length=254)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
    expires_at: datetime = Field(sa_column=utc_column(nullable=False, index=True))
    used_at: datetime | None = Field(default=None, sa_column=utc_column())


class SsoSeenResponse(SQLModel, table=True):
    """Replay cache: a response (and assertion) id is kept under a unique key until it expires, so
    a replay is refused by the database on every replica."""

    __tablename__ = "sso_seen_response"
    __table_args__ = (UniqueConstraint("tenant_id", "message_id", name="uq_sso_seen_tenant_message"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    message_id: str = Field(max_length=300)  # "r:<Response ID>" or "a:<Assertion ID>"
    expires_at: datetime = Field(sa_column=utc_column(nullable=False, index=True))


class SsoTrace(SQLModel, table=True):
    """What a test login (or a pasted SAMLResponse check) saw: each check, the decoded XML, skew."""

    __tablename__ = "sso_trace"

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    source: str = Field(max_length=10)  # test | paste
    request_id: str | None = Field(default=None, max_length=100)
    ok: bool = Field(default=False)
    error: str | None = Field(default=None, max_length=2000)
    name_id: str | None = Field(default=None, max_length=500)
    skew_seconds: float | None = Field(default=None)
    checks_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    decoded_xml: str = Field(default="", sa_column=Column(Text, nullable=False))
    created_by: str | None = Field(default=None, max_length=254)
    created_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False, index=True))


class SsoCertNotice(SQLModel, table=True):
    """One certificate-watch notice per (tenant, certificate, threshold), so each is raised once."""

    __tablename__ = "sso_cert_notice"
    __table_args__ = (
        UniqueConstraint("tenant_id", "cert_sha256", "threshold", name="uq_sso_cert_notice"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    cert_sha256: str = Field(max_length=64)
    threshold: str = Field(max_length=10)  # 90 | 30 | 7 | expired
    not_after: datetime = Field(sa_column=utc_column(nullable=False))
    noticed_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))
