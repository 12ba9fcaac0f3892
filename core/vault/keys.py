"""Key-encryption keys (KEKs): the ring, where it comes from, and how a wrong one is caught.

The ring is JSON, ``{"active": "<id>", "keys": {"<id>": "<base64 of 32 bytes>", ...}}``, read by a
``KeyProvider``: ``CRMBRIDGE_VAULT_KEYS`` (``EnvKeyProvider``) or the file named by
``CRMBRIDGE_VAULT_KEY_FILE`` (``FileKeyProvider``, mode 0600). A cloud KMS plugs in as another
provider. Only in demo mode is a key file created (``data/vault-keys.json``) when none exists;
otherwise a missing ring stops start-up, so two replicas can never each invent their own key.

The database keeps, per KEK id, a check value (HMAC-SHA256 of a fixed label under the key): a key
with the right id but the wrong bytes is refused at start-up, naming the id (see
``core.vault.service.check_keys``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from core.clock import utcnow
from core.errors import ConfigurationError, KeyMissing
from core.settings import DATA_DIR, Settings, get_settings

log = logging.getLogger("crmbridge.vault.keys")

KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_BYTES = 32
DEMO_KEY_FILE = DATA_DIR / "vault-keys.json"
_CHECK_LABEL = b"crmbridge/vault/kek-check/v1"


def check_value(key: bytes) -> str:
    """A fingerprint that proves a key is the one the vault was set up with, and reveals nothing of it."""
    return hmac.new(key, _CHECK_LABEL, hashlib.sha256).hexdigest()[:32]


def generate_key_id(now: datetime | None = None) -> str:
    return f"kek-{(now or utcnow()):%Y%m%d}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class KeyRing:
    """An immutable set of KEKs and the id of the one that wraps new data keys."""

    active: str
    keys: Mapping[str, bytes] = field(repr=False)
    source: str = "key ring"

    def key(self, kek_id: str) -> bytes:
        try:
            return self.keys[kek_id]
        except KeyError:
            raise KeyMissing(
                f"Vault key {kek_id!r} is not in {self.source}: restore that key (keys are never "
                "re-created; without it the data keys it wraps cannot be read)."
            ) from None

    @property
    def active_key(self) -> bytes:
        return self.key(self.active)

    def with_key(self, kek_id: str, material: bytes, *, activate: bool = True) -> KeyRing:
        _validate_id(kek_id, self.source)
        if kek_id in self.keys:
            raise ConfigurationError(f"Vault key {kek_id!r} already exists in {self.source}: pick a new id.")
        keys = dict(self.keys)
        keys[kek_id] = _validate_material(material, kek_id, self.source)
        return KeyRing(kek_id if activate else self.active, MappingProxyType(keys), self.source)

    def without(self, kek_ids: Iterable[str]) -> KeyRing:
        drop = set(kek_ids) - {self.active}
        return KeyRing(self.active, MappingProxyType({k: v for k, v in self.keys.items() if k not in drop}),
                       self.source)

    def to_json(self) -> str:
        return json.dumps(
            {"active": self.active, "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()}},
            indent=2, sort_keys=True,
        )


def _validate_id(kek_id: str, source: str) -> None:
    if not isinstance(kek_id, str) or not KEY_ID_RE.match(kek_id):
        raise ConfigurationError(
            f"Vault key id {kek_id!r} in {source} is not valid: use 1-64 letters, digits, '.', '_' or '-'."
        )


def _validate_material(material: bytes, kek_id: str, source: str) -> bytes:
    if len(material) != KEY_BYTES:
        raise ConfigurationError(
            f"Vault key {kek_id!r} in {source} is {len(material)} bytes: a KEK must be exactly 32 random bytes, "
            "base64-encoded (python -c 'import os,base64; print(base64.b64encode(os.urandom(32)).decode())')."
        )
    return material


def parse_ring(text: str, *, source: str) -> KeyRing:
    """Parse and validate ring JSON; every error names the key id and where it came from."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigurationError(
            f"{source} is not valid JSON: expected {{\"active\": \"<id>\", \"keys\": {{\"<id>\": \"<base64>\"}}}}."
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict) or not data["keys"]:
        raise ConfigurationError(
            f"{source} has no keys: expected {{\"active\": \"<id>\", \"keys\": {{\"<id>\": \"<base64>\"}}}}."
        )
    keys: dict[str, bytes] = {}
    for kek_id, b64 in data["keys"].items():
        _validate_id(kek_id, source)
        try:
            raw = base64.b64decode(str(b64), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"Vault key {kek_id!r} in {source} is not base64: re-encode it.") from None
        keys[kek_id] = _validate_material(raw, kek_id, source)
    active = data.get("active")
    if not isinstance(active, str) or active not in keys:
        raise KeyMissing(
            f"The active vault key {active!r} named in {source} is not among its keys ({', '.join(sorted(keys))}): "
            "set \"active\" to one of them."
        )
    return KeyRing(active, MappingProxyType(keys), source)


def new_ring(*, source: str, now: datetime | None = None) -> KeyRing:
    kek_id = generate_key_id(now)
    return KeyRing(kek_id, MappingProxyType({kek_id: secrets.token_bytes(KEY_BYTES)}), source)


class KeyProvider(ABC):
    """Where the KEK ring lives. ``writable`` providers can store a new key during ``rotate_kek``;
    a read-only provider (the environment, most KMS setups) is changed by the operator."""

    source: str = "key provider"
    writable: bool = False

    @abstractmethod
    def load(self) -> KeyRing: ...

    def save(self, ring: KeyRing) -> None:
        raise ConfigurationError(
            f"{self.source} is read-only: add the new key there yourself, make it active on every replica, "
            "restart them, then run `crmbridge vault rotate-kek` to re-wrap the data keys."
        )


class EnvKeyProvider(KeyProvider):
    """The ring from ``CRMBRIDGE_VAULT_KEYS`` (read-only)."""

    def __init__(self, text: str, *, name: str = "CRMBRIDGE_VAULT_KEYS") -> None:
        self._text = text
        self.source = name

    def load(self) -> KeyRing:
        return parse_ring(self._text, source=self.source)


class FileKeyProvider(KeyProvider):
    """The ring in a JSON file that only its owner may read (mode 0600). ``create`` (demo mode only)
    writes a new ring when the file does not exist."""

    writable = True

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = Path(path)
        self.create = create
        self.source = f"the vault key file {self.path}"

    def load(self) -> KeyRing:
        if not self.path.exists():
            if not self.create:
                raise KeyMissing(
                    f"{self.source} does not exist: restore it, or point CRMBRIDGE_VAULT_KEY_FILE at the key "
                    "file (keys are created only in demo mode)."
                )
            self._write(new_ring(source=self.source), exclusive=True)
            log.warning("created the vault key file %s with a new key (mode 0600)", self.path)
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise ConfigurationError(
                f"{self.source} is readable by other users (mode {mode:04o}): run `chmod 600 {self.path}`."
            )
        return parse_ring(self.path.read_text(), source=self.source)

    def save(self, ring: KeyRing) -> None:
        self._write(ring, exclusive=False)

    def _write(self, ring: KeyRing, *, exclusive: bool) -> None:
        """Write atomically (temp file, fsync, rename), never readable by anyone but the owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = ring.to_json().encode()
        if exclusive:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()


def provider_from_settings(settings: Settings | None = None) -> KeyProvider:
    """``CRMBRIDGE_VAULT_KEYS``, else ``CRMBRIDGE_VAULT_KEY_FILE``, else (demo only) data/vault-keys.json."""
    s = settings or get_settings()
    if s.vault_keys.strip():
        return EnvKeyProvider(s.vault_keys)
    if s.vault_key_file is not None:
        return FileKeyProvider(s.vault_key_file, create=s.demo)
    if s.demo:
        return FileKeyProvider(DEMO_KEY_FILE, create=True)
    raise KeyMissing(
        "No vault keys are configured: set CRMBRIDGE_VAULT_KEYS to a key ring or CRMBRIDGE_VAULT_KEY_FILE to a "
        "0600 key file (outside demo mode the server never invents keys, so every replica uses the same ones)."
    )


# --- the process's current ring --------------------------------------------------------------------
# The ring is read once and kept; a key id it lacks triggers one re-read (another process may have
# rotated), and anything that must wrap with the newest active key re-reads first.

_override: KeyProvider | None = None
_cache: tuple[object, KeyRing] | None = None


def configure(provider: KeyProvider | None) -> None:
    """Use ``provider`` instead of the one the settings name (tests, a KMS). ``None`` restores the settings."""
    global _override, _cache
    _override = provider
    _cache = None


def get_provider() -> KeyProvider:
    return _override if _override is not None else provider_from_settings()


def _cache_key() -> object:
    if _override is not None:
        return id(_override)
    s = get_settings()
    return (s.vault_keys, s.vault_key_file, s.demo)


def current_ring(*, reload: bool = False) -> KeyRing:
    global _cache
    key = _cache_key()
    if not reload and _cache is not None and _cache[0] == key:
        return _cache[1]
    ring = get_provider().load()
    _cache = (key, ring)
    return ring


def ring_with(kek_id: str) -> KeyRing:
    """The current ring, re-read once if it lacks ``kek_id`` (raises KeyMissing naming it)."""
    ring = current_ring()
    if kek_id not in ring.keys:
        ring = current_ring(reload=True)
        ring.key(kek_id)
    return ring
