"""Who is acting, and what they may touch. Every service calls one of these before it reads or writes.

Rules:
- staff act on every tenant;
- a tenant admin acts only on their own tenant;
- leadership reads cross-tenant aggregates only: no user-level personal data, never secrets;
- ``system`` is the scheduler, the workers and the CLI acting on behalf of operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import AccessDenied
from core.tenants.models import Role, Tenant, TenantStatus


@dataclass(frozen=True)
class Principal:
    role: str
    email: str
    account_id: int | None = None
    tenant_id: int | None = None

    @classmethod
    def system(cls, name: str = "system") -> Principal:
        return cls(role="system", email=name)

    @property
    def is_staff(self) -> bool:
        return self.role in (Role.staff.value, "system")

    @property
    def is_leadership(self) -> bool:
        return self.role == Role.leadership.value

    @property
    def is_tenant_admin(self) -> bool:
        return self.role == Role.tenant_admin.value

    def label(self) -> str:
        return self.email


def can_access_tenant(principal: Principal, tenant_id: int) -> bool:
    if principal.is_staff:
        return True
    return principal.is_tenant_admin and principal.tenant_id == tenant_id


def require_tenant(principal: Principal, tenant_id: int) -> None:
    """Tenant-level data (users, credentials state, audit): staff, or that tenant's admin."""
    if not can_access_tenant(principal, tenant_id):
        raise AccessDenied(
            "You do not have access to this tenant: ask CRM Bridge staff or the tenant's admin."
        )


def require_staff(principal: Principal) -> None:
    if not principal.is_staff:
        raise AccessDenied("Only CRM Bridge staff can do this: ask customer success.")


def require_aggregate_reader(principal: Principal) -> None:
    """Cross-tenant aggregates: staff and leadership."""
    if not (principal.is_staff or principal.is_leadership):
        raise AccessDenied("Cross-tenant figures are for CRM Bridge staff and leadership.")


def tenant_scope(principal: Principal) -> int | None:
    """The tenant id a listing must be limited to, or None for every tenant (staff)."""
    if principal.is_staff:
        return None
    if principal.is_tenant_admin and principal.tenant_id is not None:
        return principal.tenant_id
    raise AccessDenied("Tenant-level lists are for staff and tenant admins.")


OFFBOARDED_CODE = "tenant_offboarded"
# One wording whenever a console account is missing or outside the principal's scope, so an admin
# cannot tell another tenant's account (or staff's) from no account at all.
NOT_IN_SCOPE = "No such console account in your scope."


def offboarded_message(tenant_name: str, what: str) -> str:
    """What every refusal for an offboarded tenant says (sign-in, sessions, vault writes)."""
    return (f"{tenant_name} has been offboarded from CRM Bridge: {what}. If this is a mistake, ask CRM Bridge "
            "staff to restore the tenant.")


def require_not_offboarded(session: Any, tenant_id: int | None, what: str) -> None:
    """Refuse ``what`` (e.g. "new credentials cannot be stored") for an offboarded tenant.

    Raises:
        AccessDenied: with code ``tenant_offboarded`` and a message saying the tenant is offboarded.
    """
    if tenant_id is None:
        return
    tenant = session.get(Tenant, tenant_id)
    if tenant is not None and tenant.status == TenantStatus.offboarded.value:
        raise AccessDenied(offboarded_message(tenant.name, what), code=OFFBOARDED_CODE)
