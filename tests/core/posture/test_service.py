"""Services: who may read what, the demo tenants' posture, adoption figures and daily snapshots."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlmodel import select

from core.errors import AccessDenied, NotFound
from core.posture.models import PostureSnapshot
from core.posture.service import get_adoption, get_posture, get_posture_by_slug, record_daily_snapshots
from core.tenants.access import Principal
from core.tenants.models import AppUser, AuditEvent
from tests.core.posture.factories import NOW
from tests.core.posture.seed import demo_world


@pytest.fixture
def world(session):  # type: ignore[no-untyped-def]
    return demo_world(session, now=NOW)


def _admin(slugs: dict[str, int], slug: str) -> Principal:
    return Principal(role="tenant_admin", email=f"admin@{slug}.example", tenant_id=slugs[slug])


def test_demo_tenants_land_on_the_levels_their_stories_describe(session, staff, world):
    levels = {slug: get_posture(session=session, principal=staff, tenant_id=tid, now=NOW).maturity.level
              for slug, tid in world.items()}
    assert levels == {"tinyco": 1, "profco": 0, "bigcorp": 3, "dynco": 2, "hubco": 2, "newco": 0}


def test_tinyco_posture_names_its_world_step_and_the_credentials_a_switch_destroys(session, staff, world):
    r = get_posture(session=session, principal=staff, tenant_id=world["tinyco"], now=NOW)
    assert r.world.key == "today"
    step = r.maturity.next_step
    assert step is not None and step.rule == "per_user_passwords" and step.to_level == 2
    rules = [f.rule for f in r.findings]
    assert {"per_user_passwords", "no_spare_license", "credentials_expiring_together", "sso_missing"} <= set(rules)
    spare = next(f for f in r.findings if f.rule == "no_spare_license")
    assert "(5 free)" in spare.action
    assert set(spare.affected) == {"tom@tinyco.example", "uma@tinyco.example", "lee@tinyco.example",
                                   "ida@tinyco.example"}


def test_profco_is_blocked_in_the_2013_world(session, staff, world):
    r = get_posture_by_slug(session=session, principal=staff, slug="profco", now=NOW)
    assert r.maturity.level == 0 and r.world.key == "2013"
    assert r.findings[0].rule == "api_not_available" and r.findings[0].severity == "blocking"
    d = r.to_dict()
    assert d["next_step"]["who"] == "sales" and d["level_name"] == "Blocked"
    json.dumps(d)  # serializable as the CLI prints it


def test_a_tenant_admin_sees_only_their_own_posture(session, world):
    tiny_admin = _admin(world, "tinyco")
    assert get_posture(session=session, principal=tiny_admin, tenant_id=world["tinyco"], now=NOW).slug == "tinyco"
    with pytest.raises(AccessDenied):
        get_posture(session=session, principal=tiny_admin, tenant_id=world["bigcorp"], now=NOW)
    with pytest.raises(AccessDenied):
        get_posture_by_slug(session=session, principal=tiny_admin, slug="bigcorp", now=NOW)


def test_leadership_gets_no_tenant_posture(session, leadership, world):
    with pytest.raises(AccessDenied):
        get_posture(session=session, principal=leadership, tenant_id=world["tinyco"], now=NOW)


def test_unknown_tenant(session, staff, world):
    with pytest.raises(NotFound):
        get_posture_by_slug(session=session, principal=staff, slug="nope", now=NOW)


def test_adoption_figures_for_leadership_carry_no_user_level_data(session, leadership, world):
    rep = get_adoption(session=session, principal=leadership, now=NOW)
    assert rep.tenants == 6
    assert rep.sso_tested == 1 and rep.sso_tested_share == pytest.approx(1 / 6)
    assert (rep.users_total, rep.users_sso) == (15, 3)
    assert rep.credential_modes == {"api_user": 5, "per_user_oauth": 0, "per_user_password": 2}
    assert rep.levels == {0: 2, 1: 1, 2: 2, 3: 1, 4: 0}
    by = {(r.provider, r.edition): r for r in rep.by_edition}
    assert by[("salesforce", "enterprise")].tenants == 3 and by[("salesforce", "enterprise")].accounts == 4
    pipeline = {r.slug: r for r in rep.pipeline}
    assert pipeline["bigcorp"].to_level == 4 and pipeline["bigcorp"].rule == "api_user_without_attribution"
    assert pipeline["tinyco"].who == "tenant_admin"
    blob = json.dumps(rep.to_dict(), default=str)
    emails = [u.email for u in session.exec(select(AppUser)).all()]
    names = [u.name for u in session.exec(select(AppUser)).all()]
    assert emails and not any(e in blob for e in emails) and not any(n in blob for n in names)
    assert "@" not in blob


def test_adoption_is_refused_to_tenant_admins(session, world):
    with pytest.raises(AccessDenied):
        get_adoption(session=session, principal=_admin(world, "tinyco"), now=NOW)


def test_daily_snapshots_are_written_once_per_day_and_audited(session, staff, world):
    assert record_daily_snapshots(session=session, principal=staff, now=NOW) == 6
    assert record_daily_snapshots(session=session, principal=staff, now=NOW + timedelta(hours=3)) == 6
    rows = session.exec(select(PostureSnapshot)).all()
    assert len(rows) == 6
    tiny = next(r for r in rows if r.tenant_id == world["tinyco"])
    assert (tiny.level, tiny.accounts_per_user_password, tiny.stored_passwords, tiny.sso_state) == (1, 1, 4, "missing")
    assert tiny.editions == "salesforce:enterprise" and tiny.next_rule == "per_user_passwords"
    assert tiny.taken_at == NOW + timedelta(hours=3)
    record_daily_snapshots(session=session, principal=staff, now=NOW + timedelta(days=1))
    assert len(session.exec(select(PostureSnapshot)).all()) == 12
    events = session.exec(select(AuditEvent).where(AuditEvent.action == "posture.snapshot")).all()
    assert len(events) == 3 and '"tenants": 6' in events[0].details


def test_daily_snapshots_are_staff_only(session, leadership, world):
    with pytest.raises(AccessDenied):
        record_daily_snapshots(session=session, principal=leadership, now=NOW)
    with pytest.raises(AccessDenied):
        record_daily_snapshots(session=session, principal=_admin(world, "tinyco"), now=NOW)


def test_history_feeds_the_trend(session, staff, leadership, world):
    for d in (15, 9, 8, 1):  # the trend samples weekly back from the newest snapshot: day 9 is skipped
        record_daily_snapshots(session=session, principal=staff, now=NOW - timedelta(days=d))
    rep = get_adoption(session=session, principal=leadership, now=NOW)
    overall = [p for p in rep.trend if p.provider is None]
    days = sorted({p.day for p in overall})
    assert days == [(NOW - timedelta(days=d)).date() for d in (15, 8, 1)] + [NOW.date()]
    assert sum(p.tenants for p in overall if p.day == days[0]) == 6
    per_edition = [p for p in rep.trend if p.provider == "salesforce" and p.edition == "professional"]
    assert {(p.day, p.level, p.tenants) for p in per_edition} >= {(days[0], 0, 1)}

