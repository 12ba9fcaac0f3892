"""What a provider is constructed with: the account's settings, the secret, and the caller's transport.

Every provider class registered in ``core.providers.registry`` has this constructor (keyword-only)::

    cls(
        *,
        account: AccountConfig,                 # instance URL, edition, auth mode, non-secret settings
        credential: Credential,                 # the secret fields, from inside vault.use()
        transport: HttpTransport,               # the caller's HTTP clients (CA, timeouts, sessions)
        on_auth_failure: AuthFailureCallback | None = None,
        on_credential_update: CredentialUpdateCallback | None = None,
        clock: Clock = utcnow,
    )

- ``credential`` maps field names to values: ``{"client_id": ..., "client_secret": SecretStr(...)}``
  for an API user, ``{"username": ..., "password": SecretStr(...), "security_token": SecretStr(...)}``
  for the legacy per-user mode, ``{"refresh_token": SecretStr(...), "access_token": ...}`` for per-user
  OAuth. Values may be ``str`` or ``pydantic.SecretStr``; read them with :func:`secret_value`.
  Non-secret account settings needed to authenticate (client_id, username) may sit in either
  ``account.settings`` or the credential; :func:`cred_or_setting` looks in both.
- ``transport`` is the one seam to the network: providers never build their own clients; tests and
  the demo hand in clients that trust the sandbox CA; nothing reaches past what the caller allows.
- ``on_auth_failure(exc)`` is called once when a *per-user* credential is definitively rejected
  (``AuthenticationFailed``). The caller wires it to the vault's ``report_auth_failure`` so the stored
  credential self-destructs and the user is asked to reconnect. It is not called for API users.
- ``on_credential_update(fields)`` is called when the CRM rotated a secret (a new refresh token), so
  the caller can store it back in the vault. Access tokens are never handed out this way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from core.errors import AuthenticationFailed, ConfigurationError

if TYPE_CHECKING:
    import httpx
    import requests

    from core.providers.transport import CrmUrlPolicy, Resolver

Credential = Mapping[str, "SecretStr | str | None"]
AuthFailureCallback = Callable[[AuthenticationFailed], None]
CredentialUpdateCallback = Callable[[dict[str, str]], None]

CREDENTIAL_MODES = ("api_user", "per_user_oauth", "per_user_password")


@dataclass(frozen=True)
class AccountConfig:
    """One CRM account as a provider sees it (built from CrmAccount; providers never see the row)."""

    provider: str
    edition: str
    instance_url: str
    credential_mode: str = "api_user"
    auth_mode: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    account_id: int | None = None
    tenant_id: int | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.credential_mode not in CREDENTIAL_MODES:
            raise ConfigurationError(
                f"Unknown credential mode {self.credential_mode!r}: use one of {', '.join(CREDENTIAL_MODES)}."
            )
        if not self.instance_url:
            raise ConfigurationError("The CRM account has no instance URL: set it on the account.")

    @property
    def is_per_user(self) -> bool:
        return self.credential_mode != "api_user"

    @property
    def base_url(self) -> str:
        return self.instance_url.rstrip("/")

    def setting(self, name: str, default: Any = None) -> Any:
        v = self.settings.get(name)
        return default if v in (None, "") else v

    @classmethod
    def from_crm_account(cls, account: Any) -> AccountConfig:
        """Build from a ``CrmAccount`` row (duck-typed: providers do not import core.tenants)."""
        settings = json.loads(account.settings_json or "{}")
        return cls(
            provider=account.provider,
            edition=account.edition,
            instance_url=account.instance_url or settings.get("instance_url") or "",
            credential_mode=account.credential_mode,
            auth_mode=settings.get("auth_mode", ""),
            settings=settings,
            account_id=account.id,
            tenant_id=account.tenant_id,
            label=account.label,
        )


def secret_value(v: SecretStr | str | None) -> str | None:
    if isinstance(v, SecretStr):
        return v.get_secret_value()
    return v


def cred_or_setting(credential: Credential, account: AccountConfig, name: str) -> str | None:
    v = secret_value(credential.get(name))
    if v:
        return v
    s = account.setting(name)
    return str(s) if s is not None else None


def pinned_session(verify: str | bool = True) -> requests.Session:
    """A requests.Session whose ``verify`` wins over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE.

    Plain requests lets those environment variables replace ``session.verify`` on every request, so a
    session told to trust only the sandbox CA would silently use the system bundle instead.
    """
    import requests

    class _PinnedSession(requests.Session):
        def merge_environment_settings(  # type: ignore[override]
            self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
        ) -> Any:
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if verify is None and self.verify is not True:
                merged["verify"] = self.verify
            return merged

    s = _PinnedSession()
    s.verify = verify
    return s


@dataclass
class HttpTransport:
    """The caller's HTTP seam. Pass ready clients, or let it build guarded ones lazily trusting ``verify``.

    Built clients go through ``core.providers.transport.GuardedTransport``: only the vendors' hosts
    (``url_policy``; by default the catalog's vendor hosts and nothing else — the sandbox only when the
    policy names it), only checked public addresses (resolved once by ``resolver``, the connection
    pinned to the checked one), ``timeout`` seconds for the whole of one call (connect, headers and
    body), and at most ``max_response_bytes`` read from one answer (bigger → MalformedResponse, reading
    stops there). ``session()`` sends through that same client. Ready ``httpx_client`` /
    ``requests_session`` objects are used as given (unit tests over ``httpx.MockTransport``); the
    product never passes one.
    """

    verify: str | bool = True
    timeout: float = 30.0
    max_response_bytes: int = 20_000_000
    requests_session: requests.Session | None = None
    httpx_client: httpx.Client | None = None
    user_agent: str = "CRM-Bridge/0.1"
    url_policy: CrmUrlPolicy | None = None
    resolver: Resolver | None = None

    def policy(self) -> CrmUrlPolicy:
        from core.providers.transport import CrmUrlPolicy

        return self.url_policy or CrmUrlPolicy.vendors()

    def check_account(self, account: AccountConfig) -> None:
        """The account's URLs are on its provider's vendor hosts (or the policy's sandbox).

        Raises:
            ConfigurationError (code ``url_refused``), naming the URL and the fix.
        """
        from core.providers.transport import check_account_urls

        check_account_urls(self.policy(), account.provider, account.instance_url, account.settings)

    def session(self) -> requests.Session:
        """A requests.Session (zeep, simple-salesforce) sending through ``client()``."""
        if self.requests_session is None:
            from core.providers.transport import httpx_adapter

            s = pinned_session(self.verify)
            s.trust_env = False  # no proxy from the environment: it would bypass the address check
            s.headers["User-Agent"] = self.user_agent
            adapter = httpx_adapter(self.client)
            s.mount("https://", adapter)
            s.mount("http://", adapter)
            self.requests_session = s
        return self.requests_session

    def client(self) -> httpx.Client:
        """An httpx.Client (Web API / REST providers) over the guarded transport."""
        if self.httpx_client is None:
            from core.providers.transport import GuardedTransport, guarded_client

            transport = GuardedTransport(policy=self.policy(), verify=self.verify, deadline_s=self.timeout,
                                         max_bytes=self.max_response_bytes, resolver=self.resolver)
            self.httpx_client = guarded_client(transport, user_agent=self.user_agent)
        return self.httpx_client

    def close(self) -> None:
        if self.requests_session is not None:
            self.requests_session.close()
        if self.httpx_client is not None:
            self.httpx_client.close()
