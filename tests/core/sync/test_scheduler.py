"""The scheduler: one job per (account, credential owner); parked jobs wake on a new credential; the
vault sweep runs with it; the CLI registers ``sync worker`` and ``sync schedule``; the demo has a story."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.clock import FrozenClock
from core.sync.models import JobState, SyncJob, SyncRun
from core.sync.scheduler import ensure_jobs, run_scheduler, wake_reconnected
from core.tenants.access import Principal
from core.tenants.audit import verify_chain
from core.tenants.models import AppUser, AppUserCrmIdentity, AuditEvent, CrmAccount, Tenant
from core.vault import service as vault

SYSTEM = Principal.system("test")


def world(db: Engine, *, mode: str, users: int = 3, status: str = "live") -> tuple[Tenant, CrmAccount, list[AppUser]]:
    with Session(db, expire_on_commit=False) as s:
        t = Tenant(name="Acme", slug="acme", status=status)
        s.add(t)
        s.flush()
        a = CrmAccount(tenant_id=t.id, provider="salesforce", edition="enterprise", label="SF",  # type: ignore[arg-type]
                       credential_mode=mode, instance_url="https://127.0.0.1:1/sf")
        s.add(a)
        s.flush()
        made = []
        for i in range(users):
            u = AppUser(tenant_id=t.id, email=f"u{i}@acme.example", name=f"U{i}")  # type: ignore[arg-type]
            s.add(u)
            s.flush()
            s.add(AppUserCrmIdentity(app_user_id=u.id, crm_account_id=a.id, crm_user_id=f"005U{i:010d}"))  # type: ignore[arg-type]
            made.append(u)
        s.commit()
        return t, a, made


def jobs(db: Engine) -> list[SyncJob]:
    with Session(db) as s:
        return list(s.exec(select(SyncJob).order_by(col(SyncJob.id))))


def test_api_user_account_has_one_job_per_account(file_engine: Engine, clock: FrozenClock) -> None:
    world(file_engine, mode="api_user")
    with Session(file_engine) as s:
        assert ensure_jobs(s, now=clock()).created == 1
        s.commit()
        assert ensure_jobs(s, now=clock()).created == 0  # idempotent
        s.commit()
    [j] = jobs(file_engine)
    assert j.app_user_id is None and j.owner_key == "account" and j.state == JobState.active


def test_per_user_account_has_one_job_per_user_parked_until_a_credential_arrives(
    file_engine: Engine, clock: FrozenClock, vault_keys: Any,
) -> None:
    t, a, users = world(file_engine, mode="per_user_password")
    with Session(file_engine) as s:
        vault.put(s, principal=SYSTEM, tenant_id=t.id, purpose="crm-login", crm_account_id=a.id,  # type: ignore[arg-type]
                  app_user_id=users[0].id, secret=json.dumps({"username": "u0", "password": "p"}), now=clock())
        s.commit()
        assert ensure_jobs(s, now=clock()).created == 3
        s.commit()
    states = {j.app_user_id: j.state for j in jobs(file_engine)}
    assert states == {users[0].id: JobState.active, users[1].id: JobState.reconnect_needed,
                      users[2].id: JobState.reconnect_needed}
    clock.advance(hours=1)
    with Session(file_engine) as s:  # user 2 used their connect link
        vault.put(s, principal=SYSTEM, tenant_id=t.id, purpose="crm-login", crm_account_id=a.id,  # type: ignore[arg-type]
                  app_user_id=users[2].id, secret=json.dumps({"username": "u2", "password": "p"}), now=clock())
        s.commit()
        assert ensure_jobs(s, now=clock()).reconnected == 1
        s.commit()
        assert s.exec(select(AuditEvent).where(AuditEvent.action == "sync.reconnected")).one().target == \
            f"app_user:{users[2].id}"
    woke = next(j for j in jobs(file_engine) if j.app_user_id == users[2].id)
    assert woke.state == JobState.active and woke.next_run_at == clock()


def test_reconnect_wake_up_wakes_only_the_user_who_reconnected_and_only_after_the_park(
    file_engine: Engine, clock: FrozenClock, vault_keys: Any,
) -> None:
    """The frequent, cheap pass (the scheduler's sync-wake job, every few seconds): a user who used their
    connect link syncs at once; a user whose only credential predates the park stays parked."""
    t, a, users = world(file_engine, mode="per_user_password")
    with Session(file_engine) as s:
        assert ensure_jobs(s, now=clock()).created == 3  # nobody connected yet: all parked
        s.commit()
        parked = {j.app_user_id: j for j in jobs(file_engine)}
        assert {j.state for j in parked.values()} == {JobState.reconnect_needed}
        assert wake_reconnected(s, now=clock()) == 0
        s.commit()
        clock.advance(minutes=3)
        vault.put(s, principal=SYSTEM, tenant_id=t.id, purpose="crm-login", crm_account_id=a.id,  # type: ignore[arg-type]
                  app_user_id=users[1].id, secret=json.dumps({"username": "u1", "password": "p"}), now=clock())
        s.commit()
        # user 2 is parked again later (say their credential failed), after storing one earlier
        vault.put(s, principal=SYSTEM, tenant_id=t.id, purpose="crm-login", crm_account_id=a.id,  # type: ignore[arg-type]
                  app_user_id=users[2].id, secret=json.dumps({"username": "u2", "password": "p"}), now=clock())
        job2 = s.get(SyncJob, parked[users[2].id].id)
        assert job2 is not None
        job2.reconnect_since = clock() + timedelta(minutes=1)
        s.add(job2)
        s.commit()
        clock.advance(minutes=2)
        assert wake_reconnected(s, now=clock()) == 1
        s.commit()
        assert wake_reconnected(s, now=clock()) == 0  # nothing left to wake
        s.commit()
        [event] = s.exec(select(AuditEvent).where(AuditEvent.action == "sync.reconnected")).all()
        assert event.target == f"app_user:{users[1].id}"
    after = {j.app_user_id: j for j in jobs(file_engine)}
    assert after[users[1].id].state == JobState.active and after[users[1].id].next_run_at == clock()
    assert after[users[0].id].state == JobState.reconnect_needed
    assert after[users[2].id].state == JobState.reconnect_needed


def test_mode_switch_and_inactive_users_and_tenants_disable_jobs(file_engine: Engine, clock: FrozenClock) -> None:
    t, a, users = world(file_engine, mode="per_user_password", users=2)
    with Session(file_engine) as s:
        ensure_jobs(s, now=clock())
        s.commit()
        u = s.get(AppUser, users[0].id)
        u.status = "disabled"  # type: ignore[union-attr]
        s.add(u)
        s.commit()
        assert ensure_jobs(s, now=clock()).disabled == 1
        s.commit()
        acc = s.get(CrmAccount, a.id)
        acc.credential_mode = "api_user"  # type: ignore[union-attr]
        s.add(acc)
        s.commit()
        result = ensure_jobs(s, now=clock())
        s.commit()
    assert result.created == 1 and result.disabled == 1
    by_owner = {j.owner_key: j.state for j in jobs(file_engine)}
    assert by_owner["account"] == JobState.active
    assert {v for k, v in by_owner.items() if k != "account"} == {JobState.disabled}


def test_onboarding_tenant_gets_no_job_yet(file_engine: Engine, clock: FrozenClock) -> None:
    world(file_engine, mode="api_user", status="onboarding")
    with Session(file_engine) as s:
        assert ensure_jobs(s, now=clock()).created == 0


def test_scheduler_pass_runs_the_vault_sweep(file_engine: Engine, clock: FrozenClock, vault_keys: Any) -> None:
    t, a, users = world(file_engine, mode="per_user_password", users=1)
    with Session(file_engine) as s:
        vault.put(s, principal=SYSTEM, tenant_id=t.id, purpose="crm-login", crm_account_id=a.id,  # type: ignore[arg-type]
                  app_user_id=users[0].id, secret=json.dumps({"username": "u0", "password": "p"}), now=clock())
        s.commit()
    result = run_scheduler(file_engine, now=clock())
    assert result.created == 1 and result.swept == 0
    clock.advance(days=31)  # past the 30-day TTL of a stored password
    assert run_scheduler(file_engine, now=clock()).swept == 1
    with Session(file_engine) as s:
        assert vault.credential_state(s, tenant_id=t.id, crm_account_id=a.id,  # type: ignore[arg-type]
                                      app_user_id=users[0].id) == "reconnect needed"


def test_cli_registers_worker_and_schedule() -> None:
    from core.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["sync", "worker", "--once", "--concurrency", "4"])
    assert args.once and args.concurrency == 4 and callable(args.func)
    assert callable(parser.parse_args(["sync", "schedule"]).func)


def test_demo_history_tells_each_tenants_story(file_engine: Engine, vault_keys: Any) -> None:
    from core.clock import utcnow
    from core.demo import read_scenario
    from core.sync.demo import load_demo
    from core.sync.service import sync_overview

    scenario = read_scenario()
    with Session(file_engine) as s:
        from core.connections.demo_credentials import load_demo as load_vault_demo
        from core.demo import load_scenario

        slugs = load_scenario(s, scenario)
        now = utcnow()
        # core.demo runs the vault's demo first: the users' stored logins decide which jobs can run.
        load_vault_demo(s, scenario=scenario, principal=Principal.system("demo"), now=now, tenants=slugs)
        assert load_demo(s, scenario=scenario, principal=Principal.system("demo"), now=now, tenants=slugs) > 0
        s.commit()
        assert s.exec(select(SyncRun)).first() is not None
        tiny = sync_overview(session=s, principal=SYSTEM, tenant_id=slugs["tinyco"], now=now)
        assert {u.sync for u in tiny.users} >= {"failing", "paused"}
        assert "reconnect needed" in {u.auth for u in tiny.users}
        prof = sync_overview(session=s, principal=SYSTEM, tenant_id=slugs["profco"], now=now)
        assert any("API_DISABLED_FOR_ORG" in (u.last_error or "") and u.last_error_fix for u in prof.users)
        hub = sync_overview(session=s, principal=SYSTEM, tenant_id=slugs["hubco"], now=now)
        assert [a.sync for a in hub.accounts] == ["paused"]
        assert verify_chain(s) == []
