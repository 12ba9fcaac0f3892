"""One settings class for the whole product (environment prefix ``CRMBRIDGE_``).

Tests build their own ``Settings(...)``; everything else calls ``get_settings()``.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import secrets
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "placeholder", "xxx"}
#: Where the demo sandbox keeps its TLS files (``make run`` starts it with this ``--tls-dir``); in demo
#: mode every process (console, worker, scheduler, a command typed by hand) trusts the CA found here.
SANDBOX_TLS_DIR = DATA_DIR / "sandbox-tls"
SANDBOX_CA_FILE = SANDBOX_TLS_DIR / "ca.pem"
MIN_SECRET_BITS = 256  # 32 random bytes
GENERATE_SECRET = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_B64 = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")


def _shannon_bits(data: bytes) -> float:
    """Empirical Shannon entropy of ``data`` times its length (bits): an upper bound for text."""
    if not data:
        return 0.0
    counts: dict[int, int] = {}
    for b in data:
        counts[b] = counts.get(b, 0) + 1
    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in counts.values()) * n


def secret_entropy_bits(value: str) -> float:
    """A conservative estimate of the entropy in a configured secret.

    Hex or base64 that decodes to binary is taken as random bytes (8 bits each) unless the bytes repeat
    (fewer distinct values than random bytes of that length would show); anything else, and encoded
    text (``base64("my-password")``), is text: its Shannon entropy, which a real passphrase or random
    token of enough length passes and a word, a repeated pattern or a short value does not."""
    v = value.strip()
    raw: bytes | None = None
    if len(v) % 2 == 0 and _HEX.match(v):
        raw = bytes.fromhex(v)
    elif _B64.match(v):
        try:
            t = v.rstrip("=").replace("-", "+").replace("_", "/")
            raw = base64.b64decode(t + "=" * (-len(t) % 4), validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw and not all(32 <= b < 127 for b in raw):
        distinct = len(set(raw))
        expected = 256 * (1 - (255 / 256) ** len(raw))  # distinct values in len(raw) random bytes
        return len(raw) * 8.0 if distinct >= 0.75 * expected else _shannon_bits(raw)
    text = raw if raw else v.encode()
    return _shannon_bits(text)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRMBRIDGE_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DATA_DIR / 'crmbridge.db'}",
        description="SQLAlchemy URL; SQLite file under data/ by default, postgresql+psycopg://… in production",
    )
    demo: bool = Field(default=False, description="Demo mode: demo accounts, generated keys, loopback only")
    public_url: str = Field(
        default="http://127.0.0.1:8501",
        description="External base URL; every absolute URL the product emits is built from it",
    )
    bind_address: str = Field(default="127.0.0.1", description="Address the console server binds")
    port: int = Field(default=8501, description="Port the console server binds")
    secret_key: str = Field(
        default="",
        description="Server secret for the audit HMAC chain, CSRF and signed links (base64 or text)",
    )
    secret_key_file: Path = Field(default=DATA_DIR / "secret.key", description="Demo-mode secret file")
    vault_keys: str = Field(default="", description='KEK ring JSON: {"active": id, "keys": {id: b64}}')
    vault_key_file: Path | None = Field(default=None, description="KEK ring file (mode 0600)")
    session_absolute_hours: float = Field(default=12.0, description="Console session absolute lifetime")
    session_idle_minutes: float = Field(default=60.0, description="Console session idle timeout")
    sandbox_url: str = Field(default="https://127.0.0.1:8502", description="CRM sandbox base URL (demo)")
    catalog_files: str = Field(
        default="",
        description="Extra provider catalog files (os.pathsep-separated), read after core/providers/catalog*.yaml: "
                    "a deployment's (or a test's) own CRMs; each needs its class registered "
                    "(core.providers.registry.register)",
    )
    sandbox_ca_file: Path | None = Field(
        default=None,
        description="CA bundle trusting the sandbox TLS (demo mode default: data/sandbox-tls/ca.pem, written by "
                    "the sandbox that make run starts)",
    )
    sandbox_browser_url: str = Field(
        default="http://127.0.0.1:8503",
        description="The sandbox's plain-http loopback origin for browser pages (IdP sign-in, OAuth consent; demo)",
    )
    smtp_host: str = Field(default="127.0.0.1", description="SMTP server for alert email")
    smtp_port: int = Field(default=25, description="SMTP port")
    smtp_sender: str = Field(default="crmbridge@localhost", description="From address of alert email")
    # -- background processes: `crmbridge sync worker` and `crmbridge scheduler` ---------------------------
    worker_poll_seconds: float = Field(default=2.0, ge=0.1, description="Idle sync worker: seconds between polls")
    sync_lease_seconds: int = Field(
        default=300, ge=5, description="A sync job's lease: a worker that dies is taken over after this long")
    scheduler_lease_seconds: int = Field(
        default=120, ge=2, description="A periodic job's lease (renewed while it runs): a dead scheduler's job "
                                       "is taken over after this long")
    schedule_sync_seconds: int = Field(default=60, ge=1, description="sync-schedule: create, disable and wake jobs")
    schedule_sync_wake_seconds: int = Field(
        default=5, ge=1, description="sync-wake: wake the jobs of users who reconnected (cheap, frequent)")
    schedule_vault_sweep_seconds: int = Field(default=3600, ge=1, description="vault-sweep: expired/idle credentials")
    schedule_alerts_seconds: int = Field(default=300, ge=1, description="alerts-run: evaluate rules and deliver")
    schedule_alerts_digest_seconds: int = Field(default=86400, ge=1, description="alerts-digest: staff digest")
    schedule_sso_watch_seconds: int = Field(default=86400, ge=1, description="sso-watch: IdP certificate watch")
    schedule_posture_seconds: int = Field(default=86400, ge=1, description="posture-snapshot: daily posture rows")

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        host = urlsplit(self.public_url).hostname or ""
        if self.demo and self.bind_address not in {"127.0.0.1", "localhost", "::1"}:
            raise ValueError(
                "CRMBRIDGE_DEMO=1 is only allowed when the server binds loopback "
                f"(CRMBRIDGE_BIND_ADDRESS is {self.bind_address!r}): unset CRMBRIDGE_DEMO or bind 127.0.0.1"
            )
        if not self.demo and self.secret_key.strip().lower() in PLACEHOLDER_SECRETS and self.secret_key:
            raise ValueError(
                f"CRMBRIDGE_SECRET_KEY is a placeholder: set a random value ({GENERATE_SECRET})"
            )
        if not self.demo and self.secret_key:
            bits = secret_entropy_bits(self.secret_key)
            if bits < MIN_SECRET_BITS:
                raise ValueError(
                    f"CRMBRIDGE_SECRET_KEY is too weak: it carries about {bits:.0f} bits of entropy and at least "
                    f"{MIN_SECRET_BITS} (32 random bytes) are required outside demo mode. Generate one with "
                    f"{GENERATE_SECRET} and set it on every replica (existing sessions and signed links end)."
                )
        if not host:
            raise ValueError(f"CRMBRIDGE_PUBLIC_URL {self.public_url!r} is not an absolute URL")
        if self.demo and self.sandbox_ca_file is None:
            # The one place every demo process reads the sandbox CA from: no environment to pass around.
            self.sandbox_ca_file = SANDBOX_CA_FILE
        return self

    def sandbox_verify(self) -> str | bool:
        """What HTTPS clients verify with: the sandbox CA file when one is configured (in demo mode, the
        well-known ``data/sandbox-tls/ca.pem`` once the sandbox has written it), else the system CAs."""
        ca = self.sandbox_ca_file
        if ca is None or (ca == SANDBOX_CA_FILE and not ca.exists()):
            return True
        return str(ca)

    def public(self, path: str) -> str:
        """An absolute URL under CRMBRIDGE_PUBLIC_URL (never from the request's Host header)."""
        return self.public_url.rstrip("/") + "/" + path.lstrip("/")

    def browser_facing(self, url: str) -> str:
        """``url`` as a person's browser should open it. Demo mode only: a page of the sandbox (its
        OAuth consent and install pages) moves from the sandbox's HTTPS origin, signed by a CA no browser
        trusts, to its plain-http loopback origin (``sandbox_browser_url``), which browsers treat as
        secure (https://w3c.github.io/webappsec-secure-contexts/#is-origin-trustworthy): no certificate
        warning. Every other URL is returned unchanged."""
        if not self.demo or not self.sandbox_browser_url:
            return url
        api = self.sandbox_url.rstrip("/")
        if url == api or url.startswith((api + "/", api + "?")):
            return self.sandbox_browser_url.rstrip("/") + url[len(api):]
        return url

    def server_secret(self) -> bytes:
        """The server secret: from the environment, or (demo only) a generated 0600 file."""
        if self.secret_key:
            try:
                raw = base64.urlsafe_b64decode(self.secret_key + "=" * (-len(self.secret_key) % 4))
                if len(raw) >= 16:
                    return raw
            except ValueError:
                pass
            return self.secret_key.encode()
        if not self.demo:
            raise RuntimeError(
                "CRMBRIDGE_SECRET_KEY is not set: set it to a random value (outside demo mode the "
                "server never invents its own secret, so replicas agree)"
            )
        path = self.secret_key_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
        elif path.stat().st_mode & 0o077:
            path.chmod(0o600)  # an older version left it readable by others: it signs sessions and the audit log
        return base64.urlsafe_b64decode(path.read_text().strip() + "==")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
