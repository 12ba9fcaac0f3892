"""Onboarding, the orchestrator at the top of core: it reads tenants, CRM accounts and SSO, so it sits
above them all (nothing below imports it).

Onboarding is a state machine stored in the database, so a half-done onboarding survives a restart
and can be resumed by anyone allowed (staff, or the tenant's admin for the steps handed to them).

Steps, in order: tenant → crm_accounts → credential_mode → connection_test → sso → users → go_live.
Each step is ``pending``, ``done`` (its check passed) or ``deferred`` (with a reason that stays visible
on the tenant). The connection test and the SSO test must pass or be deferred; go-live needs every
earlier step done or deferred, and then marks the tenant live.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Field, Session, SQLModel, select

from core import labels
from core.clock import utcnow
from core.db import utc_column
from core.errors import InvalidInput
from core.labels import credential_mode as credential_mode_label
from core.sso.metadata import sso_summary
from core.tenants.access import Principal, require_staff, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import ONBOARDING_STEPS, AppUser, CrmAccount, Tenant, TenantStatus

STEP_TITLES = labels.ONBOARDING_STEPS  # one wording for each step, shared with the pages
DEFERRABLE = {"connection_test", "sso", "users"}
HANDED_TO_TENANT = {"credential_mode", "connection_test", "sso", "users"}


class OnboardingState(SQLModel, table=True):
    __tablename__ = "onboarding_state"

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    steps_json: str = Field(default="{}", max_length=20_000)
    updated_by: str = Field(default="", max_length=254)
    updated_at: datetime = Field(default_factory=utcnow, sa_column=utc_column(nullable=False))


@dataclass
class StepState:
    key: str
    title: str
    status: str = "pending"  # pending | done | deferred
    reason: str | None = None
    by: str | None = None
    at: str | None = None
    check: str = ""  # what the check found just now

    @property
    def settled(self) -> bool:
        return self.status in ("done", "deferred")


@dataclass
class OnboardingView:
    tenant_id: int
    tenant_status: str
    steps: list[StepState] = field(default_factory=list)

    @property
    def current(self) -> StepState | None:
        return next((s for s in self.steps if not s.settled), None)

    @property
    def progress(self) -> float:
        return sum(1 for s in self.steps if s.settled) / len(self.steps)

    @property
    def deferred(self) -> list[StepState]:
        return [s for s in self.steps if s.status == "deferred"]


# Checks: (session, tenant) -> (passed, what was found). SSO's check is registered by core.sso.
Check = Callable[[Session, Tenant], tuple[bool, str]]


def _check_tenant(session: Session, tenant: Tenant) -> tuple[bool, str]:
    return True, f"{tenant.name} ({tenant.slug}) exists"


def _accounts(session: Session, tenant: Tenant) -> list[CrmAccount]:
    return list(session.exec(select(CrmAccount).where(CrmAccount.tenant_id == tenant.id)).all())


def _check_crm_accounts(session: Session, tenant: Tenant) -> tuple[bool, str]:
    n = len(_accounts(session, tenant))
    return n > 0, f"{n} CRM account(s)" if n else "no CRM account yet: add one"


def _check_credential_mode(session: Session, tenant: Tenant) -> tuple[bool, str]:
    accs = _accounts(session, tenant)
    if not accs:
        return False, "add a CRM account first"
    modes = ", ".join(f"{a.label}: {credential_mode_label(a.credential_mode)}" for a in accs)
    return True, modes


def _check_connection(session: Session, tenant: Tenant) -> tuple[bool, str]:
    accs = _accounts(session, tenant)
    if not accs:
        return False, "add a CRM account first"
    failing = [a.label for a in accs if not a.last_test_ok]
    if failing:
        return False, "not passed yet: " + ", ".join(failing)
    return True, f"all {len(accs)} account(s) passed"


def _check_users(session: Session, tenant: Tenant) -> tuple[bool, str]:
    n = session.exec(select(func.count()).select_from(AppUser).where(AppUser.tenant_id == tenant.id)).one()
    return n > 0, f"{n} user(s)" if n else "no user yet: add or import users"


def _check_sso_default(session: Session, tenant: Tenant) -> tuple[bool, str]:
    summary = sso_summary(session=session, principal=Principal.system("onboarding"), tenant_id=tenant.id)  # type: ignore[arg-type]
    if not summary["configured"]:
        return False, "no IdP metadata imported yet: import it on the SSO page"
    if summary["tested"]:
        return True, "SSO tested with a valid response"
    if summary["last_test_ok"] is False:
        return False, "the last test login failed: see its trace on the SSO page"
    return False, "metadata imported, test login not run yet"


CHECKS: dict[str, Check] = {
    "tenant": _check_tenant,
    "crm_accounts": _check_crm_accounts,
    "credential_mode": _check_credential_mode,
    "connection_test": _check_connection,
    "sso": _check_sso_default,
    "users": _check_users,
}


def _load(session: Session, tenant_id: int) -> tuple[OnboardingState, dict[str, dict]]:
    row = session.get(OnboardingState, tenant_id)
    if row is None:
        row = OnboardingState(tenant_id=tenant_id)
    return row, json.loads(row.steps_json or "{}")


def _may_act(principal: Principal, step: str) -> None:
    if principal.is_staff:
        return
    if principal.is_tenant_admin and step in HANDED_TO_TENANT:
        return
    require_staff(principal)


def get_onboarding(*, session: Session, principal: Principal, tenant_id: int) -> OnboardingView:
    require_tenant(principal, tenant_id)
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise InvalidInput(f"Tenant {tenant_id} does not exist.")
    _, stored = _load(session, tenant_id)
    view = OnboardingView(tenant_id=tenant_id, tenant_status=tenant.status)
    for key in ONBOARDING_STEPS:
        st = stored.get(key, {})
        check = CHECKS.get(key)
        found = check(session, tenant)[1] if check else ""
        status = st.get("status", "pending")
        if key == "tenant":
            status = "done"
        if key == "go_live" and tenant.status == TenantStatus.live.value:
            status = "done"
        view.steps.append(StepState(key=key, title=STEP_TITLES[key], status=status, reason=st.get("reason"),
                                    by=st.get("by"), at=st.get("at"), check=found))
    return view


def _save(session: Session, row: OnboardingState, stored: dict, principal: Principal, tenant: Tenant,
          now: datetime) -> None:
    row.steps_json = json.dumps(stored, sort_keys=True)
    row.updated_by = principal.email
    row.updated_at = now
    session.add(row)
    view_next = next((k for k in ONBOARDING_STEPS if stored.get(k, {}).get("status") not in ("done", "deferred")
                      and k != "tenant"), "go_live")
    tenant.onboarding_step = view_next
    tenant.updated_at = now
    session.add(tenant)


def complete_step(
    *, session: Session, principal: Principal, tenant_id: int, step: str, now: datetime | None = None
) -> StepState:
    """Mark a step done after its check passes; the check's finding is the error otherwise."""
    if step not in ONBOARDING_STEPS or step in ("tenant", "go_live"):
        raise InvalidInput(f"Unknown or automatic step {step!r}.")
    require_tenant(principal, tenant_id)
    _may_act(principal, step)
    now = now or utcnow()
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    ok, found = CHECKS[step](session, tenant)
    if not ok:
        hint = " — or defer it with a reason" if step in DEFERRABLE else ""
        raise InvalidInput(f"{STEP_TITLES[step]} is not ready: {found}{hint}.")
    row, stored = _load(session, tenant_id)
    stored[step] = {"status": "done", "by": principal.email, "at": now.isoformat()}
    _save(session, row, stored, principal, tenant, now)
    record_event(session, principal=principal, action="onboarding.step_done", tenant_id=tenant_id,
                 target=f"tenant:{tenant.slug}", details={"step": step, "found": found}, at=now)
    return StepState(key=step, title=STEP_TITLES[step], status="done", check=found)


def defer_step(
    *, session: Session, principal: Principal, tenant_id: int, step: str, reason: str, now: datetime | None = None
) -> StepState:
    """Defer a step that cannot be finished now (the IdP admin is on holiday): the reason stays visible."""
    if step not in DEFERRABLE:
        raise InvalidInput(f"{STEP_TITLES.get(step, step)} cannot be deferred: complete it instead.")
    reason = (reason or "").strip()
    if len(reason) < 5 or len(reason) > 500:
        raise InvalidInput("Give a reason for deferring (5–500 characters) so the next person knows why.")
    require_tenant(principal, tenant_id)
    _may_act(principal, step)
    now = now or utcnow()
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    row, stored = _load(session, tenant_id)
    stored[step] = {"status": "deferred", "reason": reason, "by": principal.email, "at": now.isoformat()}
    _save(session, row, stored, principal, tenant, now)
    record_event(session, principal=principal, action="onboarding.step_deferred", tenant_id=tenant_id,
                 target=f"tenant:{tenant.slug}", details={"step": step, "reason": reason}, at=now)
    return StepState(key=step, title=STEP_TITLES[step], status="deferred", reason=reason)


def reopen_step(*, session: Session, principal: Principal, tenant_id: int, step: str) -> None:
    """Undo: put a done or deferred step back to pending."""
    require_tenant(principal, tenant_id)
    _may_act(principal, step)
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    row, stored = _load(session, tenant_id)
    stored.pop(step, None)
    _save(session, row, stored, principal, tenant, utcnow())
    record_event(session, principal=principal, action="onboarding.step_reopened", tenant_id=tenant_id,
                 target=f"tenant:{tenant.slug}", details={"step": step})


def go_live(*, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None) -> Tenant:
    """Take the tenant live once every step is done or deferred (staff only)."""
    require_staff(principal)
    view = get_onboarding(session=session, principal=principal, tenant_id=tenant_id)
    missing = [s.title for s in view.steps if s.key not in ("go_live",) and not s.settled]
    if missing:
        raise InvalidInput("Not ready to go live: finish or defer " + ", ".join(missing) + ".")
    now = now or utcnow()
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    tenant.status = TenantStatus.live.value
    tenant.onboarding_step = "go_live"
    tenant.updated_at = now
    session.add(tenant)
    record_event(session, principal=principal, action="onboarding.go_live", tenant_id=tenant_id,
                 target=f"tenant:{tenant.slug}",
                 details={"deferred": {s.key: s.reason for s in view.deferred}}, at=now)
    return tenant
