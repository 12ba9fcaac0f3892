"""The provider catalog: what each CRM and edition offers, as validated data.

``catalog.yaml`` (plus any ``catalog.<slug>.yaml`` beside it, so each provider's entry can live in its
own file) is parsed into the pydantic models below. Nothing else in the product knows a CRM's
fields: the "add CRM account" form, the connect link and posture all read them from here.

    cat = get_catalog()                       # cached, validated once
    sf = cat.provider("salesforce")           # ProviderEntry (NotFound if unknown)
    ent = cat.edition("salesforce", "enterprise")   # EditionFacts
    ent.api_access.value                      # "included" | "add_on" | "none"
    ent.daily_api_allocation.value.for_licenses(10)  # 110_000
    mode = sf.auth_mode("oauth_client_credentials")  # discriminated on ``mode``
    cat.form_fields("salesforce", "password")  # account-level fields, in form order

Shape of a provider entry (YAML keys):

- ``name``, ``protocol``, ``docs_url``
- ``sources: {id: {title, url}}`` — every fact cites one by id (or inline ``{title, url}``)
- ``account_fields: [FieldSpec]`` — non-auth settings per CRM account (``instance_url`` first)
- ``auth_modes: [AuthMode]`` — a union discriminated on ``mode``:
  ``oauth_client_credentials`` · ``jwt_bearer`` · ``oauth_authorization_code`` · ``password`` ·
  ``api_token``. Each names the ``credential_mode`` it serves (api_user / per_user_oauth /
  per_user_password, as on CrmAccount), a ``status`` (recommended / supported / retiring) and its
  ``fields`` (entered by the admin) and ``user_fields`` (entered by each user on the connect link).
- ``editions: {slug: EditionFacts}`` — each fact is ``{value, source, as_of, verified, note}``:
  ``api_access`` (included | add_on | none; whether an account bought the add-on is per account,
  in its settings, never here), ``saml_sso``, ``delegated_auth``, ``integration_user_licenses``
  (free API-only licenses), ``daily_api_allocation`` (base + per license), ``rate_limits``,
  ``login_methods`` (auth mode ids that work in the edition), ``attribution`` (impersonation /
  attribution field), plus ``extra`` for provider-specific facts. ``detect_as`` lists the strings
  the vendor reports for the edition (Salesforce ``Organization.OrganizationType``).
- ``retirements: [Retirement]`` — dated end-of-life notes, linked to the auth modes they affect.

A FieldSpec is ``{name, type, title, help, pattern, example, secret, required, default, options,
level}``; ``type`` is one of string, email, url, password, text, int, bool, select. Secret fields go
to the vault; the rest into ``CrmAccount.settings_json``. ``validate_values`` checks a submitted
form against the specs and splits it into (settings, secrets).
"""

from __future__ import annotations

import datetime as dt
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigurationError, InvalidInput, NotFound

CATALOG_DIR = Path(__file__).resolve().parent
CATALOG_FILE = CATALOG_DIR / "catalog.yaml"

T = TypeVar("T")

SLUG_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
FieldType = Literal["string", "email", "url", "password", "text", "int", "bool", "select"]
CredentialMode = Literal["api_user", "per_user_oauth", "per_user_password"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Model):
    title: str = Field(min_length=3)
    url: str = Field(pattern=r"^(https?|file)://")


class Fact(_Model, Generic[T]):
    """One fact with where it comes from. ``verified`` = checked against ``source`` on ``as_of``."""

    value: T
    source: Source
    as_of: dt.date
    verified: bool = False
    note: str | None = None


class FieldSpec(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    type: FieldType = "string"
    title: str
    help: str = ""
    pattern: str | None = None
    example: str | None = None
    secret: bool = False
    required: bool = True
    default: str | None = None
    options: list[str] | None = None
    level: Literal["account", "user"] = "account"

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            re.compile(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FieldSpec:
        if self.type == "password" and not self.secret:
            raise ValueError(f"field {self.name!r}: a password field must be secret: true")
        if self.type == "select" and not self.options:
            raise ValueError(f"field {self.name!r}: a select field needs options")
        if self.secret and (self.example or self.default):
            raise ValueError(f"field {self.name!r}: a secret field carries no example or default")
        return self

    def check(self, raw: str | None) -> str | None:
        """The cleaned value, or InvalidInput naming the field and the fix."""
        value = (raw if raw is not None else "").strip() if self.type != "text" else (raw or "")
        if not value:
            if self.default is not None:
                return self.default
            if self.required:
                raise InvalidInput(f"{self.title} is required.", fix=self.help or None)
            return None
        if self.pattern and not re.search(self.pattern, value):
            hint = f" (for example {self.example})" if self.example else ""
            raise InvalidInput(f"{self.title} does not look right{hint}.", fix=self.help or None)
        if self.type == "int" and not value.lstrip("-").isdigit():
            raise InvalidInput(f"{self.title} must be a whole number.")
        if self.type == "select" and self.options and value not in self.options:
            raise InvalidInput(f"{self.title} must be one of: {', '.join(self.options)}.")
        return value


class Retirement(_Model):
    what: str
    when: str
    date: dt.date | None = None
    detail: str = ""
    affects_auth_modes: list[str] = Field(default_factory=list)
    source: Source
    as_of: dt.date
    verified: bool = False


class _AuthModeBase(_Model):
    title: str
    credential_mode: CredentialMode
    status: Literal["recommended", "supported", "retiring"] = "supported"
    help: str = ""
    fields: list[FieldSpec] = Field(default_factory=list)
    user_fields: list[FieldSpec] = Field(default_factory=list)
    retirement: Retirement | None = None

    @property
    def secret_fields(self) -> list[FieldSpec]:
        return [f for f in self.fields if f.secret]

    @property
    def is_per_user(self) -> bool:
        return self.credential_mode != "api_user"


class ClientCredentialsMode(_AuthModeBase):
    mode: Literal["oauth_client_credentials"]
    token_path: str | None = None
    #: A token endpoint outside the CRM (Entra ID for Dynamics), ``{tenant_id}`` filled from fields.
    token_url: str | None = None
    scopes: list[str] = Field(default_factory=list)


class JwtBearerMode(_AuthModeBase):
    mode: Literal["jwt_bearer"]
    token_path: str
    audience: str


class AuthorizationCodeMode(_AuthModeBase):
    mode: Literal["oauth_authorization_code"]
    authorize_path: str | None = None
    authorize_url: str | None = None
    token_path: str | None = None
    token_url: str | None = None
    pkce: bool = True
    scopes: list[str] = Field(default_factory=list)


class PasswordMode(_AuthModeBase):
    mode: Literal["password"]


class ApiTokenMode(_AuthModeBase):
    mode: Literal["api_token"]
    header: str = "Authorization"


AuthMode = Annotated[
    ClientCredentialsMode | JwtBearerMode | AuthorizationCodeMode | PasswordMode | ApiTokenMode,
    Field(discriminator="mode"),
]
AUTH_MODE_IDS = ("oauth_client_credentials", "jwt_bearer", "oauth_authorization_code", "password", "api_token")


class DailyAllocation(_Model):
    base: int = Field(ge=0)
    per_license: int = Field(ge=0)
    window: str = "24h rolling"

    def for_licenses(self, licenses: int, add_ons: int = 0) -> int:
        return self.base + self.per_license * max(licenses, 0) + add_ons


class RateLimits(_Model):
    concurrent_long_running: int | None = None
    long_running_seconds: int | None = None
    requests_per_window: int | None = None
    window_seconds: int | None = None
    daily: int | None = None
    note: str | None = None


class Attribution(_Model):
    impersonation: bool = False
    attribution_field: bool = False


class EditionFacts(_Model):
    name: str
    detect_as: list[str] = Field(default_factory=list)
    api_access: Fact[Literal["included", "add_on", "none"]]
    saml_sso: Fact[bool]
    delegated_auth: Fact[bool] | None = None
    integration_user_licenses: Fact[int]
    daily_api_allocation: Fact[DailyAllocation]
    rate_limits: Fact[RateLimits]
    login_methods: Fact[list[str]]
    attribution: Fact[Attribution]
    extra: dict[str, Fact[Any]] = Field(default_factory=dict)

    def facts(self) -> dict[str, Fact[Any]]:
        """Every fact by name (for listing sources and as-of dates)."""
        out: dict[str, Fact[Any]] = {}
        for name in type(self).model_fields:
            v = getattr(self, name)
            if isinstance(v, Fact):
                out[name] = v
        out.update(self.extra)
        return out


class VendorHosts(_Model):
    """The hosts a provider may talk to (its vendor's own domains) — the only places a CRM URL may point.

    A pattern is a host name; ``*.`` at its start stands for one or more DNS labels and a ``*`` inside a
    label for any letters, digits or hyphens (``*.crm*.dynamics.com`` matches ``acme.crm4.dynamics.com``).
    """

    patterns: list[str] = Field(min_length=1)
    source: Source
    as_of: dt.date
    verified: bool = False
    note: str | None = None

    @field_validator("patterns")
    @classmethod
    def _valid_patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(r"(\*\.)?[a-z0-9*-]+(\.[a-z0-9*-]+)+", p) or "**" in p:
                raise ValueError(f"host pattern {p!r} must be a lower-case host name, optionally starting with *.")
        return v


class ProviderEntry(_Model):
    slug: str
    name: str
    protocol: str
    docs_url: str | None = None
    sources: dict[str, Source]
    account_fields: list[FieldSpec]
    auth_modes: list[AuthMode]
    editions: dict[str, EditionFacts]
    hosts: VendorHosts
    retirements: list[Retirement] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _resolve_sources(cls, data: Any) -> Any:
        """Facts cite ``source: <id>``; replace each id with its Source (unknown ids are errors)."""
        if not isinstance(data, dict):
            return data
        sources = data.get("sources") or {}

        def resolve(node: Any, path: str) -> Any:
            if isinstance(node, dict):
                out = {}
                for k, v in node.items():
                    if k == "source" and isinstance(v, str):
                        if v not in sources:
                            raise ValueError(f"{path}.source: unknown source id {v!r} (add it to sources)")
                        out[k] = sources[v]
                    else:
                        out[k] = resolve(v, f"{path}.{k}")
                return out
            if isinstance(node, list):
                return [resolve(v, f"{path}[{i}]") for i, v in enumerate(node)]
            return node

        return {k: (v if k == "sources" else resolve(v, k)) for k, v in data.items()}

    @model_validator(mode="after")
    def _consistent(self) -> ProviderEntry:
        if not SLUG_RE.match(self.slug):
            raise ValueError(f"provider slug {self.slug!r} must be kebab-case")
        if not self.account_fields or self.account_fields[0].name != "instance_url":
            raise ValueError(f"{self.slug}: account_fields must start with instance_url")
        seen: set[str] = set()
        for m in self.auth_modes:
            if m.mode in seen:
                raise ValueError(f"{self.slug}: auth mode {m.mode} listed twice")
            seen.add(m.mode)
            names = [f.name for f in self.account_fields + m.fields]
            if len(names) != len(set(names)):
                raise ValueError(f"{self.slug}/{m.mode}: duplicate field names {names}")
        for slug, ed in self.editions.items():
            if not SLUG_RE.match(slug):
                raise ValueError(f"{self.slug}: edition slug {slug!r} must be kebab-case")
            unknown = set(ed.login_methods.value) - seen
            if unknown:
                raise ValueError(f"{self.slug}/{slug}: login_methods name unknown auth modes {sorted(unknown)}")
        for r in self.retirements:
            unknown = set(r.affects_auth_modes) - seen
            if unknown:
                raise ValueError(f"{self.slug}: retirement {r.what!r} names unknown modes {sorted(unknown)}")
        return self

    def auth_mode(self, mode: str) -> ClientCredentialsMode | JwtBearerMode | AuthorizationCodeMode | (
        PasswordMode | ApiTokenMode
    ):
        for m in self.auth_modes:
            if m.mode == mode:
                return m
        raise NotFound(
            f"{self.name} has no auth mode {mode!r}: choose one of "
            f"{', '.join(m.mode for m in self.auth_modes)}."
        )

    def modes_for(self, credential_mode: str) -> list[Any]:
        return [m for m in self.auth_modes if m.credential_mode == credential_mode]

    def edition(self, edition: str) -> EditionFacts:
        try:
            return self.editions[edition]
        except KeyError:
            raise NotFound(
                f"{self.name} has no edition {edition!r}: choose one of {', '.join(self.editions)}."
            ) from None

    def detect_edition(self, reported: str | None) -> str | None:
        """The edition slug for what the vendor reports (e.g. "Enterprise Edition"), or None."""
        if not reported:
            return None
        low = reported.strip().lower()
        for slug, ed in self.editions.items():
            if low in {d.lower() for d in ed.detect_as} or low == slug:
                return slug
        return None

    def field(self, name: str, mode: str | None = None) -> FieldSpec:
        pool = list(self.account_fields) + (list(self.auth_mode(mode).fields) if mode else [])
        for f in pool:
            if f.name == name:
                return f
        raise NotFound(f"{self.name} has no field {name!r}.")


class Catalog(_Model):
    providers: dict[str, ProviderEntry]

    def provider(self, slug: str) -> ProviderEntry:
        try:
            return self.providers[slug]
        except KeyError:
            raise NotFound(
                f"Unknown CRM {slug!r}: choose one of {', '.join(sorted(self.providers))}."
            ) from None

    def edition(self, slug: str, edition: str) -> EditionFacts:
        return self.provider(slug).edition(edition)

    def slugs(self) -> list[str]:
        return sorted(self.providers)

    def form_fields(self, slug: str, mode: str) -> list[FieldSpec]:
        """The fields an admin fills in to add an account of ``slug`` with auth ``mode``, in order."""
        p = self.provider(slug)
        return list(p.account_fields) + list(p.auth_mode(mode).fields)

    def validate_values(
        self, slug: str, mode: str, values: dict[str, str | None]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Check a submitted form: (non-secret settings, secrets). Unknown keys are refused."""
        specs = self.form_fields(slug, mode)
        known = {f.name for f in specs}
        unknown = set(values) - known
        if unknown:
            raise InvalidInput(f"Unexpected fields: {', '.join(sorted(unknown))}.")
        settings: dict[str, str] = {}
        secrets: dict[str, str] = {}
        for f in specs:
            v = f.check(values.get(f.name))
            if v is None:
                continue
            (secrets if f.secret else settings)[f.name] = v
        return settings, secrets


def load_catalog(paths: list[Path] | None = None) -> Catalog:
    """Parse and validate catalog files (default: catalog.yaml + catalog.*.yaml beside this module).

    Raises:
        ConfigurationError: a file is unreadable, a slug is defined twice, or an entry is invalid.
    """
    if paths is None:
        paths = [CATALOG_FILE, *sorted(CATALOG_DIR.glob("catalog.*.yaml"))]
    raw: dict[str, Any] = {}
    for path in paths:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"Cannot read the provider catalog {path.name}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigurationError(f"{path.name}: the catalog must be a mapping of provider slugs")
        for slug, entry in data.items():
            if slug in raw:
                raise ConfigurationError(f"{path.name}: provider {slug!r} is defined twice")
            raw[slug] = {"slug": slug, **(entry or {})}
    try:
        return Catalog(providers=raw)
    except ValidationError as exc:
        raise ConfigurationError(f"The provider catalog is invalid: {exc}") from exc


def catalog_paths() -> list[Path]:
    """catalog.yaml, catalog.*.yaml beside this module, then the files ``CRMBRIDGE_CATALOG_FILES`` names."""
    import os

    from core.settings import get_settings

    extra = [Path(p) for p in get_settings().catalog_files.split(os.pathsep) if p.strip()]
    return [CATALOG_FILE, *sorted(CATALOG_DIR.glob("catalog.*.yaml")), *extra]


@lru_cache(maxsize=1)
def get_catalog() -> Catalog:
    """The validated catalog, parsed once per process (``get_catalog.cache_clear()`` after a settings change)."""
    return load_catalog(catalog_paths())
