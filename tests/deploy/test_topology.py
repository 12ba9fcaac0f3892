"""The production topology of docs/deploy.md, started on this machine as real processes over one
PostgreSQL database: two console replicas (server.py on two ports), two sync workers, two schedulers,
with the CRM sandbox playing NewCo's Salesforce org.

- a tenant admin signs in on console A and carries on on console B with the same cookie (sessions live
  in the database, the secrets are shared), then console A is killed and B keeps working: the admin
  stores the API user's secret there;
- the scheduler wakes the account's sync job within seconds and a worker takes it; that worker is killed
  while its push batch is held by the sandbox (fault injection), and the other worker finishes the job
  once the dead one's lease lapses: one successful run, each change in the CRM exactly once;
- every periodic job ran at most once per interval window despite two schedulers (short intervals), and
  both schedulers took part.

Generous timeouts and polling throughout: the machine may be busy; nothing asserts how long anything took.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.db import make_engine
from tests.conftest import requires_postgres
from tests.fixtures.sandbox import SandboxHandle, free_port, start_sandbox, stop_sandbox, wait_for

ROOT = Path(__file__).resolve().parents[2]
ORG = "newco"  # data/demo/sandbox.yaml: NewCo's org, with an integration app for client credentials
APP_ID, APP_SECRET = "newco-integration", "demo-newco-integration-secret"
ADMIN, PASSWORD = "admin@topo.example", "Topology-Admin-2026!"
CHANGES = 5  # opportunities created in our app, pushed by the job
INTERVALS = {  # job → (its setting, seconds under test)
    "sync-schedule": ("CRMBRIDGE_SCHEDULE_SYNC_SECONDS", 3),
    "sync-wake": ("CRMBRIDGE_SCHEDULE_SYNC_WAKE_SECONDS", 1),
    "vault-sweep": ("CRMBRIDGE_SCHEDULE_VAULT_SWEEP_SECONDS", 3),
    "alerts-run": ("CRMBRIDGE_SCHEDULE_ALERTS_SECONDS", 3),
    "alerts-digest": ("CRMBRIDGE_SCHEDULE_ALERTS_DIGEST_SECONDS", 4),
    "sso-watch": ("CRMBRIDGE_SCHEDULE_SSO_WATCH_SECONDS", 4),
    "posture-snapshot": ("CRMBRIDGE_SCHEDULE_POSTURE_SECONDS", 4),
}
SYNC_LEASE = 15  # seconds: a killed worker's job is taken over after this



@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return f"--- {self.name} ---\n" + self.log.read_text(errors="replace")[-2500:]


@dataclass
class Topology:
    url: str
    engine: Engine
    sandbox: SandboxHandle
    env: dict[str, str]
    tmp: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], **env: str) -> Proc:
        log = self.tmp / f"{name}.log"
        popen = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **env}, stdout=log.open("wb"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = Proc(name, popen, log)
        return self.procs[name]

    def kill(self, name: str) -> None:
        p = self.procs[name].popen
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs.values())

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.popen.poll() is None:
                os.killpg(p.popen.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(timeout=10)


def _database(pg_url: str, name: str) -> str:
    """A fresh database beside the test database (the topology runs migrations on it, as a deploy does)."""
    parts = urlsplit(pg_url)
    admin_url = os.environ.get("CRMBRIDGE_PG_ADMIN_URL") or urlunsplit(parts._replace(path="/postgres"))
    admin = make_engine(admin_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return urlunsplit(parts._replace(path=f"/{name}"))


def _drop(pg_url: str, name: str) -> None:
    parts = urlsplit(pg_url)
    admin = make_engine(os.environ.get("CRMBRIDGE_PG_ADMIN_URL") or urlunsplit(parts._replace(path="/postgres")))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _seed(db: Engine, sandbox: SandboxHandle) -> dict[str, int]:
    """What onboarding leaves behind: a live tenant, its Salesforce account (API user via client
    credentials, no secret stored yet), one app user with changes waiting in the outbox, the tenant's admin."""
    from core.sync.outbox import record_change
    from core.tenants.access import Principal
    from core.tenants.auth import create_console_account
    from core.tenants.models import AppUser, AppUserCrmIdentity, CrmAccount, Tenant

    system = Principal.system("test")
    with Session(db, expire_on_commit=False) as s:
        t = Tenant(name="Topology Co", slug="topo", status="live")
        s.add(t)
        s.flush()
        acc = CrmAccount(tenant_id=t.id, provider="salesforce", edition="enterprise", label="NewCo Salesforce",  # type: ignore[arg-type]
                         credential_mode="api_user", instance_url=sandbox.url(f"/salesforce/{ORG}"),
                         settings_json=json.dumps({"auth_mode": "oauth_client_credentials", "client_id": APP_ID}))
        s.add(acc)
        user = AppUser(tenant_id=t.id, email="nora@topo.example", name="Nora Quinn")  # type: ignore[arg-type]
        s.add(user)
        s.flush()
        s.add(AppUserCrmIdentity(app_user_id=user.id, crm_account_id=acc.id, crm_user_id="005NEWC000000001"))  # type: ignore[arg-type]
        assert acc.id is not None and user.id is not None and t.id is not None
        for i in range(CHANGES):
            record_change(session=s, principal=system, crm_account_id=acc.id, actor_app_user_id=user.id,
                          fields={"name": f"Topology deal {i}", "stage": "Prospecting", "amount": "1000.00",
                                  "close_date": "2027-01-31"})
        create_console_account(s, principal=system, email=ADMIN, role="tenant_admin", tenant_id=t.id,
                               password=PASSWORD, name="Topology Admin")
        s.commit()
        return {"tenant": t.id, "account": acc.id}


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    pg = requires_postgres()
    name = urlsplit(pg).path.lstrip("/") + "_topology"
    url = _database(pg, name)
    sandbox = start_sandbox(tmp_path / "tls")
    ring = {"active": "k1", "keys": {"k1": base64.b64encode(secrets.token_bytes(32)).decode()}}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMBRIDGE_")}
    env.update({
        # production mode: every replica gets the same secret and key ring, nothing is invented
        "CRMBRIDGE_DATABASE_URL": url,
        "CRMBRIDGE_SECRET_KEY": secrets.token_urlsafe(32),
        "CRMBRIDGE_VAULT_KEYS": json.dumps(ring),
        "CRMBRIDGE_SANDBOX_CA_FILE": str(sandbox.ca_file),  # the CRMs' CA (here: the sandbox's)
        "CRMBRIDGE_SANDBOX_URL": sandbox.base_url,  # the one non-vendor origin the URL policy lets through
        "CRMBRIDGE_SMTP_PORT": str(free_port()),
        "CRMBRIDGE_WORKER_POLL_SECONDS": "0.5",
        "CRMBRIDGE_SYNC_LEASE_SECONDS": str(SYNC_LEASE),
        "CRMBRIDGE_SCHEDULER_LEASE_SECONDS": "20",
        "PYTHONUNBUFFERED": "1",
        **{var: str(seconds) for var, seconds in INTERVALS.values()},
    })
    topo = Topology(url=url, engine=make_engine(url), sandbox=sandbox, env=env, tmp=tmp_path)
    try:
        yield topo
    finally:
        topo.stop_all()
        topo.engine.dispose()
        stop_sandbox(sandbox)
        _drop(pg, name)


def _csrf(page: str) -> str:
    m = re.search(r"name=csrf value=['\"]([^'\"]+)['\"]", page)
    assert m, page[:2000]
    return m.group(1)


@pytest.mark.postgres
def test_two_consoles_two_workers_two_schedulers_on_one_postgres(topology: Topology) -> None:
    from core.scheduler.models import PeriodicRun
    from core.sync.models import OutboxStatus, RunStatus, SyncJob, SyncOpportunity, SyncOutbox, SyncRun

    topo, sb = topology, topology.sandbox
    # -- deploy: migrations first, then the processes -----------------------------------------------
    r = subprocess.run([sys.executable, "-m", "core", "db", "upgrade"], cwd=ROOT, env=topo.env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = _seed(topo.engine, sb)
    sb.fault(ORG, pause_after_batch=0)  # the CRM holds every write batch until released
    before = sb.inspect(ORG)["salesforce"]["opportunities"]
    port_a, port_b = free_port(), free_port()
    for name, port in (("console-a", port_a), ("console-b", port_b)):
        topo.start(name, [sys.executable, "server.py"], CRMBRIDGE_PORT=str(port),
                   CRMBRIDGE_PUBLIC_URL=f"http://127.0.0.1:{port_a}")  # the proxy's address in a real deploy
    for i in (1, 2):
        topo.start(f"worker-{i}", [sys.executable, "-m", "core", "sync", "worker"])
        topo.start(f"scheduler-{i}", [sys.executable, "-m", "core", "scheduler"])
    a, b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"

    def healthy(base: str) -> Callable[[], bool]:
        def probe() -> bool:
            dead = [p.name for p in topo.procs.values() if p.popen.poll() is not None]
            assert not dead, f"{dead} exited\n{topo.logs()}"
            try:
                return httpx.get(f"{base}/healthz", timeout=3).status_code == 200
            except httpx.HTTPError:
                return False
        return probe

    wait_for("console A", healthy(a), timeout=180)
    wait_for("console B", healthy(b), timeout=180)

    # -- sign in on A, carry on on B with the same cookie ---------------------------------------------
    creds_path = f"/crm-accounts/{ids['account']}/credentials"
    with httpx.Client(base_url=a, timeout=30) as on_a:
        form = on_a.get("/auth/login")
        assert form.status_code == 200
        signed = on_a.post("/auth/login", data={"email": ADMIN, "password": PASSWORD, "csrf": _csrf(form.text),
                                                "next": creds_path})
        assert signed.status_code == 303 and signed.headers["location"] == creds_path, signed.text[:1000]
        cookies = dict(on_a.cookies)
    # B sits behind the same proxy: the proxy passes the public Host (the console refuses any other)
    public_host = {"Host": f"127.0.0.1:{port_a}"}
    with httpx.Client(base_url=b, timeout=30, headers=public_host) as stranger:
        assert stranger.get(creds_path).status_code == 303  # B does check the session: no cookie, no page
    on_b = httpx.Client(base_url=b, timeout=60, cookies=cookies, headers=public_host)
    page = on_b.get(creds_path)
    assert page.status_code == 200 and "Credentials for NewCo Salesforce" in page.text, page.text[:1000]

    # -- console A dies; B keeps working ------------------------------------------------------------
    topo.kill("console-a")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{a}/healthz", timeout=3)
    page = on_b.get(creds_path)
    stored = on_b.post(creds_path, data={"csrf": _csrf(page.text), "client_secret": APP_SECRET, "test": "1"})
    assert stored.status_code == 200, stored.text[:2000]
    assert "are stored in the vault" in stored.text and "connection test <b>passed</b>" in stored.text, \
        stored.text[:2000]

    # -- the scheduler wakes the job, a worker takes it and is killed mid-push -------------------------
    wait_for("a worker's push held by the CRM", lambda: sb.wait_paused(ORG, timeout=5), timeout=120, every=0)
    with Session(topo.engine) as s:
        job = s.exec(select(SyncJob).where(SyncJob.crm_account_id == ids["account"])).one()
        owner = job.lease_owner or ""
    pid = int(owner.split(":")[1])
    workers = {p.popen.pid: name for name, p in topo.procs.items() if name.startswith("worker-")}
    assert pid in workers, (owner, workers)
    victim = workers[pid]
    survivor = next(n for n in workers.values() if n != victim)
    topo.kill(victim)
    sb.release(ORG)  # the held batch may now reach the CRM, but its answer goes nowhere

    def finished() -> list[SyncRun] | None:
        with Session(topo.engine) as s:
            rows = list(s.exec(select(SyncRun).where(SyncRun.job_id == job.id).order_by(col(SyncRun.id))))
        return rows if any(r.status == RunStatus.success for r in rows) else None

    runs = wait_for("the surviving worker to finish the job", finished, timeout=SYNC_LEASE + 120)
    by_status = Counter(r.status for r in runs)
    seen = [(r.status, r.worker, r.error) for r in runs]
    assert by_status[RunStatus.success] == 1 and by_status[RunStatus.abandoned] == 1, seen
    survivor_pid = topo.procs[survivor].popen.pid
    [ok] = [r for r in runs if r.status == RunStatus.success]
    [dead] = [r for r in runs if r.status == RunStatus.abandoned]
    assert int(ok.worker.split(":")[1]) == survivor_pid and int(dead.worker.split(":")[1]) == pid
    assert set(by_status) <= {RunStatus.success, RunStatus.abandoned, RunStatus.reconnect_needed}
    # each change reached the CRM exactly once, and our mirror knows each record's CRM id
    assert sb.inspect(ORG)["salesforce"]["opportunities"] == before + CHANGES
    with Session(topo.engine) as s:
        assert set(s.exec(select(SyncOutbox.status)).all()) == {OutboxStatus.applied}
        mine = [o.crm_id for o in s.exec(select(SyncOpportunity).where(
            col(SyncOpportunity.name).startswith("Topology deal")))]
    assert len(mine) == CHANGES and all(mine) and len(set(mine)) == CHANGES
    page = on_b.get(creds_path)  # still signed in on B, which shows the stored secret
    assert page.status_code == 200 and f"by {ADMIN}" in page.text
    on_b.close()

    # -- each periodic job once per interval window, two schedulers --------------------------------
    names = tuple(INTERVALS)

    def enough_history() -> list[PeriodicRun] | None:
        with Session(topo.engine) as s:
            rows = list(s.exec(select(PeriodicRun).where(col(PeriodicRun.outcome) != "running")))
        done = Counter(r.job for r in rows)
        return rows if all(done[n] >= 3 for n in names) else None

    history = wait_for("three runs of every periodic job", enough_history, timeout=120, every=1)
    for n in names:
        mine_runs = [r for r in history if r.job == n]
        windows = Counter(r.window_start for r in mine_runs)
        assert set(windows.values()) == {1}, (n, windows)  # never twice in one window
        assert {r.outcome for r in mine_runs} == {"success"}, (n, [(r.outcome, r.error) for r in mine_runs])
        interval = INTERVALS[n][1]
        assert all(r.window_start.timestamp() % interval == 0 for r in mine_runs), n  # its own windows
    owners = Counter(r.owner.split(":")[1] for r in history)
    pids = {str(topo.procs[f"scheduler-{i}"].popen.pid) for i in (1, 2)}
    assert set(owners) == pids, (owners, pids)  # both schedulers took part, neither ran a window twice
