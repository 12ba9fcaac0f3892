"""Key rings, start-up refusal on missing or wrong keys, KEK rotation (interrupted, resumed), DEK rotation."""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path
from types import MappingProxyType

import pytest
from sqlmodel import Session, select

from core.errors import ConfigurationError, KeyMissing
from core.settings import Settings
from core.tenants.access import Principal
from core.tenants.audit import verify_chain
from core.vault import keys, service
from core.vault.keys import EnvKeyProvider, FileKeyProvider, KeyRing, parse_ring, provider_from_settings
from core.vault.models import VaultCredential, VaultKek, VaultTenantKey
from tests.conftest import make_tenant
from tests.fixtures.vault import TEST_KEK, TEST_KEK_ID, MemoryKeyProvider, make_vault_world, ring_json

SYSTEM = Principal.system("test")
OTHER = bytes(range(100, 132))


def _seed(engine, clock, tenants: int = 1, per_tenant: int = 1) -> list:
    refs = []
    with Session(engine, expire_on_commit=False) as s:
        for t in range(tenants):
            world = make_vault_world(s, make_tenant(s, f"tenant-{t}"), users=per_tenant)
            for i, u in enumerate(world.users):
                refs.append((service.put(s, principal=SYSTEM, tenant_id=world.tenant.id, purpose="crm-login",
                                         crm_account_id=world.account.id, app_user_id=u.id,
                                         secret=f"pw-{t}-{i}", now=clock()), f"pw-{t}-{i}"))
        s.commit()
    return refs


def _all_readable(engine, refs, clock) -> None:
    with Session(engine, expire_on_commit=False) as s:
        for ref, expected in refs:
            with service.use(s, ref, principal=SYSTEM, reason="check", now=clock()) as secret:
                assert secret.get_secret_value() == expected


@pytest.mark.parametrize(("text", "match"), [
    ("not json", "not valid JSON"),
    ('{"active": "k1", "keys": {}}', "has no keys"),
    ('{"active": "k1", "keys": {"k1": "c2hvcnQ="}}', "'k1'.*5 bytes"),
    ('{"active": "k1", "keys": {"k1": "@@@"}}', "'k1'.*not base64"),
    ('{"active": "k9", "keys": {"k1": "' + "A" * 43 + '="}}', "active vault key 'k9'"),
    ('{"active": "bad id", "keys": {"bad id": "' + "A" * 43 + '="}}', "'bad id'.*not valid"),
])
def test_bad_rings_are_refused_naming_the_key(text, match):
    with pytest.raises(ConfigurationError, match=match):
        parse_ring(text, source="CRMBRIDGE_VAULT_KEYS")


def test_keys_come_from_the_environment_or_a_0600_file(tmp_path):
    text = ring_json({"k1": TEST_KEK}, "k1")
    assert isinstance(provider_from_settings(Settings(vault_keys=text)), EnvKeyProvider)
    assert provider_from_settings(Settings(vault_keys=text)).load().active_key == TEST_KEK
    path = tmp_path / "ring.json"
    path.write_text(text)
    path.chmod(0o600)
    assert provider_from_settings(Settings(vault_key_file=path)).load().active == "k1"
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        FileKeyProvider(path).load()


def test_without_keys_start_up_refuses_outside_demo(tmp_path):
    with pytest.raises(KeyMissing, match="CRMBRIDGE_VAULT_KEYS"):
        provider_from_settings(Settings(vault_keys="", vault_key_file=None, demo=False))
    with pytest.raises(KeyMissing, match="does not exist"):
        provider_from_settings(Settings(vault_key_file=tmp_path / "missing.json", demo=False)).load()
    assert not (tmp_path / "missing.json").exists()


def test_demo_mode_creates_a_0600_key_file_once(tmp_path):
    path = tmp_path / "data" / "vault-keys.json"
    provider = provider_from_settings(Settings(demo=True, vault_key_file=path))
    first = provider.load()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert provider.load().active_key == first.active_key  # read back, not re-created


def test_missing_or_wrong_key_stops_start_up_naming_the_key(file_engine, clock, vault_keys):
    refs = _seed(file_engine, clock)
    other_ring = KeyRing("k2", MappingProxyType({"k2": OTHER}), "the test key ring")
    keys.configure(MemoryKeyProvider(other_ring))  # k1 lost
    with pytest.raises(KeyMissing, match=f"'{TEST_KEK_ID}'"):
        service.sweep_on_start(file_engine, now=clock())
    with Session(file_engine) as s, pytest.raises(KeyMissing, match=f"'{TEST_KEK_ID}'"):
        with service.use(s, refs[0][0], principal=SYSTEM, reason="x", now=clock()):
            pass
    wrong = KeyRing(TEST_KEK_ID, MappingProxyType({TEST_KEK_ID: OTHER}), "the test key ring")
    keys.configure(MemoryKeyProvider(wrong))  # right id, wrong bytes
    with pytest.raises(ConfigurationError, match=f"'{TEST_KEK_ID}'.*not the key"):
        service.sweep_on_start(file_engine, now=clock())
    with Session(file_engine) as s:  # nothing was re-keyed
        assert {r.kek_id for r in s.exec(select(VaultTenantKey))} == {TEST_KEK_ID}
    keys.configure(vault_keys)
    assert service.sweep_on_start(file_engine, now=clock()).destroyed == 0
    _all_readable(file_engine, refs, clock)


def test_rotation_interrupted_half_way_then_resumed(file_engine, clock, vault_keys):
    refs = _seed(file_engine, clock, tenants=5, per_tenant=2)
    with Session(file_engine) as s:
        blobs = {r.id: r.ciphertext for r in s.exec(select(VaultCredential))}
    calls = []

    def crash_after_first_batch(done: int, total: int) -> None:
        calls.append((done, total))
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        service.rotate_kek(principal=SYSTEM, engine=file_engine, batch_size=2, now=clock(),
                           progress=crash_after_first_batch)
    new_id = vault_keys.ring.active
    assert new_id != TEST_KEK_ID and set(vault_keys.ring.keys) == {TEST_KEK_ID, new_id}
    with Session(file_engine) as s:
        wrapped_by = sorted(r.kek_id for r in s.exec(select(VaultTenantKey)))
    assert wrapped_by.count(new_id) == 2 and wrapped_by.count(TEST_KEK_ID) == 3
    _all_readable(file_engine, refs, clock)  # half-way: every secret still readable
    with Session(file_engine) as s:
        assert s.get(VaultKek, TEST_KEK_ID).state == "retiring"

    clock.advance(minutes=5)
    progress = []
    result = service.rotate_kek(principal=SYSTEM, engine=file_engine, batch_size=2, now=clock(),
                                progress=lambda d, t: progress.append((d, t)))
    assert result.new_key is False and result.active == new_id  # resumed, no third key
    assert result.rewrapped == 3 and result.retired == [TEST_KEK_ID]
    assert progress[-1] == (3, 3)
    assert set(vault_keys.ring.keys) == {new_id}  # the old key is gone from the ring
    _all_readable(file_engine, refs, clock)
    with Session(file_engine) as s:
        assert {r.kek_id for r in s.exec(select(VaultTenantKey))} == {new_id}
        assert s.get(VaultKek, TEST_KEK_ID).state == "retired"
        assert {r.id: r.ciphertext for r in s.exec(select(VaultCredential))} == blobs  # credentials untouched
        assert verify_chain(s) == []
    service.sweep_on_start(file_engine, now=clock())  # the retired key is not needed any more


def test_read_only_ring_rotation_is_done_by_the_operator(file_engine, clock):
    one = ring_json({"k1": TEST_KEK}, "k1")
    keys.configure(EnvKeyProvider(one))
    try:
        refs = _seed(file_engine, clock, tenants=2)
        with pytest.raises(ConfigurationError, match="read-only"):
            service.rotate_kek(principal=SYSTEM, engine=file_engine, now=clock())
        keys.configure(EnvKeyProvider(ring_json({"k1": TEST_KEK, "k2": OTHER}, "k2")))  # operator adds k2
        result = service.rotate_kek(principal=SYSTEM, engine=file_engine, now=clock())
        assert (result.active, result.rewrapped, result.retired, result.new_key) == ("k2", 2, ["k1"], False)
        _all_readable(file_engine, refs, clock)
        with Session(file_engine) as s:
            status = service.vault_status(s, principal=SYSTEM, now=clock())
        assert {k.kek_id: k.state for k in status.keks} == {"k1": "retired", "k2": "active"}
        assert status.rotation_pending == 0
    finally:
        keys.configure(None)


def test_rotate_dek_re_encrypts_one_tenant(session, tenant, other_tenant, clock, vault_keys):
    world = make_vault_world(session, tenant)
    other = make_vault_world(session, other_tenant)
    refs = []
    for w in (world, other):
        refs.append(service.put(session, principal=SYSTEM, tenant_id=w.tenant.id, purpose="crm-login",
                                crm_account_id=w.account.id, app_user_id=w.users[0].id, secret=f"pw-{w.tenant.slug}",
                                now=clock()))
    session.commit()
    before = {r.id: r.ciphertext for r in session.exec(select(VaultCredential))}
    old_key = session.get(VaultTenantKey, tenant.id).wrapped_dek
    assert service.rotate_dek(session, principal=SYSTEM, tenant_id=tenant.id, now=clock()) == 1
    session.commit()
    key = session.get(VaultTenantKey, tenant.id)
    assert key.dek_version == 2 and key.wrapped_dek != old_key
    after = {r.id: r.ciphertext for r in session.exec(select(VaultCredential))}
    assert after[refs[0].id] != before[refs[0].id] and after[refs[1].id] == before[refs[1].id]
    for ref, expected in zip(refs, ("pw-acme", "pw-globex"), strict=True):
        with service.use(session, ref, principal=SYSTEM, reason="check", now=clock()) as secret:
            assert secret.get_secret_value() == expected


def test_key_file_rotation_writes_atomically_and_keeps_0600(tmp_path, file_engine, clock):
    path = tmp_path / "vault-keys.json"
    provider = FileKeyProvider(path, create=True)
    keys.configure(provider)
    try:
        refs = _seed(file_engine, clock, tenants=2)
        old = provider.load().active
        result = service.rotate_kek(principal=SYSTEM, engine=file_engine, now=clock())
        ring = provider.load()
        assert ring.active == result.active != old and list(ring.keys) == [result.active]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
        _all_readable(file_engine, refs, clock)
    finally:
        keys.configure(None)


def test_demo_key_file_is_not_committed_by_accident():
    root = Path(__file__).resolve().parents[3]
    rel = os.path.relpath(keys.DEMO_KEY_FILE, root)
    patterns = [ln.strip() for ln in (root / ".gitignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert any(fnmatch.fnmatch(rel, p) for p in patterns), (
        f"add {rel} to .gitignore: the demo key-encryption key must never be committed"
    )
