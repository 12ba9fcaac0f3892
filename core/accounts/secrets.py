"""Where console-side secrets (TOTP seeds, webhook signing keys) are kept.

A secret that belongs to a tenant goes into the vault (``core.vault.service.put``/``use``): it is
encrypted with that tenant's data key, audited on every use and shredded with the tenant.

The vault has no platform-level key (every data key belongs to a tenant), so secrets of accounts
without a tenant (staff, leadership) are sealed here with AES-256-GCM under a platform key derived
(``core.keys.PLATFORM_SEAL``, HKDF-SHA256) from the server secret, which lives outside the database
like the vault's KEKs. The associated data binds each ciphertext to its owner and purpose, so a
ciphertext copied to another row does not open. The stored reference is ``sealed:v1:<base64>``; a
vault reference is ``vault:<id>``. When the vault offers a platform key, only this module changes.
"""

from __future__ import annotations

import base64
import binascii
import os
from datetime import datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlmodel import Session

from core.errors import CredentialInvalid
from core.keys import PLATFORM_SEAL, derive_key
from core.tenants.access import Principal

SEALED_PREFIX = "sealed:v1:"
_NONCE = 12


def _platform_key() -> bytes:
    return derive_key(PLATFORM_SEAL)


def _aad(owner: str, purpose: str) -> bytes:
    return f"crmbridge/accounts/sealed/v1|owner={owner}|purpose={purpose}".encode()


def seal_platform(secret: str, *, owner: str, purpose: str) -> str:
    nonce = os.urandom(_NONCE)
    blob = nonce + AESGCM(_platform_key()).encrypt(nonce, secret.encode(), _aad(owner, purpose))
    return SEALED_PREFIX + base64.urlsafe_b64encode(blob).decode()


def open_platform(ref: str, *, owner: str, purpose: str) -> str:
    try:
        blob = base64.urlsafe_b64decode(ref[len(SEALED_PREFIX):].encode())
        return AESGCM(_platform_key()).decrypt(blob[:_NONCE], blob[_NONCE:], _aad(owner, purpose)).decode()
    except (InvalidTag, ValueError, binascii.Error):
        raise CredentialInvalid(
            "A stored console secret did not decrypt (altered, moved, or the server secret changed): "
            "reset it (for a second factor: an admin resets the account's two-factor authentication)."
        ) from None


def store_secret(
    session: Session, *, principal: Principal, tenant_id: int | None, owner: str, purpose: str, secret: str,
    now: datetime | None = None,
) -> str:
    """Store ``secret`` and return the reference to keep. ``owner`` names the row it belongs to
    (``console_account:12``); ``purpose`` is lowercase letters, digits and dashes."""
    if tenant_id is None:
        return seal_platform(secret, owner=owner, purpose=purpose)
    from core.vault import service as vault

    ref = vault.put(session, principal=principal, tenant_id=tenant_id, purpose=purpose, secret=secret,
                    kind="api_token", now=now)
    return str(ref)


def read_secret(
    session: Session, ref: str, *, principal: Principal, owner: str, purpose: str, reason: str,
    now: datetime | None = None,
) -> str:
    """The secret behind ``ref``. For a vault reference this goes through ``vault.use`` (audited; it
    commits the caller's open transaction first, so call it before writing anything)."""
    if ref.startswith(SEALED_PREFIX):
        return open_platform(ref, owner=owner, purpose=purpose)
    from core.vault import service as vault

    with vault.use(session, ref, principal=principal, reason=reason, now=now) as secret:
        return secret.get_secret_value()


def forget_secret(session: Session, ref: str, *, principal: Principal | str, reason: str,
                  now: datetime | None = None) -> None:
    """Destroy the secret (a sealed one disappears with the row that holds its reference)."""
    if ref.startswith(SEALED_PREFIX):
        return
    from core.vault import service as vault

    vault.revoke(session, ref, principal=principal, reason=reason, now=now)
