"""Emulator-only provisioning: make a new CRM org (Salesforce), environment (Dynamics 365) or portal
(HubSpot) and a SAML IdP for any tenant the console creates, so a newcomer can onboard it in the demo
without editing data/demo/.

This API is the sandbox's own (no vendor has it: a real customer signs up for an org and an IdP and
copies the values from their setup screens). What it makes follows the same scenario shape as
data/demo/sandbox.yaml and is played by the same vendor modules, so every vendor rule still applies.

    POST /_sandbox/provision          {"tenant": "initrode", "name": "Initrode", "crm": "salesforce"}
                                      → 201 (made) or 200 (already made for this tenant and CRM): the record
    GET  /_sandbox/provision/{tenant} → {"orgs": [record, ...]} (404 when nothing was made for it)

A record (JSON) holds what the customer's admin would read off the vendor's setup screens::

    {"tenant", "crm", "org", "name", "instance_url", "idp_metadata_url", "idp_users": [...],
     "fields": [{"title": <the console form's field title>, "value": ..., "secret": bool}, ...],
     "users": [{"username", "password", "id", "role"}, ...]}

Passwords and client secrets are random per org (demo values, kept 0600 beside the IdP keys; see
sandbox/state.py). Like the whole sandbox it imports nothing from ``core``.
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sandbox.state import SandboxState, ScenarioError, substitute

CRMS = ("salesforce", "dynamics", "hubspot")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_SHORT = {"salesforce": "sf", "dynamics": "dyn", "hubspot": "hub"}


def _password() -> str:
    return f"Demo-{secrets.token_urlsafe(9)}"


def _sf_org_id(key: str) -> str:
    digest = hashlib.sha256(f"org:{key}".encode()).hexdigest().upper()
    return ("00D" + digest)[:18]


def _pick_key(state: SandboxState, tenant: str, crm: str) -> str:
    taken = state.org_keys()
    for candidate in (tenant, f"{tenant}-{_SHORT[crm]}", *(f"{tenant}-{_SHORT[crm]}{n}" for n in range(2, 100))):
        if candidate not in taken:
            return candidate
    raise ScenarioError(f"no free org key for {tenant!r}")


def _people(tenant: str, name: str) -> list[tuple[str, str, str]]:
    """(email, display name, role) of the org's people: the tenant's admin and a sales rep."""
    return [(f"admin@{tenant}.example", f"{name} Admin", "admin"), (f"sales@{tenant}.example", "Sam Seller", "user")]


def _salesforce(tenant: str, key: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    integration = f"integration@{tenant}.example"
    users = [{"username": integration, "name": "CRM Bridge Integration", "license": "Salesforce Integration",
              "password": _password(), "security_token": secrets.token_hex(5).upper(), "role": "api user"}]
    users += [{"username": email, "name": person, "password": _password(),
               "security_token": secrets.token_hex(5).upper(), "role": role}
              for email, person, role in _people(tenant, name)]
    spec = {
        "name": name, "edition": "enterprise", "org_id": _sf_org_id(key), "api_used": 0,
        "licenses": [{"name": "Salesforce", "total": 25, "used": 2},
                     {"name": "Salesforce Integration", "total": 5, "used": 1}],
        "users": [{k: v for k, v in u.items() if k != "role"} for u in users],
        "apps": [
            {"client_id": f"{key}-integration", "client_secret": secrets.token_urlsafe(18),
             "name": f"CRM Bridge ({name} API user)", "client_credentials_user": integration, "redirect_uris": []},
            {"client_id": f"{key}-connected-app", "client_secret": secrets.token_urlsafe(18),
             "name": f"CRM Bridge ({name})", "redirect_uris": ["${CONSOLE_URL}/oauth/salesforce/callback"]},
        ],
        "opportunities": {"generate": 20},
    }
    return {"salesforce": {"orgs": {key: spec}}}, {"users": users}


def _dynamics(tenant: str, key: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    ns = uuid.uuid5(uuid.NAMESPACE_URL, f"crmbridge-sandbox:{key}")
    people = [{"systemuserid": str(uuid.uuid5(ns, email)), "fullname": person, "email": email,
               "object_id": str(uuid.uuid5(ns, "oid:" + email)), "role": role}
              for email, person, role in _people(tenant, name)]
    spec = {
        "edition": "sales-enterprise", "directory": str(uuid.uuid5(ns, "directory")),
        "apps": [{"client_id": str(uuid.uuid5(ns, "app")), "secret": secrets.token_urlsafe(24), "name": "CRM Bridge",
                  "delegate": True, "graph_roles": ["Organization.Read.All"]}],
        "users": [{k: v for k, v in p.items() if k != "role"} for p in people],
        "licenses": [{"sku": "DYN365_ENTERPRISE_SALES", "enabled": 10, "consumed": 2}],
        "opportunities": {"generate": 20},
    }
    return {"dynamics": {"environments": {key: spec}}}, {"people": people}


def _hubspot(state: SandboxState, tenant: str, key: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    number = int(hashlib.sha256(key.encode()).hexdigest(), 16)
    people = [{"id": 200 + i, "email": email, "first_name": person.split()[0], "last_name": person.split()[-1],
               "super_admin": role == "admin"} for i, (email, person, role) in enumerate(_people(tenant, name), 1)]
    spec = {"portal_id": 5_000_000 + number % 1_000_000, "tier": "professional", "time_zone": "Europe/London",
            "users": people, "deals": {"generate": 20}}
    return {"hubspot": {"portals": {key: spec}}}, {"people": people}


def _fields(state: SandboxState, record: dict[str, Any], api: str) -> list[dict[str, Any]]:
    """The values the console's CRM-account form asks for, under that form's field titles."""
    crm, key = record["crm"], record["org"]
    scenario = substitute(record["scenario"], state.variables)
    if crm == "salesforce":
        apps = scenario["salesforce"]["orgs"][key]["apps"]
        return [
            {"title": "My Domain URL", "value": f"{api}/salesforce/{key}"},
            {"title": "Consumer key (API user — client credentials)", "value": apps[0]["client_id"]},
            {"title": "Consumer secret (API user — client credentials)", "value": apps[0]["client_secret"],
             "secret": True},
            {"title": "Consumer key (each user — OAuth)", "value": apps[1]["client_id"]},
            {"title": "Consumer secret (each user — OAuth)", "value": apps[1]["client_secret"], "secret": True},
            {"title": "Callback URL registered on the connected app", "value": apps[1]["redirect_uris"][0]},
        ]
    if crm == "dynamics":
        env = scenario["dynamics"]["environments"][key]
        return [
            {"title": "Environment URL", "value": f"{api}/dynamics/{key}"},
            {"title": "Directory (tenant) ID", "value": env["directory"]},
            {"title": "Application (client) ID", "value": env["apps"][0]["client_id"]},
            {"title": "Client secret value", "value": env["apps"][0]["secret"], "secret": True},
            {"title": "Microsoft Entra authority (advanced)", "value": f"{api}/entra"},
            {"title": "Microsoft Graph endpoint (advanced)", "value": f"{api}/graph"},
        ]
    hub_apps: dict[str, dict[str, Any]] = state.section("hubspot").get("apps") or {}
    client_id, app = next(iter(hub_apps.items()), ("", {}))
    portal = scenario["hubspot"]["portals"][key]
    browser = state.browser_url or api
    return [
        {"title": "API root", "value": f"{api}/hubspot"},
        {"title": "Hub ID", "value": str(portal["portal_id"])},
        {"title": "App client ID", "value": str(client_id)},
        {"title": "App client secret", "value": str(app.get("secret", "")), "secret": True},
        {"title": "Authorize URL", "value": f"{browser}/hubspot/oauth/authorize"},
        {"title": "Account to pick on the install page", "value": f"{key} (Hub ID {portal['portal_id']})"},
    ]


def _activate(state: SandboxState, record: dict[str, Any]) -> None:
    """Make the vendor stores play the new org now (a reset or restart rebuilds it from the scenario)."""
    crm, key = record["crm"], record["org"]
    scenario = substitute(record["scenario"], state.variables)
    store = state.vendors.get(crm)
    if crm == "salesforce" and store is not None:
        store.orgs[key] = store._build_org(key, scenario["salesforce"]["orgs"][key])
    elif crm == "dynamics" and store is not None:
        store.environments[key] = store._build_env(key, scenario["dynamics"]["environments"][key],
                                                   random.Random(f"dynamics:{state.seed}:{key}"))
    elif crm == "hubspot" and store is not None:
        store.portals[key] = store._portal(key, scenario["hubspot"]["portals"][key],
                                           random.Random(f"hubspot:{state.seed}:{key}"))
    idp = state.vendors.get("idp")
    if idp is not None and hasattr(idp, "add_tenant"):
        known = list(idp.users.get(record["tenant"], []))
        idp.add_tenant(record["tenant"], known + [u for u in record["idp_users"] if u not in known])


def _view(state: SandboxState, record: dict[str, Any], api: str) -> dict[str, Any]:
    crm, key, tenant = record["crm"], record["org"], record["tenant"]
    users: list[dict[str, Any]] = []
    if crm == "salesforce":
        store = state.vendors.get("salesforce")
        org = store.orgs.get(key) if store is not None else None
        for u in record["extra"]["users"]:
            found = org.user_by_name(u["username"]) if org is not None else None
            users.append({"username": u["username"], "password": u["password"], "role": u["role"],
                          "security_token": u["security_token"], "id": found.id if found else ""})
    elif crm == "dynamics":
        users = [{"username": p["email"], "role": p["role"], "id": p["systemuserid"]}
                 for p in record["extra"]["people"]]
    else:
        users = [{"username": p["email"], "role": "admin" if p["super_admin"] else "user", "id": str(p["id"])}
                 for p in record["extra"]["people"]]
    instance = next(f["value"] for f in _fields(state, record, api)
                    if f["title"] in ("My Domain URL", "Environment URL", "API root"))
    return {
        "tenant": tenant, "crm": crm, "org": key, "name": record["name"], "instance_url": instance,
        "idp_metadata_url": f"{api}/idp/{tenant}/metadata", "idp_users": record["idp_users"],
        "fields": [{"secret": False, **f} for f in _fields(state, record, api)], "users": users,
    }


def provision(state: SandboxState, *, tenant: str, name: str, crm: str, api: str) -> tuple[dict[str, Any], bool]:
    """The tenant's org on ``crm`` (made now unless it exists) and its IdP: (view, created)."""
    if not _SLUG.fullmatch(tenant):
        raise ScenarioError(f"tenant {tenant!r} must be a slug: lowercase letters, digits and dashes")
    if crm not in CRMS:
        raise ScenarioError(f"crm {crm!r}: use one of {list(CRMS)}")
    existing = state.provisioned().get(f"{tenant}:{crm}")
    if existing is not None:
        return _view(state, existing, api), False
    key = _pick_key(state, tenant, crm)
    name = (name or tenant).strip()[:80] or tenant
    if crm == "salesforce":
        fragment, extra = _salesforce(tenant, key, name)
    elif crm == "dynamics":
        fragment, extra = _dynamics(tenant, key, name)
    else:
        fragment, extra = _hubspot(state, tenant, key, name)
    idp_users = [email for email, _, _ in _people(tenant, name)]
    known_idp = state.section("idp").get("tenants") or {}
    if tenant not in known_idp and not any(tenant in r.get("scenario", {}).get("idp", {}).get("tenants", {})
                                           for r in state.provisioned().values()):
        fragment["idp"] = {"tenants": {tenant: {"users": idp_users}}}
    record = {"tenant": tenant, "crm": crm, "org": key, "name": name, "scenario": fragment, "extra": extra,
              "idp_users": idp_users}
    state.save_provisioned(f"{tenant}:{crm}", record)
    _activate(state, record)
    return _view(state, record, api), True


def routes(state: SandboxState) -> list[BaseRoute]:
    def api_base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    async def create(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "send a JSON object: {tenant, name, crm}"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "send a JSON object: {tenant, name, crm}"}, status_code=400)
        try:
            view, created = provision(state, tenant=str(body.get("tenant") or ""), name=str(body.get("name") or ""),
                                      crm=str(body.get("crm") or ""), api=api_base(request))
        except ScenarioError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(view, status_code=201 if created else 200)

    async def show(request: Request) -> Response:
        tenant = request.path_params["tenant"]
        views = [_view(state, r, api_base(request)) for k, r in sorted(state.provisioned().items())
                 if k.split(":", 1)[0] == tenant]
        if not views:
            return JSONResponse({"error": f"nothing provisioned for {tenant!r}"}, status_code=404)
        return JSONResponse({"orgs": views})

    return [
        Route("/_sandbox/provision", create, methods=["POST"]),
        Route("/_sandbox/provision/{tenant}", show, methods=["GET"]),
    ]
