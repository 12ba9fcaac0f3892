"""One mapping from stored values (enum values, step keys, roles, providers) to the words a user reads.

Every page shows these labels, never the raw value: ``label(CREDENTIAL_MODES, "api_user")`` →
"API user". An unknown value falls back to a readable form of itself (underscores become spaces), so a
new enum member never shows up as ``snake_case`` before it gets its label here."""

from __future__ import annotations

import re
from collections.abc import Mapping

ROLES = {
    "staff": "CRM Bridge staff",
    "tenant_admin": "Tenant admin",
    "leadership": "Leadership",
    "system": "System",
    "customer_success": "Customer success",
    "sales": "Sales",
}

CREDENTIAL_MODES = {
    "api_user": "API user",
    "per_user_oauth": "Each user's OAuth consent",
    "per_user_password": "Each user's stored password",
}

TENANT_STATUSES = {"onboarding": "Onboarding", "live": "Live", "suspended": "Suspended",
                   "offboarded": "Offboarded"}

ONBOARDING_STEPS = {
    "tenant": "Tenant",
    "crm_accounts": "CRM accounts",
    "credential_mode": "Credential mode",
    "connection_test": "Connection test",
    "sso": "Single sign-on",
    "users": "Users",
    "go_live": "Go live",
}

STEP_STATUSES = {"done": "Done", "deferred": "Deferred", "pending": "To do"}


ACCOUNT_STATUSES = {"active": "Active", "paused": "Paused", "disabled": "Disabled", "invited": "Invited"}


def humanize(value: object) -> str:
    """A raw value made readable when no label is known: ``per_user_x`` → "Per user x"."""
    text = "" if value is None else str(value)
    text = text.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def label(mapping: Mapping[str, str], value: object) -> str:
    if value is None:
        return ""
    return mapping.get(str(value), humanize(value))


def role(value: object) -> str:
    return label(ROLES, value)


def credential_mode(value: object) -> str:
    return label(CREDENTIAL_MODES, value)


def tenant_status(value: object) -> str:
    return label(TENANT_STATUSES, value)


def step(value: object) -> str:
    return label(ONBOARDING_STEPS, value)


def step_status(value: object) -> str:
    return label(STEP_STATUSES, value)


def provider(value: object) -> str:
    """A CRM's name as its catalog entry gives it ("dynamics-365" → "Microsoft Dynamics 365 Sales")."""
    from core.providers.catalog import get_catalog

    entry = get_catalog().providers.get(str(value)) if value is not None else None
    return entry.name if entry is not None else label({}, value)


def edition(provider_slug: object, value: object) -> str:
    """An edition's name from the catalog ("sales-enterprise" → "Dynamics 365 Sales Enterprise")."""
    from core.providers.catalog import get_catalog

    entry = get_catalog().providers.get(str(provider_slug)) if provider_slug is not None else None
    ed = entry.editions.get(str(value)) if entry is not None and value is not None else None
    return ed.name if ed is not None else label({}, value)


# A source is cited by its vendor document's title and public URL, never by a path on our machines
# ("../shared/CRM-FACTS.md", "file://…", "/work/…"): the reader cannot open those.
_PATH = re.compile(r"\s*(?:—|-|\bin\b)?\s*(?:file://|\.\./|\./|/work/|/home/|/tmp/)[^\s,;)]*", re.IGNORECASE)


def source_title(title: str | None) -> str:
    """A source's title without internal file paths: "Team notes — ../shared/X.md (secondary)" →
    "Team notes (secondary)"."""
    if not title:
        return ""
    text = _PATH.sub("", title)
    text = re.sub(r"\(\s*\)", "", text)
    return re.sub(r"\s{2,}", " ", text).strip(" —-")


def source_url(url: str | None) -> str | None:
    """Only a public (http/https) address is shown as a link; an internal one is left out."""
    return url if url and url.lower().startswith(("https://", "http://")) else None
