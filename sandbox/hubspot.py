"""HubSpot for the sandbox: the CRM v3 REST API (deals, owners, search, batch), account info, settings users,
OAuth app installs (authorize page, ``/oauth/v1/token``, token info) plus service keys and legacy private-app
tokens.

Routes (``routes(state)``; the API root ``https://api.hubapi.com`` is ``/hubspot`` here, and the portal is
the one the token belongs to, as on the real API):

    GET   /hubspot/oauth/authorize                  install page (real host: app.hubspot.com)
    POST  /hubspot/oauth/authorize                  the demo admin approves: redirect with ?code=&state=
    POST  /hubspot/oauth/v1/token                   authorization_code / refresh_token grants
    POST  /hubspot/oauth/2026-03/token/introspect   token introspection (the current OAuth API; also /oauth/v3/…)
    GET   /hubspot/oauth/v1/access-tokens/{token}   token info, deprecated (v1 OAuth API sunset 2027-02-16)
    GET   /hubspot/account-info/v3/details          portalId, time zone, …
    GET   /hubspot/settings/v3/users                portal users
    GET   /hubspot/crm/v3/owners                    owners (limit ≤ 500)
    POST  /hubspot/crm/v3/objects/deals/search      search (limit ≤ 200, at most 10,000 results per query)
    POST  /hubspot/crm/v3/objects/deals/batch/{create|update|upsert|read}   ≤ 100 inputs
    GET|POST|PATCH  /hubspot/crm/v3/objects/deals[/{id}]   single-record calls
    POST  /_sandbox/hubspot/{portal}/limits         {"burst", "oauth_burst", "daily", "search_per_second", "clear"}
    POST  /_sandbox/hubspot/advance                 {"seconds": n}: move this vendor's clock forward
    POST  /_sandbox/hubspot/oauth                   {"v1_access_tokens": bool, "introspect": bool}: play the v1
                                                    sunset, or a HubSpot region without the new endpoint yet

Counting rules (developers.hubspot.com usage guidelines and changelog, checked 2026-11): every API request
counts once toward the app's rolling 10-second burst in that account and once toward the account's daily
limit, however many records a batch carries; search requests also have their own limit of 5 per second per
account. Over a limit: HTTP 429 with ``policyName`` ``TEN_SECONDLY_ROLLING``, ``SECONDLY`` (search) or
``DAILY``. Responses carry ``X-HubSpot-RateLimit-Max/-Remaining/-Interval-Milliseconds`` and, except for
OAuth-authorized calls, ``X-HubSpot-RateLimit-Daily/-Daily-Remaining``. The daily count resets at midnight
UTC here (HubSpot uses the portal's time zone). OAuth access tokens expire after ``expires_in`` (1,800 s);
service keys and private-app tokens do not. ``quota_exhausted`` answers the ``DAILY`` 429.

Batch writes (sources: the public issue Atlas-Authority/marketing-automation#174, where one contact with an
invalid email failed a whole batch with HTTP 400 and the body ``{"status": "error", "message": "Property values
were not valid: [{"isValid":false,"message":"Email address … is invalid","error":"INVALID_EMAIL","name":
"email"}]", …}``; HubSpot-public-api-spec-collection PublicApiSpecs/CRM/Deals/Rollouts/424/v3/deals.json,
``SimplePublicUpsertObject`` / ``SimplePublicObjectBatchInputUpsert``): one invalid input in a batch
update/upsert fails the whole request with a 400 that names the property and the value, never the input; the
spec's upsert result carries ``id``, ``properties``, ``new`` and ``objectWriteTraceId`` but does not promise to
echo the ``idProperty`` value or to keep input order, so the sandbox echoes neither (results come back in
reverse input order).

It imports nothing from ``core``.
"""

from __future__ import annotations

import html
import json
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

SEARCH_MAX_LIMIT = 200
SEARCH_MAX_RESULTS = 10_000
BATCH_MAX_INPUTS = 100
OWNERS_MAX_LIMIT = 500
LIST_MAX_LIMIT = 100
TIERS = {  # per-app 10 s burst, per-account daily (usage guidelines table)
    "free": (100, 250_000), "starter": (100, 250_000), "professional": (190, 625_000),
    "enterprise": (190, 1_000_000),
}
OAUTH_BURST_DEFAULT = 100  # "100 calls per 10 seconds per app per portal" (changelog, OAuth apps)
ALL_SCOPES = ("crm.objects.deals.read", "crm.objects.deals.write", "crm.objects.owners.read",
              "settings.users.read", "oauth")
DEAL_STAGES = ("appointmentscheduled", "qualifiedtobuy", "presentationscheduled", "decisionmakerboughtin",
               "contractsent", "closedwon", "closedlost")
READ_ONLY = {"hs_object_id", "createdate", "hs_lastmodifieddate", "hs_createdate"}
BASE_PROPERTIES = {"dealname", "dealstage", "pipeline", "amount", "closedate", "hubspot_owner_id", "description",
                   "crb_idempotency_key", *READ_ONLY}
UNIQUE_PROPERTIES = {"crb_idempotency_key"}


class HubSpotError(Exception):
    def __init__(self, status: int, category: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.category, self.message, self.extra = status, category, message, extra

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"status": "error", "message": self.message, "correlationId": str(uuid.uuid4()),
                "category": self.category, **self.extra}
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass
class Credential:
    kind: str  # oauth | service_key | private_app
    portal: str
    app: str  # what the burst limit is counted per: app id, key id
    scopes: tuple[str, ...]
    expires_at: float | None = None
    epoch: int = 0
    user: str | None = None
    user_id: int | None = None
    client_id: str | None = None


@dataclass
class Portal:
    key: str
    portal_id: int
    tier: str
    time_zone: str
    users: list[dict[str, Any]]
    burst: int
    oauth_burst: int
    daily: int
    search_per_second: int = 5
    token_lifetime_s: int = 1800
    deals: dict[str, dict[str, Any]] = field(default_factory=dict)  # id → {"properties", "createdAt", …}
    by_key: dict[str, str] = field(default_factory=dict)
    next_id: int = 9_000_000_001
    last_ms: int = 0
    windows: dict[str, deque[float]] = field(default_factory=dict)
    searches: deque[float] = field(default_factory=deque)
    daily_used: int = 0
    daily_day: str = ""
    throttled: dict[str, int] = field(default_factory=dict)


class HubSpotStore:
    def __init__(self, section: dict[str, Any], seed: int = 0) -> None:
        import random

        self.offset = 0.0
        self.apps: dict[str, dict[str, Any]] = {}
        self.portals: dict[str, Portal] = {}
        self.tokens: dict[str, Credential] = {}
        self.refresh: dict[str, Credential] = {}
        self.codes: dict[str, tuple[Credential, str, float]] = {}
        # HubSpot changelog "v1 OAuth API Deprecation": GET /oauth/v1/access-tokens/{token} is deprecated and
        # goes away on 2027-02-16; POST /oauth/2026-03/token/introspect replaces it. Both are served here; the
        # admin route turns either off to play the sunset (or a client that must fall back).
        self.v1_access_tokens = bool(section.get("v1_access_tokens", True))
        self.introspect = bool(section.get("introspect", True))
        rng = random.Random(f"hubspot:{seed}")
        for client_id, raw in (section.get("apps") or {}).items():
            self.apps[str(client_id)] = {
                "secret": str(raw["secret"]), "name": raw.get("name", "CRM Bridge"),
                "app_id": int(raw.get("app_id", 3_000_000 + len(self.apps))),
                "redirect_uris": list(raw.get("redirect_uris") or []),
            }
        for key, raw in (section.get("portals") or {}).items():
            self.portals[key] = self._portal(key, raw or {}, rng)

    def now(self) -> float:
        return time.time() + self.offset

    def _portal(self, key: str, raw: dict[str, Any], rng: Any) -> Portal:
        tier = str(raw.get("tier") or "professional")
        burst, daily = TIERS.get(tier, TIERS["professional"])
        users = [
            {"id": str(u["id"]), "email": u.get("email"), "firstName": u.get("first_name") or u.get("firstName"),
             "lastName": u.get("last_name") or u.get("lastName"), "superAdmin": bool(u.get("super_admin", False)),
             "roleIds": [], "primaryTeamId": None}
            for u in raw.get("users") or []
        ]
        portal = Portal(
            key=key, portal_id=int(raw.get("portal_id") or 4_000_000 + abs(hash(key)) % 1_000_000), tier=tier,
            time_zone=str(raw.get("time_zone") or "Europe/London"), users=users,
            burst=int(raw.get("burst", burst)), oauth_burst=int(raw.get("oauth_burst", OAUTH_BURST_DEFAULT)),
            daily=int(raw.get("daily", daily)), token_lifetime_s=int(raw.get("token_lifetime_s", 1800)),
        )
        scopes = tuple(raw.get("scopes") or ALL_SCOPES)
        for inst in raw.get("installs") or []:
            cred = Credential("oauth", key, str(inst["client_id"]), scopes, user=inst.get("user"),
                              user_id=int(inst["user_id"]) if inst.get("user_id") else None,
                              client_id=str(inst["client_id"]))
            self.refresh[str(inst["refresh_token"])] = cred
        for sk in raw.get("service_keys") or []:
            self.tokens[str(sk["token"])] = Credential("service_key", key, f"sk:{sk.get('name', 'key')}",
                                                       tuple(sk.get("scopes") or scopes))
        for pa in raw.get("private_apps") or []:
            self.tokens[str(pa["token"])] = Credential("private_app", key, f"pa:{pa.get('name', 'app')}",
                                                       tuple(pa.get("scopes") or scopes))
        count = int((raw.get("deals") or {}).get("generate", 0)) if isinstance(raw.get("deals"), dict) else 0
        start = self.now() - 30 * 86400
        for i in range(count):
            owner = users[i % len(users)]["id"] if users else None
            self.create(portal, {
                "dealname": f"{key.title()} deal {i + 1:03d}", "dealstage": DEAL_STAGES[i % 5],
                "amount": str(500 * (1 + rng.randrange(100))), "hubspot_owner_id": owner or "",
                "pipeline": "default",
            }, at_ms=int((start + i * 3600) * 1000))
        return portal

    def stamp(self, portal: Portal, at_ms: int | None = None) -> int:
        ms = at_ms if at_ms is not None else int(self.now() * 1000)
        ms = max(ms, portal.last_ms + 1)  # strictly increasing per portal: a total order for search
        portal.last_ms = ms
        return ms

    def create(self, portal: Portal, props: dict[str, str], at_ms: int | None = None) -> dict[str, Any]:
        ms = self.stamp(portal, at_ms)
        did = str(portal.next_id)
        portal.next_id += 1
        iso = _iso(ms)
        record = {"id": did, "properties": {"pipeline": "default", **props, "hs_object_id": did,
                                            "createdate": iso, "hs_lastmodifieddate": iso},
                  "createdAt": iso, "updatedAt": iso, "archived": False, "_ms": ms}
        portal.deals[did] = record
        key = props.get("crb_idempotency_key")
        if key:
            portal.by_key[key] = did
        return record

    def update(self, portal: Portal, record: dict[str, Any], props: dict[str, str]) -> dict[str, Any]:
        ms = self.stamp(portal)
        iso = _iso(ms)
        old_key = record["properties"].get("crb_idempotency_key")
        record["properties"].update(props)
        record["properties"]["hs_lastmodifieddate"] = iso
        record["updatedAt"] = iso
        record["_ms"] = ms
        new_key = record["properties"].get("crb_idempotency_key")
        if old_key and old_key != new_key:
            portal.by_key.pop(old_key, None)
        if new_key:
            portal.by_key[new_key] = record["id"]
        return record

    def inspect(self, key: str) -> dict[str, Any] | None:
        p = self.portals.get(key)
        if p is None:
            return None
        return {
            "portal_id": p.portal_id, "tier": p.tier,
            "deals": [{k: v for k, v in d.items() if k != "_ms"} for d in p.deals.values()],
            "rate_limits": {"burst": p.burst, "oauth_burst": p.oauth_burst, "daily": p.daily,
                            "daily_used": p.daily_used, "throttled": dict(p.throttled)},
        }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _ms_of(value: Any) -> int | None:
    if value in (None, ""):
        return None
    text = str(value)
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)


def _validate_props(props: Any, *, creating: bool) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(clean properties, validation errors in HubSpot's shape)."""
    if not isinstance(props, dict):
        return {}, [{"message": "properties must be an object", "code": "INVALID_INPUT"}]
    clean: dict[str, str] = {}
    errors: list[dict[str, Any]] = []
    for name, value in props.items():
        if name in READ_ONLY:
            errors.append({"isValid": False, "message": f"{name} is a read only property; its value cannot be "
                           "set.", "error": "READ_ONLY_VALUE", "name": name})
            continue
        if name not in BASE_PROPERTIES:
            errors.append({"isValid": False, "message": f'Property "{name}" does not exist',
                           "error": "PROPERTY_DOESNT_EXIST", "name": name})
            continue
        text = "" if value is None else str(value)
        if name == "amount" and text:
            try:
                float(text)
            except ValueError:
                errors.append({"isValid": False, "message": f"{text} was not a valid number.",
                               "error": "INVALID_FLOAT", "name": name})
                continue
        if name == "dealstage" and text and text not in DEAL_STAGES:
            errors.append({"isValid": False, "message": f"{text} was not one of the allowed options: "
                           f"[{', '.join(DEAL_STAGES)}]", "error": "INVALID_OPTION", "name": name})
            continue
        if name == "closedate" and text and _ms_of(text) is None:
            errors.append({"isValid": False, "message": f"{text} is not a valid date.", "error": "INVALID_DATE",
                           "name": name})
            continue
        clean[name] = text
    return clean, errors


def _validation_error(errors: list[dict[str, Any]], ids: list[str] | None = None) -> dict[str, Any]:
    # The message embeds the JSON list exactly as in Atlas-Authority/marketing-automation#174:
    # "Property values were not valid: [{"isValid":false,"message":"…","error":"INVALID_EMAIL","name":"email"}]"
    msg = json.dumps(errors, separators=(",", ":"))
    err: dict[str, Any] = {"status": "error", "category": "VALIDATION_ERROR",
                           "message": f"Property values were not valid: {msg}",
                           "errors": [{"message": e["message"], "code": e.get("error")} for e in errors]}
    if ids is not None:
        err["context"] = {"ids": ids}
    return err


def _public(record: dict[str, Any], properties: list[str] | None = None) -> dict[str, Any]:
    props = record["properties"]
    default = ("createdate", "hs_lastmodifieddate", "hs_object_id", "dealname", "amount", "dealstage",
               "pipeline", "closedate")
    names = properties if properties is not None else [n for n in default if n in props]
    shown = {n: (props.get(n) if props.get(n) != "" else None) for n in names}
    for n in ("createdate", "hs_lastmodifieddate", "hs_object_id"):
        shown.setdefault(n, props.get(n))
    return {"id": record["id"], "properties": shown, "createdAt": record["createdAt"],
            "updatedAt": record["updatedAt"], "archived": False}


def _match(record: dict[str, Any], flt: dict[str, Any]) -> bool:
    name, op = flt.get("propertyName"), str(flt.get("operator") or "EQ").upper()
    value = record["properties"].get(str(name))
    if op == "HAS_PROPERTY":
        return value not in (None, "")
    if op == "NOT_HAS_PROPERTY":
        return value in (None, "")
    if op == "IN":
        return value in {str(v) for v in flt.get("values") or []}
    target = flt.get("value")
    left: Any
    right: Any
    if name in {"hs_lastmodifieddate", "createdate", "closedate"}:
        left, right = _ms_of(value), _ms_of(target)
    elif name in {"amount", "hs_object_id"}:
        try:
            left, right = float(value) if value else None, float(target) if target is not None else None
        except ValueError:
            left, right = None, None
    else:
        left, right = value, (str(target) if target is not None else None)
    if op == "EQ":
        return bool(left == right)
    if op == "NEQ":
        return bool(left != right)
    if left is None or right is None:
        return False
    return bool({"LT": left < right, "LTE": left <= right, "GT": left > right, "GTE": left >= right}.get(op,
                                                                                                        False))


def routes(state: Any) -> list[BaseRoute]:
    """The HubSpot routes over ``state`` (a sandbox.state.SandboxState)."""

    def build(st: Any) -> None:
        st.vendors["hubspot"] = HubSpotStore(st.section("hubspot"), getattr(st, "seed", 0))

    build(state)
    state.on_reset(build)

    def store() -> HubSpotStore:
        s: HubSpotStore = state.vendors["hubspot"]
        return s

    state.add_inspector("hubspot", lambda key: store().inspect(key))

    # -- OAuth ------------------------------------------------------------------------------
    def issue_access(cred: Credential) -> tuple[str, int]:
        st = store()
        portal = st.portals[cred.portal]
        token = "CN" + secrets.token_urlsafe(40)
        st.tokens[token] = Credential("oauth", cred.portal, cred.app, cred.scopes,
                                      st.now() + portal.token_lifetime_s, state.epoch(cred.portal), cred.user,
                                      cred.user_id, cred.client_id)
        return token, portal.token_lifetime_s

    async def authorize(request: Request) -> Response:
        st = store()
        q = request.query_params if request.method == "GET" else await request.form()
        client_id = str(q.get("client_id") or "")
        app = st.apps.get(client_id)
        if app is None:
            return HTMLResponse("<h1>Authorization failed</h1><p>Unknown app (client_id).</p>", status_code=400)
        redirect_uri = str(q.get("redirect_uri") or "")
        if app["redirect_uris"] and redirect_uri not in app["redirect_uris"]:
            return HTMLResponse("<h1>Authorization failed</h1><p>redirect_uri does not match the app's "
                                "redirect URLs.</p>", status_code=400)
        scopes = [s for s in str(q.get("scope") or "").split() if s]
        if request.method == "GET":
            options = "".join(
                f'<option value="{html.escape(k)}">{html.escape(k)} (Hub ID {p.portal_id})</option>'
                for k, p in st.portals.items())
            hidden = "".join(f'<input type="hidden" name="{k}" value="{html.escape(str(v))}">'
                             for k, v in q.items())
            page = (f"<!doctype html><title>Install {html.escape(app['name'])}</title>"
                    f"<h1>Connect {html.escape(app['name'])} to HubSpot</h1>"
                    f"<p>This app asks for: {html.escape(', '.join(scopes) or 'no scopes')}</p>"
                    f'<form method="post"><label>Account <select name="portal">{options}</select></label> '
                    f'<label>Installing user email <input name="user" value=""></label>{hidden}'
                    '<button type="submit" name="decision" value="approve">Connect app</button> '
                    '<button type="submit" name="decision" value="deny">Cancel</button></form>')
            return HTMLResponse(page)
        state_param = str(q.get("state") or "")
        if q.get("decision") != "approve":
            query = urlencode({"error": "access_denied", "error_description": "The user declined the install",
                               "state": state_param})
            return RedirectResponse(f"{redirect_uri}?{query}", status_code=302)
        portal = st.portals.get(str(q.get("portal") or ""))
        if portal is None:
            return HTMLResponse("<h1>Unknown account</h1>", status_code=400)
        user = str(q.get("user") or (portal.users[0]["email"] if portal.users else "admin@example.com"))
        uid = next((int(u["id"]) for u in portal.users if u["email"] == user), None)
        code = secrets.token_urlsafe(24)
        cred = Credential("oauth", portal.key, client_id, tuple(scopes) or ALL_SCOPES, user=user, user_id=uid,
                          client_id=client_id)
        st.codes[code] = (cred, redirect_uri, st.now() + 300)
        return RedirectResponse(f"{redirect_uri}?{urlencode({'code': code, 'state': state_param})}",
                                status_code=302)

    async def oauth_token(request: Request) -> Response:
        st = store()
        form = await request.form()
        grant = str(form.get("grant_type") or "")
        client_id = str(form.get("client_id") or "")
        app = st.apps.get(client_id)
        if app is None:
            return JSONResponse({"status": "BAD_CLIENT_ID", "message": "missing or unknown client id",
                                 "correlationId": str(uuid.uuid4())}, status_code=400)
        if not secrets.compare_digest(str(form.get("client_secret") or ""), app["secret"]):
            return JSONResponse({"status": "BAD_CLIENT_SECRET", "message": "missing or invalid client secret",
                                 "correlationId": str(uuid.uuid4())}, status_code=400)
        if grant == "authorization_code":
            entry = st.codes.pop(str(form.get("code") or ""), None)
            if entry is None or entry[2] < st.now() or entry[0].client_id != client_id:
                return JSONResponse({"status": "BAD_AUTH_CODE", "message": "missing or unknown auth code",
                                     "correlationId": str(uuid.uuid4())}, status_code=400)
            cred, redirect_uri, _ = entry
            if str(form.get("redirect_uri") or "") != redirect_uri:
                return JSONResponse({"status": "BAD_REDIRECT_URI", "message": "redirect_uri does not match",
                                     "correlationId": str(uuid.uuid4())}, status_code=400)
            refresh = f"na1-{uuid.uuid4()}"
            st.refresh[refresh] = cred
        elif grant == "refresh_token":
            refresh = str(form.get("refresh_token") or "")
            found = st.refresh.get(refresh)
            if found is None or found.client_id != client_id:
                return JSONResponse({"status": "BAD_REFRESH_TOKEN", "message": "missing or unknown refresh token",
                                     "correlationId": str(uuid.uuid4())}, status_code=400)
            cred = found
        else:
            return JSONResponse({"status": "BAD_GRANT_TYPE", "message": "unsupported grant_type",
                                 "correlationId": str(uuid.uuid4())}, status_code=400)
        access, lifetime = issue_access(cred)
        return JSONResponse({"token_type": "bearer", "refresh_token": refresh, "access_token": access,
                             "expires_in": lifetime})

    async def token_info(request: Request) -> Response:
        st = store()
        if not st.v1_access_tokens:
            return JSONResponse({"status": "error", "message": "resource not found", "correlationId":
                                 str(uuid.uuid4()), "category": "OBJECT_NOT_FOUND"}, status_code=404)
        cred = st.tokens.get(request.path_params["token"])
        if cred is None or cred.kind != "oauth" or (cred.expires_at or 0) < st.now():
            return JSONResponse({"status": "error", "message": "The access token is expired or invalid",
                                 "category": "EXPIRED_AUTHENTICATION"}, status_code=404)
        portal = st.portals[cred.portal]
        app = st.apps.get(cred.client_id or "", {})
        return JSONResponse({"token": request.path_params["token"], "user": cred.user, "hub_domain":
                             f"{portal.key}.example", "scopes": list(cred.scopes), "hub_id": portal.portal_id,
                             "app_id": app.get("app_id"), "expires_in": int((cred.expires_at or 0) - st.now()),
                             "user_id": cred.user_id, "token_type": "access"})

    async def introspect(request: Request) -> Response:
        """POST /oauth/2026-03/token/introspect (HubSpot-public-api-spec-collection
        PublicApiSpecs/Auth/Oauth/Rollouts/279897/2026-03/oauth.json): form ``client_id``, ``client_secret``,
        ``token``, ``token_type_hint``; 200 with ``PublicAccessTokenInfoResponse`` (``active``, ``app_id``,
        ``client_id``, ``expires_in``, ``hub_id``, ``scopes``, ``token_type``, ``token_use``, ``user``,
        ``user_id``, …) for a live access token, ``{"active": false}`` otherwise (RFC 7662 §2.2). Errors carry
        the RFC 6749 ``error``/``error_description`` beside the old ``status``/``message`` (changelog "New OAuth
        v3 API Endpoints and Standardized Error Responses")."""
        st = store()
        if not st.introspect:
            return JSONResponse({"status": "error", "message": "resource not found", "correlationId":
                                 str(uuid.uuid4()), "category": "OBJECT_NOT_FOUND"}, status_code=404)
        form = await request.form()
        client_id = str(form.get("client_id") or "")
        app = st.apps.get(client_id)
        if app is None or not secrets.compare_digest(str(form.get("client_secret") or ""), app["secret"]):
            status = "BAD_CLIENT_ID" if app is None else "BAD_CLIENT_SECRET"
            text = "missing or unknown client id" if app is None else "missing or invalid client secret"
            return JSONResponse({"error": "invalid_client", "error_description": text, "status": status,
                                 "message": text, "correlationId": str(uuid.uuid4())}, status_code=400)
        token = str(form.get("token") or "")
        cred = st.tokens.get(token)
        if (cred is None or cred.kind != "oauth" or cred.client_id != client_id
                or (cred.expires_at or 0) < st.now() or cred.epoch < state.epoch(cred.portal)):
            return JSONResponse({"active": False})
        portal = st.portals[cred.portal]
        return JSONResponse({
            "active": True, "token": token, "token_type": "access", "token_use": "access_token",
            "client_id": client_id, "app_id": app.get("app_id"), "hub_id": portal.portal_id,
            "hub_domain": f"{portal.key}.example", "user": cred.user, "user_id": cred.user_id,
            "scopes": list(cred.scopes), "expires_in": int((cred.expires_at or 0) - st.now()),
            "is_private_distribution": False,
            "signed_access_token": {"appId": app.get("app_id"), "hubId": portal.portal_id,
                                    "userId": cred.user_id, "installingUserId": cred.user_id,
                                    "expiresAt": int((cred.expires_at or 0) * 1000), "scopes": "",
                                    "isUserLevel": False, "isServiceAccount": False,
                                    "isPrivateDistribution": False, "hublet": "na1", "signature": "",
                                    "newSignature": "", "scopeToScopeGroupPks": "", "trialScopes": "",
                                    "trialScopeToScopeGroupPks": ""},
        })

    # -- the API ----------------------------------------------------------------------------
    def authenticate(request: Request) -> tuple[Credential, Portal]:
        st = store()
        auth = request.headers.get("authorization", "")
        raw = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        cred = st.tokens.get(raw)
        if cred is None:
            raise HubSpotError(401, "INVALID_AUTHENTICATION",
                               "Authentication credentials not found. This API supports OAuth 2.0 authentication "
                               "and you can find more details at https://developers.hubspot.com/docs/methods/auth/"
                               "oauth-overview")
        if cred.kind == "oauth":
            now = st.now()
            if (cred.expires_at or 0) <= now or cred.epoch < state.epoch(cred.portal):
                ago = max(1, int(now - (cred.expires_at or now)))
                raise HubSpotError(401, "EXPIRED_AUTHENTICATION",
                                   f"The OAuth token used to make this call expired {ago} second(s) ago.")
        return cred, st.portals[cred.portal]

    def need(cred: Credential, scope: str) -> None:
        if scope not in cred.scopes:
            raise HubSpotError(403, "MISSING_SCOPES",
                               "This app hasn't been granted all required scopes to make this call. Read more "
                               "about required scopes here: https://developers.hubspot.com/scopes.",
                               errors=[{"message": "One or more of the following scopes are required.",
                                        "context": {"requiredGranularScopes": [scope]}}])

    def headers_for(cred: Credential, portal: Portal) -> dict[str, str]:
        window = portal.windows.get(cred.app) or deque()
        limit = portal.oauth_burst if cred.kind == "oauth" else portal.burst
        out = {"X-HubSpot-RateLimit-Max": str(limit),
               "X-HubSpot-RateLimit-Remaining": str(max(0, limit - len(window))),
               "X-HubSpot-RateLimit-Interval-Milliseconds": "10000"}
        if cred.kind != "oauth":
            out["X-HubSpot-RateLimit-Daily"] = str(portal.daily)
            out["X-HubSpot-RateLimit-Daily-Remaining"] = str(max(0, portal.daily - portal.daily_used))
        return out

    def count(cred: Credential, portal: Portal, *, search: bool) -> None:
        """Admit one request by the real counting rules, or raise the 429 HubSpot would send."""
        st = store()
        now = st.now()
        day = datetime.fromtimestamp(now, UTC).date().isoformat()
        if portal.daily_day != day:
            portal.daily_day, portal.daily_used = day, 0
        if state.faults(portal.key).quota_exhausted or portal.daily_used >= portal.daily:
            portal.throttled["DAILY"] = portal.throttled.get("DAILY", 0) + 1
            raise HubSpotError(429, "RATE_LIMITS", "You have reached your daily limit.", errorType="RATE_LIMIT",
                               policyName="DAILY")
        window = portal.windows.setdefault(cred.app, deque())
        while window and now - window[0] >= 10.0:
            window.popleft()
        limit = portal.oauth_burst if cred.kind == "oauth" else portal.burst
        if len(window) >= limit:
            portal.throttled["TEN_SECONDLY_ROLLING"] = portal.throttled.get("TEN_SECONDLY_ROLLING", 0) + 1
            raise HubSpotError(429, "RATE_LIMITS", "You have reached your ten_secondly_rolling limit.",
                               errorType="RATE_LIMIT", policyName="TEN_SECONDLY_ROLLING")
        if search:
            while portal.searches and now - portal.searches[0] >= 1.0:
                portal.searches.popleft()
            if len(portal.searches) >= portal.search_per_second:
                portal.throttled["SECONDLY"] = portal.throttled.get("SECONDLY", 0) + 1
                raise HubSpotError(429, "RATE_LIMITS", "You have reached your secondly limit.",
                                   errorType="RATE_LIMIT", policyName="SECONDLY")
            portal.searches.append(now)
        window.append(now)
        portal.daily_used += 1

    async def api(request: Request) -> Response:
        path = request.path_params["rest"].strip("/")
        method = request.method
        cred: Credential | None = None
        portal: Portal | None = None
        try:
            cred, portal = authenticate(request)
            search = path == "crm/v3/objects/deals/search"
            count(cred, portal, search=search)
            injected = await state.before_call(portal.key)
            if injected:
                raise HubSpotError(injected, "INTERNAL_ERROR", "internal error (injected by the sandbox)")
            body: Any = None
            raw = await request.body()
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise HubSpotError(400, "VALIDATION_ERROR", f"Invalid input JSON: {exc}") from exc
            status, payload = await handle(cred, portal, method, path, request.query_params, body)
        except HubSpotError as exc:
            extra = headers_for(cred, portal) if cred and portal else {}
            return exc.response(extra)
        assert cred is not None and portal is not None
        if status == 204:
            return Response(b"", status_code=204, headers=headers_for(cred, portal))
        return JSONResponse(payload, status_code=status, headers=headers_for(cred, portal))

    async def handle(cred: Credential, portal: Portal, method: str, path: str, query: Any,
                     body: Any) -> tuple[int, Any]:
        st = store()
        if path == "account-info/v3/details" and method == "GET":
            return 200, {"portalId": portal.portal_id, "accountType": "STANDARD", "timeZone": portal.time_zone,
                         "companyCurrency": "USD", "additionalCurrencies": [], "utcOffset": "+00:00",
                         "utcOffsetMilliseconds": 0, "uiDomain": "app.hubspot.com", "dataHostingLocation": "na1"}
        if path == "settings/v3/users" and method == "GET":
            need(cred, "settings.users.read")
            return 200, _paged(portal.users, query, LIST_MAX_LIMIT)
        if path == "crm/v3/owners" and method == "GET":
            need(cred, "crm.objects.owners.read")
            owners = [{"id": u["id"], "email": u["email"], "type": "PERSON", "firstName": u["firstName"],
                       "lastName": u["lastName"], "userId": int(u["id"]), "createdAt": "2025-01-06T09:00:00Z",
                       "updatedAt": "2025-01-06T09:00:00Z", "archived": False, "teams": []}
                      for u in portal.users]
            return 200, _paged(owners, query, OWNERS_MAX_LIMIT)
        if not path.startswith("crm/v3/objects/deals"):
            raise HubSpotError(404, "OBJECT_NOT_FOUND", f"Unable to find a resource at /{path}")
        sub = path[len("crm/v3/objects/deals"):].strip("/")
        write = method in {"POST", "PATCH"} and sub != "search" and sub != "batch/read"
        need(cred, "crm.objects.deals.write" if write else "crm.objects.deals.read")
        if sub == "search" and method == "POST":
            return 200, search(portal, body or {})
        if sub.startswith("batch/") and method == "POST":
            await state.batch_gate(portal.key)
            return batch(st, portal, sub[len("batch/"):], body or {})
        if sub == "" and method == "GET":
            records = sorted(portal.deals.values(), key=lambda d: int(d["id"]))
            props = query.get("properties")
            return 200, _paged([_public(r, props.split(",") if props else None) for r in records], query,
                               LIST_MAX_LIMIT)
        if sub == "" and method == "POST":
            clean, errors = _validate_props((body or {}).get("properties"), creating=True)
            if errors:
                raise HubSpotError(400, "VALIDATION_ERROR", _validation_error(errors)["message"])
            key = clean.get("crb_idempotency_key")
            if key and key in portal.by_key:
                raise HubSpotError(409, "CONFLICT",
                                   f"A deal with crb_idempotency_key={key} already exists. Existing ID: "
                                   f"{portal.by_key[key]}")
            return 201, _public(st.create(portal, clean))
        record = _lookup(portal, sub, query.get("idProperty"))
        if record is None:
            raise HubSpotError(404, "OBJECT_NOT_FOUND", "resource not found")
        if method == "GET":
            props = query.get("properties")
            return 200, _public(record, props.split(",") if props else None)
        if method == "PATCH":
            clean, errors = _validate_props((body or {}).get("properties"), creating=False)
            if errors:
                raise HubSpotError(400, "VALIDATION_ERROR", _validation_error(errors)["message"])
            return 200, _public(st.update(portal, record, clean))
        raise HubSpotError(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed here")

    def search(portal: Portal, body: dict[str, Any]) -> dict[str, Any]:
        limit = int(body.get("limit", 10))
        if limit > SEARCH_MAX_LIMIT or limit < 0:
            raise HubSpotError(400, "VALIDATION_ERROR",
                               f"Invalid input JSON on line 1: limit must be less than or equal to "
                               f"{SEARCH_MAX_LIMIT}, got {limit}.")
        after = int(str(body.get("after") or "0") or 0)
        if after >= SEARCH_MAX_RESULTS:
            raise HubSpotError(400, "VALIDATION_ERROR",
                               f"The search API returns at most {SEARCH_MAX_RESULTS} results per query; after="
                               f"{after} is past them. Narrow the query (for example on hs_lastmodifieddate).")
        groups = body.get("filterGroups") or []
        if len(groups) > 5 or sum(len(g.get("filters") or []) for g in groups) > 18:
            raise HubSpotError(400, "VALIDATION_ERROR", "Too many filters: at most 5 filterGroups and 18 filters.")
        sorts = body.get("sorts") or []
        if len(sorts) > 1:
            raise HubSpotError(400, "VALIDATION_ERROR", "Only one sort is supported.")
        rows = [r for r in portal.deals.values()
                if not groups or any(all(_match(r, f) for f in g.get("filters") or []) for g in groups)]
        if sorts:
            s = sorts[0] if isinstance(sorts[0], dict) else {"propertyName": str(sorts[0])}
            name = s.get("propertyName")
            desc = str(s.get("direction", "ASCENDING")).upper().startswith("DESC")
            if name in {"hs_lastmodifieddate", "createdate"}:
                rows.sort(key=lambda r: (int(r["_ms"]) if name == "hs_lastmodifieddate"
                                         else _ms_of(r["properties"]["createdate"]) or 0, int(r["id"])),
                          reverse=desc)
            else:
                rows.sort(key=lambda r: (str(r["properties"].get(str(name)) or ""), int(r["id"])), reverse=desc)
        else:
            rows.sort(key=lambda r: int(r["id"]))
        props = body.get("properties")
        page = rows[after: after + limit]
        out: dict[str, Any] = {"total": len(rows), "results": [_public(r, props) for r in page]}
        if after + limit < len(rows):
            out["paging"] = {"next": {"after": str(after + limit)}}
        return out

    def batch(st: HubSpotStore, portal: Portal, verb: str, body: dict[str, Any]) -> tuple[int, Any]:
        inputs = body.get("inputs")
        if not isinstance(inputs, list):
            raise HubSpotError(400, "VALIDATION_ERROR", "Invalid input JSON: inputs is required.")
        if len(inputs) > BATCH_MAX_INPUTS:
            raise HubSpotError(400, "VALIDATION_ERROR",
                               f"The maximum number of inputs supported in a batch request is {BATCH_MAX_INPUTS}. "
                               "Please reduce the number of items and try again",
                               context={"inputs": [str(len(inputs))]})
        started = datetime.fromtimestamp(st.now(), UTC).isoformat().replace("+00:00", "Z")
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        if verb == "read":
            id_prop = body.get("idProperty")
            for item in inputs:
                rec = _lookup(portal, str(item.get("id")), id_prop)
                if rec is not None:
                    results.append(_public(rec, body.get("properties")))
                else:
                    errors.append({"status": "error", "category": "OBJECT_NOT_FOUND",
                                   "message": "Could not get some DEAL objects, they may be deleted or not exist.",
                                   "context": {"ids": [str(item.get("id"))]}})
        elif verb == "create":
            # batch/create is all-or-nothing: one invalid input rejects the request.
            checked = []
            for item in inputs:
                clean, errs = _validate_props(item.get("properties"), creating=True)
                if errs:
                    raise HubSpotError(400, "VALIDATION_ERROR", _validation_error(errs)["message"])
                key = clean.get("crb_idempotency_key")
                if key and key in portal.by_key:
                    raise HubSpotError(409, "CONFLICT", f"A deal with crb_idempotency_key={key} already exists. "
                                       f"Existing ID: {portal.by_key[key]}")
                checked.append(clean)
            results = [_public(st.create(portal, c)) for c in checked]
        elif verb in {"update", "upsert"}:
            seen: set[str] = set()
            checked: list[tuple[str, Any, dict[str, str], Any]] = []
            for item in inputs:
                ident = str(item.get("id") or "")
                id_prop = item.get("idProperty") if verb == "upsert" else body.get("idProperty")
                if verb == "upsert" and id_prop not in UNIQUE_PROPERTIES:
                    raise HubSpotError(400, "VALIDATION_ERROR",
                                       f"idProperty {id_prop!r} is not a property with unique values; upsert needs "
                                       "one (for example crb_idempotency_key).")
                if ident in seen:
                    raise HubSpotError(400, "VALIDATION_ERROR", f"Duplicate IDs found in batch input: [{ident}]")
                seen.add(ident)
                clean, errs = _validate_props(item.get("properties"), creating=verb == "upsert")
                if errs:
                    # One invalid input fails the whole batch with 400, nothing is written, and the body names
                    # the property and value, not the input (Atlas-Authority/marketing-automation#174).
                    bad = _validation_error(errs)
                    raise HubSpotError(400, "VALIDATION_ERROR", bad["message"], errors=bad["errors"], context={})
                checked.append((ident, id_prop, clean, item.get("objectWriteTraceId")))
            for ident, id_prop, clean, trace in checked:
                rec = _lookup(portal, ident, id_prop)
                if rec is None and verb == "update":
                    errors.append({"status": "error", "category": "OBJECT_NOT_FOUND",
                                   "message": f"Could not find a deal with id {ident}", "context": {"ids": [ident]}})
                    continue
                if rec is None:
                    rec, new = st.create(portal, {**clean, str(id_prop): ident}), True
                else:
                    st.update(portal, rec, clean)
                    new = False
                # The default properties only: the spec (SimplePublicUpsertObject) does not promise to echo the
                # idProperty value, so it is not echoed; objectWriteTraceId is, when the input carried one.
                out = _public(rec)
                if verb == "upsert":
                    out["new"] = new
                if trace is not None:
                    out["objectWriteTraceId"] = str(trace)
                results.append(out)
            # No order is promised for batch results: reverse input order keeps clients honest.
            results.reverse()
        else:
            raise HubSpotError(404, "OBJECT_NOT_FOUND", f"Unable to find batch/{verb}")
        done = datetime.fromtimestamp(st.now(), UTC).isoformat().replace("+00:00", "Z")
        payload: dict[str, Any] = {"status": "COMPLETE", "results": results, "startedAt": started,
                                   "completedAt": done}
        if errors:
            payload.update(errors=errors, numErrors=len(errors))
            return 207, payload
        return (201 if verb == "create" else 200), payload

    async def not_found(request: Request) -> Response:
        return JSONResponse({"status": "error", "message": "resource not found",
                             "correlationId": str(uuid.uuid4()), "category": "OBJECT_NOT_FOUND"}, status_code=404)

    async def limits(request: Request) -> Response:
        portal = store().portals.get(request.path_params["portal"])
        if portal is None:
            return JSONResponse({"error": "unknown portal"}, status_code=404)
        body = await request.json() if await request.body() else {}
        for name in ("burst", "oauth_burst", "daily", "search_per_second", "token_lifetime_s"):
            if name in body:
                setattr(portal, name, int(body[name]))
        if body.get("clear"):
            portal.windows.clear()
            portal.searches.clear()
            portal.daily_used = 0
        return JSONResponse({"burst": portal.burst, "oauth_burst": portal.oauth_burst, "daily": portal.daily,
                             "search_per_second": portal.search_per_second})

    async def oauth_switches(request: Request) -> Response:
        body = await request.json() if await request.body() else {}
        st = store()
        if "v1_access_tokens" in body:
            st.v1_access_tokens = bool(body["v1_access_tokens"])
        if "introspect" in body:
            st.introspect = bool(body["introspect"])
        return JSONResponse({"v1_access_tokens": st.v1_access_tokens, "introspect": st.introspect})

    async def advance(request: Request) -> Response:
        body = await request.json() if await request.body() else {}
        store().offset += float(body.get("seconds", 0))
        return JSONResponse({"offset": store().offset})

    return [
        Route("/hubspot/", not_found),
        Route("/hubspot/oauth/authorize", authorize, methods=["GET", "POST"]),
        Route("/hubspot/oauth/v1/token", oauth_token, methods=["POST"]),
        Route("/hubspot/oauth/v1/access-tokens/{token}", token_info),
        Route("/hubspot/oauth/2026-03/token/introspect", introspect, methods=["POST"]),
        Route("/hubspot/oauth/v3/token/introspect", introspect, methods=["POST"]),
        Route("/hubspot/{rest:path}", api, methods=["GET", "POST", "PATCH"]),
        Route("/_sandbox/hubspot/{portal}/limits", limits, methods=["POST"]),
        Route("/_sandbox/hubspot/advance", advance, methods=["POST"]),
        Route("/_sandbox/hubspot/oauth", oauth_switches, methods=["POST"]),
    ]


def _lookup(portal: Portal, ident: str, id_property: str | None) -> dict[str, Any] | None:
    if id_property and id_property != "hs_object_id":
        did = portal.by_key.get(ident) if id_property in UNIQUE_PROPERTIES else None
        return portal.deals.get(did) if did else None
    return portal.deals.get(ident)


def _paged(items: list[dict[str, Any]], query: Any, max_limit: int) -> dict[str, Any]:
    try:
        limit = int(query.get("limit", 10))
        after = int(query.get("after", 0) or 0)
    except ValueError as exc:
        raise HubSpotError(400, "VALIDATION_ERROR", "limit and after must be numbers") from exc
    if limit > max_limit:
        raise HubSpotError(400, "VALIDATION_ERROR", f"limit must be less than or equal to {max_limit}")
    page = items[after: after + limit]
    out: dict[str, Any] = {"results": page}
    if after + limit < len(items):
        out["paging"] = {"next": {"after": str(after + limit), "link": f"?after={after + limit}"}}
    return out
