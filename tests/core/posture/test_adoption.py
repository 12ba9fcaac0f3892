"""Adoption aggregates (pure): shares, mixes, distribution, trend and the upgrade pipeline."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from core.posture.adoption import HistoryPoint, TenantPosture, build_adoption
from tests.core.posture.factories import NOW


def _t(tid: int, level: int, *, sso: str = "missing", users: tuple[int, int] = (10, 0),
       accounts: tuple[tuple[str, str, str], ...] = (("salesforce", "enterprise", "api_user"),),
       one_step: bool = False, step: str | None = None) -> TenantPosture:
    return TenantPosture(tid, f"Tenant {tid}", f"t{tid}", level, sso, users[0], users[1],
                         tuple(m for _, _, m in accounts), tuple((p, e) for p, e, _ in accounts), "today",
                         next_title=step, next_who="tenant_admin" if step else None,
                         next_rule="sso_untested" if step else None, to_level=level + 1 if step else None,
                         one_step_away=one_step)


def test_shares_mix_and_distribution():
    current = [
        _t(1, 3, sso="tested", users=(10, 8)),
        _t(2, 2, sso="untested", users=(20, 0), one_step=True, step="SSO not tested"),
        _t(3, 1, accounts=(("salesforce", "professional", "per_user_password"),
                           ("hubspot", "professional", "api_user")), users=(5, 0)),
        _t(4, 0, users=(0, 0)),
    ]
    rep = build_adoption(current, [], now=NOW)
    assert rep.tenants == 4
    assert rep.sso_tested_share == pytest.approx(0.25)
    assert rep.users_sso_share == pytest.approx(8 / 35)
    assert rep.credential_modes == {"api_user": 4, "per_user_oauth": 0, "per_user_password": 1}
    assert rep.levels == {0: 1, 1: 1, 2: 1, 3: 1, 4: 0}
    assert rep.sso_states == {"tested": 1, "untested": 1, "failing": 0, "missing": 2}
    by = {(r.provider, r.edition): r for r in rep.by_edition}
    assert by[("salesforce", "enterprise")].tenants == 3
    assert by[("salesforce", "enterprise")].sso_tested_share == pytest.approx(1 / 3)
    assert by[("salesforce", "professional")].modes["per_user_password"] == 1
    assert by[("hubspot", "professional")].levels[1] == 1
    assert [(r.slug, r.level, r.to_level, r.step) for r in rep.pipeline] == [("t2", 2, 3, "SSO not tested")]


def test_trend_uses_history_and_adds_today_when_missing():
    yesterday = NOW.date() - timedelta(days=1)
    history = [HistoryPoint(yesterday, 1, 1, (("salesforce", "enterprise"),)),
               HistoryPoint(yesterday, 2, 1, (("hubspot", "professional"),))]
    rep = build_adoption([_t(1, 2), _t(2, 1, accounts=(("hubspot", "professional", "api_user"),))], history, now=NOW)
    overall = {(p.day, p.level): p.tenants for p in rep.trend if p.provider is None}
    assert overall[(yesterday, 1)] == 2 and overall[(NOW.date(), 2)] == 1 and overall[(NOW.date(), 1)] == 1
    assert overall[(yesterday, 4)] == 0  # every level is present every day (a stacked chart needs it)
    hub = {(p.day, p.level): p.tenants for p in rep.trend if p.provider == "hubspot"}
    assert hub == {(yesterday, 1): 1, (NOW.date(), 1): 1}


def test_today_from_history_is_not_counted_twice():
    today: date = NOW.date()
    history = [HistoryPoint(today, 1, 3, (("salesforce", "enterprise"),), sso_tested=True, users_total=4,
                            users_sso=2)]
    rep = build_adoption([_t(1, 3, sso="tested")], history, now=NOW)
    assert sum(p.tenants for p in rep.trend if p.provider is None and p.day == today) == 1
    assert rep.sso_trend == [(today, 1.0, 0.5)]
