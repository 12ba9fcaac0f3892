"""Posture services: one tenant's findings, level and next step; adoption figures; daily snapshots.

    report = get_posture(session=s, principal=p, tenant_id=7)        # staff, or tenant 7's admin
    figures = get_adoption(session=s, principal=p)                    # staff and leadership
    record_daily_snapshots(session=s, principal=Principal.system())   # scheduler / CLI / demo
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import case, func
from sqlmodel import Session, col, select

from core.clock import utcnow
from core.errors import NotFound
from core.posture.adoption import AdoptionReport, Figures, HistoryPoint, TenantPosture, build_adoption
from core.posture.gather import gather_tenant, gather_tenants
from core.posture.maturity import Maturity, NextStep, assess
from core.posture.models import PostureSnapshot
from core.posture.rules import Finding, World, catalog_gaps, evaluate, tenant_world
from core.posture.snapshot import TenantSnapshot
from core.tenants.access import Principal, require_aggregate_reader, require_staff, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import Tenant


@dataclass(frozen=True)
class PostureReport:
    tenant_id: int
    slug: str
    name: str
    taken_at: datetime
    world: World
    maturity: Maturity
    findings: list[Finding]
    catalog_gaps: list[str]

    @property
    def next_step(self) -> NextStep | None:
        return self.maturity.next_step

    def by_severity(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {}
        for f in self.findings:
            out.setdefault(f.severity, []).append(f)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": {"id": self.tenant_id, "slug": self.slug, "name": self.name},
            "taken_at": self.taken_at.isoformat(),
            "world": self.world.to_dict(),
            "level": self.maturity.level,
            "level_name": self.maturity.name,
            "level_meaning": self.maturity.meaning,
            "next_step": self.maturity.next_step.to_dict() if self.maturity.next_step else None,
            "one_step_away": self.maturity.one_step_away,
            "findings": [f.to_dict() for f in self.findings],
            "catalog_gaps": self.catalog_gaps,
        }


def posture_of(snapshot: TenantSnapshot) -> PostureReport:
    """The report for a snapshot (pure: no database, no access check)."""
    findings = evaluate(snapshot)
    return PostureReport(snapshot.tenant_id, snapshot.slug, snapshot.name, snapshot.taken_at,
                         tenant_world(snapshot), assess(snapshot, findings), findings, catalog_gaps(snapshot))


def get_posture(*, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
                ) -> PostureReport:
    """One tenant's posture: staff, or that tenant's admin.

    Raises:
        AccessDenied: another tenant's admin, or leadership (tenant-level data).
        NotFound: no such tenant.
    """
    require_tenant(principal, tenant_id)
    snap = gather_tenant(session, tenant_id, now=now or utcnow())
    if snap is None:
        raise NotFound(f"Tenant {tenant_id} does not exist: pick one from the Tenants page.")
    return posture_of(snap)


def get_posture_by_slug(*, session: Session, principal: Principal, slug: str, now: datetime | None = None
                        ) -> PostureReport:
    tenant = session.exec(select(Tenant).where(Tenant.slug == slug)).first()
    if tenant is None or tenant.id is None:
        raise NotFound(f"No tenant {slug!r}: check the slug (crmbridge posture TENANT_SLUG).")
    return get_posture(session=session, principal=principal, tenant_id=tenant.id, now=now)


def _tenant_posture(snap: TenantSnapshot, report: PostureReport) -> TenantPosture:
    step = report.maturity.next_step
    return TenantPosture.from_snapshot(
        snap, level=report.maturity.level, world=report.world.key,
        next_title=step.title if step else None, next_who=step.who if step else None,
        next_rule=step.rule if step else None, to_level=step.to_level if step else None,
        one_step_away=report.maturity.one_step_away,
    )


@lru_cache(maxsize=1024)  # a few distinct strings across thousands of tenants' rows
def _editions(text: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in filter(None, (text or "").split(",")):
        prov, _, ed = item.partition(":")
        out.append((prov, ed))
    return tuple(out)


FRESH = timedelta(hours=26)  # a daily snapshot older than this is recomputed live
TREND_STEP_DAYS = 7


@lru_cache(maxsize=1024)
def _modes(text: str) -> tuple[str, ...]:
    return tuple(filter(None, text.split(",")))


# The columns a TenantPosture needs, read as plain rows (no ORM objects: thousands of tenants per page).
_POSTURE_COLUMNS = (PostureSnapshot.tenant_id, PostureSnapshot.level,
                    PostureSnapshot.sso_state, PostureSnapshot.users_total, PostureSnapshot.users_sso,
                    PostureSnapshot.editions, PostureSnapshot.account_modes, PostureSnapshot.accounts_api_user,
                    PostureSnapshot.accounts_per_user_oauth, PostureSnapshot.accounts_per_user_password,
                    PostureSnapshot.world, PostureSnapshot.next_title, PostureSnapshot.next_who,
                    PostureSnapshot.next_rule, PostureSnapshot.to_level, PostureSnapshot.one_step_away)


def _from_row(r: Any, name: str, slug: str) -> TenantPosture:
    """A TenantPosture from a row of ``_POSTURE_COLUMNS``."""
    (tenant_id, level, sso_state, users_total, users_sso, editions_text, account_modes, n_api, n_oauth, n_pw,
     world, next_title, next_who, next_rule, to_level, one_step_away) = r
    editions = _editions(editions_text or "")
    modes = _modes(account_modes or "")
    if len(modes) != len(editions):  # rows written before account_modes existed
        modes = (("api_user",) * n_api + ("per_user_oauth",) * n_oauth + ("per_user_password",) * n_pw)[:len(editions)]
        modes += ("api_user",) * (len(editions) - len(modes))
    return TenantPosture(tenant_id, name, slug, level, sso_state, users_total, users_sso, modes, editions,
                         world, next_title, next_who, next_rule, to_level, one_step_away)


def get_adoption(*, session: Session, principal: Principal, now: datetime | None = None, days: int = 90
                 ) -> AdoptionReport:
    """Cross-tenant adoption figures (counts only, no user-level data): staff and leadership.

    Current figures come from each tenant's daily snapshot (written by the scheduler); a tenant whose
    snapshot is missing or older than a day is assessed live. Trends are aggregated in SQL, so the cost
    stays flat with thousands of tenants.

    Raises:
        AccessDenied: tenant admins.
    """
    require_aggregate_reader(principal)
    now = now or utcnow()
    tenants = {tid: (name, slug) for tid, name, slug in session.exec(
        select(Tenant.id, Tenant.name, Tenant.slug).where(Tenant.status != "offboarded")).all()}
    # The scheduler writes every tenant's row on the same day: read the newest day's rows in one
    # indexed query; a tenant missing from it (new, or its row failed) is assessed live below.
    newest = session.exec(select(func.max(PostureSnapshot.day))).one()
    current: list[TenantPosture] = []
    if newest is not None:
        for r in session.exec(select(*_POSTURE_COLUMNS).where(  # type: ignore[call-overload]
                PostureSnapshot.day == newest, col(PostureSnapshot.taken_at) >= now - FRESH)).all():
            if r[0] in tenants:
                current.append(_from_row(r, *tenants[r[0]]))
    fresh = {t.tenant_id for t in current}
    stale = [tid for tid in tenants if tid is not None and tid not in fresh]
    if stale:
        for snap in gather_tenants(session, stale, now=now):
            current.append(_tenant_posture(snap, posture_of(snap)))
    # The trend is sampled weekly back from the newest snapshot: a 90-day picture for leadership at a
    # fixed cost (one indexed read of ~13 days) whatever the number of tenants.
    sample_days = [newest - timedelta(days=d) for d in range(0, days + 1, TREND_STEP_DAYS)] if newest else []
    tested = case((col(PostureSnapshot.sso_state) == "tested", 1), else_=0)
    grouped = session.exec(
        select(PostureSnapshot.day, PostureSnapshot.level, PostureSnapshot.editions, tested, func.count(),  # type: ignore[call-overload]
               func.sum(PostureSnapshot.users_total), func.sum(PostureSnapshot.users_sso))
        .where(col(PostureSnapshot.day).in_(sample_days))
        .group_by(col(PostureSnapshot.day), col(PostureSnapshot.level), col(PostureSnapshot.editions), tested)
        .order_by(col(PostureSnapshot.day))
    ).all()
    history = [HistoryPoint(day, 0, level, _editions(editions), bool(is_tested), int(users or 0), int(sso or 0),
                            weight=int(n)) for day, level, editions, is_tested, n, users, sso in grouped]
    return build_adoption(current, history, now=now)


def adoption_figures(*, session: Session, principal: Principal, now: datetime | None = None) -> Figures:
    """The leadership figures (tenants, tested SSO, users by SSO, levels, one step away) over exactly the
    tenants and postures ``get_adoption`` uses — the newest fresh daily row of every tenant not offboarded,
    a live assessment for the rest — read as a few columns instead of whole rows (for Overview).

    Raises:
        AccessDenied: tenant admins.
    """
    require_aggregate_reader(principal)
    now = now or utcnow()
    tenants = set(session.exec(select(Tenant.id).where(Tenant.status != "offboarded")).all())
    newest = session.exec(select(func.max(PostureSnapshot.day))).one()
    current: list[Any] = []
    if newest is not None:
        rows = session.exec(
            select(PostureSnapshot.tenant_id, PostureSnapshot.taken_at, PostureSnapshot.level,  # type: ignore[call-overload]
                   PostureSnapshot.sso_state, PostureSnapshot.users_total, PostureSnapshot.users_sso,
                   PostureSnapshot.one_step_away).where(PostureSnapshot.day == newest)).all()
        for row in rows:
            if row[0] in tenants and now - row[1] <= FRESH:
                current.append(row)
    fresh = {r[0] for r in current}
    stale = [tid for tid in tenants if tid is not None and tid not in fresh]
    if stale:
        for snap in gather_tenants(session, stale, now=now):
            current.append(_tenant_posture(snap, posture_of(snap)))
    return Figures.of(current)


def snapshot_row(snap: TenantSnapshot, report: PostureReport) -> PostureSnapshot:
    """The daily row for a tenant's report (counts only)."""
    sev = Counter(f.severity for f in report.findings)
    modes = Counter(a.credential_mode for a in snap.accounts)
    pairs = sorted((f"{a.provider}:{a.edition}", a.credential_mode) for a in snap.accounts)
    step = report.maturity.next_step
    return PostureSnapshot(
        tenant_id=snap.tenant_id, day=snap.taken_at.date(), taken_at=snap.taken_at, level=report.maturity.level,
        next_rule=step.rule if step else None, one_step_away=report.maturity.one_step_away,
        world=report.world.key, sso_state=snap.sso.state, users_total=snap.users_total, users_sso=snap.users_sso,
        accounts_api_user=modes.get("api_user", 0), accounts_per_user_oauth=modes.get("per_user_oauth", 0),
        accounts_per_user_password=modes.get("per_user_password", 0),
        stored_passwords=sum(len(a.stored_passwords(snap.taken_at)) for a in snap.accounts),
        findings_blocking=sev.get("blocking", 0), findings_high=sev.get("high", 0),
        findings_medium=sev.get("medium", 0), findings_low=sev.get("low", 0),
        editions=",".join(e for e, _ in pairs), account_modes=",".join(m for _, m in pairs),
        next_title=step.title[:300] if step else None, next_who=step.who[:40] if step else None,
        to_level=step.to_level if step else None,
    )


def record_daily_snapshots(*, session: Session, principal: Principal, now: datetime | None = None) -> int:
    """Write (or replace) today's posture row for every tenant not offboarded; returns how many.

    Raises:
        AccessDenied: anyone but staff or the system (scheduler, CLI).
    """
    require_staff(principal)
    now = now or utcnow()
    day = now.date()
    written = 0
    levels: Counter[int] = Counter()
    for snap in gather_tenants(session, now=now):
        report = posture_of(snap)
        row = snapshot_row(snap, report)
        existing = session.exec(select(PostureSnapshot).where(PostureSnapshot.tenant_id == snap.tenant_id,
                                                              PostureSnapshot.day == day)).first()
        if existing is not None:
            for name, value in row.model_dump(exclude={"id"}).items():
                setattr(existing, name, value)
        else:
            session.add(row)
        levels[report.maturity.level] += 1
        written += 1
    session.flush()
    record_event(session, principal=principal, action="posture.snapshot", tenant_id=None,
                 target=f"posture:{day.isoformat()}",
                 details={"tenants": written, "levels": {str(k): v for k, v in sorted(levels.items())}}, at=now)
    return written
