"""`crmbridge vault status | sweep | rotate-kek` against the configured database."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest
from sqlmodel import Session, select

from core.clock import utcnow
from core.tenants.access import Principal
from core.vault import cli, service
from core.vault.models import VaultCredential, VaultTenantKey
from core.vault.policy import set_policy
from tests.conftest import make_tenant
from tests.fixtures.vault import TEST_KEK_ID, make_vault_world

SYSTEM = Principal.system("test")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="crmbridge")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture
def seeded(app_db, vault_keys):
    with Session(app_db, expire_on_commit=False) as s:
        world = make_vault_world(s, make_tenant(s, "tinyco"))
        set_policy(s, principal=SYSTEM, tenant_id=world.tenant.id, idle_days=60)
        long_ago = utcnow() - timedelta(days=40)
        service.put(s, principal=SYSTEM, tenant_id=world.tenant.id, crm_account_id=world.account.id,
                    app_user_id=world.users[0].id, purpose="crm-login", secret="old", now=long_ago)
        service.put(s, principal=SYSTEM, tenant_id=world.tenant.id, crm_account_id=world.account.id,
                    app_user_id=world.users[1].id, purpose="crm-login", secret="new",
                    now=utcnow() - timedelta(days=25))
        s.commit()
    return world


def test_status_then_sweep_then_status(seeded, app_db, capsys):
    assert run("vault", "status") == 0
    out = capsys.readouterr().out
    assert f"active {TEST_KEK_ID}" in out and "2 active" in out and "last sweep: never" in out
    assert "user2@tinyco.example" in out  # ends within 7 days (30-day TTL, stored 25 days ago)
    assert run("vault", "sweep") == 0
    assert "destroyed 1 expired and 0 idle" in capsys.readouterr().out
    run("vault", "status")
    out = capsys.readouterr().out
    assert "1 active" in out and "1 user(s) need to reconnect" in out and "destroyed 1 expired" in out


def test_rotate_kek_from_the_cli(seeded, app_db, vault_keys, capsys):
    assert run("vault", "rotate-kek", "--batch-size", "1") == 0
    out = capsys.readouterr().out
    assert "re-wrapped 1 of 1 tenant key(s)" in out and f"retired: {TEST_KEK_ID}" in out
    with Session(app_db) as s:
        assert {k.kek_id for k in s.exec(select(VaultTenantKey))} == {vault_keys.ring.active}
        assert len(s.exec(select(VaultCredential)).all()) == 2
    assert run("vault", "rotate-kek", "--no-new-key") == 0
    assert "re-wrapped 0 tenant key(s)" in capsys.readouterr().out
