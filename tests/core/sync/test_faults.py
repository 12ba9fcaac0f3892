"""Fault tests against the CRM sandbox over real HTTPS, with the real Salesforce provider and the vault.

Deterministic: the sandbox's 5xx are seeded, the engine's clock is frozen (backoff, leases and rate-limit
pauses follow it), the other faults are switched on at fixed points. After recovery the sandbox CRM and
our mirror must agree record by record, no outbox entry may be lost, and nothing may be applied twice
(the sandbox counts the write batches it processed; a re-sent batch would show).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.clock import FrozenClock
from core.providers.base import OpportunityChange, Provider, PushResult
from core.providers.salesforce import SalesforceProvider
from core.sync.engine import JobContext, SyncEngine, VaultCredentials
from core.sync.models import JobState, OutboxStatus, RunStatus, SyncJob, SyncOpportunity, SyncOutbox, SyncRun
from core.sync.outbox import record_change
from core.sync.scheduler import ensure_jobs
from core.tenants.access import Principal
from core.tenants.audit import verify_chain
from core.tenants.models import AppUser, AppUserCrmIdentity, AuditEvent, CrmAccount, Tenant
from core.vault import service as vault
from tests.fixtures.sandbox import SandboxHandle, start_sandbox
from tests.fixtures.vault import TEST_KEK, TEST_KEK_ID, ring_json

ROOT = Path(__file__).resolve().parents[3]
ORG = "syncfault"
SYSTEM = Principal.system("test")
USERS = [(f"rep{i}@syncfault.example", f"Pass-{i}-2026", f"TKN{i:07d}") for i in range(1, 4)]
APP = ("syncfault-integration", "syncfault-app-secret")
SCENARIO = {
    "seed": 4242,
    "salesforce": {"orgs": {ORG: {
        "name": "Sync Fault Co", "edition": "enterprise", "daily_api_limit": 5_000_000,
        "licenses": [{"name": "Salesforce", "total": 20, "used": 4},
                     {"name": "Salesforce Integration", "total": 5, "used": 1}],
        "users": [{"username": "integration@syncfault.example", "name": "Integration",
                   "license": "Salesforce Integration", "password": "Int-2026", "security_token": "TKNINT0001"}]
        + [{"username": u, "name": u.split("@")[0].title(), "password": pw, "security_token": tok}
           for u, pw, tok in USERS],
        "apps": [{"client_id": APP[0], "client_secret": APP[1], "name": "CRM Bridge",
                  "client_credentials_user": "integration@syncfault.example", "redirect_uris": []}],
        "opportunities": {"generate": 30},
    }}},
}


@pytest.fixture(scope="module")
def fault_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxHandle]:
    d = tmp_path_factory.mktemp("sync-sandbox")
    (d / "scenario.yaml").write_text(yaml.safe_dump(SCENARIO))
    handle = start_sandbox(d / "tls", scenario=d / "scenario.yaml", seed=4242)
    try:
        yield handle
    finally:
        handle.http.close()
        handle.process.terminate()
        try:
            handle.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            handle.process.kill()
            handle.process.wait(timeout=5)


@pytest.fixture
def sb(fault_sandbox: SandboxHandle) -> Iterator[SandboxHandle]:
    fault_sandbox.reset()
    yield fault_sandbox
    for w in World.made:
        w.close()
    World.made.clear()


class World:
    made: list[World] = []

    def __init__(self, db: Engine, clock: FrozenClock, sb: SandboxHandle, mode: str) -> None:
        self.db, self.clock, self.sb, self.mode = db, clock, sb, mode
        World.made.append(self)
        self.before_push: Callable[[], None] | None = None
        self.timeout = 30.0
        self.transports: list[Any] = []
        with Session(db, expire_on_commit=False) as s:
            self.tenant = Tenant(name="Sync Fault", slug="syncfault", status="live")
            s.add(self.tenant)
            s.flush()
            settings = {} if mode != "api_user" else {"auth_mode": "oauth_client_credentials", "client_id": APP[0]}
            self.account = CrmAccount(tenant_id=self.tenant.id, provider="salesforce", edition="enterprise",  # type: ignore[arg-type]
                                      label="Salesforce", credential_mode=mode, instance_url=sb.base_url,
                                      settings_json=json.dumps(settings))
            s.add(self.account)
            s.flush()
            self.users: list[AppUser] = []
            for i, (username, pw, tok) in enumerate(USERS, start=1):
                u = AppUser(tenant_id=self.tenant.id, email=f"rep{i}@syncfault-tenant.example", name=f"Rep {i}")  # type: ignore[arg-type]
                s.add(u)
                s.flush()
                s.add(AppUserCrmIdentity(app_user_id=u.id, crm_account_id=self.account.id,  # type: ignore[arg-type]
                                         crm_user_id=f"005REP{i:09d}"))
                if mode != "api_user":
                    vault.put(s, principal=SYSTEM, tenant_id=self.tenant.id, purpose="crm-login",  # type: ignore[arg-type]
                              crm_account_id=self.account.id, app_user_id=u.id, now=clock(),
                              secret=json.dumps({"username": username, "password": pw, "security_token": tok}))
                self.users.append(u)
            if mode == "api_user":
                vault.put(s, principal=SYSTEM, tenant_id=self.tenant.id, purpose="crm-login",  # type: ignore[arg-type]
                          crm_account_id=self.account.id, kind="client_secret", now=clock(),
                          secret=json.dumps({"client_id": APP[0], "client_secret": APP[1]}))
            s.commit()
            ensure_jobs(s, now=clock())
            s.commit()

    def factory(self, ctx: JobContext, cred: Any) -> Provider:
        world = self

        class Wired(SalesforceProvider):
            def push_opportunities(self, changes: Sequence[OpportunityChange]) -> list[PushResult]:
                if world.before_push is not None:
                    world.before_push()
                return super().push_opportunities(changes)

        transport = self.sb.transport(timeout=self.timeout)
        self.transports.append(transport)
        return Wired(account=ctx.account, credential=cred, transport=transport, clock=self.clock)

    def close(self) -> None:
        for t in self.transports:
            t.close()

    def engine(self) -> SyncEngine:
        return SyncEngine(self.db, clock=self.clock, credentials=VaultCredentials(self.db, clock=self.clock),
                          provider_factory=self.factory)

    def change(self, user: int, *, crm_id: str | None = None, **fields: Any) -> None:
        with Session(self.db) as s:
            record_change(session=s, principal=SYSTEM, crm_account_id=self.account.id,  # type: ignore[arg-type]
                          actor_app_user_id=self.users[user].id, crm_id=crm_id, fields=fields,  # type: ignore[arg-type]
                          now=self.clock())
            s.commit()

    def rows(self, model: Any) -> list[Any]:
        with Session(self.db) as s:
            return list(s.exec(select(model).order_by(col(model.id))))


def assert_crm_and_mirror_agree(w: World) -> list[dict[str, Any]]:
    crm = w.sb.http.get(f"/_sandbox/salesforce/{ORG}/opportunities").json()
    mirror = {m.crm_id: m for m in w.rows(SyncOpportunity)}
    assert len(mirror) == len(crm), "the mirror and the CRM hold different numbers of records"
    for rec in crm:
        m = mirror[rec["Id"]]
        assert m.name == rec["Name"], rec["Id"]
        assert m.stage == rec["StageName"], rec["Id"]
        assert m.amount == (Decimal(rec["Amount"]).quantize(Decimal("0.01")) if rec["Amount"] else None), rec["Id"]
        assert (m.close_date.isoformat() if m.close_date else None) == (rec["CloseDate"] or None), rec["Id"]
        assert m.owner_crm_id == rec["OwnerId"], rec["Id"]
        assert m.external_key == rec.get("CrmBridge_Key__c"), rec["Id"]
    keys = [r["CrmBridge_Key__c"] for r in crm if r.get("CrmBridge_Key__c")]
    assert len(keys) == len(set(keys)), "a create reached the CRM twice"
    return crm


def assert_outbox_applied_once(w: World, via: str) -> None:
    rows = w.rows(SyncOutbox)
    assert rows and {r.status for r in rows} == {OutboxStatus.applied}, "an outbox entry was lost or left behind"
    events = [e for e in w.rows(AuditEvent) if e.action.startswith("opportunity.")]
    by_key: dict[str, list[AuditEvent]] = {}
    for e in events:
        by_key.setdefault(json.loads(e.details)["idempotency_key"], []).append(e)
    for r in rows:
        [ev] = by_key[r.idempotency_key]  # exactly one audit event per applied change
        assert ev.actor == r.actor_label and ev.via == via
    with Session(w.db) as s:
        assert verify_chain(s) == []


def test_seeded_5xx_session_expiry_quota_and_timeouts_converge(
    file_engine: Engine, clock: FrozenClock, sb: SandboxHandle, vault_keys: Any,
) -> None:
    w = World(file_engine, clock, sb, "per_user_password")
    engine = w.engine()
    assert {r.status for r in engine.run_due(limit=10)} == {RunStatus.success}  # first pull: 30 records
    pulled = {m.crm_id: m for m in w.rows(SyncOpportunity)}
    assert len(pulled) == 30
    for u in range(3):
        for i in range(60):
            w.change(u, name=f"Rep {u + 1} deal {i:03d}", stage="Prospecting", amount=f"{1000 + i}.50",
                     close_date="2027-03-31")
    for n, crm_id in enumerate(sorted(pulled)[:15]):
        w.change(n % 3, crm_id=crm_id, stage="Negotiation/Review", amount=f"{50_000 + n}")
    clock.advance(minutes=10)

    # Timeouts: the CRM answers slower than our client waits. Every run fails, nothing is applied.
    sb.fault(ORG, latency_ms=1500)
    w.timeout = 0.5
    statuses = [r.status for r in engine.run_due(limit=10)]
    assert statuses == [RunStatus.failed] * 3
    sb.fault(ORG, latency_ms=0)
    w.timeout = 30.0
    for _ in range(2000):  # the slow logins finish on the CRM's side (they only open sessions)
        if sb.inspect(ORG)["salesforce"]["sessions"] >= 3:
            break
    clock.advance(minutes=61)

    # The org's daily API quota runs out: the first REQUEST_LIMIT_EXCEEDED pauses the whole account.
    sb.fault(ORG, quota_exhausted=True)
    calls = sb.inspect(ORG)["runtime"]["calls"]
    results = engine.run_due(limit=10)
    assert [r.status for r in results] == [RunStatus.rate_limited, RunStatus.skipped, RunStatus.skipped]
    assert sb.inspect(ORG)["runtime"]["calls"] - calls == 3  # one login, the refused query, the logout
    assert engine.run_due(limit=10) == []
    sb.fault(ORG, quota_exhausted=False)
    clock.advance(minutes=16)  # the default pause (no retry-after from Salesforce) is 15 minutes

    # Seeded 5xx on 20% of the calls, and sessions that expire between the pull and the push.
    sb.fault(ORG, error_rate=0.2)
    expired = {"n": 0}

    def expire_between_pull_and_push() -> None:
        if expired["n"] < 2:
            expired["n"] += 1
            sb.expire_sessions(ORG)

    w.before_push = expire_between_pull_and_push
    for _step in range(40):
        results = engine.run_due(limit=10)
        statuses += [r.status for r in results]
        pending = [r for r in w.rows(SyncOutbox) if r.status == OutboxStatus.pending]
        if not pending and results and all(r.status == RunStatus.success for r in results):
            break
        clock.advance(minutes=61)  # past any backoff (capped at 1 h)
    else:
        pytest.fail(f"sync did not converge: {statuses}")
    runtime = sb.inspect(ORG)["runtime"]
    assert runtime["injected_errors"] > 0 and RunStatus.failed in statuses
    runs = w.rows(SyncRun)
    assert any("timed out" in (r.error or "").lower() or "time" in (r.error or "").lower() for r in runs
               if r.status == RunStatus.failed), [r.error for r in runs if r.error]
    assert any(r.auth_calls >= 2 for r in runs), "an expired session was renewed inside a run"

    sb.fault(ORG, error_rate=0.0)
    clock.advance(minutes=61)
    assert {r.status for r in engine.run_due(limit=10)} == {RunStatus.success}  # final pull of our writes
    crm = assert_crm_and_mirror_agree(w)
    assert len(crm) == 30 + 180
    assert_outbox_applied_once(w, "own credentials")
    # Nothing applied twice: per user one upsert batch and one update batch reached the CRM, whatever failed.
    assert sb.inspect(ORG)["runtime"]["write_batches"] == 3 * 2
    # Sessions expiring and 5xx never destroyed a credential or parked a user.
    with Session(file_engine) as s:
        assert {j.state for j in s.exec(select(SyncJob))} == {JobState.active}
        for u in w.users:
            assert vault.credential_state(s, tenant_id=w.tenant.id, crm_account_id=w.account.id,  # type: ignore[arg-type]
                                          app_user_id=u.id) == "connected"


def _worker_cmd(db: Engine, now: str, ca: Path) -> list[str]:
    return [sys.executable, "-m", "tests.core.sync.worker_proc", "--db", db.url.render_as_string(hide_password=False),
            "--now", now, "--ca", str(ca), "--name", "doomed"]


def test_worker_killed_while_a_push_is_paused_loses_nothing_and_applies_nothing_twice(
    file_engine: Engine, clock: FrozenClock, sb: SandboxHandle, vault_keys: Any,
) -> None:
    w = World(file_engine, clock, sb, "api_user")
    engine = w.engine()
    assert [r.status for r in engine.run_due()] == [RunStatus.success]
    for i in range(1000):  # five full batches of 200
        w.change(i % 3, name=f"Bulk deal {i:04d}", stage="Qualification", amount=f"{i}.00", close_date="2027-06-30")
    clock.advance(minutes=10)
    sb.fault(ORG, pause_after_batch=2)
    env = {**os.environ, "CRMBRIDGE_VAULT_KEYS": ring_json({TEST_KEK_ID: TEST_KEK}, TEST_KEK_ID),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_worker_cmd(file_engine, clock().isoformat(), sb.ca_file), cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sb.wait_paused(ORG, timeout=60), "the worker never reached the third batch"
        rows = w.rows(SyncOutbox)
        assert sum(r.status == OutboxStatus.applied for r in rows) == 400  # batches 1-2 committed
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # The held batch reaches the CRM after the worker died: applied, but nobody heard the answer.
    before = sb.inspect(ORG)["salesforce"]["opportunities"]
    assert sb.release(ORG) == 1
    for _ in range(500):
        if sb.inspect(ORG)["salesforce"]["opportunities"] == before + 200:
            break
    assert sb.inspect(ORG)["salesforce"]["opportunities"] == before + 200

    assert engine.run_due() == []  # the dead worker's lease still holds
    clock.advance(minutes=6)  # … until it lapses on the injected clock
    [r] = engine.run_due()
    assert r.status == RunStatus.success and r.stats.confirmed == 200 and r.stats.records_out == 400
    runs = {x.worker: x for x in w.rows(SyncRun)}
    assert runs["doomed/0"].status == RunStatus.abandoned

    clock.advance(minutes=10)
    engine.run_due()
    crm = assert_crm_and_mirror_agree(w)
    assert len(crm) == 30 + 1000
    assert_outbox_applied_once(w, "api-user")
    assert sb.inspect(ORG)["runtime"]["write_batches"] == 5  # 2 + the held one + 2: none sent twice
    audit = [e for e in w.rows(AuditEvent) if e.action == "opportunity.create"]
    assert sum(json.loads(e.details).get("confirmed_by_pull", False) for e in audit) == 200
    assert {e.actor for e in audit} == {u.email for u in w.users}  # the real actors, not the API user


def test_authentication_failure_destroys_the_credential_and_parks_only_that_user(
    file_engine: Engine, clock: FrozenClock, sb: SandboxHandle, vault_keys: Any,
) -> None:
    w = World(file_engine, clock, sb, "per_user_password")
    sb.http.post(f"/_sandbox/salesforce/{ORG}/users/{USERS[1][0]}", json={"password": "changed-in-crm"})
    results = w.engine().run_due(limit=10)
    assert sorted(r.status for r in results) == sorted([RunStatus.success, RunStatus.success,
                                                        RunStatus.reconnect_needed])
    with Session(file_engine) as s:
        states = {u.id: vault.credential_state(s, tenant_id=w.tenant.id, crm_account_id=w.account.id,  # type: ignore[arg-type]
                                               app_user_id=u.id) for u in w.users}
        parked = s.exec(select(SyncJob).where(SyncJob.state == JobState.reconnect_needed.value)).one()
    assert states[w.users[1].id] == "reconnect needed"
    assert states[w.users[0].id] == states[w.users[2].id] == "connected"
    assert parked.app_user_id == w.users[1].id
    assert "INVALID_LOGIN" in (parked.last_error_code or "") or "password" in (parked.last_error or "").lower()
    clock.advance(hours=1)
    logins_before = sb.inspect(ORG)["runtime"]["calls"]
    w.engine().run_due(limit=10)
    assert sb.inspect(ORG)["runtime"]["calls"] > logins_before  # the others still sync …
    # … and a reconnect (a new credential in the vault) wakes the parked job.
    with Session(file_engine) as s:
        vault.put(s, principal=SYSTEM, tenant_id=w.tenant.id, purpose="crm-login",  # type: ignore[arg-type]
                  crm_account_id=w.account.id, app_user_id=w.users[1].id, now=clock(),
                  secret=json.dumps({"username": USERS[1][0], "password": "changed-in-crm",
                                     "security_token": USERS[1][2]}))
        s.commit()
        assert ensure_jobs(s, now=clock()).reconnected == 1
        s.commit()
    [again] = [r for r in w.engine().run_due(limit=10) if r.job_id == parked.id]
    assert again.status == RunStatus.success
