"""Adoption reads the scheduler's daily snapshots (cheap at scale) and gives the same figures as a
live assessment; a tenant with no fresh snapshot is assessed live, so a new tenant counts at once."""

from __future__ import annotations

from datetime import timedelta

from core.demo import load_scenario, read_scenario
from core.posture.service import get_adoption, record_daily_snapshots
from core.tenants.access import Principal
from core.tenants.service import create_tenant

SYSTEM = Principal.system("scheduler")


def _figures(r):  # type: ignore[no-untyped-def]
    return (r.tenants, r.sso_tested, r.users_total, r.users_sso, r.credential_modes, r.levels, r.sso_states,
            [(p.slug, p.level, p.to_level, p.step, p.who) for p in r.pipeline],
            [(e.provider, e.edition, e.tenants, e.accounts, e.modes) for e in r.by_edition])


def test_snapshot_figures_equal_live_figures_and_new_tenants_count(session, leadership, staff, clock):
    load_scenario(session, read_scenario())
    session.commit()
    live = get_adoption(session=session, principal=leadership, now=clock())
    assert record_daily_snapshots(session=session, principal=SYSTEM, now=clock()) == 6
    session.commit()
    from_rows = get_adoption(session=session, principal=leadership, now=clock() + timedelta(minutes=5))
    assert _figures(from_rows) == _figures(live)

    create_tenant(session=session, principal=staff, data={"name": "Initrode", "slug": "initrode"})
    session.commit()
    after = get_adoption(session=session, principal=leadership, now=clock() + timedelta(minutes=10))
    assert after.tenants == live.tenants + 1


def test_stale_snapshots_are_reassessed_live(session, leadership, clock):
    load_scenario(session, read_scenario())
    session.commit()
    record_daily_snapshots(session=session, principal=SYSTEM, now=clock())
    session.commit()
    later = clock() + timedelta(days=3)
    report = get_adoption(session=session, principal=leadership, now=later)
    assert report.tenants == 6
    # the trend still has the snapshot day, and today's live figures are added
    days = {t.day for t in report.trend}
    assert clock().date() in days and later.date() in days
