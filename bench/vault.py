"""Vault benchmark: the cost of ``use()``'s abstraction, and how ``rotate_kek`` scales.

use_ratio    = median ``use()`` time / median time of the same work written by hand with DB-API SQL
               through the same driver (sqlite3) in the same run: select the credential with its tenant
               key, refuse it if expired, idle, not active or another tenant's, unwrap the key, AES-GCM
               decrypt, update last use, append the same audit row with the same HMAC, update the
               head with its MAC, commit.
               Target <= 1.3. Each side works on its own copy of the same database file (so neither
               connection's page cache is flushed by the other's writes) and calls alternate one by
               one, so load from other processes hits both alike. Wall-clock medians give the ratio;
               the per-call CPU time is printed beside them as a check.
rotate_ratio = ``rotate_kek`` time with 1,000 tenants x 100 credentials / with 1,000 tenants x 1
               credential. Target <= 1.5 (re-wrapping touches tenant keys, never credentials).

Run: .venv/bin/python bench/vault.py [--quick]. The last line is ``RESULT use_ratio=X rotate_ratio=Y``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("CRMBRIDGE_SECRET_KEY", base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from sqlalchemy import insert  # noqa: E402
from sqlmodel import Session, SQLModel  # noqa: E402

import core.models  # noqa: E402,F401
from core.db import make_engine  # noqa: E402
from core.tenants.access import Principal  # noqa: E402
from core.tenants.audit import audit_key, head_key, verify_chain  # noqa: E402
from core.tenants.models import AppUser, CrmAccount, Tenant  # noqa: E402
from core.vault import keys, service  # noqa: E402
from core.vault.crypto import credential_aad, new_dek, seal, wrap_dek  # noqa: E402
from core.vault.keys import FileKeyProvider  # noqa: E402
from core.vault.models import VaultCredential, VaultTenantKey  # noqa: E402

SYSTEM = Principal.system("bench")
logging.getLogger("crmbridge.vault.keys").setLevel(logging.ERROR)  # key files made here are expected
REASON = "bench: push opportunities"
T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA busy_timeout=30000", "PRAGMA foreign_keys=ON",
           "PRAGMA secure_delete=ON", "PRAGMA synchronous=NORMAL")


def fresh_engine(path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{path}")
    SQLModel.metadata.create_all(engine)
    return engine


def configure_keys(workdir: Path) -> FileKeyProvider:
    provider = FileKeyProvider(workdir / "vault-keys.json", create=True)
    keys.configure(provider)
    return provider


# --- use() against hand-written DB-API SQL --------------------------------------------------------


def setup_use(engine, n_creds: int) -> list[int]:  # type: ignore[no-untyped-def]
    with Session(engine, expire_on_commit=False) as s:
        t = Tenant(name="Bench", slug="bench")
        s.add(t)
        s.flush()
        acc = CrmAccount(tenant_id=t.id, provider="salesforce", edition="enterprise", label="Org",  # type: ignore[arg-type]
                         credential_mode="per_user_password")
        s.add(acc)
        s.flush()
        ids = []
        for i in range(n_creds):
            u = AppUser(tenant_id=t.id, email=f"u{i}@bench.example", name=f"U{i}")  # type: ignore[arg-type]
            s.add(u)
            s.flush()
            ref = service.put(s, principal=SYSTEM, tenant_id=t.id, crm_account_id=acc.id, app_user_id=u.id,  # type: ignore[arg-type]
                              purpose="crm-login", secret=f"bench-password-{i}", ttl=timedelta(days=3650), now=T0)
            ids.append(ref.id)
        s.commit()
    return ids


class HandWritten:
    """The same work as use(), written by hand against sqlite3."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        for p in PRAGMAS:
            self.conn.execute(p)
        self.key = audit_key()
        self.head_key = head_key()
        self.ring = keys.current_ring()

    def use(self, cid: int, now: datetime) -> str:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        r = c.execute(
            "SELECT c.tenant_id, c.crm_account_id, c.app_user_id, c.purpose, c.kind, c.version, c.ciphertext,"
            " c.state, c.expires_at, c.last_used_at, c.created_at, c.failed_at, k.kek_id, k.wrapped_dek,"
            " k.dek_version, p.idle_days FROM vault_credential c JOIN vault_tenant_key k ON k.tenant_id = c.tenant_id"
            " LEFT JOIN vault_policy p ON p.tenant_id = c.tenant_id WHERE c.id = ?", (cid,)).fetchone()
        tenant_id, account_id, user_id, purpose, version, blob = r[0], r[1], r[2], r[3], r[5], r[6]
        kek_id, wrapped, dek_version = r[12], r[13], r[14]
        # the same refusals use() makes: someone else's tenant, not active, past its TTL, idle too long
        at = now.strftime("%Y-%m-%d %H:%M:%S.%f")
        who = SYSTEM
        allowed = who.role in ("staff", "system") or (who.role == "tenant_admin" and who.tenant_id == tenant_id)
        if not allowed or r[7] != "active" or (r[8] is not None and r[8] <= at):
            raise RuntimeError("refused")
        idle_cutoff = (now - timedelta(days=r[15] or 14)).strftime("%Y-%m-%d %H:%M:%S.%f")
        if user_id is not None and (r[9] or r[10]) <= idle_cutoff:
            raise RuntimeError("refused")
        dek = AESGCM(self.ring.keys[kek_id]).decrypt(
            wrapped[1:13], wrapped[13:],
            f"crmbridge/vault/dek/v1|tenant={tenant_id}|kek={kek_id}|version={dek_version}".encode())
        aad = (f"crmbridge/vault/credential/v1|tenant={tenant_id}|account={account_id}|user={user_id}"
               f"|purpose={purpose}|id={cid}|version={version}").encode()
        plaintext = AESGCM(dek).decrypt(blob[1:13], blob[13:], aad)
        c.execute("UPDATE vault_credential SET last_used_at = ?, use_count = use_count + 1 WHERE id = ?", (at, cid))
        chain = f"t{tenant_id}"
        seq, prev = c.execute("SELECT seq, last_hmac FROM audit_head WHERE chain = ?", (chain,)).fetchone()
        details = json.dumps({"purpose": purpose, "reason": REASON}, sort_keys=True)
        content = json.dumps({
            "chain": chain, "seq": seq + 1, "at": now.isoformat(), "tenant": tenant_id, "actor": SYSTEM.email,
            "role": SYSTEM.role, "action": "vault.credential.use", "target": f"credential:{cid}", "details": details,
            "via": None}, sort_keys=True, separators=(",", ":")).encode()
        mac = hmac.new(self.key, prev.encode() + b"|" + content, hashlib.sha256).hexdigest()
        c.execute("INSERT INTO audit_event (chain, seq, occurred_at, tenant_id, actor, actor_role, action, target,"
                  " details, via, prev_hmac, hmac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (chain, seq + 1, at, tenant_id, SYSTEM.email, SYSTEM.role, "vault.credential.use",
                   f"credential:{cid}", details, None, prev, mac))
        # the head's MAC, as core.tenants.audit.head_mac
        head_mac = hmac.new(self.head_key, f"head|{chain}|{seq + 1}|{mac}".encode(), hashlib.sha256).hexdigest()
        c.execute("UPDATE audit_head SET seq = ?, last_hmac = ?, mac = ? WHERE chain = ?",
                  (seq + 1, mac, head_mac, chain))
        c.execute("COMMIT")
        return plaintext.decode()


class UseFigures:
    def __init__(self, vault_wall: list[float], hand_wall: list[float], vault_cpu: list[float],
                 hand_cpu: list[float]) -> None:
        self.vault_wall, self.hand_wall, self.vault_cpu, self.hand_cpu = vault_wall, hand_wall, vault_cpu, hand_cpu

    @staticmethod
    def line(name: str, wall: list[float], cpu: list[float]) -> str:
        p90 = statistics.quantiles(wall, n=10)[-1]
        return (f"{name}: median {statistics.median(wall) * 1e6:.1f} us wall (p90 {p90 * 1e6:.1f} us), "
                f"median {statistics.median(cpu) * 1e6:.1f} us CPU, n={len(wall)}")

    @property
    def wall_ratio(self) -> float:
        return statistics.median(self.vault_wall) / statistics.median(self.hand_wall)

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(self.vault_cpu) / statistics.median(self.hand_cpu)


def bench_use(workdir: Path, *, rounds: int, per_round: int) -> UseFigures:
    engine = fresh_engine(workdir / "use.db")
    ids = setup_use(engine, 100)
    # The hand-written code gets its own copy of the same database, so neither connection's page
    # cache is thrown away by the other's writes; calls alternate, so machine load hits both alike.
    engine.dispose()
    with sqlite3.connect(workdir / "use.db") as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copyfile(workdir / "use.db", workdir / "hand.db")
    hand = HandWritten(workdir / "hand.db")
    session = Session(engine, expire_on_commit=False)
    clock = [T0]

    def tick() -> datetime:
        clock[0] += timedelta(microseconds=1000)
        return clock[0]

    def one_use(cid: int) -> str:
        with service.use(session, cid, principal=SYSTEM, reason=REASON, now=tick()) as secret:
            return secret.get_secret_value()

    # both must return the same secret
    assert one_use(ids[0]) == hand.use(ids[0], tick()) == "bench-password-0"
    vault_times: list[float] = []  # wall clock
    hand_times: list[float] = []
    vault_cpu: list[float] = []  # this thread's CPU time (work done, system calls included)
    hand_cpu: list[float] = []
    cpu = time.thread_time
    for _ in range(50):  # warm both
        one_use(ids[0])
        hand.use(ids[0], tick())
    for r in range(rounds):  # alternate call by call, so load from other processes hits both alike
        for i in range(per_round):
            cid = ids[(r * per_round + i) % len(ids)]
            c, t = cpu(), time.perf_counter()
            one_use(cid)
            vault_times.append(time.perf_counter() - t)
            vault_cpu.append(cpu() - c)
            now = tick()
            c, t = cpu(), time.perf_counter()
            hand.use(cid, now)
            hand_times.append(time.perf_counter() - t)
            hand_cpu.append(cpu() - c)
    for db in ("use.db", "hand.db"):  # both wrote valid audit rows: the same work
        check = make_engine(f"sqlite:///{workdir / db}")
        with Session(check) as s:
            problems = verify_chain(s)
        check.dispose()
        assert not problems, f"{db}: audit chain broken: {problems[:3]}"
    session.close()
    hand.conn.close()
    engine.dispose()
    return UseFigures(vault_times, hand_times, vault_cpu, hand_cpu)


# --- rotate_kek: tenants x credentials ------------------------------------------------------------


def setup_rotation(engine, *, tenants: int, per_tenant: int) -> None:  # type: ignore[no-untyped-def]
    ring = keys.current_ring(reload=True)
    with Session(engine) as s:
        s.execute(insert(Tenant), [{"name": f"T{i}", "slug": f"t{i:05d}", "status": "live",
                                    "onboarding_step": "go_live", "created_at": T0, "updated_at": T0}
                                   for i in range(1, tenants + 1)])
        s.execute(insert(CrmAccount), [{"tenant_id": i, "provider": "salesforce", "edition": "enterprise",
                                        "label": "Org", "credential_mode": "api_user", "settings_json": "{}",
                                        "status": "new", "created_at": T0} for i in range(1, tenants + 1)])
        deks = {i: new_dek() for i in range(1, tenants + 1)}
        s.execute(insert(VaultTenantKey), [{"tenant_id": i, "kek_id": ring.active, "dek_version": 1, "created_at": T0,
                                            "wrapped_dek": wrap_dek(ring.active_key, deks[i], tenant_id=i,
                                                                    kek_id=ring.active, dek_version=1)}
                                           for i in range(1, tenants + 1)])
        cid = 0
        rows = []
        for i in range(1, tenants + 1):
            for j in range(per_tenant):
                cid += 1
                rows.append({"id": cid, "tenant_id": i, "crm_account_id": i, "app_user_id": None,
                             "purpose": f"api-{j}", "kind": "client_secret", "version": 1, "state": "active",
                             "failures": 0, "use_count": 0, "stored_by": "bench", "created_at": T0,
                             "ciphertext": seal(deks[i], f"secret-{cid}".encode(), credential_aad(
                                 tenant_id=i, crm_account_id=i, app_user_id=None, purpose=f"api-{j}",
                                 credential_id=cid, version=1))})
                if len(rows) >= 5000:
                    s.execute(insert(VaultCredential), rows)
                    rows = []
        if rows:
            s.execute(insert(VaultCredential), rows)
        s.commit()
    with Session(engine) as s:
        service.check_keys(s, now=T0)
        s.commit()


def bench_rotation(workdir: Path, *, tenants: int, runs: int) -> tuple[float, float]:
    """Median rotate_kek time with 1 and with 100 credentials per tenant; runs alternate between the
    two databases so machine load hits both alike."""
    engines, rings = {}, {}
    for per_tenant in (1, 100):  # each database has its own key ring, as each deployment does
        rings[per_tenant] = FileKeyProvider(workdir / f"rotate-{per_tenant}-keys.json", create=True)
        keys.configure(rings[per_tenant])
        engines[per_tenant] = fresh_engine(workdir / f"rotate-{per_tenant}.db")
        setup_rotation(engines[per_tenant], tenants=tenants, per_tenant=per_tenant)
    times: dict[int, list[float]] = {1: [], 100: []}
    for r in range(runs):
        for per_tenant in ((1, 100) if r % 2 == 0 else (100, 1)):  # ABBA: drift hits both alike
            keys.configure(rings[per_tenant])
            t = time.perf_counter()
            out = service.rotate_kek(principal=SYSTEM, engine=engines[per_tenant], now=T0 + timedelta(days=r + 1))
            times[per_tenant].append(time.perf_counter() - t)
            assert out.rewrapped == tenants and out.new_key, out
    for per_tenant, engine in engines.items():  # every credential still decrypts after the rotations
        keys.configure(rings[per_tenant])
        with Session(engine, expire_on_commit=False) as s:
            with service.use(s, 1, principal=SYSTEM, reason="bench: check") as secret:
                assert secret.get_secret_value() == "secret-1"
        engine.dispose()
    return statistics.median(times[1]), statistics.median(times[100])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and tenants (a smoke run, not the figures)")
    args = ap.parse_args()
    tenants = 100 if args.quick else 1000
    with tempfile.TemporaryDirectory(prefix="crmbridge-bench-vault-") as tmp:
        workdir = Path(tmp)
        configure_keys(workdir)
        fig = bench_use(workdir, rounds=5 if args.quick else 40, per_round=100 if args.quick else 250)
        print(fig.line("use()", fig.vault_wall, fig.vault_cpu))
        print(fig.line("hand-written DB-API (sqlite3)", fig.hand_wall, fig.hand_cpu))
        print(f"use() / hand-written: {fig.cpu_ratio:.2f} by CPU time, {fig.wall_ratio:.2f} by wall clock")
        runs = 3 if args.quick else 11
        small, big = bench_rotation(workdir, tenants=tenants, runs=runs)
        print(f"rotate_kek, {tenants} tenants x 1 credential: {small:.3f} s (median of {runs})")
        print(f"rotate_kek, {tenants} tenants x 100 credentials: {big:.3f} s (median of {runs})")
        keys.configure(None)
    print(f"RESULT use_ratio={fig.wall_ratio:.2f} rotate_ratio={big / small:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
