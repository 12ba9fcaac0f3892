"""Dynamics 365 / Dataverse for the sandbox: the Web API (OData v4, ``/api/data/v9.2``), the Microsoft Entra
ID v2.0 token endpoint (client credentials) and Microsoft Graph ``subscribedSkus``.

Routes (``routes(state)``; one sandbox process serves every environment):

    POST  /entra/{tenant}/oauth2/v2.0/token              client-credentials tokens (scope ``<env>/.default``)
    GET   /graph/v1.0/subscribedSkus                     license SKUs of the directory (Organization.Read.All)
    *     /dynamics/{env}/api/data/v9.2/...              the Web API of environment ``env`` (org key)
    POST  /_sandbox/dynamics/{env}/limits                {"requests": n, "window_s": s, "concurrent": c}
    POST  /_sandbox/dynamics/{env}/advance               {"seconds": n}: move this vendor's clock forward
    POST  /_sandbox/dynamics/{env}/behaviour             {"unsupported_messages": ["UpsertMultiple"],
                                                          "batch_part_impersonation": "ignored"|"honoured"}

What it enforces, as Dataverse does (Microsoft Learn, checked 2026-11):

- **Service protection** per environment and *authenticated* user (the application user, not the one
  impersonated): a 5-minute sliding window of 6,000 requests, and 52 concurrent requests. Every HTTP
  request to the Web API counts once — a ``$batch`` of up to 1,000 operations counts once ("A batch can
  contain up to 1000 operations and will avoid the number of requests limit", api-limits) and so does each
  bulk message ("Each bulk operation message counts as single request", bulk-operations). Token requests
  are Entra's, not Dataverse's, and do not count. Over the limit: HTTP 429, ``Retry-After`` in seconds
  (until the oldest counted request leaves the window) and the documented error
  ``0x80072322 Number of requests exceeded the limit of 6000 over time window of 300 seconds.``
  The execution-time facet (1,200 s per window) is not modelled: sandbox requests take milliseconds.
- **Batch size**: more than 1,000 operations in a ``$batch`` (change-set operations included) is refused
  with the OData message real environments send ("The current batch message contains too many parts…",
  reported in MicrosoftDocs/powerapps-docs#1890). Bulk messages have no fixed count in Dataverse (they are
  bounded by payload size and a 2-minute time limit; Microsoft suggests 1,000 per request to start); the
  sandbox holds them to the same 1,000 so no client can look better here than the real service allows.
- **Paging**: ``Prefer: odata.maxpagesize`` up to 5,000; larger values are ignored (page of 5,000), as
  documented; ``@odata.nextLink`` carries a ``$skiptoken`` cookie.
- **Impersonation**: ``CallerObjectId`` (Entra object id) or ``MSCRMCallerID`` (systemuserid); the caller
  needs the Delegate role. Records get ``createdby``/``modifiedby`` = the impersonated user and
  ``createdonbehalfby``/``modifiedonbehalfby`` = the application user.
- **Bulk messages** on this standard table are all-or-nothing: one bad target fails (and changes nothing
  of) the whole request. ``UpsertMultiple`` answers ``204 No Content`` with no body (Microsoft Learn, Web API
  reference "UpsertMultiple Action": "The UpsertMultiple action returns 204 NoContent. The
  UpsertMultipleResponse complex type is not returned.").
- **Alternate key values belong in the URL / ``@odata.id``, not the body** (powerapps-docs
  use-upsert-insert-update-record.md, "Guidance for composing requests": "When you use alternate keys to
  identify a record, don't include the alternate key data in the portion of the request that represents the
  data to save"). On the create path Dataverse answers ``400`` ``0x80040216`` "An unexpected error
  occurred." (reported with the request and answer in microsoft/PowerPlatform-DataverseClient-Python#127);
  the update path tolerates it, and so does the sandbox.
- **Not every table supports the bulk messages** (powerapps-docs bulk-operations.md: "Not all standard
  tables support these messages"; PowerApps-Samples checks ``sdkmessagefilter`` before using them). An
  environment can be played without them (scenario ``unsupported_messages`` or the ``behaviour`` admin
  route): the message is refused with the SDK fault Dataverse raises for a message a table has no processor
  for, ``0x80040800`` "The 'UpsertMultiple' method does not support entities of type 'opportunity'.
  MessageProcessorCache returned MessageProcessor.Empty." as HTTP 400 (code and text as reported from real
  environments, e.g. for Delete on appmodulecomponent; the text is the platform's SdkEntityDoesNotSupportMessage).
- **Per-part impersonation in ``$batch``** can be played as ignored (``batch_part_impersonation: ignored``):
  the part runs as the application user, as reported in MicrosoftDocs/dynamics-365-customer-engagement#531
  ("the request is processed successfully, but the impersonation header seems to get ignored"). Headers on
  the outer ``$batch`` request still apply.
- **Multipart bodies** are read with CRLF or bare LF line ends: the examples in Microsoft's own batch
  documentation (execute-batch-operations-using-web-api.md) are LF-only.
- Tokens expire (``expires_in`` 3599 by default); ``/_sandbox/faults/{env}/expire-sessions`` kills them.
  ``quota_exhausted`` answers every Web API call with the service-protection 429.

It imports nothing from ``core``: it is the CRM, not our code.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

API = "/api/data/v9.2"
GRAPH_RESOURCE = "https://graph.microsoft.com"
DEFAULT_REQUESTS = 6000
DEFAULT_WINDOW_S = 300
DEFAULT_CONCURRENT = 52
MAX_BATCH = 1000
MAX_PAGE = 5000
OPPORTUNITY_COLUMNS = {
    "opportunityid", "name", "salesstage", "estimatedvalue", "estimatedclosedate", "description",
    "crb_idempotencykey", "statecode", "statuscode", "closeprobability", "stepname",
}
READ_ONLY = {"createdon", "modifiedon", "_createdby_value", "_modifiedby_value", "_createdonbehalfby_value",
             "_modifiedonbehalfby_value", "_ownerid_value", "versionnumber"}
GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
STAGES = ("Qualify", "Develop", "Propose", "Close")


# ---------------------------------------------------------------------------------------- model
@dataclass
class AppRegistration:
    client_id: str
    secret: str
    name: str = "CRM Bridge"
    object_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    secret_expires: datetime | None = None
    graph_roles: tuple[str, ...] = ()


@dataclass
class Token:
    directory: str
    client_id: str
    audience: str  # environment key, or "graph"
    expires_at: float
    epoch: int


@dataclass
class Environment:
    key: str
    directory: str
    edition: str
    organization_id: str
    business_unit_id: str
    users: dict[str, dict[str, Any]]  # systemuserid → row
    opportunities: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)  # crb_idempotencykey → opportunityid
    requests: int = DEFAULT_REQUESTS
    window_s: float = DEFAULT_WINDOW_S
    concurrent: int = DEFAULT_CONCURRENT
    token_lifetime_s: int = 3599
    licenses: list[dict[str, Any]] = field(default_factory=list)
    counted: dict[str, deque[float]] = field(default_factory=dict)  # caller → request times
    in_flight: dict[str, int] = field(default_factory=dict)
    throttled: int = 0
    version: int = 1000
    unsupported_messages: set[str] = field(default_factory=set)  # e.g. {"UpsertMultiple"}
    batch_part_impersonation: str = "honoured"  # or "ignored"

    def app_user(self, client_id: str) -> dict[str, Any] | None:
        return next((u for u in self.users.values() if u.get("applicationid") == client_id), None)


class DataverseError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def response(self) -> Response:
        return JSONResponse({"error": {"code": self.code, "message": self.message}}, status_code=self.status,
                            headers={"OData-Version": "4.0", **self.headers})


class DynamicsStore:
    """Every environment and Entra directory of the scenario's ``dynamics`` section."""

    def __init__(self, section: dict[str, Any], seed: int = 0) -> None:
        self.offset = 0.0
        self.tokens: dict[str, Token] = {}
        self.directories: dict[str, dict[str, AppRegistration]] = {}
        self.environments: dict[str, Environment] = {}
        import random

        rng = random.Random(f"dynamics:{seed}")
        for key, raw in (section.get("environments") or {}).items():
            self.environments[key] = self._build_env(key, raw or {}, rng)

    # -- time -------------------------------------------------------------------------------
    def now(self) -> float:
        return time.time() + self.offset

    def now_dt(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)

    # -- scenario ---------------------------------------------------------------------------
    def _build_env(self, key: str, raw: dict[str, Any], rng: Any) -> Environment:
        directory = str(raw.get("directory") or raw.get("tenant_id") or f"{key}.onmicrosoft.com")
        apps = self.directories.setdefault(directory, {})
        users: dict[str, dict[str, Any]] = {}
        for app in raw.get("apps") or []:
            reg = AppRegistration(
                client_id=str(app["client_id"]),
                secret=str(app["secret"]),
                name=str(app.get("name") or "CRM Bridge"),
                object_id=str(app.get("object_id") or uuid.uuid4()),
                secret_expires=_as_dt(app.get("secret_expires")),
                graph_roles=tuple(app.get("graph_roles") or ()),
            )
            apps[reg.client_id] = reg
            if app.get("application_user", True):
                uid = str(app.get("systemuserid") or uuid.uuid5(uuid.NAMESPACE_URL, f"{key}:{reg.client_id}"))
                users[uid] = {
                    "systemuserid": uid, "fullname": f"# {reg.name}", "internalemailaddress": None,
                    "domainname": f"{reg.client_id}@{directory}", "isdisabled": False,
                    "azureactivedirectoryobjectid": reg.object_id, "applicationid": reg.client_id,
                    "accessmode": 4, "islicensed": False, "_delegate": bool(app.get("delegate", True)),
                }
        for u in raw.get("users") or []:
            uid = str(u["systemuserid"])
            users[uid] = {
                "systemuserid": uid, "fullname": str(u.get("fullname") or u.get("name") or uid),
                "internalemailaddress": u.get("email"), "domainname": u.get("email"),
                "isdisabled": bool(u.get("disabled", False)),
                "azureactivedirectoryobjectid": str(u.get("object_id") or uuid.uuid5(uuid.NAMESPACE_URL, uid)),
                "applicationid": None, "accessmode": int(u.get("accessmode", 0)),
                "islicensed": bool(u.get("licensed", True)), "_delegate": False,
            }
        sp = raw.get("service_protection") or {}
        env = Environment(
            key=key,
            directory=directory,
            edition=str(raw.get("edition") or "sales-enterprise"),
            organization_id=str(raw.get("organization_id") or uuid.uuid5(uuid.NAMESPACE_URL, f"org:{key}")),
            business_unit_id=str(raw.get("business_unit_id") or uuid.uuid5(uuid.NAMESPACE_URL, f"bu:{key}")),
            users=users,
            requests=int(sp.get("requests", DEFAULT_REQUESTS)),
            window_s=float(sp.get("window_s", DEFAULT_WINDOW_S)),
            concurrent=int(sp.get("concurrent", DEFAULT_CONCURRENT)),
            token_lifetime_s=int(raw.get("token_lifetime_s", 3599)),
            licenses=list(raw.get("licenses") or []),
            unsupported_messages={str(m) for m in raw.get("unsupported_messages") or ()},
            batch_part_impersonation=str(raw.get("batch_part_impersonation") or "honoured"),
        )
        people = [u for u in users.values() if not u["applicationid"]]
        count = int((raw.get("opportunities") or {}).get("generate", 0)) if isinstance(
            raw.get("opportunities"), dict) else 0
        start = self.now_dt() - timedelta(days=30)
        for i in range(count):
            owner = people[i % len(people)]["systemuserid"] if people else None
            stamp = start + timedelta(hours=i)
            oid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            row = self._new_row(env, oid, owner, owner, None, stamp)
            row.update(name=f"{key.title()} deal {i + 1:03d}", salesstage=i % 4,
                       estimatedvalue=float(1000 * (1 + rng.randrange(200))),
                       estimatedclosedate=(stamp.date() + timedelta(days=60)).isoformat())
            env.opportunities[oid] = row
        return env

    def _new_row(self, env: Environment, oid: str, owner: str | None, by: str | None, on_behalf: str | None,
                 at: datetime | None = None) -> dict[str, Any]:
        stamp = _odata_dt(at or self.now_dt())
        env.version += 1
        return {
            "opportunityid": oid, "name": None, "salesstage": 0, "estimatedvalue": None,
            "estimatedclosedate": None, "description": None, "crb_idempotencykey": None, "statecode": 0,
            "statuscode": 1, "closeprobability": None, "stepname": None,
            "_ownerid_value": owner, "createdon": stamp, "modifiedon": stamp,
            "_createdby_value": by, "_modifiedby_value": by,
            "_createdonbehalfby_value": on_behalf, "_modifiedonbehalfby_value": on_behalf,
            "versionnumber": env.version,
        }

    # -- tokens -----------------------------------------------------------------------------
    def issue(self, directory: str, client_id: str, audience: str, lifetime: int, epoch: int) -> str:
        token = "eyJ0eXAiOiJKV1QiLCJzYW5kYm94Ijp0cnVlfQ." + secrets.token_urlsafe(32)
        self.tokens[token] = Token(directory, client_id, audience, self.now() + lifetime, epoch)
        return token

    def inspect(self, key: str) -> dict[str, Any] | None:
        env = self.environments.get(key)
        if env is None:
            return None
        calls = {uid: len(q) for uid, q in env.counted.items()}
        return {
            "edition": env.edition,
            "organization_id": env.organization_id,
            "opportunities": list(env.opportunities.values()),
            "users": [{k: v for k, v in u.items() if not k.startswith("_")} for u in env.users.values()],
            "service_protection": {"requests": env.requests, "window_s": env.window_s,
                                   "counted_in_window": calls, "throttled": env.throttled},
        }


# ---------------------------------------------------------------------------------------- helpers
def _as_dt(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    text = str(value).replace("Z", "+00:00")
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _odata_dt(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _entra_error(status: int, error: str, code: int, text: str) -> JSONResponse:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    trace = str(uuid.uuid4())
    return JSONResponse(
        {
            "error": error,
            "error_description": f"AADSTS{code}: {text} Trace ID: {trace} Correlation ID: {uuid.uuid4()} "
            f"Timestamp: {now}",
            "error_codes": [code],
            "timestamp": now,
            "trace_id": trace,
            "correlation_id": str(uuid.uuid4()),
            "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        },
        status_code=status,
    )


# ------------------------------------------------------------------------------ OData $filter
_TOKEN = re.compile(
    r"\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<comma>,)|(?P<str>'(?:[^']|'')*')"
    r"|(?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))"
    r"|(?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
    r"|(?P<date>\d{4}-\d{2}-\d{2})|(?P<num>-?\d+(?:\.\d+)?)|(?P<word>[A-Za-z_][A-Za-z0-9_./]*))"
)
_OPS = {"eq", "ne", "gt", "ge", "lt", "le"}


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise DataverseError(400, "0x80060888", f"Syntax error at position {pos} in '{text}'.")
        pos = m.end()
        kind = m.lastgroup or ""
        raw = m.group(kind)
        if kind == "str":
            out.append(("val", raw[1:-1].replace("''", "'")))
        elif kind == "dt":
            out.append(("val", _as_dt(raw)))
        elif kind == "guid":
            out.append(("val", raw.lower()))
        elif kind == "date":
            out.append(("val", raw))
        elif kind == "num":
            out.append(("val", float(raw)))
        elif kind == "word":
            low = raw.lower()
            if low in {"true", "false"}:
                out.append(("val", low == "true"))
            elif low == "null":
                out.append(("val", None))
            elif low in _OPS or low in {"and", "or", "not"}:
                out.append(("kw", low))
            else:
                out.append(("id", raw))
        else:
            out.append((kind, raw))
    return out


Predicate = Callable[[dict[str, Any]], bool]


def parse_filter(text: str, columns: set[str]) -> Predicate:
    toks = _tokens(text)
    pos = 0

    def peek() -> tuple[str, Any] | None:
        return toks[pos] if pos < len(toks) else None

    def take() -> tuple[str, Any]:
        nonlocal pos
        if pos >= len(toks):
            raise DataverseError(400, "0x80060888", f"Unexpected end of $filter '{text}'.")
        pos += 1
        return toks[pos - 1]

    def expr() -> Predicate:
        left = conj()
        while peek() == ("kw", "or"):
            take()
            right = conj()
            left = (lambda a, b: lambda r: a(r) or b(r))(left, right)
        return left

    def conj() -> Predicate:
        left = unary()
        while peek() == ("kw", "and"):
            take()
            right = unary()
            left = (lambda a, b: lambda r: a(r) and b(r))(left, right)
        return left

    def unary() -> Predicate:
        tok = peek()
        if tok == ("kw", "not"):
            take()
            inner = unary()
            return lambda r: not inner(r)
        if tok and tok[0] == "lp":
            take()
            inner = expr()
            if take()[0] != "rp":
                raise DataverseError(400, "0x80060888", f"Missing ')' in $filter '{text}'.")
            return inner
        kind, name = take()
        if kind != "id":
            raise DataverseError(400, "0x80060888", f"Expected a property name in $filter '{text}'.")
        if name not in columns:
            raise DataverseError(
                400, "0x80060888",
                f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.entity'.")
        op_kind, op = take()
        if op_kind != "kw" or op not in _OPS:
            raise DataverseError(400, "0x80060888", f"Unsupported operator near '{name}' in $filter.")
        vkind, value = take()
        if vkind != "val":
            raise DataverseError(400, "0x80060888", f"Expected a literal after '{name} {op}'.")
        return _compare(name, op, value)

    pred = expr()
    if pos != len(toks):
        raise DataverseError(400, "0x80060888", f"Unexpected text at the end of $filter '{text}'.")
    return pred


def _norm(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 20 and value[4] == "-" and value[10] == "T":
        try:
            return _as_dt(value)
        except ValueError:
            return value
    if isinstance(value, str) and GUID_RE.match(value):
        return value.lower()
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    return value


def _compare(name: str, op: str, literal: Any) -> Predicate:
    def pred(row: dict[str, Any]) -> bool:
        left = _norm(row.get(name))
        right = literal
        if op == "eq":
            return bool(left == right)
        if op == "ne":
            return bool(left != right)
        if left is None or right is None:
            return False
        try:
            if op == "gt":
                return bool(left > right)
            if op == "ge":
                return bool(left >= right)
            if op == "lt":
                return bool(left < right)
            return bool(left <= right)
        except TypeError:
            return False

    return pred


# ------------------------------------------------------------------------------ Web API dispatch
@dataclass
class Call:
    env: Environment
    caller: dict[str, Any]  # the authenticated (application) user
    actor: dict[str, Any]  # the impersonated user, or the caller
    base: str  # https://host/dynamics/{env}
    prefer: str = ""


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def raw(self) -> bytes:
        if self.body is None:
            return b""
        return json.dumps(self.body, default=str).encode()


_SEGMENT = re.compile(r"^(?P<set>[A-Za-z_]+)(?:\((?P<key>[^)]*)\))?(?:/(?P<action>[A-Za-z_.]+))?$")


def _parse_key(raw: str) -> tuple[str, str]:
    raw = unquote(raw)
    if GUID_RE.match(raw):
        return "id", raw.lower()
    name, sep, value = raw.partition("=")
    if not sep or not (value.startswith("'") and value.endswith("'")):
        raise DataverseError(400, "0x80060888", f"Bad Request - Error in query syntax: key '{raw}'.")
    return name.strip(), value[1:-1].replace("''", "'")


def dispatch(store: DynamicsStore, call: Call, method: str, path: str, query: str, headers: dict[str, str],
             body: bytes) -> Answer:
    """One Web API operation (also each part of a $batch). ``path`` is relative to /api/data/v9.2/."""
    path = path.strip("/")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    if path in {"WhoAmI", "WhoAmI()"} and method == "GET":
        return Answer(200, {
            "@odata.context": f"{call.base}{API}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
            "BusinessUnitId": call.env.business_unit_id,
            "UserId": call.actor["systemuserid"],
            "OrganizationId": call.env.organization_id,
        })
    m = _SEGMENT.match(path)
    if not m:
        raise DataverseError(404, "0x8006088a", f"Resource not found for the segment '{path.split('/')[0]}'.")
    entity_set, key, action = m.group("set"), m.group("key"), m.group("action")
    if entity_set == "systemusers" and not action:
        return _systemusers(call, method, key, params, headers)
    if entity_set == "opportunities":
        if action:
            if method != "POST" or key is not None:
                raise DataverseError(405, "0x80060888", f"The HTTP method '{method}' is not allowed here.")
            return _bulk(store, call, action, body)
        return _opportunities(store, call, method, key, params, headers, body)
    raise DataverseError(404, "0x8006088a", f"Resource not found for the segment '{entity_set}'.")


def _select(row: dict[str, Any], select: str | None, id_col: str) -> dict[str, Any]:
    out: dict[str, Any] = {"@odata.etag": f'W/"{row.get("versionnumber", 1)}"'}
    if select:
        cols = [c.strip() for c in select.split(",") if c.strip()]
        for c in cols:
            if c not in row:
                raise DataverseError(400, "0x80060888",
                                     f"Could not find a property named '{c}' on type 'Microsoft.Dynamics.CRM."
                                     f"{'systemuser' if id_col == 'systemuserid' else 'opportunity'}'.")
            out[c] = row[c]
        out[id_col] = row[id_col]
    else:
        out.update({k: v for k, v in row.items() if not k.startswith("_") or k.endswith("_value")})
    return out


def _page(rows: list[dict[str, Any]], call: Call, entity_set: str, params: dict[str, str],
          headers: dict[str, str], id_col: str) -> Answer:
    prefer = headers.get("prefer", "")
    m = re.search(r"odata\.maxpagesize\s*=\s*(\d+)", prefer)
    asked = int(m.group(1)) if m else MAX_PAGE
    size = max(1, min(asked, MAX_PAGE))  # larger requests are ignored: pages of 5,000
    if "$top" in params:
        rows = rows[: int(params["$top"])]
    offset = 0
    token = params.get("$skiptoken")
    if token:
        tm = re.search(r'pagingcookie="(\d+)"', unquote(token))
        if not tm:
            raise DataverseError(400, "0x80060888", "The $skiptoken is not valid.")
        offset = int(tm.group(1))
    chunk = rows[offset : offset + size]
    body: dict[str, Any] = {
        "@odata.context": f"{call.base}{API}/$metadata#{entity_set}",
        "value": [_select(r, params.get("$select"), id_col) for r in chunk],
    }
    if offset + size < len(rows):
        page = offset // size + 2
        cookie = f'<cookie pagenumber="{page}" pagingcookie="{offset + size}" istracking="False" />'
        kept = "&".join(f"{k}={quote(v, safe=',$()=:')}" for k, v in params.items() if k != "$skiptoken")
        body["@odata.nextLink"] = (f"{call.base}{API}/{entity_set}?{kept}{'&' if kept else ''}"
                                   f"$skiptoken={quote(cookie, safe='')}")
    out_headers = {"Preference-Applied": f"odata.maxpagesize={size}"} if m else {}
    return Answer(200, body, out_headers)


def _order(rows: list[dict[str, Any]], orderby: str | None) -> list[dict[str, Any]]:
    if not orderby:
        return rows
    for part in reversed([p.strip() for p in orderby.split(",") if p.strip()]):
        name, _, direction = part.partition(" ")

        def key(row: dict[str, Any], n: str = name) -> tuple[bool, Any]:
            value = row.get(n)
            return (value is None, _norm(value) if value is not None else 0)

        rows.sort(key=key, reverse=direction.strip().lower() == "desc")
    return rows


def _systemusers(call: Call, method: str, key: str | None, params: dict[str, str],
                 headers: dict[str, str]) -> Answer:
    if method != "GET":
        raise DataverseError(405, "0x80060888", f"The HTTP method '{method}' is not allowed on systemusers.")
    rows = [{k: v for k, v in u.items() if not k.startswith("_")} for u in call.env.users.values()]
    if key is not None:
        kind, value = _parse_key(key)
        row = next((r for r in rows if r["systemuserid"] == value), None) if kind == "id" else None
        if row is None:
            raise DataverseError(404, "0x80040217", f"systemuser With Id = {value} Does Not Exist")
        return Answer(200, {"@odata.context": f"{call.base}{API}/$metadata#systemusers/$entity",
                            **_select(row, params.get("$select"), "systemuserid")})
    cols = set(rows[0]) if rows else {"systemuserid"}
    if "$filter" in params:
        pred = parse_filter(params["$filter"], cols)
        rows = [r for r in rows if pred(r)]
    rows = _order(rows, params.get("$orderby") or "fullname")
    return _page(rows, call, "systemusers", params, headers, "systemuserid")


def _opportunities(store: DynamicsStore, call: Call, method: str, key: str | None, params: dict[str, str],
                   headers: dict[str, str], body: bytes) -> Answer:
    env = call.env
    if method == "GET" and key is None:
        rows = [dict(r) for r in env.opportunities.values()]
        cols = set(OPPORTUNITY_COLUMNS) | READ_ONLY
        if "$filter" in params:
            pred = parse_filter(params["$filter"], cols)
            rows = [r for r in rows if pred(r)]
        rows = _order(rows, params.get("$orderby") or "opportunityid")
        return _page(rows, call, "opportunities", params, headers, "opportunityid")
    if method == "GET":
        row = _find(env, key or "")
        if row is None:
            raise DataverseError(404, "0x80040217", f"opportunity With Id = {key} Does Not Exist")
        return Answer(200, {"@odata.context": f"{call.base}{API}/$metadata#opportunities/$entity",
                            **_select(row, params.get("$select"), "opportunityid")})
    data = _json_body(body)
    if method == "POST" and key is None:
        row, _ = _upsert(store, call, None, data, create_only=True)
        return _written(call, row, True, headers, params)
    if method == "PATCH" and key is not None:
        kind, value = _parse_key(key)
        if_match = headers.get("if-match")
        if_none = headers.get("if-none-match")
        exists = _find(env, key) is not None
        if if_match == "*" and not exists:
            raise DataverseError(404, "0x80040217", f"opportunity With Id = {value} Does Not Exist")
        if if_none == "*" and exists:
            raise DataverseError(412, "0x80040237", "A record with matching key values already exists.")
        if kind != "id" and not exists:
            # Stricter than the documented tolerance on a single PATCH, on purpose: the same guidance
            # ("don't include the alternate key data in the body") and the bulk answer above.
            _key_in_body_on_create(env, (kind, value), data)
        row, created = _upsert(store, call, (kind, value), data)
        return _written(call, row, created, headers, params)
    if method == "DELETE" and key is not None:
        row = _find(env, key)
        if row is None:
            raise DataverseError(404, "0x80040217", f"opportunity With Id = {key} Does Not Exist")
        env.opportunities.pop(row["opportunityid"], None)
        if row.get("crb_idempotencykey"):
            env.by_key.pop(row["crb_idempotencykey"], None)
        return Answer(204)
    raise DataverseError(405, "0x80060888", f"The HTTP method '{method}' is not allowed here.")


def _written(call: Call, row: dict[str, Any], created: bool, headers: dict[str, str],
             params: dict[str, str]) -> Answer:
    entity_id = f"{call.base}{API}/opportunities({row['opportunityid']})"
    hdrs = {"OData-EntityId": entity_id, "Location": entity_id}
    if "return=representation" in headers.get("prefer", ""):
        body = {"@odata.context": f"{call.base}{API}/$metadata#opportunities/$entity",
                **_select(row, params.get("$select"), "opportunityid")}
        return Answer(201 if created else 200, body, hdrs)
    return Answer(204, None, hdrs)


def _find(env: Environment, key: str) -> dict[str, Any] | None:
    kind, value = _parse_key(key)
    if kind == "id":
        return env.opportunities.get(value)
    if kind != "crb_idempotencykey":
        raise DataverseError(400, "0x80060888",
                             f"The key '{kind}' is not an alternate key of entity 'opportunity'.")
    oid = env.by_key.get(value)
    return env.opportunities.get(oid) if oid else None


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError as exc:
        raise DataverseError(400, "0x80060891", f"Invalid JSON. {exc}") from exc
    if not isinstance(data, dict):
        raise DataverseError(400, "0x80060891", "Invalid JSON. An object was expected.")
    return data


def _validate(env: Environment, data: dict[str, Any]) -> dict[str, Any]:
    """The column changes a body asks for, or the error Dataverse would give."""
    changes: dict[str, Any] = {}
    for k, v in data.items():
        if k in {"@odata.type", "@odata.id", "@odata.etag"}:
            continue
        if k == "ownerid@odata.bind":
            m = re.match(r"^/?systemusers\(([0-9a-fA-F-]{36})\)$", str(v))
            if not m or m.group(1).lower() not in env.users:
                raise DataverseError(400, "0x80040217", f"systemuser With Id = {v} Does Not Exist")
            changes["_ownerid_value"] = m.group(1).lower()
            continue
        if k not in OPPORTUNITY_COLUMNS:
            raise DataverseError(
                400, "0x80060888",
                f"The property '{k}' does not exist on type 'Microsoft.Dynamics.CRM.opportunity'. Make sure to "
                "only use property names that are defined by the type.")
        if k == "name" and v is not None and len(str(v)) > 300:
            raise DataverseError(
                400, "0x80044331",
                "A validation error occurred. The length of the 'name' attribute of the 'opportunity' entity "
                "exceeded the maximum allowed length of '300'.")
        if k == "salesstage" and v is not None and v not in (0, 1, 2, 3):
            raise DataverseError(400, "0x8004431a",
                                 f"A validation error occurred. The value {v} of 'salesstage' on record of type "
                                 "'opportunity' is outside the valid range.")
        if k == "estimatedvalue" and v is not None and not isinstance(v, int | float):
            raise DataverseError(400, "0x80060888", f"Cannot convert the literal '{v}' to the expected type "
                                 "'Edm.Decimal'.")
        if k == "estimatedclosedate" and v is not None:
            try:
                date.fromisoformat(str(v)[:10])
            except ValueError as exc:
                raise DataverseError(400, "0x80060888", f"Cannot convert the literal '{v}' to the expected "
                                     "type 'Edm.Date'.") from exc
        changes[k] = v
    return changes


def _upsert(store: DynamicsStore, call: Call, key: tuple[str, str] | None, data: dict[str, Any], *,
            create_only: bool = False, undo: list[tuple[str, dict[str, Any] | None]] | None = None,
            ) -> tuple[dict[str, Any], bool]:
    """Create or update one opportunity. ``undo`` collects (id, previous row) so a transaction can roll
    back only what it touched."""
    env = call.env
    changes = _validate(env, data)
    row: dict[str, Any] | None = None
    if key is not None:
        kind, value = key
        if kind == "id":
            row = env.opportunities.get(value)
            new_id = value
        elif kind == "crb_idempotencykey":
            oid = env.by_key.get(value)
            row = env.opportunities.get(oid) if oid else None
            changes["crb_idempotencykey"] = value
            new_id = str(uuid.uuid4())
        else:
            raise DataverseError(400, "0x80060888",
                                 f"The key '{kind}' is not an alternate key of entity 'opportunity'.")
    else:
        new_id = str(changes.pop("opportunityid", None) or uuid.uuid4()).lower()
        if new_id in env.opportunities:
            raise DataverseError(400, "0x80040237", "Cannot insert duplicate key.")
    ck = changes.get("crb_idempotencykey")
    if ck is not None and env.by_key.get(ck) not in (None, row["opportunityid"] if row else None):
        raise DataverseError(412, "0x80040237", "A record with matching key values already exists.")
    actor, caller = call.actor["systemuserid"], call.caller["systemuserid"]
    on_behalf = caller if actor != caller else None
    created = row is None
    if undo is not None:
        undo.append((row["opportunityid"] if row else new_id, dict(row) if row else None))
    if row is None:
        if create_only is False and key is None:
            raise DataverseError(404, "0x80040217", "opportunity Does Not Exist")
        row = store._new_row(env, new_id, changes.pop("_ownerid_value", actor), actor, on_behalf)
        env.opportunities[new_id] = row
    else:
        env.version += 1
        row.update(modifiedon=_odata_dt(store.now_dt()), _modifiedby_value=actor,
                   _modifiedonbehalfby_value=on_behalf, versionnumber=env.version)
    row.update(changes)
    if row.get("crb_idempotencykey"):
        env.by_key[row["crb_idempotencykey"]] = row["opportunityid"]
    return row, created


def _key_in_body_on_create(env: Environment, key: tuple[str, str], data: dict[str, Any]) -> None:
    """Refuse an alternate-key value repeated in the body of an upsert that would create the record.

    powerapps-docs use-upsert-insert-update-record.md: "don't include the alternate key data in the portion of
    the request that represents the data to save". Real answer on the create path (request and response in
    microsoft/PowerPlatform-DataverseClient-Python#127): 400 {"error":{"code":"0x80040216","message":"An
    unexpected error occurred."}}; the update path tolerates the repeated value."""
    kind, value = key
    if kind == "id" or kind not in data:
        return
    if env.by_key.get(value) is None:
        raise DataverseError(400, "0x80040216", "An unexpected error occurred.")


def _bulk(store: DynamicsStore, call: Call, action: str, body: bytes) -> Answer:
    name = action.removeprefix("Microsoft.Dynamics.CRM.")
    if name not in {"CreateMultiple", "UpdateMultiple", "UpsertMultiple"}:
        raise DataverseError(404, "0x8006088a", f"Resource not found for the segment '{action}'.")
    if name in call.env.unsupported_messages:
        # The table has no sdkmessagefilter for this message (bulk-operations.md: "Not all standard tables
        # support these messages"): Dataverse's SdkEntityDoesNotSupportMessage fault, HTTP 400.
        raise DataverseError(400, "0x80040800",
                             f"The '{name}' method does not support entities of type 'opportunity'. "
                             "MessageProcessorCache returned MessageProcessor.Empty.")
    data = _json_body(body)
    targets = data.get("Targets")
    if not isinstance(targets, list) or not targets:
        raise DataverseError(400, "0x80040203", f"'Targets' should be one of the parameters for {name}.")
    if len(targets) > MAX_BATCH:
        raise DataverseError(
            400, "0x80040203",
            f"The number of records in Targets ({len(targets)}) exceeds the maximum of {MAX_BATCH} this "
            f"environment accepts in one {name} request. Send fewer records per request.")
    env = call.env
    plan: list[tuple[tuple[str, str] | None, dict[str, Any]]] = []
    seen: set[tuple[str, str]] = set()
    for t in targets:
        if not isinstance(t, dict) or t.get("@odata.type") not in {"Microsoft.Dynamics.CRM.opportunity",
                                                                    "#Microsoft.Dynamics.CRM.opportunity"}:
            raise DataverseError(400, "0x80040203",
                                 "The @odata.type property must be set on every item of Targets "
                                 "(Microsoft.Dynamics.CRM.opportunity).")
        key: tuple[str, str] | None = None
        if t.get("@odata.id"):
            m = _SEGMENT.match(str(t["@odata.id"]).split(API + "/")[-1])
            if not m or m.group("set") != "opportunities" or not m.group("key"):
                raise DataverseError(400, "0x80060888", f"Invalid @odata.id '{t['@odata.id']}'.")
            key = _parse_key(m.group("key"))
        elif t.get("opportunityid"):
            key = ("id", str(t["opportunityid"]).lower())
        if name == "UpdateMultiple" and key is None:
            raise DataverseError(400, "0x80040203", "UpdateMultiple needs the primary key of every target.")
        if key is not None:
            if key in seen:
                raise DataverseError(400, "0x80040237",
                                     f"Targets contains more than one record with the key {key[1]}.")
            seen.add(key)
        if key is not None and name == "UpsertMultiple":
            _key_in_body_on_create(env, key, t)
        _validate(env, {k: v for k, v in t.items() if k != "opportunityid"})
        if name == "UpdateMultiple" and key is not None and key[0] == "id" and key[1] not in env.opportunities:
            raise DataverseError(404, "0x80040217", f"opportunity With Ids = {key[1]} Do Not Exist")
        plan.append((key, t))
    # All checks passed: apply (a standard table's bulk message is one transaction).
    undo: list[tuple[str, dict[str, Any] | None]] = []
    results: list[dict[str, Any]] = []
    try:
        for key, t in plan:
            data_t = {k: v for k, v in t.items() if k not in {"@odata.type", "@odata.id"}}
            if key is None or name == "CreateMultiple":
                row, created = _upsert(store, call, None, data_t, create_only=True, undo=undo)
            else:
                data_t.pop("opportunityid", None)
                row, created = _upsert(store, call, key, data_t, undo=undo)
            results.append({"RecordCreated": created, "Target": {
                "@odata.type": "#Microsoft.Dynamics.CRM.opportunity", "opportunityid": row["opportunityid"]}})
    except DataverseError:
        _roll_back(env, undo)
        raise
    if name == "CreateMultiple":
        return Answer(200, {"@odata.context": f"{call.base}{API}/$metadata#Microsoft.Dynamics.CRM."
                            "CreateMultipleResponse", "Ids": [r["Target"]["opportunityid"] for r in results]})
    if name == "UpdateMultiple":
        return Answer(204)
    # Microsoft Learn, UpsertMultiple Action: "The UpsertMultiple action returns 204 NoContent. The
    # UpsertMultipleResponse complex type is not returned." (PowerApps-Samples' Web API UpsertMultiple sample
    # reads no body either.)
    return Answer(204)


def _roll_back(env: Environment, undo: list[tuple[str, dict[str, Any] | None]]) -> None:
    for oid, previous in reversed(undo):
        current = env.opportunities.get(oid)
        if current is not None and current.get("crb_idempotencykey"):
            env.by_key.pop(current["crb_idempotencykey"], None)
        if previous is None:
            env.opportunities.pop(oid, None)
        else:
            env.opportunities[oid] = previous
            if previous.get("crb_idempotencykey"):
                env.by_key[previous["crb_idempotencykey"]] = oid


# ------------------------------------------------------------------------------ $batch
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def _split_head(block: bytes) -> tuple[bytes, bytes]:
    """(headers, rest) at the first blank line, whether lines end in CRLF or a bare LF (Microsoft's own
    $batch examples in execute-batch-operations-using-web-api.md are LF-only)."""
    m = _BLANK_LINE.search(block)
    if m is None:
        return block, b""
    return block[: m.start()], block[m.end():]


def _first_line(block: bytes) -> tuple[bytes, bytes]:
    line, _, rest = block.partition(b"\n")
    return line.rstrip(b"\r"), rest


def _split_parts(data: bytes, boundary: str) -> list[bytes]:
    delim = b"--" + boundary.encode()
    parts: list[bytes] = []
    for chunk in data.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        parts.append(chunk.lstrip(b"\r\n"))
    return parts


def _head(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.decode("latin-1").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _boundary(ctype: str) -> str | None:
    for piece in ctype.split(";"):
        name, _, value = piece.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"')
    return None


@dataclass
class _Op:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    content_id: str | None


def _parse_op(part: bytes) -> _Op:
    head, rest = _split_head(part)
    outer = _head(head)
    line, after = _first_line(rest)
    pieces = line.decode("latin-1").split(" ")
    if len(pieces) < 2:
        raise DataverseError(400, "0x0", "The batch request part has no HTTP request line.")
    inner_head, body = _split_head(after)
    return _Op(pieces[0].upper(), pieces[1], _head(inner_head), body.rstrip(b"\r\n"), outer.get("content-id"))


def _http_part(answer: Answer, content_id: str | None) -> str:
    reasons = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
               404: "Not Found", 405: "Method Not Allowed", 412: "Precondition Failed", 429: "Too Many Requests"}
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"HTTP/1.1 {answer.status} {reasons.get(answer.status, 'Unknown')}", "OData-Version: 4.0"]
    raw = answer.raw()
    if raw:
        lines.append("Content-Type: application/json; odata.metadata=minimal")
    lines += [f"{k}: {v}" for k, v in answer.headers.items()]
    lines += ["", raw.decode()]
    return "\r\n".join(lines)


def run_batch(store: DynamicsStore, call: Call, body: bytes, ctype: str, prefer: str,
              resolve_actor: Callable[[Call, dict[str, str]], Call],
              outer_headers: dict[str, str] | None = None) -> Response:
    """Run a ``$batch``: parts in order, change sets atomically, stop at the first failure unless the
    request asked ``Prefer: odata.continue-on-error``. Impersonation headers on a part apply to that part;
    the outer request's apply to parts without their own."""
    inherited = {k: v for k, v in (outer_headers or {}).items() if k in {"callerobjectid", "mscrmcallerid"}}
    boundary = _boundary(ctype)
    if not ctype.lower().startswith("multipart/mixed") or not boundary:
        raise DataverseError(400, "0x0", "The content type of a batch request must be multipart/mixed with a "
                             "boundary.")
    parts = _split_parts(body, boundary)
    plan: list[tuple[str, Any]] = []  # ("op", _Op) | ("changeset", [_Op])
    total = 0
    for part in parts:
        head, rest = _split_head(part)
        inner = _boundary(_head(head).get("content-type", ""))
        if inner:
            ops = [_parse_op(p) for p in _split_parts(rest, inner)]
            total += len(ops)
            plan.append(("changeset", ops))
        else:
            total += 1
            plan.append(("op", _parse_op(part)))
    if total > MAX_BATCH:
        raise DataverseError(
            400, "0x0",
            "The current batch message contains too many parts. Only batch messages with a maximum number of "
            f"'{MAX_BATCH}' query operations, including changeset operations, are allowed.")
    keep_going = "odata.continue-on-error" in prefer
    out_boundary = f"batchresponse_{uuid.uuid4()}"
    chunks: list[str] = []

    def run(op: _Op) -> Answer:
        path = urlsplit(op.url).path if "://" in op.url else op.url.split("?")[0]
        query = urlsplit(op.url).query if "?" in op.url else ""
        rel = path.split(API + "/", 1)[-1] if API + "/" in path else path.lstrip("/")
        try:
            own = {"callerobjectid", "mscrmcallerid"} & set(op.headers)
            if own and call.env.batch_part_impersonation == "ignored":
                # MicrosoftDocs/dynamics-365-customer-engagement#531: a caller header on a part is accepted
                # and ignored; the part runs as the outer request's caller.
                own = set()
                op_headers = {k: v for k, v in op.headers.items() if k not in {"callerobjectid", "mscrmcallerid"}}
            else:
                op_headers = op.headers
            sub = resolve_actor(call, op_headers if own else {**op_headers, **inherited})
            return dispatch(store, sub, op.method, rel, query, op.headers, op.body)
        except DataverseError as exc:
            return Answer(exc.status, {"error": {"code": exc.code, "message": exc.message}})

    for kind, item in plan:
        if kind == "op":
            answer = run(item)
            chunks.append(_http_part(answer, item.content_id))
            if answer.status >= 400 and not keep_going:
                break
            continue
        snapshot = ({k: dict(v) for k, v in call.env.opportunities.items()}, dict(call.env.by_key))
        answers = []
        failed: Answer | None = None
        for op in item:
            a = run(op)
            if a.status >= 400:
                failed = a
                break
            answers.append((a, op.content_id))
        if failed is not None:
            call.env.opportunities, call.env.by_key = snapshot
            chunks.append(_http_part(failed, None))
            if not keep_going:
                break
            continue
        cs = f"changesetresponse_{uuid.uuid4()}"
        inner = "\r\n".join(f"--{cs}\r\n{_http_part(a, cid)}" for a, cid in answers) + f"\r\n--{cs}--"
        chunks.append(f"Content-Type: multipart/mixed; boundary={cs}\r\n\r\n{inner}")
    payload = "".join(f"--{out_boundary}\r\n{c}\r\n" for c in chunks) + f"--{out_boundary}--\r\n"
    return Response(payload.encode(), status_code=200,
                    media_type=f"multipart/mixed; boundary={out_boundary}",
                    headers={"OData-Version": "4.0"})


# ------------------------------------------------------------------------------ routes
def routes(state: Any) -> list[BaseRoute]:
    """The Dynamics routes over ``state`` (a sandbox.state.SandboxState)."""

    def build(st: Any) -> None:
        st.vendors["dynamics"] = DynamicsStore(st.section("dynamics"), getattr(st, "seed", 0))

    build(state)
    state.on_reset(build)
    state.add_inspector("dynamics", lambda key: store().inspect(key))

    def store() -> DynamicsStore:
        s: DynamicsStore = state.vendors["dynamics"]
        return s

    # -- Entra ------------------------------------------------------------------------------
    async def token(request: Request) -> Response:
        st = store()
        tenant = request.path_params["tenant"]
        form = await request.form()
        apps = st.directories.get(tenant)
        if apps is None:
            return _entra_error(400, "invalid_request", 90002,
                                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                                "and are signing into the correct cloud.")
        if form.get("grant_type") != "client_credentials":
            return _entra_error(400, "unsupported_grant_type", 70003,
                                "The app requested an unsupported grant type.")
        client_id = str(form.get("client_id") or "")
        reg = apps.get(client_id)
        if reg is None:
            return _entra_error(400, "unauthorized_client", 700016,
                                f"Application with identifier '{client_id}' was not found in the directory "
                                f"'{tenant}'.")
        if not secrets.compare_digest(str(form.get("client_secret") or ""), reg.secret):
            return _entra_error(401, "invalid_client", 7000215,
                                "Invalid client secret provided. Ensure the secret being sent in the request is "
                                f"the client secret value, not the client secret ID, for a secret added to app "
                                f"'{client_id}'.")
        if reg.secret_expires is not None and st.now_dt() >= reg.secret_expires:
            return _entra_error(401, "invalid_client", 7000222,
                                f"The provided client secret keys for app '{client_id}' are expired.")
        scope = str(form.get("scope") or "")
        if not scope.endswith("/.default"):
            return _entra_error(400, "invalid_scope", 1002012,
                                f"The provided value for scope {scope} is not valid. Client credential flows "
                                "must have a scope value with /.default suffixed to the resource identifier.")
        resource = scope[: -len("/.default")].rstrip("/")
        if resource == GRAPH_RESOURCE or resource.endswith("/graph"):
            return JSONResponse({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                                 "access_token": st.issue(tenant, client_id, "graph", 3599, 0)})
        env_key = resource.rsplit("/dynamics/", 1)[-1] if "/dynamics/" in resource else None
        env = st.environments.get(env_key or "")
        if env is None or env.directory != tenant:
            return _entra_error(400, "invalid_resource", 500011,
                                f"The resource principal named {resource} was not found in the tenant named "
                                f"{tenant}. This can happen if the application has not been installed by the "
                                "administrator of the tenant.")
        access = st.issue(tenant, client_id, env.key, env.token_lifetime_s, state.epoch(env.key))
        return JSONResponse({"token_type": "Bearer", "expires_in": env.token_lifetime_s,
                             "ext_expires_in": env.token_lifetime_s, "access_token": access})

    def bearer(request: Request) -> tuple[str, Token | None]:
        auth = request.headers.get("authorization", "")
        raw = auth[7:] if auth.lower().startswith("bearer ") else ""
        return raw, store().tokens.get(raw)

    # -- Graph ------------------------------------------------------------------------------
    async def subscribed_skus(request: Request) -> Response:
        st = store()
        _, tok = bearer(request)
        if tok is None or tok.audience != "graph" or st.now() >= tok.expires_at:
            return JSONResponse({"error": {"code": "InvalidAuthenticationToken",
                                           "message": "Access token is empty or invalid."}}, status_code=401)
        reg = st.directories.get(tok.directory, {}).get(tok.client_id)
        if reg is None or "Organization.Read.All" not in reg.graph_roles:
            return JSONResponse({"error": {"code": "Authorization_RequestDenied",
                                           "message": "Insufficient privileges to complete the operation."}},
                                status_code=403)
        skus = []
        for env in st.environments.values():
            if env.directory != tok.directory:
                continue
            for lic in env.licenses:
                skus.append({
                    "capabilityStatus": lic.get("status", "Enabled"),
                    "consumedUnits": int(lic.get("consumed", 0)),
                    "skuId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sku:{lic.get('sku')}")),
                    "skuPartNumber": lic.get("sku"),
                    "appliesTo": "User",
                    "prepaidUnits": {"enabled": int(lic.get("enabled", 0)), "suspended": 0, "warning": 0,
                                     "lockedOut": 0},
                })
        return JSONResponse({"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscribedSkus",
                             "value": skus})

    # -- Web API ----------------------------------------------------------------------------
    def resolve_actor(call: Call, headers: dict[str, str]) -> Call:
        env = call.env
        oid = headers.get("callerobjectid")
        uid = headers.get("mscrmcallerid")
        if not oid and not uid:
            return Call(call.env, call.caller, call.caller, call.base)
        if not call.caller.get("_delegate"):
            raise DataverseError(
                403, "0x80040220",
                f"Principal user (Id={call.caller['systemuserid']}, type=8, roleCount=1, privilegeCount=512), is "
                "missing prvActOnBehalfOfAnotherUser privilege (Id=5a36bb53-2b1c-4d1d-a9f4-4c5c4c0c2b8e) on "
                "OTC=undefined for entity 'systemuser'.")
        if oid:
            actor = next((u for u in env.users.values()
                          if str(u.get("azureactivedirectoryobjectid")).lower() == oid.lower()), None)
            missing = f"systemuser With azureactivedirectoryobjectid = {oid} Does Not Exist"
        else:
            actor = env.users.get(uid.lower() if uid else "")
            missing = f"systemuser With Id = {uid} Does Not Exist"
        if actor is None:
            raise DataverseError(404, "0x80040217", missing)
        if actor.get("isdisabled"):
            raise DataverseError(400, "0x8004700c",
                                 f"The user with SystemUserId={actor['systemuserid']} is disabled. Disabled users "
                                 "cannot be impersonated.")
        return Call(call.env, call.caller, actor, call.base)

    def usage_headers(env: Environment, caller: str) -> dict[str, str]:
        q = env.counted.get(caller) or deque()
        return {"x-ms-ratelimit-burst-remaining-xrm-requests": str(max(0, env.requests - len(q))),
                "x-ms-ratelimit-time-remaining-xrm-requests": "1,200.00"}

    async def webapi(request: Request) -> Response:
        st = store()
        env = st.environments.get(request.path_params["env"])
        if env is None:
            return Response(b"", status_code=404)
        raw, tok = bearer(request)
        challenge = {"WWW-Authenticate": f'Bearer authorization_uri=https://login.microsoftonline.com/'
                                         f'{env.directory}/oauth2/authorize, resource_id={request.base_url}'}
        if tok is None or tok.audience != env.key:
            return Response(b"", status_code=401, headers=challenge)
        if st.now() >= tok.expires_at or tok.epoch < state.epoch(env.key):
            return Response(b"", status_code=401, headers={
                **challenge, "WWW-Authenticate": challenge["WWW-Authenticate"] + ', error="invalid_token", '
                'error_description="The access token expired"'})
        caller = env.app_user(tok.client_id)
        if caller is None or caller.get("isdisabled"):
            return DataverseError(
                403, "0x80072560",
                f"The user is not a member of the organization. (application {tok.client_id} has no application "
                "user in this environment)").response()
        uid = caller["systemuserid"]
        # Service protection: count this request (a $batch or bulk message is one request).
        now = st.now()
        window = env.counted.setdefault(uid, deque())
        while window and now - window[0] >= env.window_s:
            window.popleft()
        faults = state.faults(env.key)
        if faults.quota_exhausted or len(window) >= env.requests:
            env.throttled += 1
            retry = max(1, int(env.window_s - (now - window[0])) + 1) if window and not faults.quota_exhausted \
                else int(env.window_s)
            return DataverseError(
                429, "0x80072322",
                f"Number of requests exceeded the limit of {env.requests} over time window of "
                f"{int(env.window_s)} seconds.",
                {"Retry-After": str(retry), **usage_headers(env, uid)}).response()
        if env.in_flight.get(uid, 0) >= env.concurrent:
            env.throttled += 1
            return DataverseError(429, "0x80072326",
                                  f"Number of concurrent requests exceeded the limit of {env.concurrent}.",
                                  {"Retry-After": "1"}).response()
        window.append(now)
        env.in_flight[uid] = env.in_flight.get(uid, 0) + 1
        try:
            injected = await state.before_call(env.key)
            if injected:
                return DataverseError(injected, "0x80040216",
                                      "An unexpected error occurred (injected by the sandbox).").response()
            rest = request.path_params["rest"]
            base = str(request.base_url).rstrip("/") + f"/dynamics/{env.key}"
            headers = {k.lower(): v for k, v in request.headers.items()}
            body = await request.body()
            call = Call(env, caller, caller, base, headers.get("prefer", ""))
            try:
                if rest == "$batch" and request.method == "POST":
                    await state.batch_gate(env.key)
                    resp = run_batch(st, call, body, headers.get("content-type", ""), headers.get("prefer", ""),
                                     resolve_actor, headers)
                    resp.headers.update(usage_headers(env, uid))
                    return resp
                call = resolve_actor(call, headers)
                if "Multiple" in rest:
                    await state.batch_gate(env.key)
                answer = dispatch(st, call, request.method, rest, request.url.query, headers, body)
            except DataverseError as exc:
                resp = exc.response()
                resp.headers.update(usage_headers(env, uid))
                return resp
            out = {"OData-Version": "4.0", **answer.headers, **usage_headers(env, uid)}
            if answer.body is None:
                return Response(b"", status_code=answer.status, headers=out)
            return Response(answer.raw(), status_code=answer.status, headers=out,
                            media_type="application/json; odata.metadata=minimal")
        finally:
            env.in_flight[uid] -= 1

    async def root(request: Request) -> Response:
        if request.path_params["env"] not in store().environments:
            return Response(b"", status_code=404)
        return Response(b"", status_code=401, headers={"WWW-Authenticate": "Bearer"})

    # -- sandbox admin ----------------------------------------------------------------------
    async def limits(request: Request) -> Response:
        env = store().environments.get(request.path_params["env"])
        if env is None:
            return JSONResponse({"error": "unknown environment"}, status_code=404)
        body = await request.json() if await request.body() else {}
        for name in ("requests", "window_s", "concurrent"):
            if name in body:
                setattr(env, name, type(getattr(env, name))(body[name]))
        if body.get("clear"):
            env.counted.clear()
        return JSONResponse({"requests": env.requests, "window_s": env.window_s, "concurrent": env.concurrent})

    async def behaviour(request: Request) -> Response:
        env = store().environments.get(request.path_params["env"])
        if env is None:
            return JSONResponse({"error": "unknown environment"}, status_code=404)
        body = await request.json() if await request.body() else {}
        if "unsupported_messages" in body:
            env.unsupported_messages = {str(m) for m in body["unsupported_messages"] or ()}
        if "batch_part_impersonation" in body:
            mode = str(body["batch_part_impersonation"])
            if mode not in {"honoured", "ignored"}:
                return JSONResponse({"error": "batch_part_impersonation is 'honoured' or 'ignored'"},
                                    status_code=400)
            env.batch_part_impersonation = mode
        return JSONResponse({"unsupported_messages": sorted(env.unsupported_messages),
                             "batch_part_impersonation": env.batch_part_impersonation})

    async def advance(request: Request) -> Response:
        body = await request.json() if await request.body() else {}
        store().offset += float(body.get("seconds", 0))
        return JSONResponse({"offset": store().offset})

    return [
        Route("/entra/{tenant}/oauth2/v2.0/token", token, methods=["POST"]),
        Route("/graph/v1.0/subscribedSkus", subscribed_skus),
        Route("/dynamics/{env}/api/data/v9.2/", root),
        Route("/dynamics/{env}/api/data/v9.2/{rest:path}", webapi, methods=["GET", "POST", "PATCH", "DELETE"]),
        Route("/_sandbox/dynamics/{env}/limits", limits, methods=["POST"]),
        Route("/_sandbox/dynamics/{env}/advance", advance, methods=["POST"]),
        Route("/_sandbox/dynamics/{env}/behaviour", behaviour, methods=["POST"]),
    ]
