"""Build ``TenantSnapshot``s from the database, the vault, SSO, sync and the provider catalog.

Each source is read in one small function below (one query per source for any number of tenants),
so when a package's storage changes only that function changes:

- ``edition_facts``       core.providers.catalog (facts, sources, auth modes, retirements)
- ``_load_accounts``      core.tenants CrmAccount rows
- ``_load_credentials``   core.vault.service ``list_credentials`` (owner, kind, state, expiry; never a secret)
- ``_load_sso``           core.sso SsoConfig (tested state, IdP certificate dates)
- ``_load_user_counts``   core.tenants AppUser (how many sign in by SSO; counts only)
- ``_load_sync``          core.sync.health ``account_health`` (per-account sync ability)
- ``_api_enabled`` / ``_licenses`` / ``_api_usage`` / ``_last_error_code``
                          the account's last connection test as core.connections stores it
                          (typed ``licenses`` and ``api_usage`` objects; no step text is parsed)
- ``_attribution``        the account's settings (attribution field, Dynamics impersonation)

Nothing here decides anything: the rules do.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func
from sqlmodel import Session, col, select

from core.clock import aware
from core.posture.snapshot import (
    AccountSnapshot,
    ApiUsage,
    Attribution,
    AuthModeFacts,
    EditionFacts,
    FactRef,
    IdpCert,
    Licenses,
    RetirementFacts,
    SsoState,
    StoredCredential,
    SyncAbility,
    TenantSnapshot,
    forecast_exhaustion,
)
from core.providers.catalog import Catalog, get_catalog
from core.sso.models import SsoConfig
from core.tenants.access import Principal
from core.tenants.models import AppUser, CrmAccount, Tenant, TenantStatus

log = logging.getLogger(__name__)
_SYSTEM = Principal.system("posture")

#: Vendor error codes a connection-test summary may carry that posture cares about.
_ERROR_CODES = ("API_DISABLED_FOR_ORG", "API_CURRENTLY_DISABLED", "REQUEST_LIMIT_EXCEEDED", "INVALID_LOGIN")


# --- catalog -------------------------------------------------------------------------------------


def _fact_ref(name: str, fact: Any) -> FactRef:
    value = fact.value
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return FactRef(name=name, value=value, source=fact.source.title, url=fact.source.url, as_of=fact.as_of,
                   verified=fact.verified, note=fact.note)


def _retirement(r: Any) -> RetirementFacts:
    return RetirementFacts(what=r.what, when=r.when, date=r.date, detail=r.detail, source=r.source.title,
                           url=r.source.url, as_of=r.as_of, verified=r.verified,
                           affects_auth_modes=tuple(r.affects_auth_modes))


def edition_facts(provider: str, edition: str, catalog: Catalog | None = None) -> EditionFacts:
    """The catalog's facts for ``provider`` + ``edition`` (``known=False`` when it has none)."""
    cat = catalog or get_catalog()
    entry = cat.providers.get(provider)
    if entry is None or edition not in entry.editions:
        return EditionFacts(provider=provider, edition=edition, provider_name=entry.name if entry else provider,
                            known=False)
    return _edition(entry, edition, with_upgrade=True)


def _edition(entry: Any, edition: str, *, with_upgrade: bool) -> EditionFacts:
    ed = entry.editions[edition]
    upgrade = None
    if with_upgrade and ed.api_access.value != "included":
        # The catalog has no explicit upgrade path: take the next edition in catalog order with the API.
        slugs = list(entry.editions)
        for slug in slugs[slugs.index(edition) + 1:]:
            if entry.editions[slug].api_access.value == "included":
                upgrade = _edition(entry, slug, with_upgrade=False)
                break
    attribution = next((f for f in entry.account_fields if f.name == "attribution_field"), None)
    return EditionFacts(
        provider=entry.slug, edition=edition, provider_name=entry.name, edition_name=ed.name, known=True,
        attribution_field_title=attribution.title if attribution else "",
        attribution_field_example=attribution.example or "" if attribution else "",
        facts={name: _fact_ref(name, f) for name, f in ed.facts().items()},
        auth_modes=tuple(
            AuthModeFacts(mode=m.mode, title=m.title, credential_mode=m.credential_mode, status=m.status,
                          retirement=_retirement(m.retirement) if m.retirement else None)
            for m in entry.auth_modes
        ),
        retirements=tuple(_retirement(r) for r in entry.retirements),
        upgrade=upgrade,
    )


# --- database sources ----------------------------------------------------------------------------


def _load_tenants(session: Session, tenant_ids: list[int] | None) -> list[Tenant]:
    q = select(Tenant).where(Tenant.status != TenantStatus.offboarded.value)
    if tenant_ids is not None:
        q = select(Tenant).where(col(Tenant.id).in_(tenant_ids))
    return list(session.exec(q.order_by(col(Tenant.name))).all())


def _load_accounts(session: Session, tenant_ids: list[int]) -> dict[int, list[CrmAccount]]:
    out: dict[int, list[CrmAccount]] = defaultdict(list)
    if tenant_ids:
        q = select(CrmAccount).where(col(CrmAccount.tenant_id).in_(tenant_ids)).order_by(col(CrmAccount.label))
        for a in session.exec(q):
            out[a.tenant_id].append(a)
    return out


def _load_credentials(session: Session, tenant_ids: list[int], now: datetime) -> dict[int, list[StoredCredential]]:
    """Per CRM account: what the vault holds, from ``core.vault.service.list_credentials`` (owner, kind,
    state, TTL expiry; never the secret). Console-side secrets (no CRM account) are left out."""
    from core.vault.service import list_credentials

    out: dict[int, list[StoredCredential]] = defaultdict(list)
    for tid in tenant_ids:
        for info in list_credentials(session, principal=_SYSTEM, tenant_id=tid, now=now):
            if info.crm_account_id is None or info.ref is None:  # tenant-level, or a destroyed slot
                continue
            out[info.crm_account_id].append(StoredCredential(
                credential_id=info.ref.id, kind=info.kind, state=info.state, app_user_id=info.app_user_id,
                user_label=info.owner if info.app_user_id is not None else None,
                expires_at=aware(info.expires_at)))
    return out


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return aware(datetime.fromisoformat(str(value).replace("Z", "+00:00")))
    except ValueError:
        return None


def _load_sso(session: Session, tenant_ids: list[int]) -> dict[int, SsoState]:
    out: dict[int, SsoState] = {}
    if not tenant_ids:
        return out
    for cfg in session.exec(select(SsoConfig).where(col(SsoConfig.tenant_id).in_(tenant_ids))):
        certs = []
        try:
            raw = json.loads(cfg.certs_json or "[]")
        except ValueError:
            raw = []
        for c in raw if isinstance(raw, list) else []:
            not_after = _parse_time(c.get("not_after"))
            if not_after is None:
                continue
            certs.append(IdpCert(sha256=str(c.get("sha256", "")), not_after=not_after,
                                 not_before=_parse_time(c.get("not_before")), subject=str(c.get("subject", "")),
                                 use=str(c.get("use") or "signing")))
        out[cfg.tenant_id] = SsoState(configured=True, tested_at=aware(cfg.tested_at), last_test_ok=cfg.last_test_ok,
                                      certs=tuple(certs), idp_entity_id=cfg.idp_entity_id)
    return out


def _load_user_counts(session: Session, tenant_ids: list[int]) -> dict[int, tuple[int, int]]:
    """(active users, of whom sign in by SSO) per tenant, counted in SQL."""
    out: dict[int, tuple[int, int]] = {}
    if not tenant_ids:
        return out
    sso = func.sum(case((col(AppUser.signs_in_by_sso).is_(True), 1), else_=0))
    q = (select(AppUser.tenant_id, func.count(), sso)
         .where(col(AppUser.tenant_id).in_(tenant_ids), AppUser.status == "active")
         .group_by(col(AppUser.tenant_id)))
    for tid, total, by_sso in session.exec(q):
        out[tid] = (int(total), int(by_sso or 0))
    return out


def _sync_ability(h: Any) -> SyncAbility:
    """An ``AccountHealth`` (core.sync.health) as posture's yes / no / unknown."""
    if h.paused_by:
        return SyncAbility(False, h.pause_reason or "sync is paused by an admin")
    if not h.jobs:
        return SyncAbility(None, None)  # no sync job yet: sync has no verdict
    flowing = h.by_sync.get("healthy", 0) + h.by_sync.get("lagging", 0)
    if flowing:
        return SyncAbility(True, None)
    if h.by_sync.get("failing", 0) == h.jobs:
        return SyncAbility(False, "every sync job has failed 3 runs in a row")
    if h.paused_until is not None:  # rate-limited: it resumes by itself
        return SyncAbility(None, f"rate-limited until {h.paused_until:%Y-%m-%d %H:%M} UTC")
    if h.by_auth.get("reconnect needed", 0) + h.by_auth.get("failed", 0) == h.jobs:
        return SyncAbility(False, "every sync job waits for a reconnect or a new credential")
    return SyncAbility(None, None)


def _load_sync(session: Session, tenant_ids: list[int], now: datetime) -> dict[int, SyncAbility]:
    """Per-account sync ability from ``core.sync.health.account_health`` (one call per tenant)."""
    try:
        from core.sync.health import account_health
    except ModuleNotFoundError as exc:
        if exc.name not in ("core.sync.health", "core.sync"):
            raise  # the module exists but is broken: say so rather than report "unknown"
        return {}
    out: dict[int, SyncAbility] = {}
    for tid in tenant_ids:
        for h in account_health(session, tenant_id=tid, now=now):
            out[h.crm_account_id] = _sync_ability(h)
    return out


# --- per-account sources (the account row itself) -----------------------------------------------


def _settings(account: CrmAccount) -> dict[str, Any]:
    try:
        data = json.loads(account.settings_json or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _test_summary(account: CrmAccount) -> dict[str, Any]:
    """The last connection test as stored by core.connections (JSON when it parses, else {})."""
    text = account.last_test_summary or ""
    try:
        data = json.loads(text) if text.strip().startswith("{") else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _last_error_code(account: CrmAccount) -> str | None:
    text = account.last_test_summary or ""
    return next((code for code in _ERROR_CODES if code in text), None) if account.last_test_ok is False else None


def _truthy(v: Any) -> bool:
    return v is True or str(v).strip().lower() in {"1", "true", "yes", "on"}


def _api_enabled(account: CrmAccount, facts: EditionFacts, settings: dict[str, Any]) -> bool | None:
    """True when the API works for this account (edition includes it, the add-on is recorded, or a
    connection test passed); False when the CRM refused it; None when nobody knows yet."""
    code = _last_error_code(account)
    if code in ("API_DISABLED_FOR_ORG", "API_CURRENTLY_DISABLED"):
        return False
    if account.last_test_ok:
        return True
    api = facts.value("api_access")
    if api == "included":
        return True
    if api == "none":
        return False
    if "api_add_on" in settings:
        return _truthy(settings["api_add_on"])
    return None


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _licenses(account: CrmAccount) -> Licenses | None:
    """The ``licenses`` object core.connections keeps from the provider's typed ``ConnectionReport.licenses``
    ({total, used, integration_total, …}); None when the last test read none."""
    lic = _test_summary(account).get("licenses")
    if not isinstance(lic, dict) or _int(lic.get("total")) is None or _int(lic.get("used")) is None:
        return None
    return Licenses(total=int(lic["total"]), used=int(lic["used"]),
                    integration_total=_int(lic.get("integration_total")),
                    integration_used=_int(lic.get("integration_used")),
                    observed_at=_parse_time(lic.get("observed_at")) or aware(account.last_test_at))


def _api_usage(account: CrmAccount, now: datetime) -> ApiUsage | None:
    """The ``api_usage`` object core.connections keeps from the provider's typed ``ConnectionReport.api_usage``
    ({used, limit, window, rate_per_hour, exhausts_at}); None when the last test read none."""
    u = _test_summary(account).get("api_usage")
    if not isinstance(u, dict) or _int(u.get("used")) is None or _int(u.get("limit")) is None:
        return None
    observed = _parse_time(u.get("observed_at")) or aware(account.last_test_at) or now
    window = str(u.get("window") or "24h rolling")
    rate = u.get("rate_per_hour")
    rate_f = float(rate) if isinstance(rate, int | float) else None
    resets = _parse_time(u.get("resets_at"))
    if resets is None and ("24h" in window or "rolling" in window):
        resets = observed + timedelta(hours=24)  # rolling: today's calls have rolled off a window later
    elif resets is None and "day" in window:  # calendar day (HubSpot: midnight in the account's time zone,
        # unknown here, so UTC midnight)
        resets = datetime.combine(observed.date() + timedelta(days=1), datetime.min.time(), tzinfo=observed.tzinfo)
    used, limit = int(u["used"]), int(u["limit"])
    exhausts = _parse_time(u.get("exhausts_at")) or forecast_exhaustion(
        used=used, limit=limit, observed_at=observed, rate_per_hour=rate_f)
    return ApiUsage(used=used, limit=limit, window=window, observed_at=observed, rate_per_hour=rate_f,
                    resets_at=resets, exhausts_at=exhausts)


def _acts_as_user(provider: str) -> bool:
    """The provider class can write as the real user (``Provider.acts_as_user``: Dynamics impersonation)."""
    from core.errors import CrmBridgeError
    from core.providers.registry import get_provider_class

    try:
        return get_provider_class(provider).acts_as_user
    except CrmBridgeError:  # a provider this installation does not have
        return False


def _attribution(account: CrmAccount, settings: dict[str, Any]) -> Attribution:
    """``attribution_field`` (catalog account field); a provider that acts as the user (Dynamics):
    ``impersonation`` (catalog account field, on by default); ``attribution_property`` (HubSpot; not in
    the catalog's account fields yet, so those accounts read as unattributed until it is added)."""
    field = str(settings.get("attribution_field") or settings.get("attribution_property") or "").strip() or None
    if _acts_as_user(account.provider):
        imp = settings.get("impersonation", True)
        return Attribution(field=field, impersonation=_truthy(imp))
    return Attribution(field=field, impersonation=False)


# --- assembling ------------------------------------------------------------------------------------


def _account(account: CrmAccount, facts: EditionFacts, creds: list[StoredCredential], sync: SyncAbility,
             now: datetime) -> AccountSnapshot:
    settings = _settings(account)
    return AccountSnapshot(
        id=account.id,  # type: ignore[arg-type]
        label=account.label, provider=account.provider, edition=account.edition,
        credential_mode=account.credential_mode, facts=facts,
        auth_mode=str(settings.get("auth_mode") or ("password" if account.credential_mode == "per_user_password"
                                                     else "")),
        token_kind=str(settings["token_kind"]) if settings.get("token_kind") else None,
        api_enabled=_api_enabled(account, facts, settings),
        last_test_at=aware(account.last_test_at), last_test_ok=account.last_test_ok,
        last_error_code=_last_error_code(account),
        licenses=_licenses(account), api_usage=_api_usage(account, now),
        attribution=_attribution(account, settings), credentials=tuple(creds), sync=sync,
    )


def gather_tenants(session: Session, tenant_ids: Iterable[int] | None = None, *, now: datetime,
                   catalog: Catalog | None = None) -> list[TenantSnapshot]:
    """Snapshots of the given tenants (default: every tenant not offboarded), a fixed number of queries."""
    tenants = _load_tenants(session, list(tenant_ids) if tenant_ids is not None else None)
    ids = [t.id for t in tenants if t.id is not None]
    accounts = _load_accounts(session, ids)
    creds = _load_credentials(session, ids, now)
    sso = _load_sso(session, ids)
    users = _load_user_counts(session, ids)
    sync = _load_sync(session, ids, now)
    facts_cache: dict[tuple[str, str], EditionFacts] = {}
    out = []
    for t in tenants:
        snaps = []
        for a in accounts.get(t.id, []):  # type: ignore[arg-type]
            key = (a.provider, a.edition)
            if key not in facts_cache:
                facts_cache[key] = edition_facts(a.provider, a.edition, catalog)
            snaps.append(_account(a, facts_cache[key], creds.get(a.id, []),  # type: ignore[arg-type]
                                  sync.get(a.id, SyncAbility()), now))  # type: ignore[arg-type]
        total, by_sso = users.get(t.id, (0, 0))  # type: ignore[arg-type]
        out.append(TenantSnapshot(
            tenant_id=t.id, slug=t.slug, name=t.name, taken_at=now, status=t.status,  # type: ignore[arg-type]
            accounts=tuple(snaps), sso=sso.get(t.id, SsoState()), users_total=total, users_sso=by_sso,  # type: ignore[arg-type]
        ))
    return out


def gather_tenant(session: Session, tenant_id: int, *, now: datetime, catalog: Catalog | None = None
                  ) -> TenantSnapshot | None:
    found = gather_tenants(session, [tenant_id], now=now, catalog=catalog)
    return found[0] if found else None
