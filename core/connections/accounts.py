"""CRM accounts: add one from the catalog form (secret fields to the vault), its settings, and its
credential mode (moving away from per-user passwords shreds the stored ones, here in core).

Credentials: an account's secret fields (API user: client secret / private key; per-user OAuth: the
app's secret) are one JSON object in the vault under purpose ``crm-login`` with no app user; each
user's own credential (password + token, or OAuth refresh token) is the same purpose with their
``app_user_id``. They are read only inside ``vault.use()`` for the length of one piece of work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import SecretStr
from sqlmodel import Session, select

from core.clock import utcnow
from core.errors import ConfigurationError, Conflict, InvalidInput, NotFound
from core.providers.base import Provider
from core.providers.catalog import FieldSpec, get_catalog
from core.providers.config import AccountConfig, HttpTransport
from core.providers.transport import CrmUrlPolicy, check_account_urls
from core.settings import get_settings
from core.tenants.access import Principal, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import CredentialMode, CrmAccount

log = logging.getLogger(__name__)

CREDENTIAL_PURPOSE = "crm-login"
INSTALL_MODES = frozenset({"oauth_authorization_code"})  # account-level OAuth: the app install
INSTALL_PRINCIPAL = Principal.system("oauth-install")
KIND_BY_MODE = {
    "oauth_client_credentials": "client_secret",
    "jwt_bearer": "private_key",
    "oauth_authorization_code": "client_secret",
    "password": "password",
    "api_token": "api_token",
}
FORECAST_WINDOW = timedelta(hours=6)

ProviderFactory = Callable[..., Provider]

# -- helpers -----------------------------------------------------------------------------------------
def default_transport() -> HttpTransport:
    """The HTTP seam for console and workers: trusts the sandbox CA when one is configured, and calls
    only the vendors' hosts (plus the sandbox in demo mode)."""
    s = get_settings()
    return HttpTransport(verify=s.sandbox_verify(),
                         url_policy=CrmUrlPolicy.from_settings(s))


def _check_urls(provider: str, settings: Mapping[str, Any], url_policy: CrmUrlPolicy | None) -> None:
    """The account's URLs are on the provider's vendor hosts (InvalidInput naming the field otherwise)."""
    policy = url_policy or CrmUrlPolicy.from_settings()
    titles = {f.name: f.title for f in get_catalog().provider(provider).account_fields}
    try:
        check_account_urls(policy, provider, str(settings.get("instance_url") or ""),
                           {k: v for k, v in settings.items() if k != "instance_url"}, titles=titles)
    except ConfigurationError as exc:
        raise InvalidInput(exc.message, fix=exc.fix, code=exc.code) from None


def account_config(account: CrmAccount) -> AccountConfig:
    return AccountConfig.from_crm_account(account)


def credential_fields(secret: SecretStr | str, account: AccountConfig | None = None) -> dict[str, Any]:
    """A stored secret as the provider's credential mapping (values as SecretStr); the one place that
    reads the vault's stored form (connection tests, OAuth exchange and sync all use it).

    The vault holds either a JSON object of fields (a login: ``{"username", "password",
    "security_token"}``; an app: ``{"client_id", "client_secret"}``) or one bare secret, which is the
    field the account's mode needs: a password, a refresh token, a private key or a client secret.
    """
    text = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    if text.strip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            return {k: (SecretStr(v) if isinstance(v, str) else v) for k, v in data.items()}
    field_name = "password"
    if account is not None:
        if account.credential_mode == "per_user_oauth":
            field_name = "refresh_token"
        elif account.credential_mode == "api_user":
            field_name = {"jwt_bearer": "private_key", "api_token": "api_token"}.get(account.auth_mode,
                                                                                    "client_secret")
    return {field_name: SecretStr(text)}


def _load(session: Session, principal: Principal, account_id: int) -> CrmAccount:
    account = session.get(CrmAccount, account_id)
    if account is None:
        raise NotFound(f"CRM account {account_id} does not exist: pick one from the tenant page.")
    require_tenant(principal, account.tenant_id)
    return account


def _vault() -> Any:
    from core.vault import service as vault

    return vault


# -- add an account --------------------------------------------------------------------------------
def _new_account(
    session: Session, *, principal: Principal, tenant_id: int, provider: str, edition: str, label: str,
    auth_mode: str, credential_mode: str, settings: dict[str, str], now: datetime,
) -> CrmAccount:
    label = (label or "").strip()
    if not label or len(label) > 120:
        raise InvalidInput("Give the CRM account a label of 1–120 characters (e.g. 'EMEA sales').")
    taken = session.exec(select(CrmAccount.id).where(CrmAccount.tenant_id == tenant_id,
                                                     CrmAccount.label == label)).first()
    if taken is not None:
        raise Conflict(f"This tenant already has a CRM account labelled {label!r}: choose another label.")
    settings = dict(settings)
    instance_url = settings.pop("instance_url")
    settings["auth_mode"] = auth_mode
    account = CrmAccount(
        tenant_id=tenant_id, provider=provider, edition=edition, label=label, instance_url=instance_url,
        credential_mode=credential_mode, settings_json=json.dumps(settings, sort_keys=True),
        created_at=now,
    )
    session.add(account)
    session.flush()
    return account


def _put_account_secret(
    session: Session, *, principal: Principal, account: CrmAccount, auth_mode: str, secrets: dict[str, str],
    now: datetime,
) -> bool:
    """Put the account-level secret fields (one JSON object) in the vault; True when one was replaced."""
    vault = _vault()
    replaced = vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                     app_user_id=None, purpose=CREDENTIAL_PURPOSE) is not None
    vault.put(session, principal=principal, tenant_id=account.tenant_id, purpose=CREDENTIAL_PURPOSE,
              secret=json.dumps(secrets), crm_account_id=account.id,
              kind=KIND_BY_MODE.get(auth_mode, "password"), now=now)
    return replaced


def add_crm_account(
    *,
    session: Session,
    principal: Principal,
    tenant_id: int,
    provider: str,
    edition: str,
    label: str,
    auth_mode: str,
    values: dict[str, str | None],
    now: datetime | None = None,
    url_policy: CrmUrlPolicy | None = None,
) -> CrmAccount:
    """Create a CRM account from the full catalog form; secret fields go straight to the vault.

    For scripts, the demo and tests. The console uses ``add_crm_account_settings`` (no secrets) and
    the secure HTML form (``store_account_credentials``), so no secret passes through Streamlit.

    Raises:
        AccessDenied, NotFound (provider/edition/mode), InvalidInput (a field), Conflict (label taken).
    """
    require_tenant(principal, tenant_id)
    now = now or utcnow()
    cat = get_catalog()
    entry = cat.provider(provider)
    entry.edition(edition)
    mode = entry.auth_mode(auth_mode)
    if not (label or "").strip() or len((label or "").strip()) > 120:
        raise InvalidInput("Give the CRM account a label of 1–120 characters (e.g. 'EMEA sales').")
    settings, secrets = cat.validate_values(provider, auth_mode, values)
    _check_urls(provider, settings, url_policy)
    account = _new_account(session, principal=principal, tenant_id=tenant_id, provider=provider, edition=edition,
                           label=label, auth_mode=auth_mode, credential_mode=mode.credential_mode,
                           settings=settings, now=now)
    if secrets:
        _put_account_secret(session, principal=principal, account=account, auth_mode=auth_mode, secrets=secrets,
                            now=now)
    record_event(session, principal=principal, action="crm_account.create", tenant_id=tenant_id,
                 target=f"crm_account:{account.id}", at=now, details={
                     "provider": provider, "edition": edition, "label": account.label, "auth_mode": auth_mode,
                     "credential_mode": mode.credential_mode, "secret_fields": sorted(secrets)})
    return account


def add_crm_account_settings(
    *,
    session: Session,
    principal: Principal,
    tenant_id: int,
    provider: str,
    edition: str,
    label: str,
    auth_mode: str,
    values: Mapping[str, str | None],
    now: datetime | None = None,
    url_policy: CrmUrlPolicy | None = None,
) -> CrmAccount:
    """Create a CRM account from the catalog form's **non-secret** fields only (what the console's
    Streamlit form collects); its secret fields are entered afterwards in the secure HTML form at
    ``credentials_form_url(account.id)`` (``store_account_credentials``). A submitted secret field is
    refused, so a page cannot route a secret through here by mistake.

    Raises:
        AccessDenied, NotFound (provider/edition/mode), InvalidInput (a field, or a secret field given),
        Conflict (label taken).
    """
    require_tenant(principal, tenant_id)
    now = now or utcnow()
    cat = get_catalog()
    entry = cat.provider(provider)
    entry.edition(edition)
    mode = entry.auth_mode(auth_mode)
    specs = cat.form_fields(provider, auth_mode)
    secret_names = {f.name for f in specs if f.secret}
    unknown = set(values) - {f.name for f in specs}
    if unknown:
        raise InvalidInput(f"Unexpected fields: {', '.join(sorted(unknown))}.")
    if secret_names & set(values):
        raise InvalidInput("Secret fields are not entered in the console: add the account first, then enter its "
                           "credentials in the secure form.")
    settings: dict[str, str] = {}
    for f in specs:
        if f.secret:
            continue
        value = f.check(values.get(f.name))
        if value is not None:
            settings[f.name] = value
    _check_urls(provider, settings, url_policy)
    account = _new_account(session, principal=principal, tenant_id=tenant_id, provider=provider, edition=edition,
                           label=label, auth_mode=auth_mode, credential_mode=mode.credential_mode,
                           settings=settings, now=now)
    record_event(session, principal=principal, action="crm_account.create", tenant_id=tenant_id,
                 target=f"crm_account:{account.id}", at=now, details={
                     "provider": provider, "edition": edition, "label": account.label, "auth_mode": auth_mode,
                     "credential_mode": mode.credential_mode, "secret_fields": [],
                     "credentials_pending": sorted(secret_names)})
    return account


@dataclass(frozen=True)
class AccountSettingsForm:
    """What the edit form of an existing CRM account shows: the catalog's non-secret fields for the
    account's sign-in method with their current values (secrets never appear here)."""

    account_id: int
    tenant_id: int
    label: str
    provider: str
    edition: str
    editions: dict[str, str]  # edition id -> name, from the catalog
    auth_mode: str
    fields: list[FieldSpec]
    values: dict[str, str]


def account_settings_form(*, session: Session, principal: Principal, account_id: int) -> AccountSettingsForm:
    """The current non-secret settings of an account, as the catalog form lays them out.

    Raises:
        AccessDenied (another tenant), NotFound.
    """
    account = _load(session, principal, account_id)
    cat = get_catalog()
    entry = cat.provider(account.provider)
    mode = auth_mode_of(account)
    settings = _account_settings(account)
    fields = [f for f in cat.form_fields(account.provider, mode.mode) if not f.secret]
    values = {f.name: (account.instance_url or "" if f.name == "instance_url" else str(settings.get(f.name) or ""))
              for f in fields}
    assert account.id is not None
    return AccountSettingsForm(account.id, account.tenant_id, account.label, account.provider, account.edition,
                               {e: entry.editions[e].name for e in entry.editions}, mode.mode, fields, values)


def _account_settings(account: CrmAccount) -> dict[str, Any]:
    try:
        data = json.loads(account.settings_json or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def update_crm_account_settings(
    *,
    session: Session,
    principal: Principal,
    account_id: int,
    values: Mapping[str, str | None],
    label: str | None = None,
    edition: str | None = None,
    now: datetime | None = None,
) -> CrmAccount:
    """Change an existing account's **non-secret** settings (label, edition, the catalog's account and
    sign-in fields, e.g. the attribution field), checked by the same catalog rules as the add form.
    The sign-in method and its secrets are not changed here (secrets: the secure form). The audit
    entry names the changed fields and their new values (all non-secret).

    Raises:
        AccessDenied (another tenant), NotFound (account, edition), InvalidInput (a field, or a secret
        field given), Conflict (label taken).
    """
    now = now or utcnow()
    account = _load(session, principal, account_id)
    cat = get_catalog()
    entry = cat.provider(account.provider)
    mode = auth_mode_of(account)
    specs = cat.form_fields(account.provider, mode.mode)
    secret_names = {f.name for f in specs if f.secret}
    if secret_names & set(values):
        raise InvalidInput("Secret fields are not entered in the console: use the secure credentials form.")
    unknown = set(values) - {f.name for f in specs}
    if unknown:
        raise InvalidInput(f"Unexpected fields: {', '.join(sorted(unknown))}.")
    settings = _account_settings(account)
    changes: dict[str, Any] = {}
    for f in specs:
        if f.secret or f.name not in values:
            continue
        current = account.instance_url if f.name == "instance_url" else settings.get(f.name)
        if (values.get(f.name) or "").strip() == str(current or "").strip():
            continue  # unchanged: an older account missing a now-required field can still be edited
        value = f.check(values.get(f.name))
        if f.name == "instance_url":
            if value and value != account.instance_url:
                changes[f.name] = value
                account.instance_url = value
            continue
        if (settings.get(f.name) or None) != value:
            changes[f.name] = value
            if value is None:
                settings.pop(f.name, None)
            else:
                settings[f.name] = value
    if label is not None:
        new_label = label.strip()
        if not new_label or len(new_label) > 120:
            raise InvalidInput("Give the CRM account a label of 1–120 characters (e.g. 'EMEA sales').")
        if new_label != account.label:
            taken = session.exec(select(CrmAccount.id).where(CrmAccount.tenant_id == account.tenant_id,
                                                             CrmAccount.label == new_label)).first()
            if taken is not None:
                raise Conflict(f"This tenant already has a CRM account labelled {new_label!r}: choose another label.")
            changes["label"] = new_label
            account.label = new_label
    if edition is not None and edition != account.edition:
        entry.edition(edition)  # NotFound names the editions
        changes["edition"] = edition
        account.edition = edition
    if not changes:
        return account
    settings["auth_mode"] = settings.get("auth_mode") or mode.mode
    account.settings_json = json.dumps(settings, sort_keys=True)
    session.add(account)
    session.flush()
    record_event(session, principal=principal, action="crm_account.update", tenant_id=account.tenant_id,
                 target=f"crm_account:{account.id}", at=now,
                 details={"changed": sorted(changes), "values": changes})
    return account


CREDENTIALS_PATH = "/crm-accounts/{account_id}/credentials"


def credentials_form_url(account_id: int) -> str:
    """The absolute URL of the secure form where an account's secret fields are entered."""
    return get_settings().public(CREDENTIALS_PATH.format(account_id=account_id))


def auth_mode_of(account: CrmAccount) -> Any:
    """The catalog auth mode the account signs in with: the one chosen on the form, unless the
    credential mode was changed since (then the catalog's first mode for the new credential mode)."""
    entry = get_catalog().provider(account.provider)
    try:
        settings = json.loads(account.settings_json or "{}")
    except ValueError:
        settings = {}
    chosen = settings.get("auth_mode") if isinstance(settings, dict) else None
    if chosen:
        try:
            mode = entry.auth_mode(str(chosen))
        except NotFound:
            mode = None
        if mode is not None and mode.credential_mode == account.credential_mode:
            return mode
    modes = entry.modes_for(account.credential_mode)
    if not modes:
        raise NotFound(f"{entry.name} has no sign-in method for credential mode {account.credential_mode!r}: "
                       "choose another credential mode on the onboarding page.")
    return modes[0]


def set_credential_mode(
    *, session: Session, principal: Principal, account_id: int, mode: str, now: datetime | None = None
) -> CrmAccount:
    """Change how our service acts in the CRM. Leaving per-user passwords shreds every stored password
    of the account in the same transaction (the vault's mode-change rule, enforced here and not left to
    a page): a password kept for a mode that no longer uses it is a liability with no use.

    Raises:
        AccessDenied (another tenant), NotFound, InvalidInput (unknown mode).
    """
    account = _load(session, principal, account_id)
    try:
        new = CredentialMode(mode).value
    except ValueError:
        raise InvalidInput(
            f"Unknown credential mode {mode!r}: use api_user, per_user_oauth or per_user_password."
        ) from None
    old = account.credential_mode
    if new == old:
        return account
    now = now or utcnow()
    account.credential_mode = new
    session.add(account)
    record_event(session, principal=principal, action="crm_account.credential_mode", tenant_id=account.tenant_id,
                 target=f"crm_account:{account.id}", at=now, details={"from": old, "to": new})
    if new != CredentialMode.per_user_password.value:
        session.flush()
        _vault().destroy_for_mode_change(session, principal=principal, crm_account_id=account_id, now=now)
    return account
