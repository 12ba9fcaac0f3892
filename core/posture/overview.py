"""Landing-page figures per role, aggregated in SQL from the daily posture snapshots so they stay
fast with thousands of tenants (the full posture report is computed only for one tenant)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import case, func
from sqlmodel import Session, col, select

from core.posture.models import PostureSnapshot
from core.tenants.access import Principal, require_aggregate_reader, require_staff
from core.tenants.models import CrmAccount, Tenant


@dataclass
class Headline:
    """Cross-tenant figures: counts only, no user-level data (leadership may read them)."""

    tenants: int
    live: int
    onboarding: int
    as_of: str | None
    sso_tested_share: float
    users_sso_share: float
    levels: dict[int, int] = field(default_factory=dict)
    one_step_away: int = 0
    stored_password_tenants: int = 0


@dataclass
class AttentionRow:
    tenant_id: int
    name: str
    slug: str
    reason: str
    level: int | None


def _latest_day(session: Session):  # type: ignore[no-untyped-def]
    return session.exec(select(func.max(PostureSnapshot.day))).one()


def headline(*, session: Session, principal: Principal) -> Headline:
    require_aggregate_reader(principal)
    by_status = dict(session.exec(select(Tenant.status, func.count()).group_by(col(Tenant.status))).all())
    day = _latest_day(session)
    levels: dict[int, int] = {}
    tested = users = users_sso = one_step = stored = snaps = 0
    if day is not None:
        row = session.exec(
            select(func.count(), func.sum(col(PostureSnapshot.users_total)), func.sum(col(PostureSnapshot.users_sso)),  # type: ignore[call-overload,arg-type]
                   func.sum(case((col(PostureSnapshot.sso_state) == "tested", 1), else_=0)),
                   func.sum(case((col(PostureSnapshot.one_step_away), 1), else_=0)),
                   func.sum(case((col(PostureSnapshot.stored_passwords) > 0, 1), else_=0)))
            .where(PostureSnapshot.day == day)
        ).one()
        snaps, users, users_sso, tested, one_step, stored = (int(v or 0) for v in row)
        levels = dict(session.exec(select(PostureSnapshot.level, func.count()).where(PostureSnapshot.day == day)
                                   .group_by(col(PostureSnapshot.level))).all())
    return Headline(
        tenants=sum(by_status.values()), live=by_status.get("live", 0), onboarding=by_status.get("onboarding", 0),
        as_of=day.isoformat() if day else None,
        sso_tested_share=tested / snaps if snaps else 0.0, users_sso_share=users_sso / users if users else 0.0,
        levels=levels, one_step_away=one_step, stored_password_tenants=stored,
    )


def needing_attention(*, session: Session, principal: Principal, limit: int = 20) -> list[AttentionRow]:
    """Tenants with blocking or high findings on the latest snapshot, or a failing connection test."""
    require_staff(principal)
    out: dict[int, AttentionRow] = {}
    day = _latest_day(session)
    if day is not None:
        q = (select(Tenant.id, Tenant.name, Tenant.slug, PostureSnapshot.level, PostureSnapshot.findings_blocking,  # type: ignore[call-overload,arg-type]
                    PostureSnapshot.findings_high)
             .join(PostureSnapshot, PostureSnapshot.tenant_id == Tenant.id)
             .where(PostureSnapshot.day == day,
                    (PostureSnapshot.findings_blocking > 0) | (PostureSnapshot.findings_high > 0))
             .order_by(col(PostureSnapshot.findings_blocking).desc(), col(PostureSnapshot.findings_high).desc())
             .limit(limit))
        for tid, name, slug, level, blocking, high in session.exec(q).all():  # type: ignore[misc]
            parts = [f"{blocking} blocking" if blocking else "", f"{high} high" if high else ""]
            out[tid] = AttentionRow(tid, name, slug, " and ".join(p for p in parts if p) + " finding(s)", level)
    failing = session.exec(
        select(Tenant.id, Tenant.name, Tenant.slug, func.count())
        .join(CrmAccount, CrmAccount.tenant_id == Tenant.id)  # type: ignore[call-overload,arg-type]
        .where(CrmAccount.last_test_ok == False)  # noqa: E712
        .group_by(col(Tenant.id), col(Tenant.name), col(Tenant.slug)).limit(limit)
    ).all()
    for tid, name, slug, n in failing:
        assert tid is not None
        row = out.setdefault(tid, AttentionRow(tid, name, slug, "", None))
        row.reason = "; ".join(r for r in (row.reason, f"{n} failing connection test(s)") if r)
    return list(out.values())[:limit]
