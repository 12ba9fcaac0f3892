"""Alert rules and the condition interface the rest of CRM Bridge feeds.

An ``Observation`` says "this condition holds (or no longer holds) for this thing of this tenant":

    Observation(rule="sync_failing", tenant_id=3, subject="sync_job:41", active=True,
                title="Sync failing: ana@acme.example (Salesforce)", summary="3 failed runs in a row …")

``subject`` names the thing (stable across evaluations); ``level`` grades tiered rules (the IdP
certificate's 90/30/7 days, the quota's 80 % or forecast). The engine turns observations into
notices: one "fired" when a condition starts, one "escalated" when its level rises, nothing while it
holds, and one "recovered" when it clears.

The functions below are pure: each turns the facts of one kind into an Observation, with the
thresholds of its rule (defaults here, per-tenant overrides in ``alert_rule_setting``). Which
package's data feeds which function is decided in one place, core.alerts.sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


@dataclass(frozen=True)
class RuleSpec:
    key: str
    title: str
    description: str
    severity: str  # info | warning | critical
    levels: tuple[str, ...] = ()  # tier names, least to most severe
    defaults: dict[str, Any] = field(default_factory=dict)


RULES: dict[str, RuleSpec] = {r.key: r for r in (
    RuleSpec("credentials_destroyed", "Credentials destroyed in bulk",
             "Several stored credentials self-destructed (failed logins, TTL, idle) within a short window: users "
             "must reconnect, and it may mean a password policy or SSO change in the CRM.", "critical",
             defaults={"count": 3, "window_hours": 24}),
    RuleSpec("credentials_expiring", "Credentials expiring in bulk",
             "Several stored credentials will self-destruct within days: ask those users to reconnect early.",
             "warning", defaults={"count": 3, "within_days": 7}),
    RuleSpec("api_user_auth", "API user cannot authenticate",
             "The CRM rejected the API user's credential: sync for the whole CRM account stops until it is fixed.",
             "critical"),
    RuleSpec("sync_failing", "Sync failing",
             "Sync for a user (or an API-user account) failed 3 runs in a row (single transient failures never "
             "count).", "warning"),
    RuleSpec("idp_cert_expiring", "IdP certificate expiring",
             "An identity provider signing certificate expires within 90, 30 or 7 days, or has expired.",
             "warning", levels=("90", "30", "7", "expired")),
    RuleSpec("crm_quota", "CRM API quota",
             "A CRM account used more than 80 % of its API allocation, or is forecast to run out before it resets.",
             "warning", levels=("above", "forecast"), defaults={"percent": 80}),
)}


def rule_title(rule: str) -> str:
    spec = RULES.get(rule)
    return spec.title if spec else rule


def level_rank(rule: str, level: str) -> int:
    spec = RULES.get(rule)
    if spec is None or not level or level not in spec.levels:
        return 0
    return spec.levels.index(level) + 1


def params_for(rule: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = RULES[rule]
    return {**spec.defaults, **{k: v for k, v in (overrides or {}).items() if k in spec.defaults}}


@dataclass(frozen=True)
class Observation:
    rule: str
    tenant_id: int
    subject: str
    active: bool
    title: str = ""
    summary: str = ""
    level: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, str, str]:
        return (self.tenant_id, self.rule, self.subject)


# --- one builder per kind of fact ------------------------------------------------------------------


def destroyed_in_bulk(*, tenant_id: int, destroyed_at: Sequence[datetime], now: datetime,
                      params: dict[str, Any] | None = None) -> Observation:
    p = params_for("credentials_destroyed", params)
    since = now - timedelta(hours=float(p["window_hours"]))
    n = sum(1 for t in destroyed_at if since < t <= now)
    return Observation(
        "credentials_destroyed", tenant_id, "tenant", n >= int(p["count"]),
        title=f"{n} credentials destroyed in the last {p['window_hours']} h",
        summary=(f"{n} stored credentials self-destructed since {since:%Y-%m-%d %H:%M} UTC (threshold "
                 f"{p['count']}). Their users must reconnect: Users & sync → Ask to reconnect."),
        details={"count": n, "threshold": p["count"]})


def expiring_in_bulk(*, tenant_id: int, ends_at: Sequence[datetime], now: datetime,
                     params: dict[str, Any] | None = None) -> Observation:
    p = params_for("credentials_expiring", params)
    horizon = now + timedelta(days=float(p["within_days"]))
    soon = sorted(t for t in ends_at if now < t <= horizon)
    first = f"; the first on {soon[0]:%Y-%m-%d %H:%M} UTC" if soon else ""
    return Observation(
        "credentials_expiring", tenant_id, "tenant", len(soon) >= int(p["count"]),
        title=f"{len(soon)} credentials self-destruct within {p['within_days']} days",
        summary=(f"{len(soon)} stored credentials reach their TTL or idle limit within {p['within_days']} days"
                 f"{first}. Ask those users to reconnect before sync stops (Users & sync)."),
        details={"count": len(soon), "threshold": p["count"]})


def api_user_auth(*, tenant_id: int, crm_account_id: int, label: str, failed: bool,
                  detail: str = "") -> Observation:
    return Observation(
        "api_user_auth", tenant_id, f"crm_account:{crm_account_id}", failed,
        title=f"API user of {label} cannot authenticate" if failed else f"API user of {label} authenticates again",
        summary=(detail or "The CRM rejected the API user's credential; it is held back so the CRM does not lock "
                 "the user out. Fix the API user in the CRM, then store its secret again on the tenant page."),
        details={"crm_account_id": crm_account_id})


def sync_failing(*, tenant_id: int, job_id: int, owner: str, account_label: str, state: str,
                 reason: str = "", last_error: str | None = None, fix: str | None = None) -> Observation:
    """``state`` is core.sync.health's sync state, which already applies the flap damping (failing only
    after 3 failed runs in a row)."""
    parts = [p for p in (reason, last_error, fix) if p]
    return Observation(
        "sync_failing", tenant_id, f"sync_job:{job_id}", state == "failing",
        title=f"Sync failing: {owner} ({account_label})",
        summary=" — ".join(parts)[:1000] or "Sync failed 3 runs in a row.",
        details={"job_id": job_id, "state": state})


def idp_cert(*, tenant_id: int, sha256: str, subject: str, not_after: datetime, now: datetime) -> Observation:
    days = (not_after - now).total_seconds() / 86400
    level = ""
    for limit, name in ((0, "expired"), (7, "7"), (30, "30"), (90, "90")):
        if days <= limit:
            level = name
            break
    when = "has expired" if level == "expired" else f"expires in {max(int(days), 0)} days"
    return Observation(
        "idp_cert_expiring", tenant_id, f"idp_cert:{sha256[:16]}", bool(level), level=level,
        title=f"IdP certificate {when}",
        summary=(f"The identity provider certificate {subject} {when} ({not_after:%Y-%m-%d} UTC). Add the new "
                 "certificate at the IdP, re-import the metadata so both are trusted, then remove the old one."),
        details={"not_after": not_after.isoformat(), "sha256": sha256})


def crm_quota(*, tenant_id: int, crm_account_id: int, label: str, used: int, limit: int, window: str,
              runs_out_before_reset: bool, exhausts_at: datetime | None = None,
              params: dict[str, Any] | None = None) -> Observation:
    p = params_for("crm_quota", params)
    pct = 100.0 * used / limit if limit else 0.0
    level = "forecast" if runs_out_before_reset else ("above" if pct > float(p["percent"]) else "")
    if level == "forecast":
        when = f" at {exhausts_at:%Y-%m-%d %H:%M} UTC" if exhausts_at else ""
        title = f"{label}: API quota forecast to run out{when}"
    else:
        title = f"{label}: API quota at {pct:.0f} %"
    return Observation(
        "crm_quota", tenant_id, f"crm_account:{crm_account_id}", bool(level), level=level, title=title,
        summary=(f"{used:,} of {limit:,} API requests used ({pct:.0f} %, {window}). Lower the sync frequency or "
                 "batch more per call, or buy more API capacity."),
        details={"used": used, "limit": limit, "percent": round(pct, 1)})
