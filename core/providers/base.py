"""What every CRM provider offers, whatever its protocol.

A provider class speaks one CRM's real protocol through the real client library, takes its transport
from the caller (an ``httpx.Client``, a zeep ``Transport``, a ``requests.Session``), maps every vendor
error to ``core.errors`` in one place, and reports API usage from the vendor's own signals.
Providers never import ``core.tenants`` or pages: the caller hands in the account's settings and the
secret (from inside ``vault.use()``), and gets plain dataclasses back.

Construction contract (see ``core.providers.config``): ``cls(*, account, credential, transport,
on_auth_failure=None, on_credential_update=None, clock=utcnow)``. ``ProviderBase`` implements it;
subclass it. Providers that support the per-user OAuth web-server flow also implement
``AuthorizationCodeSupport`` (class methods, used by the callback route before any account secret
exists for the user).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from core.clock import Clock, utcnow
from core.errors import AuthenticationFailed, ProviderError, RecordError

if TYPE_CHECKING:
    from core.providers.config import (
        AccountConfig,
        AuthFailureCallback,
        Credential,
        CredentialUpdateCallback,
        HttpTransport,
    )


@dataclass
class StepResult:
    """One step of a connection test: reach, authenticate, api_access, licenses, quota."""

    name: str
    ok: bool
    detail: str = ""
    fix: str | None = None
    latency_ms: float | None = None
    code: str | None = None  # the vendor's error code when the step failed (INVALID_LOGIN, 429, …)
    error: type[ProviderError] | None = None  # the core.errors class the vendor's refusal mapped to


@dataclass
class ConnectionReport:
    ok: bool
    steps: list[StepResult]
    identity: str | None = None  # the CRM user we logged in as (username / id)
    crm_user_id: str | None = None
    org_id: str | None = None
    detected_edition: str | None = None
    latency_ms: float | None = None
    # what the licenses and quota steps read, as typed data (posture and the quota gauge use these,
    # never the steps' English text)
    licenses: LicenseSnapshot | None = None
    api_usage: ApiUsage | None = None

    @property
    def failed_step(self) -> StepResult | None:
        return next((s for s in self.steps if not s.ok), None)


@dataclass
class LicenseSnapshot:
    total: int
    used: int
    integration_total: int = 0
    integration_used: int = 0
    detail: list[dict[str, Any]] = field(default_factory=list)

    @property
    def spare(self) -> int:
        return self.total - self.used

    @property
    def integration_spare(self) -> int:
        return self.integration_total - self.integration_used


@dataclass
class ApiUsage:
    """From the vendor's own headers or limits endpoint."""

    used: int
    limit: int
    window: str  # "24h rolling", "day", "10s", "5min" …
    remaining: int | None = None
    observed_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.used / self.limit if self.limit else 0.0


@dataclass
class CrmUser:
    crm_user_id: str
    email: str | None
    name: str
    active: bool = True
    username: str | None = None


@dataclass
class Opportunity:
    crm_id: str
    name: str
    stage: str | None
    amount: Decimal | None
    close_date: date | None
    owner_id: str | None
    modified_at: datetime
    external_key: str | None = None  # our idempotency key, when the record came from us
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class OpportunityChange:
    """A change made in our app. ``idempotency_key`` makes creates upserts (a retry never duplicates).

    ``crm_id`` is None for a create. ``act_as_crm_user_id`` is the real actor's CRM user id (Dynamics
    impersonation); ``attribution`` the real actor's label written to the attribution field when the
    tenant enables one (Salesforce).
    """

    idempotency_key: str
    fields: dict[str, Any]
    crm_id: str | None = None
    act_as_crm_user_id: str | None = None
    attribution: str | None = None


@dataclass
class PushResult:
    idempotency_key: str
    ok: bool
    crm_id: str | None = None
    created: bool = False
    error: str | None = None
    error_code: str | None = None
    #: How the record was written when a provider has several paths (e.g. Dynamics: "UpsertMultiple",
    #: "$batch (UpsertMultiple unsupported)", "per-actor requests ($batch impersonation ignored)"); the sync
    #: engine puts it in the audit entry so attribution is visible.
    write_path: str | None = None

    def raise_for_error(self) -> None:
        """Raise RecordError naming the record when this change failed."""
        if not self.ok:
            raise RecordError(
                f"The CRM rejected record {self.idempotency_key}: {self.error or self.error_code}",
                record_key=self.idempotency_key,
                code=self.error_code,
            )


@dataclass
class PullPage:
    records: list[Opportunity]
    next_cursor: str | None = None


class Provider(ABC):
    """One CRM. Subclasses name their catalog slug and implement every method."""

    slug: ClassVar[str]
    #: The largest write batch and read page the vendor allows (used by sync and benchmarks).
    max_write_batch: ClassVar[int]
    max_page_size: ClassVar[int]
    #: Writes can act as the real user (the CRM records them as that user: Dynamics impersonation), so sync
    #: and posture count the actor as attributed without a field.
    acts_as_user: ClassVar[bool] = False

    @classmethod
    def new_session_cache(cls) -> Any:
        """A cache of CRM sessions a worker process shares across runs, passed back to the constructor as
        ``session_cache`` (None: the class keeps no sessions across runs)."""
        return None

    @abstractmethod
    def test_connection(self) -> ConnectionReport: ...

    @abstractmethod
    def license_snapshot(self) -> LicenseSnapshot: ...

    @abstractmethod
    def api_usage(self) -> ApiUsage | None: ...

    @abstractmethod
    def list_users(self) -> list[CrmUser]: ...

    @abstractmethod
    def pull_opportunities(self, since: datetime | None) -> Iterator[Opportunity]:
        """Every opportunity modified at or after ``since`` (all when None), paged in the largest pages."""

    @abstractmethod
    def push_opportunities(self, changes: Sequence[OpportunityChange]) -> list[PushResult]:
        """Write in the largest batches the CRM allows; one result per change, in order."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Log out / release the session if the protocol has one."""

    @property
    def calls_made(self) -> int:
        """API calls made by this instance (logins and token fetches excluded); for benchmarks."""
        return getattr(self, "_calls", 0)

    @property
    def auth_calls_made(self) -> int:
        return getattr(self, "_auth_calls", 0)


@dataclass
class TokenGrant:
    """What an OAuth token endpoint returned (the secrets stay inside; never log this object)."""

    access_token: str
    instance_url: str | None = None
    refresh_token: str | None = None
    identity_url: str | None = None
    expires_in: int | None = None
    scope: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never print tokens
        return f"TokenGrant(instance_url={self.instance_url!r}, refresh={'yes' if self.refresh_token else 'no'})"


@runtime_checkable
class AuthorizationCodeSupport(Protocol):
    """Per-user OAuth (web-server flow + PKCE) for a provider class; used by core.connections.routes."""

    @classmethod
    def authorization_url(
        cls, account: AccountConfig, *, redirect_uri: str, state: str, code_challenge: str,
        login_hint: str | None = None,
    ) -> str: ...

    @classmethod
    def exchange_code(
        cls, account: AccountConfig, credential: Credential, transport: HttpTransport, *,
        code: str, code_verifier: str, redirect_uri: str,
    ) -> TokenGrant: ...


class ProviderBase(Provider):
    """Holds what the constructor contract hands in and reports per-user auth failures once."""

    def __init__(
        self,
        *,
        account: AccountConfig,
        credential: Credential,
        transport: HttpTransport,
        on_auth_failure: AuthFailureCallback | None = None,
        on_credential_update: CredentialUpdateCallback | None = None,
        clock: Clock = utcnow,
    ) -> None:
        if transport is not None:  # (None only in unit tests that never call out)
            transport.check_account(account)  # the vendor's own hosts only, before any secret is sent
        self.account = account
        self._credential = credential
        self.transport = transport
        self._on_auth_failure = on_auth_failure
        self._on_credential_update = on_credential_update
        self._clock = clock
        self._calls = 0
        self._auth_calls = 0
        self._auth_failure_reported = False

    def _auth_failed(self, exc: AuthenticationFailed) -> AuthenticationFailed:
        """Report a definitive rejection of a per-user credential (once), then return ``exc`` to raise."""
        if self.account.is_per_user and self._on_auth_failure and not self._auth_failure_reported:
            self._auth_failure_reported = True
            self._on_auth_failure(exc)
        return exc

    def __repr__(self) -> str:  # never show the credential
        return f"{type(self).__name__}(account={self.account.label or self.account.instance_url!r})"
