"""The demo loader stores the sandbox logins of per-user accounts, and they decrypt to what the sandbox expects."""

from __future__ import annotations

import yaml
from sqlmodel import select

from core.connections import demo_credentials as demo
from core.connections.demo_credentials import SANDBOX_FILE
from core.connections.links import parse_login_secret
from core.demo import load_scenario, read_scenario
from core.tenants.access import Principal
from core.tenants.models import AppUser
from core.vault import service
from core.vault.models import VaultCredential

SYSTEM = Principal.system("demo")


def test_demo_logins_match_the_sandbox(session, clock, vault_keys):
    slugs = load_scenario(session, read_scenario())
    assert demo.load_demo(session, scenario={}, principal=SYSTEM, now=clock(), tenants=slugs) > 0
    session.commit()
    sandbox = {u["username"]: u for org in yaml.safe_load(SANDBOX_FILE.read_text())["salesforce"]["orgs"].values()
               for u in org.get("users", [])}
    rows = session.exec(select(VaultCredential)).all()
    owners = {session.get(AppUser, r.app_user_id).email for r in rows}
    assert "tom@tinyco.example" in owners and "ida@tinyco.example" not in owners  # Ida connects by link
    for row in rows:
        with service.use(session, row.id, principal=SYSTEM, reason="demo check", now=clock()) as secret:
            login = parse_login_secret(secret)
        assert login.password.get_secret_value() == sandbox[login.username]["password"]
    status = service.vault_status(session, principal=SYSTEM, now=clock())
    assert any(e.owner == "uma@tinyco.example" for e in status.expiring)
