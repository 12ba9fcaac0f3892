"""Per-tenant self-destruct policy: TTLs, idle limit, failure threshold.

Defaults (a tenant without a ``vault_policy`` row): per-user passwords live 30 days, OAuth refresh
tokens 90, short-lived secrets (session ids, access tokens) 1 day; a per-user credential unused for
14 days is destroyed; the first definitive authentication failure destroys a per-user credential.
API-user and tenant-level secrets (client secrets, private keys, API tokens) have no TTL unless
``put(ttl=...)`` gives one, and are never destroyed for being idle: the admin rotates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session

from core.clock import utcnow
from core.errors import InvalidInput
from core.tenants.access import Principal, require_tenant
from core.tenants.audit import record_event
from core.vault.models import CredentialKind, VaultPolicy

SHORT_LIVED_TTL = timedelta(days=1)
LIMITS = {
    "password_ttl_days": (1, 365),
    "oauth_ttl_days": (1, 730),
    "idle_days": (1, 365),
    "failure_threshold": (1, 10),
}


@dataclass(frozen=True)
class Policy:
    password_ttl_days: int = 30
    oauth_ttl_days: int = 90
    idle_days: int = 14
    failure_threshold: int = 1

    def default_ttl(self, kind: str) -> timedelta | None:
        if kind == CredentialKind.password:
            return timedelta(days=self.password_ttl_days)
        if kind == CredentialKind.oauth_refresh:
            return timedelta(days=self.oauth_ttl_days)
        if kind in (CredentialKind.session_id, CredentialKind.oauth_access):
            return SHORT_LIVED_TTL
        return None

    @property
    def idle_limit(self) -> timedelta:
        return timedelta(days=self.idle_days)


DEFAULT_POLICY = Policy()


def from_row(row: VaultPolicy | None) -> Policy:
    if row is None:
        return DEFAULT_POLICY
    return Policy(row.password_ttl_days, row.oauth_ttl_days, row.idle_days, row.failure_threshold)


def get_policy(session: Session, tenant_id: int) -> Policy:
    return from_row(session.get(VaultPolicy, tenant_id))


def view_policy(session: Session, *, principal: Principal, tenant_id: int) -> Policy:
    """A tenant's policy, for staff or the tenant's admin."""
    require_tenant(principal, tenant_id)
    return get_policy(session, tenant_id)


def set_policy(
    session: Session, *, principal: Principal, tenant_id: int, now: datetime | None = None, **changes: int
) -> Policy:
    """Change a tenant's policy (staff or the tenant's admin). Applies to credentials stored from now
    on for TTLs; the idle limit and the failure threshold apply at once."""
    require_tenant(principal, tenant_id)
    unknown = set(changes) - set(LIMITS)
    if unknown:
        raise InvalidInput(f"Unknown vault policy setting(s) {sorted(unknown)}: use {', '.join(LIMITS)}.")
    for name, value in changes.items():
        low, high = LIMITS[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidInput(f"Vault policy {name} must be a whole number from {low} to {high} (got {value!r}).")
    existing = session.get(VaultPolicy, tenant_id)
    before = from_row(existing)
    row = existing or VaultPolicy(tenant_id=tenant_id)
    for name, value in changes.items():
        setattr(row, name, value)
    row.updated_at = now or utcnow()
    row.updated_by = principal.email[:254]
    session.add(row)
    record_event(session, principal=principal, action="vault.policy.update", tenant_id=tenant_id,
                 target=f"tenant:{tenant_id}",
                 details={k: {"from": getattr(before, k), "to": v} for k, v in changes.items()}, at=row.updated_at)
    return from_row(row)
