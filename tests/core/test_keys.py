"""One key-derivation helper (core.keys) for every use of the server secret, and the keys it derives
for the purposes that predate it are byte-for-byte the old ones: audit chains sealed, staff TOTP
seeds sealed, connect links and OAuth states signed before the change still verify after it.

The vectors below were produced by the code before core.keys existed (HMAC/HKDF written out in
core/tenants/audit.py, core/vault/connect.py (now core/connections/links.py), core/providers/routes.py
(now core/connections/routes.py), core/accounts/secrets.py, core/web.py and core/sso/service.py (now
core/sso/connect.py)), with the server secret bytes 01..20."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest

from core import keys
from core.settings import get_settings

SECRET = bytes(range(1, 33))
SECRET_ENV = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA"  # the same bytes, urlsafe base64

OLD_KEYS = {
    keys.AUDIT_CHAIN: "6093778c934d105f1bd111ea1070e88e8b66b42615480ffa2fa576ac290c1731",
    keys.AUDIT_HEAD: "96c4e9dc397892352c1b7aa71978939ed4062fe69c518eec634e32711b373f45",
    keys.CONNECT_LINK: "daac26fa6467334f06f5e7855ec2e9d96a2604ddd00458dcd70009b78f91e1ef",
    keys.OAUTH_STATE: "c4b7de60802866d2ba2335b62119c27ca41d66ce3a91f3c4b63c34294bf10f3b",
    keys.PLATFORM_SEAL: "01e9addf64da387925636002d9d6cd71029f9f5f9c49281ce2e5f385804be053",
}
# A staff TOTP seed sealed by the old core/accounts/secrets.py under SECRET.
OLD_SEALED = "sealed:v1:9AULVuKWFEO6z2MXMVED8kCD5uTsyJyED0dFkwZpgwO8pBYZ9zrlHcgmvXMEQrKrdazMHwKq"
OLD_CSRF = "c7ed0114a9180750ed1dddda221953eb1257a5a8c100c20adbaa85985a6b3025"  # csrf_token_for("nonce-abc")
OLD_PASS = "b59435b099a105e70457845055b7301e36d4176667a98072fd4eb42efed9e1c5"  # SSO pass MAC, tenant 3


@pytest.fixture
def server_secret(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CRMBRIDGE_SECRET_KEY", SECRET_ENV)
    monkeypatch.setenv("CRMBRIDGE_DEMO", "0")
    get_settings.cache_clear()
    assert get_settings().server_secret() == SECRET
    yield SECRET
    get_settings.cache_clear()


@pytest.mark.parametrize("purpose", list(OLD_KEYS), ids=lambda p: p.name)
def test_existing_purposes_derive_the_old_bytes(purpose: keys.KeyPurpose) -> None:
    assert keys.derive_key(purpose, SECRET).hex() == OLD_KEYS[purpose]


def test_callers_use_the_helper_and_get_the_old_keys(server_secret: bytes) -> None:
    from core.accounts import secrets
    from core.connections import links as connect
    from core.connections import routes as oauth
    from core.tenants import audit

    assert audit.audit_key().hex() == OLD_KEYS[keys.AUDIT_CHAIN]
    assert audit.head_key().hex() == OLD_KEYS[keys.AUDIT_HEAD]
    assert connect._key().hex() == OLD_KEYS[keys.CONNECT_LINK]
    assert oauth._key().hex() == OLD_KEYS[keys.OAUTH_STATE]  # states signed before the move still verify
    assert secrets._platform_key().hex() == OLD_KEYS[keys.PLATFORM_SEAL]


def test_a_secret_sealed_before_the_change_still_opens(server_secret: bytes) -> None:
    from core.accounts.secrets import open_platform

    assert open_platform(OLD_SEALED, owner="console_account:7", purpose="totp") == "totp-seed-JBSWY3DPEHPK3PXP"


def test_prefix_purposes_sign_as_before(server_secret: bytes) -> None:
    from core.web import csrf_ok, csrf_token_for

    assert csrf_token_for("nonce-abc") == OLD_CSRF
    assert csrf_ok("nonce-abc", OLD_CSRF)
    msg = b"3|ann@bigcorp.example|1800000000"
    assert keys.mac(keys.SSO_CONNECT_PASS, msg).hex() == OLD_PASS
    with pytest.raises(ValueError, match="core.keys.mac"):
        keys.derive_key(keys.CSRF)


def test_each_purpose_has_its_own_key() -> None:
    derived = [keys.derive_key(p, SECRET) for p in keys.PURPOSES if p.scheme != "prefix"]
    assert len(set(derived)) == len(derived)
    assert all(len(k) == 32 for k in derived)
    # another secret, other keys (a rotated secret must not keep the old ones from the cache)
    assert keys.derive_key(keys.AUDIT_CHAIN, b"x" * 32) != keys.derive_key(keys.AUDIT_CHAIN, SECRET)
    assert keys.derive_key(keys.PLATFORM_SEAL, SECRET) != hmac.new(SECRET, keys.PLATFORM_SEAL.label,
                                                                   hashlib.sha256).digest()


# Files that still call server_secret() themselves, until their owners switch them to core.keys (one
# line each: OAUTH_STATE and SSO_CONNECT_PASS are defined and pinned above).
PENDING: dict[str, str] = {}


def test_only_core_keys_reads_the_server_secret_for_crypto() -> None:
    root = Path(__file__).resolve().parents[2]
    users = sorted(str(f.relative_to(root)) for f in (root / "core").rglob("*.py")
                   if re.search(r"server_secret\(\)", f.read_text(encoding="utf-8")))
    allowed = {"core/keys.py", "core/settings.py", *PENDING}
    assert set(users) <= allowed, f"derive keys with core.keys instead: {sorted(set(users) - allowed)}"
