"""Demo data for the providers: how each demo Salesforce account signs in, its API-user secret in the
vault, and a day of API-usage samples so the quota gauge and its forecast have a story.

Called by ``core.demo.load_demo`` after the tenants exist. Nothing here calls the sandbox (it may not
be running while the demo loads): the secrets and figures come from data/demo/sandbox.yaml, the
scenario the sandbox plays, so a "Test connection" in the demo succeeds against it.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlmodel import Session, select

from core.connections.models import ApiUsageSample
from core.connections.service import CREDENTIAL_PURPOSE
from core.errors import CrmBridgeError
from core.providers.catalog import get_catalog
from core.settings import ROOT
from core.tenants.access import Principal
from core.tenants.models import CrmAccount

log = logging.getLogger(__name__)

SANDBOX_SCENARIO = ROOT / "data" / "demo" / "sandbox.yaml"
#: demo accounts whose writes carry the real actor in a custom field (posture: "one org attributed")
ATTRIBUTED_ORGS = {"bigcorp-emea"}
#: calls per hour in the demo's last day, per org (sets the forecast)
HOURLY_RATE = {"tinyco": 120, "bigcorp-emea": 9_000, "bigcorp-americas": 2_500, "newco": 15}


def _org_specs(path: Path = SANDBOX_SCENARIO) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return dict((data.get("salesforce") or {}).get("orgs") or {})


def _daily_limit(spec: dict[str, Any]) -> int:
    if "daily_api_limit" in spec:
        return int(spec["daily_api_limit"])
    edition = str(spec.get("edition", "enterprise"))
    full = sum(int(x["total"]) for x in spec.get("licenses", []) if x["name"] == "Salesforce")
    try:
        return get_catalog().edition("salesforce", edition).daily_api_allocation.value.for_licenses(full)
    except CrmBridgeError:
        return 100_000 + 1_000 * full


def load_demo(session: Session, *, scenario: dict[str, Any], principal: Principal, now: datetime,
              tenants: dict[str, int]) -> None:
    orgs = _org_specs()
    accounts = session.exec(select(CrmAccount).where(CrmAccount.provider == "salesforce")).all()
    for acc in accounts:
        settings = json.loads(acc.settings_json or "{}")
        org = settings.get("sandbox_org")
        spec = orgs.get(org or "")
        if spec is None:
            continue
        if acc.credential_mode == "api_user":
            app = next((a for a in spec.get("apps", []) if a.get("client_credentials_user")), None)
            settings.update(auth_mode="oauth_client_credentials", client_id=app["client_id"] if app else "")
            if app:
                _store_secret(session, acc, principal, {"client_secret": str(app["client_secret"])}, now)
        elif acc.credential_mode == "per_user_oauth":
            app = next(iter(spec.get("apps", [])), None)
            settings.update(auth_mode="oauth_authorization_code", client_id=app["client_id"] if app else "")
        else:
            settings.update(auth_mode="password")
        settings.setdefault("external_id_field", "CrmBridge_Key__c")
        if org in ATTRIBUTED_ORGS:
            settings["attribution_field"] = "CrmBridge_Actor__c"
        acc.settings_json = json.dumps(settings, sort_keys=True)
        session.add(acc)
        if spec.get("api_enabled", True):
            _usage_history(session, acc, used=int(spec.get("api_used", 0)), limit=_daily_limit(spec),
                           rate=HOURLY_RATE.get(org or "", 100), now=now)
    _other_crms(session, principal, now)
    session.flush()


def _other_crms(session: Session, principal: Principal, now: datetime) -> None:
    """Dynamics 365 (application user, client credentials through the sandbox's Entra) and HubSpot
    (an OAuth app install) as data/demo/sandbox.yaml plays them."""
    from core.settings import get_settings

    base = get_settings().sandbox_url.rstrip("/")
    plans: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
        "dynco": (f"{base}/dynamics/dynco", {
            "auth_mode": "oauth_client_credentials", "authority_url": f"{base}/entra", "graph_url": f"{base}/graph",
            "tenant_id": "6f1c2b9e-5d3a-4c1e-9b7a-d1c0de5a2026", "client_id": "0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a926",
            "impersonation": True,
        }, {"client_secret": "demo-dynco-app-secret"}),
        "hubco": (f"{base}/hubspot", {
            "auth_mode": "oauth_authorization_code", "client_id": "crmbridge-hubspot-app",
            "authorize_url": f"{base}/hubspot/oauth/authorize",
        }, {"client_secret": "demo-hubspot-app-secret", "refresh_token": "demo-hubco-refresh-token"}),
    }
    for acc in session.exec(select(CrmAccount).where(CrmAccount.provider != "salesforce")).all():
        org = json.loads(acc.settings_json or "{}").get("sandbox_org")
        if org not in plans:
            continue
        url, settings, secret = plans[org]
        acc.instance_url = url
        acc.settings_json = json.dumps({"sandbox_org": org, **settings}, sort_keys=True)
        session.add(acc)
        session.flush()
        _store_secret(session, acc, principal, secret, now)


def _store_secret(session: Session, acc: CrmAccount, principal: Principal, fields: dict[str, str],
                  now: datetime) -> None:
    from core.vault import service as vault

    try:
        vault.put(session, principal=principal, tenant_id=acc.tenant_id, purpose=CREDENTIAL_PURPOSE,
                  secret=json.dumps(fields), crm_account_id=acc.id, kind="client_secret", now=now)
    except CrmBridgeError as exc:  # no vault key configured: the demo still loads, the test says why
        log.warning("demo: could not store the API-user secret of %s: %s", acc.label, exc)


def _usage_history(session: Session, acc: CrmAccount, *, used: int, limit: int, rate: int, now: datetime) -> None:
    assert acc.id is not None
    for hours_ago in range(24, -1, -1):
        value = max(used - rate * hours_ago, 0)
        session.add(ApiUsageSample(tenant_id=acc.tenant_id, crm_account_id=acc.id, used=value, limit=limit,
                                   observed_at=now - timedelta(hours=hours_ago), source="demo"))
