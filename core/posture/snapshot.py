"""What posture knows about one tenant at one moment: plain, frozen dataclasses.

The rules (``core.posture.rules``) and levels (``core.posture.maturity``) are pure functions of a
``TenantSnapshot``; ``core.posture.gather`` builds one from the database, the vault, SSO, sync and the
provider catalog. Tests build snapshots by hand (with catalog facts from ``gather.edition_facts``),
so every rule can be checked without a database.

    TenantSnapshot
    ├── accounts: AccountSnapshot…      one per CRM account
    │   ├── facts: EditionFacts         catalog facts for its provider + edition, each with its source
    │   ├── licenses: Licenses | None   last license read (total/used, Integration user licenses)
    │   ├── api_usage: ApiUsage | None  last quota read with its forecast
    │   ├── attribution: Attribution    field / impersonation configured on the account
    │   ├── credentials: StoredCredential…   what the vault holds for it (never the secret)
    │   └── sync: SyncAbility           what sync health says (unknown when sync has no data)
    └── sso: SsoState                   configured, tested, last test, IdP certificates, users by SSO

Nothing here holds a secret; user labels (emails) appear only in ``StoredCredential.user_label``
and are shown only to those who may see the tenant (never in adoption figures).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

PER_USER_MODES = ("per_user_oauth", "per_user_password")


@dataclass(frozen=True)
class FactRef:
    """One catalog fact as posture cites it: the value and where it comes from."""

    name: str
    value: Any
    source: str
    url: str
    as_of: date
    verified: bool = False
    note: str | None = None

    def cite(self) -> str:
        flag = "" if self.verified else ", not yet verified"
        return f"{self.source} (as of {self.as_of.isoformat()}{flag})"


@dataclass(frozen=True)
class RetirementFacts:
    what: str
    when: str
    date: _dt.date | None
    detail: str
    source: str
    url: str
    as_of: _dt.date
    verified: bool = False
    affects_auth_modes: tuple[str, ...] = ()

    def cite(self) -> str:
        flag = "" if self.verified else ", not yet verified"
        return f"{self.source} (as of {self.as_of.isoformat()}{flag})"


@dataclass(frozen=True)
class AuthModeFacts:
    mode: str
    title: str
    credential_mode: str
    status: str  # recommended | supported | retiring
    retirement: RetirementFacts | None = None


@dataclass(frozen=True)
class EditionFacts:
    """The catalog entry for one provider + edition, flattened for the rules.

    ``facts`` maps fact names (api_access, saml_sso, integration_user_licenses,
    daily_api_allocation, attribution, login_methods, plus provider extras) to ``FactRef``.
    ``known`` is False when the catalog has no entry for this provider or edition at all.
    """

    provider: str
    edition: str
    provider_name: str = ""
    edition_name: str = ""
    #: The catalog's attribution account field (its title names the CRM object, e.g. "Attribution field on
    #: Opportunity"), for advice; empty when the provider has none.
    attribution_field_title: str = ""
    attribution_field_example: str = ""
    known: bool = True
    facts: Mapping[str, FactRef] = field(default_factory=dict)
    auth_modes: tuple[AuthModeFacts, ...] = ()
    retirements: tuple[RetirementFacts, ...] = ()
    #: The next edition up that includes the API (for upgrade advice), when the catalog has one.
    upgrade: EditionFacts | None = None

    def fact(self, name: str) -> FactRef | None:
        return self.facts.get(name)

    def value(self, name: str, default: Any = None) -> Any:
        f = self.facts.get(name)
        return default if f is None else f.value

    def auth_mode(self, mode: str) -> AuthModeFacts | None:
        return next((m for m in self.auth_modes if m.mode == mode), None)

    def retirement_for(self, mode: str) -> RetirementFacts | None:
        """The dated retirement affecting ``mode`` (on the mode itself, or in the provider's list)."""
        m = self.auth_mode(mode)
        if m is not None and m.retirement is not None:
            return m.retirement
        return next((r for r in self.retirements if mode in r.affects_auth_modes), None)

    @property
    def label(self) -> str:
        return f"{self.provider_name or self.provider} {self.edition_name or self.edition}"


@dataclass(frozen=True)
class Licenses:
    """The last license read: full CRM licenses and free API-only (Integration user) licenses."""

    total: int
    used: int
    integration_total: int | None = None
    integration_used: int | None = None
    observed_at: datetime | None = None

    @property
    def spare(self) -> int:
        return self.total - self.used

    @property
    def integration_spare(self) -> int | None:
        if self.integration_total is None:
            return None
        return self.integration_total - (self.integration_used or 0)


@dataclass(frozen=True)
class ApiUsage:
    """The last quota read, with a forecast.

    ``resets_at`` is when the allocation resets (for a rolling 24 h window: when the oldest calls
    counted now have rolled off, i.e. one window after the read); ``exhausts_at`` when the current
    rate would use it up (None: no rate known, or not before the reset).
    """

    used: int
    limit: int
    window: str
    observed_at: datetime
    rate_per_hour: float | None = None
    resets_at: datetime | None = None
    exhausts_at: datetime | None = None

    @property
    def fraction(self) -> float:
        return self.used / self.limit if self.limit else 0.0

    @property
    def runs_out_before_reset(self) -> bool:
        if self.exhausts_at is None:
            return False
        return self.resets_at is None or self.exhausts_at < self.resets_at


def forecast_exhaustion(
    *, used: int, limit: int, observed_at: datetime, rate_per_hour: float | None
) -> datetime | None:
    """When ``limit`` is reached at ``rate_per_hour`` (None when the rate is unknown or zero)."""
    if not rate_per_hour or rate_per_hour <= 0 or limit <= 0:
        return None
    left = max(limit - used, 0)
    return observed_at + timedelta(hours=left / rate_per_hour)


@dataclass(frozen=True)
class Attribution:
    """How writes through an API user name their real actor in the CRM."""

    field: str | None = None  # Salesforce: the custom field receiving the actor
    impersonation: bool = False  # Dynamics: CallerObjectId impersonation

    @property
    def enabled(self) -> bool:
        return bool(self.field) or self.impersonation


@dataclass(frozen=True)
class StoredCredential:
    """What the vault holds for an account (never the secret). ``app_user_id`` None: the API user."""

    credential_id: int
    kind: str  # password, oauth_refresh, client_secret, private_key, api_token, …
    state: str  # active | failed | invalid
    app_user_id: int | None = None
    user_label: str | None = None
    expires_at: datetime | None = None

    @property
    def per_user(self) -> bool:
        return self.app_user_id is not None

    def usable(self, now: datetime) -> bool:
        return self.state == "active" and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class SyncAbility:
    """What sync health says about the account: True/False, or None when sync has no verdict yet."""

    can_sync: bool | None = None
    reason: str | None = None


@dataclass(frozen=True)
class AccountSnapshot:
    id: int
    label: str
    provider: str
    edition: str
    credential_mode: str  # api_user | per_user_oauth | per_user_password
    facts: EditionFacts
    auth_mode: str = ""  # the catalog auth mode id (settings ``auth_mode``)
    token_kind: str | None = None  # HubSpot api_token: service_key | private_app (legacy)
    #: API access for this account: True (works / add-on bought), False (refused), None (unknown).
    api_enabled: bool | None = None
    last_test_at: datetime | None = None
    last_test_ok: bool | None = None
    last_error_code: str | None = None
    licenses: Licenses | None = None
    api_usage: ApiUsage | None = None
    attribution: Attribution = Attribution()
    credentials: tuple[StoredCredential, ...] = ()
    sync: SyncAbility = SyncAbility()

    @property
    def per_user(self) -> bool:
        return self.credential_mode in PER_USER_MODES

    def user_credentials(self, now: datetime) -> list[StoredCredential]:
        return [c for c in self.credentials if c.per_user and c.usable(now)]

    def stored_passwords(self, now: datetime) -> list[StoredCredential]:
        return [c for c in self.user_credentials(now) if c.kind == "password"]

    def api_credentials(self, now: datetime) -> list[StoredCredential]:
        return [c for c in self.credentials if not c.per_user and c.usable(now)]


@dataclass(frozen=True)
class IdpCert:
    sha256: str
    not_after: datetime
    not_before: datetime | None = None
    subject: str = ""
    use: str = "signing"  # signing | encryption | both

    @property
    def signs(self) -> bool:
        return self.use in ("signing", "both")


@dataclass(frozen=True)
class SsoState:
    configured: bool = False
    tested_at: datetime | None = None
    last_test_ok: bool | None = None
    certs: tuple[IdpCert, ...] = ()
    idp_entity_id: str | None = None

    @property
    def tested(self) -> bool:
        """Tested means a valid test response, and the last test did not fail since."""
        return self.configured and self.tested_at is not None and self.last_test_ok is True

    @property
    def state(self) -> str:
        if not self.configured:
            return "missing"
        if self.last_test_ok is False:
            return "failing"
        if self.tested:
            return "tested"
        return "untested"


@dataclass(frozen=True)
class TenantSnapshot:
    tenant_id: int
    slug: str
    name: str
    taken_at: datetime
    status: str = "live"
    accounts: tuple[AccountSnapshot, ...] = ()
    sso: SsoState = SsoState()
    users_total: int = 0
    users_sso: int = 0
