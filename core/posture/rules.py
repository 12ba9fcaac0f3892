"""Findings: pure functions over a ``TenantSnapshot``.

Every rule reads the catalog facts carried in the snapshot (``AccountSnapshot.facts``) for the vendor's
numbers and cites their source in the evidence; the only constants here are CRM Bridge's own policy
(the 80 % usage threshold, the certificate-warning thresholds, what "many credentials at once" means).

    findings = evaluate(snapshot)          # sorted: blocking first
    world = tenant_world(snapshot)         # the 2013 picture, or today's

A finding says how bad it is (``severity``), what was seen (``evidence``, with the numbers and the
catalog source), what to do (``action``), who does it (``who``: tenant_admin, customer_success, sales)
and what it unlocks. User labels appear only in ``affected`` (tenant views), never in a title, an
action or evidence, so a finding's headline can go anywhere a tenant's name can.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from core.posture.snapshot import (
    AccountSnapshot,
    EditionFacts,
    FactRef,
    RetirementFacts,
    StoredCredential,
    TenantSnapshot,
)


class Severity(StrEnum):
    blocking = "blocking"  # nothing syncs until this is done
    high = "high"
    medium = "medium"
    low = "low"
    info = "info"


SEVERITY_ORDER = {s.value: i for i, s in enumerate(Severity)}


class Who(StrEnum):
    tenant_admin = "tenant_admin"
    customer_success = "customer_success"
    sales = "sales"


# --- CRM Bridge policy (not vendor facts) -------------------------------------------------------
USAGE_WARN_FRACTION = 0.80  # issue 8: "API usage above 80% of the allocation"
USAGE_HIGH_FRACTION = 0.95
CERT_WARN_DAYS = (90, 30, 7)  # issue 6: certificate watch thresholds
EXPIRY_HORIZON_DAYS = 30  # look this far ahead for credentials expiring together
EXPIRY_WINDOW_DAYS = 7  # "at once" = inside one week
EXPIRY_MIN_COUNT = 3  # ...at least this many credentials
EXPIRY_MIN_SHARE = 0.25  # ...and at least this share of the tenant's stored user credentials
RETIREMENT_SOON_DAYS = 365  # a retirement within a year makes stored passwords a high finding


@dataclass(frozen=True)
class Evidence:
    label: str
    value: str
    source: str | None = None
    url: str | None = None

    @classmethod
    def of(cls, label: str, value: str, fact: FactRef | RetirementFacts | None) -> Evidence:
        if fact is None:
            return cls(label, value)
        return cls(label, value, fact.cite(), fact.url)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "value": self.value, "source": self.source, "url": self.url}


@dataclass(frozen=True)
class ActionTarget:
    """Where a finding's action is carried out: a console page (its URL path), the key (or, for a link
    button, the label) of the control on it, and the CRM account whose panel holds the control."""

    page: str  # "tenant" | "sso" | "users_sync"
    control: str
    label: str  # the link's text: "Set the attribution field"
    account_id: int | None = None

    def href(self, slug: str | None = None) -> str:
        """``/tenant?tenant=acme&account=7#crm_edit_7_attribution_field``: the tenant in focus (ux16a's
        ``?tenant=slug``), the account whose panel opens, and the control as the anchor."""
        params = [f"tenant={quote(slug)}"] if slug else []
        if self.account_id is not None:
            params.append(f"account={self.account_id}")
        return f"/{self.page}" + (f"?{'&'.join(params)}" if params else "") + f"#{self.control}"

    def to_dict(self) -> dict[str, Any]:
        return {"page": self.page, "control": self.control, "label": self.label, "account_id": self.account_id}


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    title: str
    evidence: tuple[Evidence, ...]
    action: str
    who: str
    unlocks: str
    account_id: int | None = None
    account_label: str | None = None
    world: str | None = None
    affected: tuple[str, ...] = field(default=())  # user labels: tenant views only
    target: ActionTarget | None = None  # the page and control that carry the action out (set by evaluate)

    @property
    def key(self) -> str:
        return f"{self.rule}:{self.account_id}" if self.account_id is not None else self.rule

    @property
    def rank(self) -> int:
        return SEVERITY_ORDER.get(self.severity, len(SEVERITY_ORDER))

    def to_dict(self, *, include_affected: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "rule": self.rule,
            "key": self.key,
            "severity": self.severity,
            "title": self.title,
            "account": self.account_label,
            "world": self.world,
            "evidence": [e.to_dict() for e in self.evidence],
            "action": self.action,
            "who": self.who,
            "unlocks": self.unlocks,
            "target": self.target.to_dict() if self.target else None,
        }
        if include_affected:
            d["affected"] = list(self.affected)
        return d


# --- small helpers ------------------------------------------------------------------------------


def _days_until(when: date | datetime, now: datetime) -> int:
    if isinstance(when, datetime):
        return math.floor((when - now).total_seconds() / 86400)
    return (when - now.date()).days


def _n(value: int | float) -> str:
    return f"{value:,.0f}" if isinstance(value, float) else f"{value:,}"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def _when(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d %H:%M UTC")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def free_api_user_licenses(facts: EditionFacts) -> FactRef | None:
    """The fact saying how many free API-only users the edition has (Salesforce Integration user
    licenses), or a provider extra saying API users need no paid license (Dynamics application users)."""
    iul = facts.fact("integration_user_licenses")
    if iul is not None and isinstance(iul.value, int) and iul.value > 0:
        return iul
    for name in ("application_users", "free_application_users", "free_api_user"):
        extra = facts.fact(name)
        if extra is not None and extra.value:
            return extra
    return iul


def _free_api_users_text(fact: FactRef | None) -> str:
    if fact is None:
        return "unknown (not in the catalog)"
    if isinstance(fact.value, bool):
        return "yes, no paid license needed" if fact.value else "none"
    if isinstance(fact.value, int):
        return _n(fact.value) if fact.value else "none"
    return str(fact.value)


def _has_free_api_users(fact: FactRef | None) -> bool:
    return fact is not None and bool(fact.value) and (not isinstance(fact.value, int) or fact.value > 0)


def _allocation(facts: EditionFacts, licenses: int | None) -> tuple[str, int | None]:
    """The catalog's daily allocation formula as text, and its value for ``licenses`` when known."""
    f = facts.fact("daily_api_allocation")
    if f is None or not isinstance(f.value, dict):
        return "not in the catalog", None
    base = int(f.value.get("base", 0))
    per = int(f.value.get("per_license", 0))
    window = str(f.value.get("window", ""))
    text = f"{_n(base)} + {_n(per)} per license" + (f" ({window})" if window else "")
    if licenses is None:
        return text, None
    value = base + per * max(licenses, 0)
    return f"{text} = {_n(value)} for {_plural(licenses, 'license')}", value


# --- which world ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """The 2013 picture (no API without buying it, no free API-only user: stored passwords were the
    fallback) or today's (API included, free API-only users where the edition has them, SAML
    everywhere). ``key``: "2013", "today", "mixed" or "unknown"."""

    key: str
    title: str
    explanation: str
    evidence: tuple[Evidence, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "explanation": self.explanation,
                "evidence": [e.to_dict() for e in self.evidence]}


def account_world(a: AccountSnapshot) -> World:
    """Which world one account's edition puts it in, from the catalog (explanation without the label)."""
    f = a.facts
    api = f.fact("api_access")
    if not f.known or api is None:
        return World("unknown", "World unknown",
                     f"The catalog has no API-access fact for {f.label}, so advice cannot say which world "
                     f"it is in: add the edition's facts to the provider catalog.")
    free = free_api_user_licenses(f)
    has_free = _has_free_api_users(free)
    sso = f.fact("saml_sso")
    retirement = f.retirement_for("password")
    ev = [Evidence.of(f"API access in {f.label}", str(api.value).replace("_", "-"), api),
          Evidence.of(f"Free API-only users in {f.label}", _free_api_users_text(free), free)]
    if sso is not None:
        ev.append(Evidence.of(f"SAML SSO in {f.label}", "yes" if sso.value else "no", sso))
    if api.value != "included":
        no_api = "no API without the paid add-on" if api.value == "add_on" else "no API at all"
        users = ("no free Integration user licenses, so an API user costs a full license" if not has_free
                 else f"{_free_api_users_text(free)} free API-only users")
        changed = []
        if sso is not None and sso.value:
            changed.append("SAML single sign-on now works in this edition")
        if retirement is not None:
            changed.append(f"stored passwords have a fixed end ({retirement.what} retires {retirement.when})")
        tail = ("; what changed since: " + " and ".join(changed)) if changed else ""
        return World(
            "2013", "The 2013 world",
            f"{f.label}: {no_api} and {users} — the situation that made small companies store per-user "
            f"passwords in 2013{tail}.",
            tuple(ev),
        )
    parts = [f"{f.label} includes the API"]
    if has_free and free is not None:
        if isinstance(free.value, int) and not isinstance(free.value, bool):
            parts.append(f"{_n(free.value)} free API-only Integration user licenses")
        else:
            parts.append("API users that need no paid license")
    if sso is not None and sso.value:
        parts.append("SAML single sign-on")
    listed = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    return World("today", "Today's world", f"{listed}, so nobody's password needs to be stored.", tuple(ev))


def tenant_world(t: TenantSnapshot) -> World:
    """The tenant's world: 2013 when every account is, today when every account is, else mixed."""
    if not t.accounts:
        return World("unknown", "World unknown", "No CRM account yet: add one to see which world this tenant is in.")
    by_text: dict[str, list[str]] = {}
    worlds = []
    evidence: list[Evidence] = []
    for a in t.accounts:
        w = account_world(a)
        worlds.append(w)
        by_text.setdefault(w.explanation, []).append(a.label)
        evidence += [e for e in w.evidence if e not in evidence]
    explanation = " ".join(f"{', '.join(labels)}: {text}" for text, labels in by_text.items())
    keys = {w.key for w in worlds}
    if keys == {"2013"}:
        return World("2013", "The 2013 world", explanation, tuple(evidence))
    if keys == {"today"}:
        return World("today", "Today's world", explanation, tuple(evidence))
    if "2013" in keys:
        return World("mixed", "Partly in the 2013 world", explanation, tuple(evidence))
    return World("unknown", "World unknown", explanation, tuple(evidence))


def _world_clause(a: AccountSnapshot) -> str:
    """One sentence for an action: which world the account is in, from the same catalog facts."""
    w = account_world(a)
    f = a.facts
    free = free_api_user_licenses(f)
    if w.key == "2013":
        api = "no API without the paid add-on" if f.value("api_access") == "add_on" else "no API"
        users = "no free Integration user licenses" if not _has_free_api_users(free) else "few free API-only users"
        return f"This account is in the 2013 world ({f.label}: {api}, {users})."
    if w.key == "today":
        users = " and free API-only users" if _has_free_api_users(free) else ""
        return f"This account is in today's world ({f.label} includes the API{users})."
    return ""


# --- sync ability (shared with maturity) ---------------------------------------------------------


@dataclass(frozen=True)
class Blocker:
    # no_api | api_add_on | api_refused | no_api_credential | api_credential_failed | no_user_credentials | sync
    code: str
    detail: str


def sync_blockers(a: AccountSnapshot, now: datetime) -> list[Blocker]:
    """Why this account cannot sync now (empty: it can)."""
    out: list[Blocker] = []
    api = a.facts.value("api_access")
    if api == "none":
        out.append(Blocker("no_api", f"{a.facts.label} has no API access"))
    elif a.api_enabled is False and api != "add_on":
        out.append(Blocker("api_refused", "the CRM refused API access"
                           + (f" ({a.last_error_code})" if a.last_error_code else "")))
    elif api == "add_on" and a.api_enabled is not True:
        out.append(Blocker("api_add_on", f"{a.facts.label} needs the API add-on"))
    if a.credential_mode == "api_user":
        if not a.api_credentials(now):
            failed = [c for c in a.credentials if not c.per_user and c.state == "failed"]
            if failed:
                out.append(Blocker("api_credential_failed", "the CRM rejected the API user's credential"))
            else:
                out.append(Blocker("no_api_credential", "no API user credential is stored"))
    elif not a.user_credentials(now):
        out.append(Blocker("no_user_credentials", "no user has connected their CRM login"))
    if a.sync.can_sync is False:
        out.append(Blocker("sync", a.sync.reason or "sync health reports it failing"))
    return out


def relies_on_passwords(a: AccountSnapshot, now: datetime) -> bool:
    return a.credential_mode == "per_user_password" or bool(a.stored_passwords(now))


def unattributed(a: AccountSnapshot) -> bool:
    return a.credential_mode == "api_user" and not a.attribution.enabled


# --- the rules -----------------------------------------------------------------------------------

Rule = Callable[[TenantSnapshot], list[Finding]]


def rule_no_crm_account(t: TenantSnapshot) -> list[Finding]:
    if t.accounts:
        return []
    return [Finding(
        "no_crm_account", Severity.blocking, "No CRM account yet",
        (Evidence("CRM accounts", "0"),),
        "Add the tenant's CRM account from the catalog form and pass its connection test.",
        Who.customer_success, "Sync at all (leaves level 0).",
    )]


def rule_api_not_available(t: TenantSnapshot) -> list[Finding]:
    """Salesforce Professional without the API add-on (and editions with no API at all): blocking."""
    out = []
    for a in t.accounts:
        f = a.facts
        api = f.fact("api_access")
        if api is None or api.value == "included" or (api.value == "add_on" and a.api_enabled is True):
            continue
        iul = f.fact("integration_user_licenses")
        ev = [Evidence.of(f"API access in {f.label}",
                          "paid add-on only" if api.value == "add_on" else "none", api)]
        if a.last_error_code:
            ev.append(Evidence(f"{a.label}: last connection test",
                               f"{a.last_error_code}" + (f" on {_when(a.last_test_at)}" if a.last_test_at else "")))
        elif a.api_enabled is False:
            ev.append(Evidence(f"{a.label}: API access", "refused by the CRM"))
        else:
            ev.append(Evidence(f"{a.label}: API add-on", "not confirmed: no passing connection test yet"))
        if iul is not None:
            ev.append(Evidence.of(f"Integration user licenses in {f.label}", _n(int(iul.value)), iul))
        upgrade = _upgrade_text(a)
        if api.value == "add_on":
            title = f"{a.label}: {f.edition_name or f.edition} without the API add-on"
            action = (f"Buy the {f.provider_name or f.provider} API add-on for this org, or {upgrade}. "
                      f"Until then every API call fails (API_DISABLED_FOR_ORG) and nothing syncs.")
        else:
            title = f"{a.label}: {f.edition_name or f.edition} has no API"
            action = f"{upgrade[:1].upper()}{upgrade[1:]}: {f.label} offers no API access at all, so nothing can sync."
        out.append(Finding(
            "api_not_available", Severity.blocking, title, tuple(ev),
            f"{action} {_world_clause(a)}".strip(), Who.sales,
            "Sync at all (leaves level 0); an upgraded edition also brings free Integration users, so no "
            "password needs to be stored.",
            a.id, a.label, account_world(a).key,
        ))
    return out


def _upgrade_text(a: AccountSnapshot) -> str:
    """'upgrade to Enterprise (API included, 5 free Integration user licenses)' from catalog facts."""
    up = a.facts.upgrade
    if up is None:
        return "upgrade to an edition that includes the API"
    bits = []
    if up.value("api_access") == "included":
        bits.append("API included")
    free = free_api_user_licenses(up)
    if _has_free_api_users(free) and free is not None and isinstance(free.value, int):
        bits.append(f"{_n(free.value)} free Integration user licenses")
    return f"upgrade to {up.edition_name or up.edition}" + (f" ({', '.join(bits)})" if bits else "")


def rule_cannot_sync(t: TenantSnapshot) -> list[Finding]:
    """An account whose API is available but which cannot sync (no credential, rejected, failing)."""
    out = []
    for a in t.accounts:
        blockers = sync_blockers(a, t.taken_at)
        if not blockers or any(b.code in ("no_api", "api_add_on") for b in blockers):
            continue  # no blocker, or one rule_api_not_available reports
        b = blockers[0]
        if b.code == "api_refused":
            action, who = ("Give the integration's CRM user the \"API Enabled\" permission (or fix what the "
                           "connection test names) and run the connection test again.", Who.tenant_admin)
        elif b.code == "no_api_credential":
            action, who = ("Store the API user's credential on the tenant page and run the connection test.",
                           Who.customer_success)
        elif b.code == "api_credential_failed":
            action, who = ("Rotate the API user's secret in the CRM, store the new one and run the connection "
                           "test.", Who.tenant_admin)
        elif b.code == "no_user_credentials":
            action, who = ("Send each user a connect link so they connect their CRM login.", Who.tenant_admin)
        else:
            action, who = (f"Open Users & sync for {a.label}: {b.detail}.", Who.customer_success)
        out.append(Finding(
            "account_cannot_sync", Severity.blocking, f"{a.label}: cannot sync",
            tuple(Evidence(a.label, x.detail) for x in blockers), action, who,
            "Sync for this account (leaves level 0 when no other account syncs).",
            a.id, a.label, account_world(a).key,
        ))
    return out


def rule_per_user_passwords(t: TenantSnapshot) -> list[Finding]:
    """Stored per-user passwords (Salesforce SOAP login): retiring, and broken by every password change."""
    out = []
    now = t.taken_at
    for a in t.accounts:
        if not relies_on_passwords(a, now):
            continue
        f = a.facts
        stored = a.stored_passwords(now)
        retirement = f.retirement_for(a.auth_mode or "password")
        ev = [Evidence(f"{a.label}: stored user passwords", _n(len(stored))),
              Evidence(f"{a.label}: credential mode", a.credential_mode.replace("_", " "))]
        severity = Severity.medium
        if retirement is not None and retirement.date is not None:
            days = _days_until(retirement.date, now)
            ev.append(Evidence.of(f"{retirement.what} retires",
                                  f"{retirement.when} ({retirement.date.isoformat()}, "
                                  f"{'passed' if days < 0 else f'in {days} days'})", retirement))
            if days <= RETIREMENT_SOON_DAYS:
                severity = Severity.high
        else:
            ev.append(Evidence("Retirement", "the catalog has no retirement date for this login method"))
        options = []
        methods = f.value("login_methods") or [m.mode for m in f.auth_modes]
        if "oauth_authorization_code" in methods:
            options.append("per-user OAuth (each user connects once through the web-server flow with PKCE; "
                           "we keep only a refresh token)")
        free = free_api_user_licenses(f)
        api_mode = "oauth_client_credentials" in methods or "jwt_bearer" in methods
        if api_mode and _has_free_api_users(free) and free is not None:
            ev.append(Evidence.of(f"Free API-only users in {f.label}", _free_api_users_text(free), free))
            counted = isinstance(free.value, int) and not isinstance(free.value, bool)  # licenses the catalog counts
            options.append(f"an API user on a free {f.provider_name} Integration user license (OAuth client "
                           "credentials)" if counted else "an API user that needs no paid license")
        elif api_mode:
            if free is not None:
                ev.append(Evidence.of(f"Free API-only users in {f.label}", _free_api_users_text(free), free))
            options.append(f"an API user on a full license ({f.label} has no free Integration user licenses)")
        if not options:
            options.append("a login method the catalog lists for this edition")
        out.append(Finding(
            "per_user_passwords", severity,
            f"{a.label}: stored per-user passwords" + (f" (their login method retires {retirement.when})"
                                                       if retirement else ""),
            tuple(ev),
            f"Move to {' or '.join(options)}. Stored passwords break on every password change (the security "
            f"token resets) and stop working when the login method retires. {_world_clause(a)}".strip(),
            Who.tenant_admin,
            "No stored passwords (level 2): nothing breaks on a password change, nothing to hold for users.",
            a.id, a.label, account_world(a).key,
            tuple(sorted({c.user_label for c in stored if c.user_label})),
        ))
    return out


def rule_no_spare_license(t: TenantSnapshot) -> list[Finding]:
    """No spare CRM license for an API user: use a free Integration user license, else buy one more."""
    out = []
    now = t.taken_at
    for a in t.accounts:
        lic = a.licenses
        if not a.per_user or lic is None or lic.spare > 0:
            continue
        f = a.facts
        catalog_free = f.fact("integration_user_licenses")
        ev = [Evidence(f"{a.label}: licenses", f"{_n(lic.used)} of {_n(lic.total)} used, {_n(max(lic.spare, 0))} spare"
                       + (f" (read {_when(lic.observed_at)})" if lic.observed_at else ""))]
        if catalog_free is not None:
            ev.append(Evidence.of(f"Integration user licenses in {f.label}", _n(int(catalog_free.value)), catalog_free))
        spare_integration = lic.integration_spare
        if spare_integration is not None:
            ev.append(Evidence(f"{a.label}: Integration user licenses",
                               f"{_n(lic.integration_used or 0)} of {_n(lic.integration_total or 0)} used"))
        elif catalog_free is not None and catalog_free.value:
            spare_integration = int(catalog_free.value)  # not read from the org yet: the catalog's count
        # What core.vault destroys when an account leaves per-user passwords (destroy_for_mode_change).
        creds = a.stored_passwords(now)
        affected = tuple(sorted({c.user_label for c in creds if c.user_label}))
        ev.append(Evidence(f"{a.label}: stored passwords the switch destroys", _n(len(creds))))
        destroy = (f" Switching the account to an API user destroys the {_plural(len(creds), 'stored password')}"
                   f" listed (their users are no longer asked for their CRM login)." if creds else "")
        if spare_integration and spare_integration > 0:
            action = (f"Use a free Salesforce Integration user license ({_n(spare_integration)} free) for an API-only "
                      f"user (profile \"Minimum Access – API Only Integrations\") connected with OAuth client "
                      f"credentials, instead of one more full license.{destroy}")
            who = Who.tenant_admin
        else:
            why = (f" {f.label} has no Integration user licenses." if catalog_free is not None
                   and not catalog_free.value else " No Integration user license is free.")
            action = f"Buy one more {f.provider_name or f.provider} license for a dedicated API user.{why}{destroy}"
            who = Who.sales
        out.append(Finding(
            "no_spare_license", Severity.medium, f"{a.label}: no spare license for an API user", tuple(ev),
            f"{action} {_world_clause(a)}".strip(), who,
            "An API user: no per-user credentials to hold or renew (level 2 once no password is stored).",
            a.id, a.label, account_world(a).key, affected,
        ))
    return out


def is_hubspot_private_app(a: AccountSnapshot) -> bool:
    """A legacy private-app token: catalog mode ``api_token`` with ``token_kind: private_app`` (or the
    provider module's own ``private_app`` mode name), or an API-user auth mode the catalog marks retiring.
    Decided by the catalog's data, whichever CRM the account is on."""
    mode = a.facts.auth_mode(a.auth_mode)
    return (a.auth_mode == "private_app" or (a.auth_mode == "api_token" and a.token_kind == "private_app")
            or (mode is not None and mode.status == "retiring" and mode.credential_mode == "api_user"))


def _private_app_retirement(facts: EditionFacts) -> RetirementFacts | None:
    """The catalog's private-app retirement: linked to the mode, or (the catalog lists it unlinked, as
    ``api_token`` also serves service keys) the provider retirement about private apps."""
    linked = facts.retirement_for("private_app") or facts.retirement_for("api_token")
    return linked or next((r for r in facts.retirements if "private app" in r.what.lower()), None)


def rule_hubspot_private_app(t: TenantSnapshot) -> list[Finding]:
    out = []
    for a in t.accounts:
        if not is_hubspot_private_app(a):
            continue
        retirement = _private_app_retirement(a.facts)
        ev = [Evidence(f"{a.label}: auth mode", "legacy private-app token")]
        if retirement is not None:
            ev.append(Evidence.of(retirement.what, f"{retirement.when}"
                                  + (f" ({retirement.date.isoformat()})" if retirement.date else ""), retirement))
        else:
            crm = a.facts.provider_name or a.provider
            ev.append(Evidence("Retirement", f"the catalog has no retirement fact for {crm} private apps"))
        out.append(Finding(
            "hubspot_private_app", Severity.medium,
            f"{a.label}: legacy {a.facts.provider_name or a.provider} private-app token", tuple(ev),
            "Connect the portal through the OAuth app install (tokens refresh and expire on their own), or a "
            "service key. Legacy private apps can no longer be created, so a lost or rotated token cannot be "
            "replaced by a new private app.",
            Who.tenant_admin, "A supported connection that can be re-created and rotated without a super admin.",
            a.id, a.label, account_world(a).key,
        ))
    return out


def rule_api_user_without_attribution(t: TenantSnapshot) -> list[Finding]:
    out = []
    for a in t.accounts:
        if not unattributed(a):
            continue
        f = a.facts
        attr = f.fact("attribution")
        can = attr.value if attr is not None and isinstance(attr.value, dict) else {}
        ev = [Evidence(f"{a.label}: writes through the API user", "the CRM shows the API user, not the real actor"),
              Evidence.of(f"Attribution in {f.label}",
                          f"impersonation: {'yes' if can.get('impersonation') else 'no'}, "
                          f"attribution field: {'yes' if can.get('attribution_field') else 'no'}"
                          if attr is not None else "not in the catalog", attr)]
        if can.get("impersonation"):
            action = ("Turn on impersonation for the account (CallerObjectId) and give the application user the "
                      "Delegate role, so createdby/modifiedby name the real user.")
        elif can.get("attribution_field") and f.attribution_field_title:
            example = f" (for example {f.attribution_field_example})" if f.attribution_field_example else ""
            action = (f"Create the custom single-line text field the account's \"{f.attribution_field_title}\" "
                      f"names{example} and set it there, so every write names its real actor.")
        elif can.get("attribution_field"):
            action = ("Create a custom text field on Opportunity (for example CrmBridge_Actor__c) and set it as the "
                      "account's attribution field, so every write names its real actor.")
        elif attr is None:
            action = (f"The catalog has no attribution facts for {f.label}: add them (impersonation, attribution "
                      f"field) so posture can advise. Meanwhile the audit log keeps each write's real actor.")
        else:
            action = (f"{f.label} offers no way to name the real actor on a record (catalog); the audit log keeps "
                      f"it. To attribute writes in the CRM itself, move to per-user OAuth.")
        out.append(Finding(
            "api_user_without_attribution", Severity.medium, f"{a.label}: API-user writes not attributed",
            tuple(ev), action, Who.tenant_admin, "Every write attributed to its real actor (level 4).",
            a.id, a.label, account_world(a).key,
        ))
    return out


def _sso_evidence(t: TenantSnapshot) -> list[Evidence]:
    ev = [Evidence("Users signing in by SSO", f"{_n(t.users_sso)} of {_n(t.users_total)}")]
    seen = set()
    for a in t.accounts:
        sso = a.facts.fact("saml_sso")
        if sso is None or a.facts.label in seen:
            continue
        seen.add(a.facts.label)
        ev.append(Evidence.of(f"SAML SSO into {a.facts.label} itself", "yes" if sso.value else "no", sso))
    return ev


def rule_sso(t: TenantSnapshot) -> list[Finding]:
    s = t.sso
    state = s.state
    if state == "tested":
        return []
    ev = _sso_evidence(t)
    unlocks = "One login for every user (no second password), SSO-gated connect links; level 3 once no " \
              "password is stored."
    if state == "missing":
        return [Finding("sso_missing", Severity.medium, "SSO not set up", tuple(ev),
                        "Import the tenant's IdP metadata (upload or URL) on the SSO page, then run a test login.",
                        Who.customer_success, unlocks)]
    if state == "failing":
        ev.append(Evidence("Last SSO test", "failed" + (f" (last passed {_when(s.tested_at)})" if s.tested_at else "")))
        return [Finding("sso_failing", Severity.high, "SSO test login failing", tuple(ev),
                        "Read the last test's trace on the SSO page, fix the IdP side or re-import the metadata, "
                        "and test again.", Who.tenant_admin, unlocks)]
    ev.append(Evidence("SSO", "metadata imported, no valid test response yet"))
    return [Finding("sso_untested", Severity.medium, "SSO not tested", tuple(ev),
                    "Run a test login from the SSO page: SSO counts only after a valid response.",
                    Who.tenant_admin, unlocks)]


def rule_idp_cert_expiring(t: TenantSnapshot) -> list[Finding]:
    if not t.sso.configured:
        return []
    now = t.taken_at
    signing = [c for c in t.sso.certs if c.signs]
    out = []
    for c in signing:
        days = _days_until(c.not_after, now)
        if days > CERT_WARN_DAYS[0]:
            continue
        successor = [o for o in signing if o is not c and _days_until(o.not_after, now) > CERT_WARN_DAYS[0]
                     and (o.not_before is None or o.not_before <= now)]
        if successor:
            severity = Severity.low
        elif days < 0 or days <= CERT_WARN_DAYS[2]:
            severity = Severity.high
        elif days <= CERT_WARN_DAYS[1]:
            severity = Severity.medium
        else:
            severity = Severity.low
        ev = [Evidence("IdP signing certificate", f"{c.subject or c.sha256[:16]} (sha256 {c.sha256[:16]}…)"),
              Evidence("Expires", f"{_when(c.not_after)} ({'expired' if days < 0 else f'in {days} days'})")]
        if successor:
            ev.append(Evidence("Rollover",
                               f"a newer signing certificate is trusted until {_when(successor[0].not_after)}"))
        out.append(Finding(
            "idp_cert_expiring", severity,
            "IdP signing certificate expired" if days < 0 else f"IdP signing certificate expires in {days} days",
            tuple(ev),
            "Ask the IdP admin for the next signing certificate and re-import the metadata (old and new are both "
            "trusted during a rollover), then run a test login." if not successor else
            "Re-import the metadata once the IdP has rolled over, so the old certificate is dropped.",
            Who.tenant_admin, "SSO that keeps working past the certificate's end date.",
        ))
    return out


def rule_api_usage(t: TenantSnapshot) -> list[Finding]:
    out = []
    for a in t.accounts:
        u = a.api_usage
        if u is None or u.limit <= 0:
            continue
        forecast = u.runs_out_before_reset
        if not forecast and u.fraction <= USAGE_WARN_FRACTION:
            continue
        formula, expected = _allocation(a.facts, a.licenses.total if a.licenses else None)
        ev = [Evidence(f"{a.label}: API requests", f"{_n(u.used)} of {_n(u.limit)} ({_pct(u.fraction)}, {u.window}, "
                                                  f"read {_when(u.observed_at)})"),
              Evidence.of(f"Daily allocation in {a.facts.label}", formula, a.facts.fact("daily_api_allocation"))]
        if expected is not None and expected != u.limit:
            ev.append(Evidence(f"{a.label}: reported limit", f"{_n(u.limit)} differs from the formula's "
                                                             f"{_n(expected)} (add-ons or other license types)"))
        if u.rate_per_hour:
            ev.append(Evidence(f"{a.label}: recent rate", f"{_n(round(u.rate_per_hour))} requests per hour"))
        if forecast and u.exhausts_at is not None:
            ev.append(Evidence("Forecast", f"runs out {_when(u.exhausts_at)}"
                               + (f", before the allocation resets {_when(u.resets_at)}" if u.resets_at else "")))
            severity, rule = Severity.high, "api_usage_forecast"
            title = f"{a.label}: API allocation forecast to run out before it resets"
        else:
            severity = Severity.high if u.fraction >= USAGE_HIGH_FRACTION else Severity.medium
            rule = "api_usage_high"
            title = f"{a.label}: API usage at {_pct(u.fraction)} of the allocation"
        out.append(Finding(
            rule, severity, title, tuple(ev),
            "Lower this account's sync frequency or batch more per call (customer success), or buy more API "
            "capacity (the allocation grows with licenses and purchased add-ons).",
            Who.customer_success,
            "Sync that keeps running until the window resets (no REQUEST_LIMIT_EXCEEDED / 429 mid-day).",
            a.id, a.label, account_world(a).key,
        ))
    return out


def _densest_window(creds: list[StoredCredential], width: timedelta) -> list[StoredCredential]:
    """The largest set of credentials whose expiry falls inside one window of ``width``."""
    ordered = sorted(creds, key=lambda c: c.expires_at)  # type: ignore[arg-type, return-value]
    best: list[StoredCredential] = []
    j = 0
    for i in range(len(ordered)):
        while ordered[i].expires_at - ordered[j].expires_at > width:  # type: ignore[operator]
            j += 1
        if i - j + 1 > len(best):
            best = ordered[j:i + 1]
    return best


def rule_credentials_expiring_together(t: TenantSnapshot) -> list[Finding]:
    now = t.taken_at
    creds = [c for a in t.accounts for c in a.user_credentials(now)]
    soon = [c for c in creds if c.expires_at is not None and c.expires_at <= now + timedelta(days=EXPIRY_HORIZON_DAYS)]
    if not soon:
        return []
    cluster = _densest_window(soon, timedelta(days=EXPIRY_WINDOW_DAYS))
    threshold = max(EXPIRY_MIN_COUNT, math.ceil(EXPIRY_MIN_SHARE * len(creds)))
    if len(cluster) < threshold:
        return []
    first, last = cluster[0].expires_at, cluster[-1].expires_at
    assert first is not None and last is not None
    days = _days_until(first, now)
    ev = (Evidence("Expiring together", f"{len(cluster)} of {len(creds)} stored user credentials"),
          Evidence("Between", f"{_when(first)} and {_when(last)} (first in {max(days, 0)} days)"),
          Evidence("Kinds", ", ".join(sorted({c.kind.replace('_', ' ') for c in cluster}))))
    return [Finding(
        "credentials_expiring_together", Severity.high if days <= EXPIRY_WINDOW_DAYS else Severity.medium,
        f"{len(cluster)} stored credentials expire within {EXPIRY_WINDOW_DAYS} days of each other", ev,
        "These users will all be asked to reconnect in the same week: send some of them a connect link now to "
        "spread the renewals, or stop holding per-user credentials (an API user, see the other findings).",
        Who.tenant_admin, "Renewals spread out, so sync does not stall for many users at once.",
        affected=tuple(sorted({c.user_label for c in cluster if c.user_label})),
    )]


RULES: tuple[Rule, ...] = (
    rule_no_crm_account,
    rule_api_not_available,
    rule_cannot_sync,
    rule_per_user_passwords,
    rule_no_spare_license,
    rule_hubspot_private_app,
    rule_api_user_without_attribution,
    rule_sso,
    rule_idp_cert_expiring,
    rule_api_usage,
    rule_credentials_expiring_together,
)


# Keys of the controls that carry actions out (pages/_crm_accounts.py, pages/_credentials.py, pages/sso.py
# and pages/users_sync.py create them with these keys; tests/pages/test_action_targets.py checks each one).
def crm_edit_key(account_id: int, field_name: str) -> str:
    return f"crm_edit_{account_id}_{field_name}"


def crm_mode_key(account_id: int) -> str:
    return f"crm_mode_{account_id}"


def crm_test_key(account_id: int) -> str:
    return f"crm_test_{account_id}"


def crm_add_key(tenant_id: int) -> str:
    return f"crm_add_provider_{tenant_id}"


SSO_METADATA_URL = "sso_url"  # pages/sso.py: the IdP metadata URL input
SSO_TEST_LOGIN = "Start a test login"  # pages/sso.py: the test-login link button (by its label)


def action_target(f: Finding, t: TenantSnapshot) -> ActionTarget | None:
    """The page and control that carry out ``f``'s action, for every rule (a test checks each)."""
    acc = next((a for a in t.accounts if a.id == f.account_id), None) if f.account_id is not None else None
    aid = acc.id if acc is not None else None
    if f.rule == "no_crm_account":
        return ActionTarget("tenant", crm_add_key(t.tenant_id), "Add a CRM account")
    if acc is None or aid is None:
        if f.rule in ("sso_missing", "idp_cert_expiring"):
            return ActionTarget("sso", SSO_METADATA_URL, "Import the IdP metadata")
        if f.rule in ("sso_untested", "sso_failing"):
            return ActionTarget("sso", SSO_TEST_LOGIN, "Run a test login")
        if f.rule == "credentials_expiring_together":
            return ActionTarget("tenant", f"vault_link_{t.tenant_id}", "Create connect links")
        return None
    if f.rule == "api_not_available":
        return ActionTarget("tenant", crm_edit_key(aid, "edition"), "Set the edition after the upgrade", aid)
    if f.rule == "account_cannot_sync":
        codes = [b.code for b in sync_blockers(acc, t.taken_at)]
        if "no_user_credentials" in codes:
            return ActionTarget("tenant", f"vault_link_{t.tenant_id}", "Create connect links", aid)
        if "sync" in codes and not {"api_refused", "no_api_credential", "api_credential_failed"} & set(codes):
            return ActionTarget("users_sync", "sync_account_filter", "Open this account's sync", aid)
        return ActionTarget("tenant", crm_test_key(aid), "Test the connection", aid)
    if f.rule in ("per_user_passwords", "no_spare_license"):
        return ActionTarget("tenant", crm_mode_key(aid), "Change how CRM Bridge signs in", aid)
    if f.rule == "hubspot_private_app":
        return ActionTarget("tenant", crm_test_key(aid), "Replace the credentials and test", aid)
    if f.rule == "api_user_without_attribution":
        attr = acc.facts.fact("attribution")
        can = attr.value if attr is not None and isinstance(attr.value, dict) else {}
        if can.get("impersonation") and acc.provider == "dynamics-365":
            return ActionTarget("tenant", crm_edit_key(aid, "impersonation"), "Turn on impersonation", aid)
        if can.get("attribution_field"):
            return ActionTarget("tenant", crm_edit_key(aid, "attribution_field"), "Set the attribution field", aid)
        return ActionTarget("tenant", crm_mode_key(aid), "Change how CRM Bridge signs in", aid)
    if f.rule in ("api_usage_high", "api_usage_forecast"):
        return ActionTarget("users_sync", f"pause_acc_{aid}", "Pace this account's sync", aid)
    return None


def evaluate(t: TenantSnapshot, rules: Iterable[Rule] = RULES) -> list[Finding]:
    """Every finding for the tenant, most severe first (then by account and rule), each with the page
    and control that carry its action out."""
    found = [f for rule in rules for f in rule(t)]
    found = [replace(f, target=action_target(f, t)) for f in found]
    return sorted(found, key=lambda f: (f.rank, f.account_label or "", f.rule))


def catalog_gaps(t: TenantSnapshot) -> list[str]:
    """Facts posture needs that the catalog lacks for this tenant's accounts (shown, never guessed)."""
    needed = ("api_access", "saml_sso", "integration_user_licenses", "daily_api_allocation", "attribution",
              "login_methods")
    gaps: list[str] = []
    for a in t.accounts:
        f = a.facts
        if not f.known:
            gaps.append(f"{f.provider}/{f.edition}: no catalog entry")
            continue
        missing = [n for n in needed if f.fact(n) is None]
        if missing:
            gaps.append(f"{f.provider}/{f.edition}: missing {', '.join(missing)}")
        if is_hubspot_private_app(a) and _private_app_retirement(f) is None:
            gaps.append(f"{f.provider}: no retirement fact for the legacy private-app mode")
    return sorted(set(gaps))
