"""An account's own credentials: the secure form's view and store, the app install's grant.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import SecretStr
from sqlmodel import Session, col, select

from core.clock import aware, utcnow
from core.connections.accounts import (
    CREDENTIAL_PURPOSE,
    INSTALL_MODES,
    INSTALL_PRINCIPAL,
    _load,
    _put_account_secret,
    _vault,
    auth_mode_of,
    credentials_form_url,
)
from core.errors import CrmBridgeError, InvalidInput, NotFound
from core.providers.catalog import FieldSpec, get_catalog
from core.tenants.access import Principal, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import CrmAccount, Tenant

log = logging.getLogger(__name__)

# -- account credentials (entered in the secure HTML form, never in Streamlit) -------------------------
NO_CREDENTIAL_STATES = frozenset({"not connected", "reconnect needed"})
USABLE_STATES = frozenset({"connected", "failed"})  # "failed": stored, rejected once; the test says why


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
        mode = auth_mode_of(account)
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
    mode = auth_mode_of(account)
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
    mode = auth_mode_of(account)
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


