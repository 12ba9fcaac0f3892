"""Salesforce over the SOAP Partner API (zeep, with the WSDL shipped in wsdl/partner.wsdl), OAuth 2.0
and REST ``/limits`` through simple-salesforce.

Authentication (``account.auth_mode``, or inferred from the credential mode):

- ``oauth_client_credentials`` — API user: the app's Run As user (a Salesforce Integration user);
  credential ``{client_id, client_secret}``.
- ``jwt_bearer`` — API user: ``{client_id, username, private_key}`` (RS256 assertion, 3-minute expiry).
- ``oauth_authorization_code`` — each user's own OAuth grant (web-server flow + PKCE, see
  ``authorization_url``/``exchange_code`` and core.connections.routes): ``{client_id, client_secret?,
  refresh_token, access_token?}``; the access token is the SOAP session id; a rotated refresh token
  is handed to ``on_credential_update``.
- ``password`` — legacy per-user SOAP ``login()`` with ``{username, password, security_token}``;
  **retires in Summer '27** (catalog: ``retirements``), and every password change breaks it.

Session reuse: one login per provider instance, or across instances through a ``SessionCache`` the
caller passes (keyed by the account and a fingerprint of the credential, never the secret itself).
An ``INVALID_SESSION_ID`` (or REST 401) makes the provider log in / refresh once and repeat the call;
only if that fails is it ``AuthenticationFailed`` — which, for a per-user credential, is reported to
``on_auth_failure`` (the vault destroys the credential and asks the user to reconnect).

Every vendor error is mapped in ``map_fault`` / ``_map_oauth_error`` / ``_map_rest_error`` / the
transport handlers to ``core.errors`` with a message naming the fix. API usage comes from the
``LimitInfoHeader`` of every call (``last_api_usage``) or from REST ``/limits``.

Opportunity changes (``OpportunityChange.fields``) use neutral keys — ``name``, ``stage``, ``amount``,
``close_date``, ``owner_id`` — or Salesforce API names (``StageName``, ``Custom__c``) as they are.
Creates are ``upsert()`` on the idempotency external-ID field (``external_id_field`` setting, default
``CrmBridge_Key__c``), so a retried batch updates instead of duplicating; changes with a ``crm_id``
are ``update()``; both in batches of 200, Salesforce's limit per call.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlencode, urlsplit

import requests
import zeep
import zeep.exceptions
from lxml import etree
from zeep.transports import Transport

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
# zeep logs every SOAP envelope at DEBUG on "zeep.transports": login() passwords, security tokens and
# session ids. Pin that logger above DEBUG so turning the root logger to DEBUG never writes secrets.
logging.getLogger("zeep.transports").setLevel(logging.INFO)

WSDL_PATH = Path(__file__).resolve().parent / "wsdl" / "partner.wsdl"
BINDING = "{urn:partner.soap.sforce.com}SoapBinding"
SOBJECT_NS = "urn:sobject.partner.soap.sforce.com"
XSI_NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"
API_VERSION = "58.0"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_EXTERNAL_ID = "CrmBridge_Key__c"
OPPORTUNITY_FIELDS = ["Id", "Name", "StageName", "Amount", "CloseDate", "OwnerId", "LastModifiedDate"]
NEUTRAL_FIELDS = {"name": "Name", "stage": "StageName", "amount": "Amount", "close_date": "CloseDate",
                  "owner_id": "OwnerId"}
FULL_LICENSE = "Salesforce"
INTEGRATION_LICENSE = "Salesforce Integration"

T = TypeVar("T")


def _well_formed_parser() -> etree.XMLParser:
    # a fresh parser per call: lxml parser objects must not be shared between threads
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, recover=False)

# code → (error class, message, fix). Messages never carry a secret.
FAULTS: dict[str, tuple[type[ProviderError], str, str]] = {
    "INVALID_LOGIN": (
        AuthenticationFailed,
        "Salesforce rejected the username, password or security token (INVALID_LOGIN)",
        "Reconnect with the current password and security token (Settings → Reset My Security Token); "
        "better, switch this account to OAuth.",
    ),
    "LOGIN_MUST_USE_SECURITY_TOKEN": (
        AuthenticationFailed,
        "Salesforce needs the security token with the password from this network "
        "(LOGIN_MUST_USE_SECURITY_TOKEN)",
        "Reconnect with the password followed by the security token (Settings → Reset My Security "
        "Token), or add CRM Bridge's addresses to the org's trusted IP ranges.",
    ),
    "PASSWORD_LOCKOUT": (
        AuthenticationFailed,
        "The Salesforce user is locked out after too many failed logins (PASSWORD_LOCKOUT)",
        "A Salesforce admin unlocks the user (Setup → Users), then the user reconnects.",
    ),
    "INVALID_OPERATION_WITH_EXPIRED_PASSWORD": (
        AuthenticationFailed,
        "The Salesforce password has expired (INVALID_OPERATION_WITH_EXPIRED_PASSWORD)",
        "Log in to Salesforce to set a new password, then reconnect with it and the new security token.",
    ),
    "INVALID_SESSION_ID": (
        SessionExpired,
        "The Salesforce session expired or was revoked (INVALID_SESSION_ID)",
        "CRM Bridge logs in again automatically; if this keeps happening, reconnect the credential.",
    ),
    "API_DISABLED_FOR_ORG": (
        ApiDisabled,
        "API access is not enabled for this org (API_DISABLED_FOR_ORG)",
        "Professional edition needs the API add-on, or upgrade to Enterprise.",
    ),
    "API_CURRENTLY_DISABLED": (
        ApiDisabled,
        "API access is disabled for this Salesforce user (API_CURRENTLY_DISABLED)",
        'Give the user the "API Enabled" permission (profile or permission set) in Salesforce Setup.',
    ),
    "REQUEST_LIMIT_EXCEEDED": (
        RateLimited,
        "The org's API request limit is used up (REQUEST_LIMIT_EXCEEDED)",
        "Wait for the rolling 24-hour window to free calls, buy more API calls, or sync less often.",
    ),
    "SERVER_UNAVAILABLE": (
        ProviderUnavailable,
        "Salesforce is temporarily unavailable (SERVER_UNAVAILABLE)",
        "Try again later; check status.salesforce.com.",
    ),
    "EXCEEDED_ID_LIMIT": (
        ProviderRejected,
        "More than 200 records were sent in one call (EXCEEDED_ID_LIMIT)",
        "This is a CRM Bridge bug (writes go in batches of 200): report it to support.",
    ),
    "INVALID_BATCH_SIZE": (
        ProviderRejected,
        "The query batch size is outside 200–2,000 (INVALID_BATCH_SIZE)",
        "Set query_batch_size on the account between 200 and 2000.",
    ),
    "INVALID_FIELD": (
        ProviderRejected,
        "Salesforce does not know a field CRM Bridge uses (INVALID_FIELD)",
        "Create the field named in the message on Opportunity (the idempotency external-ID field must "
        "be a unique External ID text field), or fix the account's field settings.",
    ),
}


# -- transport ------------------------------------------------------------------------------------
class _BoundedTransport(Transport):
    """zeep's transport over the caller's requests.Session, refusing oversized bodies."""

    def __init__(self, *, session: requests.Session, timeout: float, max_bytes: int) -> None:
        super().__init__(session=session, timeout=timeout, operation_timeout=timeout)
        self.max_bytes = max_bytes
        self.last_response: requests.Response | None = None

    def post(self, address: str, message: Any, headers: Any) -> requests.Response:
        response = super().post(address, message, headers)
        self.last_response = response
        declared = response.headers.get("Content-Length")
        if (declared and declared.isdigit() and int(declared) > self.max_bytes) or (
            len(response.content) > self.max_bytes
        ):
            raise MalformedResponse(
                f"Salesforce sent a response larger than {self.max_bytes} bytes",
                fix="Lower query_batch_size on the account, or report this to CRM Bridge support.",
            )
        # zeep parses with recover=True when strict=False (which real, newer responses need): refuse
        # a cut-off or otherwise broken body here, before it could be read as a shorter valid one.
        try:
            etree.fromstring(response.content, _well_formed_parser())
        except etree.XMLSyntaxError as exc:
            if response.status_code >= 500 or response.status_code == 429:
                raise _map_http_status(response.status_code, "calling the SOAP API",
                                       response.headers.get("Retry-After")) from exc
            raise MalformedResponse(
                "Salesforce answered with something that is not a valid SOAP message (cut off or not XML)",
                fix="Try again; if it persists, check the instance URL.",
            ) from exc
        return response


@contextmanager
def _network(what: str, host: str) -> Iterator[None]:
    """Map requests/zeep transport failures to ProviderUnavailable / MalformedResponse."""
    try:
        yield
    except requests.exceptions.SSLError as exc:
        raise ProviderUnavailable(
            f"The TLS handshake with {host} failed while {what}",
            fix="Check the instance URL; the server's certificate must be trusted (sandbox: its CA file).",
        ) from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise ProviderUnavailable(
            f"Could not reach Salesforce at {host} while {what} (connection refused or timed out)",
            fix="Check the My Domain URL on the account and try again; see status.salesforce.com.",
        ) from exc
    except requests.exceptions.RequestException as exc:
        raise ProviderUnavailable(
            f"The request to {host} failed while {what}", fix="Try again; check the instance URL."
        ) from exc
    except zeep.exceptions.TransportError as exc:
        raise _map_http_status(exc.status_code, what) from exc
    except (zeep.exceptions.XMLSyntaxError, zeep.exceptions.XMLParseError, etree.XMLSyntaxError) as exc:
        raise MalformedResponse(
            f"Salesforce answered with something that is not a valid SOAP message while {what}",
            fix="This is usually an HTML error page or a cut-off response: try again; if it persists, "
            "check the instance URL.",
        ) from exc


def _map_http_status(status: int | None, what: str, retry_after: str | None = None) -> ProviderError:
    if status == 429:
        return RateLimited(
            f"Salesforce is throttling requests (HTTP 429) while {what}",
            retry_after=_seconds(retry_after),
            fix="Wait and retry; reduce concurrent syncs for this org.",
            code="429",
        )
    if status is not None and status >= 500:
        return ProviderUnavailable(
            f"Salesforce answered HTTP {status} while {what}",
            fix="Salesforce is having trouble; CRM Bridge retries later. Check status.salesforce.com.",
            code=str(status),
        )
    return MalformedResponse(
        f"Salesforce answered HTTP {status} with a body that is not a SOAP message while {what}",
        fix="Check the instance URL (it must be the org's My Domain, not a web page).",
        code=str(status),
    )


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def map_fault(fault: zeep.exceptions.Fault) -> ProviderError:
    """A Salesforce SOAP fault → the most specific core error (with the fix)."""
    code = (fault.code or "").split(":")[-1]
    message = fault.message or ""
    if isinstance(fault.detail, etree._Element):
        exc_code = fault.detail.find(".//{urn:fault.partner.soap.sforce.com}exceptionCode")
        exc_msg = fault.detail.find(".//{urn:fault.partner.soap.sforce.com}exceptionMessage")
        if exc_code is not None and exc_code.text:
            code = exc_code.text
        if exc_msg is not None and exc_msg.text:
            message = exc_msg.text
    known = FAULTS.get(code)
    if known is None:
        return ProviderRejected(
            f"Salesforce refused the call ({code}): {message}",
            fix="Check the message; if it names a field or permission, fix it in Salesforce Setup.",
            code=code,
        )
    cls, text, fix = known
    if cls is RateLimited:
        return RateLimited(text, retry_after=None, fix=fix, code=code)
    return cls(text, fix=fix, code=code)


LOGIN_HOST = "https://login.salesforce.com"
TEST_HOST = "https://test.salesforce.com"
#: Hosts of sandbox (and scratch) orgs: My Domain ``<name>--<sandbox>.sandbox.my.salesforce.com``,
#: ``….scratch.my.salesforce.com``, the legacy ``<name>--<sandbox>.<cs instance>.my.salesforce.com`` and
#: ``csNN.salesforce.com`` forms, and test.salesforce.com itself.
_SANDBOX_HOST = re.compile(
    r"(^|\.)(sandbox|scratch)\.my\.salesforce\.com$|--[a-z0-9-]+\.(cs\d+\.)?my\.salesforce\.com$"
    r"|^cs\d+\.salesforce\.com$|^test\.salesforce\.com$",
    re.IGNORECASE,
)


def jwt_audience_for(base_url: str, override: Any = None) -> str:
    """The ``aud`` of a JWT bearer assertion for the org at ``base_url`` (Salesforce Help, "OAuth 2.0 JWT
    Bearer Flow for Server-to-Server Integration": the authorization server's URL —
    https://login.salesforce.com for production and Developer Edition orgs, https://test.salesforce.com for
    sandboxes). ``override`` is the account's ``jwt_audience`` field, which wins when set."""
    if override not in (None, ""):
        return str(override).rstrip("/")
    host = (urlsplit(base_url).hostname or "").lower()
    return TEST_HOST if _SANDBOX_HOST.search(host) else LOGIN_HOST


def _map_oauth_error(status: int, body: Any, mode: str) -> ProviderError:
    err = str(body.get("error", "")) if isinstance(body, dict) else ""
    desc = str(body.get("error_description", "")) if isinstance(body, dict) else ""
    if status >= 500:
        return _map_http_status(status, "getting an OAuth token")
    if err in {"invalid_client", "invalid_client_id"}:
        return AuthenticationFailed(
            f"Salesforce rejected the app's consumer key or secret ({err}: {desc})",
            fix="Copy the consumer key and secret again from the External Client App / Connected App.",
            code=err,
        )
    if err == "invalid_grant":
        fixes = {
            "oauth_client_credentials": "Enable the client credentials flow on the app and set its Run As "
            "user (a Salesforce Integration user).",
            "jwt_bearer": "Check the certificate uploaded to the app matches the private key, the "
            "username, and that the user's profile is pre-authorized for the app.",
            "jwt_bearer:audience": "The assertion's audience is not the login host this org accepts: a "
            "sandbox org takes https://test.salesforce.com, a production or Developer Edition org "
            "https://login.salesforce.com. Correct the account's My Domain URL, or set \"Login host for the "
            "JWT bearer flow (audience)\" on the account.",
            "oauth_authorization_code": "The user's Salesforce authorization was revoked or expired: the "
            "user reconnects through their connect link.",
        }
        key = f"{mode}:audience" if mode == "jwt_bearer" and "audience" in desc.lower() else mode
        return AuthenticationFailed(
            f"Salesforce refused the OAuth grant (invalid_grant: {desc})",
            fix=fixes.get(key, "Reconnect the credential."),
            code="invalid_audience" if key == "jwt_bearer:audience" else "invalid_grant",
        )
    if status == 429:
        return _map_http_status(429, "getting an OAuth token")
    return ProviderRejected(
        f"Salesforce's token endpoint refused the request ({err or status}: {desc})",
        fix="Check the app's OAuth settings (enabled flows, callback URL, scopes).",
        code=err or str(status),
    )


def _map_rest_error(status: int, content: Any) -> ProviderError:
    code = ""
    message = ""
    if isinstance(content, list) and content and isinstance(content[0], dict):
        code = str(content[0].get("errorCode", ""))
        message = str(content[0].get("message", ""))
    if code in FAULTS:
        cls, text, fix = FAULTS[code]
        if cls is RateLimited:
            return RateLimited(text, fix=fix, code=code)
        return cls(text, fix=fix, code=code)
    if status == 401:
        cls, text, fix = FAULTS["INVALID_SESSION_ID"]
        return SessionExpired(text, fix=fix, code="INVALID_SESSION_ID")
    if status == 429 or status >= 500:
        return _map_http_status(status, "reading REST limits")
    return ProviderRejected(
        f"Salesforce REST refused the request (HTTP {status} {code}: {message})",
        fix='The user may lack "View Setup and Configuration" (needed for /limits).',
        code=code or str(status),
    )


# -- session cache -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SfSession:
    session_id: str
    server_url: str
    instance_url: str
    user_id: str | None
    org_id: str | None
    username: str | None = None

    def __repr__(self) -> str:  # never print the session id
        return f"SfSession(instance_url={self.instance_url!r}, user_id={self.user_id!r})"


class SessionCache:
    """Sessions shared across provider instances in one process (workers); never persisted."""

    def __init__(self, ttl_seconds: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._items: dict[str, tuple[float, SfSession]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> SfSession | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or self._clock() - item[0] > self._ttl:
                self._items.pop(key, None)
                return None
            return item[1]

    def put(self, key: str, session: SfSession) -> None:
        with self._lock:
            self._items[key] = (self._clock(), session)

    def drop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _parse_dt(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _parse_decimal(value: str | None) -> Decimal | None:
    if value in (None, ""):
        return None
    try:
        return Decimal(value)
    except InvalidOperation:
        return None


def record_fields(record: Any) -> dict[str, str | None]:
    """A Partner API sObject (zeep) → {field: text or None}; the doubled Id appears once."""
    out: dict[str, str | None] = {}
    if getattr(record, "Id", None):
        out["Id"] = record.Id
    for el in getattr(record, "_value_1", None) or []:
        if not isinstance(el, etree._Element):
            continue
        name = etree.QName(el).localname
        if name == "Id" and "Id" in out:
            continue
        out[name] = None if el.get(XSI_NIL) == "true" else el.text
    return out


# -- the provider --------------------------------------------------------------------------------
class SalesforceProvider(ProviderBase):
    slug: ClassVar[str] = "salesforce"
    max_write_batch: ClassVar[int] = 200
    max_page_size: ClassVar[int] = 2000
    api_version: ClassVar[str] = API_VERSION

    @classmethod
    def new_session_cache(cls) -> SessionCache:
        return SessionCache()

    def __init__(
        self,
        *,
        account: AccountConfig,
        credential: Credential,
        transport: HttpTransport,
        on_auth_failure: AuthFailureCallback | None = None,
        on_credential_update: CredentialUpdateCallback | None = None,
        clock: Clock = utcnow,
        session_cache: SessionCache | None = None,
    ) -> None:
        super().__init__(
            account=account, credential=credential, transport=transport, on_auth_failure=on_auth_failure,
            on_credential_update=on_credential_update, clock=clock,
        )
        self.mode = account.auth_mode or self._infer_mode()
        self._cache = session_cache
        self._session: SfSession | None = None
        self._soap_login = False
        self._client: zeep.Client | None = None
        self._zeep_transport: _BoundedTransport | None = None
        self._services: dict[str, Any] = {}
        self.last_api_usage: ApiUsage | None = None
        self.last_license_snapshot: LicenseSnapshot | None = None
        self.pages_read = 0
        self._access_token = secret_value(credential.get("access_token"))
        self._refresh_token = secret_value(credential.get("refresh_token"))

    # -- plumbing ------------------------------------------------------------------------------
    def _infer_mode(self) -> str:
        if self.account.credential_mode == "per_user_password":
            return "password"
        if self.account.credential_mode == "per_user_oauth":
            return "oauth_authorization_code"
        if self._credential.get("private_key"):
            return "jwt_bearer"
        return "oauth_client_credentials"

    @property
    def _host(self) -> str:
        return urlsplit(self.account.base_url).netloc or self.account.base_url

    def _zeep(self) -> zeep.Client:
        if self._client is None:
            self._zeep_transport = _BoundedTransport(
                session=self.transport.session(), timeout=self.transport.timeout,
                max_bytes=self.transport.max_response_bytes,
            )
            settings = zeep.Settings(strict=False, xml_huge_tree=False, forbid_dtd=True,
                                     forbid_entities=True, forbid_external=True)
            self._client = zeep.Client(str(WSDL_PATH), transport=self._zeep_transport, settings=settings)
        return self._client

    def _service(self, address: str) -> Any:
        svc = self._services.get(address)
        if svc is None:
            svc = self._zeep().create_service(BINDING, address)
            self._services[address] = svc
        return svc

    def _cache_key(self) -> str:
        parts = [self.account.base_url, self.mode]
        for name in ("client_id", "username", "client_secret", "password", "security_token",
                     "private_key", "refresh_token"):
            v = cred_or_setting(self._credential, self.account, name)
            parts.append(hashlib.sha256((v or "").encode()).hexdigest()[:16])
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _soap_url(self, instance_url: str, org_id: str | None) -> str:
        org = (org_id or "")[:15]
        return f"{instance_url.rstrip('/')}/services/Soap/u/{self.api_version}" + (f"/{org}" if org else "")

    # -- authentication ---------------------------------------------------------------------------
    def session(self) -> SfSession:
        """The current session, logging in (or fetching a token) when there is none."""
        if self._session is None and self._cache is not None:
            self._session = self._cache.get(self._cache_key())
        if self._session is None:
            try:
                self._session = self._authenticate()
            except AuthenticationFailed as exc:
                raise self._auth_failed(exc) from exc
            if self._cache is not None:
                self._cache.put(self._cache_key(), self._session)
        return self._session

    def _forget_session(self) -> None:
        self._session = None
        self._access_token = None
        if self._cache is not None:
            self._cache.drop(self._cache_key())

    def _authenticate(self) -> SfSession:
        self._auth_calls += 1
        if self.mode == "password":
            return self._login_password()
        if self.mode == "oauth_client_credentials":
            grant = self._token_request({
                "grant_type": "client_credentials",
                "client_id": self._need("client_id"),
                "client_secret": self._need("client_secret"),
            })
            return self._session_from_grant(grant)
        if self.mode == "jwt_bearer":
            grant = self._token_request({"grant_type": JWT_GRANT, "assertion": self._jwt_assertion()})
            return self._session_from_grant(grant)
        if self.mode == "oauth_authorization_code":
            if self._access_token:
                token, self._access_token = self._access_token, None
                return self._session_from_identity(token, self.account.base_url)
            if not self._refresh_token:
                raise AuthenticationFailed(
                    "There is no Salesforce authorization for this user",
                    fix="The user connects Salesforce through their connect link.",
                )
            form = {"grant_type": "refresh_token", "client_id": self._need("client_id"),
                    "refresh_token": self._refresh_token}
            secret = cred_or_setting(self._credential, self.account, "client_secret")
            if secret:
                form["client_secret"] = secret
            grant = self._token_request(form)
            if grant.refresh_token and grant.refresh_token != self._refresh_token:
                self._refresh_token = grant.refresh_token
                if self._on_credential_update is not None:
                    self._on_credential_update({"refresh_token": grant.refresh_token})
            return self._session_from_grant(grant)
        raise ConfigurationError(
            f"Salesforce has no auth mode {self.mode!r}",
            fix="Choose an auth mode from the catalog for this account.",
        )

    def _need(self, name: str) -> str:
        v = cred_or_setting(self._credential, self.account, name)
        if not v:
            raise ConfigurationError(
                f"The Salesforce credential is missing {name!r}",
                fix="Edit the CRM account and enter every field the auth mode asks for.",
            )
        return v

    def _login_password(self) -> SfSession:
        username = self._need("username")
        password = self._need("password") + (cred_or_setting(self._credential, self.account, "security_token")
                                             or "")
        svc = self._service(self._soap_url(self.account.base_url, None))
        with self._mapped("logging in"):
            result = svc.login(username=username, password=password)
        self._soap_login = True
        info = result.userInfo
        server = result.serverUrl or self._soap_url(self.account.base_url, None)
        parts = urlsplit(server)
        return SfSession(
            session_id=result.sessionId, server_url=server, instance_url=f"{parts.scheme}://{parts.netloc}",
            user_id=result.userId, org_id=getattr(info, "organizationId", None),
            username=getattr(info, "userName", None) or username,
        )

    def _jwt_assertion(self) -> str:
        import jwt as pyjwt

        audience = jwt_audience_for(self.account.base_url, self.account.setting("jwt_audience"))
        now = int(time.time())
        claims = {"iss": self._need("client_id"), "sub": self._need("username"), "aud": audience,
                  "exp": now + 180}
        try:
            return pyjwt.encode(claims, self._need("private_key"), algorithm="RS256")
        except (ValueError, TypeError, pyjwt.PyJWTError) as exc:
            raise AuthenticationFailed(
                "The private key for the JWT bearer flow cannot sign (not an RSA PEM key?)",
                fix="Paste the RSA private key (PEM) whose certificate is uploaded to the app.",
            ) from exc

    def _token_url(self) -> str:
        return f"{self.account.base_url}/services/oauth2/token"

    def _token_request(self, form: dict[str, str]) -> TokenGrant:
        return _post_token(self.transport, self._token_url(), form, self.mode)

    def _session_from_grant(self, grant: TokenGrant) -> SfSession:
        instance = (grant.instance_url or self.account.base_url).rstrip("/")
        org_id = user_id = None
        if grant.identity_url:  # https://host/id/<org id>/<user id>
            bits = grant.identity_url.rstrip("/").split("/")
            if len(bits) >= 2:
                org_id, user_id = bits[-2], bits[-1]
        return SfSession(session_id=grant.access_token, server_url=self._soap_url(instance, org_id),
                         instance_url=instance, user_id=user_id, org_id=org_id)

    def _session_from_identity(self, token: str, instance: str) -> SfSession:
        return SfSession(session_id=token, server_url=self._soap_url(instance, None),
                         instance_url=instance.rstrip("/"), user_id=None, org_id=None)

    # -- calls ---------------------------------------------------------------------------------
    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        try:
            with _network(what, self._host):
                yield
        except zeep.exceptions.Fault as fault:
            last = self._zeep_transport.last_response if self._zeep_transport else None
            if not fault.code and last is not None:
                # not a SOAP fault: an error page (zeep found no Fault element in it)
                raise _map_http_status(last.status_code, what, last.headers.get("Retry-After")) from fault
            raise map_fault(fault) from fault

    def _call(self, op: str, what: str, headers: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Call ``op`` with the session; on an expired session log in once more and repeat."""
        for attempt in (1, 2):
            sess = self.session()
            soap_headers = {"SessionHeader": {"sessionId": sess.session_id}, **(headers or {})}
            svc = self._service(sess.server_url)
            try:
                with self._mapped(what):
                    self._calls += 1
                    result = getattr(svc, op)(_soapheaders=soap_headers, **kwargs)
            except SessionExpired as exc:
                self._forget_session()
                if attempt == 2:
                    raise self._auth_failed(AuthenticationFailed(
                        "Salesforce rejected a fresh session right after logging in (INVALID_SESSION_ID)",
                        fix="Reconnect the credential; check the app's session policies (IP restrictions, "
                        "high-assurance sessions).",
                        code="INVALID_SESSION_ID",
                    )) from exc
                log.info("salesforce session expired for %s; authenticating again", self.account.label)
                continue
            return self._unwrap(result)
        raise AssertionError("unreachable")

    def _unwrap(self, result: Any) -> Any:
        header = getattr(result, "header", None)
        if header is not None:
            info = getattr(header, "LimitInfoHeader", None)
            for li in getattr(info, "limitInfo", None) or []:
                if (li.type or "").upper() == "API REQUESTS":
                    self.last_api_usage = ApiUsage(
                        used=int(li.current), limit=int(li.limit), window="24h rolling",
                        remaining=int(li.limit) - int(li.current), observed_at=self._clock(),
                        extra={"source": "LimitInfoHeader"},
                    )
        body = getattr(result, "body", None)
        if body is not None and hasattr(body, "result"):
            return body.result
        return result

    def query(self, soql: str, *, batch_size: int | None = None) -> Iterator[list[dict[str, str | None]]]:
        """Pages of records for ``soql`` (query, then queryMore with QueryOptions.batchSize)."""
        size = batch_size or self._batch_size()
        headers = {"QueryOptions": {"batchSize": size}}
        result = self._call("query", "querying", headers, queryString=soql)
        while True:
            self.pages_read += 1
            yield [record_fields(r) for r in (result.records or [])]
            if result.done or not result.queryLocator:
                return
            result = self._call("queryMore", "reading the next page", headers, queryLocator=result.queryLocator)

    def _batch_size(self) -> int:
        raw = self.account.setting("query_batch_size", self.max_page_size)
        try:
            return int(raw)
        except (TypeError, ValueError):
            return self.max_page_size

    def query_all(self, soql: str) -> list[dict[str, str | None]]:
        return [r for page in self.query(soql) for r in page]

    # -- Provider API --------------------------------------------------------------------------
    def test_connection(self) -> ConnectionReport:
        steps: list[StepResult] = []
        report = ConnectionReport(ok=False, steps=steps)
        started = time.perf_counter()

        def run(name: str, fn: Callable[[], str]) -> bool:
            t0 = time.perf_counter()
            try:
                detail = fn()
            except ProviderError as exc:
                steps.append(StepResult(name, False, exc.message, exc.fix,
                                        (time.perf_counter() - t0) * 1000, code=exc.code, error=type(exc)))
                return False
            steps.append(StepResult(name, True, detail, None, (time.perf_counter() - t0) * 1000))
            return True

        def reach() -> str:
            with _network("connecting", self._host):
                r = self.transport.session().get(f"{self.account.base_url}/services/data/",
                                                 timeout=self.transport.timeout)
            if r.status_code >= 500:
                raise _map_http_status(r.status_code, "connecting")
            return f"{self._host} answered over HTTPS (HTTP {r.status_code})"

        def authenticate() -> str:
            s = self.session()
            how = {"password": "SOAP login (legacy, retiring Summer '27)",
                   "oauth_client_credentials": "OAuth client credentials",
                   "jwt_bearer": "OAuth JWT bearer",
                   "oauth_authorization_code": "OAuth refresh token"}.get(self.mode, self.mode)
            return f"Authenticated with {how}" + (f" as {s.username}" if s.username else "")

        def api_access() -> str:
            info = self._call("getUserInfo", "reading the user")
            report.identity = info.userName
            report.crm_user_id = info.userId
            report.org_id = info.organizationId
            return f"API call accepted: {info.userName} in {info.organizationName} ({info.organizationId})"

        def licenses() -> str:
            snap = self.license_snapshot()
            report.licenses = snap
            report.detected_edition = self.detect_edition()
            text = (f"{snap.used} of {snap.total} Salesforce licenses used; "
                    f"{snap.integration_used} of {snap.integration_total} Integration licenses used")
            if report.detected_edition and report.detected_edition != self.account.edition:
                text += (f". The org reports edition {report.detected_edition!r} but the account says "
                         f"{self.account.edition!r}: update the account's edition.")
            return text

        def quota() -> str:
            usage = self.api_usage()
            report.api_usage = usage
            if usage is None:
                return "Salesforce reported no API usage"
            pct = usage.fraction * 100
            return f"{usage.used:,} of {usage.limit:,} API requests used in the rolling 24 h ({pct:.0f}%)"

        for name, fn in (("reach", reach), ("authenticate", authenticate), ("api_access", api_access),
                         ("licenses", licenses), ("quota", quota)):
            if not run(name, fn):
                break
        report.ok = len(steps) == 5 and all(s.ok for s in steps)
        report.latency_ms = (time.perf_counter() - started) * 1000
        return report

    def detect_edition(self) -> str | None:
        from core.providers.catalog import get_catalog

        rows = self.query_all("SELECT OrganizationType FROM Organization")
        reported = rows[0].get("OrganizationType") if rows else None
        return get_catalog().provider("salesforce").detect_edition(reported)

    def license_snapshot(self) -> LicenseSnapshot:
        rows = self.query_all(
            "SELECT Name, MasterLabel, Status, TotalLicenses, UsedLicenses FROM UserLicense"
        )
        detail: list[dict[str, Any]] = [
            {"name": r.get("Name"), "label": r.get("MasterLabel"), "status": r.get("Status"),
             "total": int(r.get("TotalLicenses") or 0), "used": int(r.get("UsedLicenses") or 0)}
            for r in rows
        ]

        def counts(name: str) -> tuple[int, int]:
            row = next((d for d in detail if d["name"] == name), None)
            return (int(row["total"]), int(row["used"])) if row else (0, 0)

        total, used = counts(FULL_LICENSE)
        integration_total, integration_used = counts(INTEGRATION_LICENSE)
        snap = LicenseSnapshot(total=total, used=used, integration_total=integration_total,
                               integration_used=integration_used, detail=detail)
        self.last_license_snapshot = snap
        return snap

    def api_usage(self) -> ApiUsage | None:
        """Usage from the last call's LimitInfoHeader, else from REST /limits (simple-salesforce)."""
        if self.last_api_usage is not None:
            return self.last_api_usage
        return self.rest_limits()

    def rest_limits(self) -> ApiUsage:
        """``GET /services/data/vXX.X/limits`` through simple-salesforce (DailyApiRequests)."""
        from simple_salesforce import Salesforce
        from simple_salesforce.exceptions import SalesforceError

        for attempt in (1, 2):
            sess = self.session()
            sf = Salesforce(instance_url=sess.instance_url, session_id=sess.session_id,
                            session=self.transport.session(), version=self.api_version)
            try:
                with _network("reading REST limits", self._host):
                    self._calls += 1
                    limits = sf.limits(timeout=self.transport.timeout)
            except SalesforceError as exc:
                mapped = _map_rest_error(exc.status, exc.content)
                if isinstance(mapped, SessionExpired):
                    self._forget_session()
                    if attempt == 1:
                        continue
                    raise self._auth_failed(AuthenticationFailed(
                        "Salesforce rejected a fresh session right after logging in (REST 401)",
                        fix="Reconnect the credential.", code="INVALID_SESSION_ID")) from exc
                raise mapped from exc
            except ValueError as exc:  # JSON decoding of an HTML page
                raise MalformedResponse(
                    "Salesforce's /limits answered something that is not JSON",
                    fix="Check the instance URL; try again later.",
                ) from exc
            daily = (limits or {}).get("DailyApiRequests") or {}
            try:
                limit = int(daily["Max"])
                remaining = int(daily["Remaining"])
            except (KeyError, TypeError, ValueError) as exc:
                raise MalformedResponse("Salesforce's /limits has no DailyApiRequests",
                                        fix="Check the API version and the user's permissions.") from exc
            usage = ApiUsage(used=limit - remaining, limit=limit, window="24h rolling", remaining=remaining,
                             observed_at=self._clock(), extra={"source": "REST /limits"})
            self.last_api_usage = usage
            return usage
        raise AssertionError("unreachable")

    def list_users(self) -> list[CrmUser]:
        rows = self.query_all("SELECT Id, Username, Name, Email, IsActive FROM User")
        return [CrmUser(crm_user_id=r["Id"] or "", email=r.get("Email"), name=r.get("Name") or "",
                        active=(r.get("IsActive") == "true"), username=r.get("Username")) for r in rows]

    @property
    def external_id_field(self) -> str:
        return str(self.account.setting("external_id_field", DEFAULT_EXTERNAL_ID))

    def _opportunity_fields(self) -> list[str]:
        fields = list(OPPORTUNITY_FIELDS)
        if self.external_id_field not in fields:
            fields.append(self.external_id_field)
        return fields

    def pull_opportunities(self, since: datetime | None) -> Iterator[Opportunity]:
        where = ""
        if since is not None:
            where = f" WHERE LastModifiedDate >= {since.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
        soql = (f"SELECT {', '.join(self._opportunity_fields())} FROM Opportunity{where} "
                "ORDER BY LastModifiedDate ASC")
        for page in self.query(soql):
            for r in page:
                close = r.get("CloseDate")
                yield Opportunity(
                    crm_id=r.get("Id") or "", name=r.get("Name") or "", stage=r.get("StageName"),
                    amount=_parse_decimal(r.get("Amount")),
                    close_date=date.fromisoformat(close[:10]) if close else None,
                    owner_id=r.get("OwnerId"), modified_at=_parse_dt(r.get("LastModifiedDate")) or self._clock(),
                    external_key=r.get(self.external_id_field), raw=dict(r),
                )

    def _sobject(self, change: OpportunityChange, *, with_id: bool) -> Any:
        client = self._zeep()
        values: dict[str, Any] = {}
        for key, value in change.fields.items():
            values[NEUTRAL_FIELDS.get(key, key)] = value
        values.pop("Id", None)
        if not with_id:
            values[self.external_id_field] = change.idempotency_key
        attribution_field = self.account.setting("attribution_field")
        if attribution_field and change.attribution:
            values[attribution_field] = change.attribution
        elements = []
        nulls = []
        for name, value in values.items():
            if value is None:
                nulls.append(name)
                continue
            el = etree.Element(f"{{{SOBJECT_NS}}}{name}")
            if isinstance(value, bool):
                el.text = "true" if value else "false"
            elif isinstance(value, datetime):
                el.text = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            elif isinstance(value, date):
                el.text = value.isoformat()
            else:
                el.text = str(value)
            elements.append(el)
        sobject_type = client.get_type(f"{{{SOBJECT_NS}}}sObject")
        return sobject_type(type="Opportunity", fieldsToNull=nulls,
                            Id=change.crm_id if with_id else None, _value_1=elements)

    def push_opportunities(self, changes: Sequence[OpportunityChange]) -> list[PushResult]:
        """Creates as upserts on the external-ID field, updates by Id; 200 per call; results in order."""
        results: list[PushResult | None] = [None] * len(changes)
        creates = [(i, c) for i, c in enumerate(changes) if not c.crm_id]
        updates = [(i, c) for i, c in enumerate(changes) if c.crm_id]
        headers = {"AllOrNoneHeader": {"allOrNone": False}}
        for batch in _chunks(creates, self.max_write_batch):
            objs = [self._sobject(c, with_id=False) for _, c in batch]
            res = self._call("upsert", "writing opportunities", headers,
                             externalIDFieldName=self.external_id_field, sObjects=objs)
            for (i, c), r in zip(batch, res or [], strict=False):
                results[i] = _push_result(c, r, created=bool(getattr(r, "created", False)))
        for batch in _chunks(updates, self.max_write_batch):
            objs = [self._sobject(c, with_id=True) for _, c in batch]
            res = self._call("update", "updating opportunities", headers, sObjects=objs)
            for (i, c), r in zip(batch, res or [], strict=False):
                results[i] = _push_result(c, r, created=False)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise MalformedResponse(
                f"Salesforce returned fewer results than records sent ({len(missing)} missing)",
                fix="Retry the push: creates are upserts on the idempotency key, so nothing duplicates.",
            )
        return [r for r in results if r is not None]

    def close(self) -> None:
        """Log out a SOAP login session we own (OAuth tokens and cached sessions are left alone)."""
        if self._session is not None and self._soap_login and self._cache is None:
            try:
                svc = self._service(self._session.server_url)
                with self._mapped("logging out"):
                    svc.logout(_soapheaders={"SessionHeader": {"sessionId": self._session.session_id}})
            except ProviderError as exc:
                log.info("salesforce logout failed (ignored): %s", exc.code or exc.message)
        self._session = None

    # -- per-user OAuth (web-server flow + PKCE) ----------------------------------------------------
    @classmethod
    def authorization_url(
        cls, account: AccountConfig, *, redirect_uri: str, state: str, code_challenge: str,
        login_hint: str | None = None,
    ) -> str:
        client_id = account.setting("client_id")
        if not client_id:
            raise ConfigurationError("The Salesforce account has no consumer key (client_id)",
                                     fix="Edit the CRM account and enter the app's consumer key.")
        params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                  "state": state, "code_challenge": code_challenge, "code_challenge_method": "S256",
                  "scope": "api refresh_token"}
        if login_hint:
            params["login_hint"] = login_hint
        return f"{account.base_url}/services/oauth2/authorize?{urlencode(params)}"

    @classmethod
    def exchange_code(
        cls, account: AccountConfig, credential: Credential, transport: HttpTransport, *,
        code: str, code_verifier: str, redirect_uri: str,
    ) -> TokenGrant:
        form = {"grant_type": "authorization_code", "code": code, "code_verifier": code_verifier,
                "redirect_uri": redirect_uri,
                "client_id": cred_or_setting(credential, account, "client_id") or ""}
        secret = cred_or_setting(credential, account, "client_secret")
        if secret:
            form["client_secret"] = secret
        return _post_token(transport, f"{account.base_url}/services/oauth2/token", form,
                           "oauth_authorization_code")


def _push_result(change: OpportunityChange, r: Any, *, created: bool) -> PushResult:
    if getattr(r, "success", False):
        return PushResult(change.idempotency_key, True, crm_id=r.id, created=created)
    errors = getattr(r, "errors", None) or []
    first = errors[0] if errors else None
    return PushResult(
        change.idempotency_key, False, crm_id=getattr(r, "id", None) or change.crm_id,
        error=getattr(first, "message", None) or "Salesforce rejected the record",
        error_code=str(getattr(first, "statusCode", "") or "") or None,
    )


def _post_token(transport: HttpTransport, url: str, form: dict[str, str], mode: str) -> TokenGrant:
    host = urlsplit(url).netloc
    with _network("getting an OAuth token", host):
        r = transport.session().post(url, data=form, timeout=transport.timeout,
                                     headers={"Accept": "application/json"})
    if len(r.content) > transport.max_response_bytes:
        raise MalformedResponse("Salesforce's token endpoint sent an oversized response",
                                fix="Check the instance URL.")
    try:
        body = r.json()
    except ValueError:
        if r.status_code >= 500 or r.status_code == 429:
            raise _map_http_status(r.status_code, "getting an OAuth token",
                                   r.headers.get("Retry-After")) from None
        raise MalformedResponse(
            f"Salesforce's token endpoint answered HTTP {r.status_code} with something that is not JSON",
            fix="Check the instance URL (the org's My Domain).",
        ) from None
    if r.status_code != 200:
        raise _map_oauth_error(r.status_code, body, mode)
    if not isinstance(body, dict) or not body.get("access_token"):
        raise MalformedResponse("Salesforce's token response has no access token",
                                fix="Check the app's OAuth settings.")
    return TokenGrant(
        access_token=str(body["access_token"]), instance_url=body.get("instance_url"),
        refresh_token=body.get("refresh_token"), identity_url=body.get("id"),
        expires_in=body.get("expires_in"), scope=body.get("scope"),
        extra={k: v for k, v in body.items() if k in {"issued_at", "token_type"}},
    )
