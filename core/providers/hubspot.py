"""HubSpot over its REST API (CRM v3) with httpx.

Three ways in, one class:

- ``oauth`` (primary): an app installed in the portal; we hold the app's client secret and the install's
  refresh token, and trade it for access tokens that carry ``expires_in`` (HubSpot: "Unauthorized (401)
  requests are not a valid indicator that a new access token must be retrieved" — so we refresh on
  expiry, and still treat a 401 as one transparent refresh).
- ``service_key`` (the replacement for private apps): HubSpot's changelog "Legacy Private App Creation
  Being Disabled" (2026) says new legacy private apps cannot be created from 2026-09-28 (new accounts) /
  2026-10-26 (older accounts) and points system-to-system integrations to *Service Keys* (public beta
  since 2026-02; Development > Keys > Service keys), scoped bearer keys with the limits of privately
  distributed apps. No webhooks — we do not need them.
- ``private_app`` (legacy): an existing private app's static access token; existing apps keep working.

Facts used (developers.hubspot.com, checked 2026-11): CRM search pages up to 200 records and returns at
most 10,000 results per query (paging past that is a 400), so a long pull restarts the query from the
last ``hs_lastmodifieddate`` seen; search is limited to 5 requests per second per account; batch
create/update/upsert take at most 100 inputs; every request counts once toward the per-app 10-second
burst (Professional/Enterprise 190, Free/Starter 100) and the per-account daily limit, whatever the batch
size; ``X-HubSpot-RateLimit-*`` headers report both (the Daily pair is absent for OAuth calls); a 429 names
its ``policyName`` (``DAILY``, ``SECONDLY``, ``TEN_SECONDLY_ROLLING``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

import httpx

from core.clock import Clock, utcnow
from core.errors import (
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
    TokenGrant,
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

DEFAULT_API = "https://api.hubapi.com"
#: The current OAuth API's token introspection (HubSpot-public-api-spec-collection Auth/Oauth 2026-03).
INTROSPECT_PATH = "/oauth/2026-03/token/introspect"
AUTH_MODES = ("oauth", "service_key", "private_app")
SEARCH_PAGE = 200
SEARCH_RESULT_CAP = 10_000
SEARCH_PER_SECOND = 5
BATCH_MAX = 100
OAUTH_SCOPES = ("crm.objects.deals.read", "crm.objects.deals.write", "crm.objects.owners.read",
                "settings.users.read")
DEAL_PROPERTIES = ("dealname", "dealstage", "amount", "closedate", "hubspot_owner_id", "hs_lastmodifieddate")
#: Daily API limit per account → HubSpot tier (usage guidelines; "Professional 625,000" in the 2026 table,
#: 650,000 in the 2024 changelog — both mapped).
_TIER_BY_DAILY = {250_000: "starter", 625_000: "professional", 650_000: "professional", 1_000_000: "enterprise"}


@dataclass(frozen=True)
class HubSpotConfig:
    auth_mode: str
    token: str = ""  # service key or private-app token (static modes)
    client_id: str = ""
    client_secret: str = ""
    refresh_token: str = ""
    api_url: str = DEFAULT_API
    idempotency_property: str = "crb_idempotency_key"
    portal_id: str | None = None

    @classmethod
    def from_account(cls, account: AccountConfig, credential: Credential) -> HubSpotConfig:
        """Catalog auth modes → ours: ``oauth_authorization_code`` is the app install; ``api_token`` is a
        service key or (``token_kind: private_app``) a legacy private app's token.

        Raises: ConfigurationError naming what is missing.
        """
        catalog_mode = account.auth_mode or "oauth_authorization_code"
        if catalog_mode == "oauth_authorization_code":
            mode = "oauth"
        elif catalog_mode == "api_token":
            mode = str(account.setting("token_kind", "service_key"))
        else:
            mode = catalog_mode
        if mode not in AUTH_MODES:
            raise ConfigurationError(
                f"HubSpot auth mode {catalog_mode!r} is unknown: use the app install (OAuth) or a service key."
            )
        cfg = cls(
            auth_mode=mode,
            token=secret_value(credential.get("token")) or "",
            client_id=cred_or_setting(credential, account, "client_id") or "",
            client_secret=secret_value(credential.get("client_secret")) or "",
            refresh_token=secret_value(credential.get("refresh_token")) or "",
            api_url=account.base_url,
            idempotency_property=str(account.setting("idempotency_property", "crb_idempotency_key")),
            portal_id=str(account.setting("portal_id")) if account.setting("portal_id") else None,
        )
        if mode == "oauth" and not (cfg.client_id and cfg.client_secret and cfg.refresh_token):
            if not cfg.client_id:
                missing, fix = "the app's client ID", "Add the account again with the app's client ID."
            elif not cfg.client_secret:
                missing, fix = "the app's client secret", (
                    "Enter it on the account's credentials page (Enter credentials), then press \"Install the app "
                    "in HubSpot\" there.")
            else:
                missing, fix = "an install of the app (its refresh token)", (
                    "Press \"Install the app in HubSpot\" on the account's credentials page (Enter credentials).")
            raise ConfigurationError(f"The HubSpot OAuth account has no {missing} yet.", fix=fix)
        if mode != "oauth" and not cfg.token:
            raise ConfigurationError(
                "The HubSpot account has no token: paste the service key (or the legacy private app's "
                "access token)."
            )
        return cfg


def _ms_epoch(dt: datetime) -> int:
    return int(dt.astimezone(UTC).timestamp() * 1000)


def _parse_hs_time(value: Any) -> datetime | None:
    """HubSpot sends datetimes as ISO-8601 strings (``2026-11-28T09:00:00.123Z``) or epoch milliseconds."""
    if value in (None, ""):
        return None
    text = str(value)
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise MalformedResponse(f"HubSpot sent an unreadable date-time {value!r}.") from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def opportunity_from_object(obj: Mapping[str, Any], key_property: str = "crb_idempotency_key") -> Opportunity:
    props = obj.get("properties")
    if not isinstance(props, Mapping) or "id" not in obj:
        raise MalformedResponse("HubSpot returned a deal without id or properties.")
    modified = _parse_hs_time(props.get("hs_lastmodifieddate")) or _parse_hs_time(obj.get("updatedAt"))
    if modified is None:
        raise MalformedResponse(f"HubSpot returned deal {obj['id']} without hs_lastmodifieddate.")
    amount_raw = props.get("amount")
    try:
        amount = Decimal(str(amount_raw)) if amount_raw not in (None, "") else None
    except InvalidOperation as exc:
        raise MalformedResponse(f"HubSpot sent an unreadable amount {amount_raw!r}.") from exc
    close = _parse_hs_time(props.get("closedate"))
    return Opportunity(
        crm_id=str(obj["id"]),
        name=str(props.get("dealname") or ""),
        stage=props.get("dealstage"),
        amount=amount,
        close_date=close.date() if close else None,
        owner_id=props.get("hubspot_owner_id") or None,
        modified_at=modified,
        external_key=props.get(key_property) or None,
        raw=dict(obj),
    )


def properties_from_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Our neutral opportunity fields → HubSpot deal properties (HubSpot property values are strings)."""
    names = {"name": "dealname", "stage": "dealstage", "amount": "amount", "close_date": "closedate",
             "owner_id": "hubspot_owner_id"}
    out: dict[str, str] = {}
    for key, value in fields.items():
        prop = names.get(key, key)
        if value is None:
            out[prop] = ""
        elif isinstance(value, date) and not isinstance(value, datetime):
            out[prop] = value.isoformat()
        elif isinstance(value, datetime):
            out[prop] = value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        else:
            out[prop] = str(value)
    return out


def error_for_response(resp: httpx.Response, *, record_key: str | None = None) -> ProviderError:
    """Map one non-success HubSpot answer to ``core.errors``, naming the fix."""
    status = resp.status_code
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    body = body if isinstance(body, Mapping) else {}
    category = str(body.get("category") or body.get("errorType") or body.get("status") or "")
    message = str(body.get("message") or resp.reason_phrase or "")
    where = f" (HTTP {status}{', ' + category if category else ''})"
    if status == 429:
        policy = str(body.get("policyName") or "")
        retry_after = _retry_after(resp, policy)
        fix = (
            "The account's daily API limit is used up; calls resume after midnight in the portal's time zone, "
            "or buy the API limit increase."
            if policy == "DAILY"
            else "Calls resume after the retry delay; spread the sync over time."
        )
        return RateLimited(f"HubSpot rate limit reached{where}, policy {policy or '?'}: {message}. {fix}",
                           retry_after=retry_after, code=policy or "429")
    if status == 401:
        return SessionExpired(f"HubSpot rejected the token{where}: {message}", code=category or "401")
    if status >= 500:
        return ProviderUnavailable(
            f"HubSpot answered a server error{where}: {message}. Retry later; see status.hubspot.com.",
            code=category or str(status),
        )
    if status == 403:
        return ProviderRejected(
            f"HubSpot refused the call{where}: {message}. Add the missing scopes (crm.objects.deals.read/"
            "write, crm.objects.owners.read) to the app or service key and reconnect.",
            code=category or "403",
        )
    if record_key is not None or status in {400, 404, 409}:
        return RecordError(
            f"HubSpot rejected the record{where}: {message}. Correct the value (or the deal property's "
            "definition in HubSpot) and sync again.",
            record_key=record_key,
            code=category or str(status),
        )
    return ProviderRejected(f"HubSpot refused the request{where}: {message}.", code=category or str(status))


def _retry_after(resp: httpx.Response, policy: str = "") -> float | None:
    value = resp.headers.get("Retry-After")
    if value is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
    if policy == "DAILY":
        return None
    interval = resp.headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
    if policy == "SECONDLY":
        return 1.0
    if interval and interval.isdigit():
        return int(interval) / 1000
    return 10.0


def _token_error(resp: httpx.Response) -> ProviderError:
    if resp.status_code >= 500:
        return ProviderUnavailable(f"HubSpot's token endpoint answered HTTP {resp.status_code}: retry later.")
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        return MalformedResponse(
            f"HubSpot's token endpoint answered HTTP {resp.status_code} without JSON: check the API URL."
        )
    status = str(body.get("status") or body.get("error") or "") if isinstance(body, Mapping) else ""
    fixes = {
        "BAD_REFRESH_TOKEN": "the app was uninstalled or the refresh token revoked — reinstall the app through "
        "the portal's connect link",
        "BAD_CLIENT_ID": "the app's client ID is wrong — copy it from the app's Auth settings",
        "BAD_CLIENT_SECRET": "the app's client secret is wrong or was rotated — paste the current secret",
        "BAD_AUTH_CODE": "the install code expired or was already used — start the install again",
        "invalid_grant": "the refresh token is no longer valid — reinstall the app",
    }
    fix = fixes.get(status, "reinstall the app through the portal's connect link")
    return AuthenticationFailed(f"HubSpot refused the OAuth token request ({status or resp.status_code}): {fix}.",
                                code=status or str(resp.status_code))


class HubSpotProvider(ProviderBase):
    """One HubSpot portal (account)."""

    slug: ClassVar[str] = "hubspot"
    max_write_batch: ClassVar[int] = BATCH_MAX
    max_page_size: ClassVar[int] = SEARCH_PAGE

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
        monotonic: Callable[[], float] = time.monotonic,
        max_retry_wait: float = 120.0,
        max_retries: int = 6,
    ) -> None:
        super().__init__(
            account=account,
            credential=credential,
            transport=transport,
            on_auth_failure=on_auth_failure,
            on_credential_update=on_credential_update,
            clock=clock,
        )
        self.config = HubSpotConfig.from_account(account, credential)
        self._http = transport.client()
        self._max_bytes = transport.max_response_bytes
        self._sleep = sleep
        self._mono = monotonic
        self._refresh_token = self.config.refresh_token
        self._max_retry_wait = max_retry_wait
        self._max_retries = max_retries
        # A static token, or (OAuth) an access token handed in with the grant: used until it expires
        # (a 401 then refreshes once); otherwise the first call trades the refresh token for one.
        self._access: str | None = self.config.token or secret_value(credential.get("access_token")) or None
        self._access_expires: datetime | None = None
        self._usage: ApiUsage | None = None
        self._sent: deque[float] = deque()
        self._burst_max: int | None = None
        self._burst_interval = 10.0
        self._searches: deque[float] = deque()
        self.throttled_waits: list[float] = []
        self._fallback_calls = 0
        self.introspection: str | None = None  # which token-info endpoint answered last
        self.portal_id: str | None = self.config.portal_id

    # ------------------------------------------------------------------ OAuth app install
    @classmethod
    def authorization_url(
        cls, account: AccountConfig, *, redirect_uri: str, state: str, code_challenge: str,
        login_hint: str | None = None,
    ) -> str:
        """The app-install link: HubSpot's authorize page (``authorize_url`` setting, default
        app.hubspot.com) with our scopes. HubSpot ignores PKCE parameters; ``state`` binds the link."""
        from urllib.parse import urlencode

        base = str(account.setting("authorize_url", "https://app.hubspot.com/oauth/authorize"))
        query = {
            "client_id": str(account.setting("client_id", "")),
            "redirect_uri": redirect_uri,
            "scope": " ".join(OAUTH_SCOPES),
            "state": state,
        }
        return f"{base}?{urlencode(query)}"

    @classmethod
    def exchange_code(
        cls, account: AccountConfig, credential: Credential, transport: HttpTransport, *,
        code: str, code_verifier: str, redirect_uri: str,
    ) -> TokenGrant:
        """Trade the install's code for tokens (``POST /oauth/v1/token``, ``authorization_code``).

        Raises: AuthenticationFailed (bad code, client id or secret), ProviderUnavailable.
        """
        data = {
            "grant_type": "authorization_code",
            "client_id": cred_or_setting(credential, account, "client_id") or "",
            "client_secret": secret_value(credential.get("client_secret")) or "",
            "redirect_uri": redirect_uri,
            "code": code,
        }
        try:
            resp = transport.client().post(f"{account.base_url}/oauth/v1/token", data=data,
                                           headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise _transport_error(exc, "HubSpot's token endpoint") from exc
        if resp.status_code != 200:
            raise _token_error(resp)
        body = _json(resp, "HubSpot's token endpoint")
        if not isinstance(body, Mapping) or not body.get("access_token"):
            raise MalformedResponse("HubSpot's token endpoint answered 200 without an access_token.")
        return TokenGrant(
            access_token=str(body["access_token"]),
            refresh_token=str(body["refresh_token"]) if body.get("refresh_token") else None,
            expires_in=int(body.get("expires_in") or 0) or None,
            extra={"token_type": body.get("token_type")},
        )

    # ------------------------------------------------------------------ tokens
    def _refresh(self) -> str:
        self._auth_calls += 1
        try:
            resp = self._http.post(
                f"{self.config.api_url}/oauth/v1/token",
                data={
                    "grant_type": "refresh_token",
                    "client_id": self.config.client_id,
                    "client_secret": self.config.client_secret,
                    "refresh_token": self._refresh_token,
                },
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise _transport_error(exc, "HubSpot's token endpoint") from exc
        if resp.status_code != 200:
            err = _token_error(resp)
            raise self._auth_failed(err) if isinstance(err, AuthenticationFailed) else err
        body = _json(resp, "HubSpot's token endpoint")
        token = body.get("access_token") if isinstance(body, Mapping) else None
        if not token:
            raise MalformedResponse("HubSpot's token endpoint answered 200 without an access_token.")
        try:
            expires_in = float(body.get("expires_in", 1800))
        except (TypeError, ValueError):
            expires_in = 1800.0
        new_refresh = body.get("refresh_token")
        if new_refresh and new_refresh != self._refresh_token:
            self._refresh_token = str(new_refresh)
            if self._on_credential_update:
                self._on_credential_update({"refresh_token": self._refresh_token})
        self._access = str(token)
        self._access_expires = self._clock() + timedelta(seconds=max(0.0, expires_in - 60))
        return self._access

    def _token(self) -> str:
        if self.config.auth_mode != "oauth":
            return self.config.token
        if self._access is None or (self._access_expires is not None and self._clock() >= self._access_expires):
            return self._refresh()
        return self._access

    def _introspect(self) -> Mapping[str, Any]:
        """What the access token is: ``POST /oauth/2026-03/token/introspect`` (the current OAuth API; the
        HubSpot changelog "v1 OAuth API Deprecation" retires ``GET /oauth/v1/access-tokens/{token}`` on
        2027-02-16), falling back to the v1 path only when the new endpoint is not there (404/405).

        Raises: AuthenticationFailed when the token is not active, ProviderError for the rest."""
        assert self._access is not None
        self._auth_calls += 1
        try:
            resp = self._http.post(
                self.config.api_url + INTROSPECT_PATH,
                data={"client_id": self.config.client_id, "client_secret": self.config.client_secret,
                      "token": self._access, "token_type_hint": "access_token"},
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise _transport_error(exc, "HubSpot's token introspection endpoint") from exc
        if resp.status_code in (404, 405):
            self._fallback_calls += 1
            info = self._get(f"/oauth/v1/access-tokens/{self._access}")
            self.introspection = "/oauth/v1/access-tokens"
            if not isinstance(info, Mapping):
                raise MalformedResponse("HubSpot's v1 token info is not a JSON object.")
            return info
        if resp.status_code != 200:
            err = _token_error(resp)
            raise self._auth_failed(err) if isinstance(err, AuthenticationFailed) else err
        info = _json(resp, "HubSpot's token introspection endpoint")
        if not isinstance(info, Mapping):
            raise MalformedResponse("HubSpot's token introspection answer is not a JSON object.")
        self.introspection = INTROSPECT_PATH
        if info.get("active") is not True:
            raise self._auth_failed(AuthenticationFailed(
                "HubSpot says the access token it just issued is not active: the app was uninstalled or its "
                "install revoked — reinstall it through the portal's connect link.", code="inactive_token"))
        return info

    # ------------------------------------------------------------------ transport
    def _pace(self, *, search: bool) -> None:
        """Wait, if needed, so this request stays inside the app's burst window (its size learned from the
        X-HubSpot-RateLimit-Max/-Interval headers) and, for search, 5 requests per second.

        The windows hold the times our earlier requests *completed*: each arrived at HubSpot no later,
        so when one leaves our window it has left HubSpot's too, whatever the network delay."""
        for window, limit, span in ((self._sent, self._burst_max, self._burst_interval),
                                    (self._searches, SEARCH_PER_SECOND if search else None, 1.0)):
            if not limit:
                continue
            now = self._mono()
            while window and now - window[0] >= span:
                window.popleft()
            if len(window) >= limit:
                wait = span - (now - window[-limit]) + 0.02
                self.throttled_waits.append(wait)
                self._sleep(wait)

    def _sent_at(self, *, search: bool) -> None:
        now = self._mono()
        self._sent.append(now)
        if search:
            self._searches.append(now)

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        ok: Sequence[int] = (200, 201, 204, 207),
        search: bool = False,
    ) -> httpx.Response:
        refreshed = False
        waited = 0.0
        attempts = 0
        url = path if path.startswith("http") else self.config.api_url + path
        while True:
            token = self._token()
            self._pace(search=search)
            try:
                resp = self._http.request(
                    method,
                    url,
                    json=json_body,
                    params=params,
                    headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                )
            except httpx.HTTPError as exc:
                raise _transport_error(exc, "HubSpot") from exc
            self._calls += 1
            self._sent_at(search=search)
            self._observe(resp)
            if len(resp.content) > self._max_bytes:
                raise MalformedResponse(f"HubSpot answered {len(resp.content)} bytes, more than we accept.")
            if resp.status_code in ok:
                return resp
            if resp.status_code == 401:
                if refreshed or self.config.auth_mode != "oauth":
                    what = {
                        "oauth": "the app was uninstalled or its scopes changed — reinstall it through the "
                        "portal's connect link",
                        "service_key": "the service key was deleted or rotated — create a new one under "
                        "Development > Keys > Service keys and paste it here",
                        "private_app": "the private app's token was rotated or the app deleted — paste the "
                        "current token (or move to a service key)",
                    }[self.config.auth_mode]
                    raise self._auth_failed(
                        AuthenticationFailed(f"HubSpot rejected the credential (HTTP 401): {what}.", code="401")
                    )
                refreshed = True
                self._access = None
                continue
            if resp.status_code == 429:
                err = error_for_response(resp)
                assert isinstance(err, RateLimited)
                attempts += 1
                delay = err.retry_after
                if delay is None or attempts > self._max_retries or waited + delay > self._max_retry_wait:
                    raise err
                log.info("hubspot: throttled (%s), waiting %.1fs", err.code, delay)
                self.throttled_waits.append(delay)
                self._sleep(delay)
                waited += delay
                continue
            raise error_for_response(resp)

    def _observe(self, resp: httpx.Response) -> None:
        h = resp.headers
        daily, daily_left = h.get("X-HubSpot-RateLimit-Daily"), h.get("X-HubSpot-RateLimit-Daily-Remaining")
        burst, burst_left = h.get("X-HubSpot-RateLimit-Max"), h.get("X-HubSpot-RateLimit-Remaining")
        interval = h.get("X-HubSpot-RateLimit-Interval-Milliseconds")
        if burst and burst.isdigit():
            self._burst_max = int(burst)
            if interval and interval.isdigit():
                self._burst_interval = int(interval) / 1000
        if burst_left and burst_left.lstrip("-").isdigit():
            self._burst_remaining = int(burst_left)
        extra: dict[str, Any] = {}
        if burst and burst_left:
            extra.update(burst_limit=int(burst), burst_remaining=int(burst_left),
                         burst_interval_ms=int(interval) if interval and interval.isdigit() else 10_000)
        if daily and daily_left and daily.isdigit() and daily_left.lstrip("-").isdigit():
            d, left = int(daily), int(daily_left)
            self._usage = ApiUsage(used=max(0, d - left), limit=d, window="day", remaining=left,
                                   observed_at=self._clock(), extra=extra)
        elif burst and burst_left and burst.isdigit() and burst_left.lstrip("-").isdigit():
            b, left = int(burst), int(burst_left)
            self._usage = ApiUsage(used=max(0, b - left), limit=b, window="10s", remaining=left,
                                   observed_at=self._clock(), extra=extra)

    def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return _json(self._request("GET", path, params=params), "HubSpot")

    # ------------------------------------------------------------------ Provider API
    def account_details(self) -> dict[str, Any]:
        body = self._get("/account-info/v3/details")
        if not isinstance(body, dict) or "portalId" not in body:
            raise MalformedResponse("HubSpot account details came back without portalId.")
        self.portal_id = str(body["portalId"])
        return body

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
            try:
                self._http.request("GET", self.config.api_url + "/", headers={"Accept": "*/*"})
            except httpx.HTTPError as exc:
                raise _transport_error(exc, "HubSpot") from exc
            return f"{self.config.api_url} answered"

        def authenticate() -> str:
            if self.config.auth_mode == "oauth":
                self._refresh()
                info = self._introspect()
                report.identity = info.get("user")
                report.crm_user_id = str(info.get("user_id")) if info.get("user_id") else None
                via = ("token introspection 2026-03" if self.introspection == INTROSPECT_PATH else
                       "deprecated v1 token info, as a fallback: the 2026-03 introspection endpoint is not there")
                return f"OAuth install by {info.get('user')} with {len(info.get('scopes') or [])} scopes ({via})"
            report.identity = "service key" if self.config.auth_mode == "service_key" else "private app (legacy)"
            return f"{report.identity} token present"

        def api_access() -> str:
            details = self.account_details()
            report.org_id = str(details["portalId"])
            return f"portal {details['portalId']} ({details.get('accountType', 'STANDARD')})"

        def licenses() -> str:
            snap = self.license_snapshot()
            report.licenses = snap
            return f"{snap.used} users in the portal"

        def quota() -> str:
            usage = self.api_usage()
            report.api_usage = usage
            if usage is None:
                return "no rate-limit headers seen"
            if usage.window == "day":
                report.detected_edition = _TIER_BY_DAILY.get(usage.limit)
            return f"{usage.remaining} of {usage.limit} calls left ({usage.window})"

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

    def license_snapshot(self) -> LicenseSnapshot:
        """Users from the settings API. HubSpot publishes no seat-count endpoint, so total = users; the
        seat type of each user is kept in ``detail``. Integrations (OAuth apps, service keys) need no seat."""
        users: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after"] = after
            body = self._get("/settings/v3/users", params)
            users.extend(_results(body))
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                break
        detail = [{"user_id": u.get("id"), "email": u.get("email"), "super_admin": bool(u.get("superAdmin"))}
                  for u in users]
        detail.append({"integration_needs_seat": False})
        return LicenseSnapshot(total=len(users), used=len(users), detail=detail)

    def api_usage(self) -> ApiUsage | None:
        if self._usage is None:
            self.account_details()
        return self._usage

    def list_users(self) -> list[CrmUser]:
        out: list[CrmUser] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500, "archived": "false"}
            if after:
                params["after"] = after
            body = self._get("/crm/v3/owners", params)
            for o in _results(body):
                name = " ".join(p for p in (o.get("firstName"), o.get("lastName")) if p) or str(o.get("email") or "")
                out.append(CrmUser(crm_user_id=str(o.get("id")), email=o.get("email"), name=name,
                                   active=not o.get("archived", False), username=o.get("email")))
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                return out

    def pull_opportunities(self, since: datetime | None) -> Iterator[Opportunity]:
        """Search on ``hs_lastmodifieddate`` ascending, ``max_page_size`` (200) per page. When a query
        reaches HubSpot's 10,000-result cap, a new query continues from the last timestamp seen (``GTE``,
        dropping the ids already sent at that timestamp)."""
        props = [*DEAL_PROPERTIES, self.config.idempotency_property]
        floor_ms = _ms_epoch(since) if since else None
        seen_at_floor: set[str] = set()
        while True:
            after = 0
            last_ms: int | None = None
            ids_at_last: set[str] = set()
            restart = False
            while True:
                body: dict[str, Any] = {
                    "sorts": [{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}],
                    "properties": props,
                    "limit": self.max_page_size,
                    "after": str(after),
                }
                if floor_ms is not None:
                    body["filterGroups"] = [{"filters": [
                        {"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": str(floor_ms)}]}]
                page = _json(self._request("POST", "/crm/v3/objects/deals/search", json_body=body, search=True),
                             "HubSpot")
                for obj in _results(page):
                    opp = opportunity_from_object(obj, self.config.idempotency_property)
                    ms = _ms_epoch(opp.modified_at)
                    if floor_ms is not None and ms == floor_ms and opp.crm_id in seen_at_floor:
                        continue
                    if ms != last_ms:
                        last_ms, ids_at_last = ms, set()
                    ids_at_last.add(opp.crm_id)
                    yield opp
                nxt = ((page.get("paging") or {}).get("next") or {}).get("after")
                if not nxt:
                    return
                after = int(nxt)
                if after >= SEARCH_RESULT_CAP:
                    restart = True
                    break
            if restart:
                if last_ms is None or (floor_ms is not None and last_ms == floor_ms):
                    raise ProviderRejected(
                        "More than 10,000 HubSpot deals share one hs_lastmodifieddate, which the search API "
                        "cannot page past: narrow the pull (for example per owner) and retry.",
                        code="SEARCH_CAP",
                    )
                seen_at_floor = ids_at_last if last_ms != floor_ms else seen_at_floor | ids_at_last
                floor_ms = last_ms

    # ------------------------------------------------------------------ writes
    @property
    def fallback_calls_made(self) -> int:
        """Calls beyond one per batch (and beyond the current introspection endpoint) spent recovering from a
        whole-batch 400 or a missing endpoint; part of ``calls_made`` too. For benchmarks and reports."""
        return self._fallback_calls

    def push_opportunities(self, changes: Sequence[OpportunityChange]) -> list[PushResult]:
        """Creates as ``batch/upsert`` on the idempotency property (a retried batch finds its records);
        changes to records we know by id as ``batch/update``; 100 inputs per call.

        Upsert results are matched to inputs by the ``objectWriteTraceId`` each input carries (the spec's
        ``SimplePublicUpsertObject`` returns it; it neither echoes the idProperty value nor promises input
        order); update results by record id."""
        key = self.config.idempotency_property
        results: dict[int, PushResult] = {}
        upserts: list[tuple[int, OpportunityChange]] = []
        updates: list[tuple[int, OpportunityChange]] = []
        for i, ch in enumerate(changes):
            (updates if ch.crm_id else upserts).append((i, ch))
        size = self.max_write_batch
        for start in range(0, len(upserts), size):
            items = [(i, ch, {"idProperty": key, "id": ch.idempotency_key, "objectWriteTraceId": ch.idempotency_key,
                              "properties": {**properties_from_fields(ch.fields), key: ch.idempotency_key}})
                     for i, ch in upserts[start : start + size]]
            results.update(self._batch("upsert", items))
        for start in range(0, len(updates), size):
            items = [(i, ch, {"id": str(ch.crm_id), "properties": properties_from_fields(ch.fields)})
                     for i, ch in updates[start : start + size]]
            results.update(self._batch("update", items))
        return [results[i] for i in range(len(changes))]

    def _batch(self, verb: str, items: list[tuple[int, OpportunityChange, dict[str, Any]]], *,
               fallback: bool = False) -> dict[int, PushResult]:
        """One batch call; on a whole-batch 400 naming an invalid property value (HubSpot fails every input for
        one bad one, and names the property and value but not the input), fail the inputs it names and send
        the rest again; when it names none we can single out, split the batch in halves."""
        out: dict[int, PushResult] = {}
        pending = items
        first = True
        while pending:
            if fallback or not first:  # every call after the chunk's first is a fallback call
                self._fallback_calls += 1
            first = False
            resp = self._request("POST", f"/crm/v3/objects/deals/batch/{verb}",
                                 json_body={"inputs": [inp for _, _, inp in pending]}, ok=(200, 201, 204, 207, 400))
            if resp.status_code != 400:
                out.update(self._batch_results(verb, pending, _json(resp, "HubSpot")))
                return out
            err = error_for_response(resp, record_key="")
            details = _invalid_properties(resp)
            if details is None:  # not about property values: the batch as a whole is refused
                for i, ch, _ in pending:
                    out[i] = PushResult(ch.idempotency_key, False, error=str(err), error_code=err.code)
                return out
            if len(pending) == 1:
                i, ch, _ = pending[0]
                out[i] = PushResult(ch.idempotency_key, False, error=str(err), error_code=err.code)
                return out
            named = _named_inputs(details, pending)
            if named and len(named) < len(pending):
                for i, ch, _ in pending:
                    if i in named:
                        out[i] = PushResult(ch.idempotency_key, False, error=str(err), error_code=err.code)
                pending = [item for item in pending if item[0] not in named]
                continue
            # Nothing we can single out: halves, each a call of its own (about 2·log2(n) extra calls per bad input).
            half = len(pending) // 2
            out.update(self._batch(verb, pending[:half], fallback=True))
            out.update(self._batch(verb, pending[half:], fallback=True))
            return out
        return out

    def _batch_results(self, verb: str, items: list[tuple[int, OpportunityChange, dict[str, Any]]],
                       body: Any) -> dict[int, PushResult]:
        out: dict[int, PushResult] = {}
        results = _results(body)
        if verb == "update":
            keyed = {str(inp["id"]): (i, ch) for i, ch, inp in items}
            matched = [(keyed.get(str(r.get("id"))), r) for r in results]
        else:
            traced = {str(inp["objectWriteTraceId"]): (i, ch) for i, ch, inp in items}
            if all(r.get("objectWriteTraceId") is not None for r in results):
                matched = [(traced.get(str(r["objectWriteTraceId"])), r) for r in results]
            elif len(results) == len(items):  # no trace ids at all: the input order
                matched = [((i, ch), r) for (i, ch, _), r in zip(items, results, strict=True)]
            else:
                matched = []
        for hit, r in matched:
            if hit is not None and r.get("id") is not None:
                i, ch = hit
                out[i] = PushResult(ch.idempotency_key, True, crm_id=str(r.get("id")),
                                    created=bool(r.get("new", False)))
        ids = {str(inp["id"]): (i, ch) for i, ch, inp in items}
        for err in body.get("errors") or []:
            ctx = err.get("context") or {}
            for k in [str(x) for x in (ctx.get("ids") or []) + (ctx.get("objectWriteTraceId") or [])]:
                if k in ids and ids[k][0] not in out:
                    i, ch = ids[k]
                    out[i] = PushResult(ch.idempotency_key, False, error=str(err.get("message") or "rejected"),
                                        error_code=str(err.get("category") or "VALIDATION_ERROR"))
        for i, ch, _ in items:
            if i not in out:
                out[i] = PushResult(ch.idempotency_key, False,
                                    error="HubSpot returned no result for this record: retry the sync.",
                                    error_code="NO_RESULT")
        return out


_INVALID_PREFIX = "Property values were not valid: "
#: Errors about the property itself rather than its value: every input that carries the property is named.
_PROPERTY_ERRORS = {"PROPERTY_DOESNT_EXIST", "READ_ONLY_VALUE"}


def _invalid_properties(resp: httpx.Response) -> list[Mapping[str, Any]] | None:
    """The ``[{"isValid": false, "message", "error", "name"}]`` list a whole-batch VALIDATION_ERROR embeds
    in its message (as quoted in Atlas-Authority/marketing-automation#174), or None for any other 400."""
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, Mapping) or body.get("category") != "VALIDATION_ERROR":
        return None
    message = str(body.get("message") or "")
    if not message.startswith(_INVALID_PREFIX):
        return None
    try:
        details = json.loads(message[len(_INVALID_PREFIX):])
    except ValueError:
        return []
    if not isinstance(details, list):
        return []
    return [d for d in details if isinstance(d, Mapping) and d.get("name")]


def _named_inputs(details: list[Mapping[str, Any]],
                  items: list[tuple[int, OpportunityChange, dict[str, Any]]]) -> set[int]:
    """The inputs an error list speaks of: those whose value of the named property the message quotes
    (HubSpot opens the message with the value: "x was not one of the allowed options…", "x was not a valid
    number."), or, for errors about the property itself, those that carry it. Another input with the same
    value of the same property is invalid for the same reason, so no good input is ever named."""
    named: set[int] = set()
    for d in details:
        name, message, code = str(d["name"]), str(d.get("message") or ""), str(d.get("error") or "")
        for i, _, inp in items:
            props = inp.get("properties") or {}
            if name not in props:
                continue
            value = str(props[name])
            if code in _PROPERTY_ERRORS or (value and (message.startswith(value + " ")
                                                       or f" {value} is invalid" in message)):
                named.add(i)
    return named


def _results(body: Any) -> list[dict[str, Any]]:
    results = body.get("results") if isinstance(body, Mapping) else None
    if not isinstance(results, list):
        raise MalformedResponse("HubSpot answered without a results list.")
    return results


def _json(resp: httpx.Response, who: str) -> Any:
    if "html" in resp.headers.get("Content-Type", "").lower():
        raise MalformedResponse(
            f"{who} answered an HTML page (HTTP {resp.status_code}) instead of JSON: a proxy or login page is in "
            "the way — check the API URL."
        )
    try:
        return resp.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedResponse(
            f"{who} answered HTTP {resp.status_code} with a body that is not complete JSON: retry the sync."
        ) from exc


def _transport_error(exc: httpx.HTTPError, who: str) -> ProviderError:
    if isinstance(exc, httpx.RemoteProtocolError) and "incomplete" in str(exc).lower():
        return MalformedResponse(f"{who} closed the connection mid-answer (truncated body): retry the sync.")
    if isinstance(exc, httpx.TimeoutException):
        return ProviderUnavailable(f"{who} did not answer in time ({type(exc).__name__}): retry later.")
    text = str(exc)
    if "CERTIFICATE" in text.upper() or "SSL" in text.upper():
        return ProviderUnavailable(f"TLS with {who} failed ({text[:120]}): check the URL and its certificate.")
    return ProviderUnavailable(f"Could not reach {who} ({type(exc).__name__}): check the URL and the network.")


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)
