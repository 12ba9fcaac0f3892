"""The sync engine against an in-test provider: pull, push, merge, faults, leases, attribution."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlmodel import Session, col, select

from core.errors import AuthenticationFailed, ProviderUnavailable, RateLimited
from core.sync.engine import RunResult, SyncEngine
from core.sync.health import user_health
from core.sync.jobs import backoff_delay, claim_jobs
from core.sync.models import (
    JobState,
    OutboxStatus,
    RunStatus,
    SyncConflict,
    SyncJob,
    SyncOpportunity,
    SyncOutbox,
    SyncRun,
)
from core.sync.outbox import record_change
from core.sync.scheduler import ensure_jobs
from core.tenants.access import Principal
from core.tenants.audit import verify_chain
from core.tenants.models import AuditEvent
from tests.fixtures.sync import SyncWorld, make_sync_world

SYSTEM = Principal.system("test")


def schedule(w: SyncWorld) -> list[SyncJob]:
    """Create the jobs. The fake credentials are not in the vault, so per-user jobs (which the scheduler
    parks until a credential exists) are switched on here."""
    with w.session() as s:
        ensure_jobs(s, now=w.clock())
        for j in s.exec(select(SyncJob).where(SyncJob.state == JobState.reconnect_needed.value)):
            j.state = JobState.active.value
            s.add(j)
        s.commit()
        return list(s.exec(select(SyncJob).order_by(col(SyncJob.id))))


def run(w: SyncWorld, engine: SyncEngine | None = None, limit: int = 10) -> list[RunResult]:
    return (engine or w.engine()).run_due(worker="w1", limit=limit)


def change(w: SyncWorld, user: int = 0, *, crm_id: str | None = None, **fields: object) -> SyncOutbox:
    with w.session() as s:
        row = record_change(session=s, principal=SYSTEM, crm_account_id=w.account.id,  # type: ignore[arg-type]
                            actor_app_user_id=w.users[user].id, crm_id=crm_id, fields=fields,  # type: ignore[arg-type]
                            now=w.clock())
        s.commit()
        return row


def outbox(w: SyncWorld) -> list[SyncOutbox]:
    with w.session() as s:
        return list(s.exec(select(SyncOutbox).order_by(col(SyncOutbox.id))))


def mirror(w: SyncWorld) -> dict[str, SyncOpportunity]:
    with w.session() as s:
        return {m.crm_id or f"new:{m.external_key}": m for m in s.exec(select(SyncOpportunity))}


def events(w: SyncWorld, action: str) -> list[AuditEvent]:
    with w.session() as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == action).order_by(col(AuditEvent.id))))


def job(w: SyncWorld, job_id: int | None = None) -> SyncJob:
    with w.session() as s:
        stmt = select(SyncJob)
        if job_id is not None:
            stmt = stmt.where(SyncJob.id == job_id)
        return s.exec(stmt.order_by(col(SyncJob.id))).first()  # type: ignore[return-value]


def test_pull_fills_the_mirror_and_a_second_pull_only_rereads_the_overlap(sync_world: SyncWorld) -> None:
    w = sync_world
    ids = [w.crm.add(name=f"Deal {i}", amount=f"{i}000") for i in range(5)]
    schedule(w)
    [r] = run(w)
    assert r.status == RunStatus.success and r.stats.records_in == 5
    m = mirror(w)
    assert set(m) == set(ids)
    assert m[ids[3]].name == "Deal 3" and str(m[ids[3]].amount) == "3000.00"
    assert job(w).watermark == w.clock()

    w.clock.advance(minutes=10)
    w.crm.touch(ids[0], stage="Closed Won")
    [r2] = run(w)
    assert r2.stats.records_in == 1 and mirror(w)[ids[0]].stage == "Closed Won"
    # A record committed late with a stamp inside the overlap window is still picked up.
    late = w.crm.add(name="Late", modified_at=w.clock() - timedelta(minutes=3))
    w.clock.advance(minutes=10)
    run(w)
    assert late in mirror(w)


def test_create_is_pushed_once_with_real_actor_and_via_api_user(sync_world: SyncWorld) -> None:
    w = sync_world
    schedule(w)
    row = change(w, 1, name="Big deal", stage="Prospecting", amount="25000", close_date="2027-01-31")
    [r] = run(w)
    assert r.status == RunStatus.success and r.stats.records_out == 1
    [o] = outbox(w)
    assert o.status == OutboxStatus.applied and o.via == "api-user"
    crm_id = w.crm.by_key[row.idempotency_key]
    assert w.crm.records[crm_id]["amount"] == "25000.00"
    assert mirror(w)[crm_id].external_key == row.idempotency_key
    [ev] = events(w, "opportunity.create")
    assert ev.actor == "user2@acme.example" and ev.via == "api-user" and ev.target == f"opportunity:{crm_id}"
    assert json.loads(ev.details)["fields"]["amount"] == "25000.00"
    # The API user writes on the actor's behalf: the CRM gets the actor's CRM id (Dynamics impersonation).
    assert w.crm.writes[0]["act_as"] == "005USER00000002"

    w.clock.advance(minutes=10)
    run(w)  # pulls our own write back: no second write, no duplicate mirror row
    assert w.crm.applied[row.idempotency_key] == 1
    assert len(mirror(w)) == 1
    with w.session() as s:
        assert verify_chain(s) == []


def test_push_uses_the_largest_batches_and_the_minimum_of_calls(sync_world: SyncWorld) -> None:
    w = sync_world
    ids = [w.crm.add(name=f"D{i}") for i in range(450)]
    schedule(w)
    run(w)
    w.providers.clear()
    for i in ids:
        change(w, 0, crm_id=i, stage="Qualification")
    w.clock.advance(minutes=10)
    [r] = run(w)
    [p] = w.providers
    assert p.batches == [200, 200, 50]
    # Minimum: one page to pull (450 ≤ 2,000) + ceil(450 / 200) = 3 writes.
    assert r.stats.api_calls == 1 + 3 and r.stats.auth_calls == 1
    assert all(o.status == OutboxStatus.applied for o in outbox(w))
    assert all(w.crm.records[i]["stage"] == "Qualification" for i in ids)


def test_per_record_errors_stay_on_their_outbox_rows(sync_world: SyncWorld) -> None:
    w = sync_world
    schedule(w)
    good = change(w, 0, name="Fine", amount="10")
    bad = change(w, 0, name="Broken", amount="-5")
    [r] = run(w)
    assert r.status == RunStatus.partial and r.stats.records_out == 1 and r.stats.records_failed == 1
    rows = {o.idempotency_key: o for o in outbox(w)}
    assert rows[good.idempotency_key].status == OutboxStatus.applied
    assert rows[bad.idempotency_key].status == OutboxStatus.failed
    assert "must not be negative" in (rows[bad.idempotency_key].last_error or "")
    assert rows[bad.idempotency_key].last_error_code == "FIELD_INTEGRITY_EXCEPTION"
    # A rejected record does not make the user unhealthy: the sync itself ran.
    assert job(w).consecutive_failures == 0


def test_conflicts_crm_wins_on_crm_fields_app_wins_on_app_fields_each_recorded(
    file_engine, clock  # type: ignore[no-untyped-def]
) -> None:
    w = make_sync_world(file_engine, clock, settings_json=json.dumps({"app_field_map": {"next_step": "NextStep"}}))
    crm_id = w.crm.add(name="Deal", stage="Prospecting", amount="100", NextStep="Call")
    schedule(w)
    run(w)
    # The app user changes stage, amount and next step …
    change(w, 0, crm_id=crm_id, stage="Negotiation", amount="150", next_step="Send contract")
    # … while someone changes stage and next step in the CRM.
    clock.advance(minutes=1)
    w.crm.touch(crm_id, stage="Closed Lost", NextStep="Give up")
    clock.advance(minutes=10)
    [r] = run(w)
    assert r.stats.conflicts == 2
    with w.session() as s:
        conflicts = {c.field: c for c in s.exec(select(SyncConflict))}
    assert conflicts["stage"].winner == "crm" and conflicts["stage"].app_value == "Negotiation"
    assert conflicts["stage"].crm_value == "Closed Lost"
    assert conflicts["next_step"].winner == "app" and conflicts["next_step"].crm_value == "Give up"
    rec = w.crm.records[crm_id]
    assert rec["stage"] == "Closed Lost"  # CRM-owned: the CRM's value stands
    assert rec["amount"] == "150.00"  # the CRM did not touch amount: ours went through
    assert rec["NextStep"] == "Send contract"  # app-owned: ours wins
    m = mirror(w)[crm_id]
    assert m.stage == "Closed Lost" and str(m.amount) == "150.00"
    assert json.loads(m.app_fields_json)["next_step"] == "Send contract"


def test_a_change_the_crm_overrode_entirely_is_superseded_not_lost(sync_world: SyncWorld) -> None:
    w = sync_world
    crm_id = w.crm.add(name="Deal", stage="Prospecting")
    schedule(w)
    run(w)
    change(w, 0, crm_id=crm_id, stage="Negotiation")
    w.clock.advance(minutes=1)
    w.crm.touch(crm_id, stage="Closed Won")
    w.clock.advance(minutes=10)
    run(w)
    [o] = outbox(w)
    assert o.status == OutboxStatus.superseded and "CRM's values were kept" in (o.last_error or "")
    assert w.crm.applied[o.idempotency_key] == 0
    assert mirror(w)[crm_id].stage == "Closed Won"


def test_a_push_whose_answer_was_lost_is_confirmed_by_the_next_pull_not_applied_twice(
    sync_world: SyncWorld,
) -> None:
    w = sync_world
    crm_id = w.crm.add(name="Deal", stage="Prospecting")
    schedule(w)
    run(w)
    upd = change(w, 0, crm_id=crm_id, stage="Negotiation")
    new = change(w, 1, name="Brand new", amount="500")
    w.crm.fail("push", ProviderUnavailable("read timeout after the CRM applied the batch"), after_apply=True)
    w.clock.advance(minutes=10)
    [r] = run(w)
    assert r.status == RunStatus.failed
    assert {o.status for o in outbox(w)} == {OutboxStatus.pending}
    w.clock.advance(hours=2)
    [r2] = run(w)
    assert r2.status == RunStatus.success and r2.stats.confirmed == 2 and r2.stats.records_out == 0
    assert w.crm.applied[upd.idempotency_key] == 1 and w.crm.applied[new.idempotency_key] == 1
    assert {o.status for o in outbox(w)} == {OutboxStatus.applied}
    assert len(events(w, "opportunity.update")) == 1 and len(events(w, "opportunity.create")) == 1


def test_a_write_batch_the_crm_refused_counts_one_attempt_on_each_of_its_changes_and_keeps_them(
    sync_world: SyncWorld,
) -> None:
    """The user sees on each change why it has not reached the CRM yet, and that it will be retried."""
    w = sync_world
    schedule(w)
    run(w)
    first, second = change(w, 0, name="One", stage="Prospecting"), change(w, 1, name="Two", stage="Prospecting")
    w.crm.fail("push", ProviderUnavailable("Salesforce answered HTTP 503 while writing opportunities"))
    w.clock.advance(minutes=10)
    [r] = run(w)
    assert r.status == RunStatus.failed
    rows = {o.idempotency_key: o for o in outbox(w)}
    for key in (first.idempotency_key, second.idempotency_key):
        assert rows[key].status == OutboxStatus.pending and rows[key].attempts == 1
        assert "HTTP 503" in (rows[key].last_error or "")
    assert events(w, "opportunity.create") == []
    w.clock.advance(hours=2)
    [r2] = run(w)
    assert r2.status == RunStatus.success and r2.stats.records_out == 2
    rows = {o.idempotency_key: o for o in outbox(w)}
    assert all(o.status == OutboxStatus.applied and o.attempts == 2 and o.last_error is None for o in rows.values())


def test_transient_failures_back_off_with_seeded_jitter_and_fail_only_after_three(sync_world: SyncWorld) -> None:
    w = sync_world
    [j] = schedule(w)
    assert j.id is not None
    w.crm.fail("pull", ProviderUnavailable("HTTP 503 from the CRM"), times=3)
    delays = []
    for n in range(1, 4):
        before = w.clock()
        [r] = run(w)
        assert r.status == RunStatus.failed
        cur = job(w)
        delay = cur.next_run_at - before
        assert delay == backoff_delay(n, job_id=j.id, seed=0)  # deterministic
        base = 30 * 2 ** (n - 1)
        assert timedelta(seconds=base / 2) <= delay <= timedelta(seconds=base)  # jittered, exponential
        delays.append(delay)
        [h] = user_health_rows(w)
        assert h.sync == ("failing" if n == 3 else "healthy"), n
        assert "retries by itself" in (h.last_error_fix or "")
        assert run(w) == []  # not due before its backoff
        w.clock.now = cur.next_run_at
    assert len(events(w, "sync.failing")) == 1
    [r] = run(w)
    assert r.status == RunStatus.success
    [h] = user_health_rows(w)
    assert h.sync == "healthy" and h.consecutive_failures == 0
    [rec] = events(w, "sync.recovered")
    assert json.loads(rec.details)["after_failures"] == 3
    assert backoff_delay(2, job_id=1, seed=7) != backoff_delay(2, job_id=2, seed=7)  # jobs spread out


def user_health_rows(w: SyncWorld):  # type: ignore[no-untyped-def]
    with w.session() as s:
        return user_health(s, tenant_id=w.tenant.id, now=w.clock())  # type: ignore[arg-type]


def test_rate_limit_pauses_the_whole_account_for_retry_after(file_engine, clock) -> None:  # type: ignore[no-untyped-def]
    w = make_sync_world(file_engine, clock, mode="per_user_password", users=3)
    jobs = schedule(w)
    assert len(jobs) == 3 and {j.state for j in jobs} == {JobState.active}
    w.crm.fail("pull", RateLimited("REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded.", retry_after=120))
    results = run(w, limit=1)
    assert [r.status for r in results] == [RunStatus.rate_limited]
    assert run(w) == []  # the other users' jobs are due, but their account is paused
    [h, *_] = user_health_rows(w)
    assert h.sync == "paused" and "rate-limited" in h.sync_reason
    assert len(events(w, "sync.account.rate_limited")) == 1
    clock.advance(seconds=119)
    assert run(w) == []
    clock.advance(seconds=2)
    assert sorted(r.status for r in run(w)) == [RunStatus.success] * 3
    assert job(w).consecutive_failures == 0  # a pause is not a failure


def test_authentication_failure_self_destructs_once_and_parks_the_job(file_engine, clock) -> None:  # type: ignore[no-untyped-def]
    w = make_sync_world(file_engine, clock, mode="per_user_password", users=2)
    schedule(w)
    w.crm.passwords = set()  # user 1's password was changed in the CRM
    w.credentials.password = "old-password"
    results = run(w)
    assert {r.status for r in results} == {RunStatus.reconnect_needed}
    assert sorted(w.credentials.reports) == sorted(u.id for u in w.users)  # reported once per user
    assert w.crm.logins == 2  # one attempt each: no retry that could lock the CRM user out
    w.clock.advance(hours=3)
    assert run(w) == []  # parked: no more logins
    rows = user_health_rows(w)
    assert {r.auth for r in rows} == {"reconnect needed"} and {r.sync for r in rows} == {"paused"}
    assert "reconnect" in (rows[0].last_error_fix or "")
    assert len(events(w, "sync.reconnect_needed")) == 2


def test_per_user_jobs_push_only_their_own_changes_with_own_credentials(file_engine, clock) -> None:  # type: ignore[no-untyped-def]
    w = make_sync_world(file_engine, clock, mode="per_user_password", users=2)
    schedule(w)
    a = change(w, 0, name="A's deal")
    b = change(w, 1, name="B's deal")
    with w.session() as s:
        first = s.exec(select(SyncJob).where(SyncJob.app_user_id == w.users[0].id)).one()
        others = s.exec(select(SyncJob).where(SyncJob.app_user_id != w.users[0].id)).all()
        for o in others:
            o.next_run_at = clock() + timedelta(hours=1)
            s.add(o)
        s.commit()
    [r] = run(w)
    assert r.job_id == first.id
    assert w.crm.applied[a.idempotency_key] == 1 and w.crm.applied[b.idempotency_key] == 0
    assert w.crm.writes[0]["act_as"] is None  # the user writes as themselves
    [ev] = events(w, "opportunity.create")
    assert ev.actor == "user1@acme.example" and ev.via == "own credentials"


def test_salesforce_attribution_field_only_when_enabled_and_declared(file_engine, clock) -> None:  # type: ignore[no-untyped-def]
    w = make_sync_world(file_engine, clock, settings_json=json.dumps({"attribution_field": "CrmBridge_Actor__c"}))
    schedule(w)
    change(w, 0, name="Deal")
    run(w)
    assert w.crm.writes[0]["attribution"] == "user1@acme.example"
    [ev] = events(w, "opportunity.create")
    assert json.loads(ev.details)["attribution_field"] == "CrmBridge_Actor__c"

    w2 = make_sync_world(file_engine, clock, slug="beta")  # no attribution field set up
    schedule(w2)
    change(w2, 0, name="Deal")
    run(w2)
    assert w2.crm.writes[0]["attribution"] is None


def test_a_dead_workers_lease_lapses_and_the_slow_worker_cannot_write(sync_world: SyncWorld) -> None:
    w = sync_world
    schedule(w)
    [dead] = claim_jobs(w.db, worker="dead", now=w.clock(), limit=5)
    assert claim_jobs(w.db, worker="other", now=w.clock(), limit=5) == []  # leased
    w.clock.advance(minutes=4)
    assert claim_jobs(w.db, worker="other", now=w.clock(), limit=5) == []
    w.clock.advance(minutes=2)  # past the 5-minute lease
    change(w, 0, name="Deal")
    [r] = run(w)
    assert r.status == RunStatus.success
    with w.session() as s:
        runs = {x.worker: x for x in s.exec(select(SyncRun))}
    assert runs["dead"].status == RunStatus.abandoned
    # The "dead" worker was only slow: when it wakes up, it must not write anything.
    before = len(outbox(w))
    late = w.engine().run_claim(dead)
    assert late.status == RunStatus.lease_lost
    assert len(outbox(w)) == before and w.crm.calls["push"] == 1


def test_claims_hand_each_due_job_to_one_worker(file_engine, clock) -> None:  # type: ignore[no-untyped-def]
    w = make_sync_world(file_engine, clock, mode="per_user_password", users=5)
    schedule(w)
    a = claim_jobs(w.db, worker="a", now=clock(), limit=3)
    b = claim_jobs(w.db, worker="b", now=clock(), limit=3)
    assert len(a) == 3 and len(b) == 2
    assert not {c.job_id for c in a} & {c.job_id for c in b}


def test_missing_credential_parks_without_calling_the_crm(file_engine, clock) -> None:  # type: ignore[no-untyped-def]
    w = make_sync_world(file_engine, clock, mode="per_user_password", users=1)
    schedule(w)
    w.credentials.missing.add(w.users[0].id)
    [r] = run(w)
    assert r.status == RunStatus.reconnect_needed and w.crm.logins == 0
    assert w.credentials.reports == []


@pytest.mark.parametrize("mode,via", [("api_user", "api-user"), ("per_user_password", "own credentials")])
def test_every_pushed_change_is_audited_with_actor_and_via(file_engine, clock, mode, via) -> None:  # type: ignore[no-untyped-def]
    w = make_sync_world(file_engine, clock, mode=mode, users=2)
    schedule(w)
    for u in (0, 1, 0):
        change(w, u, name=f"deal by {u}")
    run(w)
    evs = events(w, "opportunity.create")
    assert sorted(e.actor for e in evs) == ["user1@acme.example", "user1@acme.example", "user2@acme.example"]
    assert {e.via for e in evs} == {via}
    assert {e.actor_role for e in evs} == {"app_user"}


def test_login_failure_from_the_crm_maps_to_reconnect(sync_world: SyncWorld) -> None:
    w = sync_world
    schedule(w)
    w.crm.fail("login", AuthenticationFailed("invalid_grant: refresh token revoked", code="invalid_grant"))
    [r] = run(w)
    assert r.status == RunStatus.reconnect_needed
    [h] = user_health_rows(w)
    assert h.auth == "failed"  # an API user: the admin fixes it, nobody "reconnects"
    with Session(w.db) as s:
        assert s.exec(select(SyncJob)).one().state == JobState.reconnect_needed


def test_a_refresh_token_the_crm_rotates_is_stored_back_in_the_vault(file_engine, clock, vault_keys) -> None:  # type: ignore[no-untyped-def]
    from core.sync.engine import VaultCredentials
    from core.vault import service as vault
    from tests.fixtures.sync import FakeProvider

    w = make_sync_world(file_engine, clock, mode="per_user_oauth", users=1)
    with w.session() as s:
        vault.put(s, principal=SYSTEM, tenant_id=w.tenant.id, purpose="crm-login", crm_account_id=w.account.id,  # type: ignore[arg-type]
                  app_user_id=w.users[0].id, kind="oauth_refresh", now=clock(),
                  secret=json.dumps({"refresh_token": "rt-1", "password": "right-password"}))
        s.commit()
    schedule(w)

    class Rotating(FakeProvider):
        def pull_opportunities(self, since):  # type: ignore[no-untyped-def]
            self.credential.on_update({"refresh_token": "rt-2"})  # type: ignore[attr-defined]
            yield from super().pull_opportunities(since)

    engine = SyncEngine(file_engine, clock=clock, credentials=VaultCredentials(file_engine, clock=clock),
                        provider_factory=lambda ctx, cred: Rotating(w.crm, cred))
    [r] = engine.run_due()
    assert r.status == RunStatus.success
    with w.session() as s:
        ref = vault.find_credential(s, tenant_id=w.tenant.id, crm_account_id=w.account.id,  # type: ignore[arg-type]
                                    app_user_id=w.users[0].id, purpose="crm-login")
        with vault.use(s, ref, principal=SYSTEM, reason="test", now=clock()) as secret:  # type: ignore[arg-type]
            stored = json.loads(secret.get_secret_value())
    assert stored == {"refresh_token": "rt-2", "password": "right-password"}
