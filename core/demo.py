"""Load the demo scenarios (data/demo/*.yaml). Packages add their own demo data (credentials, SSO,
sync history, posture snapshots) through ``load_demo(session, scenario, principal, now)`` in their
``demo`` module, called after the tenants exist."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import delete, func
from sqlmodel import Session, SQLModel, select

import core.models  # noqa: F401
from core.accounts.routes import DEMO_PASSWORD
from core.clock import utcnow
from core.db import get_engine, session_scope
from core.settings import ROOT, get_settings
from core.tenants.access import Principal
from core.tenants.auth import hash_password
from core.tenants.models import AppUser, AppUserCrmIdentity, ConsoleAccount, CrmAccount, Tenant

log = logging.getLogger(__name__)
DEMO_DIR = ROOT / "data" / "demo"
PACKAGE_DEMOS = ("core.accounts.demo", "core.connections.demo_credentials", "core.connections.demo",
                 "core.sso.demo", "core.sync.demo", "core.posture.demo", "core.alerts.demo")


def read_scenario(path: Path | None = None) -> dict[str, Any]:
    return yaml.safe_load((path or DEMO_DIR / "tenants.yaml").read_text())


def _reset(session: Session) -> None:
    for table in reversed(SQLModel.metadata.sorted_tables):
        session.execute(delete(table))


def load_scenario(session: Session, scenario: dict[str, Any], *, sandbox_url: str | None = None) -> dict[str, int]:
    """Create tenants, CRM accounts, users and console accounts from a scenario dict."""
    principal = Principal.system("demo")
    from core.tenants.audit import record_event

    sandbox_url = (sandbox_url or get_settings().sandbox_url).rstrip("/")
    slugs: dict[str, int] = {}
    for t in scenario["tenants"]:
        tenant = Tenant(name=t["name"], slug=t["slug"], status=t.get("status", "live"),
                        onboarding_step=t.get("onboarding_step", "go_live"))
        session.add(tenant)
        session.flush()
        slugs[tenant.slug] = tenant.id  # type: ignore[assignment]
        record_event(session, principal=principal, action="tenant.create", tenant_id=tenant.id,
                     target=f"tenant:{tenant.slug}", details={"name": tenant.name, "source": "demo"})
        accounts: dict[str, CrmAccount] = {}
        for a in t.get("crm_accounts", []):
            acc = CrmAccount(
                tenant_id=tenant.id, provider=a["provider"], edition=a["edition"], label=a["label"],  # type: ignore[arg-type]
                credential_mode=a["credential_mode"], instance_url=f"{sandbox_url}/{a['provider']}/{a['org']}",
                settings_json=json.dumps({"sandbox_org": a["org"]}),
            )
            session.add(acc)
            session.flush()
            accounts[acc.label] = acc
            record_event(session, principal=principal, action="crm_account.create", tenant_id=tenant.id,
                         target=f"crm_account:{acc.id}", details={"provider": acc.provider, "label": acc.label})
        first = next(iter(accounts.values()), None)
        for u in t.get("users", []):
            user = AppUser(tenant_id=tenant.id, email=u["email"], name=u["name"],  # type: ignore[arg-type]
                           signs_in_by_sso=bool(u.get("sso")), sso_subject=u["email"] if u.get("sso") else None)
            session.add(user)
            session.flush()
            user_acc = accounts.get(u.get("account", ""), first)
            if user_acc is not None and u.get("crm_user_id"):
                session.add(AppUserCrmIdentity(app_user_id=user.id, crm_account_id=user_acc.id,  # type: ignore[arg-type]
                                               crm_user_id=str(u["crm_user_id"])))
    demo_hash = hash_password(DEMO_PASSWORD)
    for c in scenario.get("console_accounts", []):
        session.add(ConsoleAccount(email=c["email"], name=c.get("name", ""), role=c["role"],
                                   tenant_id=slugs.get(c.get("tenant", "")), password_hash=demo_hash))
    session.flush()
    return slugs


def load_demo(*, reset: bool = False, only_if_empty: bool = False, path: Path | None = None) -> str:
    engine = get_engine()
    if not reset:  # a reset deletes every credential anyway (and the keys' check values with them)
        from core.vault.service import require_keys_at_start

        require_keys_at_start(engine, process="crmbridge demo load")
    with session_scope(engine) as s:
        has = s.exec(select(func.count()).select_from(Tenant)).one()
        if has and only_if_empty:
            return "demo: the database already has tenants; left as it is"
        if has and not reset:
            return "demo: the database already has tenants; use --reset to replace them"
        if reset:
            _reset(s)  # every row goes, the vault's key check values with them: today's ring is registered
        scenario = read_scenario(path)
        slugs = load_scenario(s, scenario)
        now = utcnow()
        for name in PACKAGE_DEMOS:
            mod = importlib.import_module(name)
            mod.load_demo(s, scenario=scenario, principal=Principal.system("demo"), now=now, tenants=slugs)
    return f"demo: loaded {len(slugs)} tenants ({', '.join(slugs)})"
