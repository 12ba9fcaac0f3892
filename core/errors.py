"""The error tree. Every package raises from it; pages catch only ``CrmBridgeError`` and show
``str(exc)``, which always says how to fix the problem (never a secret).

    CrmBridgeError
    ├── InvalidInput                 bad input from a user or a file; nothing was written
    │   ├── NotFound
    │   ├── Conflict                 duplicate slug, email, …
    │   ├── MetadataInvalid          IdP metadata that cannot be used
    │   └── SamlResponseInvalid      a SAML response that failed validation
    ├── AccessDenied                 the principal may not do this (tenant scope, role)
    ├── AuthError                    console sign-in problems
    │   ├── SignInFailed             one generic message for every failed sign-in
    │   ├── SessionInvalid           missing, forged, expired or revoked console session
    │   └── CsrfFailed
    ├── ConfigurationError           missing or wrong server configuration (keys, secrets)
    │   └── KeyMissing
    ├── VaultError
    │   ├── CredentialInvalid        tampered or undecryptable ciphertext (one opaque error)
    │   ├── CredentialExpired        TTL or idle limit passed
    │   ├── CredentialDestroyed      self-destructed, revoked or shredded: reconnect needed
    │   └── LinkInvalid              connect link forged, replayed or expired
    └── ProviderError                anything a CRM said or failed to say
        ├── ProviderUnavailable      could not talk to the CRM: timeout, refused, 5xx, TLS
        ├── MalformedResponse        the CRM answered something we cannot read
        └── ProviderRejected         the CRM answered and said no
            ├── AuthenticationFailed definitive: wrong password, revoked token (vault self-destructs)
            ├── SessionExpired       session or access token expired: log in / refresh once, silently
            ├── ApiDisabled          API not enabled for the org or user
            ├── RateLimited          quota or throttling; ``retry_after`` seconds when known
            └── RecordError          one record failed; ``record_key`` names it
"""

from __future__ import annotations


class CrmBridgeError(Exception):
    """Root of every error CRM Bridge raises on purpose. The message names the fix."""

    def __init__(self, message: str, *, fix: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.code = code

    def __str__(self) -> str:
        if self.fix and self.fix not in self.message:
            return f"{self.message} — {self.fix}"
        return self.message


class InvalidInput(CrmBridgeError):
    pass


class NotFound(InvalidInput):
    pass


class Conflict(InvalidInput):
    pass


class MetadataInvalid(InvalidInput):
    pass


class SamlResponseInvalid(InvalidInput):
    pass


class AccessDenied(CrmBridgeError):
    pass


class AuthError(CrmBridgeError):
    pass


class SignInFailed(AuthError):
    pass


class SessionInvalid(AuthError):
    pass


class CsrfFailed(AuthError):
    pass


class ConfigurationError(CrmBridgeError):
    pass


class KeyMissing(ConfigurationError):
    pass


class VaultError(CrmBridgeError):
    pass


class CredentialInvalid(VaultError):
    pass


class CredentialExpired(VaultError):
    pass


class CredentialDestroyed(VaultError):
    pass


class LinkInvalid(VaultError):
    pass


class ProviderError(CrmBridgeError):
    pass


class ProviderUnavailable(ProviderError):
    pass


class MalformedResponse(ProviderError):
    pass


class ProviderRejected(ProviderError):
    pass


class AuthenticationFailed(ProviderRejected):
    pass


class SessionExpired(ProviderRejected):
    pass


class ApiDisabled(ProviderRejected):
    pass


class RateLimited(ProviderRejected):
    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RecordError(ProviderRejected):
    def __init__(self, message: str, *, record_key: str | None = None, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.record_key = record_key


class DeliveryFailed(CrmBridgeError):
    """An email or webhook (alerts, invitations, reset links) could not be delivered."""
