"""Every key CRM Bridge derives from the server secret, in one place.

The server secret (``CRMBRIDGE_SECRET_KEY``, outside the database) is never used for two things at
once: each use has a named :class:`KeyPurpose` below, and ``derive_key(PURPOSE)`` returns that
purpose's 32-byte key. ``mac(PURPOSE, message)`` signs with it.

Purposes that predate this module keep the derivation they were created with, byte for byte, because
data sealed or signed under them is stored (audit chains and heads, platform-sealed secrets) or in
flight (connect links, OAuth state, CSRF tokens, SSO connect passes); ``tests/core/test_keys.py``
pins each one to a fixed vector. Their schemes:

- ``hmac``: key = HMAC-SHA256(secret, label)
- ``hkdf``: key = HKDF-SHA256(secret, salt=None, info=label), 32 bytes (use this for a new purpose)
- ``prefix``: no derived key; MAC = HMAC-SHA256(secret, label + message) (CSRF tokens, SSO connect
  passes, as they were written)

A new purpose: add a constant with ``scheme="hkdf"`` and a new ``crmbridge/<area>/<use>/v1`` label,
and a vector to the test. Never reuse a label, never change one (every ciphertext or MAC under it
stops verifying).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core.settings import get_settings

Scheme = Literal["hmac", "hkdf", "prefix"]


@dataclass(frozen=True)
class KeyPurpose:
    name: str
    label: bytes
    scheme: Scheme


AUDIT_CHAIN = KeyPurpose("audit-chain", b"crmbridge/audit-chain/v1", "hmac")
AUDIT_HEAD = KeyPurpose("audit-head", b"crmbridge/audit-head/v1", "hmac")
CONNECT_LINK = KeyPurpose("connect-link", b"crmbridge/vault/connect-link/v1", "hmac")
OAUTH_STATE = KeyPurpose("oauth-state", b"crmbridge/oauth-state/v1", "hmac")
PLATFORM_SEAL = KeyPurpose("platform-seal", b"crmbridge/accounts/platform-secret/v1", "hkdf")
CSRF = KeyPurpose("csrf", b"csrf|", "prefix")
SSO_CONNECT_PASS = KeyPurpose("sso-connect-pass", b"crmbridge/sso/connect-pass/v1|", "prefix")

PURPOSES: tuple[KeyPurpose, ...] = (
    AUDIT_CHAIN, AUDIT_HEAD, CONNECT_LINK, OAUTH_STATE, PLATFORM_SEAL, CSRF, SSO_CONNECT_PASS,
)
assert len({p.label for p in PURPOSES}) == len(PURPOSES), "each purpose needs its own label"

_cache: dict[tuple[bytes, bytes], bytes] = {}


def _secret(secret: bytes | None) -> bytes:
    return secret if secret is not None else get_settings().server_secret()


def derive_key(purpose: KeyPurpose, secret: bytes | None = None) -> bytes:
    """The 32-byte key for ``purpose`` (``secret`` defaults to the server secret; tests pass their own).

    Raises:
        ValueError: ``purpose`` signs with the secret itself (scheme ``prefix``): use ``mac``.
    """
    raw = _secret(secret)
    cached = _cache.get((purpose.label, raw))
    if cached is not None:
        return cached
    if purpose.scheme == "hmac":
        key = hmac.new(raw, purpose.label, hashlib.sha256).digest()
    elif purpose.scheme == "hkdf":
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.label).derive(raw)
    else:
        raise ValueError(f"the {purpose.name} purpose has no derived key: sign with core.keys.mac")
    if len(_cache) > 64:  # a test that rotates secrets must not grow this without bound
        _cache.clear()
    _cache[(purpose.label, raw)] = key
    return key


def mac(purpose: KeyPurpose, message: bytes, secret: bytes | None = None) -> bytes:
    """HMAC-SHA256 of ``message`` for ``purpose`` (with its derived key, or for a ``prefix`` purpose
    with the secret over label + message)."""
    if purpose.scheme == "prefix":
        return hmac.new(_secret(secret), purpose.label + message, hashlib.sha256).digest()
    return hmac.new(derive_key(purpose, secret), message, hashlib.sha256).digest()
