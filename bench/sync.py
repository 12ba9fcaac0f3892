"""Sync benchmark: the engine against the CRM sandbox over HTTPS, on SQLite and on PostgreSQL.

    python bench/sync.py [--records 10000] [--jobs 2000] [--latency-ms 50] [--workers 1,2,4]

1. **Bulk** (SQLite, then PostgreSQL): one API-user Salesforce account whose org holds ``--records``
   opportunities. Run 1 pulls them all into the mirror; then ``--records`` changes (creates) enter the
   outbox; run 2 pulls (nothing new) and pushes them. Prints records/s and the API calls made against
   the minimum the vendor's caps allow (2,000 records per query page, 200 per write; an empty pull is
   still one call). Logins are excluded and printed separately.
2. **Scale-out** (PostgreSQL): ``--jobs`` per-user jobs (20 tenants × 10 orgs × 10 users, each user with
   a stored login and one change to push) with the sandbox answering every call after ``--latency-ms``.
   The same queue is drained by 1, 2 and 4 worker processes (``run_worker(once=True)``, one job at a
   time each); throughput = jobs / (last run finished − first run started).

PostgreSQL comes from CRMBRIDGE_BENCH_DATABASE_URL, or the benchmark starts its own throwaway cluster
(initdb/pg_ctl as in .ci/run) on a free loopback port and removes it at the end. The sandbox runs as
its own process with a generated scenario and a CA made in a temp directory.

Last line: ``RESULT call_ratio=X scale_4_over_1=Y push_pg=… pull_pg=… push_sqlite=… pull_sqlite=…
push_vs_copy=Z`` (call_ratio = calls / minimum over both bulk runs on both databases, target 1.00;
scale_4_over_1 = throughput with 4 workers / with 1, target ≥ 1.5; push/pull in records/s;
push_vs_copy = the PostgreSQL push's time / the time hand-written batched INSERTs of the same mirror
and audit rows take in the same run (``copy_rows``), target ≤ 3).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BULK_ORG = "bench-bulk"
APP = ("bench-bulk-app", "bench-bulk-secret")
TENANTS, ORGS_PER_TENANT, USERS_PER_ORG = 20, 10, 10


def log(msg: str) -> None:
    print(msg, flush=True)


# -- environment ------------------------------------------------------------------------------------
def _env_keys() -> None:
    """Keys for this run only (the vault's KEK ring and the server secret), shared with the workers."""
    os.environ.setdefault("CRMBRIDGE_SECRET_KEY", base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
    if not os.environ.get("CRMBRIDGE_VAULT_KEYS"):
        os.environ["CRMBRIDGE_VAULT_KEYS"] = json.dumps(
            {"active": "bench-1", "keys": {"bench-1": base64.b64encode(secrets.token_bytes(32)).decode()}})


def _free_port(low: int = 56000, high: int = 56999) -> int:
    for port in range(low + secrets.randbelow(500), high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit("no free port for PostgreSQL between 56000 and 56999")


@contextmanager
def postgres():  # type: ignore[no-untyped-def]
    url = os.environ.get("CRMBRIDGE_BENCH_DATABASE_URL")
    if url:
        yield url
        return
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    pg_ctl = bins[-1] if bins else Path(shutil.which("pg_ctl") or "pg_ctl")
    if not pg_ctl.exists():
        raise SystemExit("PostgreSQL is not installed (no pg_ctl): apt-get install postgresql, or set "
                         "CRMBRIDGE_BENCH_DATABASE_URL")
    pgbin = pg_ctl.parent
    d = Path(tempfile.mkdtemp(prefix="crmbridge-bench-pg."))
    port = _free_port()
    as_root = os.geteuid() == 0

    def run(cmd: str) -> None:
        full = ["su", "postgres", "-s", "/bin/sh", "-c", cmd] if as_root else ["/bin/sh", "-c", cmd]
        subprocess.run(full, check=True, stdout=subprocess.DEVNULL)

    if as_root:
        shutil.chown(d, "postgres", "postgres")
    run(f"{pgbin}/initdb -D {d}/data -U postgres -A trust")
    run(f"{pgbin}/pg_ctl -D {d}/data -o '-k {d} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off "
        f"-c full_page_writes=off -c synchronous_commit=off -c max_connections=200' -l {d}/log -w start")
    try:
        from sqlalchemy import create_engine, text

        admin = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE crmbridge_bench"))
        admin.dispose()
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/crmbridge_bench"
    finally:
        run(f"{pgbin}/pg_ctl -D {d}/data -m fast stop")
        shutil.rmtree(d, ignore_errors=True)


def scenario(records: int) -> dict[str, Any]:
    orgs: dict[str, Any] = {BULK_ORG: {
        "name": "Bench Bulk", "edition": "enterprise", "daily_api_limit": 50_000_000,
        "licenses": [{"name": "Salesforce", "total": 10, "used": 1}, {"name": "Salesforce Integration", "total": 5,
                                                                      "used": 1}],
        "users": [{"username": "integration@bench-bulk.example", "name": "Integration", "password": "Bench-Int-1",
                   "security_token": "TKNBENCH01", "license": "Salesforce Integration"}],
        "apps": [{"client_id": APP[0], "client_secret": APP[1], "client_credentials_user":
                  "integration@bench-bulk.example", "redirect_uris": []}],
        "opportunities": {"generate": records},
    }}
    for t in range(TENANTS):
        for o in range(ORGS_PER_TENANT):
            key = f"bench-t{t}-o{o}"
            orgs[key] = {
                "name": key, "edition": "enterprise", "daily_api_limit": 50_000_000,
                "licenses": [{"name": "Salesforce", "total": USERS_PER_ORG, "used": USERS_PER_ORG}],
                "users": [{"username": f"u{u}@{key}.example", "name": f"User {u}", "password": f"Pw-{key}-{u}",
                           "security_token": f"TK{t:02d}{o:02d}{u:04d}"} for u in range(USERS_PER_ORG)],
                "opportunities": {"generate": 5},
            }
    return {"seed": 7, "salesforce": {"orgs": orgs}}


class Sandbox:
    def __init__(self, work: Path, records: int) -> None:
        import ssl

        import httpx
        import yaml

        from sandbox.launch import launch

        (work / "scenario.yaml").write_text(yaml.safe_dump(scenario(records)))
        # The launcher the tests and `make run` use; it sets TCP_NODELAY on its socket, so no answer
        # waits ~40 ms for a delayed ACK.
        self.launched = launch(tls_dir=work / "tls", scenario=work / "scenario.yaml", seed=7,
                               log_file=work / "sandbox.log")
        self.ca, self.url = self.launched.ca_file, self.launched.base_url
        self.http = httpx.Client(base_url=self.url, verify=ssl.create_default_context(cafile=str(self.ca)),
                                 timeout=120)
        self.http.get("/_sandbox/health").raise_for_status()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self.http.post(path, json=body)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        self.http.close()
        self.launched.stop()


# -- database ---------------------------------------------------------------------------------------
def fresh_engine(url: str):  # type: ignore[no-untyped-def]
    from sqlalchemy import text
    from sqlmodel import SQLModel

    import core.models  # noqa: F401
    from core.db import make_engine

    eng = make_engine(url)
    if eng.dialect.name == "postgresql":
        with eng.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    SQLModel.metadata.create_all(eng)
    return eng


def provider_factory(ca: Path):  # type: ignore[no-untyped-def]
    from core.providers.config import HttpTransport
    from core.providers.salesforce import SalesforceProvider, SessionCache
    from core.providers.transport import CrmUrlPolicy
    from core.sync.engine import thread_transport

    cache = SessionCache()
    made: list[Any] = []

    def factory(ctx, cred):  # type: ignore[no-untyped-def]
        transport = thread_transport(lambda: HttpTransport(  # the bench sandbox, allowed by name
            verify=str(ca), timeout=120, url_policy=CrmUrlPolicy.vendors(sandbox_url=ctx.account.instance_url)))
        p = SalesforceProvider(account=ctx.account, credential=cred, transport=transport, session_cache=cache)
        made.append(p)
        return p

    return factory, made


# -- phase 1: bulk ----------------------------------------------------------------------------------
def bulk(url: str, sb: Sandbox, records: int) -> dict[str, float]:
    from sqlmodel import Session, select

    from core.clock import utcnow
    from core.sync.engine import SyncEngine, VaultCredentials
    from core.sync.outbox import record_change
    from core.sync.scheduler import ensure_jobs
    from core.tenants.access import Principal
    from core.tenants.audit import record_event
    from core.tenants.models import AppUser, AppUserCrmIdentity, CrmAccount, Tenant
    from core.vault import service as vault

    sb.post("/_sandbox/reset")
    eng = fresh_engine(url)
    system = Principal.system("bench")
    with Session(eng, expire_on_commit=False) as s:
        t = Tenant(name="Bench", slug="bench", status="live")
        s.add(t)
        s.flush()
        record_event(s, principal=system, action="tenant.create", tenant_id=t.id, target="tenant:bench")
        acc = CrmAccount(tenant_id=t.id, provider="salesforce", edition="enterprise", label="Bulk",  # type: ignore[arg-type]
                         credential_mode="api_user", instance_url=sb.url,
                         settings_json=json.dumps({"auth_mode": "oauth_client_credentials", "client_id": APP[0]}))
        s.add(acc)
        s.flush()
        users = []
        for i in range(3):
            u = AppUser(tenant_id=t.id, email=f"rep{i}@bench.example", name=f"Rep {i}")  # type: ignore[arg-type]
            s.add(u)
            s.flush()
            s.add(AppUserCrmIdentity(app_user_id=u.id, crm_account_id=acc.id, crm_user_id=f"005BENCH{i:07d}"))  # type: ignore[arg-type]
            users.append(u)
        vault.put(s, principal=system, tenant_id=t.id, purpose="crm-login", crm_account_id=acc.id,  # type: ignore[arg-type]
                  kind="client_secret", secret=json.dumps({"client_id": APP[0], "client_secret": APP[1]}))
        ensure_jobs(s, now=utcnow())
        s.commit()
    factory, made = provider_factory(sb.ca)
    engine = SyncEngine(eng, credentials=VaultCredentials(eng), provider_factory=factory)

    t0 = time.perf_counter()
    [pull] = engine.run_due()
    t_pull = time.perf_counter() - t0
    assert pull.status == "success" and pull.stats.records_in == records, (pull.status, pull.error, pull.stats)

    t0 = time.perf_counter()
    with Session(eng) as s:
        for i in range(records):
            record_change(session=s, principal=system, crm_account_id=acc.id, actor_app_user_id=users[i % 3].id,  # type: ignore[arg-type]
                          fields={"name": f"Bench new deal {i:05d}", "stage": "Prospecting", "amount": f"{i}.00",
                                  "close_date": "2027-03-31"})
        s.commit()
    t_record = time.perf_counter() - t0
    with Session(eng) as s:  # due again now
        from core.sync.models import SyncJob

        for j in s.exec(select(SyncJob)):
            j.next_run_at = utcnow()
            s.add(j)
        s.commit()
    t0 = time.perf_counter()
    [push] = engine.run_due()
    t_push = time.perf_counter() - t0
    assert push.status == "success" and push.stats.records_out == records, (push.status, push.error, push.stats)
    calls = pull.stats.api_calls + push.stats.api_calls
    logins = pull.stats.auth_calls + push.stats.auth_calls
    minimum = max(1, math.ceil(records / 2000)) + 1 + math.ceil(records / 200)
    t_copy = copy_rows(eng, t.id, acc.id, records)  # type: ignore[arg-type]
    eng.dispose()
    return {"pull_s": t_pull, "push_s": t_push, "record_s": t_record, "calls": calls, "min": minimum,
            "copy_s": t_copy,
            "logins": logins, "pull_calls": pull.stats.api_calls, "push_calls": push.stats.api_calls}


def copy_rows(eng: Any, tenant_id: int, account_id: int, records: int, batch: int = 200) -> float:
    """The floor for the push: the same rows a push writes — a mirror row and an HMAC-chained audit
    row per record — written by hand-written DB-API SQL, one multi-row INSERT of each per batch of
    ``batch`` and one commit per batch (as the push commits each CRM write batch). Returns seconds."""
    from types import SimpleNamespace

    from core.clock import utcnow
    from core.tenants.audit import audit_key, compute_hmac

    key = audit_key()
    pg = eng.dialect.name == "postgresql"
    mark = "%s" if pg else "?"
    chain = "copy-bench"
    raw = eng.raw_connection()
    conn = raw.driver_connection
    prev = ""
    t0 = time.perf_counter()
    try:
        for start in range(0, records, batch):
            now = utcnow()
            stamp = now if pg else now.strftime("%Y-%m-%d %H:%M:%S.%f")
            mirror, audit = [], []
            for i in range(start, min(records, start + batch)):
                ext = f"copy-{i:06d}"
                fields = {"name": f"Bench new deal {i:05d}", "stage": "Prospecting", "amount": f"{i}.00",
                          "close_date": "2027-03-31"}
                mirror.append((tenant_id, account_id, f"006COPY{i:011d}", ext, fields["name"], "Prospecting",
                               f"{i}.00", "2027-03-31", None, None, "{}", stamp, stamp))
                details = json.dumps({"crm_account_id": account_id, "fields": fields, "idempotency_key": ext,
                                      "job_id": 1, "run_id": 1}, sort_keys=True)
                ev = SimpleNamespace(chain=chain, seq=i + 1, occurred_at=now, tenant_id=tenant_id,
                                     actor=f"rep{i % 3}@bench.example", actor_role="app_user",
                                     action="opportunity.create", target=f"opportunity:006COPY{i:011d}",
                                     details=details, via="api-user")
                mac = compute_hmac(ev, prev, key)  # type: ignore[arg-type]
                audit.append((chain, i + 1, stamp, tenant_id, ev.actor, "app_user", ev.action, ev.target, details,
                              "api-user", prev, mac))
                prev = mac
            cur = conn.cursor()
            cur.execute("INSERT INTO sync_opportunity (tenant_id, crm_account_id, crm_id, external_key, name, stage,"
                        " amount, close_date, owner_crm_id, crm_modified_at, app_fields_json, created_at, updated_at)"
                        " VALUES " + ",".join(["(" + ",".join([mark] * 13) + ")"] * len(mirror)),
                        [v for row in mirror for v in row])
            cur.execute("INSERT INTO audit_event (chain, seq, occurred_at, tenant_id, actor, actor_role, action,"
                        " target, details, via, prev_hmac, hmac) VALUES "
                        + ",".join(["(" + ",".join([mark] * 12) + ")"] * len(audit)),
                        [v for row in audit for v in row])
            conn.commit()
        return time.perf_counter() - t0
    finally:
        raw.close()


# -- phase 2: scale-out -----------------------------------------------------------------------------
def seed_scale(url: str, sb: Sandbox, jobs: int) -> None:
    from sqlmodel import Session, select

    from core.clock import utcnow
    from core.sync.models import SyncJob
    from core.sync.outbox import record_change
    from core.sync.scheduler import ensure_jobs
    from core.tenants.access import Principal
    from core.tenants.audit import record_event
    from core.tenants.models import AppUser, AppUserCrmIdentity, CrmAccount, Tenant
    from core.vault import service as vault

    eng = fresh_engine(url)
    system = Principal.system("bench")
    made = 0
    with Session(eng, expire_on_commit=False) as s:
        for t in range(TENANTS):
            tenant = Tenant(name=f"Scale {t}", slug=f"scale-{t}", status="live")
            s.add(tenant)
            s.flush()
            record_event(s, principal=system, action="tenant.create", tenant_id=tenant.id, target=f"tenant:{t}")
            for o in range(ORGS_PER_TENANT):
                key = f"bench-t{t}-o{o}"
                acc = CrmAccount(tenant_id=tenant.id, provider="salesforce", edition="enterprise", label=key,  # type: ignore[arg-type]
                                 credential_mode="per_user_password", instance_url=sb.url)
                s.add(acc)
                s.flush()
                for u in range(USERS_PER_ORG):
                    if made >= jobs:
                        break
                    user = AppUser(tenant_id=tenant.id, email=f"u{u}@{key}.example", name=f"User {u}")  # type: ignore[arg-type]
                    s.add(user)
                    s.flush()
                    s.add(AppUserCrmIdentity(app_user_id=user.id, crm_account_id=acc.id,  # type: ignore[arg-type]
                                             crm_user_id=f"005{t:02d}{o:02d}{u:06d}"))
                    vault.put(s, principal=system, tenant_id=tenant.id, purpose="crm-login", crm_account_id=acc.id,  # type: ignore[arg-type]
                              app_user_id=user.id, secret=json.dumps({
                                  "username": f"u{u}@{key}.example", "password": f"Pw-{key}-{u}",
                                  "security_token": f"TK{t:02d}{o:02d}{u:04d}"}))
                    record_change(session=s, principal=system, crm_account_id=acc.id, actor_app_user_id=user.id,  # type: ignore[arg-type]
                                  fields={"name": f"Deal of {user.email}", "stage": "Prospecting",
                                          "close_date": "2027-01-31", "amount": "1000.00"})
                    made += 1
            s.commit()
        ensure_jobs(s, now=utcnow())
        for j in s.exec(select(SyncJob)):
            j.interval_seconds = 86_400  # one run per job in this benchmark
            s.add(j)
        s.commit()
    eng.dispose()


RESET_SQL = [
    "DELETE FROM sync_run",
    "DELETE FROM sync_conflict",
    "DELETE FROM sync_opportunity WHERE external_key IS NULL",
    "UPDATE sync_opportunity SET crm_id = NULL, crm_modified_at = NULL",
    "UPDATE sync_outbox SET status = 'pending', attempts = 0, applied_at = NULL, applied_run_id = NULL, "
    "last_error = NULL, via = NULL",
    "UPDATE sync_job SET next_run_at = now(), watermark = NULL, lease_owner = NULL, lease_token = NULL, "
    "lease_expires_at = NULL, attempts = 0, consecutive_failures = 0, last_success_at = NULL, runs_total = 0",
]


def scale_run(url: str, sb: Sandbox, workers: int, latency_ms: float) -> dict[str, float]:
    from sqlalchemy import text

    from core.db import make_engine

    sb.post("/_sandbox/reset")
    for t in range(TENANTS):
        for o in range(ORGS_PER_TENANT):
            sb.post(f"/_sandbox/faults/bench-t{t}-o{o}", {"latency_ms": latency_ms})
    eng = make_engine(url)
    with eng.begin() as conn:
        for stmt in RESET_SQL:
            conn.execute(text(stmt))
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", "--db", url,
                               "--ca", str(sb.ca), "--name", f"w{i}"], cwd=str(ROOT), env=dict(os.environ))
             for i in range(workers)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
    wall = time.perf_counter() - t0
    with eng.connect() as conn:
        row = conn.execute(text(
            "SELECT count(*) FILTER (WHERE status = 'success'), count(*), min(started_at), max(finished_at), "
            "sum(api_calls), sum(auth_calls) FROM sync_run")).one()
        per_worker = dict(conn.execute(text(
            "SELECT split_part(worker, '/', 1), count(*) FROM sync_run GROUP BY 1")).all())
    eng.dispose()
    ok, total, first, last, calls, logins = row
    span = (last - first).total_seconds()
    return {"ok": ok, "runs": total, "span": span, "wall": wall, "rate": ok / span if span else 0.0,
            "calls": calls or 0, "logins": logins or 0, "spread": len(per_worker)}


def worker_main(args: argparse.Namespace) -> int:
    import logging

    import core.models  # noqa: F401
    from core.db import make_engine
    from core.sync.engine import SyncEngine, VaultCredentials
    from core.sync.worker import run_worker

    logging.basicConfig(level=logging.WARNING)
    eng = make_engine(args.db)
    factory, _ = provider_factory(Path(args.ca))
    sync = SyncEngine(eng, credentials=VaultCredentials(eng), provider_factory=factory)
    run_worker(engine=eng, once=True, sync_engine=sync, schedule=False, name=args.name)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=TENANTS * ORGS_PER_TENANT * USERS_PER_ORG)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="w", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    _env_keys()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="crmbridge-bench-sync."))
    sb = Sandbox(work, args.records)
    try:
        with postgres() as pg_url:
            log(f"sandbox {sb.url}; PostgreSQL {pg_url.rsplit('@', 1)[-1]}")
            results = {}
            for name, url in (("SQLite", f"sqlite:///{work / 'bench.db'}"), ("PostgreSQL", pg_url)):
                r = bulk(url, sb, args.records)
                results[name] = r
                log(f"[bulk {name}] pull {args.records:,} records in {r['pull_s']:.1f} s = "
                    f"{args.records / r['pull_s']:,.0f} records/s ({r['pull_calls']} calls); push {args.records:,} "
                    f"in {r['push_s']:.1f} s = {args.records / r['push_s']:,.0f} records/s ({r['push_calls']} calls); "
                    f"API calls {r['calls']} vs minimum {r['min']} (logins excluded: {r['logins']}); "
                    f"outbox filled in {r['record_s']:.1f} s; the same mirror + audit rows by hand-written "
                    f"batched INSERTs in {r['copy_s']:.2f} s = {args.records / r['copy_s']:,.0f} records/s "
                    f"(push_vs_copy {r['push_s'] / r['copy_s']:.2f})")
            calls = sum(r["calls"] for r in results.values())
            minimum = sum(r["min"] for r in results.values())
            call_ratio = calls / minimum

            t0 = time.perf_counter()
            seed_scale(pg_url, sb, args.jobs)
            log(f"[scale] seeded {args.jobs:,} per-user jobs (each with a stored login and one change) in "
                f"{time.perf_counter() - t0:.0f} s; sandbox latency {args.latency_ms:.0f} ms per call")
            rates: dict[int, float] = {}
            for n in (int(x) for x in args.workers.split(",")):
                r = scale_run(pg_url, sb, n, args.latency_ms)
                rates[n] = r["rate"]
                log(f"[scale] {n} worker process(es): {r['ok']:,}/{r['runs']:,} runs succeeded in {r['span']:.1f} s "
                    f"(wall {r['wall']:.1f} s) = {r['rate']:.1f} jobs/s; {r['calls']:,} API calls "
                    f"(+{r['logins']:,} logins), {r['calls'] / max(r['ok'], 1):.2f} per job (minimum 2: a query "
                    f"and a write); runs spread over {r['spread']} process(es)")
            scale = rates.get(4, 0.0) / rates[1] if rates.get(1) else 0.0
            for n, rate in rates.items():
                log(f"[scale] throughput with {n}: {rate:.1f} jobs/s = {rate / rates[1]:.2f}× one worker")
    finally:
        sb.stop()
        shutil.rmtree(work, ignore_errors=True)
    log(f"total {time.perf_counter() - started:.0f} s")
    pg, lite = results["PostgreSQL"], results["SQLite"]
    log(f"RESULT call_ratio={call_ratio:.2f} scale_4_over_1={scale:.2f} "
        f"push_pg={args.records / pg['push_s']:.0f} pull_pg={args.records / pg['pull_s']:.0f} "
        f"push_sqlite={args.records / lite['push_s']:.0f} pull_sqlite={args.records / lite['pull_s']:.0f} "
        f"push_vs_copy={pg['push_s'] / pg['copy_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
