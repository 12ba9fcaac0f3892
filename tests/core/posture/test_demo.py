"""The demo's 90-day posture history: plausible, and ending where each tenant stands today."""

from __future__ import annotations

from collections import defaultdict

from sqlmodel import select

from core.demo import read_scenario
from core.posture.demo import HISTORY_DAYS, ONBOARDING_DAYS, load_demo
from core.posture.models import PostureSnapshot
from core.posture.service import get_posture
from core.tenants.access import Principal
from tests.core.posture.factories import NOW
from tests.core.posture.seed import demo_world


def test_demo_history_climbs_to_todays_level(session, staff):
    slugs = demo_world(session, now=NOW)
    load_demo(session, scenario=read_scenario(), principal=Principal.system("demo"), now=NOW, tenants=slugs)
    session.commit()
    rows: dict[int, list[PostureSnapshot]] = defaultdict(list)
    for r in session.exec(select(PostureSnapshot).order_by(PostureSnapshot.day)):
        rows[r.tenant_id].append(r)
    for slug, tid in slugs.items():
        history = rows[tid]
        live = get_posture(session=session, principal=staff, tenant_id=tid, now=NOW).maturity.level
        assert history[-1].day == NOW.date() and history[-1].level == live
        assert len({r.day for r in history}) == len(history)  # one row per day
        levels = [r.level for r in history]
        assert levels == sorted(levels), f"{slug} goes down: {levels}"
        expected_days = ONBOARDING_DAYS + 1 if slug == "newco" else HISTORY_DAYS
        assert len(history) == expected_days
    big = rows[slugs["bigcorp"]]
    assert big[0].level == 1 and big[0].accounts_per_user_password == 2 and big[0].sso_state == "missing"
    tested = [r.users_sso for r in big if r.sso_state == "tested"]
    assert tested == sorted(tested) and tested[-1] == 3  # users move to SSO gradually


def test_demo_is_idempotent_per_day(session):
    slugs = demo_world(session, now=NOW)
    for _ in range(2):
        load_demo(session, scenario=read_scenario(), principal=Principal.system("demo"), now=NOW, tenants=slugs)
    session.commit()
    assert len(session.exec(select(PostureSnapshot)).all()) == 5 * HISTORY_DAYS + ONBOARDING_DAYS + 1
