"""The processes as a user starts them: `make run` (core.runner) brings up the sandbox, the console, a
scheduler and a sync worker and stops them all on SIGTERM; a command typed by hand in another terminal
(no CRMBRIDGE_SANDBOX_CA_FILE) reaches the sandbox exactly as the processes `make run` started do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, col, select

from core import migrate
from core.db import make_engine
from core.settings import ROOT, SANDBOX_CA_FILE, SANDBOX_TLS_DIR, Settings
from tests.conftest import PG_URL
from tests.fixtures.sandbox import SandboxHandle, free_port, start_sandbox, stop_sandbox, wait_for
from tests.fixtures.vault import TEST_KEK, TEST_KEK_ID, ring_json


def hand_env(**extra: str) -> dict[str, str]:
    """A fresh terminal's environment: no CRMBRIDGE_* variable but the ones given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMBRIDGE_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def test_demo_mode_reads_the_sandbox_ca_from_the_well_known_path() -> None:
    assert Settings(demo=True).sandbox_ca_file == SANDBOX_CA_FILE == SANDBOX_TLS_DIR / "ca.pem"
    assert Settings(demo=False).sandbox_ca_file is None  # production: the system CAs
    assert Settings(demo=True, sandbox_ca_file=Path("/etc/ssl/x.pem")).sandbox_ca_file == Path("/etc/ssl/x.pem")


@pytest.fixture(scope="module")
def demo_sandbox() -> Iterator[SandboxHandle]:
    """The sandbox with its TLS files where `make run` keeps them (data/sandbox-tls/, reused if present)."""
    handle = start_sandbox(SANDBOX_TLS_DIR)
    try:
        yield handle
    finally:
        stop_sandbox(handle)


def test_a_worker_typed_by_hand_in_demo_mode_reaches_the_sandbox(
    demo_sandbox: SandboxHandle, tmp_path: Path, vault_keys: Any,
) -> None:
    """The README's `crmbridge sync worker` in a second terminal, with nothing but CRMBRIDGE_DEMO=1 and
    the database: it trusts the sandbox CA from data/sandbox-tls/ by itself (before, every job failed
    with a TLS error unless CRMBRIDGE_SANDBOX_CA_FILE was exported by hand)."""
    from core.sync.models import RunStatus, SyncRun
    from core.tenants.access import Principal
    from core.tenants.models import CrmAccount, Tenant
    from core.vault import service as vault

    url = f"sqlite:///{tmp_path / 'hand.db'}"
    migrate.upgrade(url)
    db = make_engine(url)
    with Session(db, expire_on_commit=False) as s:
        t = Tenant(name="NewCo", slug="newco", status="live")
        s.add(t)
        s.flush()
        acc = CrmAccount(tenant_id=t.id, provider="salesforce", edition="enterprise", label="Salesforce",  # type: ignore[arg-type]
                         credential_mode="api_user", instance_url=demo_sandbox.url("/salesforce/newco"),
                         settings_json=json.dumps({"auth_mode": "oauth_client_credentials",
                                                   "client_id": "newco-integration"}))
        s.add(acc)
        s.flush()
        vault.put(s, principal=Principal.system("test"), tenant_id=t.id, purpose="crm-login",  # type: ignore[arg-type]
                  crm_account_id=acc.id, kind="client_secret",
                  secret=json.dumps({"client_id": "newco-integration",
                                     "client_secret": "demo-newco-integration-secret"}))
        s.commit()
    # The sandbox runs on a free port here, not make run's 8502: name it as a user who moved it would.
    env = hand_env(CRMBRIDGE_DEMO="1", CRMBRIDGE_DATABASE_URL=url, CRMBRIDGE_SANDBOX_URL=demo_sandbox.base_url,
                   CRMBRIDGE_VAULT_KEYS=ring_json({TEST_KEK_ID: TEST_KEK}, TEST_KEK_ID),
                   CRMBRIDGE_SECRET_KEY=os.environ["CRMBRIDGE_SECRET_KEY"])
    assert "CRMBRIDGE_SANDBOX_CA_FILE" not in env
    r = subprocess.run([sys.executable, "-m", "core", "sync", "worker", "--once"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    with Session(db) as s:
        [run] = s.exec(select(SyncRun)).all()
    assert run.status == RunStatus.success, (run.status, run.error)
    assert run.records_in > 0  # it pulled NewCo's opportunities over HTTPS from the sandbox
    db.dispose()


@pytest.mark.skipif(bool(PG_URL), reason="make run is the SQLite demo: this runs in the SQLite pass only")
def test_make_run_starts_a_scheduler_and_a_worker_and_stops_them_all(tmp_path: Path) -> None:
    from core.scheduler.models import PeriodicJob
    from core.sync.models import JobState, SyncJob, SyncRun
    from core.sync.service import sync_now
    from core.tenants.access import Principal

    port, sandbox_port = free_port(), free_port()
    url = f"sqlite:///{tmp_path / 'run.db'}"
    env = hand_env(
        CRMBRIDGE_DEMO="1", CRMBRIDGE_DATABASE_URL=url, CRMBRIDGE_PORT=str(port),
        CRMBRIDGE_PUBLIC_URL=f"http://127.0.0.1:{port}", CRMBRIDGE_SANDBOX_URL=f"https://127.0.0.1:{sandbox_port}",
        CRMBRIDGE_SECRET_KEY_FILE=str(tmp_path / "secret.key"), CRMBRIDGE_VAULT_KEY_FILE=str(tmp_path / "vault.json"),
        CRMBRIDGE_SMTP_PORT=str(free_port()),
    )
    r = subprocess.run([sys.executable, "-m", "core", "db", "upgrade"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "run.log").open("w")
    runner = subprocess.Popen([sys.executable, "-m", "core.runner"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    db = make_engine(url)
    try:
        def healthy() -> bool:
            assert runner.poll() is None, (tmp_path / "run.log").read_text()[-4000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the console", healthy, timeout=150)

        def posture_ran() -> PeriodicJob | None:
            with Session(db) as s:
                row = s.get(PeriodicJob, "posture-snapshot")
                return row if row is not None and row.last_outcome == "success" else None

        row = wait_for("the scheduler's posture snapshot", posture_ran)
        assert "recorded for 6 tenant(s)" in (row.last_summary or "")
        # "Sync now" on the Users & sync page: the worker runs the job within a few polls
        with Session(db) as s:
            job = s.exec(select(SyncJob).where(SyncJob.state == JobState.active.value)
                         .order_by(col(SyncJob.id))).first()
            assert job is not None and job.id is not None
            job_id = job.id
            before = len(s.exec(select(SyncRun.id).where(SyncRun.job_id == job_id)).all())
            sync_now(session=s, principal=Principal(role="staff", email="cs@crmbridge.example"), job_id=job_id)
            s.commit()

        def ran() -> bool:
            with Session(db) as s:
                rows = s.exec(select(SyncRun).where(SyncRun.job_id == job_id)).all()
                return len(rows) > before and all(r.status != "running" for r in rows)

        wait_for("the worker to run the job after Sync now", ran)
        with Session(db) as s:
            assert {r.name for r in s.exec(select(PeriodicJob)) if r.last_outcome == "success"} >= {
                "sync-schedule", "sync-wake", "vault-sweep", "alerts-run", "sso-watch", "posture-snapshot"}
    finally:
        if runner.poll() is None:
            runner.send_signal(signal.SIGTERM)  # what Ctrl-C / a service manager's stop does
        try:
            code = runner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            raise
        finally:
            log.close()
            db.dispose()

    def group_gone() -> bool:  # the sandbox, console, scheduler and worker all ended with the runner
        try:
            os.killpg(runner.pid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        wait_for("every child process to stop", group_gone, timeout=30)
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code == 0, (tmp_path / "run.log").read_text()[-4000:]
