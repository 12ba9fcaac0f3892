"""AES-256-GCM envelope encryption: tenant data keys (DEKs) wrapped by a KEK, credentials sealed by a DEK.

Every ciphertext is ``0x01 || 96-bit random nonce || ciphertext+tag``. Its associated data names what
it belongs to, so a ciphertext copied into another row (another tenant, account, user, purpose, id
or version) fails authentication instead of decrypting. Every failure is the same opaque
``CredentialInvalid``: the reason (wrong key, edited bytes, moved row) is not told apart.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.errors import CredentialInvalid

FORMAT = b"\x01"
NONCE_BYTES = 12
TAG_BYTES = 16
DEK_BYTES = 32


def new_dek() -> bytes:
    return os.urandom(DEK_BYTES)


def credential_aad(
    *, tenant_id: int, crm_account_id: int | None, app_user_id: int | None, purpose: str, credential_id: int,
    version: int,
) -> bytes:
    user = "api" if app_user_id is None else str(app_user_id)
    account = "-" if crm_account_id is None else str(crm_account_id)
    return (
        f"crmbridge/vault/credential/v1|tenant={tenant_id}|account={account}|user={user}|purpose={purpose}"
        f"|id={credential_id}|version={version}"
    ).encode()


def dek_aad(*, tenant_id: int, kek_id: str, dek_version: int) -> bytes:
    return f"crmbridge/vault/dek/v1|tenant={tenant_id}|kek={kek_id}|version={dek_version}".encode()


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return FORMAT + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def malformed(blob: object) -> str | None:
    """Why a stored ciphertext cannot be one of ours at all (before any key is tried), or None.

    A row damaged outside the vault — a text value where bytes belong, a cut-off copy — is told
    apart from a well-formed ciphertext that fails authentication (which may be an attack)."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        return f"it is stored as {type(blob).__name__}, not bytes"
    size = len(blob)
    if size < 1 + NONCE_BYTES + TAG_BYTES:
        return f"it is truncated ({size} bytes, at least {1 + NONCE_BYTES + TAG_BYTES} expected)"
    if bytes(blob[:1]) != FORMAT:
        return "it does not start with the vault's format byte"
    return None


def open_sealed(key: bytes, blob: bytes, aad: bytes, *, what: str = "credential") -> bytes:
    """Decrypt and authenticate, or raise the one opaque ``CredentialInvalid`` (also for a value
    that is not bytes at all: nothing here crashes on a damaged row)."""
    if malformed(blob) is not None:
        raise invalid(what)
    blob = bytes(blob)
    try:
        return AESGCM(key).decrypt(blob[1:1 + NONCE_BYTES], blob[1 + NONCE_BYTES:], aad)
    except InvalidTag:
        raise invalid(what) from None


def invalid(what: str = "credential") -> CredentialInvalid:
    """The one opaque error for every decryption failure."""
    return CredentialInvalid(
        f"The stored {what} did not decrypt: it was altered or moved, or the vault key is wrong. "
        "It will not be used; ask the user to reconnect (or store the secret again) and check the audit log."
    )


def wrap_dek(kek: bytes, dek: bytes, *, tenant_id: int, kek_id: str, dek_version: int) -> bytes:
    return seal(kek, dek, dek_aad(tenant_id=tenant_id, kek_id=kek_id, dek_version=dek_version))


def unwrap_dek(kek: bytes, wrapped: bytes, *, tenant_id: int, kek_id: str, dek_version: int) -> bytes:
    return open_sealed(kek, wrapped, dek_aad(tenant_id=tenant_id, kek_id=kek_id, dek_version=dek_version),
                       what=f"data key of tenant {tenant_id}")
