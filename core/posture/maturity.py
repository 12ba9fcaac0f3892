"""Maturity levels 0–4: one total order, and the single next step to the next level.

    0  Blocked                 no CRM account can sync
    1  Stored passwords        some account relies on stored per-user passwords
    2  No stored passwords     ...but SSO is not tested
    3  SSO tested              ...but some account writes through an API user without attribution
    4  Fully attributed        no stored passwords, SSO tested, every write attributed to its real actor

The level is the first condition (from 0 up) the tenant meets; so every tenant has exactly one level
and the levels are ordered. The next step is the action of the finding that stands between the tenant
and the next level; ``gating`` lists every such finding (one: the tenant is one step away).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.posture.rules import Finding, Who, evaluate, relies_on_passwords, sync_blockers, unattributed
from core.posture.snapshot import TenantSnapshot

LEVELS: dict[int, tuple[str, str]] = {
    0: ("Blocked", "No CRM account can sync."),
    1: ("Stored passwords", "Some account relies on stored per-user passwords."),
    2: ("No stored passwords", "No stored passwords, but SSO is not tested."),
    3: ("SSO tested", "No stored passwords and SSO tested, but some account writes through an API user "
                      "without attribution."),
    4: ("Fully attributed", "No stored passwords, SSO tested, every write attributed to its real actor."),
}
TOP_LEVEL = 4

# The rules whose findings stand between a level and the next one.
GATING_RULES: dict[int, tuple[str, ...]] = {
    0: ("no_crm_account", "api_not_available", "account_cannot_sync"),
    1: ("per_user_passwords",),
    2: ("sso_missing", "sso_untested", "sso_failing"),
    3: ("api_user_without_attribution",),
}


# Steps a gating finding takes to clear, when more than one: SSO that is not set up needs the IdP
# metadata imported AND a valid test login (one definition: "one step away" means exactly one step).
STEPS_PER_FINDING: dict[str, int] = {"sso_missing": 2}


@dataclass(frozen=True)
class NextStep:
    from_level: int
    to_level: int
    title: str  # the gating finding's headline: never a user's name
    action: str
    who: str
    rule: str
    steps_left: int  # gating findings to clear before the next level (1: one step away)

    def to_dict(self) -> dict[str, Any]:
        return {"from_level": self.from_level, "to_level": self.to_level, "title": self.title,
                "action": self.action, "who": self.who, "rule": self.rule, "steps_left": self.steps_left}


@dataclass(frozen=True)
class Maturity:
    level: int
    name: str
    meaning: str
    next_step: NextStep | None
    gating: tuple[str, ...]  # keys of the findings gating the next level

    @property
    def one_step_away(self) -> bool:
        return self.next_step is not None and self.next_step.steps_left == 1

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "name": self.name, "meaning": self.meaning,
                "next_step": self.next_step.to_dict() if self.next_step else None,
                "gating": list(self.gating), "one_step_away": self.one_step_away}


def level_of(t: TenantSnapshot, *, ignore_blockers: bool = False) -> int:
    """The tenant's level (``ignore_blockers``: the level it would have if every account could sync)."""
    now = t.taken_at
    if not ignore_blockers and not any(not sync_blockers(a, now) for a in t.accounts):
        return 0
    if not t.accounts:
        return 0
    if any(relies_on_passwords(a, now) for a in t.accounts):
        return 1
    if not t.sso.tested:
        return 2
    if any(unattributed(a) for a in t.accounts):
        return 3
    return 4


def assess(t: TenantSnapshot, findings: list[Finding] | None = None) -> Maturity:
    """The level, its meaning and the single next step (from the same findings the tenant sees)."""
    findings = evaluate(t) if findings is None else findings
    level = level_of(t)
    name, meaning = LEVELS[level]
    if level >= TOP_LEVEL:
        return Maturity(level, name, meaning, None, ())
    gating = [f for f in findings if f.rule in GATING_RULES[level]]
    if level == 0:
        # One unblocked account is enough: the step is the first account's blocker, and the steps left
        # are the blockers of the account closest to syncing (an add-on to buy AND a credential to
        # store is two steps, not one).
        to_level = max(level_of(t, ignore_blockers=True), 1)
        gating = gating[:1]
        steps_left = min((max(len(sync_blockers(a, t.taken_at)), 1) for a in t.accounts), default=1)
    else:
        to_level = level + 1
        steps_left = max(sum(STEPS_PER_FINDING.get(f.rule, 1) for f in gating), 1)
    if gating:
        first = gating[0]
        more = f" ({steps_left - 1} more like it)" if steps_left > 1 else ""
        step = NextStep(level, to_level, first.title + more, first.action, first.who, first.rule, steps_left)
    else:  # a gate without its finding would be a bug in the rules; say so rather than invent advice
        step = NextStep(level, to_level, LEVELS[level][1], "Review the findings below.", Who.customer_success,
                        "unknown", 1)
    return Maturity(level, name, meaning, step, tuple(f.key for f in gating))
