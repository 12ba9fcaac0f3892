"""Connect links: how an app user's own CRM login reaches the vault, and how they take it back.

An admin creates a link for one app user and one CRM account (``create_connect_link``); it expires
after 24 hours by default and is signed with the server secret (a forged token is refused before any
database read; only the token's SHA-256 is stored). Opening it (GET, ``open_link``) changes nothing but
the audit log. A submission (``submit_link``) tests the login against the CRM first, checks that it
logs in as that user's CRM user id (nobody can attach their own login to someone else's name), then
stores it and consumes the link — only a successful submission consumes it; five failed attempts
burn it. The same link lets the user revoke what we hold, even after it was used or expired.

No hooks: ``submit_link`` calls its ``tester`` (by default ``core.connections.testing.test_link_login``,
the account's provider class) with the login as typed values; ``oauth_start_url`` calls
``core.connections.routes.begin_authorization`` directly, and that module's callback calls
``complete_oauth``. The SSO gate is a parameter of the link routes (``link_routes.connect_link_routes``).

What a per-user login looks like in the vault (purpose ``crm-login``, kind ``password``): the JSON
``{"username": ..., "password": ..., "security_token": ...}``; read it inside ``use()`` with
``parse_login_secret``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from pydantic import SecretStr
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.db import session_scope
from core.errors import CrmBridgeError, InvalidInput, LinkInvalid, NotFound, ProviderError
from core.keys import CONNECT_LINK, derive_key
from core.settings import get_settings
from core.tenants.access import Principal, offboarded_message, require_not_offboarded, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import AppUser, AppUserCrmIdentity, CrmAccount, Tenant, TenantStatus
from core.vault import service
from core.vault.models import CredentialKind, CredentialRef, VaultConnectLink
from core.vault.policy import Policy, get_policy

log = logging.getLogger("crmbridge.connections.links")

LINK_TTL = timedelta(hours=24)
MIN_TTL = timedelta(minutes=10)
MAX_TTL = timedelta(days=7)
MAX_ATTEMPTS = 5
OFFBOARDED_STATE = "offboarded"
LOGIN_PURPOSE = "crm-login"
VIA = "connect-link"
PER_USER_MODES = service.PER_USER_MODES


# --- what the CRM test gets ---------------------------------------------------------------------


@dataclass(frozen=True)
class CredentialCheck:
    """What a credential tester gets: the CRM account, the user it must log in as, and the login as
    typed values (the password stays a SecretStr; nothing is JSON-encoded on the way to the CRM)."""

    tenant_id: int
    crm_account_id: int
    provider: str
    edition: str
    instance_url: str | None
    settings_json: str
    app_user_id: int
    expected_crm_user_id: str
    login: LoginSecret

    @property
    def username(self) -> str:
        return self.login.username


class CredentialTester(Protocol):
    """Logs in with ``check.login`` and returns the CRM user id it logged in as.

    Raises:
        CredentialRejected (or another ``core.errors.ProviderError``): the CRM did not accept it.
    """

    def __call__(self, check: CredentialCheck) -> str: ...


# --- the login secret ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginSecret:
    """A per-user CRM login as typed values; ``login_secret`` serialises it only for the vault."""

    username: str
    password: SecretStr
    security_token: SecretStr

    @property
    def password_with_token(self) -> SecretStr:
        """Salesforce's SOAP login() takes the password with the security token appended."""
        return SecretStr(self.password.get_secret_value() + self.security_token.get_secret_value())


def login_secret(username: str, password: str, security_token: str = "") -> SecretStr:
    """The vault's stored form of a login (one sealed JSON object); read back with ``parse_login_secret``."""
    return SecretStr(json.dumps({"username": username, "password": password, "security_token": security_token}))


def stored_form(login: LoginSecret) -> SecretStr:
    return login_secret(login.username, login.password.get_secret_value(), login.security_token.get_secret_value())


def parse_login_secret(secret: SecretStr) -> LoginSecret:
    try:
        data = json.loads(secret.get_secret_value())
        return LoginSecret(str(data["username"]), SecretStr(str(data["password"])),
                           SecretStr(str(data.get("security_token") or "")))
    except (ValueError, KeyError, TypeError):
        raise InvalidInput("This credential is not a stored login (username and password): store it again.") from None


def offers_oauth(provider: str) -> bool:
    """The provider class signs users in with OAuth (authorization code + PKCE)."""
    from core.providers.base import AuthorizationCodeSupport
    from core.providers.registry import get_provider_class

    try:
        return issubclass(get_provider_class(provider), AuthorizationCodeSupport)
    except (ImportError, KeyError, ValueError, CrmBridgeError):
        return False


def same_crm_user(expected: str, actual: str | None) -> bool:
    """CRM user ids match; Salesforce's 15- and 18-character forms of one id count as equal."""
    a, b = (expected or "").strip(), (actual or "").strip()
    if not a or not b:
        return False
    if a == b:
        return True
    if {len(a), len(b)} == {15, 18} and a.isalnum() and b.isalnum():
        return a[:15] == b[:15]
    return False


# --- tokens ----------------------------------------------------------------------------------------


def _key() -> bytes:
    return derive_key(CONNECT_LINK)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _sig(random_part: str) -> str:
    return _b64(hmac.new(_key(), b"link|" + random_part.encode(), hashlib.sha256).digest()[:16])


def new_token() -> str:
    random_part = _b64(secrets.token_bytes(24))
    return f"{random_part}.{_sig(random_part)}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authentic(token: str) -> bool:
    """The token is one we signed (checked before any database read)."""
    if not token or len(token) > 100 or token.count(".") != 1:
        return False
    random_part, sig = token.split(".")
    return hmac.compare_digest(_sig(random_part), sig)


def oauth_state(link: VaultConnectLink) -> str:
    """The OAuth ``state`` for a link: names the link and is bound to its token (``<id>.<mac>``)."""
    mac = _b64(hmac.new(_key(), b"oauth|" + link.token_hash.encode(), hashlib.sha256).digest()[:24])
    return f"{link.id}.{mac}"


FORGED = (
    "This connect link is not valid: it may be incomplete (copy the whole link) or forged. "
    "Ask your CRM Bridge admin for a new connect link."
)


# --- links -----------------------------------------------------------------------------------------


def _identity(session: Session, app_user_id: int, crm_account_id: int) -> str | None:
    row = session.exec(select(AppUserCrmIdentity).where(
        AppUserCrmIdentity.app_user_id == app_user_id, AppUserCrmIdentity.crm_account_id == crm_account_id)).first()
    return row.crm_user_id if row else None


def create_connect_link(
    session: Session, *, principal: Principal, tenant_id: int, app_user_id: int, crm_account_id: int,
    ttl: timedelta = LINK_TTL, now: datetime | None = None,
) -> str:
    """Create a connect link for one app user and one CRM account; returns its URL (send it to the
    user; it is shown once and only its hash is kept).

    Raises:
        AccessDenied, NotFound, InvalidInput (account not in a per-user mode, user without a CRM user id).
    """
    require_tenant(principal, tenant_id)
    require_not_offboarded(session, tenant_id, "no new connect link can be made for it")
    now = service.resolve_now(now)
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidInput("A connect link lasts from 10 minutes to 7 days: pick a time in that range.")
    account = session.get(CrmAccount, crm_account_id)
    user = session.get(AppUser, app_user_id)
    if account is None or account.tenant_id != tenant_id:
        raise NotFound(f"CRM account {crm_account_id} is not an account of this tenant: pick one from the list.")
    if user is None or user.tenant_id != tenant_id:
        raise NotFound(f"App user {app_user_id} is not a user of this tenant: pick one from the list.")
    if account.credential_mode not in PER_USER_MODES:
        raise InvalidInput(
            f"{account.label} acts through an API user ({account.credential_mode}): connect links are only for "
            "accounts that use each user's own credentials."
        )
    if _identity(session, app_user_id, crm_account_id) is None:
        raise InvalidInput(
            f"{user.email} has no CRM user id in {account.label}: import or map the CRM users first, so the login "
            "can be checked against the right person."
        )
    token = new_token()
    link = VaultConnectLink(token_hash=token_hash(token), tenant_id=tenant_id, app_user_id=app_user_id,
                            crm_account_id=crm_account_id, created_by=principal.email[:254], created_at=now,
                            expires_at=now + ttl)
    session.add(link)
    session.flush()
    record_event(session, principal=principal, action="vault.link.create", tenant_id=tenant_id,
                 target=f"connect_link:{link.id}", at=now,
                 details={"app_user_id": app_user_id, "crm_account_id": crm_account_id,
                          "expires_at": link.expires_at})
    return get_settings().public(f"/connect/{token}")


@dataclass(frozen=True)
class LinkView:
    """What the link page shows. ``state``: "open", "used", "expired", "locked" or "offboarded"."""

    link_id: int
    state: str
    tenant_id: int
    tenant_name: str
    app_user_id: int
    user_email: str
    user_name: str
    crm_account_id: int
    account_label: str
    provider: str
    edition: str
    instance_url: str | None
    settings_json: str
    expected_crm_user_id: str
    created_at: datetime
    expires_at: datetime
    consumed_at: datetime | None
    policy: Policy
    held: service.CredentialInfo | None
    oauth: bool
    mode: str = "per_user_password"  # the account's credential mode: what the page asks for

    @property
    def is_open(self) -> bool:
        return self.state == "open"


def _load(session: Session, token: str, *, lock: bool = False) -> VaultConnectLink:
    """The link of an authentic token; ``lock`` holds its row until commit (PostgreSQL; SQLite's write
    transactions are serial already), so two submissions cannot both consume it."""
    if not authentic(token):
        log.warning("connect link refused: bad signature")
        raise LinkInvalid(FORGED)
    query = select(VaultConnectLink).where(VaultConnectLink.token_hash == token_hash(token))
    if lock and session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    link = session.exec(query).first()
    if link is None:  # signed by us but gone: its tenant was shredded
        log.warning("connect link refused: no such link")
        raise LinkInvalid(FORGED)
    return link


def _state(link: VaultConnectLink, now: datetime) -> str:
    if link.consumed_at is not None:
        return "used"
    if link.failed_attempts >= MAX_ATTEMPTS:
        return "locked"
    if now >= link.expires_at:
        return "expired"
    return "open"


def _reserve_attempt(session: Session, link_id: int, now: datetime) -> bool:
    """Count one attempt on an open link before the CRM sees it, in one conditional UPDATE (atomic on
    PostgreSQL and SQLite alike): of any number of concurrent submissions, at most ``MAX_ATTEMPTS``
    ever reach the CRM. False when the link is locked, used or expired meanwhile."""
    done = session.connection().execute(
        update(VaultConnectLink)
        .where(col(VaultConnectLink.id) == link_id, col(VaultConnectLink.failed_attempts) < MAX_ATTEMPTS,
               col(VaultConnectLink.consumed_at).is_(None), col(VaultConnectLink.expires_at) > now)
        .values(failed_attempts=col(VaultConnectLink.failed_attempts) + 1)
    )
    return getattr(done, "rowcount", 0) == 1


def _give_back_attempt(session: Session, link: VaultConnectLink) -> None:
    """A reserved attempt that succeeded is not a failure (atomic decrement, then the row reloaded)."""
    session.connection().execute(
        update(VaultConnectLink)
        .where(col(VaultConnectLink.id) == link.id, col(VaultConnectLink.failed_attempts) > 0)
        .values(failed_attempts=col(VaultConnectLink.failed_attempts) - 1)
    )
    session.refresh(link)


def _view(session: Session, link: VaultConnectLink, now: datetime) -> LinkView:
    tenant = session.get(Tenant, link.tenant_id)
    user = session.get(AppUser, link.app_user_id)
    account = session.get(CrmAccount, link.crm_account_id)
    if tenant is None or user is None or account is None:
        raise LinkInvalid(FORGED)
    held = next((c for c in service.list_credentials(session, principal=Principal.system("connect-link"),
                                                     tenant_id=link.tenant_id, now=now)
                 if c.ref is not None and c.app_user_id == link.app_user_id
                 and c.crm_account_id == link.crm_account_id and c.purpose == LOGIN_PURPOSE), None)
    assert link.id is not None
    state = OFFBOARDED_STATE if tenant.status == TenantStatus.offboarded.value else _state(link, now)
    return LinkView(
        link_id=link.id, state=state, tenant_id=link.tenant_id, tenant_name=tenant.name,
        app_user_id=link.app_user_id, user_email=user.email, user_name=user.name, crm_account_id=link.crm_account_id,
        account_label=account.label, provider=account.provider, edition=account.edition,
        instance_url=account.instance_url, settings_json=account.settings_json,
        expected_crm_user_id=_identity(session, link.app_user_id, link.crm_account_id) or "",
        created_at=link.created_at, expires_at=link.expires_at, consumed_at=link.consumed_at,
        policy=get_policy(session, link.tenant_id), held=held,
        # OAuth is offered where the provider supports it and the account is set up for it (it has an app).
        oauth=account.credential_mode == "per_user_oauth" and offers_oauth(account.provider),
        mode=account.credential_mode,
    )


def _audit(session: Session, link: VaultConnectLink, view_email: str, action: str, now: datetime,
           **details: Any) -> None:
    record_event(session, principal=view_email, action=action, tenant_id=link.tenant_id,
                 target=f"connect_link:{link.id}", at=now, via=VIA,
                 details={"app_user_id": link.app_user_id, "crm_account_id": link.crm_account_id, **details})


def open_link(session: Session, token: str, *, now: datetime | None = None, audit: bool = True) -> LinkView:
    """What a GET shows. Changes nothing but the audit log (every opening is recorded).

    Raises:
        LinkInvalid: forged or unknown token.
    """
    now = service.resolve_now(now)
    link = _load(session, token)
    view = _view(session, link, now)
    if audit:
        _audit(session, link, view.user_email, "vault.link.open", now, state=view.state)
    return view


def refuse(session: Session, token: str, *, reason: str, now: datetime | None = None) -> None:
    """Audit a refused request on an authentic link (bad CSRF token, SSO not passed)."""
    now = service.resolve_now(now)
    link = _load(session, token)
    user = session.get(AppUser, link.app_user_id)
    _audit(session, link, user.email if user else "anonymous", "vault.link.refused", now, reason=reason)


def closed_message(view: LinkView) -> str:
    """What to tell the user when a link can no longer be used to connect."""
    if view.state == OFFBOARDED_STATE:
        return offboarded_message(view.tenant_name, "its connect links no longer store credentials")
    if view.state == "used":
        when = f"{view.consumed_at:%Y-%m-%d %H:%M} UTC" if view.consumed_at else "earlier"
        return (f"This link was already used on {when}; a link works once. To connect again, ask your admin "
                "for a new connect link.")
    if view.state == "locked":
        return (f"This link was closed after {MAX_ATTEMPTS} failed attempts. Check your CRM username and password, "
                "then ask your admin for a new connect link.")
    return (f"This link expired on {view.expires_at:%Y-%m-%d %H:%M} UTC. Ask your admin for a new connect link "
            "(links last 24 hours).")


@dataclass(frozen=True)
class SubmitResult:
    ok: bool
    message: str
    ref: CredentialRef | None = None
    expires_at: datetime | None = None
    attempts_left: int | None = None


def submit_link(
    token: str, *, username: str, password: SecretStr | str, security_token: SecretStr | str = "",
    engine: Engine | None = None, now: datetime | None = None, tester: CredentialTester | None = None,
) -> SubmitResult:
    """Test the login against the CRM, check it is the link's user, store it and consume the link.

    ``tester`` logs in at the CRM; by default ``core.connections.testing.test_link_login`` (the account's
    provider class over the product's transport). Tests hand in their own.

    Runs its own transactions: the link is read, the CRM is called with no transaction open, then
    the credential is stored and the link consumed in one transaction (a concurrent second submission
    finds the link used). A failed test is recorded against the link and returned, not raised.

    Raises:
        LinkInvalid: forged, unknown, used, expired or locked link.
        InvalidInput: empty username or password.
    """
    now = service.resolve_now(now)
    pw = password.get_secret_value() if isinstance(password, SecretStr) else password
    tok = security_token.get_secret_value() if isinstance(security_token, SecretStr) else security_token
    username = (username or "").strip()
    if not username or not pw:
        raise InvalidInput("Enter both your CRM username and password.")
    if len(username) > 254 or len(pw) > 1024 or len(tok) > 256:
        raise InvalidInput("The username, password or security token is too long: check what you pasted.")
    with session_scope(engine) as s:
        link = _load(s, token)
        view = _view(s, link, now)
        if view.is_open and not _reserve_attempt(s, view.link_id, now):
            s.refresh(link)  # a concurrent submission locked or used it meanwhile
            view = _view(s, link, now)
        if not view.is_open:
            _audit(s, link, view.user_email, "vault.link.refused", now, reason=view.state)
            refused = LinkInvalid(closed_message(view))
        else:
            refused = None
    if refused is not None:
        raise refused
    if tester is None:
        from core.connections.testing import test_link_login

        tester = test_link_login
    login = LoginSecret(username, SecretStr(pw), SecretStr(tok))
    check = CredentialCheck(
        tenant_id=view.tenant_id, crm_account_id=view.crm_account_id, provider=view.provider, edition=view.edition,
        instance_url=view.instance_url, settings_json=view.settings_json, app_user_id=view.app_user_id,
        expected_crm_user_id=view.expected_crm_user_id, login=login,
    )
    failure: str | None = None
    code = ""
    try:
        logged_in_as = tester(check)
    except ProviderError as exc:
        failure, code = f"The CRM did not accept this login: {exc}", type(exc).__name__
    else:
        if not same_crm_user(view.expected_crm_user_id, logged_in_as):
            failure, code = (f"This login belongs to a different {view.account_label} user than {view.user_email}: "
                             "enter your own CRM login."), "identity_mismatch"
    with session_scope(engine) as s:
        link = _load(s, token, lock=True)
        if failure is not None:  # the attempt was counted before the CRM saw it
            _audit(s, link, view.user_email, "vault.link.test_failed", now, error=code,
                   attempts=link.failed_attempts)
            left = max(MAX_ATTEMPTS - link.failed_attempts, 0)
            return SubmitResult(False, failure, attempts_left=left)
        _give_back_attempt(s, link)
        return _consume(s, link, view, stored_form(login), kind=CredentialKind.password.value, now=now)


def _consume(session: Session, link: VaultConnectLink, view: LinkView, secret: SecretStr, *, kind: str,
             now: datetime) -> SubmitResult:
    if _state(link, now) != "open":  # consumed by a concurrent submission meanwhile
        raise LinkInvalid(closed_message(_view(session, link, now)))
    ref = service.store(session, actor=view.user_email, tenant_id=link.tenant_id, purpose=LOGIN_PURPOSE,
                        secret=secret, crm_account_id=link.crm_account_id, app_user_id=link.app_user_id, kind=kind,
                        via=VIA, now=now)
    link.consumed_at = now
    link.credential_id = ref.id
    session.add(link)
    _audit(session, link, view.user_email, "vault.link.consume", now, credential=str(ref))
    ttl = view.policy.default_ttl(kind)
    expires = now + ttl if ttl else None
    return SubmitResult(True, "Connected: CRM Bridge tested your login and stored it encrypted.", ref=ref,
                        expires_at=expires)


def revoke_via_link(session: Session, token: str, *, now: datetime | None = None) -> bool:
    """The user revokes the login we hold for this link's account. Works on any authentic link (open,
    used or expired): taking a credential away is always allowed. False when nothing was held."""
    now = service.resolve_now(now)
    link = _load(session, token)
    user = session.get(AppUser, link.app_user_id)
    email = user.email if user else "anonymous"
    ref = service.find_credential(session, tenant_id=link.tenant_id, crm_account_id=link.crm_account_id,
                                  app_user_id=link.app_user_id, purpose=LOGIN_PURPOSE)
    if ref is None:
        _audit(session, link, email, "vault.link.revoke", now, held=False)
        return False
    service.revoke(session, ref, principal=email, reason="by the user through their connect link", now=now, via=VIA)
    _audit(session, link, email, "vault.link.revoke", now, held=True, credential=str(ref))
    return True


def complete_oauth(
    session: Session, *, state: str, secret: SecretStr | str, crm_user_id: str,
    kind: str = CredentialKind.oauth_refresh.value, now: datetime | None = None,
) -> CredentialRef:
    """For a provider's OAuth callback: store the token obtained for the link ``state`` names.

    ``crm_user_id`` is the identity the token belongs to (from the token response or a whoami call);
    it must be the link's user. Consumes the link.

    Raises:
        LinkInvalid: unknown state, or the link is used, expired or locked; or the identity differs
            (the failed attempt is committed first).
    """
    now = service.resolve_now(now)
    link_id, _, _mac = (state or "").partition(".")
    pg = session.get_bind().dialect.name == "postgresql"
    link = (session.get(VaultConnectLink, int(link_id), with_for_update=pg)
            if link_id.isdigit() and len(state) <= 100 else None)
    if link is None or not hmac.compare_digest(oauth_state(link), state):
        raise LinkInvalid("This sign-in does not belong to a connect link (forged or from another server): "
                          "ask your admin for a new connect link.")
    view = _view(session, link, now)
    if not view.is_open:
        raise LinkInvalid(closed_message(view))
    if not same_crm_user(view.expected_crm_user_id, crm_user_id):
        _reserve_attempt(session, link.id, now)  # type: ignore[arg-type]  # counted atomically
        session.refresh(link)
        _audit(session, link, view.user_email, "vault.link.test_failed", now, error="identity_mismatch",
               attempts=link.failed_attempts)
        session.commit()  # the failed attempt counts even though we raise
        raise LinkInvalid(f"You signed in as a different {view.account_label} user than {view.user_email}: "
                          "sign in with your own CRM account.")
    result = _consume(session, link, view, SecretStr(secret) if isinstance(secret, str) else secret, kind=kind,
                      now=now)
    assert result.ref is not None
    return result.ref


def oauth_start_url(session: Session, token: str, *, now: datetime | None = None) -> str:
    """The CRM's authorization URL for an open link whose provider offers per-user OAuth; its ``state``
    is bound to the link (``core.connections.routes`` completes it through ``complete_oauth``)."""
    from core.connections.routes import begin_authorization

    now = service.resolve_now(now)
    link = _load(session, token)
    view = _view(session, link, now)
    if not view.is_open:
        raise LinkInvalid(closed_message(view))
    if not offers_oauth(view.provider):
        raise LinkInvalid(f"{view.account_label} offers no OAuth sign-in here: use the form on the link page.")
    account = session.get(CrmAccount, view.crm_account_id)
    if account is None:
        raise InvalidInput("This CRM account no longer exists: ask your admin for a new link.")
    url = begin_authorization(account=account, binding=f"link:{oauth_state(link)}")
    _audit(session, link, view.user_email, "vault.link.oauth_start", now)
    return url


@dataclass(frozen=True)
class ConnectTarget:
    app_user_id: int
    email: str
    name: str
    crm_account_id: int
    account_label: str


def connect_link_targets(session: Session, *, principal: Principal, tenant_id: int) -> list[ConnectTarget]:
    """(user, account) pairs a connect link can be made for: accounts in a per-user credential mode
    and users with a CRM user id there."""
    require_tenant(principal, tenant_id)
    rows = session.exec(
        select(AppUser, CrmAccount)
        .join(AppUserCrmIdentity, col(AppUserCrmIdentity.app_user_id) == col(AppUser.id))
        .join(CrmAccount, col(CrmAccount.id) == col(AppUserCrmIdentity.crm_account_id))
        .where(AppUser.tenant_id == tenant_id, CrmAccount.tenant_id == tenant_id,
               col(CrmAccount.credential_mode).in_(PER_USER_MODES))
        .order_by(col(AppUser.email), col(CrmAccount.label))
    ).all()
    return [ConnectTarget(u.id, u.email, u.name, a.id, a.label) for u, a in rows
            if u.id is not None and a.id is not None]
