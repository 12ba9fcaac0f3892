"""Issue 14, High 1: a process started with the wrong vault key never destroys credentials.

The attack (or accident): a worker host gets a key ring whose key id matches the vault's but whose
bytes do not. Before, `crmbridge sync worker` did not check: every decrypt failure was taken for
tampering, each credential was flagged invalid for good with a false "tampered" audit event, and
restoring the right key did not help.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import MappingProxyType

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.clock import utcnow
from core.errors import ConfigurationError, CredentialInvalid
from core.sync.scheduler import ensure_jobs
from core.tenants.access import Principal
from core.tenants.audit import verify_chain
from core.tenants.models import AuditEvent
from core.vault import keys, service
from core.vault.keys import KeyRing
from core.vault.models import CredentialState, VaultCredential, VaultTenantKey
from tests.conftest import PG_URL, ROOT, make_tenant
from tests.fixtures.vault import TEST_KEK_ID, MemoryKeyProvider, make_vault_world, ring_json

SYSTEM = Principal.system("test")
WRONG = bytes(range(100, 132))


def _dump(engine: Engine) -> dict[str, list[tuple]]:
    """Every row of every table, to compare a database before and after."""
    out = {}
    with engine.connect() as conn:
        for table in sorted(inspect(conn).get_table_names()):
            if table == "alembic_version":
                continue
            out[table] = sorted((tuple(r) for r in conn.execute(text(f'SELECT * FROM "{table}"'))), key=repr)
    return out


def _seed(engine: Engine, *, users: int = 2) -> list[int]:
    now = utcnow()
    with Session(engine, expire_on_commit=False) as s:
        world = make_vault_world(s, make_tenant(s, "acme"), users=users)
        refs = [service.put(s, principal=SYSTEM, tenant_id=world.tenant.id, purpose="crm-login",
                            crm_account_id=world.account.id, app_user_id=u.id, secret=f"pw-{i}", now=now).id
                for i, u in enumerate(world.users)]
        ensure_jobs(s, now=now)
        s.commit()
    return refs


def test_sync_worker_with_a_same_id_wrong_key_exits_nonzero_and_changes_no_row(file_engine, vault_keys, tmp_path):
    refs = _seed(file_engine)
    before = _dump(file_engine)
    assert before["sync_job"], "the worker must have due jobs that would read the credentials"
    url = PG_URL or str(file_engine.url)
    env = {**os.environ, "CRMBRIDGE_DATABASE_URL": url, "CRMBRIDGE_DEMO": "0",
           "CRMBRIDGE_VAULT_KEYS": ring_json({TEST_KEK_ID: WRONG}, TEST_KEK_ID)}
    env.pop("CRMBRIDGE_VAULT_KEY_FILE", None)
    proc = subprocess.run([sys.executable, "-m", "core", "sync", "worker", "--once"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "sync worker" in proc.stderr and "refuses to start" in proc.stderr
    assert f"'{TEST_KEK_ID}'" in proc.stderr and "restore the original bytes" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _dump(file_engine) == before
    # The right key still opens every credential.
    with Session(file_engine) as s:
        for i, ref in enumerate(refs):
            with service.use(s, ref, principal=SYSTEM, reason="check", now=utcnow()) as secret:
                assert secret.get_secret_value() == f"pw-{i}"


@pytest.mark.parametrize("argv", [
    ["sync", "schedule"], ["vault", "sweep"], ["vault", "rotate-kek"], ["alerts", "run", "--no-deliver"],
    ["demo", "load"], ["scheduler", "--once"],
])
def test_every_vault_process_refuses_a_wrong_key(file_engine, vault_keys, argv, monkeypatch, capsys):
    from core.cli import main
    from core.db import get_engine
    from core.settings import get_settings

    _seed(file_engine)
    before = _dump(file_engine)
    monkeypatch.setenv("CRMBRIDGE_DATABASE_URL", PG_URL or str(file_engine.url))
    get_settings.cache_clear()
    get_engine.cache_clear()
    wrong = KeyRing(TEST_KEK_ID, MappingProxyType({TEST_KEK_ID: WRONG}), "the test key ring")
    keys.configure(MemoryKeyProvider(wrong))
    try:
        assert main(argv) == 1
    finally:
        get_engine.cache_clear()
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert f"'{TEST_KEK_ID}'" in err and "not the key the vault was set up with" in err
    assert _dump(file_engine) == before


def test_use_with_a_wrong_key_flags_nothing_and_the_right_key_still_works(file_engine, vault_keys):
    """Even past the start-up check (the ring swapped under a running process), a decrypt failure
    under an unproven key changes nothing and writes no "tampered" event."""
    refs = _seed(file_engine, users=1)
    before = _dump(file_engine)
    keys.configure(MemoryKeyProvider(KeyRing(TEST_KEK_ID, MappingProxyType({TEST_KEK_ID: WRONG}), "swapped ring")))
    with Session(file_engine) as s, pytest.raises(ConfigurationError, match="Nothing was flagged or destroyed"):
        with service.use(s, refs[0], principal=SYSTEM, reason="x", now=utcnow()):
            pass
    assert _dump(file_engine) == before
    keys.configure(vault_keys)
    with Session(file_engine) as s, service.use(s, refs[0], principal=SYSTEM, reason="x", now=utcnow()) as secret:
        assert secret.get_secret_value() == "pw-0"


def test_a_damaged_tenant_key_under_the_right_key_is_reported_and_flags_no_credential(engine, vault_keys):
    refs = _seed(engine, users=1)
    with Session(engine) as s:
        row = s.get(VaultTenantKey, s.get(VaultCredential, refs[0]).tenant_id)  # type: ignore[union-attr]
        assert row is not None
        row.wrapped_dek = row.wrapped_dek[:-1] + bytes([row.wrapped_dek[-1] ^ 1])
        s.add(row)
        s.commit()
    with Session(engine) as s, pytest.raises(CredentialInvalid, match="vault_tenant_key row was altered"):
        with service.use(s, refs[0], principal=SYSTEM, reason="x", now=utcnow()):
            pass
    with Session(engine) as s:
        assert s.get(VaultCredential, refs[0]).state == CredentialState.active  # type: ignore[union-attr]
        actions = set(s.exec(select(AuditEvent.action)))
        assert "vault.dek.unreadable" in actions and "vault.credential.tampered" not in actions


@pytest.mark.parametrize(("bad", "why"), [
    ("text", "stored as str, not bytes"),
    ("truncated", "truncated (5 bytes"),
])
def test_a_ciphertext_of_the_wrong_type_is_flagged_unreadable_not_a_crash(engine, vault_keys, bad, why):
    refs = _seed(engine, users=1)
    value: object = "c2VjcmV0LWJ1dC1hcy10ZXh0" if bad == "text" else b"\x01abcd"
    if bad == "text" and PG_URL:  # bytea keeps bytes whatever is written: the text arrives as 24 bytes
        why = "truncated (24 bytes"
    with engine.begin() as conn:
        conn.execute(text("UPDATE vault_credential SET ciphertext = :v WHERE id = :i"), {"v": value, "i": refs[0]})
    expected = f"vault:{refs[0]} is unreadable.*{re.escape(why)}"
    with Session(engine) as s, pytest.raises(CredentialInvalid, match=expected):
        with service.use(s, refs[0], principal=SYSTEM, reason="x", now=utcnow()):
            pass
    with Session(engine) as s:  # kept (restorable from a backup), flagged, listed, audited
        row = s.get(VaultCredential, refs[0])
        assert row is not None
        listed = service.list_credentials(s, principal=SYSTEM, tenant_id=row.tenant_id)
        assert [c.state for c in listed if c.ref and c.ref.id == refs[0]] == ["invalid"]
        ev = s.exec(select(AuditEvent).where(AuditEvent.action == "vault.credential.unreadable")).one()
        assert why.split(" (")[0] in ev.details
        assert verify_chain(s) == []


def test_the_check_value_lives_in_the_database_per_key_id(file_engine, vault_keys):
    from core.vault.keys import check_value
    from core.vault.models import VaultKek

    _seed(file_engine, users=1)
    with Session(file_engine) as s:
        row = s.get(VaultKek, TEST_KEK_ID)
        assert row is not None and row.check_value == check_value(vault_keys.ring.keys[TEST_KEK_ID])
        assert row.check_value != check_value(WRONG)

