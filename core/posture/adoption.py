"""Adoption figures for sales leadership: pure aggregates over tenant posture, counts only.

Nothing in an ``AdoptionReport`` names a user: tenants appear by name (leadership works with
tenants), users only as counts. The upgrade pipeline shows each step's headline and who acts,
never a finding's evidence or affected users.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from functools import lru_cache
from typing import Any

from core.posture.maturity import LEVELS
from core.posture.snapshot import TenantSnapshot

MODES = ("api_user", "per_user_oauth", "per_user_password")
SSO_STATES = ("tested", "untested", "failing", "missing")


@dataclass(frozen=True)
class TenantPosture:
    """One tenant's figures as adoption needs them (built by the service from a snapshot + assess)."""

    tenant_id: int
    name: str
    slug: str
    level: int
    sso_state: str
    users_total: int
    users_sso: int
    modes: tuple[str, ...]  # credential mode of each CRM account
    editions: tuple[tuple[str, str], ...]  # (provider, edition) of each CRM account
    world: str
    next_title: str | None = None
    next_who: str | None = None
    next_rule: str | None = None
    to_level: int | None = None
    one_step_away: bool = False

    @classmethod
    def from_snapshot(cls, t: TenantSnapshot, *, level: int, world: str, next_title: str | None = None,
                      next_who: str | None = None, next_rule: str | None = None, to_level: int | None = None,
                      one_step_away: bool = False) -> TenantPosture:
        return cls(t.tenant_id, t.name, t.slug, level, t.sso.state, t.users_total, t.users_sso,
                   tuple(a.credential_mode for a in t.accounts),
                   tuple((a.provider, a.edition) for a in t.accounts), world, next_title, next_who, next_rule,
                   to_level, one_step_away)


@dataclass(frozen=True)
class HistoryPoint:
    """One daily posture row (from ``PostureSnapshot``): what trends need."""

    day: date
    tenant_id: int
    level: int
    editions: tuple[tuple[str, str], ...]
    sso_tested: bool = False
    users_total: int = 0
    users_sso: int = 0
    weight: int = 1  # how many tenants this point stands for (history is aggregated in SQL)


@dataclass
class EditionRow:
    provider: str
    edition: str
    tenants: int = 0
    accounts: int = 0
    sso_tested: int = 0
    users_total: int = 0
    users_sso: int = 0
    levels: dict[int, int] = field(default_factory=lambda: dict.fromkeys(LEVELS, 0))
    modes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODES, 0))

    @property
    def sso_tested_share(self) -> float:
        return self.sso_tested / self.tenants if self.tenants else 0.0

    @property
    def users_sso_share(self) -> float:
        return self.users_sso / self.users_total if self.users_total else 0.0


@dataclass(frozen=True)
class PipelineRow:
    tenant: str
    slug: str
    crm: str
    level: int
    to_level: int
    step: str
    who: str
    rule: str


@dataclass(frozen=True)
class TrendPoint:
    day: date
    level: int
    tenants: int
    provider: str | None = None  # None: all providers
    edition: str | None = None


@dataclass(frozen=True)
class Figures:
    """The leadership figures, defined once (issue 16: Overview and Adoption showed different SSO
    shares). Over the tenants not offboarded, each counted once from its current posture:

    - ``sso_tested``: tenants whose SSO has a valid test login (sso_state "tested");
    - ``users_sso``: active users who sign in by SSO, of ``users_total`` active users;
    - ``levels``: tenants at each maturity level (every level present, 0 when none);
    - ``one_step_away``: tenants whose next level is exactly one action away (maturity.STEPS_PER_FINDING).
    """

    tenants: int
    sso_tested: int
    users_total: int
    users_sso: int
    levels: dict[int, int]
    one_step_away: int

    @property
    def sso_tested_share(self) -> float:
        return self.sso_tested / self.tenants if self.tenants else 0.0

    @property
    def users_sso_share(self) -> float:
        return self.users_sso / self.users_total if self.users_total else 0.0

    @classmethod
    def of(cls, current: Iterable[Any]) -> Figures:
        """The figures over each tenant's current posture (anything with ``level``, ``sso_state``,
        ``users_total``, ``users_sso`` and ``one_step_away``: a ``TenantPosture`` or a snapshot row)."""
        tenants = tested = users = users_sso = one_step = 0
        levels = dict.fromkeys(LEVELS, 0)
        for t in current:
            tenants += 1
            tested += t.sso_state == "tested"
            users += t.users_total
            users_sso += t.users_sso
            levels[t.level] = levels.get(t.level, 0) + 1
            one_step += bool(t.one_step_away)
        return cls(tenants, tested, users, users_sso, levels, one_step)


@dataclass(frozen=True)
class TenantRow:
    """One tenant as leadership sees it: aggregate facts only (no user, no finding evidence)."""

    name: str
    slug: str
    crm: str
    level: int
    sso_state: str
    users_total: int
    users_sso: int
    to_level: int | None
    step: str
    who: str
    rule: str
    one_step_away: bool
    editions: tuple[tuple[str, str], ...] = ()  # (provider, edition) slugs, for labels and filters


@dataclass
class AdoptionReport:
    as_of: datetime
    tenants: int
    sso_tested: int
    users_total: int
    users_sso: int
    sso_states: dict[str, int]
    credential_modes: dict[str, int]
    levels: dict[int, int]
    worlds: dict[str, int]
    by_edition: list[EditionRow]
    trend: list[TrendPoint]
    pipeline: list[PipelineRow]
    sso_trend: list[tuple[date, float, float]] = field(default_factory=list)  # day, tenant share, user share
    tenant_rows: list[TenantRow] = field(default_factory=list)

    @property
    def figures(self) -> Figures:
        """The same figures ``Figures.of`` gives for the current posture this report was built from."""
        return Figures(self.tenants, self.sso_tested, self.users_total, self.users_sso, dict(self.levels),
                       len(self.pipeline))

    @property
    def sso_tested_share(self) -> float:
        return self.sso_tested / self.tenants if self.tenants else 0.0

    @property
    def users_sso_share(self) -> float:
        return self.users_sso / self.users_total if self.users_total else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["as_of"] = self.as_of.isoformat()
        d["sso_tested_share"] = self.sso_tested_share
        d["users_sso_share"] = self.users_sso_share
        for p in d["trend"]:
            p["day"] = p["day"].isoformat()
        d["sso_trend"] = [(day.isoformat(), a, b) for day, a, b in self.sso_trend]
        d.pop("tenant_rows", None)
        return d


@lru_cache(maxsize=1024)  # a few distinct CRM mixes across thousands of tenants
def _crm_label(editions: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(sorted({f"{p} {e}" for p, e in editions}))


def build_adoption(current: Sequence[TenantPosture], history: Iterable[HistoryPoint], *, now: datetime
                   ) -> AdoptionReport:
    """Aggregate the current posture of every tenant and the daily history into leadership figures."""
    modes = Counter(m for t in current for m in t.modes)
    sso = Counter(t.sso_state for t in current)
    worlds = Counter(t.world for t in current)
    rows: dict[tuple[str, str], EditionRow] = {}
    for t in current:
        for prov, ed in sorted(set(t.editions)):
            row = rows.setdefault((prov, ed), EditionRow(prov, ed))
            row.tenants += 1
            row.sso_tested += t.sso_state == "tested"
            row.users_total += t.users_total
            row.users_sso += t.users_sso
            row.levels[t.level] += 1
        for (prov, ed), mode in zip(t.editions, t.modes, strict=True):
            rows[(prov, ed)].accounts += 1
            rows[(prov, ed)].modes[mode] = rows[(prov, ed)].modes.get(mode, 0) + 1

    # Trend: daily rows, plus today from the live figures when today has no row yet.
    points = list(history)
    today = now.date()
    if not any(p.day == today for p in points):
        points += [HistoryPoint(today, t.tenant_id, t.level, t.editions, t.sso_state == "tested", t.users_total,
                                t.users_sso) for t in current]
    overall: Counter[tuple[date, int]] = Counter()
    per_edition: Counter[tuple[date, str, str, int]] = Counter()
    sso_days: dict[date, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # tenants, tested, users, users_sso
    for p in points:
        overall[(p.day, p.level)] += p.weight
        for prov, ed in set(p.editions):
            per_edition[(p.day, prov, ed, p.level)] += p.weight
        agg = sso_days[p.day]
        agg[0] += p.weight
        agg[1] += p.sso_tested * p.weight
        agg[2] += p.users_total
        agg[3] += p.users_sso
    days = sorted({p.day for p in points})
    trend = [TrendPoint(d, lvl, overall.get((d, lvl), 0)) for d in days for lvl in LEVELS]
    trend += [TrendPoint(d, lvl, n, prov, ed) for (d, prov, ed, lvl), n in sorted(per_edition.items())]
    sso_trend = [(d, (a[1] / a[0]) if a[0] else 0.0, (a[3] / a[2]) if a[2] else 0.0)
                 for d, a in sorted(sso_days.items())]

    pipeline = sorted(
        (PipelineRow(t.name, t.slug, _crm_label(t.editions), t.level, t.to_level if t.to_level is not None else
                     t.level + 1, t.next_title or "", t.next_who or "", t.next_rule or "")
         for t in current if t.one_step_away),
        key=lambda r: (-r.level, r.tenant),
    )
    figs = Figures.of(current)  # the one definition Overview shows too
    return AdoptionReport(
        as_of=now, tenants=figs.tenants, sso_tested=figs.sso_tested,
        users_total=figs.users_total, users_sso=figs.users_sso,
        sso_states={s: sso.get(s, 0) for s in SSO_STATES}, credential_modes={m: modes.get(m, 0) for m in MODES},
        levels=figs.levels, worlds=dict(worlds),
        by_edition=[rows[k] for k in sorted(rows)], trend=trend, pipeline=pipeline, sso_trend=sso_trend,
        tenant_rows=sorted((TenantRow(t.name, t.slug, _crm_label(t.editions), t.level, t.sso_state, t.users_total,
                                      t.users_sso, t.to_level, t.next_title or "", t.next_who or "",
                                      t.next_rule or "", t.one_step_away, tuple(t.editions)) for t in current),
                           key=lambda r: (r.level, r.name)),
    )
