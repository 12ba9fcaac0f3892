"""Tenant-scoped services over the providers: add a CRM account from the catalog form, test its
connection with the real credential, and keep the API-quota gauge (samples + forecast).

Credentials: an account's secret fields (API user: client secret / private key; per-user OAuth: the
app's secret) are one JSON object in the vault under purpose ``crm-login`` with no app user; each
user's own credential (password + token, or OAuth refresh token) is the same purpose with their
``app_user_id``. They are read only inside ``vault.use()`` for the length of one piece of work.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import SecretStr
from sqlmodel import Session, col, select

from core.clock import aware, utcnow
from core.connections.models import ApiUsageSample
from core.errors import ConfigurationError, Conflict, CrmBridgeError, InvalidInput, NotFound
from core.providers.base import ApiUsage, ConnectionReport, LicenseSnapshot, Provider, StepResult
from core.providers.catalog import FieldSpec, get_catalog
from core.providers.config import AccountConfig, Credential, HttpTransport
from core.providers.transport import CrmUrlPolicy, check_account_urls
from core.settings import get_settings
from core.tenants.access import Principal, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import CrmAccount, Tenant

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


def credential_fields(secret: SecretStr | str) -> dict[str, Any]:
    """A vault secret (a JSON object of fields) as a provider credential mapping of SecretStr."""
    text = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return {"password": SecretStr(text)}
    return {k: SecretStr(v) if isinstance(v, str) else v for k, v in data.items()}


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
    mode = _auth_mode_of(account)
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
    mode = _auth_mode_of(account)
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


# -- account credentials (entered in the secure HTML form, never in Streamlit) -------------------------
CREDENTIALS_PATH = "/crm-accounts/{account_id}/credentials"
NO_CREDENTIAL_STATES = frozenset({"not connected", "reconnect needed"})
USABLE_STATES = frozenset({"connected", "failed"})  # "failed": stored, rejected once; the test says why


def credentials_form_url(account_id: int) -> str:
    """The absolute URL of the secure form where an account's secret fields are entered."""
    return get_settings().public(CREDENTIALS_PATH.format(account_id=account_id))


def _auth_mode_of(account: CrmAccount) -> Any:
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


def _tenant_slug(session: Session, tenant_id: int) -> str:
    tenant = session.get(Tenant, tenant_id)
    return tenant.slug if tenant is not None else ""


def tenant_slug_of(session: Session, account: CrmAccount) -> str:
    """The slug of an account's tenant (the console's address for it)."""
    return _tenant_slug(session, account.tenant_id)


@dataclass(frozen=True)
class AccountCredentials:
    """What the secure form asks for an account, and whether the vault holds it (never the secret)."""

    account_id: int
    tenant_id: int
    label: str
    provider: str
    provider_name: str
    credential_mode: str
    auth_mode: str
    auth_mode_title: str
    fields: tuple[FieldSpec, ...]  # the auth mode's secret fields, in catalog order
    user_fields: tuple[FieldSpec, ...]  # what each user enters on their connect link
    state: str  # the vault slot: connected / failed / invalid / reconnect needed / not connected
    stored_at: datetime | None = None
    stored_by: str | None = None
    tenant_slug: str = ""  # the console's "Back to the console" keeps this tenant in focus

    @property
    def url(self) -> str:
        return credentials_form_url(self.account_id)

    @property
    def needs_secret(self) -> bool:
        """The auth mode has account-level secret fields (entered in the secure form)."""
        return bool(self.fields)

    @property
    def installs_app(self) -> bool:
        """The account signs in by an app install (HubSpot): after the app's secret is stored, an admin
        of the CRM account approves the install and its refresh token joins that secret."""
        return _installs_app(self.auth_mode, self.credential_mode)

    @property
    def stored(self) -> bool:
        """The vault holds a credential for the account (saving the form replaces it)."""
        return self.state not in NO_CREDENTIAL_STATES

    @property
    def missing(self) -> bool:
        """A required secret is not usable from the vault (never entered, destroyed, or undecryptable):
        the account cannot sign in until one is entered."""
        return any(f.required for f in self.fields) and self.state not in USABLE_STATES


def _credentials_of(session: Session, account: CrmAccount) -> AccountCredentials:
    from core.vault.models import VaultCredential

    assert account.id is not None
    vault = _vault()
    try:
        mode = _auth_mode_of(account)
        auth_mode, title = mode.mode, mode.title
        fields, user_fields = tuple(mode.secret_fields), tuple(mode.user_fields)
    except NotFound:  # the credential mode was changed to one the catalog has no sign-in method for
        auth_mode, title, fields, user_fields = "", f"no sign-in method for {account.credential_mode}", (), ()
    state = vault.credential_state(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                   app_user_id=None, purpose=CREDENTIAL_PURPOSE)
    ref = vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                app_user_id=None, purpose=CREDENTIAL_PURPOSE)
    row = session.get(VaultCredential, ref.id) if ref is not None else None
    return AccountCredentials(
        account_id=account.id, tenant_id=account.tenant_id, label=account.label, provider=account.provider,
        provider_name=get_catalog().provider(account.provider).name, credential_mode=account.credential_mode,
        auth_mode=auth_mode, auth_mode_title=title, fields=fields, user_fields=user_fields, state=state,
        stored_at=aware(row.created_at) if row is not None else None,
        stored_by=row.stored_by if row is not None else None,
        tenant_slug=_tenant_slug(session, account.tenant_id),
    )


def account_credentials(*, session: Session, principal: Principal, account_id: int) -> AccountCredentials:
    """The secret fields the account's auth mode needs and whether the vault holds them.

    Raises:
        AccessDenied, NotFound.
    """
    return _credentials_of(session, _load(session, principal, account_id))


def list_account_credentials(*, session: Session, principal: Principal, tenant_id: int) -> list[AccountCredentials]:
    """``account_credentials`` for every CRM account of the tenant, oldest first."""
    require_tenant(principal, tenant_id)
    accounts = session.exec(select(CrmAccount).where(CrmAccount.tenant_id == tenant_id)
                            .order_by(col(CrmAccount.id))).all()
    return [_credentials_of(session, a) for a in accounts]


def store_account_credentials(
    *,
    session: Session,
    principal: Principal,
    account_id: int,
    secrets: Mapping[str, str | SecretStr | None],
    now: datetime | None = None,
) -> AccountCredentials:
    """Check the account's secret fields against the catalog and put them in the vault (replacing any
    held; audited as ``crm_account.credentials.store`` or ``.replace``, field names only). Nothing is
    stored when a field is wrong.

    Raises:
        AccessDenied, NotFound, InvalidInput (a field; or the auth mode has no account-level secret),
        vault errors (KeyMissing, …).
    """
    now = now or utcnow()
    account = _load(session, principal, account_id)
    mode = _auth_mode_of(account)
    specs = list(mode.secret_fields)
    if not specs:
        who = (" Each user enters " + ", ".join(f.title.lower() for f in mode.user_fields)
               + " through their own connect link.") if mode.user_fields else ""
        raise InvalidInput(f"{account.label} signs in with {mode.title}, which has no account-level secret.{who}")
    unknown = set(secrets) - {f.name for f in specs}
    if unknown:
        raise InvalidInput(f"Unexpected fields: {', '.join(sorted(unknown))}: nothing was stored.")
    clean: dict[str, str] = {}
    try:
        for f in specs:
            raw = secrets.get(f.name)
            value = f.check(raw.get_secret_value() if isinstance(raw, SecretStr) else raw)
            if value is not None:
                clean[f.name] = value
        if not clean:
            raise InvalidInput("Enter " + " or ".join(f.title for f in specs) + ": nothing was stored.")
        names = sorted(clean)
        if _installs_app(mode.mode, account.credential_mode):
            kept = _held_refresh_token(session, account, now)  # a new app secret keeps the app's install
            if kept:
                clean["refresh_token"] = kept
        replaced = _put_account_secret(session, principal=principal, account=account, auth_mode=mode.mode,
                                       secrets=clean, now=now)
    finally:
        clean.clear()
    record_event(session, principal=principal, action="crm_account.credentials." + ("replace" if replaced else "store"),
                 tenant_id=account.tenant_id, target=f"crm_account:{account.id}", at=now, details={
                     "auth_mode": mode.mode, "secret_fields": names, "replaced": replaced})
    session.flush()
    log.info("crm account %s: credentials %s by %s", account.id, "replaced" if replaced else "stored",
             principal.email)
    return _credentials_of(session, account)


def _installs_app(auth_mode: str, credential_mode: str) -> bool:
    return auth_mode in INSTALL_MODES and credential_mode == "api_user"


def _held_account_fields(session: Session, account: CrmAccount, *, reason: str, now: datetime) -> dict[str, Any] | None:
    """The account-level secret fields the vault holds (None when nothing is stored). vault.use commits
    the caller's session first, so call it before writing."""
    vault = _vault()
    ref = vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                app_user_id=None, purpose=CREDENTIAL_PURPOSE)
    if ref is None:
        return None
    with vault.use(session, ref, principal=INSTALL_PRINCIPAL, reason=reason, now=now) as secret:
        return dict(json.loads(secret.get_secret_value()))


def _held_refresh_token(session: Session, account: CrmAccount, now: datetime) -> str | None:
    """The app install's refresh token held with the account's current secret, if any."""
    try:
        fields = _held_account_fields(session, account, reason="keep the app install with a new secret", now=now)
    except CrmBridgeError:  # destroyed, expired or unreadable: nothing to keep, the admin installs again
        return None
    token = (fields or {}).get("refresh_token")
    return str(token) if token else None


def store_install_grant(
    *, session: Session, account: CrmAccount, refresh_token: str, installed_by: str, identity: str | None,
    now: datetime | None = None,
) -> None:
    """An app install's refresh token joins the account's stored app secret (one vault entry, replaced;
    the install is audited under the console user who started it). Called by the OAuth callback after
    the token passed a real API call.

    Raises:
        InvalidInput: no app secret is stored yet, or the account does not sign in by app install.
    """
    now = now or utcnow()
    mode = _auth_mode_of(account)
    if not _installs_app(mode.mode, account.credential_mode):
        raise InvalidInput(f"{account.label} does not sign in by an app install: nothing was stored.")
    fields = _held_account_fields(session, account, reason="add an app install's refresh token", now=now)
    if fields is None:
        raise InvalidInput("The app's client secret is not stored: enter it on the credentials page, then install "
                           "the app again.")
    try:
        fields["refresh_token"] = refresh_token
        _put_account_secret(session, principal=INSTALL_PRINCIPAL, account=account, auth_mode=mode.mode,
                            secrets=fields, now=now)
    finally:
        fields.clear()
    record_event(session, principal=installed_by, action="crm_account.app_installed", tenant_id=account.tenant_id,
                 target=f"crm_account:{account.id}", details={"installed_as": identity}, at=now)
    session.flush()


# -- connection test -------------------------------------------------------------------------------
def _per_user_ref(session: Session, account: CrmAccount, app_user_id: int | None) -> tuple[Any, int | None]:
    vault = _vault()
    if app_user_id is not None:
        return vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                     app_user_id=app_user_id, purpose=CREDENTIAL_PURPOSE), app_user_id
    from core.vault.models import VaultCredential

    user_ids = session.exec(
        select(VaultCredential.app_user_id).where(
            VaultCredential.crm_account_id == account.id, VaultCredential.purpose == CREDENTIAL_PURPOSE,
            col(VaultCredential.app_user_id).is_not(None),
        ).order_by(col(VaultCredential.id))
    ).all()
    for uid in user_ids:
        ref = vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                    app_user_id=uid, purpose=CREDENTIAL_PURPOSE)
        if ref is not None:
            return ref, uid
    return None, None


def _missing_credential_report(account: CrmAccount) -> ConnectionReport:
    if account.credential_mode == "api_user":
        fix = (f"Enter the credentials first in the secure form ({credentials_form_url(account.id or 0)}), "
               "then test again.")
    else:
        fix = "Send a user a connect link (Users & sync) so they connect their own credential, then test again."
    step = StepResult("authenticate", False, "No credential is stored for this CRM account", fix)
    return ConnectionReport(ok=False, steps=[step])


def test_crm_account(
    *,
    session: Session,
    principal: Principal,
    account_id: int,
    app_user_id: int | None = None,
    transport: HttpTransport | None = None,
    provider_factory: ProviderFactory | None = None,
    now: datetime | None = None,
) -> ConnectionReport:
    """Run the provider's connection test with the stored credential and keep the result on the account.

    For per-user modes the credential of ``app_user_id`` (or the first user who connected) is used; a
    definitive rejection of that per-user credential is reported to the vault (it self-destructs).

    Raises:
        AccessDenied, NotFound; vault errors (CredentialDestroyed, CredentialExpired, …) as they are.
    """
    from core.providers.registry import create_provider

    now = now or utcnow()
    account = _load(session, principal, account_id)
    config = account_config(account)
    vault = _vault()
    if account.credential_mode == "api_user":
        ref = vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                    app_user_id=None, purpose=CREDENTIAL_PURPOSE)
        user_id = None
    else:
        ref, user_id = _per_user_ref(session, account, app_user_id)
    failures: list[CrmBridgeError] = []
    usage: ApiUsage | None = None
    licenses: LicenseSnapshot | None = None
    if ref is None:
        report = _missing_credential_report(account)
    else:
        factory = provider_factory or create_provider
        with vault.use(session, ref, principal=principal, reason=f"connection test of {account.label}",
                       now=now) as secret:
            credential: Credential = credential_fields(secret)
            try:
                provider = factory(account=config, credential=credential,
                                   transport=transport or default_transport(), on_auth_failure=failures.append)
            except ConfigurationError as exc:  # the account is not set up far enough to try: say what is missing
                provider = None
                report = ConnectionReport(ok=False, steps=[StepResult("configuration", False, exc.message,
                                                                      exc.fix or "")])
            if provider is not None:
                try:
                    report = provider.test_connection()
                    usage, licenses = report.api_usage, report.licenses
                finally:
                    provider.close()
        if failures and user_id is not None:
            vault.report_auth_failure(session, ref, principal=principal, now=now)
    failed = report.failed_step
    summary: dict[str, Any] = {
        "ok": report.ok, "identity": report.identity, "org_id": report.org_id,
        "detected_edition": report.detected_edition, "latency_ms": report.latency_ms, "app_user_id": user_id,
        "error_code": failed.code if failed else None,
        "steps": [{"name": s.name, "ok": s.ok, "detail": s.detail, "fix": s.fix, "latency_ms": s.latency_ms,
                   "code": s.code} for s in report.steps],
    }
    if licenses is not None:
        summary["licenses"] = {"total": licenses.total, "used": licenses.used,
                               "integration_total": licenses.integration_total,
                               "integration_used": licenses.integration_used, "observed_at": now.isoformat()}
    account = _load(session, principal, account_id)  # vault.use() committed; reload
    if usage is not None:
        _add_sample(session, account, usage, now)
        session.flush()
        gauge = quota_gauge(session=session, principal=principal, account_id=account_id, now=now)
        summary["api_usage"] = {
            "used": usage.used, "limit": usage.limit, "window": usage.window,
            "observed_at": (usage.observed_at or now).isoformat(), "rate_per_hour": gauge.rate_per_hour,
            "exhausts_at": gauge.exhausted_at.isoformat() if gauge.exhausted_at else None,
        }
    account.last_test_at = now
    account.last_test_ok = report.ok
    account.last_test_summary = json.dumps(summary, default=str)[:20_000]
    account.status = "connected" if report.ok else "failing"
    session.add(account)
    record_event(session, principal=principal, action="crm_account.test", tenant_id=account.tenant_id,
                 target=f"crm_account:{account.id}", at=now, details={
                     "ok": report.ok, "failed_step": failed.name if failed else None,
                     "detected_edition": report.detected_edition})
    session.flush()
    return report


def check_credential(
    *,
    session: Session,
    principal: Principal,
    account_id: int,
    fields: Mapping[str, SecretStr],
    transport: HttpTransport | None = None,
    provider_factory: ProviderFactory | None = None,
) -> ConnectionReport:
    """Test a credential a user just entered (connect link) *before* it is stored: the account's own
    secret (e.g. the OAuth app's) is added from the vault; nothing is stored, reported or audited —
    the caller stores the fields only when ``report.ok`` (or its ``api_access`` step) says so.
    """
    from core.providers.registry import create_provider

    account = _load(session, principal, account_id)
    config = account_config(account)
    credential: dict[str, Any] = {}
    vault = _vault()
    ref = vault.find_credential(session, tenant_id=account.tenant_id, crm_account_id=account.id,
                                app_user_id=None, purpose=CREDENTIAL_PURPOSE)
    if ref is not None and account.credential_mode != "api_user":
        with vault.use(session, ref, principal=principal, reason="check a user's new credential") as secret:
            credential.update(credential_fields(secret))
    credential.update(fields)  # typed SecretStr values, straight to the provider
    provider = (provider_factory or create_provider)(account=config, credential=credential,
                                                     transport=transport or default_transport())
    try:
        return provider.test_connection()
    finally:
        provider.close()


@dataclass
class StoredTest:
    ok: bool | None
    at: datetime | None
    steps: list[StepResult] = field(default_factory=list)
    identity: str | None = None
    detected_edition: str | None = None


def last_connection_test(*, session: Session, principal: Principal, account_id: int) -> StoredTest:
    """The last connection test stored on the account (for the page; no CRM call)."""
    account = _load(session, principal, account_id)
    data: dict[str, Any] = {}
    if account.last_test_summary:
        try:
            data = json.loads(account.last_test_summary)
        except ValueError:
            data = {}
    steps = [StepResult(s["name"], bool(s["ok"]), s.get("detail", ""), s.get("fix"), s.get("latency_ms"),
                        code=s.get("code")) for s in data.get("steps", [])]
    return StoredTest(ok=account.last_test_ok, at=aware(account.last_test_at), steps=steps,
                      identity=data.get("identity"), detected_edition=data.get("detected_edition"))


# -- API usage and the quota gauge -----------------------------------------------------------------
def _add_sample(session: Session, account: CrmAccount, usage: ApiUsage, now: datetime) -> ApiUsageSample:
    assert account.id is not None
    sample = ApiUsageSample(
        tenant_id=account.tenant_id, crm_account_id=account.id, observed_at=usage.observed_at or now,
        used=max(usage.used, 0), limit=max(usage.limit, 0), window=usage.window[:30],
        source=str(usage.extra.get("source", ""))[:40],
    )
    session.add(sample)
    return sample


def record_api_usage(
    *, session: Session, principal: Principal, account_id: int, usage: ApiUsage, now: datetime | None = None
) -> ApiUsageSample:
    """Keep one reading of the CRM's own API counter (workers call this after each run)."""
    account = _load(session, principal, account_id)
    sample = _add_sample(session, account, usage, now or utcnow())
    session.flush()
    return sample


@dataclass
class QuotaGauge:
    used: int | None
    limit: int | None
    observed_at: datetime | None
    window: str = "24h rolling"
    rate_per_hour: float | None = None
    exhausted_at: datetime | None = None
    samples: list[tuple[datetime, int]] = field(default_factory=list)

    @property
    def fraction(self) -> float | None:
        if self.used is None or not self.limit:
            return None
        return self.used / self.limit

    @property
    def status(self) -> str:
        f = self.fraction
        if f is None:
            return "unknown"
        if f >= 1:
            return "exhausted"
        if f >= 0.9:
            return "critical"
        if f >= 0.75:
            return "warning"
        return "ok"

    def forecast_text(self, now: datetime) -> str:
        if self.used is None:
            return "No API usage recorded yet: run a connection test."
        if self.status == "exhausted":
            return "The allocation is used up: calls fail with REQUEST_LIMIT_EXCEEDED until the window frees."
        name, span, rolling = window_terms(self.window)
        rate = f" ({self.rate_per_hour:,.0f} calls/hour)" if self.rate_per_hour else ""
        lasts = f"At this rate{rate} the {name} allocation will last the window."
        if self.exhausted_at is None or not self.rate_per_hour:
            return lasts
        # A rolling window frees the calls made ``span`` ago: at a steady rate the usage levels off at
        # rate × span, so it runs out only when that exceeds the limit. A fixed window resets after ``span``.
        levels_off_at = self.rate_per_hour * span.total_seconds() / 3600 if span is not None else None
        if rolling and levels_off_at is not None and self.limit is not None and levels_off_at <= self.limit:
            return lasts
        if span is not None and self.exhausted_at - now > span:
            return lasts
        when = self.exhausted_at.strftime("%H:%M UTC")
        if self.exhausted_at.date() != now.date():
            when = self.exhausted_at.strftime("%a %d %b %H:%M UTC")
        return f"At this rate{rate} the {name} allocation is used up by {when}."


def window_terms(window: str | None) -> tuple[str, timedelta | None, bool]:
    """The vendor's quota window in words: ("24-hour", 24 h, rolling) for "24h rolling", ("daily",
    1 day, fixed) for "day", ("5-minute", 5 min, rolling) for "5min", ("10-second", ...) for "10s"."""
    text = (window or "").strip().lower()
    rolling = "rolling" in text or text.endswith(("min", "s")) and not text.endswith("ms")
    m = re.match(r"^(\d+)\s*(h|hour|hours|min|m|s|sec|d|day|days)\b", text)
    if text in ("day", "daily"):
        return "daily", timedelta(days=1), False
    if m is None:
        return (text or "API"), None, rolling
    n, unit = int(m.group(1)), m.group(2)
    if unit in ("h", "hour", "hours"):
        return f"{n}-hour", timedelta(hours=n), rolling
    if unit in ("min", "m"):
        return f"{n}-minute", timedelta(minutes=n), True
    if unit in ("s", "sec"):
        return f"{n}-second", timedelta(seconds=n), True
    return (f"{n}-day" if n != 1 else "daily"), timedelta(days=n), rolling


def quota_gauge(
    *, session: Session, principal: Principal, account_id: int, now: datetime | None = None
) -> QuotaGauge:
    """Latest usage and a forecast of when the allocation runs out at the recent rate (least squares
    over the last six hours of samples; no forecast when usage is flat or falling)."""
    now = now or utcnow()
    account = _load(session, principal, account_id)
    rows = session.exec(
        select(ApiUsageSample).where(ApiUsageSample.crm_account_id == account.id,
                                     col(ApiUsageSample.observed_at) >= now - timedelta(hours=24),
                                     col(ApiUsageSample.observed_at) <= now)
        .order_by(col(ApiUsageSample.observed_at))
    ).all()
    if not rows:
        latest = session.exec(select(ApiUsageSample).where(ApiUsageSample.crm_account_id == account.id)
                              .order_by(col(ApiUsageSample.observed_at).desc())).first()
        rows = [latest] if latest else []
    if not rows:
        return QuotaGauge(None, None, None)
    last = rows[-1]
    gauge = QuotaGauge(used=last.used, limit=last.limit, observed_at=aware(last.observed_at), window=last.window,
                       samples=[(aware(r.observed_at) or now, r.used) for r in rows])
    recent = [r for r in rows if (aware(r.observed_at) or now) >= now - FORECAST_WINDOW]
    if len(recent) >= 2:
        t0 = aware(recent[0].observed_at) or now
        xs = [((aware(r.observed_at) or now) - t0).total_seconds() / 3600 for r in recent]
        ys = [float(r.used) for r in recent]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var > 0:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
            if slope > 0:
                gauge.rate_per_hour = slope
                if last.used < last.limit:
                    base = aware(last.observed_at) or now
                    gauge.exhausted_at = base + timedelta(hours=(last.limit - last.used) / slope)
    return gauge


# ``test_crm_account`` is a service, not a pytest test: keep test modules that import it from collecting it.
test_crm_account.__test__ = False  # type: ignore[attr-defined]
