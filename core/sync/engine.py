"""The sync engine: run one claimed job against its CRM — pull, merge, push, record.

One run, for one (CRM account, credential owner):

1. **Credential.** The owner's credential comes out of the vault inside ``vault.use()`` for the length
   of the run (the provider may have to log in again when a session expires mid-run). A definitive
   ``AuthenticationFailed`` propagates through ``use()``, which reports it to the vault (a per-user
   credential self-destructs, an API-user credential is held back) exactly once; the job is parked as
   "reconnect needed". A credential that is already gone parks the job the same way without a CRM call.
2. **Pull** every opportunity modified since the job's watermark minus an overlap window (records
   committed late with an earlier stamp are not missed), de-duplicated by the mirror's stamp, in chunks
   of one transaction each. Each pulled record is merged three ways with the pending outbox changes of
   that record: a field the CRM changed too goes to the CRM (CRM-owned) or stays ours (app-owned), each
   resolution written to ``sync_conflict``; a change the CRM already holds (our earlier push, whose
   answer was lost when a worker died) is marked applied without pushing it again.
3. **Push** the pending outbox — the whole account's for an API user, the owner's own changes for a
   per-user account — in the provider's largest write batches, creates as upserts on their
   idempotency key. Each batch's results are committed before the next batch is sent: per-record
   errors stay on their outbox rows; every applied change writes an audit event with the real actor and
   ``via`` ("api-user" or "own credentials"). Dynamics gets the actor's CRM user id to impersonate;
   Salesforce gets the actor's label for the attribution field when the tenant set one up and the
   catalog says the edition has it.
4. **Record** the run and move the job on: success resets the failure count (a recovery from failing is
   an audit event); a transient error (5xx, timeout, unreadable answer) backs off with seeded jitter; a
   ``RateLimited`` pauses the whole CRM account for ``retry_after``; three failures in a row make the
   job failing (an audit event).

Every write after the claim goes through ``jobs.fence`` (the lease token is checked and renewed in the
same transaction), so a worker that lost its lease writes nothing. Time comes from the injected clock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from pydantic import SecretStr
from sqlalchemy import select as sa_select
from sqlalchemy import text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from core.clock import Clock, aware, utcnow
from core.errors import (
    AuthenticationFailed,
    ConfigurationError,
    CredentialDestroyed,
    CredentialExpired,
    CredentialInvalid,
    CrmBridgeError,
    MalformedResponse,
    ProviderUnavailable,
    RateLimited,
    SessionExpired,
)
from core.providers.base import Opportunity, OpportunityChange, Provider, PushResult
from core.providers.config import AccountConfig, Credential
from core.sync.health import fix_for
from core.sync.jobs import DEFAULT_LEASE, Claim, LeaseLost, backoff_delay, claim_jobs, fence, release
from core.sync.models import (
    APP_OWNED_FIELDS,
    CREDENTIAL_PURPOSE,
    CRM_OWNED_FIELDS,
    FAILING_AFTER,
    JobState,
    OutboxStatus,
    RunStatus,
    SyncAccountState,
    SyncConflict,
    SyncJob,
    SyncOpportunity,
    SyncOutbox,
    SyncRun,
)
from core.sync.outbox import canonical, loads, mirror_value, set_mirror_value
from core.tenants.access import Principal
from core.tenants.audit import NewEvent, record_event, record_events
from core.tenants.models import AppUser, AppUserCrmIdentity, CrmAccount

log = logging.getLogger("crmbridge.sync")

VIA_API_USER = "api-user"
VIA_OWN = "own credentials"
#: Per-record error codes worth another try on the next run (the record was busy, not wrong).
RETRYABLE_RECORD_CODES = frozenset({"UNABLE_TO_LOCK_ROW", "REQUEST_RUNNING_TOO_LONG", "SERVER_UNAVAILABLE"})
TRANSIENT = (ProviderUnavailable, MalformedResponse, SessionExpired)
RECONNECT = (AuthenticationFailed, CredentialDestroyed, CredentialExpired, CredentialInvalid)


@dataclass
class SyncConfig:
    overlap: timedelta = timedelta(minutes=5)
    pull_chunk: int = 2000
    seed: int = 0
    lease: timedelta = DEFAULT_LEASE
    rate_limit_pause: timedelta = timedelta(minutes=15)  # when the CRM gives no retry-after
    permanent_retry: timedelta = timedelta(hours=1)  # API disabled, configuration: retry hourly
    failing_after: int = FAILING_AFTER


@dataclass(frozen=True)
class JobContext:
    """What a run needs to know about its job, loaded once at the start of the run."""

    job_id: int
    run_id: int
    tenant_id: int
    crm_account_id: int
    app_user_id: int | None
    account: AccountConfig
    per_user: bool
    watermark: datetime | None
    interval: timedelta
    crm_user_ids: dict[int, str]
    attribution_enabled: bool
    app_field_map: dict[str, str]
    paused_until: datetime | None = None  # the account is paused (rate limit or an admin) until then

    @property
    def via(self) -> str:
        return VIA_OWN if self.per_user else VIA_API_USER

    @property
    def owner(self) -> str:
        return f"app_user:{self.app_user_id}" if self.app_user_id is not None else f"crm_account:{self.crm_account_id}"


@dataclass
class RunStats:
    records_in: int = 0
    records_out: int = 0
    records_failed: int = 0
    duplicates: int = 0
    conflicts: int = 0
    confirmed: int = 0
    api_calls: int = 0
    auth_calls: int = 0
    push_calls: int = 0


@dataclass
class RunResult:
    job_id: int
    run_id: int
    status: str
    stats: RunStats = field(default_factory=RunStats)
    error: str | None = None


class CredentialSource(Protocol):
    """Hands the run its credential for the length of the run (see ``VaultCredentials``)."""

    def open(self, ctx: JobContext) -> AbstractContextManager[Credential]: ...


ProviderFactory = Callable[[JobContext, Credential], Provider]


class VaultCredentials:
    """The vault as the run's credential source: ``find_credential`` + ``use()`` for the whole run."""

    def __init__(self, engine: Engine, *, clock: Clock = utcnow, principal: Principal | None = None,
                 purpose: str = CREDENTIAL_PURPOSE) -> None:
        self.engine = engine
        self.clock = clock
        self.principal = principal or Principal.system("sync-worker")
        self.purpose = purpose

    @contextmanager
    def open(self, ctx: JobContext) -> Iterator[Credential]:
        from core.vault import service as vault

        reason = f"sync job {ctx.job_id}: pull and push opportunities"
        with Session(self.engine, expire_on_commit=False) as s:
            ref = vault.find_credential(s, tenant_id=ctx.tenant_id, crm_account_id=ctx.crm_account_id,
                                        app_user_id=ctx.app_user_id, purpose=self.purpose)
            # Per-user OAuth also needs the app's own secret, held once for the account.
            app_ref = vault.find_credential(s, tenant_id=ctx.tenant_id, crm_account_id=ctx.crm_account_id,
                                            app_user_id=None, purpose=self.purpose) \
                if ctx.account.credential_mode == "per_user_oauth" else None
            if ref is None:
                who = "this user" if ctx.app_user_id is not None else "the account's API user"
                raise CredentialDestroyed(
                    f"No credential is stored for {who}: "
                    + ("ask the user to reconnect (create a connect link on the Users & sync page)."
                       if ctx.app_user_id is not None else "store the API user's secret on the tenant page.")
                )
            with ExitStack() as stack:
                from core.connections.service import credential_fields

                fields = CredentialFields()
                if app_ref is not None:
                    app_secret = stack.enter_context(vault.use(s, app_ref, principal=self.principal,
                                                               now=self.clock(), reason=reason))
                    fields.update(credential_fields(app_secret.get_secret_value(), ctx.account))
                secret = stack.enter_context(vault.use(s, ref, principal=self.principal, now=self.clock(),
                                                       reason=reason))
                own = credential_fields(secret.get_secret_value(), ctx.account)
                fields.update(own)
                fields.on_update = lambda changed: self._store_rotated(ctx, ref.id, own, changed)
                yield fields

    def _store_rotated(self, ctx: JobContext, credential_id: int, own: dict[str, Any], changed: dict[str, str]) -> None:
        """The CRM rotated a secret (a new refresh token): keep the new one, or the next run fails."""
        from core.vault import service as vault
        from core.vault.models import VaultCredential

        merged = {k: (v.get_secret_value() if isinstance(v, SecretStr) else v) for k, v in own.items()}
        merged.update(changed)
        own.update({k: SecretStr(v) for k, v in changed.items()})
        with Session(self.engine, expire_on_commit=False) as s:
            row = s.get(VaultCredential, credential_id)
            kind = row.kind if row is not None else "oauth_refresh"
            vault.store(s, actor=self.principal, tenant_id=ctx.tenant_id, purpose=self.purpose,
                        secret=json.dumps(merged), crm_account_id=ctx.crm_account_id, app_user_id=ctx.app_user_id,
                        kind=kind, via="token rotation", now=self.clock())
            s.commit()
        log.info("sync: job %s: the CRM rotated the credential; the new one is in the vault", ctx.job_id)


class CredentialFields(dict[str, Any]):
    """The credential handed to the provider; ``on_update`` stores secrets the CRM rotates (the provider's
    ``on_credential_update``)."""

    on_update: Callable[[dict[str, str]], None] | None = None


_session_caches: dict[str, Any] = {}  # per provider slug, for this worker process
_local = threading.local()


def thread_transport(make: Callable[[], Any]) -> Any:
    """One HTTP transport per worker thread: its connections (and TLS sessions) are reused from one run
    to the next instead of a new handshake per job. It holds no secret (credentials travel per call)."""
    transport = getattr(_local, "transport", None)
    if transport is None:
        transport = _local.transport = make()
    return transport


def default_provider_factory(ctx: JobContext, credential: Credential) -> Provider:
    """The registry's provider for the account, over the product's transport. Providers that can reuse a
    CRM session across runs (Salesforce's ``SessionCache``) share one per worker process, in memory."""
    import inspect

    from core.connections.service import default_transport
    from core.providers.registry import get_provider_class

    cls = get_provider_class(ctx.account.provider)
    kwargs: dict[str, Any] = {}
    if "session_cache" in inspect.signature(cls.__init__).parameters:
        cache = _session_caches.get(cls.slug)
        if cache is None:
            cache = _session_caches[cls.slug] = cls.new_session_cache()
        kwargs["session_cache"] = cache
    return cls(account=ctx.account, credential=credential,  # type: ignore[call-arg]
               transport=thread_transport(default_transport),
               on_credential_update=getattr(credential, "on_update", None), **kwargs)


def acts_as_user(provider: str) -> bool:
    """The provider class writes as the real user (impersonation): see ``Provider.acts_as_user``."""
    from core.providers.registry import get_provider_class

    return get_provider_class(provider).acts_as_user


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 100000}"


def _attribution_declared(provider: str, edition: str) -> bool:
    try:
        from core.providers.catalog import get_catalog

        return bool(get_catalog().edition(provider, edition).attribution.value.attribution_field)
    except (CrmBridgeError, ImportError, AttributeError):
        return False


def _typed(f: str, v: str | None) -> Any:
    if v is None:
        return None
    if f == "amount":
        return Decimal(v)
    if f == "close_date":
        return date.fromisoformat(v)
    return v


def _crm_values(opp: Opportunity) -> dict[str, str | None]:
    return {
        "name": canonical("name", opp.name),
        "stage": canonical("stage", opp.stage),
        "amount": canonical("amount", opp.amount),
        "close_date": canonical("close_date", opp.close_date),
        "owner_id": canonical("owner_id", opp.owner_id),
    }


_MIRROR_COLUMNS = ("tenant_id", "crm_account_id", "crm_id", "external_key", "name", "stage", "amount", "close_date",
                   "owner_crm_id", "crm_modified_at", "app_fields_json", "created_at", "updated_at")


def _insert_ignore(s: Session, rows: list[dict[str, Any]]) -> Any:
    """INSERT … ON CONFLICT DO NOTHING: a record another job inserted meanwhile is left to it."""
    table = SyncOpportunity.__table__  # type: ignore[attr-defined]
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).values(rows).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).values(rows).on_conflict_do_nothing()


_PG_SET_CRM_IDS = text(
    "UPDATE sync_opportunity AS m SET crm_id = v.crm_id FROM unnest(CAST(:ids AS integer[]), CAST(:crm_ids AS text[]))"
    " AS v(id, crm_id) WHERE m.id = v.id AND m.id = ANY(CAST(:ids AS integer[])) AND m.crm_id IS NULL")
_SET_CRM_ID = text("UPDATE sync_opportunity SET crm_id = :crm_id WHERE id = :id AND crm_id IS NULL")


def _set_crm_ids(s: Session, pairs: Sequence[tuple[int, str | None]]) -> None:
    """The new records' CRM ids into the mirror (rows that have none yet), ordered by row id: on
    PostgreSQL one UPDATE … FROM unnest(ids, crm ids) — one short statement, the same text for any
    batch size; ``m.id = ANY(ids)`` keeps it on the primary key (joined on ``v.id`` alone the planner
    hashes every mirror row without a CRM id: 95 ms a batch at 10,000 pending creates) —; on SQLite
    (in-process, no round trips) one executemany."""
    conn = s.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(_PG_SET_CRM_IDS, {"ids": [i for i, _ in pairs], "crm_ids": [c for _, c in pairs]})
    else:
        conn.execute(_SET_CRM_ID, [{"id": i, "crm_id": c} for i, c in pairs])


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    size = max(1, size)
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _error_fields(exc: BaseException) -> tuple[str, str | None, str | None]:
    """(message, code, fix) for the run row and the job; never a secret (our errors never hold one)."""
    if isinstance(exc, CrmBridgeError):
        return exc.message[:2000], (exc.code or type(exc).__name__)[:80], fix_for(exc)
    return (f"Internal error in the sync worker ({type(exc).__name__}): see the worker log.",
            type(exc).__name__[:80], "Report it to CRM Bridge support with the time of the run.")


class SyncEngine:
    """Runs claimed jobs. Thread-safe: every step opens its own short transaction."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock = utcnow,
        credentials: CredentialSource | None = None,
        provider_factory: ProviderFactory | None = None,
        config: SyncConfig | None = None,
        principal: Principal | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.credentials = credentials or VaultCredentials(engine, clock=clock)
        self.provider_factory = provider_factory or default_provider_factory
        self.config = config or SyncConfig()
        self.principal = principal or Principal.system("sync-worker")

    # -------------------------------------------------------------------------------- entry points
    def run_due(self, *, worker: str | None = None, limit: int = 1) -> list[RunResult]:
        """Claim up to ``limit`` due jobs and run them one after the other."""
        worker = worker or worker_name()
        claims = claim_jobs(self.engine, worker=worker, now=self.clock(), limit=limit, lease=self.config.lease)
        return [self.run_claim(c) for c in claims]

    def run_claim(self, claim: Claim) -> RunResult:
        stats = RunStats()
        try:
            ctx = self._load(claim)
        except LeaseLost:
            return self._lease_lost(claim, stats)
        if ctx is None:
            return self._finish(claim, None, stats, RunStatus.failed, disable=True)
        if ctx.paused_until is not None:  # paused after the claim (another job hit the rate limit)
            return self._finish(claim, ctx, stats, RunStatus.skipped)
        provider: Provider | None = None
        try:
            with self.credentials.open(ctx) as credential:
                provider = self.provider_factory(ctx, credential)
                try:
                    self._pull(ctx, claim, provider, stats)
                    self._push(ctx, claim, provider, stats)
                finally:
                    stats.api_calls = provider.calls_made
                    stats.auth_calls = provider.auth_calls_made
                    try:
                        provider.close()
                    except CrmBridgeError as exc:  # a failed logout changes nothing we did
                        log.info("sync: job %s: closing the CRM session failed: %s", ctx.job_id, exc)
        except LeaseLost:
            return self._lease_lost(claim, stats)
        except RateLimited as exc:
            return self._finish(claim, ctx, stats, RunStatus.rate_limited, exc=exc)
        except RECONNECT as exc:
            return self._finish(claim, ctx, stats, RunStatus.reconnect_needed, exc=exc)
        except TRANSIENT as exc:
            return self._finish(claim, ctx, stats, RunStatus.failed, exc=exc, transient=True)
        except CrmBridgeError as exc:
            return self._finish(claim, ctx, stats, RunStatus.failed, exc=exc)
        except OperationalError as exc:  # deadlock victim, lock timeout, connection dropped: try again later
            log.warning("sync: job %s run %s: database error %s", claim.job_id, claim.run_id, type(exc.orig).__name__)
            busy = ProviderUnavailable(
                f"Our database was busy or unreachable during the run ({type(exc.orig).__name__}); nothing "
                "half-done was kept.", fix="Nothing to do: the run is retried with backoff.")
            return self._finish(claim, ctx, stats, RunStatus.failed, exc=busy, transient=True)
        except Exception as exc:  # a bug must not kill the worker or leave the job leased
            log.exception("sync: job %s run %s crashed", claim.job_id, claim.run_id)
            return self._finish(claim, ctx, stats, RunStatus.failed, exc=exc, transient=True)
        status = RunStatus.partial if stats.records_failed else RunStatus.success
        return self._finish(claim, ctx, stats, status)

    # -------------------------------------------------------------------------------- context
    def _load(self, claim: Claim) -> JobContext | None:
        with Session(self.engine, expire_on_commit=False) as s:
            job = fence(s, claim, self.clock())
            account = s.get(CrmAccount, job.crm_account_id)
            user = s.get(AppUser, job.app_user_id) if job.app_user_id is not None else None
            s.commit()
            if account is None or (job.app_user_id is not None and (user is None or user.status != "active")):
                return None
            assert account.id is not None and job.id is not None
            try:
                config = AccountConfig.from_crm_account(account)
            except ConfigurationError:
                config = None
            settings = json.loads(account.settings_json or "{}")
            ids: dict[int, str] = {}
            if account.credential_mode == "api_user":  # the actors' CRM ids, to write on their behalf
                ids = {i.app_user_id: i.crm_user_id for i in s.exec(
                    select(AppUserCrmIdentity).where(AppUserCrmIdentity.crm_account_id == account.id))}
            state = s.get(SyncAccountState, account.id)
            now = self.clock()
            paused_until: datetime | None = None
            if state is not None and state.paused_by:
                paused_until = now + timedelta(seconds=job.interval_seconds)
            elif state is not None and state.paused_until is not None and aware(state.paused_until) > now:  # type: ignore[operator]
                paused_until = aware(state.paused_until)
            s.commit()
        if config is None:
            return None
        return JobContext(
            job_id=job.id, run_id=claim.run_id, tenant_id=account.tenant_id, crm_account_id=account.id,
            app_user_id=job.app_user_id, account=config, per_user=config.is_per_user,
            watermark=aware(job.watermark), interval=timedelta(seconds=job.interval_seconds), crm_user_ids=ids,
            attribution_enabled=bool(settings.get("attribution_field"))
            and _attribution_declared(account.provider, account.edition),
            app_field_map={k: str(v) for k, v in (settings.get("app_field_map") or {}).items()
                           if k in APP_OWNED_FIELDS},
            paused_until=paused_until,
        )

    # -------------------------------------------------------------------------------- pull
    def _pull(self, ctx: JobContext, claim: Claim, provider: Provider, stats: RunStats) -> None:
        since = ctx.watermark - self.config.overlap if ctx.watermark else None
        newest = ctx.watermark
        batch: dict[str, Opportunity] = {}
        for opp in provider.pull_opportunities(since):
            prev = batch.get(opp.crm_id)
            if prev is None or opp.modified_at > prev.modified_at:
                batch[opp.crm_id] = opp
            if newest is None or opp.modified_at > newest:
                newest = opp.modified_at
            if len(batch) >= self.config.pull_chunk:
                self._apply_pulled(ctx, claim, list(batch.values()), stats, watermark=None)
                batch = {}
        self._apply_pulled(ctx, claim, list(batch.values()), stats, watermark=newest)

    def _apply_pulled(self, ctx: JobContext, claim: Claim, opps: list[Opportunity], stats: RunStats, *,
                      watermark: datetime | None) -> None:
        if not opps and (watermark is None or watermark == ctx.watermark):
            return  # nothing changed in the CRM: no transaction at all
        now = self.clock()
        with Session(self.engine, expire_on_commit=False) as s:
            job = fence(s, claim, now)
            if opps:
                self._merge(s, ctx, opps, stats, now)
            if watermark is not None and (job.watermark is None or watermark > aware(job.watermark)):  # type: ignore[operator]
                job.watermark = watermark
            s.commit()

    def _merge(self, s: Session, ctx: JobContext, opps: list[Opportunity], stats: RunStats, now: datetime) -> None:
        """Merge one chunk of pulled records into the mirror, in one transaction.

        Lock order, the same in every transaction of every worker (so none deadlocks): the job row
        (``fence``), then mirror and outbox rows (one flush: SQLAlchemy writes them in primary-key
        order; new mirror rows are inserted sorted by CRM id, skipping any another job inserted
        first), and the tenant's audit head last. A job resolves only the changes it pushes itself
        (the account's for an API user, its user's own otherwise), so two jobs never write the same
        outbox row.
        """
        acc = ctx.crm_account_id
        crm_ids = [o.crm_id for o in opps]
        keys = [o.external_key for o in opps if o.external_key]
        by_crm = {m.crm_id: m for m in s.exec(select(SyncOpportunity).where(
            SyncOpportunity.crm_account_id == acc, col(SyncOpportunity.crm_id).in_(crm_ids)))}
        by_key = {m.external_key: m for m in s.exec(select(SyncOpportunity).where(
            SyncOpportunity.crm_account_id == acc, col(SyncOpportunity.external_key).in_(keys)))} if keys else {}
        mirror_ids = [m.id for m in list(by_crm.values()) + list(by_key.values())]
        pending: dict[int, list[SyncOutbox]] = {}
        if mirror_ids:
            for row in s.exec(select(SyncOutbox).where(
                    col(SyncOutbox.opportunity_id).in_(mirror_ids),
                    SyncOutbox.status == OutboxStatus.pending.value).order_by(col(SyncOutbox.id))):
                pending.setdefault(row.opportunity_id, []).append(row)
        new_rows: dict[str, dict[str, Any]] = {}
        events: list[tuple[SyncOutbox, str | None, bool, bool]] = []
        for opp in opps:
            m = by_crm.get(opp.crm_id)
            if m is None and opp.external_key:
                cand = by_key.get(opp.external_key)
                if cand is not None and cand.crm_id in (None, opp.crm_id):
                    m = cand
            crm = _crm_values(opp)
            if m is not None and m.crm_modified_at is not None:
                # Seen already (the overlap window re-reads it, or another user's job pulled it first)?
                seen = aware(m.crm_modified_at)
                assert seen is not None
                if opp.modified_at < seen or (opp.modified_at == seen and all(
                        mirror_value(m, f) == v for f, v in crm.items())):
                    stats.duplicates += 1
                    # Only we resolve our own pending changes: one of them may be what this version holds.
                    for e in pending.get(m.id or -1, []):
                        if self._owns(ctx, e):
                            self._merge_entry(s, ctx, m, e, opp, crm, stats, now, events, confirm_only=True)
                    continue
            stats.records_in += 1
            if m is None:
                fresh = SyncOpportunity(tenant_id=ctx.tenant_id, crm_account_id=acc, crm_id=opp.crm_id,
                                        external_key=opp.external_key if opp.external_key not in by_key else None,
                                        crm_modified_at=opp.modified_at, created_at=now, updated_at=now)
                for f, v in crm.items():
                    set_mirror_value(fresh, f, v)
                new_rows[opp.crm_id] = {c: getattr(fresh, c) for c in _MIRROR_COLUMNS}
                continue
            still: set[str] = set()
            for e in pending.get(m.id or -1, []):
                if self._owns(ctx, e):
                    self._merge_entry(s, ctx, m, e, opp, crm, stats, now, events)
                if e.status == OutboxStatus.pending:
                    still.update(loads(e.fields_json))  # another user's pending edit stays visible too
            for f, v in crm.items():
                if f not in still:
                    set_mirror_value(m, f, v)
            m.crm_id = opp.crm_id
            m.crm_modified_at = opp.modified_at
            m.updated_at = now
            s.add(m)
        s.flush()
        if new_rows:
            rows = [new_rows[k] for k in sorted(new_rows)]
            for start in range(0, len(rows), 500):
                s.execute(_insert_ignore(s, rows[start:start + 500]))
        self._audit_applied(s, ctx, events, now)

    @staticmethod
    def _owns(ctx: JobContext, e: SyncOutbox) -> bool:
        return not ctx.per_user or e.actor_app_user_id == ctx.app_user_id

    def _merge_entry(self, s: Session, ctx: JobContext, m: SyncOpportunity, e: SyncOutbox, opp: Opportunity,
                     crm: dict[str, str | None], stats: RunStats, now: datetime,
                     events: list[tuple[SyncOutbox, str | None, bool, bool]], *, confirm_only: bool = False) -> None:
        """Three-way merge of one pending change with the CRM's newer version of its record.

        ``confirm_only``: the version is not newer than the mirror's; it may only show that the change
        already reached the CRM (no conflict is decided on it)."""
        if e.status != OutboxStatus.pending:
            return
        if e.operation == "create" and opp.external_key and opp.external_key == e.idempotency_key:
            self._mark_applied(s, ctx, e, m, crm_id=opp.crm_id, now=now)
            events.append((e, opp.crm_id, True, True))
            stats.confirmed += 1
            return
        fields = loads(e.fields_json)
        raw_app = {f: canonical(f, opp.raw.get(ctx.app_field_map[f])) for f in fields
                   if f in ctx.app_field_map and ctx.app_field_map[f] in opp.raw}
        if confirm_only:
            crm_side = {**crm, **raw_app}
            if m.crm_id is not None and all(f in crm_side and crm_side[f] == v for f, v in fields.items()):
                self._mark_applied(s, ctx, e, m, crm_id=opp.crm_id, now=now)
                events.append((e, opp.crm_id, False, True))
                stats.confirmed += 1
            return
        base = loads(e.base_json)
        changed = False
        for f, ours in list(fields.items()):
            theirs = crm[f] if f in CRM_OWNED_FIELDS else raw_app.get(f, ours)
            if theirs == ours:
                continue
            if base.get(f) == theirs:
                continue  # the CRM did not touch this field: our change still stands
            winner = "crm" if f in CRM_OWNED_FIELDS else "app"
            assert m.id is not None
            s.add(SyncConflict(tenant_id=ctx.tenant_id, crm_account_id=ctx.crm_account_id, opportunity_id=m.id,
                               crm_id=opp.crm_id, outbox_id=e.id, run_id=ctx.run_id, field=f, app_value=ours,
                               crm_value=theirs, winner=winner, resolved_at=now))
            stats.conflicts += 1
            if winner == "crm":
                del fields[f]
                changed = True
        if changed:
            e.fields_json = json.dumps(fields, sort_keys=True)
            e.updated_at = now
        crm_side = {**crm, **raw_app}
        if not fields:
            e.status = OutboxStatus.superseded.value
            e.last_error = ("The record was changed in the CRM at the same time; the CRM's values were kept "
                            "(CRM-owned fields). See the conflicts of this record.")
            e.updated_at = now
            s.add(e)
        elif all(f in crm_side and crm_side[f] == v for f, v in fields.items()) and m.crm_id is not None:
            # The CRM already holds exactly this change: our earlier push reached it but its answer was lost.
            self._mark_applied(s, ctx, e, m, crm_id=opp.crm_id, now=now)
            events.append((e, opp.crm_id, False, True))
            stats.confirmed += 1
        else:
            s.add(e)

    # -------------------------------------------------------------------------------- push
    def _push(self, ctx: JobContext, claim: Claim, provider: Provider, stats: RunStats) -> None:
        outbox = SyncOutbox.__table__  # type: ignore[attr-defined]
        with Session(self.engine, expire_on_commit=False) as s:  # read only: no fence needed
            # Plain rows with the outbox's columns, not ORM objects: nothing here is written through the
            # unit of work (the results go in set-based statements), so no identity map to fill.
            stmt = sa_select(outbox).where(outbox.c.crm_account_id == ctx.crm_account_id,
                                           outbox.c.status == OutboxStatus.pending.value)
            if ctx.per_user:
                stmt = stmt.where(outbox.c.actor_app_user_id == ctx.app_user_id)
            entries: list[Any] = list(s.connection().execute(stmt.order_by(outbox.c.id)))
            opp_ids = sorted({e.opportunity_id for e in entries})
            crm_id_of: dict[int, str | None] = {}
            for start in range(0, len(opp_ids), 2000):
                part = opp_ids[start:start + 2000]
                for oid, cid in s.exec(select(SyncOpportunity.id, SyncOpportunity.crm_id).where(
                        col(SyncOpportunity.id).in_(part))):
                    crm_id_of[oid] = cid  # type: ignore[index]
            s.commit()
        remaining = entries
        batch_size = max(1, int(getattr(provider, "max_write_batch", 200) or 200))
        while remaining:
            current: list[Any] = []
            deferred: list[Any] = []
            seen: set[int] = set()
            creating = {e.opportunity_id for e in remaining if e.operation == "create"}
            for e in remaining:
                if e.opportunity_id in seen:
                    deferred.append(e)  # one change per record per round: a batch never names a record twice
                    continue
                if e.operation == "update" and not crm_id_of.get(e.opportunity_id):
                    if e.opportunity_id in creating:
                        deferred.append(e)
                    continue  # its record is not in the CRM yet: waits for the create
                seen.add(e.opportunity_id)
                current.append(e)
            if not current:
                break
            for chunk in _chunks(current, batch_size):
                changes = [self._change(ctx, e, crm_id_of.get(e.opportunity_id)) for e in chunk]
                try:
                    stats.push_calls += 1
                    results = provider.push_opportunities(changes)
                except CrmBridgeError as exc:
                    self._push_failed(ctx, claim, chunk, exc)
                    raise
                if len(results) != len(chunk):
                    bad = MalformedResponse(f"The CRM answered {len(results)} results for {len(chunk)} records.")
                    self._push_failed(ctx, claim, chunk, bad)
                    raise bad
                for e, r in zip(chunk, results, strict=True):
                    if r.ok and r.crm_id and not crm_id_of.get(e.opportunity_id):
                        crm_id_of[e.opportunity_id] = r.crm_id
                self._apply_results(ctx, claim, chunk, results, stats)
            remaining = deferred

    def _change(self, ctx: JobContext, e: Any, crm_id: str | None) -> OpportunityChange:
        fields: dict[str, Any] = {}
        for f, v in loads(e.fields_json).items():
            if f in CRM_OWNED_FIELDS:
                fields[f] = _typed(f, v)
            elif f in ctx.app_field_map:
                fields[ctx.app_field_map[f]] = v
        return OpportunityChange(
            idempotency_key=e.idempotency_key,
            fields=fields,
            crm_id=None if e.operation == "create" else crm_id,
            act_as_crm_user_id=None if ctx.per_user else ctx.crm_user_ids.get(e.actor_app_user_id),
            attribution=e.actor_label if ctx.attribution_enabled and not ctx.per_user else None,
        )

    def _push_failed(self, ctx: JobContext, claim: Claim, chunk: Sequence[Any], exc: BaseException) -> None:
        """A whole batch failed (5xx, timeout, rate limit…): count the attempt on each row still pending
        (one UPDATE for the batch), keep it pending."""
        message, code, _ = _error_fields(exc)
        now = self.clock()
        outbox = SyncOutbox.__table__  # type: ignore[attr-defined]
        try:
            with Session(self.engine, expire_on_commit=False) as s:
                fence(s, claim, now)
                s.execute(update(outbox).where(outbox.c.id.in_(sorted(e.id for e in chunk)),
                                               outbox.c.status == OutboxStatus.pending.value)
                          .values(attempts=outbox.c.attempts + 1, last_error=message, last_error_code=code,
                                  updated_at=now))
                s.commit()
        except LeaseLost:
            pass

    def _apply_results(self, ctx: JobContext, claim: Claim, chunk: Sequence[Any],
                       results: Sequence[PushResult], stats: RunStats) -> None:
        """Commit one batch's results in one transaction of a few set-based statements: the applied
        outbox rows in one UPDATE (only rows still pending: a row resolved meanwhile is left alone and
        gets no audit event), the rejected ones one by one (rare), the new records' CRM ids into the
        mirror in one UPDATE, then one audit append for the whole batch (``record_events``)."""
        now = self.clock()
        outbox = SyncOutbox.__table__  # type: ignore[attr-defined]
        with Session(self.engine, expire_on_commit=False) as s:
            fence(s, claim, now)
            by_id: dict[int, PushResult] = {e.id: r for e, r in zip(chunk, results, strict=True) if e.id is not None}
            ok_ids = sorted(i for i, r in by_id.items() if r.ok)
            bad_ids = sorted(i for i, r in by_id.items() if not r.ok)
            applied: dict[int, Any] = {}
            if ok_ids:
                for row in s.execute(
                    update(outbox).where(outbox.c.id.in_(ok_ids), outbox.c.status == OutboxStatus.pending.value)
                    .values(status=OutboxStatus.applied.value, attempts=outbox.c.attempts + 1, applied_at=now,
                            applied_run_id=ctx.run_id, via=ctx.via, last_error=None, last_error_code=None,
                            updated_at=now)
                    .returning(outbox.c.id, outbox.c.opportunity_id, outbox.c.idempotency_key, outbox.c.fields_json,
                               outbox.c.operation, outbox.c.actor_label, outbox.c.actor_app_user_id)
                ):
                    applied[row.id] = row
            if bad_ids:
                pending = set(s.execute(select(outbox.c.id).where(
                    outbox.c.id.in_(bad_ids), outbox.c.status == OutboxStatus.pending.value)).scalars())
                for i in bad_ids:
                    if i not in pending:
                        continue  # resolved meanwhile
                    r = by_id[i]
                    retry = (r.error_code or "") in RETRYABLE_RECORD_CODES
                    s.execute(update(outbox).where(outbox.c.id == i).values(
                        status=OutboxStatus.pending.value if retry else OutboxStatus.failed.value,
                        attempts=outbox.c.attempts + 1,
                        last_error=(r.error or f"The CRM rejected the record ({r.error_code}).")[:2000],
                        last_error_code=(r.error_code or "")[:80] or None, updated_at=now))
                    stats.records_failed += 1
            new_ids = {row.opportunity_id: by_id[i].crm_id for i, row in applied.items() if by_id[i].crm_id}
            if new_ids:
                _set_crm_ids(s, sorted(new_ids.items()))
            stats.records_out += len(applied)
            write_paths: dict[int | None, str] = {i: r.write_path for i, r in by_id.items() if r.write_path}
            events = [(applied[i], by_id[i].crm_id, by_id[i].created, False) for i in sorted(applied)]
            self._audit_applied(s, ctx, events, now, write_paths)
            s.commit()

    def _mark_applied(self, s: Session, ctx: JobContext, row: SyncOutbox, m: SyncOpportunity | None, *,
                      crm_id: str | None, now: datetime) -> None:
        row.status = OutboxStatus.applied.value
        row.applied_at = now
        row.applied_run_id = ctx.run_id
        row.via = ctx.via
        row.last_error = None
        row.last_error_code = None
        row.updated_at = now
        s.add(row)
        if m is not None and crm_id and not m.crm_id:
            m.crm_id = crm_id
            s.add(m)

    def _audit_applied(self, s: Session, ctx: JobContext, events: Sequence[tuple[Any, str | None, bool, bool]],
                       now: datetime, write_paths: dict[int | None, str] | None = None) -> None:
        """One audit event per change that reached the CRM: the real actor, and how we wrote it (``via``),
        appended for the whole batch at once (``record_events``). ``events`` holds (outbox row, CRM id,
        created, confirmed by a pull); the row is a ``SyncOutbox`` or a row with the same columns."""
        batch: list[NewEvent] = []
        for row, crm_id, created, confirmed in events:
            details: dict[str, Any] = {
                "crm_account_id": ctx.crm_account_id, "idempotency_key": row.idempotency_key,
                "fields": loads(row.fields_json), "job_id": ctx.job_id, "run_id": ctx.run_id,
            }
            if confirmed:
                details["confirmed_by_pull"] = True
            if write_paths and write_paths.get(row.id):
                # which request wrote it (e.g. Dynamics "per-actor requests ($batch impersonation ignored)")
                details["write_path"] = write_paths[row.id]
            if not ctx.per_user:
                act_as = ctx.crm_user_ids.get(row.actor_app_user_id)
                if act_as and acts_as_user(ctx.account.provider):
                    details["impersonated_crm_user"] = act_as
                if ctx.attribution_enabled:
                    details["attribution_field"] = ctx.account.setting("attribution_field")
            batch.append(NewEvent(
                principal=row.actor_label,
                action="opportunity.create" if row.operation == "create" or created else "opportunity.update",
                tenant_id=ctx.tenant_id, target=f"opportunity:{crm_id or row.idempotency_key}",
                details=details, via=ctx.via, at=now))
        record_events(s, batch)

    # -------------------------------------------------------------------------------- finish
    def _lease_lost(self, claim: Claim, stats: RunStats) -> RunResult:
        now = self.clock()
        with Session(self.engine, expire_on_commit=False) as s:
            run = s.get(SyncRun, claim.run_id)
            if run is not None and run.status == RunStatus.running:
                run.status = RunStatus.lease_lost.value
                run.finished_at = now
                run.error = "Another worker took this job over; this worker stopped without writing."
                s.add(run)
            s.commit()
        log.warning("sync: job %s run %s: lease lost, stopped", claim.job_id, claim.run_id)
        return RunResult(claim.job_id, claim.run_id, RunStatus.lease_lost.value, stats)

    def _finish(self, claim: Claim, ctx: JobContext | None, stats: RunStats, status: RunStatus, *,
                exc: BaseException | None = None, transient: bool = False, disable: bool = False) -> RunResult:
        now = self.clock()
        message, code, fix = _error_fields(exc) if exc is not None else (None, None, None)
        try:
            with Session(self.engine, expire_on_commit=False) as s:
                job = fence(s, claim, now)
                run = s.get(SyncRun, claim.run_id)
                assert run is not None and job.id is not None
                run.status = status.value
                run.finished_at = now
                for name in ("records_in", "records_out", "records_failed", "duplicates", "conflicts", "api_calls",
                             "auth_calls"):
                    setattr(run, name, getattr(stats, name))
                run.error, run.error_code, run.fix = message, code, fix
                s.add(run)
                job.last_run_at = now
                job.runs_total += 1
                interval = timedelta(seconds=job.interval_seconds)
                if disable:
                    job.state = JobState.disabled.value
                    run.error = "The CRM account, its settings or the user are gone or inactive: the job is disabled."
                    job.last_error, job.last_error_at = run.error, now
                elif status in (RunStatus.success, RunStatus.partial):
                    if job.consecutive_failures >= self.config.failing_after:
                        self._event(s, job, "sync.recovered", now, {
                            "after_failures": job.consecutive_failures, "failing_since": job.failing_since})
                    job.attempts = 0
                    job.consecutive_failures = 0
                    job.failing_since = None
                    job.last_success_at = now
                    job.next_run_at = now + interval
                elif status == RunStatus.skipped:
                    assert ctx is not None and ctx.paused_until is not None
                    run.error = "The CRM account was paused after this job was claimed: nothing was called."
                    job.next_run_at = ctx.paused_until
                elif status == RunStatus.rate_limited:
                    assert isinstance(exc, RateLimited)
                    pause = (timedelta(seconds=exc.retry_after) if exc.retry_after
                             else self.config.rate_limit_pause)
                    until = now + pause
                    self._pause_account(s, job, until, message or "rate limited", now)
                    job.next_run_at = until
                    job.last_error, job.last_error_code, job.last_error_fix, job.last_error_at = (
                        message, code, fix, now)
                else:
                    job.consecutive_failures += 1
                    job.last_error, job.last_error_code, job.last_error_fix, job.last_error_at = (
                        message, code, fix, now)
                    if status == RunStatus.reconnect_needed:
                        job.state = JobState.reconnect_needed.value
                        job.reconnect_since = now
                        job.next_run_at = now + interval
                        self._event(s, job, "sync.reconnect_needed", now, {"error": message, "code": code})
                    else:
                        job.attempts += 1
                        delay = backoff_delay(job.attempts, job_id=job.id, seed=self.config.seed)
                        if not transient:
                            delay = max(delay, self.config.permanent_retry)
                        job.next_run_at = now + delay
                    if job.consecutive_failures == self.config.failing_after:
                        job.failing_since = now
                        self._event(s, job, "sync.failing", now, {
                            "consecutive_failures": job.consecutive_failures, "error": message, "code": code})
                release(job)
                s.add(job)
                s.commit()
        except LeaseLost:
            return self._lease_lost(claim, stats)
        log.info("sync: job %s run %s %s (in %d, out %d, failed %d, conflicts %d, calls %d)%s", claim.job_id,
                 claim.run_id, status.value, stats.records_in, stats.records_out, stats.records_failed,
                 stats.conflicts, stats.api_calls, f": {message}" if message else "")
        return RunResult(claim.job_id, claim.run_id, status.value, stats, message)

    def _pause_account(self, s: Session, job: SyncJob, until: datetime, reason: str, now: datetime) -> None:
        state = s.get(SyncAccountState, job.crm_account_id)
        if state is None:
            state = SyncAccountState(crm_account_id=job.crm_account_id, tenant_id=job.tenant_id)
        newly = state.paused_until is None or aware(state.paused_until) <= now  # type: ignore[operator]
        if state.paused_until is None or until > aware(state.paused_until):  # type: ignore[operator]
            state.paused_until = until
        state.pause_reason = reason[:1000]
        state.rate_limited_count += 1
        state.updated_at = now
        s.add(state)
        if newly:
            record_event(s, principal=self.principal, action="sync.account.rate_limited", tenant_id=job.tenant_id,
                         target=f"crm_account:{job.crm_account_id}",
                         details={"paused_until": until, "reason": reason[:300]}, at=now)

    def _event(self, s: Session, job: SyncJob, action: str, now: datetime, details: dict[str, Any]) -> None:
        target = f"app_user:{job.app_user_id}" if job.app_user_id is not None else f"crm_account:{job.crm_account_id}"
        record_event(s, principal=self.principal, action=action, tenant_id=job.tenant_id, target=target,
                     details={"job_id": job.id, "crm_account_id": job.crm_account_id, **details}, at=now)
