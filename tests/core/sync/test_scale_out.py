"""Four worker processes on PostgreSQL share one queue of 2,000 per-user jobs: each runs exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.clock import FrozenClock
from core.sync.models import OutboxStatus, RunStatus, SyncJob, SyncOpportunity, SyncOutbox, SyncRun
from core.tenants.access import Principal
from core.tenants.audit import record_event, verify_chain
from core.tenants.models import AppUser, AuditEvent, CrmAccount, Tenant
from tests.conftest import requires_postgres

ROOT = Path(__file__).resolve().parents[3]
TENANTS, USERS_PER_TENANT = 20, 100  # 2,000 per-user jobs


def seed(db: Engine, clock: FrozenClock) -> None:
    now = clock()
    with Session(db) as s:
        for t in range(TENANTS):
            tenant = Tenant(name=f"Scale {t}", slug=f"scale-{t}", status="live")
            s.add(tenant)
            s.flush()
            # As create_tenant does: the tenant's audit chain starts with its creation.
            record_event(s, principal=Principal.system("test"), action="tenant.create", tenant_id=tenant.id,
                         target=f"tenant:{tenant.slug}", at=now)
            acc = CrmAccount(tenant_id=tenant.id, provider="salesforce", edition="enterprise", label="SF",  # type: ignore[arg-type]
                             credential_mode="per_user_password", instance_url="https://127.0.0.1:1/sf")
            s.add(acc)
            s.flush()
            users = [AppUser(tenant_id=tenant.id, email=f"u{i}@scale-{t}.example", name=f"U {i}")  # type: ignore[arg-type]
                     for i in range(USERS_PER_TENANT)]
            s.add_all(users)
            s.flush()
            opps = [SyncOpportunity(tenant_id=tenant.id, crm_account_id=acc.id, external_key=f"k-{t}-{u.id}",  # type: ignore[arg-type]
                                    name=f"Deal of {u.email}", stage="Prospecting") for u in users]
            s.add_all(opps)
            s.flush()
            s.add_all([SyncOutbox(tenant_id=tenant.id, crm_account_id=acc.id, opportunity_id=o.id,  # type: ignore[arg-type]
                                  idempotency_key=o.external_key, operation="create", actor_app_user_id=u.id,  # type: ignore[arg-type]
                                  actor_label=u.email, fields_json=json.dumps({"name": o.name, "stage": "Prospecting"}),
                                  created_at=now, updated_at=now) for o, u in zip(opps, users, strict=True)])
            s.add_all([SyncJob(tenant_id=tenant.id, crm_account_id=acc.id, app_user_id=u.id,  # type: ignore[arg-type]
                               owner_key=f"user:{u.id}", next_run_at=now, created_at=now) for u in users])
        s.commit()


@pytest.mark.postgres
def test_four_worker_processes_run_2000_jobs_each_exactly_once(
    file_engine: Engine, clock: FrozenClock, tmp_path: Path,
) -> None:
    url = requires_postgres()
    assert file_engine.dialect.name == "postgresql"
    seed(file_engine, clock)
    results = tmp_path / "applied.jsonl"
    logs = [tmp_path / f"w{i}.log" for i in range(4)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.core.sync.worker_proc", "--db", url, "--now", clock().isoformat(),
         "--fake", str(results), "--name", f"w{i}"],
        cwd=str(ROOT), stdout=log.open("w"), stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    try:
        for p, log in zip(procs, logs, strict=True):
            assert p.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    applied = [json.loads(line) for line in results.read_text().splitlines()]
    keys = Counter(a["key"] for a in applied)
    assert len(keys) == TENANTS * USERS_PER_TENANT and set(keys.values()) == {1}  # each change once
    assert {a["n"] for a in applied} == {1}
    with Session(file_engine) as s:
        per_job = Counter(r.job_id for r in s.exec(select(SyncRun)))
        assert len(per_job) == 2000 and set(per_job.values()) == {1}  # each job exactly once
        bad = [(r.status, r.error) for r in s.exec(select(SyncRun).where(SyncRun.status != RunStatus.success.value))]
        assert bad == []
        workers = Counter(w.split("/")[0] for w in s.exec(select(SyncRun.worker)).all())
        assert len(workers) >= 3, workers  # the work really was shared
        assert set(s.exec(select(SyncOutbox.status)).all()) == {OutboxStatus.applied}
        creates = s.exec(select(func.count()).select_from(AuditEvent)
                         .where(AuditEvent.action == "opportunity.create")).one()
        assert creates == 2000
        assert verify_chain(s) == []
