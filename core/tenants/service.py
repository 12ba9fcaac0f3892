"""Tenant, CRM account and app user services, and audit reading. Each checks the principal's scope
and writes one audit event per change, in the caller's transaction."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func
from sqlmodel import Session, col, select

from core.clock import utcnow
from core.errors import Conflict, InvalidInput, NotFound
from core.export import csv_cell
from core.tenants.access import (
    Principal,
    require_staff,
    require_tenant,
    tenant_scope,
)
from core.tenants.audit import record_event
from core.tenants.auth import revoke_tenant_sessions
from core.tenants.models import (
    AppUser,
    AppUserCreate,
    AppUserCrmIdentity,
    AuditEvent,
    CrmAccount,
    Tenant,
    TenantCreate,
    TenantStatus,
)


def _validated(model: Any, data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "input"
        raise InvalidInput(f"{field}: {first['msg']}. Correct the {field} and try again.") from None


# --- tenants -------------------------------------------------------------------------------------


def create_tenant(*, session: Session, principal: Principal, data: TenantCreate | dict) -> Tenant:
    require_staff(principal)
    d = _validated(TenantCreate, data if isinstance(data, dict) else data.model_dump())
    if session.exec(select(Tenant).where(Tenant.slug == d.slug)).first():
        raise Conflict(f"The slug {d.slug!r} is taken: choose another short name for this tenant.")
    tenant = Tenant(name=d.name.strip(), slug=d.slug)
    session.add(tenant)
    session.flush()
    record_event(session, principal=principal, action="tenant.create", tenant_id=tenant.id,
                 target=f"tenant:{tenant.slug}", details={"name": tenant.name})
    return tenant


def get_tenant(*, session: Session, principal: Principal, tenant_id: int) -> Tenant:
    require_tenant(principal, tenant_id)
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"Tenant {tenant_id} does not exist: pick one from the Tenants page.")
    return tenant


def get_tenant_by_slug(*, session: Session, principal: Principal, slug: str) -> Tenant:
    tenant = session.exec(select(Tenant).where(Tenant.slug == slug)).first()
    if tenant is None:
        raise NotFound(f"No tenant {slug!r}: check the address.")
    require_tenant(principal, tenant.id)  # type: ignore[arg-type]
    return tenant


def resolve_focus(*, session: Session, principal: Principal, slug: str | None) -> Tenant | None:
    """The tenant in focus for this principal, named by its slug (the console's ``?tenant=`` address).

    A tenant admin's focus is always their own tenant: no slug means it, their own slug means it, any
    other slug is refused (AccessDenied naming the fix), never swapped for another tenant in silence.
    Staff get the tenant the slug names (NotFound when there is none); no slug: no focus yet (None).
    Leadership reads aggregates only: no tenant is ever in their focus."""
    from core.errors import AccessDenied

    wanted = (slug or "").strip().lower() or None
    if principal.is_tenant_admin:
        own = session.get(Tenant, principal.tenant_id) if principal.tenant_id is not None else None
        if own is None:
            raise AccessDenied("Your console account is not linked to a tenant: ask CRM Bridge staff.")
        if wanted is not None and wanted != own.slug:
            raise AccessDenied(f"The address names tenant {wanted!r}, which is not yours: you can only open "
                               f"{own.name}. Remove ?tenant= from the address or use the links in the console.")
        return own
    if principal.is_staff:
        return get_tenant_by_slug(session=session, principal=principal, slug=wanted) if wanted else None
    if wanted is not None:
        raise AccessDenied("Leadership sees figures across tenants, not one tenant's data: remove ?tenant= "
                           "from the address.")
    return None


@dataclass(frozen=True)
class TenantChoice:
    id: int
    slug: str
    name: str


def tenant_choices(*, session: Session, principal: Principal) -> list[TenantChoice]:
    """The tenants this principal may put in focus, by name (one light query: the picker on every page)."""
    q = select(Tenant.id, Tenant.slug, Tenant.name).order_by(col(Tenant.name), col(Tenant.slug))
    if principal.is_tenant_admin:
        q = q.where(Tenant.id == principal.tenant_id)
    elif not principal.is_staff:
        return []
    return [TenantChoice(int(i or 0), sl, n) for i, sl, n in session.exec(q).all()]


def tenant_names(*, session: Session, principal: Principal, ids: set[int]) -> dict[int, str]:
    """Names for tenant ids (the audit log shows names, not numbers), limited to the tenants in scope."""
    from core.tenants.access import can_access_tenant

    wanted = {i for i in ids if can_access_tenant(principal, i)}
    if not wanted:
        return {}
    rows = session.exec(select(Tenant.id, Tenant.name).where(col(Tenant.id).in_(wanted))).all()
    return {int(i or 0): n for i, n in rows}


@dataclass
class TenantRow:
    id: int
    slug: str
    name: str
    status: str
    onboarding_step: str
    crm_accounts: int
    users: int
    providers: str
    created_at: datetime


def list_tenants(
    *,
    session: Session,
    principal: Principal,
    status: str | None = None,
    search: str | None = None,
    provider: str | None = None,
    limit: int = 200,
    offset: int = 0,
) -> tuple[list[TenantRow], int]:
    """Tenants in the principal's scope with counts (aggregated in SQL), and the total matching."""
    scope = tenant_scope(principal)
    q = select(Tenant)
    if scope is not None:
        q = q.where(Tenant.id == scope)
    if status:
        q = q.where(Tenant.status == status)
    if search:
        like = f"%{search.strip().lower()}%"
        q = q.where(func.lower(Tenant.name).like(like) | col(Tenant.slug).like(like))
    if provider:
        q = q.where(col(Tenant.id).in_(select(CrmAccount.tenant_id).where(CrmAccount.provider == provider)))
    total = session.exec(select(func.count()).select_from(q.subquery())).one()
    tenants = session.exec(q.order_by(col(Tenant.name)).limit(limit).offset(offset)).all()
    ids = [t.id for t in tenants]
    acc: dict[int, list[str]] = {}
    users: dict[int, int] = {}
    if ids:
        for tid, prov in session.exec(
            select(CrmAccount.tenant_id, CrmAccount.provider).where(col(CrmAccount.tenant_id).in_(ids))
        ):
            acc.setdefault(tid, []).append(prov)
        for tid, n in session.exec(
            select(AppUser.tenant_id, func.count()).where(col(AppUser.tenant_id).in_(ids)).group_by(
                col(AppUser.tenant_id))
        ):
            users[tid] = n
    rows = [
        TenantRow(
            id=t.id, slug=t.slug, name=t.name, status=t.status, onboarding_step=t.onboarding_step,  # type: ignore[arg-type]
            crm_accounts=len(acc.get(t.id, [])), users=users.get(t.id, 0),  # type: ignore[arg-type]
            providers=", ".join(sorted(set(acc.get(t.id, [])))), created_at=t.created_at,  # type: ignore[arg-type]
        )
        for t in tenants
    ]
    return rows, int(total)


def set_tenant_status(*, session: Session, principal: Principal, tenant_id: int, status: str) -> Tenant:
    require_staff(principal)
    tenant = get_tenant(session=session, principal=principal, tenant_id=tenant_id)
    try:
        new = TenantStatus(status).value
    except ValueError:
        raise InvalidInput(
            f"Unknown status {status!r}: use one of {', '.join(s.value for s in TenantStatus)}."
        ) from None
    old = tenant.status
    tenant.status = new
    tenant.updated_at = utcnow()
    session.add(tenant)
    details: dict[str, object] = {"from": old, "to": new}
    if new == TenantStatus.offboarded.value:
        # Offboarding ends every console session of the tenant at once; sign-in (password and SSO),
        # new sessions and vault writes are refused from now on (core.tenants.auth, core.vault).
        details["sessions_ended"] = revoke_tenant_sessions(session, tenant_id=tenant_id)
    record_event(session, principal=principal, action="tenant.status", tenant_id=tenant_id,
                 target=f"tenant:{tenant.slug}", details=details)
    return tenant


# --- CRM accounts --------------------------------------------------------------------------------


def get_crm_account(*, session: Session, principal: Principal, account_id: int) -> CrmAccount:
    account = session.get(CrmAccount, account_id)
    if account is None:
        raise NotFound(f"CRM account {account_id} does not exist: pick one from the tenant page.")
    require_tenant(principal, account.tenant_id)
    return account


def list_crm_accounts(*, session: Session, principal: Principal, tenant_id: int) -> list[CrmAccount]:
    require_tenant(principal, tenant_id)
    return list(session.exec(
        select(CrmAccount).where(CrmAccount.tenant_id == tenant_id).order_by(col(CrmAccount.label))
    ).all())


# --- app users -----------------------------------------------------------------------------------


def create_app_user(
    *, session: Session, principal: Principal, tenant_id: int, data: AppUserCreate | dict
) -> AppUser:
    require_tenant(principal, tenant_id)
    d = _validated(AppUserCreate, data if isinstance(data, dict) else data.model_dump())
    email = d.email.strip().lower()
    if "@" not in email:
        raise InvalidInput(f"{email!r} is not an email address: enter it as name@company.com.")
    if session.exec(select(AppUser).where(AppUser.tenant_id == tenant_id, AppUser.email == email)).first():
        raise Conflict(f"{email} is already a user of this tenant.")
    user = AppUser(tenant_id=tenant_id, email=email, name=d.name.strip(), sso_subject=d.sso_subject)
    session.add(user)
    session.flush()
    record_event(session, principal=principal, action="app_user.create", tenant_id=tenant_id,
                 target=f"app_user:{user.id}")
    return user


def list_app_users(
    *, session: Session, principal: Principal, tenant_id: int, limit: int = 500, offset: int = 0
) -> list[AppUser]:
    require_tenant(principal, tenant_id)
    return list(session.exec(
        select(AppUser).where(AppUser.tenant_id == tenant_id).order_by(col(AppUser.email)).limit(limit).offset(offset)
    ).all())


def set_crm_identity(
    *, session: Session, principal: Principal, app_user_id: int, crm_account_id: int, crm_user_id: str
) -> AppUserCrmIdentity:
    user = session.get(AppUser, app_user_id)
    account = session.get(CrmAccount, crm_account_id)
    if user is None or account is None or user.tenant_id != account.tenant_id:
        raise NotFound("That user or CRM account does not exist in this tenant.")
    require_tenant(principal, user.tenant_id)
    crm_user_id = crm_user_id.strip()
    if not crm_user_id or len(crm_user_id) > 100:
        raise InvalidInput("Enter the user's CRM user id (1–100 characters).")
    row = session.exec(select(AppUserCrmIdentity).where(
        AppUserCrmIdentity.app_user_id == app_user_id, AppUserCrmIdentity.crm_account_id == crm_account_id
    )).first()
    if row is None:
        row = AppUserCrmIdentity(app_user_id=app_user_id, crm_account_id=crm_account_id, crm_user_id=crm_user_id)
    else:
        row.crm_user_id = crm_user_id
    session.add(row)
    session.flush()
    record_event(session, principal=principal, action="app_user.crm_identity", tenant_id=user.tenant_id,
                 target=f"app_user:{user.id}", details={"crm_account": crm_account_id, "crm_user_id": crm_user_id})
    return row


def crm_user_ids(*, session: Session, principal: Principal, crm_account_id: int) -> dict[int, str]:
    account = get_crm_account(session=session, principal=principal, account_id=crm_account_id)
    return {
        r.app_user_id: r.crm_user_id
        for r in session.exec(select(AppUserCrmIdentity).where(AppUserCrmIdentity.crm_account_id == account.id))
    }


# --- audit ---------------------------------------------------------------------------------------


def list_audit(
    *,
    session: Session,
    principal: Principal,
    tenant_id: int | None = None,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 500,
    offset: int = 0,
) -> tuple[list[AuditEvent], int]:
    """Audit events in scope: staff see all (or one tenant), tenant admins only their own tenant."""
    scope = tenant_scope(principal)
    if scope is not None:
        if tenant_id is not None and tenant_id != scope:
            require_tenant(principal, tenant_id)
        tenant_id = scope
    q = select(AuditEvent)
    if tenant_id is not None:
        q = q.where(AuditEvent.tenant_id == tenant_id)
    if actor:
        q = q.where(func.lower(AuditEvent.actor).like(f"%{actor.strip().lower()}%"))
    if action:
        q = q.where(col(AuditEvent.action).like(f"{action.strip()}%"))
    if since:
        q = q.where(AuditEvent.occurred_at >= since)
    if until:
        q = q.where(AuditEvent.occurred_at < until)
    total = session.exec(select(func.count()).select_from(q.subquery())).one()
    rows = session.exec(q.order_by(col(AuditEvent.occurred_at).desc(), col(AuditEvent.id).desc())
                        .limit(limit).offset(offset)).all()
    return list(rows), int(total)


# Spreadsheet formula injection: a cell starting with = + - @ (or tab/CR) is prefixed with ' (core.export).
_cell = csv_cell


def export_audit_csv(*, session: Session, principal: Principal, **filters: Any) -> str:
    rows, _ = list_audit(session=session, principal=principal, limit=100_000, **filters)
    buf = io.StringIO()
    w = csv.writer(buf)
    names = tenant_names(session=session, principal=principal, ids={r.tenant_id for r in rows if r.tenant_id})
    w.writerow(["time", "tenant", "actor", "role", "action", "target", "via", "details"])
    for r in rows:
        tenant = names.get(r.tenant_id, "") if r.tenant_id else ""
        w.writerow([_cell(v) for v in (r.occurred_at.isoformat(), tenant, r.actor, r.actor_role,
                                       r.action, r.target, r.via, r.details)])
    return buf.getvalue()


@dataclass
class TenantCounts:
    by_status: dict[str, int]
    by_provider: dict[str, int]
    tenants: int
    crm_accounts: int


def tenant_counts(*, session: Session, principal: Principal) -> TenantCounts:
    """Cross-tenant headline counts (staff and leadership): aggregates only, no user-level data."""
    from core.tenants.access import require_aggregate_reader

    require_aggregate_reader(principal)
    by_status = dict(session.exec(select(Tenant.status, func.count()).group_by(col(Tenant.status))).all())
    provider_rows = session.exec(
        select(CrmAccount.provider, func.count(func.distinct(CrmAccount.tenant_id))).group_by(col(CrmAccount.provider))
    ).all()
    by_provider = dict(provider_rows)
    accounts = session.exec(select(func.count()).select_from(CrmAccount)).one()
    return TenantCounts(by_status=by_status, by_provider=by_provider, tenants=sum(by_status.values()),
                        crm_accounts=int(accounts))
