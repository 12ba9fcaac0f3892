"""Demo credentials: app users of accounts that hold each user's own login get the sandbox login of
their CRM user (data/demo/sandbox.yaml), as if they had used a connect link — except the last user of
each account, left to connect through a link. The second user's login was stored 27 days ago (and
used since), so the Vault page has something whose 30-day TTL ends soon. Demo values only: they log in
to the local sandbox.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlmodel import Session, col, select

from core.connections.links import LOGIN_PURPOSE, VIA, login_secret
from core.errors import ConfigurationError
from core.settings import ROOT
from core.tenants.access import Principal
from core.tenants.models import AppUser, AppUserCrmIdentity, CrmAccount
from core.vault import keys, service
from core.vault.models import VaultCredential

log = logging.getLogger("crmbridge.vault.demo")
SANDBOX_FILE = ROOT / "data" / "demo" / "sandbox.yaml"


def _sandbox_logins(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    logins: dict[str, dict[str, Any]] = {}
    for org in (data.get("salesforce") or {}).get("orgs", {}).values():
        for user in org.get("users", []):
            if user.get("id") and user.get("password"):
                logins[str(user["id"])] = user
    return logins


def load_demo(session: Session, *, scenario: dict[str, Any], principal: Principal, now: datetime,
              tenants: dict[str, int], sandbox_file: Path = SANDBOX_FILE) -> int:
    """Store the demo per-user logins; returns how many. Skipped (with a warning) without vault keys."""
    try:
        keys.current_ring()
    except ConfigurationError as exc:
        log.warning("demo: no vault credentials loaded (%s)", exc)
        return 0
    logins = _sandbox_logins(sandbox_file)
    stored = 0
    accounts = session.exec(select(CrmAccount).where(
        col(CrmAccount.tenant_id).in_(list(tenants.values())),
        col(CrmAccount.credential_mode) == "per_user_password")).all()
    for account in accounts:
        rows = session.exec(
            select(AppUser, AppUserCrmIdentity)
            .join(AppUserCrmIdentity, col(AppUserCrmIdentity.app_user_id) == col(AppUser.id))
            .where(AppUserCrmIdentity.crm_account_id == account.id).order_by(col(AppUser.id))).all()
        for i, (user, identity) in enumerate(rows[:-1]):
            login = logins.get(identity.crm_user_id)
            if login is None:
                continue
            ref = service.store(session, actor=user.email, tenant_id=account.tenant_id, purpose=LOGIN_PURPOSE,
                                secret=login_secret(login["username"], login["password"],
                                                    login.get("security_token", "")),
                                crm_account_id=account.id, app_user_id=user.id, via=VIA,
                                now=now - timedelta(days=27) if i == 1 else now)
            row = session.get(VaultCredential, ref.id)
            if row is not None and i == 1:  # in daily use since: only its TTL is near
                row.last_used_at = now - timedelta(hours=3)
                session.add(row)
            stored += 1
    return stored
