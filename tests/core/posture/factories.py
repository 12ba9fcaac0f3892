"""Snapshots built in tests, with facts from the real provider catalog (core/providers/catalog.yaml)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from core.posture.gather import edition_facts
from core.posture.snapshot import (
    AccountSnapshot,
    Attribution,
    EditionFacts,
    FactRef,
    SsoState,
    StoredCredential,
    TenantSnapshot,
)
from core.providers.catalog import get_catalog

NOW = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
TESTED_SSO = SsoState(configured=True, tested_at=NOW - timedelta(days=3), last_test_ok=True)

_ids = iter(range(1, 10_000))


def catalog_edition(provider: str, edition: str) -> Any:
    """The raw catalog entry (pydantic) — what the tests compare the findings' numbers with."""
    return get_catalog().edition(provider, edition)


def facts(provider: str = "salesforce", edition: str = "enterprise") -> EditionFacts:
    return edition_facts(provider, edition)


def dynamics_facts() -> EditionFacts:
    """Dynamics 365 facts from the catalog when it has them, else the CRM-FACTS rows built here."""
    cat = get_catalog()
    if "dynamics-365" in cat.providers:
        ed = next(iter(cat.provider("dynamics-365").editions))
        return edition_facts("dynamics-365", ed)
    src = "Microsoft Learn, Impersonate another user using the Web API"
    url = "https://learn.microsoft.com/power-apps/developer/data-platform/webapi/impersonate-another-user-web-api"
    return EditionFacts(
        provider="dynamics-365", edition="sales-enterprise", provider_name="Dynamics 365",
        edition_name="Sales Enterprise",
        facts={
            "api_access": FactRef("api_access", "included", src, url, date(2026, 11, 28), True),
            "attribution": FactRef("attribution", {"impersonation": True, "attribution_field": False}, src, url,
                                   date(2026, 11, 28), True),
        },
    )


def user_cred(user: str = "ana@acme.example", *, kind: str = "password", expires_at: datetime | None = None,
              state: str = "active") -> StoredCredential:
    n = next(_ids)
    return StoredCredential(credential_id=n, kind=kind, state=state, app_user_id=n, user_label=user,
                            expires_at=expires_at)


def api_cred(*, kind: str = "client_secret", state: str = "active") -> StoredCredential:
    return StoredCredential(credential_id=next(_ids), kind=kind, state=state)


def account(
    *, label: str = "Main org", provider: str = "salesforce", edition: str = "enterprise", mode: str = "api_user",
    ef: EditionFacts | None = None, credentials: tuple[StoredCredential, ...] | None = None, **kw: Any,
) -> AccountSnapshot:
    """An account that can sync unless told otherwise: an API credential for ``api_user``, one user's
    credential (password or OAuth by mode) for the per-user modes."""
    if credentials is None:
        if mode == "api_user":
            credentials = (api_cred(),)
        elif mode == "per_user_password":
            credentials = (user_cred(kind="password"),)
        else:
            credentials = (user_cred(kind="oauth_refresh"),)
    kw.setdefault("auth_mode", {"per_user_password": "password", "per_user_oauth": "oauth_authorization_code"}
                  .get(mode, "oauth_client_credentials"))
    return AccountSnapshot(
        id=next(_ids), label=label, provider=provider, edition=edition, credential_mode=mode,
        facts=ef or facts(provider, edition), credentials=credentials, **kw,
    )


def attributed(**kw: Any) -> AccountSnapshot:
    return account(attribution=Attribution(field="CrmBridge_Actor__c"), **kw)


def tenant(*accounts: AccountSnapshot, sso: SsoState | None = None, users: tuple[int, int] = (10, 0),
           now: datetime = NOW) -> TenantSnapshot:
    return TenantSnapshot(tenant_id=1, slug="acme", name="Acme", taken_at=now, accounts=tuple(accounts),
                          sso=sso or SsoState(), users_total=users[0], users_sso=users[1])


def rules_of(findings: list[Any]) -> list[str]:
    return [f.rule for f in findings]


def one(findings: list[Any], rule: str) -> Any:
    matching = [f for f in findings if f.rule == rule]
    assert len(matching) == 1, f"expected one {rule}, got {[f.rule for f in findings]}"
    return matching[0]


def text_of(finding: Any) -> str:
    return " ".join([finding.title, finding.action, finding.unlocks]
                    + [f"{e.label} {e.value} {e.source or ''}" for e in finding.evidence])
