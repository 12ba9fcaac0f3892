"""What every CRM provider offers, whatever its protocol.

A provider class speaks one CRM's real protocol through the real client library, takes its transport
from the caller (an ``httpx.Client``, a zeep ``Transport``, a ``requests.Session``), maps every vendor
error to ``core.errors`` in one place, and reports API usage from the vendor's own signals.
Providers never import ``core.tenants`` or pages: the caller hands in the account's settings and the
secret (from inside ``vault.use()``), and gets plain dataclasses back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, ClassVar


@dataclass
class StepResult:
    """One step of a connection test: reach, authenticate, api_access, licenses, quota."""

    name: str
    ok: bool
    detail: str = ""
    fix: str | None = None
    latency_ms: float | None = None


@dataclass
class ConnectionReport:
    ok: bool
    steps: list[StepResult]
    identity: str | None = None  # the CRM user we logged in as (username / id)
    crm_user_id: str | None = None
    org_id: str | None = None
    detected_edition: str | None = None
    latency_ms: float | None = None

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
