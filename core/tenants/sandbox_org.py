"""Demo mode only: a CRM org (Salesforce), environment (Dynamics 365) or portal (HubSpot) and a SAML IdP
in the CRM sandbox for any tenant, so a newcomer can onboard a brand-new tenant from what the console
shows (the onboarding wizard's "Create a sandbox org").

The sandbox is another process and the CRM's stand-in: this module only calls its provisioning API
(``POST /_sandbox/provision``, sandbox/provision.py) over HTTPS trusting the sandbox CA, and never
imports it. Nothing is stored here: the sandbox is the source of truth, as a real vendor's setup screens
would be, and the console reads the values back from it each time the wizard shows them. The demo
passwords and client secrets it shows are the sandbox's made-up values, for typing into the console's
forms (secrets still only go in through the secure credentials form, which keeps them in the vault).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import httpx
from sqlmodel import Session

from core.errors import ConfigurationError, InvalidInput, ProviderUnavailable
from core.settings import Settings, get_settings
from core.tenants.access import Principal
from core.tenants.audit import record_event
from core.tenants.service import get_tenant

#: the sandbox's CRM keys and how the console names them
SANDBOX_CRMS = {"salesforce": "Salesforce", "dynamics": "Dynamics 365", "hubspot": "HubSpot"}


@dataclass(frozen=True)
class SandboxField:
    title: str
    value: str
    secret: bool = False


@dataclass(frozen=True)
class SandboxUser:
    username: str
    role: str
    id: str = ""
    password: str = ""


@dataclass(frozen=True)
class SandboxOrg:
    crm: str
    org: str
    instance_url: str
    idp_metadata_url: str
    idp_users: tuple[str, ...]
    fields: tuple[SandboxField, ...]
    users: tuple[SandboxUser, ...]

    @property
    def crm_name(self) -> str:
        return SANDBOX_CRMS.get(self.crm, self.crm)


def _parse(data: dict[str, Any]) -> SandboxOrg:
    return SandboxOrg(
        crm=str(data["crm"]), org=str(data["org"]), instance_url=str(data["instance_url"]),
        idp_metadata_url=str(data["idp_metadata_url"]), idp_users=tuple(str(u) for u in data.get("idp_users", [])),
        fields=tuple(SandboxField(str(f["title"]), str(f["value"]), bool(f.get("secret"))) for f in data["fields"]),
        users=tuple(SandboxUser(str(u["username"]), str(u.get("role", "")), str(u.get("id", "")),
                                str(u.get("password", ""))) for u in data.get("users", [])),
    )


def _client(settings: Settings) -> httpx.Client:
    if not settings.demo:
        raise ConfigurationError(
            "Sandbox orgs exist in demo mode only",
            fix="Run the demo (make run, CRMBRIDGE_DEMO=1); a real tenant connects its own CRM and IdP.",
        )
    verify: ssl.SSLContext | bool = True
    if settings.sandbox_ca_file:
        verify = ssl.create_default_context(cafile=str(settings.sandbox_ca_file))
    return httpx.Client(base_url=settings.sandbox_url.rstrip("/"), verify=verify, timeout=15)


def _call(settings: Settings, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        with _client(settings) as client:
            return client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ProviderUnavailable(
            f"The CRM sandbox at {settings.sandbox_url} did not answer ({type(exc).__name__})",
            fix="Start it with `make run` (or python -m sandbox) and check CRMBRIDGE_SANDBOX_URL and "
                "CRMBRIDGE_SANDBOX_CA_FILE.",
        ) from None


def create_sandbox_org(
    *, session: Session, principal: Principal, tenant_id: int, crm: str, settings: Settings | None = None,
) -> SandboxOrg:
    """Provision (or find again) the tenant's org on ``crm`` and its IdP in the sandbox."""
    settings = settings or get_settings()
    tenant = get_tenant(session=session, principal=principal, tenant_id=tenant_id)
    if crm not in SANDBOX_CRMS:
        raise InvalidInput(f"{crm!r} is not a sandbox CRM: choose one of {', '.join(SANDBOX_CRMS.values())}.")
    r = _call(settings, "POST", "/_sandbox/provision", json={"tenant": tenant.slug, "name": tenant.name, "crm": crm})
    if r.status_code not in (200, 201):
        raise InvalidInput(f"The sandbox refused the org: {_error(r)}.")
    org = _parse(r.json())
    if r.status_code == 201:
        record_event(session, principal=principal, action="sandbox_org.create", tenant_id=tenant_id,
                     target=f"tenant:{tenant.slug}", details={"crm": crm, "org": org.org})
    return org


def list_sandbox_orgs(
    *, session: Session, principal: Principal, tenant_id: int, settings: Settings | None = None,
) -> list[SandboxOrg]:
    """The tenant's sandbox orgs (empty when none was made, or outside demo mode)."""
    settings = settings or get_settings()
    tenant = get_tenant(session=session, principal=principal, tenant_id=tenant_id)
    if not settings.demo:
        return []
    r = _call(settings, "GET", f"/_sandbox/provision/{tenant.slug}")
    if r.status_code == 404:
        return []
    if r.status_code != 200:
        raise ProviderUnavailable(f"The CRM sandbox could not list {tenant.slug}'s orgs: {_error(r)}",
                                  fix="Check the sandbox's output; restart it with make run.")
    return [_parse(o) for o in r.json().get("orgs", [])]


def _error(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error") or r.status_code)
    except ValueError:
        return f"HTTP {r.status_code}"
