"""Microsoft Dynamics 365 / Dataverse over the Web API (OData v4, ``/api/data/v9.2``) with httpx.

Authentication is an Entra ID v2.0 client-credentials token for an *application user* (a server-to-server
user that needs no paid license). Every vendor answer is mapped to ``core.errors`` in ``error_for_response``.

Facts this class relies on (Microsoft Learn, checked 2026-11):

- Service protection (``developer/data-platform/api-limits``): per user, per web server, 5-minute sliding
  window: 6,000 requests and 1,200 s combined execution time; 52 concurrent requests. A ``$batch`` (up to
  1,000 operations) "will avoid the number of requests limit" and counts as one request; each bulk message
  (``CreateMultiple``/``UpdateMultiple``/``UpsertMultiple``) "counts as single request" toward the 6,000
  (``developer/data-platform/bulk-operations``, "How are API limits applied?"). The execution-time facet is
  what grows with batch size; the 24-hour entitlement counts every record inside either kind of batch.
  The Web API answers 429 with ``Retry-After`` in seconds, which we honour.
- Paging (``webapi/query/page-results``): ``Prefer: odata.maxpagesize`` up to 5,000; larger values are
  ignored (the service pages at 5,000); follow ``@odata.nextLink`` verbatim.
- Impersonation (``webapi/impersonate-another-user-web-api``): ``CallerObjectId`` (Entra object id,
  preferred) or ``MSCRMCallerID`` (systemuserid); ``createdby``/``modifiedby`` become the impersonated user
  and ``createdonbehalfby``/``modifiedonbehalfby`` the application user. The caller needs the Delegate role
  (``prvActOnBehalfOfAnotherUser``).
- Bulk messages on standard tables roll back as a whole on any error; Microsoft's advice is to fall back to
  ``$batch`` for that set, which is what ``push_opportunities`` does to get per-record results.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

import httpx

from core.clock import Clock, utcnow
from core.errors import (
    ApiDisabled,
    AuthenticationFailed,
    ConfigurationError,
    MalformedResponse,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    RecordError,
    SessionExpired,
)
from core.providers.base import (
    ApiUsage,
    ConnectionReport,
    CrmUser,
    LicenseSnapshot,
    Opportunity,
    OpportunityChange,
    ProviderBase,
    PushResult,
    StepResult,
)
from core.providers.config import (
    AccountConfig,
    AuthFailureCallback,
    Credential,
    CredentialUpdateCallback,
    HttpTransport,
    cred_or_setting,
    secret_value,
)

log = logging.getLogger(__name__)

API_PATH = "/api/data/v9.2"
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
DEFAULT_GRAPH = "https://graph.microsoft.com"
#: Service protection defaults per user per web server (Microsoft Learn, api-limits).
SERVICE_PROTECTION_REQUESTS = 6000
SERVICE_PROTECTION_WINDOW_S = 300
#: Dynamics 365 Sales opportunity ``salesstage`` choice values.
SALES_STAGES = {0: "Qualify", 1: "Develop", 2: "Propose", 3: "Close"}
_STAGE_VALUES = {v.lower(): k for k, v in SALES_STAGES.items()}
#: Microsoft 365 SKU part numbers that carry a Dynamics 365 Sales / CE seat (Graph ``subscribedSkus``).
DYNAMICS_SKU_PREFIXES = ("DYN365_", "D365_", "DYNAMICS_365_")
_OPP_SELECT = (
    "opportunityid,name,salesstage,estimatedvalue,estimatedclosedate,_ownerid_value,modifiedon,createdon,"
    "_createdby_value,_modifiedby_value,_createdonbehalfby_value,_modifiedonbehalfby_value"
)


@dataclass(frozen=True)
class DynamicsConfig:
    """The account's non-secret settings (from the catalog form) plus the client secret."""

    instance_url: str
    tenant_id: str
    client_id: str
    client_secret: str
    authority_url: str = DEFAULT_AUTHORITY
    graph_url: str = DEFAULT_GRAPH
    impersonation: bool = True
    idempotency_key_column: str = "crb_idempotencykey"

    @classmethod
    def from_account(cls, account: AccountConfig, credential: Credential) -> DynamicsConfig:
        """Build from the account (instance URL, settings) and the vault's fields (client secret).

        Raises: ConfigurationError naming the missing field.
        """

        def need(key: str, title: str) -> str:
            value = (cred_or_setting(credential, account, key) or "").strip()
            if not value:
                raise ConfigurationError(
                    f"The Dynamics 365 account has no {title}: edit the CRM account and fill it in."
                )
            return value

        imp = account.setting("impersonation", True)
        return cls(
            instance_url=account.base_url,
            tenant_id=need("tenant_id", "directory (tenant) ID"),
            client_id=need("client_id", "application (client) ID"),
            client_secret=secret_value(credential.get("client_secret")) or "",
            authority_url=str(account.setting("authority_url", DEFAULT_AUTHORITY)).rstrip("/"),
            graph_url=str(account.setting("graph_url", DEFAULT_GRAPH)).rstrip("/"),
            impersonation=imp if isinstance(imp, bool) else str(imp).lower() in {"1", "true", "yes", "on"},
            idempotency_key_column=str(account.setting("idempotency_key_column", "crb_idempotencykey")),
        )

    @property
    def api_base(self) -> str:
        return self.instance_url + API_PATH

    @property
    def scope(self) -> str:
        return self.instance_url + "/.default"


def parse_whoami(body: Mapping[str, Any]) -> dict[str, str]:
    """The three ids of a ``WhoAmI`` answer (``WhoAmIResponse`` complex type).

    Raises: MalformedResponse when a field is missing or not a GUID.
    """
    out: dict[str, str] = {}
    for key in ("UserId", "BusinessUnitId", "OrganizationId"):
        value = body.get(key)
        try:
            out[key] = str(uuid.UUID(str(value)))
        except (ValueError, TypeError) as exc:
            raise MalformedResponse(
                f"Dynamics 365 WhoAmI answered without a valid {key} ({value!r}): the environment URL may point "
                "at something that is not a Dataverse Web API — check it ends at the org root "
                "(https://ORG.crm.dynamics.com)."
            ) from exc
    return out


def odata_error(body: Any) -> tuple[str | None, str]:
    """(code, message) from a Web API error body ``{"error": {"code", "message"}}``."""
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        err = body["error"]
        return (str(err.get("code")) if err.get("code") is not None else None, str(err.get("message") or ""))
    return None, ""


def error_for_response(resp: httpx.Response, *, record_key: str | None = None) -> ProviderError:
    """Map one non-success Web API answer to the most specific ``core.errors`` class, naming the fix."""
    status = resp.status_code
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    code, message = odata_error(body)
    where = f" (HTTP {status}{', ' + code if code else ''})"
    if status == 429:
        return RateLimited(
            f"Dynamics 365 service protection limit reached{where}: {message or 'too many requests'}. "
            "Requests resume after the Retry-After delay; spread the sync over time or use more "
            "application users.",
            retry_after=_retry_after(resp),
            code=code or "429",
        )
    if status == 401:
        return SessionExpired(
            f"Dynamics 365 rejected the access token{where}: fetch a new token and retry.", code=code or "401"
        )
    if status >= 500:
        return ProviderUnavailable(
            f"Dynamics 365 answered a server error{where}: {message or resp.reason_phrase}. "
            "Retry later; if it persists check the Power Platform admin center service health.",
            code=code or str(status),
        )
    if code in {"0x80072560", "0x80072561"}:
        return ApiDisabled(
            f"The application user cannot use this environment{where}: {message}. In the Power Platform "
            "admin center, add the app registration as an application user of this environment and give it "
            "a security role.",
            code=code,
        )
    if code == "0x80040220" or (status == 403 and "prvActOnBehalfOfAnotherUser" in message):
        return ProviderRejected(
            f"Dynamics 365 refused the operation for lack of a privilege{where}: {message}. Give the "
            "application user a security role with that privilege (for impersonation: the Delegate role).",
            code=code or "403",
        )
    if status == 404 and code == "0x8006088a":
        return ProviderRejected(
            f"Dynamics 365 has no such Web API resource{where}: {message} Entity set names are plural "
            "and lowercase (accounts, opportunities); check the environment URL and API version (v9.2).",
            code=code,
        )
    if record_key is not None or status in {400, 404, 409, 412}:
        return RecordError(
            f"Dynamics 365 rejected the record{where}: {message or resp.reason_phrase}. Correct the record's "
            "values (or the column's requirements in the table) and sync again.",
            record_key=record_key,
            code=code or str(status),
        )
    return ProviderRejected(
        f"Dynamics 365 refused the request{where}: {message or resp.reason_phrase}. Check the application "
        "user's security role.",
        code=code or str(status),
    )


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _entra_error(resp: httpx.Response) -> ProviderError:
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if resp.status_code >= 500:
        return ProviderUnavailable(
            f"Microsoft Entra ID answered HTTP {resp.status_code} to the token request: retry later."
        )
    if not isinstance(body, Mapping) or "error" not in body:
        return MalformedResponse(
            f"The token endpoint answered HTTP {resp.status_code} without an OAuth error body: check the "
            "authority URL (https://login.microsoftonline.com) and the directory (tenant) ID."
        )
    error = str(body.get("error"))
    desc = str(body.get("error_description") or "").splitlines()[0] if body.get("error_description") else ""
    aadsts = desc.split(":", 1)[0] if desc.startswith("AADSTS") else error
    fixes = {
        "AADSTS7000215": "the client secret is wrong — paste the secret's Value (not its ID) from "
        "Entra ID > App registrations > Certificates & secrets",
        "AADSTS7000222": "the client secret has expired — create a new secret in Entra ID and update it here",
        "AADSTS700016": "no app registration with this client ID exists in the directory — check the "
        "Application (client) ID and the directory (tenant) ID",
        "AADSTS90002": "the directory (tenant) ID is unknown — copy it from Entra ID > Overview",
        "AADSTS500011": "the environment URL is not a Dataverse environment of this directory — check the URL",
        "AADSTS50034": "the account does not exist in the directory",
    }
    fix = fixes.get(aadsts, "check the client ID, secret and directory (tenant) ID of the app registration")
    return AuthenticationFailed(f"Microsoft Entra ID refused the client credentials ({aadsts}): {fix}.", code=aadsts)


def _parse_dt(value: Any) -> datetime | None:
    if not value:
        return None
    text = str(value)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise MalformedResponse(f"Dynamics 365 sent an unreadable date-time {value!r}.") from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _parse_date(value: Any) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError as exc:
        raise MalformedResponse(f"Dynamics 365 sent an unreadable date {value!r}.") from exc


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_literal(value: str) -> str:
    """An OData string literal for a key segment (single quotes doubled, then URL-escaped)."""
    return quote("'" + value.replace("'", "''") + "'", safe="'=")


def opportunity_from_row(row: Mapping[str, Any], key_column: str = "crb_idempotencykey") -> Opportunity:
    try:
        crm_id = str(row["opportunityid"])
        modified = _parse_dt(row.get("modifiedon")) or _parse_dt(row.get("createdon"))
    except KeyError as exc:
        raise MalformedResponse("Dynamics 365 returned an opportunity without opportunityid.") from exc
    if modified is None:
        raise MalformedResponse(f"Dynamics 365 returned opportunity {crm_id} without modifiedon.")
    amount_raw = row.get("estimatedvalue")
    try:
        amount = Decimal(str(amount_raw)) if amount_raw is not None else None
    except InvalidOperation as exc:
        raise MalformedResponse(f"Dynamics 365 sent an unreadable amount {amount_raw!r}.") from exc
    stage_raw = row.get("salesstage")
    stage = SALES_STAGES.get(stage_raw, str(stage_raw)) if stage_raw is not None else None
    return Opportunity(
        crm_id=crm_id,
        name=str(row.get("name") or ""),
        stage=stage,
        amount=amount,
        close_date=_parse_date(row.get("estimatedclosedate")),
        owner_id=row.get("_ownerid_value"),
        modified_at=modified,
        external_key=row.get(key_column),
        raw=dict(row),
    )


def row_from_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Our neutral opportunity fields → Dataverse columns. Unknown keys pass through as column names."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "name":
            out["name"] = value
        elif key == "stage":
            if value is None:
                out["salesstage"] = None
            elif isinstance(value, int):
                out["salesstage"] = value
            else:
                stage = _STAGE_VALUES.get(str(value).lower())
                if stage is None:
                    raise RecordError(
                        f"Stage {value!r} is not a Dynamics 365 sales stage "
                        f"({', '.join(SALES_STAGES.values())}): map the stage before syncing.",
                        code="stage",
                    )
                out["salesstage"] = stage
        elif key == "amount":
            out["estimatedvalue"] = None if value is None else float(value)
        elif key == "close_date":
            out["estimatedclosedate"] = value.isoformat() if isinstance(value, date) else value
        elif key == "owner_id":
            out["ownerid@odata.bind"] = f"/systemusers({value})"
        else:
            out[key] = value
    return out


_Item = tuple[int, OpportunityChange, dict[str, Any]]
#: ``PushResult.write_path`` values.
PATH_BULK = "UpsertMultiple"
PATH_NO_BULK = "$batch (UpsertMultiple unsupported)"
PATH_ROLLED_BACK = "$batch (UpsertMultiple rolled back)"
PATH_MIXED_BATCH = "$batch (per-part impersonation)"
PATH_PER_ACTOR = "per-actor requests ($batch impersonation ignored)"
_ATTRIBUTION = "_createdby_value,_createdonbehalfby_value,_modifiedby_value,_modifiedonbehalfby_value"


class Dynamics365Provider(ProviderBase):
    """One Dynamics 365 environment, reached as its application user."""

    slug: ClassVar[str] = "dynamics-365"
    acts_as_user: ClassVar[bool] = True  # impersonation (CallerObjectId / MSCRMCallerID)
    max_write_batch: ClassVar[int] = 1000
    max_page_size: ClassVar[int] = 5000

    def __init__(
        self,
        *,
        account: AccountConfig,
        credential: Credential,
        transport: HttpTransport,
        on_auth_failure: AuthFailureCallback | None = None,
        on_credential_update: CredentialUpdateCallback | None = None,
        clock: Clock = utcnow,
        sleep: Callable[[float], None] = time.sleep,
        max_retry_wait: float = 300.0,
        max_retries: int = 5,
    ) -> None:
        super().__init__(
            account=account,
            credential=credential,
            transport=transport,
            on_auth_failure=on_auth_failure,
            on_credential_update=on_credential_update,
            clock=clock,
        )
        self.config = DynamicsConfig.from_account(account, credential)
        self._http = transport.client()
        self._max_bytes = transport.max_response_bytes
        self._sleep = sleep
        self._max_retry_wait = max_retry_wait
        self._max_retries = max_retries
        self._token: str | None = None
        self._token_expires: datetime | None = None
        self._graph_token: str | None = None
        self._usage: ApiUsage | None = None
        self._whoami: dict[str, str] | None = None
        self._object_ids: dict[str, str | None] = {}
        self.throttled_waits: list[float] = []
        #: Learned from the environment's answers and kept for this provider's life (one sync run).
        self._bulk_unsupported = False
        self._batch_impersonation_ignored = False
        self._attribution_missing: dict[int, bool] = {}
        #: Calls spent on fallback paths (see ``push_opportunities``), by reason.
        self.fallback_calls: dict[str, int] = {}

    # ------------------------------------------------------------------ tokens
    def _fetch_token(self, scope: str) -> tuple[str, float]:
        url = f"{self.config.authority_url}/{self.config.tenant_id}/oauth2/v2.0/token"
        data = {
            "grant_type": "client_credentials",
            "client_id": self.config.client_id,
            "client_secret": self.config.client_secret,
            "scope": scope,
        }
        self._auth_calls += 1
        try:
            resp = self._http.post(url, data=data, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise _transport_error(exc, "Microsoft Entra ID token endpoint") from exc
        if resp.status_code != 200:
            err = _entra_error(resp)
            raise self._auth_failed(err) if isinstance(err, AuthenticationFailed) else err
        body = _json(resp, "the Entra token endpoint")
        token = body.get("access_token") if isinstance(body, Mapping) else None
        if not token:
            raise MalformedResponse("The Entra token endpoint answered 200 without an access_token.")
        try:
            expires_in = float(body.get("expires_in", 3599))
        except (TypeError, ValueError):
            expires_in = 3599.0
        return str(token), expires_in

    def _access_token(self) -> str:
        now = self._clock()
        if self._token is None or (self._token_expires is not None and now >= self._token_expires):
            token, expires_in = self._fetch_token(self.config.scope)
            self._token = token
            # Refresh a minute early so a token never expires between our check and the server's.
            self._token_expires = now + timedelta(seconds=max(0.0, expires_in - 60))
        return self._token

    # ------------------------------------------------------------------ transport
    def _request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        ok: Iterable[int] = (200, 201, 204),
        token: Callable[[], str] | None = None,
    ) -> httpx.Response:
        """One Web API call with the token, 401 → one transparent token refresh, 429 → wait Retry-After."""
        get_token = token or self._access_token
        refreshed = False
        waited = 0.0
        attempts = 0
        ok_set = set(ok)
        while True:
            hdrs = {
                "Accept": "application/json",
                "OData-MaxVersion": "4.0",
                "OData-Version": "4.0",
                "Authorization": f"Bearer {get_token()}",
            }
            if headers:
                hdrs.update(headers)
            try:
                resp = self._http.request(method, url, headers=hdrs, json=json_body, content=content, params=params)
            except httpx.HTTPError as exc:
                raise _transport_error(exc, "Dynamics 365") from exc
            self._calls += 1
            self._observe(resp)
            if len(resp.content) > self._max_bytes:
                raise MalformedResponse(
                    f"Dynamics 365 answered {len(resp.content)} bytes, more than we accept in one response: "
                    "lower the page size."
                )
            if resp.status_code in ok_set:
                return resp
            if resp.status_code == 401:
                if refreshed:
                    raise self._auth_failed(AuthenticationFailed(
                        "Dynamics 365 rejected a freshly issued token (HTTP 401): the app registration is not "
                        "an application user of this environment, or the environment URL is wrong. Add the "
                        "application user in the Power Platform admin center.",
                        code="401",
                    ))
                refreshed = True
                if token is None:
                    self._token = None
                else:
                    self._graph_token = None
                continue
            if resp.status_code == 429:
                retry_after = _retry_after(resp)
                delay = retry_after if retry_after is not None else min(60.0, 2.0 ** attempts)
                attempts += 1
                if attempts > self._max_retries or waited + delay > self._max_retry_wait:
                    raise error_for_response(resp)
                log.info("dynamics: throttled (429), waiting %.1fs as Retry-After asks", delay)
                self.throttled_waits.append(delay)
                self._sleep(delay)
                waited += delay
                continue
            raise error_for_response(resp)

    def _observe(self, resp: httpx.Response) -> None:
        remaining = resp.headers.get("x-ms-ratelimit-burst-remaining-xrm-requests")
        if remaining is None:
            return
        try:
            rem = int(remaining)
        except ValueError:
            return
        extra: dict[str, Any] = {"source": "x-ms-ratelimit-burst-remaining-xrm-requests"}
        time_remaining = resp.headers.get("x-ms-ratelimit-time-remaining-xrm-requests")
        if time_remaining is not None:
            extra["execution_time_remaining"] = time_remaining
        self._usage = ApiUsage(
            used=max(0, SERVICE_PROTECTION_REQUESTS - rem),
            limit=SERVICE_PROTECTION_REQUESTS,
            window="5min",
            remaining=rem,
            observed_at=self._clock(),
            extra=extra,
        )

    def _get_json(self, url: str, *, headers: Mapping[str, str] | None = None) -> Any:
        return _json(self._request("GET", url, headers=headers), "Dynamics 365")

    # ------------------------------------------------------------------ Provider API
    def whoami(self) -> dict[str, str]:
        body = self._get_json(f"{self.config.api_base}/WhoAmI")
        self._whoami = parse_whoami(body)
        return self._whoami

    def test_connection(self) -> ConnectionReport:
        steps: list[StepResult] = []
        report = ConnectionReport(ok=False, steps=steps)
        started = time.monotonic()

        def step(name: str, fn: Callable[[], str]) -> bool:
            t0 = time.monotonic()
            try:
                detail = fn()
            except ProviderError as exc:
                steps.append(StepResult(name, False, exc.message, fix=str(exc), latency_ms=_ms(t0),
                                        code=exc.code, error=type(exc)))
                return False
            steps.append(StepResult(name, True, detail, latency_ms=_ms(t0)))
            return True

        def reach() -> str:
            host = urlsplit(self.config.instance_url).netloc
            try:
                self._http.request("GET", self.config.instance_url + API_PATH + "/", headers={"Accept": "*/*"})
            except httpx.HTTPError as exc:
                raise _transport_error(exc, "Dynamics 365") from exc
            return f"{host} answered"

        def authenticate() -> str:
            self._token = None
            self._access_token()
            return f"Entra ID issued a token for application {self.config.client_id}"

        def api_access() -> str:
            ids = self.whoami()
            report.crm_user_id = ids["UserId"]
            report.org_id = ids["OrganizationId"]
            user = self._application_user(ids["UserId"])
            report.identity = (user or {}).get("fullname") or ids["UserId"]
            return f"WhoAmI: user {ids['UserId']} in organization {ids['OrganizationId']}"

        def licenses() -> str:
            snap = self.license_snapshot()
            report.licenses = snap
            report.detected_edition = next(
                (d.get("edition") for d in snap.detail if d.get("edition")), report.detected_edition
            )
            return (
                f"{snap.used} of {snap.total} Dynamics 365 seats used; application users need no license "
                f"({snap.detail[-1].get('application_users', 0) if snap.detail else 0} in this environment)"
            )

        def quota() -> str:
            usage = self.api_usage()
            report.api_usage = usage
            if usage is None:
                return "no service-protection signal yet"
            return f"{usage.remaining} of {usage.limit} requests left in the 5-minute window"

        ok = (
            step("reach", reach)
            and step("authenticate", authenticate)
            and step("api_access", api_access)
            and step("licenses", licenses)
            and step("quota", quota)
        )
        report.ok = bool(ok)
        report.latency_ms = _ms(started)
        return report

    def _application_user(self, systemuserid: str) -> dict[str, Any] | None:
        body = self._get_json(
            f"{self.config.api_base}/systemusers({systemuserid})"
            "?$select=fullname,applicationid,azureactivedirectoryobjectid,accessmode"
        )
        return body if isinstance(body, dict) else None

    def license_snapshot(self) -> LicenseSnapshot:
        """Seats from Microsoft Graph ``subscribedSkus`` (needs Organization.Read.All on the app registration);
        application users counted from ``systemusers`` (they need no license)."""
        app_users = self._count_application_users()
        try:
            skus = self._graph_get("/v1.0/subscribedSkus")
        except AuthenticationFailed:
            raise
        except ProviderRejected as exc:
            log.info("dynamics: Graph subscribedSkus unavailable (%s); seats unknown", exc.code)
            return LicenseSnapshot(
                total=0,
                used=0,
                detail=[
                    {
                        "note": "Grant the app registration Organization.Read.All (Microsoft Graph, application) "
                        "to read seat counts.",
                        "application_users": app_users,
                        "application_users_need_license": False,
                    }
                ],
            )
        total = used = 0
        detail: list[dict[str, Any]] = []
        values = skus.get("value") if isinstance(skus, Mapping) else None
        if not isinstance(values, list):
            raise MalformedResponse("Microsoft Graph subscribedSkus answered without a value list.")
        for sku in values:
            part = str(sku.get("skuPartNumber") or "")
            if not part.upper().startswith(DYNAMICS_SKU_PREFIXES) or sku.get("capabilityStatus") != "Enabled":
                continue
            enabled = int((sku.get("prepaidUnits") or {}).get("enabled") or 0)
            consumed = int(sku.get("consumedUnits") or 0)
            total += enabled
            used += consumed
            detail.append({"sku": part, "total": enabled, "used": consumed, "edition": _edition_of(part)})
        detail.append({"application_users": app_users, "application_users_need_license": False})
        return LicenseSnapshot(total=total, used=used, detail=detail)

    def _count_application_users(self) -> int:
        body = self._get_json(
            f"{self.config.api_base}/systemusers?$select=systemuserid&$filter=applicationid ne null "
            "and isdisabled eq false"
        )
        values = body.get("value") if isinstance(body, Mapping) else None
        if not isinstance(values, list):
            raise MalformedResponse("Dynamics 365 answered a systemusers query without a value list.")
        return len(values)

    def _graph_token_value(self) -> str:
        if self._graph_token is None:
            token, _ = self._fetch_token(self.config.graph_url + "/.default")
            self._graph_token = token
        return self._graph_token

    def _graph_get(self, path: str) -> Any:
        resp = self._request("GET", self.config.graph_url + path, token=self._graph_token_value)
        return _json(resp, "Microsoft Graph")

    def api_usage(self) -> ApiUsage | None:
        """From ``x-ms-ratelimit-burst-remaining-xrm-requests`` on our last answer (Microsoft documents it
        for debugging, not control; control is the 429 + Retry-After we honour)."""
        if self._usage is None:
            self.whoami()
        return self._usage

    def list_users(self) -> list[CrmUser]:
        url: str | None = (
            f"{self.config.api_base}/systemusers?$select=systemuserid,fullname,internalemailaddress,"
            "domainname,isdisabled,azureactivedirectoryobjectid,applicationid,accessmode"
            "&$filter=accessmode ne 3 and accessmode ne 5"
        )
        users: list[CrmUser] = []
        while url:
            body = self._get_json(url, headers={"Prefer": f"odata.maxpagesize={self.max_page_size}"})
            for row in _values(body):
                uid = str(row.get("systemuserid"))
                self._object_ids[uid] = row.get("azureactivedirectoryobjectid")
                if row.get("applicationid"):
                    continue  # application users are not people
                users.append(
                    CrmUser(
                        crm_user_id=uid,
                        email=row.get("internalemailaddress"),
                        name=str(row.get("fullname") or ""),
                        active=not bool(row.get("isdisabled")),
                        username=row.get("domainname"),
                    )
                )
            url = body.get("@odata.nextLink")
        return users

    def pull_opportunities(self, since: datetime | None) -> Iterator[Opportunity]:
        key = self.config.idempotency_key_column
        query = f"$select={_OPP_SELECT},{key}&$orderby=modifiedon asc,opportunityid asc"
        if since is not None:
            query += f"&$filter=modifiedon ge {_iso(since)}"
        url: str | None = f"{self.config.api_base}/opportunities?{query}"
        headers = {"Prefer": f"odata.maxpagesize={self.max_page_size}"}
        while url:
            body = self._get_json(url, headers=headers)
            for row in _values(body):
                yield opportunity_from_row(row, key)
            next_link = body.get("@odata.nextLink")
            url = str(next_link) if next_link else None

    # ------------------------------------------------------------------ writes
    def push_opportunities(self, changes: Sequence[OpportunityChange]) -> list[PushResult]:
        """Upserts keyed on the idempotency key's alternate key (or the record id), in requests of 1,000.

        All records of one actor go in one ``UpsertMultiple`` (impersonation is a request header); a chunk
        mixing actors goes as one ``$batch`` whose parts carry their own caller header. If a bulk message
        fails (it rolls back entirely), the chunk is resent as a continue-on-error ``$batch`` so each record
        gets its own result. Fallbacks (each result's ``write_path`` names the one used; ``fallback_calls``
        counts the calls they cost):

        - a table without ``UpsertMultiple`` (``0x80040800``): a ``$batch`` of single upserts, still one
          request per 1,000; remembered for the rest of this provider's life;
        - ``$batch`` per-part impersonation ignored (the written records come back without
          ``createdonbehalfby``/``modifiedonbehalfby``): the records are written again with one request per
          actor (impersonation on the request itself), and later mixed chunks go that way directly.

        ``UpsertMultiple`` answers ``204 No Content`` (Microsoft Learn, UpsertMultiple Action: "The
        UpsertMultipleResponse complex type is not returned"), so records created through it come back
        without their id; the sync learns it from the next pull, which reads the alternate-key column —
        no extra request.
        """
        results: dict[int, PushResult] = {}
        prepared: list[_Item] = []
        for i, change in enumerate(changes):
            try:
                prepared.append((i, change, self._target(change)))
            except RecordError as exc:
                results[i] = PushResult(change.idempotency_key, False, error=str(exc), error_code=exc.code)
        callers = self._resolve_callers({c.act_as_crm_user_id for _, c, _ in prepared if c.act_as_crm_user_id})
        # Group by actor first so single-actor chunks can use the bulk message.
        by_actor: dict[str | None, list[_Item]] = {}
        for item in prepared:
            by_actor.setdefault(item[1].act_as_crm_user_id if self.config.impersonation else None, []).append(item)
        chunks: list[tuple[str | None, list[_Item], bool]] = []
        leftovers: list[_Item] = []
        for actor, items in by_actor.items():
            full = len(items) - len(items) % self.max_write_batch
            for start in range(0, full, self.max_write_batch):
                chunks.append((actor, items[start : start + self.max_write_batch], True))
            leftovers.extend(items[full:])
        # Remainders of several actors share $batch requests; a lone actor's remainder stays a bulk message.
        actors_left = {c.act_as_crm_user_id if self.config.impersonation else None for _, c, _ in leftovers}
        if len(actors_left) <= 1:
            if leftovers:
                chunks.append((next(iter(actors_left)), leftovers, True))
        else:
            leftovers.sort(key=lambda t: t[0])
            for start in range(0, len(leftovers), self.max_write_batch):
                chunks.append((None, leftovers[start : start + self.max_write_batch], False))
        for actor, items, bulk in chunks:
            if bulk:
                results.update(self._upsert_multiple(items, actor, callers))
            elif self._batch_impersonation_ignored:
                results.update(self._per_actor(items, callers))
            else:
                results.update(self._mixed_batch(items, callers))
        return [results[i] for i in range(len(changes))]

    def _target(self, change: OpportunityChange) -> dict[str, Any]:
        row = row_from_fields(change.fields)
        key = self.config.idempotency_key_column
        row["@odata.type"] = "Microsoft.Dynamics.CRM.opportunity"
        if change.crm_id:
            row["opportunityid"] = change.crm_id
        else:
            # The key value goes in @odata.id only: powerapps-docs use-upsert-insert-update-record.md, "don't
            # include the alternate key data in the portion of the request that represents the data to save";
            # on the create path Dataverse answers 400 0x80040216 when it is repeated in the body.
            row.pop(key, None)
            row["@odata.id"] = f"opportunities({key}={_key_literal(change.idempotency_key)})"
        return row

    def _resolve_callers(self, user_ids: set[str]) -> dict[str, tuple[str, str]]:
        """systemuserid → (header, value): ``CallerObjectId`` with the Entra object id when the user has one,
        else ``MSCRMCallerID`` with the systemuserid. Unknown ids are looked up in one query."""
        if not self.config.impersonation or not user_ids:
            return {}
        missing = sorted(u for u in user_ids if u not in self._object_ids)
        for start in range(0, len(missing), 100):
            part = missing[start : start + 100]
            flt = " or ".join(f"systemuserid eq {u}" for u in part)
            body = self._get_json(
                f"{self.config.api_base}/systemusers?$select=systemuserid,azureactivedirectoryobjectid&$filter={flt}"
            )
            for row in _values(body):
                self._object_ids[str(row.get("systemuserid"))] = row.get("azureactivedirectoryobjectid")
        out: dict[str, tuple[str, str]] = {}
        for uid in user_ids:
            oid = self._object_ids.get(uid)
            out[uid] = ("CallerObjectId", str(oid)) if oid else ("MSCRMCallerID", uid)
        return out

    def _count_fallback(self, name: str, calls: int = 1) -> None:
        self.fallback_calls[name] = self.fallback_calls.get(name, 0) + calls

    def _upsert_multiple(
        self,
        items: list[_Item],
        actor: str | None,
        callers: Mapping[str, tuple[str, str]],
        *,
        path: str = PATH_BULK,
    ) -> dict[int, PushResult]:
        caller = callers.get(actor) if actor else None
        if self._bulk_unsupported:
            return self._batch_upserts(items, callers, outer_caller=caller,
                                       path=path if path != PATH_BULK else PATH_NO_BULK)
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if caller:
            headers[caller[0]] = caller[1]
        url = f"{self.config.api_base}/opportunities/Microsoft.Dynamics.CRM.UpsertMultiple"
        try:
            self._request("POST", url, headers=headers, json_body={"Targets": [t for _, _, t in items]})
        except (RecordError, ProviderRejected) as exc:
            if _bulk_unsupported(exc):
                log.info("dynamics: the opportunity table does not support UpsertMultiple (%s); using $batch "
                         "of single upserts from now on", exc.code)
                self._bulk_unsupported = True
                self._count_fallback("upsertmultiple_unsupported")
                return self._batch_upserts(items, callers, outer_caller=caller,
                                           path=path if path != PATH_BULK else PATH_NO_BULK)
            if not isinstance(exc, RecordError):
                raise
            log.info("dynamics: UpsertMultiple rolled back (%s); resending as $batch for per-record results", exc.code)
            return self._batch_upserts(items, callers, outer_caller=caller,
                                       path=path if path != PATH_BULK else PATH_ROLLED_BACK)
        # 204 No Content: success for every target, and nothing else to read.
        return {
            i: PushResult(change.idempotency_key, True, crm_id=change.crm_id, created=False, write_path=path)
            for i, change, _ in items
        }

    def _mixed_batch(self, items: list[_Item], callers: Mapping[str, tuple[str, str]]) -> dict[int, PushResult]:
        """One ``$batch`` with a caller header per part; checks the written records for the on-behalf-of
        columns Dataverse sets under impersonation, and falls back to one request per actor without them."""
        out = self._batch_upserts(items, callers, path=PATH_MIXED_BATCH, check_attribution=True)
        ignored = [item for item in items if self._attribution_missing.pop(item[0], False)]
        if not ignored:
            return out
        log.warning(
            "dynamics: Dataverse ignored the per-part impersonation headers of a $batch (records came back "
            "without createdonbehalfby/modifiedonbehalfby); writing %d records again with one request per actor, "
            "and using one request per actor from now on",
            len(ignored),
        )
        self._batch_impersonation_ignored = True
        out.update(self._per_actor(ignored, callers, created={i: out[i].created for i, _, _ in ignored},
                                   ids={i: out[i].crm_id for i, _, _ in ignored}))
        return out

    def _per_actor(
        self,
        items: list[_Item],
        callers: Mapping[str, tuple[str, str]],
        *,
        created: Mapping[int, bool] | None = None,
        ids: Mapping[int, str | None] | None = None,
    ) -> dict[int, PushResult]:
        groups: dict[str | None, list[_Item]] = {}
        for item in items:
            groups.setdefault(item[1].act_as_crm_user_id, []).append(item)
        out: dict[int, PushResult] = {}
        for actor, group in groups.items():
            before, refused = self._calls, self.fallback_calls.get("upsertmultiple_unsupported", 0)
            res = self._upsert_multiple(group, actor, callers, path=PATH_PER_ACTOR)
            refused = self.fallback_calls.get("upsertmultiple_unsupported", 0) - refused
            self._count_fallback("batch_impersonation_ignored", self._calls - before - refused)
            for i, r in res.items():
                if r.ok and created is not None and ids is not None:
                    r = PushResult(r.idempotency_key, True, crm_id=r.crm_id or ids.get(i),
                                   created=created.get(i, False), write_path=r.write_path)
                out[i] = r
        return out

    def _batch_upserts(
        self,
        items: list[_Item],
        callers: Mapping[str, tuple[str, str]],
        *,
        outer_caller: tuple[str, str] | None = None,
        path: str = PATH_MIXED_BATCH,
        check_attribution: bool = False,
    ) -> dict[int, PushResult]:
        """Single upserts (``PATCH`` by alternate key or id) in one continue-on-error ``$batch``.

        With ``outer_caller`` the impersonation header goes on the ``$batch`` request itself (which
        Dataverse honours for every part); otherwise each part carries its own actor's header."""
        boundary = f"batch_{uuid.uuid4()}"
        select = "opportunityid" if not check_attribution else "opportunityid," + _ATTRIBUTION
        parts: list[str] = []
        for n, (_, change, target) in enumerate(items, start=1):
            body = {k: v for k, v in target.items() if k not in {"@odata.type", "@odata.id"}}
            if change.crm_id:
                rel = f"opportunities({change.crm_id})"
                body.pop("opportunityid", None)
            else:
                rel = str(target["@odata.id"])
            lines = [
                f"--{boundary}",
                "Content-Type: application/http",
                "Content-Transfer-Encoding: binary",
                f"Content-ID: {n}",
                "",
                f"PATCH {self.config.api_base}/{rel}?$select={select} HTTP/1.1",
                "Content-Type: application/json",
                "Prefer: return=representation",
            ]
            caller = None
            if outer_caller is None and self.config.impersonation:
                caller = callers.get(change.act_as_crm_user_id or "")
            if caller:
                lines.append(f"{caller[0]}: {caller[1]}")
            lines += ["", json.dumps(body, default=str)]
            parts.append("\r\n".join(lines))
        payload = ("\r\n".join(parts) + f"\r\n--{boundary}--\r\n").encode()
        headers = {
            "Content-Type": f'multipart/mixed; boundary="{boundary}"',
            "Prefer": "odata.continue-on-error",
        }
        if outer_caller:
            headers[outer_caller[0]] = outer_caller[1]
        resp = self._request("POST", f"{self.config.api_base}/$batch", headers=headers, content=payload)
        answers = parse_batch_response(resp)
        if len(answers) != len(items):
            raise MalformedResponse(
                f"Dynamics 365 $batch answered {len(answers)} parts for {len(items)} requests."
            )
        out: dict[int, PushResult] = {}
        for (i, change, _), (status, _headers, raw) in zip(items, answers, strict=True):
            if 200 <= status < 300:
                data = _loads(raw) if raw.strip() else {}
                crm_id = data.get("opportunityid") if isinstance(data, Mapping) else None
                if check_attribution and change.act_as_crm_user_id and isinstance(data, Mapping) and data:
                    behalf = data.get("_createdonbehalfby_value" if status == 201 else "_modifiedonbehalfby_value")
                    by = data.get("_createdby_value" if status == 201 else "_modifiedby_value")
                    if not behalf and str(by or "").lower() != change.act_as_crm_user_id.lower():
                        self._attribution_missing[i] = True
                out[i] = PushResult(change.idempotency_key, True, crm_id=crm_id or change.crm_id,
                                    created=status == 201, write_path=path)
            else:
                err = error_for_response(httpx.Response(status, content=raw), record_key=change.idempotency_key)
                if isinstance(err, RateLimited | ProviderUnavailable | SessionExpired):
                    raise err
                out[i] = PushResult(change.idempotency_key, False, error=str(err), error_code=err.code,
                                    write_path=path)
        return out


def _bulk_unsupported(exc: ProviderError) -> bool:
    """The table has no UpsertMultiple: the SDK fault SdkEntityDoesNotSupportMessage (0x80040800, "The
    'UpsertMultiple' method does not support entities of type …"), or an API without the action at all."""
    return exc.code == "0x80040800" or (exc.code == "0x8006088a" and "UpsertMultiple" in str(exc))


def parse_batch_response(resp: httpx.Response) -> list[tuple[int, dict[str, str], bytes]]:
    """Each inner response of a ``multipart/mixed`` batch answer (change sets flattened), in order."""
    ctype = resp.headers.get("Content-Type", "")
    boundary = _boundary(ctype)
    if boundary is None:
        raise MalformedResponse(f"Dynamics 365 answered a $batch with Content-Type {ctype!r}, not multipart/mixed.")
    return _parse_multipart(resp.content, boundary)


def _boundary(content_type: str) -> str | None:
    for piece in content_type.split(";"):
        name, _, value = piece.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"')
    return None


_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def _split_head(block: bytes) -> tuple[bytes, bytes]:
    """(headers, rest) at the first blank line; lines may end in CRLF or a bare LF (Microsoft's own $batch
    examples in execute-batch-operations-using-web-api.md are LF-only, and proxies vary)."""
    m = _BLANK_LINE.search(block)
    if m is None:
        return block, b""
    return block[: m.start()], block[m.end():]


def _parse_multipart(data: bytes, boundary: str) -> list[tuple[int, dict[str, str], bytes]]:
    out: list[tuple[int, dict[str, str], bytes]] = []
    delim = b"--" + boundary.encode()
    for chunk in data.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        part = chunk.lstrip(b"\r\n")
        head, rest = _split_head(part)
        part_headers = _headers(head)
        inner = _boundary(part_headers.get("content-type", ""))
        if inner:
            out.extend(_parse_multipart(rest, inner))
            continue
        status_line, _, after = rest.partition(b"\n")
        pieces = status_line.rstrip(b"\r").split(b" ", 2)
        if len(pieces) < 2 or not pieces[1].isdigit():
            raise MalformedResponse("Dynamics 365 sent a $batch part without an HTTP status line.")
        if after.startswith(b"\n") or after.startswith(b"\r\n"):
            inner_head, body = b"", after.lstrip(b"\r").removeprefix(b"\n")  # no headers at all
        else:
            inner_head, body = _split_head(after)
        out.append((int(pieces[1]), _headers(inner_head), body.rstrip(b"\r\n")))
    return out


def _headers(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.decode("latin-1").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _edition_of(sku: str) -> str | None:
    """The catalog edition a Sales SKU stands for (None for seats that are not a Sales edition)."""
    s = sku.upper()
    if "TEAM_MEMBERS" in s:
        return None
    if "SALES_PREMIUM" in s:
        return "sales-premium"
    if "SALES_PRO" in s:
        return "sales-professional"
    if "ENTERPRISE" in s and "SALES" in s:
        return "sales-enterprise"
    return None


def _values(body: Any) -> list[dict[str, Any]]:
    values = body.get("value") if isinstance(body, Mapping) else None
    if not isinstance(values, list):
        raise MalformedResponse("Dynamics 365 answered a query without a value list.")
    return values


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedResponse("Dynamics 365 sent a $batch part that is not JSON.") from exc


def _json(resp: httpx.Response, who: str) -> Any:
    ctype = resp.headers.get("Content-Type", "")
    if "html" in ctype.lower():
        raise MalformedResponse(
            f"{who} answered an HTML page (HTTP {resp.status_code}) instead of JSON: a proxy or sign-in page is "
            "in the way — check the environment URL."
        )
    try:
        return resp.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedResponse(
            f"{who} answered HTTP {resp.status_code} with a body that is not complete JSON: retry; if it repeats, "
            "check the environment URL and any proxy in between."
        ) from exc


def _transport_error(exc: httpx.HTTPError, who: str) -> ProviderError:
    if isinstance(exc, httpx.RemoteProtocolError) and "incomplete" in str(exc).lower():
        return MalformedResponse(f"{who} closed the connection mid-answer (truncated body): retry the sync.")
    if isinstance(exc, httpx.TimeoutException):
        return ProviderUnavailable(f"{who} did not answer in time ({type(exc).__name__}): retry later.")
    text = str(exc)
    if "CERTIFICATE" in text.upper() or "SSL" in text.upper():
        return ProviderUnavailable(
            f"TLS with {who} failed ({text[:120]}): check the URL and that the server's certificate is trusted."
        )
    return ProviderUnavailable(f"Could not reach {who} ({type(exc).__name__}): check the URL and the network.")


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)
