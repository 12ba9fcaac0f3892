"""Salesforce, played over real HTTP: Partner SOAP, OAuth 2.0 and REST ``/limits``.

Scenario section ``salesforce``::

    api_version: "58.0"
    orgs:
      <org key>:
        name, edition (enterprise | professional | unlimited | performance | developer | essentials)
        org_id: 18 chars (generated from the key when absent)
        api_enabled: true            # false: every API call answers API_DISABLED_FOR_ORG
        org_type: production         # production | developer | sandbox (the JWT audience it accepts)
        daily_api_limit: n           # default: 100,000 + Salesforce licenses × edition adder
        api_used: n                  # the 24 h counter at start
        session_seconds_valid: 7200
        licenses: [{name, total, used}]          # UserLicense rows
        users: [{username, name, email?, password, security_token, license?, api_enabled?,
                 require_token? (default true: untrusted IP), id?}]
        apps: [{client_id, client_secret, name?, redirect_uris, client_credentials_user?,
                jwt_users?, certificate? (PEM), rotate_refresh_tokens?}]
        opportunity_fields: [CrmBridge_Key__c, CrmBridge_Actor__c]   # custom fields on Opportunity
        external_id_fields: [CrmBridge_Key__c]
        opportunities: {generate: n} | [ {Name, StageName, Amount, CloseDate, ...} ]

Endpoints, each both at the root (playing login.salesforce.com: the org comes from the username, the
client id or the session) and under ``/salesforce/{org key}`` (playing the org's My Domain: only that
org's users, apps and sessions; ``instance_url``/``serverUrl`` answers keep the prefix). The demo's
CRM accounts use ``https://127.0.0.1:8502/salesforce/<org key>`` as their instance URL:

    POST /services/Soap/u/{version}[/{org}]      Partner SOAP: login, getUserInfo, query, queryMore,
                                                 create, update, upsert, logout
    GET  /services/oauth2/authorize               consent page (log in + Allow / Deny)
    POST /services/oauth2/authorize
    POST /services/oauth2/token                   client_credentials, JWT bearer, authorization_code
                                                 (PKCE S256), refresh_token
    GET  /services/data/                          versions
    GET  /services/data/v{version}/limits         DailyApiRequests (+ Sforce-Limit-Info header)

Behaviour that matches the real service: faults shaped like ../shared/samples/salesforce
(``sf:CODE`` faultcode, ``LoginFault``/``UnexpectedErrorFault`` detail, HTTP 500), ``LimitInfoHeader``
on every call but login, a per-org 24 h counter ending in ``REQUEST_LIMIT_EXCEEDED``, more than 200
records in a write → ``EXCEEDED_ID_LIMIT``, ``QueryOptions.batchSize`` outside 200–2,000 →
``INVALID_BATCH_SIZE`` (stricter than the docs, which say the size is a hint), the Partner API's
doubled ``sf:Id`` in query records, validation rule "Amount cannot be negative".

Admin (tests): ``POST /_sandbox/salesforce/{org}/api-usage {"used": n}``,
``POST /_sandbox/salesforce/{org}/apps/{client_id}/certificate`` (PEM body),
``POST /_sandbox/salesforce/{org}/org-type`` ({"org_type": "sandbox"}: play a sandbox org),
``POST /_sandbox/salesforce/{org}/apps/{client_id}/callback-urls`` ({"add": uri}: the org admin adds a
callback URL to the app, as in Setup → App Manager — e.g. a console on another port than the scenario's),
``POST /_sandbox/salesforce/{org}/revoke-refresh-tokens``,
``POST /_sandbox/salesforce/{org}/users/{username}`` ({password, security_token, api_enabled, locked}),
``GET /_sandbox/salesforce/{org}/opportunities``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import random
import re
import secrets
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlencode

from lxml import etree
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from sandbox.state import SandboxState, corrupt_response

SOAPENV = "http://schemas.xmlsoap.org/soap/envelope/"
TNS = "urn:partner.soap.sforce.com"
ENS = "urn:sobject.partner.soap.sforce.com"
FNS = "urn:fault.partner.soap.sforce.com"
XSI = "http://www.w3.org/2001/XMLSchema-instance"

MAX_WRITE = 200
MIN_BATCH, MAX_BATCH, DEFAULT_BATCH = 200, 2000, 500
LOCKOUT_AFTER = 5
CODE_TTL = 15 * 60
EDITION_TYPES = {
    "essentials": "Essentials Edition",
    "professional": "Professional Edition",
    "enterprise": "Enterprise Edition",
    "unlimited": "Unlimited Edition",
    "performance": "Performance Edition",
    "developer": "Developer Edition",
}
PER_LICENSE = {"professional": 1000, "enterprise": 1000, "unlimited": 5000, "performance": 5000}
STAGES = ["Prospecting", "Qualification", "Needs Analysis", "Value Proposition", "Proposal/Price Quote",
          "Negotiation/Review", "Closed Won", "Closed Lost"]
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, remove_blank_text=True)


# -- store ---------------------------------------------------------------------------------------
def _sf_id(prefix: str, *parts: object) -> str:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    body = "".join(alphabet[b % 62] for b in digest[:12])
    return (prefix + body)[:15] + "AAA"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(ts: dt.datetime) -> str:
    return ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class SfUser:
    id: str
    username: str
    name: str
    email: str
    password: str
    security_token: str
    license: str = "Salesforce"
    api_enabled: bool = True
    require_token: bool = True
    active: bool = True
    failed_logins: int = 0
    locked: bool = False


@dataclass
class SfApp:
    client_id: str
    client_secret: str
    name: str
    redirect_uris: list[str]
    client_credentials_user: str | None = None
    jwt_users: list[str] = field(default_factory=list)
    certificate: str | None = None
    rotate_refresh_tokens: bool = False


@dataclass
class SfOrg:
    key: str
    org_id: str
    name: str
    edition: str
    api_enabled: bool
    daily_limit: int
    api_used: int
    session_seconds: int
    licenses: list[dict[str, Any]]
    users: dict[str, SfUser]
    apps: dict[str, SfApp]
    opp_fields: list[str]
    external_id_fields: list[str]
    opportunities: dict[str, dict[str, Any]] = field(default_factory=dict)
    counter: int = 0
    org_type: str = "production"  # production | developer | sandbox

    def user_by_name(self, username: str) -> SfUser | None:
        low = username.lower()
        return next((u for u in self.users.values() if u.username.lower() == low), None)


@dataclass
class SfSession:
    org_key: str
    user_id: str
    epoch: int
    last_used: float
    seconds_valid: int
    client_id: str | None = None


@dataclass
class Cursor:
    org_key: str
    obj: str
    fields: list[str]
    rows: list[dict[str, Any]]
    offset: int
    batch: int


class SalesforceStore:
    def __init__(self, state: SandboxState) -> None:
        self.state = state
        section = state.section("salesforce")
        self.api_version = str(section.get("api_version", "58.0"))
        self.orgs: dict[str, SfOrg] = {}
        self.sessions: dict[str, SfSession] = {}
        self.codes: dict[str, dict[str, Any]] = {}
        self.refresh_tokens: dict[str, dict[str, Any]] = {}
        self.cursors: dict[str, Cursor] = {}
        for key, spec in (section.get("orgs") or {}).items():
            self.orgs[key] = self._build_org(str(key), spec or {})

    def _build_org(self, key: str, spec: dict[str, Any]) -> SfOrg:
        edition = str(spec.get("edition", "enterprise"))
        org_id = str(spec.get("org_id") or _sf_id("00D", key))
        if not re.fullmatch(r"[A-Za-z0-9]{18}", org_id):
            raise ValueError(f"salesforce org {key}: org_id must be 18 letters/digits")
        licenses = [
            {"Id": _sf_id("100", key, lic["name"]), "Name": lic["name"], "MasterLabel": lic["name"],
             "Status": "Active", "TotalLicenses": int(lic["total"]), "UsedLicenses": int(lic["used"]),
             "LicenseDefinitionKey": "SFDC" if lic["name"] == "Salesforce" else
             lic["name"].upper().replace(" ", "_")}
            for lic in spec.get("licenses", [])
        ]
        full = sum(lic["TotalLicenses"] for lic in licenses if lic["Name"] == "Salesforce")
        if edition == "developer":
            default_limit = 15000
        elif edition == "essentials":
            default_limit = 0
        else:
            default_limit = 100_000 + full * PER_LICENSE.get(edition, 1000)
        users: dict[str, SfUser] = {}
        for u in spec.get("users", []):
            uid = str(u.get("id") or _sf_id("005", key, u["username"]))
            users[uid] = SfUser(
                id=uid, username=u["username"], name=u.get("name", u["username"]),
                email=u.get("email", u["username"]), password=str(u["password"]),
                security_token=str(u.get("security_token", "")), license=u.get("license", "Salesforce"),
                api_enabled=bool(u.get("api_enabled", True)), require_token=bool(u.get("require_token", True)),
                active=bool(u.get("active", True)),
            )
        apps = {
            a["client_id"]: SfApp(
                client_id=a["client_id"], client_secret=str(a["client_secret"]),
                name=a.get("name", a["client_id"]), redirect_uris=list(a.get("redirect_uris", [])),
                client_credentials_user=a.get("client_credentials_user"),
                jwt_users=list(a.get("jwt_users", [])), certificate=a.get("certificate"),
                rotate_refresh_tokens=bool(a.get("rotate_refresh_tokens", False)),
            )
            for a in spec.get("apps", [])
        }
        opp_fields = list(spec.get("opportunity_fields", ["CrmBridge_Key__c", "CrmBridge_Actor__c"]))
        org = SfOrg(
            key=key, org_id=org_id, name=str(spec.get("name", key)), edition=edition,
            api_enabled=bool(spec.get("api_enabled", edition != "essentials")),
            daily_limit=int(spec.get("daily_api_limit", default_limit)),
            api_used=int(spec.get("api_used", 0)),
            session_seconds=int(spec.get("session_seconds_valid", 7200)),
            licenses=licenses, users=users, apps=apps, opp_fields=opp_fields,
            external_id_fields=list(spec.get("external_id_fields", opp_fields[:1])),
            org_type=str(spec.get("org_type", "production")),
        )
        self._seed_opportunities(org, spec.get("opportunities", {}))
        return org

    def _seed_opportunities(self, org: SfOrg, spec: Any) -> None:
        owners = [u.id for u in org.users.values() if u.license == "Salesforce"] or list(org.users) or [
            _sf_id("005", org.key, "owner")]
        rng = random.Random(f"{self.state.seed}:{org.key}:opps")
        now = _now().replace(microsecond=0)
        rows: list[dict[str, Any]] = []
        if isinstance(spec, dict):
            for i in range(int(spec.get("generate", 0))):
                rows.append({
                    "Name": f"{org.name} deal {i + 1:04d}",
                    "StageName": rng.choice(STAGES),
                    "Amount": Decimal(rng.randrange(1_000, 500_000, 250)),
                    "CloseDate": (now + dt.timedelta(days=rng.randrange(-60, 180))).date(),
                    "OwnerId": rng.choice(owners),
                    "_modified": now - dt.timedelta(minutes=rng.randrange(10, 60 * 24 * 60)),
                })
        elif isinstance(spec, list):
            for r in spec:
                rows.append({**r, "_modified": now - dt.timedelta(days=1)})
        rows.sort(key=lambda r: r["_modified"])
        for i, r in enumerate(rows):
            modified = r.pop("_modified")
            oid = _sf_id("006", org.key, i)
            rec = {"Id": oid, "CreatedDate": modified, "LastModifiedDate": modified,
                   "SystemModstamp": modified}
            for f in org.opp_fields:
                rec[f] = None
            rec.update(r)
            org.opportunities[oid] = rec
        org.counter = len(rows)

    # -- lookups ----------------------------------------------------------------------------
    def _scope(self, domain: str | None) -> list[SfOrg]:
        if domain is None:
            return list(self.orgs.values())
        return [self.orgs[domain]] if domain in self.orgs else []

    def find_user(self, username: str, domain: str | None = None) -> tuple[SfOrg, SfUser] | None:
        for org in self._scope(domain):
            u = org.user_by_name(username)
            if u is not None:
                return org, u
        return None

    def find_app(self, client_id: str, domain: str | None = None) -> tuple[SfOrg, SfApp] | None:
        for org in self._scope(domain):
            if client_id in org.apps:
                return org, org.apps[client_id]
        return None

    def new_session(self, org: SfOrg, user: SfUser, client_id: str | None = None) -> str:
        token = f"{org.org_id[:15]}!{secrets.token_urlsafe(48)}"
        self.sessions[token] = SfSession(
            org_key=org.key, user_id=user.id, epoch=self.state.epoch(org.key), last_used=time.monotonic(),
            seconds_valid=org.session_seconds, client_id=client_id,
        )
        return token

    def session(self, token: str | None) -> SfSession | None:
        if not token:
            return None
        s = self.sessions.get(token)
        if s is None:
            return None
        if s.epoch != self.state.epoch(s.org_key) or time.monotonic() - s.last_used > s.seconds_valid:
            self.sessions.pop(token, None)
            return None
        s.last_used = time.monotonic()
        return s

    def inspect(self, key: str) -> dict[str, Any] | None:
        org = self.orgs.get(key)
        if org is None:
            return None
        return {
            "org_id": org.org_id, "edition": org.edition, "api_enabled": org.api_enabled,
            "api_used": org.api_used, "api_limit": org.daily_limit,
            "opportunities": len(org.opportunities),
            "sessions": sum(1 for s in self.sessions.values() if s.org_key == key),
            "refresh_tokens": sum(1 for r in self.refresh_tokens.values() if r["org"] == key),
        }


# -- SOAP rendering ------------------------------------------------------------------------------
def _esc(v: object) -> str:
    return html.escape(str(v), quote=False)


def _envelope(body: str, *, header: str = "", extra_ns: str = "") -> str:
    head = f"<soapenv:Header>{header}</soapenv:Header>" if header else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAPENV}" xmlns="{TNS}" xmlns:xsi="{XSI}"{extra_ns}>'
        f"{head}<soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"
    )


def _limit_header(org: SfOrg) -> str:
    return (f"<LimitInfoHeader><limitInfo><current>{org.api_used}</current><limit>{org.daily_limit}"
            "</limit><type>API REQUESTS</type></limitInfo></LimitInfoHeader>")


def _soap(body: str, org: SfOrg | None = None, *, sobject_ns: bool = False) -> Response:
    extra = f' xmlns:sf="{ENS}"' if sobject_ns else ""
    xml = _envelope(body, header=_limit_header(org) if org else "", extra_ns=extra)
    return Response(xml, media_type="text/xml; charset=utf-8")


FAULT_TYPES = {
    "INVALID_LOGIN": "LoginFault", "LOGIN_MUST_USE_SECURITY_TOKEN": "LoginFault",
    "PASSWORD_LOCKOUT": "LoginFault", "INVALID_OPERATION_WITH_EXPIRED_PASSWORD": "LoginFault",
    "MALFORMED_QUERY": "MalformedQueryFault", "INVALID_FIELD": "InvalidFieldFault",
    "INVALID_TYPE": "InvalidSObjectFault", "INVALID_QUERY_LOCATOR": "InvalidQueryLocatorFault",
}


class SoapFault(Exception):
    def __init__(self, code: str, message: str, *, fault_type: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fault_type = fault_type or FAULT_TYPES.get(code, "UnexpectedErrorFault")

    def response(self) -> Response:
        query = ""
        if self.fault_type in {"MalformedQueryFault", "InvalidFieldFault", "InvalidSObjectFault"}:
            query = "<sf:row>-1</sf:row><sf:column>-1</sf:column>"
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<soapenv:Envelope xmlns:soapenv="{SOAPENV}" xmlns:sf="{FNS}" xmlns:xsi="{XSI}">'
            "<soapenv:Body><soapenv:Fault>"
            f"<faultcode>sf:{self.code}</faultcode>"
            f"<faultstring>{_esc(self.code)}: {_esc(self.message)}</faultstring>"
            f'<detail><sf:{self.fault_type} xsi:type="sf:{self.fault_type}">'
            f"<sf:exceptionCode>{self.code}</sf:exceptionCode>"
            f"<sf:exceptionMessage>{_esc(self.message)}</sf:exceptionMessage>{query}"
            f"</sf:{self.fault_type}></detail>"
            "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
        )
        return Response(xml, status_code=500, media_type="text/xml; charset=utf-8")


def _user_info(org: SfOrg, user: SfUser) -> str:
    return (
        "<accessibilityMode>false</accessibilityMode><chatterExternal>false</chatterExternal>"
        "<currencySymbol>$</currencySymbol><orgAttachmentFileSizeLimit>5242880</orgAttachmentFileSizeLimit>"
        "<orgDefaultCurrencyIsoCode>USD</orgDefaultCurrencyIsoCode>"
        "<orgDefaultCurrencyLocale>en_US</orgDefaultCurrencyLocale>"
        "<orgDisallowHtmlAttachments>false</orgDisallowHtmlAttachments>"
        "<orgHasPersonAccounts>false</orgHasPersonAccounts>"
        f"<organizationId>{org.org_id}</organizationId>"
        "<organizationMultiCurrency>false</organizationMultiCurrency>"
        f"<organizationName>{_esc(org.name)}</organizationName>"
        f"<profileId>{_sf_id('00e', org.key, user.license)}</profileId>"
        '<roleId xsi:nil="true"/>'
        f"<sessionSecondsValid>{org.session_seconds}</sessionSecondsValid>"
        '<userDefaultCurrencyIsoCode xsi:nil="true"/>'
        f"<userEmail>{_esc(user.email)}</userEmail><userFullName>{_esc(user.name)}</userFullName>"
        f"<userId>{user.id}</userId><userLanguage>en_US</userLanguage><userLocale>en_US</userLocale>"
        f"<userName>{_esc(user.username)}</userName><userTimeZone>Europe/London</userTimeZone>"
        "<userType>Standard</userType><userUiSkin>Theme3</userUiSkin>"
    )


def _format_value(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dt.datetime):
        return _iso(v)
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, Decimal):
        return f"{v:.1f}" if v == v.to_integral_value() else str(v)
    return str(v)


def _record_xml(obj: str, fields: list[str], row: dict[str, Any]) -> str:
    parts = [f"<sf:type>{obj}</sf:type>"]
    rid = row.get("Id")
    parts.append(f"<sf:Id>{rid}</sf:Id>" if rid and "Id" in fields else '<sf:Id xsi:nil="true"/>')
    for f in fields:  # the Partner API repeats Id among the selected fields
        text = _format_value(row.get(f))
        parts.append(f'<sf:{f} xsi:nil="true"/>' if text is None else f"<sf:{f}>{_esc(text)}</sf:{f}>")
    return '<records xsi:type="sf:sObject">' + "".join(parts) + "</records>"


# -- SOQL (the subset CRM Bridge and simple tools use) -----------------------------------------------
OBJECT_FIELDS = {
    "Opportunity": ["Id", "Name", "StageName", "Amount", "CloseDate", "OwnerId", "CreatedDate",
                    "LastModifiedDate", "SystemModstamp"],
    "User": ["Id", "Username", "Name", "Email", "IsActive", "UserType", "ProfileId"],
    "UserLicense": ["Id", "Name", "MasterLabel", "Status", "TotalLicenses", "UsedLicenses",
                    "LicenseDefinitionKey"],
    "Organization": ["Id", "Name", "OrganizationType", "IsSandbox", "InstanceName"],
}
_SOQL = re.compile(
    r"^\s*SELECT\s+(?P<fields>.+?)\s+FROM\s+(?P<obj>\w+)"
    r"(?:\s+WHERE\s+(?P<where>.+?))?(?:\s+ORDER\s+BY\s+(?P<order>\w+)(?:\s+(?P<dir>ASC|DESC))?)?"
    r"(?:\s+LIMIT\s+(?P<limit>\d+))?\s*$",
    re.I | re.S,
)
_COND = re.compile(r"^\s*(\w+)\s*(=|!=|<=|>=|<|>)\s*('(?:[^'\\]|\\.)*'|[\w:.+-]+)\s*$", re.S)


def _object_rows(store: SalesforceStore, org: SfOrg, obj: str) -> tuple[list[str], list[dict[str, Any]]]:
    if obj == "Opportunity":
        return OBJECT_FIELDS[obj] + org.opp_fields, list(org.opportunities.values())
    if obj == "User":
        rows = [{"Id": u.id, "Username": u.username, "Name": u.name, "Email": u.email, "IsActive": u.active,
                 "UserType": "Standard", "ProfileId": _sf_id("00e", org.key, u.license)}
                for u in org.users.values()]
        return OBJECT_FIELDS[obj], rows
    if obj == "UserLicense":
        return OBJECT_FIELDS[obj], list(org.licenses)
    if obj == "Organization":
        return OBJECT_FIELDS[obj], [{"Id": org.org_id, "Name": org.name,
                                     "OrganizationType": EDITION_TYPES.get(org.edition, org.edition),
                                     "IsSandbox": False, "InstanceName": "SBX1"}]
    raise SoapFault("INVALID_TYPE", f"sObject type '{obj}' is not supported.")


def _literal(text: str) -> Any:
    if text.startswith("'"):
        return text[1:-1].replace("\\'", "'")
    low = text.lower()
    if low in {"true", "false"}:
        return low == "true"
    if low == "null":
        return None
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})", text):
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return dt.date.fromisoformat(text)
    try:
        return Decimal(text)
    except InvalidOperation:
        raise SoapFault("MALFORMED_QUERY", f"unexpected token: '{text}'") from None


def _compare(a: Any, op: str, b: Any) -> bool:
    if op == "=":
        return bool(a == b)
    if op == "!=":
        return bool(a != b)
    if a is None or b is None:
        return False
    if isinstance(a, dt.datetime) and isinstance(b, dt.date) and not isinstance(b, dt.datetime):
        a = a.date()
    if isinstance(a, int | float) and isinstance(b, Decimal):
        a = Decimal(a)
    try:
        return bool({"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op])
    except TypeError:
        return False


def run_soql(store: SalesforceStore, org: SfOrg, soql: str) -> tuple[str, list[str], list[dict[str, Any]]]:
    m = _SOQL.match(soql)
    if not m:
        raise SoapFault("MALFORMED_QUERY", f"unexpected token: '{soql[:40]}'")
    obj = m["obj"]
    canon = {o.lower(): o for o in OBJECT_FIELDS}
    obj = canon.get(obj.lower(), obj)
    known, rows = _object_rows(store, org, obj)
    by_lower = {f.lower(): f for f in known}

    def field_name(name: str) -> str:
        f = by_lower.get(name.strip().lower())
        if f is None:
            raise SoapFault("INVALID_FIELD", f"No such column '{name.strip()}' on entity '{obj}'. If you "
                            "are attempting to use a custom field, be sure to append the '__c' after the "
                            "custom field name.")
        return f

    fields = [field_name(f) for f in m["fields"].split(",")]
    if m["where"]:
        for cond in re.split(r"\s+AND\s+", m["where"], flags=re.I):
            c = _COND.match(cond)
            if not c:
                raise SoapFault("MALFORMED_QUERY", f"unexpected token: '{cond.strip()[:40]}'")
            fname, op, lit = field_name(c[1]), c[2], _literal(c[3])
            rows = [r for r in rows if _compare(r.get(fname), op, lit)]
    if m["order"]:
        key = field_name(m["order"])
        rows = sorted(rows, key=lambda r: (r.get(key) is None, r.get(key) or ""),
                      reverse=(m["dir"] or "").upper() == "DESC")
    if m["limit"]:
        rows = rows[: int(m["limit"])]
    return obj, fields, rows


# -- SOAP handler ------------------------------------------------------------------------------------
def _text(el: etree._Element | None) -> str | None:
    return el.text if el is not None else None


class SoapHandler:
    def __init__(self, store: SalesforceStore, state: SandboxState) -> None:
        self.store = store
        self.state = state

    async def __call__(self, request: Request) -> Response:
        raw = await request.body()
        try:
            doc = etree.fromstring(raw, _PARSER)
        except etree.XMLSyntaxError:
            return SoapFault("UNKNOWN_EXCEPTION", "Could not parse the SOAP request").response()
        body = doc.find(f"{{{SOAPENV}}}Body")
        if body is None or len(body) == 0:
            return SoapFault("UNKNOWN_EXCEPTION", "No SOAP body").response()
        op_el = body[0]
        op = etree.QName(op_el).localname
        header = doc.find(f"{{{SOAPENV}}}Header")
        response = await self._dispatch(request, op, op_el, header)
        sess = self.store.sessions.get(self._sid(header) or "")
        if sess is not None and self.state.faults(sess.org_key).corrupt:
            payload, media = corrupt_response(self.state, sess.org_key, bytes(response.body), "text/xml")
            return Response(payload, status_code=200, media_type=media)
        return response

    @staticmethod
    def _sid(header: etree._Element | None) -> str | None:
        return _text(header.find(f"{{{TNS}}}SessionHeader/{{{TNS}}}sessionId")) if header is not None else None

    async def _dispatch(self, request: Request, op: str, op_el: etree._Element,
                        header: etree._Element | None) -> Response:
        base = _base(request)
        domain = _domain(request)
        try:
            if op == "login":
                return await self.login(op_el, base, request.path_params.get("version", "58.0"), domain)
            sid = self._sid(header)
            sess = self.store.session(sid)
            if sess is None or (domain is not None and sess.org_key != domain):
                raise SoapFault("INVALID_SESSION_ID", "Invalid Session ID found in SessionHeader: Illegal Session")
            org = self.store.orgs[sess.org_key]
            user = org.users[sess.user_id]
            status = await self.state.before_call(org.key)
            if status is not None:
                return _unavailable(status)
            self._check_api(org, user)
            if op == "logout":
                self.store.sessions.pop(sid or "", None)
                return _soap("<logoutResponse/>", org)
            if op == "getUserInfo":
                info = _user_info(org, user)
                return _soap(f"<getUserInfoResponse><result>{info}</result></getUserInfoResponse>", org)
            if op in {"query", "queryMore"}:
                return self.query(op, op_el, header, org)
            if op in {"create", "update", "upsert"}:
                await self.state.batch_gate(org.key)
                return self.write(op, op_el, header, org, user)
            raise SoapFault("UNKNOWN_EXCEPTION", f"The sandbox does not implement {op}()")
        except SoapFault as fault:
            return fault.response()

    def _check_api(self, org: SfOrg, user: SfUser) -> None:
        if not org.api_enabled:
            raise SoapFault("API_DISABLED_FOR_ORG", "API is not enabled for this Organization or Partner")
        if not user.api_enabled:
            raise SoapFault("API_CURRENTLY_DISABLED", "API is disabled for this User")
        if self.state.faults(org.key).quota_exhausted or org.api_used >= org.daily_limit:
            raise SoapFault("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        org.api_used += 1

    async def login(self, op_el: etree._Element, base: str, version: str, domain: str | None) -> Response:
        username = _text(op_el.find(f"{{{TNS}}}username")) or ""
        password = _text(op_el.find(f"{{{TNS}}}password")) or ""
        found = self.store.find_user(username, domain)
        if found is None:
            raise SoapFault("INVALID_LOGIN", "Invalid username, password, security token; or user locked out.")
        org, user = found
        status = await self.state.before_call(org.key)
        if status is not None:
            return _unavailable(status)
        if user.locked:
            raise SoapFault("PASSWORD_LOCKOUT", "Your account has been locked out because of too many failed "
                            "login attempts: contact your administrator.")
        if password == user.password + user.security_token:
            pass
        elif password == user.password and not user.require_token:
            pass
        elif password == user.password:
            raise SoapFault("LOGIN_MUST_USE_SECURITY_TOKEN", "Invalid username, password, security token; "
                            "or user locked out. Are you at a new location? When accessing Salesforce--either "
                            "via a desktop client or the API--from outside of your company's trusted networks, "
                            "you must add a security token to your password to log in.")
        else:
            user.failed_logins += 1
            if user.failed_logins >= LOCKOUT_AFTER:
                user.locked = True
            raise SoapFault("INVALID_LOGIN", "Invalid username, password, security token; or user locked out.")
        user.failed_logins = 0
        if not org.api_enabled:
            raise SoapFault("API_DISABLED_FOR_ORG", "API is not enabled for this Organization or Partner")
        if not user.api_enabled:
            raise SoapFault("API_CURRENTLY_DISABLED", "API is disabled for this User")
        sid = self.store.new_session(org, user)
        result = (
            f"<metadataServerUrl>{base}/services/Soap/m/{version}/{org.org_id[:15]}</metadataServerUrl>"
            "<passwordExpired>false</passwordExpired><sandbox>false</sandbox>"
            f"<serverUrl>{base}/services/Soap/u/{version}/{org.org_id[:15]}</serverUrl>"
            f"<sessionId>{sid}</sessionId><userId>{user.id}</userId>"
            f"<userInfo>{_user_info(org, user)}</userInfo>"
        )
        return _soap(f"<loginResponse><result>{result}</result></loginResponse>")

    def query(self, op: str, op_el: etree._Element, header: etree._Element | None, org: SfOrg) -> Response:
        batch = DEFAULT_BATCH
        size_el = header.find(f"{{{TNS}}}QueryOptions/{{{TNS}}}batchSize") if header is not None else None
        if size_el is not None and size_el.text:
            batch = int(size_el.text)
            if not MIN_BATCH <= batch <= MAX_BATCH:
                raise SoapFault("INVALID_BATCH_SIZE", f"invalid batch size: {batch}; QueryOptions.batchSize "
                                f"must be between {MIN_BATCH} and {MAX_BATCH}")
        if op == "query":
            soql = _text(op_el.find(f"{{{TNS}}}queryString")) or ""
            obj, fields, rows = run_soql(self.store, org, soql)
            cursor = Cursor(org.key, obj, fields, rows, 0, batch)
            locator = f"01g{secrets.token_hex(6).upper()}"
        else:
            raw = _text(op_el.find(f"{{{TNS}}}queryLocator")) or ""
            locator, _, offset = raw.partition("-")
            found = self.store.cursors.get(locator)
            if found is None or found.org_key != org.key or str(found.offset) != offset:
                raise SoapFault("INVALID_QUERY_LOCATOR", "invalid query locator")
            cursor = found
            cursor.batch = batch
        page = cursor.rows[cursor.offset : cursor.offset + cursor.batch]
        cursor.offset += len(page)
        done = cursor.offset >= len(cursor.rows)
        if done:
            self.store.cursors.pop(locator, None)
            loc_xml = '<queryLocator xsi:nil="true"/>'
        else:
            self.store.cursors[locator] = cursor
            loc_xml = f"<queryLocator>{locator}-{cursor.offset}</queryLocator>"
        records = "".join(_record_xml(cursor.obj, cursor.fields, r) for r in page)
        result = (f'<result xsi:type="QueryResult"><done>{"true" if done else "false"}</done>{loc_xml}'
                  f"{records}<size>{len(cursor.rows)}</size></result>")
        return _soap(f"<{op}Response>{result}</{op}Response>", org, sobject_ns=True)

    def write(self, op: str, op_el: etree._Element, header: etree._Element | None, org: SfOrg,
              user: SfUser) -> Response:
        objs = op_el.findall(f"{{{TNS}}}sObjects")
        if len(objs) > MAX_WRITE:
            raise SoapFault("EXCEEDED_ID_LIMIT", f"record limit reached. cannot submit more than {MAX_WRITE} "
                            "records into this call")
        all_or_none = False
        if header is not None:
            aon = _text(header.find(f"{{{TNS}}}AllOrNoneHeader/{{{TNS}}}allOrNone"))
            all_or_none = aon == "true"
        ext_field = None
        if op == "upsert":
            ext_name = _text(op_el.find(f"{{{TNS}}}externalIDFieldName")) or ""
            ext_field = next((f for f in org.external_id_fields if f.lower() == ext_name.lower()), None)
            if ext_field is None:
                raise SoapFault("INVALID_FIELD", f"Field name provided, {ext_name} is not an External ID or "
                                "indexed field for Opportunity")
        allowed = {f.lower(): f for f in OBJECT_FIELDS["Opportunity"] + org.opp_fields}
        read_only = {"Id", "CreatedDate", "LastModifiedDate", "SystemModstamp"}
        parsed: list[tuple[str, str | None, dict[str, Any], list[str]]] = []
        for so in objs:
            typ = _text(so.find(f"{{{ENS}}}type")) or ""
            rid = None
            values: dict[str, Any] = {}
            nulls = [n.text for n in so.findall(f"{{{ENS}}}fieldsToNull") if n.text]
            for child in so:
                name = etree.QName(child).localname
                if name in {"type", "fieldsToNull"}:
                    continue
                if name == "Id":
                    if child.get(f"{{{XSI}}}nil") != "true" and child.text:
                        rid = child.text
                    continue
                canon = allowed.get(name.lower())
                if typ == "Opportunity" and canon is None:
                    raise SoapFault("INVALID_FIELD", f"No such column '{name}' on entity 'Opportunity'. If you "
                                    "are attempting to use a custom field, be sure to append the '__c' after "
                                    "the custom field name.")
                if canon in read_only:
                    continue
                values[canon or name] = child.text
            parsed.append((typ, rid, values, [allowed.get(n.lower(), n) for n in nulls]))

        results: list[dict[str, Any]] = []
        staged: list[tuple[str, dict[str, Any], bool]] = []
        # The org's records by external id as they stand before this call (its own writes are staged
        # until the end), built once per call instead of a scan of every record per upserted record.
        by_key: dict[Any, list[dict[str, Any]]] = {}
        if ext_field is not None and any(rid is None for _t, rid, _v, _n in parsed):
            for r in org.opportunities.values():
                k = r.get(ext_field)
                if k:
                    by_key.setdefault(k, []).append(r)
        for typ, rid, values, nulls in parsed:
            res, change = self._apply(op, org, typ, rid, values, nulls, ext_field, by_key)
            results.append(res)
            if change is not None:
                staged.append(change)
        if all_or_none and any(not r["success"] for r in results):
            results = [r if not r["success"] else {
                "success": False, "id": None, "created": False,
                "errors": [("ALL_OR_NONE_OPERATION_ROLLED_BACK", "Record rolled back because not all records "
                            "were valid and the request was using AllOrNone header", [])]} for r in results]
            staged = []
        now = _now().replace(microsecond=0)
        for rid, rec, created in staged:
            rec["LastModifiedDate"] = rec["SystemModstamp"] = now
            if created:
                rec["CreatedDate"] = now
            org.opportunities[rid] = rec
        items = []
        for r in results:
            errs = "".join(
                "<errors>" + "".join(f"<fields>{_esc(f)}</fields>" for f in fields)
                + f"<message>{_esc(msg)}</message><statusCode>{code}</statusCode></errors>"
                for code, msg, fields in r["errors"]
            )
            rid_xml = f"<id>{r['id']}</id>" if r["id"] else '<id xsi:nil="true"/>'
            created_xml = f"<created>{'true' if r['created'] else 'false'}</created>" if op == "upsert" else ""
            items.append(f"<result>{created_xml}{errs}{rid_xml}<success>{'true' if r['success'] else 'false'}"
                         "</success></result>")
        return _soap(f"<{op}Response>{''.join(items)}</{op}Response>", org)

    def _apply(self, op: str, org: SfOrg, typ: str, rid: str | None, values: dict[str, Any], nulls: list[str],
               ext_field: str | None, by_key: dict[Any, list[dict[str, Any]]],
               ) -> tuple[dict[str, Any], tuple[str, dict[str, Any], bool] | None]:
        def fail(code: str, msg: str, fields: list[str] | None = None) -> tuple[dict[str, Any], None]:
            return {"success": False, "id": None, "created": False, "errors": [(code, msg, fields or [])]}, None

        if typ != "Opportunity":
            return fail("INVALID_TYPE_ON_FIELD_IN_RECORD", f"sObject type '{typ}' is not supported here.")
        try:
            if values.get("Amount") is not None:
                values["Amount"] = Decimal(values["Amount"])
            if values.get("CloseDate") is not None:
                values["CloseDate"] = dt.date.fromisoformat(values["CloseDate"][:10])
        except (InvalidOperation, ValueError):
            return fail("INVALID_TYPE_ON_FIELD_IN_RECORD", "Amount or CloseDate has the wrong type.",
                        ["Amount", "CloseDate"])
        if values.get("Amount") is not None and values["Amount"] < 0:
            return fail("FIELD_CUSTOM_VALIDATION_EXCEPTION", "Amount cannot be negative", ["Amount"])
        for f in ("Name", "StageName"):
            if f in values and len(str(values[f] or "")) > 120:
                return fail("STRING_TOO_LONG", f"{f}: data value too large", [f])

        existing: dict[str, Any] | None = None
        if op == "update" or (op == "upsert" and rid):
            if not rid:
                return fail("MISSING_ARGUMENT", "Id not specified in an update call", ["Id"])
            existing = org.opportunities.get(rid)
            if existing is None:
                return fail("ENTITY_IS_DELETED", "entity is deleted")
        elif op == "upsert":
            assert ext_field is not None
            key = values.get(ext_field)
            if not key:
                return fail("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{ext_field}]", [ext_field])
            matches = by_key.get(key, [])
            if len(matches) > 1:
                return fail("DUPLICATE_EXTERNAL_ID", f"{ext_field}: more than one record found for external "
                            "id field", [ext_field])
            existing = matches[0] if matches else None
        if existing is not None:
            rec = dict(existing)
            rec.update(values)
            for n in nulls:
                rec[n] = None
            return {"success": True, "id": rec["Id"], "created": False, "errors": []}, (rec["Id"], rec, False)
        missing = [f for f in ("Name", "StageName", "CloseDate") if not values.get(f)]
        if missing:
            return fail("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", missing)
        org.counter += 1
        new_id = _sf_id("006", org.key, "new", org.counter, secrets.token_hex(4))
        rec = {"Id": new_id, "OwnerId": next(iter(org.users), None)}
        for f in org.opp_fields:
            rec[f] = None
        rec.update(values)
        return {"success": True, "id": new_id, "created": True, "errors": []}, (new_id, rec, True)


def _domain(request: Request) -> str | None:
    return request.path_params.get("domain")


def _base(request: Request) -> str:
    """The URL the org is reached at: the host (login.salesforce.com) or host/salesforce/<org>."""
    root = str(request.base_url).rstrip("/")
    domain = _domain(request)
    return f"{root}/salesforce/{domain}" if domain else root


def _unavailable(status: int) -> Response:
    page = ("<html><head><title>Service unavailable</title></head><body><h1>Salesforce is temporarily "
            "unavailable</h1><p>Please try again later.</p></body></html>")
    return HTMLResponse(page, status_code=status)


# -- OAuth ---------------------------------------------------------------------------------------
def _oauth_error(error: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class OAuthHandler:
    def __init__(self, store: SalesforceStore, state: SandboxState) -> None:
        self.store = store
        self.state = state
        self.domain: str | None = None

    def _token_response(self, request: Request, org: SfOrg, user: SfUser, app: SfApp, *,
                        refresh: str | None = None) -> JSONResponse:
        base = _base(request)
        token = self.store.new_session(org, user, client_id=app.client_id)
        issued = str(int(time.time() * 1000))
        body: dict[str, Any] = {
            "access_token": token, "instance_url": base, "id": f"{base}/id/{org.org_id}/{user.id}",
            "token_type": "Bearer", "issued_at": issued, "scope": "api refresh_token" if refresh else "api",
            "signature": _b64url(hashlib.sha256(f"{issued}{token}".encode()).digest()),
        }
        if refresh:
            body["refresh_token"] = refresh
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def token(self, request: Request) -> Response:
        form = await request.form()
        grant = str(form.get("grant_type", ""))
        self.domain = _domain(request)
        if grant == "client_credentials":
            return self._client_credentials(request, form)
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._jwt(request, form)
        if grant == "authorization_code":
            return self._code(request, form)
        if grant == "refresh_token":
            return self._refresh(request, form)
        return _oauth_error("unsupported_grant_type", "grant type not supported")

    def _app(self, form: Any, *, need_secret: bool) -> tuple[SfOrg, SfApp] | JSONResponse:
        found = self.store.find_app(str(form.get("client_id", "")), self.domain)
        if found is None:
            return _oauth_error("invalid_client_id", "client identifier invalid")
        org, app = found
        secret = form.get("client_secret")
        if (need_secret or secret) and not secrets.compare_digest(str(secret or ""), app.client_secret):
            return _oauth_error("invalid_client", "invalid client credentials")
        return org, app

    def _client_credentials(self, request: Request, form: Any) -> Response:
        found = self._app(form, need_secret=True)
        if isinstance(found, JSONResponse):
            return found
        org, app = found
        if not app.client_credentials_user:
            return _oauth_error("invalid_grant", "no client credentials user enabled")
        user = org.user_by_name(app.client_credentials_user)
        if user is None or not user.active:
            return _oauth_error("invalid_grant", "no client credentials user enabled")
        return self._token_response(request, org, user, app)

    def _jwt(self, request: Request, form: Any) -> Response:
        import jwt as pyjwt

        assertion = str(form.get("assertion", ""))
        try:
            unverified = pyjwt.decode(assertion, options={"verify_signature": False})
        except pyjwt.PyJWTError:
            return _oauth_error("invalid_grant", "invalid assertion")
        found = self.store.find_app(str(unverified.get("iss", "")), self.domain)
        if found is None:
            return _oauth_error("invalid_client_id", "client identifier invalid")
        org, app = found
        if not app.certificate:
            return _oauth_error("invalid_grant", "invalid assertion")
        from cryptography import x509

        # The audience (Salesforce Help, "OAuth 2.0 JWT Bearer Flow for Server-to-Server Integration",
        # help.salesforce.com/s/articleView?id=xcloud.remoteaccess_oauth_jwt_flow.htm): "aud" is the
        # authorization server's URL — https://login.salesforce.com for production and Developer Edition orgs,
        # https://test.salesforce.com for sandbox orgs (an Experience Cloud site's URL for its users, which the
        # sandbox does not play). Anything else — the instance URL, the other login host — is refused with
        # {"error": "invalid_grant", "error_description": "audience is invalid"} (HTTP 400).
        audience = "https://test.salesforce.com" if org.org_type == "sandbox" else "https://login.salesforce.com"
        try:
            public_key = x509.load_pem_x509_certificate(app.certificate.encode()).public_key()
            claims = pyjwt.decode(
                assertion, public_key, algorithms=["RS256"],  # type: ignore[arg-type]
                audience=audience, options={"require": ["iss", "sub", "aud", "exp"]}, leeway=5,
            )
        except pyjwt.ExpiredSignatureError:
            return _oauth_error("invalid_grant", "expired authorization code")
        except pyjwt.InvalidAudienceError:
            return _oauth_error("invalid_grant", "audience is invalid")
        except (pyjwt.PyJWTError, ValueError):
            return _oauth_error("invalid_grant", "invalid assertion")
        if claims["exp"] - time.time() > 300:
            return _oauth_error("invalid_grant", "invalid assertion")
        user = org.user_by_name(str(claims["sub"]))
        if user is None:
            return _oauth_error("invalid_grant", "user hasn't approved this consumer")
        if app.jwt_users and user.username not in app.jwt_users:
            return _oauth_error("invalid_grant", "user hasn't approved this consumer")
        return self._token_response(request, org, user, app)

    def _code(self, request: Request, form: Any) -> Response:
        found = self._app(form, need_secret=False)
        if isinstance(found, JSONResponse):
            return found
        org, app = found
        entry = self.store.codes.pop(str(form.get("code", "")), None)
        if entry is None or entry["client_id"] != app.client_id or time.time() > entry["expires"]:
            return _oauth_error("invalid_grant", "invalid authorization code")
        if str(form.get("redirect_uri", "")) != entry["redirect_uri"]:
            return _oauth_error("invalid_grant", "redirect_uri must match configuration")
        challenge = entry.get("code_challenge")
        if challenge:
            verifier = str(form.get("code_verifier", ""))
            if _b64url(hashlib.sha256(verifier.encode()).digest()) != challenge:
                return _oauth_error("invalid_grant", "invalid code verifier")
        user = org.users[entry["user_id"]]
        refresh = secrets.token_urlsafe(40)
        self.store.refresh_tokens[refresh] = {"org": org.key, "user_id": user.id, "client_id": app.client_id}
        return self._token_response(request, org, user, app, refresh=refresh)

    def _refresh(self, request: Request, form: Any) -> Response:
        found = self._app(form, need_secret=False)
        if isinstance(found, JSONResponse):
            return found
        org, app = found
        token = str(form.get("refresh_token", ""))
        entry = self.store.refresh_tokens.get(token)
        if entry is None or entry["client_id"] != app.client_id:
            return _oauth_error("invalid_grant", "expired access/refresh token")
        user = org.users.get(entry["user_id"])
        if user is None or not user.active:
            return _oauth_error("invalid_grant", "inactive user")
        new_refresh = None
        if app.rotate_refresh_tokens:
            self.store.refresh_tokens.pop(token, None)
            new_refresh = secrets.token_urlsafe(40)
            self.store.refresh_tokens[new_refresh] = entry
        return self._token_response(request, org, user, app, refresh=new_refresh)

    async def authorize(self, request: Request) -> Response:
        params = dict(request.query_params) if request.method == "GET" else dict(await request.form())
        self.domain = _domain(request)
        found = self.store.find_app(str(params.get("client_id", "")), self.domain)
        if found is None:
            return _page("Error", "<p class=err>error=invalid_client_id: client identifier invalid</p>", 400)
        org, app = found
        redirect_uri = str(params.get("redirect_uri", ""))
        if redirect_uri not in app.redirect_uris:
            return _page("Error", "<p class=err>error=redirect_uri_mismatch: redirect_uri must match "
                         "configuration</p>", 400)
        if params.get("response_type") != "code":
            return _redirect(redirect_uri, error="unsupported_response_type",
                             error_description="response type not supported", state=params.get("state"))
        challenge = params.get("code_challenge")
        if challenge and params.get("code_challenge_method", "plain") != "S256":
            return _redirect(redirect_uri, error="invalid_request",
                             error_description="code_challenge_method must be S256", state=params.get("state"))
        if request.method == "GET":
            return self._consent(org, app, params, error=None)
        if params.get("action") == "deny":
            return _redirect(redirect_uri, error="access_denied",
                             error_description="end-user denied authorization", state=params.get("state"))
        user = org.user_by_name(str(params.get("username", "")))
        if user is None or not secrets.compare_digest(str(params.get("password", "")), user.password):
            return self._consent(org, app, params, error="Please check your username and password.")
        code = _b64url(secrets.token_bytes(24))
        self.store.codes[code] = {
            "client_id": app.client_id, "redirect_uri": redirect_uri, "user_id": user.id,
            "code_challenge": challenge, "expires": time.time() + CODE_TTL,
        }
        return _redirect(redirect_uri, code=code, state=params.get("state"))

    def _consent(self, org: SfOrg, app: SfApp, params: dict[str, Any], *, error: str | None) -> Response:
        keep = ("response_type", "client_id", "redirect_uri", "state", "code_challenge",
                "code_challenge_method", "scope")
        hidden = "".join(
            f'<input type=hidden name="{k}" value="{html.escape(str(params[k]), quote=True)}">'
            for k in keep if params.get(k) is not None
        )
        hint = html.escape(str(params.get("login_hint", "")), quote=True)
        prefix = f"/salesforce/{self.domain}" if self.domain else ""
        err = f"<p class=err>{html.escape(error)}</p>" if error else ""
        body = (
            f"<h1>Allow access?</h1><p><b>{html.escape(app.name)}</b> is asking to access your data in "
            f"<b>{html.escape(org.name)}</b> (Salesforce sandbox): access and manage your data (api), "
            f"perform requests at any time (refresh_token).</p>{err}"
            f'<form method=post action="{prefix}/services/oauth2/authorize">{hidden}'
            f'<label>Username <input name=username value="{hint}" autocomplete=username></label>'
            "<label>Password <input name=password type=password autocomplete=current-password></label>"
            "<button name=action value=allow>Allow</button> <button name=action value=deny>Deny</button>"
            "</form>"
        )
        return _page("Allow access", body, 200)


def _page(title: str, body: str, status: int) -> HTMLResponse:
    css = ("body{font-family:system-ui,sans-serif;max-width:520px;margin:40px auto;color:#16325c}"
           "label{display:block;margin:10px 0}input{display:block;width:100%;padding:6px}"
           ".err{color:#c23934}button{margin-top:12px;padding:8px 16px}")
    doc = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)} | Salesforce sandbox"
           f"</title><style>{css}</style></head><body>{body}</body></html>")
    return HTMLResponse(doc, status_code=status, headers={"Cache-Control": "no-store"})


def _redirect(uri: str, **params: Any) -> RedirectResponse:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    sep = "&" if "?" in uri else "?"
    return RedirectResponse(f"{uri}{sep}{query}", status_code=302)


# -- REST ----------------------------------------------------------------------------------------
def _rest_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse([{"message": message, "errorCode": code}], status_code=status)


class RestHandler:
    def __init__(self, store: SalesforceStore, state: SandboxState) -> None:
        self.store = store
        self.state = state

    async def versions(self, request: Request) -> Response:
        v = self.store.api_version
        return JSONResponse([{"label": "Summer '23", "url": f"/services/data/v{v}", "version": v}])

    async def limits(self, request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        sess = self.store.session(token)
        domain = _domain(request)
        if sess is None or (domain is not None and sess.org_key != domain):
            return _rest_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
        org = self.store.orgs[sess.org_key]
        status = await self.state.before_call(org.key)
        if status is not None:
            return _unavailable(status)
        if not org.api_enabled:
            return _rest_error(403, "API_DISABLED_FOR_ORG", "API is not enabled for this Organization or Partner")
        if self.state.faults(org.key).quota_exhausted or org.api_used >= org.daily_limit:
            return _rest_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        remaining = max(org.daily_limit - org.api_used, 0)
        body = {
            "DailyApiRequests": {"Max": org.daily_limit, "Remaining": remaining},
            "DailyBulkApiBatches": {"Max": 15000, "Remaining": 15000},
            "DataStorageMB": {"Max": 5000, "Remaining": 4800},
        }
        return JSONResponse(body, headers={"Sforce-Limit-Info": f"api-usage={org.api_used}/{org.daily_limit}"})


# -- admin ---------------------------------------------------------------------------------------
def _admin_routes(store_ref: dict[str, SalesforceStore]) -> list[BaseRoute]:
    def org_or_404(request: Request) -> SfOrg | JSONResponse:
        org = store_ref["store"].orgs.get(request.path_params["org"])
        return org if org is not None else JSONResponse({"error": "no such salesforce org"}, status_code=404)

    async def api_usage(request: Request) -> Response:
        org = org_or_404(request)
        if isinstance(org, JSONResponse):
            return org
        body = await request.json()
        if "used" in body:
            org.api_used = int(body["used"])
        if "limit" in body:
            org.daily_limit = int(body["limit"])
        return JSONResponse({"used": org.api_used, "limit": org.daily_limit})

    async def certificate(request: Request) -> Response:
        org = org_or_404(request)
        if isinstance(org, JSONResponse):
            return org
        app = org.apps.get(request.path_params["client_id"])
        if app is None:
            return JSONResponse({"error": "no such app"}, status_code=404)
        app.certificate = (await request.body()).decode()
        return JSONResponse({"ok": True})

    async def org_type(request: Request) -> Response:
        org = org_or_404(request)
        if isinstance(org, JSONResponse):
            return org
        kind = str((await request.json()).get("org_type", ""))
        if kind not in {"production", "developer", "sandbox"}:
            return JSONResponse({"error": "org_type is production, developer or sandbox"}, status_code=400)
        org.org_type = kind
        return JSONResponse({"org_type": org.org_type})

    async def callback_urls(request: Request) -> Response:
        org = org_or_404(request)
        if isinstance(org, JSONResponse):
            return org
        app = org.apps.get(request.path_params["client_id"])
        if app is None:
            return JSONResponse({"error": "no such app"}, status_code=404)
        uri = str((await request.json()).get("add", ""))
        if not uri.startswith(("https://", "http://")):
            return JSONResponse({"error": "a callback URL is an http(s) URL"}, status_code=400)
        if uri not in app.redirect_uris:
            app.redirect_uris.append(uri)
        return JSONResponse({"redirect_uris": app.redirect_uris})

    async def revoke(request: Request) -> Response:
        org = org_or_404(request)
        if isinstance(org, JSONResponse):
            return org
        store = store_ref["store"]
        gone = [t for t, e in store.refresh_tokens.items() if e["org"] == org.key]
        for t in gone:
            store.refresh_tokens.pop(t, None)
        return JSONResponse({"revoked": len(gone)})

    async def user(request: Request) -> Response:
        org = org_or_404(request)
        if isinstance(org, JSONResponse):
            return org
        u = org.user_by_name(request.path_params["username"])
        if u is None:
            return JSONResponse({"error": "no such user"}, status_code=404)
        body = await request.json()
        for k in ("password", "security_token", "api_enabled", "locked", "active", "require_token"):
            if k in body:
                setattr(u, k, body[k])
        if body.get("locked") is False:
            u.failed_logins = 0
        return JSONResponse({"ok": True})

    async def opportunities(request: Request) -> Response:
        org = org_or_404(request)
        if isinstance(org, JSONResponse):
            return org
        rows = [{k: _format_value(v) for k, v in r.items()} for r in org.opportunities.values()]
        return JSONResponse(rows)

    return [
        Route("/_sandbox/salesforce/{org}/api-usage", api_usage, methods=["POST"]),
        Route("/_sandbox/salesforce/{org}/apps/{client_id}/certificate", certificate, methods=["POST"]),
        Route("/_sandbox/salesforce/{org}/org-type", org_type, methods=["POST"]),
        Route("/_sandbox/salesforce/{org}/apps/{client_id}/callback-urls", callback_urls, methods=["POST"]),
        Route("/_sandbox/salesforce/{org}/revoke-refresh-tokens", revoke, methods=["POST"]),
        Route("/_sandbox/salesforce/{org}/users/{username}", user, methods=["POST"]),
        Route("/_sandbox/salesforce/{org}/opportunities", opportunities),
    ]


def routes(state: SandboxState) -> list[BaseRoute]:
    """Salesforce's routes for the sandbox app (see the module docstring)."""
    ref: dict[str, SalesforceStore] = {"store": SalesforceStore(state)}

    def rebuild(s: SandboxState) -> None:
        ref["store"] = SalesforceStore(s)
        s.vendors["salesforce"] = ref["store"]

    state.vendors["salesforce"] = ref["store"]
    state.on_reset(rebuild)
    state.add_inspector("salesforce", lambda key: ref["store"].inspect(key))

    async def soap(request: Request) -> Response:
        return await SoapHandler(ref["store"], state)(request)

    async def token(request: Request) -> Response:
        return await OAuthHandler(ref["store"], state).token(request)

    async def authorize(request: Request) -> Response:
        return await OAuthHandler(ref["store"], state).authorize(request)

    async def versions(request: Request) -> Response:
        return await RestHandler(ref["store"], state).versions(request)

    async def limits(request: Request) -> Response:
        return await RestHandler(ref["store"], state).limits(request)

    out: list[BaseRoute] = []
    # Root paths play login.salesforce.com (the org comes from the username, client id or session);
    # /salesforce/{domain}/... plays the org's My Domain (only that org's users and apps).
    for prefix in ("", "/salesforce/{domain}"):
        out += [
            Route(prefix + "/services/Soap/u/{version}", soap, methods=["POST"]),
            Route(prefix + "/services/Soap/u/{version}/{org_id}", soap, methods=["POST"]),
            Route(prefix + "/services/oauth2/token", token, methods=["POST"]),
            Route(prefix + "/services/oauth2/authorize", authorize, methods=["GET", "POST"]),
            Route(prefix + "/services/data/", versions),
            Route(prefix + "/services/data/v{version}/limits", limits),
            Route(prefix + "/services/data/v{version}/limits/", limits),
        ]
    return out + _admin_routes(ref)

