"""Console account management for pages and the CLI: the account list (a tenant admin's own tenant,
every tenant for staff), invitations, password resets, disabling and two-factor resets. Each
function checks the principal's scope first; every change writes an audit event in the caller's
transaction (the underlying functions in core.accounts and core.tenants.auth do)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from core.accounts import invitations, mfa, reset
from core.accounts.models import ConsoleInvitation
from core.clock import utcnow
from core.errors import AccessDenied, DeliveryFailed, NotFound
from core.mail import SmtpConfig, send_email
from core.tenants import auth
from core.tenants.access import NOT_IN_SCOPE, Principal
from core.tenants.audit import record_event
from core.tenants.models import ConsoleAccount
from core.tenants.service import tenant_names

log = logging.getLogger("crmbridge.accounts")


@dataclass(frozen=True)
class AccountRow:
    id: int
    email: str
    name: str
    role: str
    tenant_id: int | None
    tenant: str
    disabled: bool
    locked: bool
    mfa: str  # "on", "required — not set up", "off"
    recovery_codes_left: int
    last_sign_in_at: datetime | None
    created_at: datetime


def _scope(principal: Principal, tenant_id: int | None) -> int | None:
    if principal.is_staff:
        return tenant_id
    if principal.is_tenant_admin and principal.tenant_id is not None:
        return principal.tenant_id
    raise AccessDenied("Console accounts are managed by CRM Bridge staff and tenant admins.")


def list_accounts(
    *, session: Session, principal: Principal, tenant_id: int | None = None, now: datetime | None = None,
) -> list[AccountRow]:
    """Accounts in scope: a tenant admin sees their own tenant's; staff see every account (or one
    tenant's with ``tenant_id``)."""
    now = now or utcnow()
    scope = _scope(principal, tenant_id)
    q = select(ConsoleAccount)
    if scope is not None:
        q = q.where(ConsoleAccount.tenant_id == scope)
    accounts = session.exec(q.order_by(col(ConsoleAccount.email))).all()
    names = tenant_names(session=session, principal=principal, ids={a.tenant_id for a in accounts if a.tenant_id})
    rows = []
    for a in accounts:
        assert a.id is not None
        st = mfa.mfa_status(session, a)
        label = "on" if st.enrolled else ("required — not set up" if st.required else "off")
        rows.append(AccountRow(
            id=a.id, email=a.email, name=a.name, role=a.role, tenant_id=a.tenant_id,
            tenant=names.get(a.tenant_id, "") if a.tenant_id else "CRM Bridge", disabled=a.disabled,
            locked=bool(a.locked_until and a.locked_until > now) or bool(auth.active_source_locks(session, a.id, now)),
            mfa=label,
            recovery_codes_left=st.recovery_codes_left, last_sign_in_at=a.last_sign_in_at, created_at=a.created_at,
        ))
    return rows


def list_pending_invitations(
    *, session: Session, principal: Principal, tenant_id: int | None = None, now: datetime | None = None,
) -> list[ConsoleInvitation]:
    return invitations.list_invitations(session=session, principal=principal,
                                        tenant_id=_scope(principal, tenant_id), now=now)


@dataclass(frozen=True)
class InviteResult:
    invitation_id: int
    email: str
    emailed: bool
    error: str | None
    # The link, only when the email could not be sent, so the inviter can pass it on another way.
    # The page shows it once and keeps it nowhere.
    link_for_manual_delivery: str | None


def _invite_text(url: str, inviter: str, role: str, expires: datetime) -> str:
    return (f"{inviter} invited you to the CRM Bridge console ({role.replace('_', ' ')}).\n\n"
            f"Open this link to choose your password and sign in:\n{url}\n\n"
            f"The link works once and expires on {expires:%Y-%m-%d %H:%M} UTC. If you did not expect it, "
            "ignore this message.\n")


def invite_account(
    *,
    session: Session,
    principal: Principal,
    email: str,
    role: str,
    tenant_id: int | None = None,
    name: str = "",
    now: datetime | None = None,
    smtp: SmtpConfig | None = None,
) -> InviteResult:
    """Invite someone and email them the link. When the email fails the invitation stays valid and the
    link is returned once for manual delivery."""
    now = now or utcnow()
    inv, url = invitations.create_invitation(session=session, principal=principal, email=email, role=role,
                                             tenant_id=tenant_id, name=name, now=now)
    assert inv.id is not None
    try:
        send_email(smtp or SmtpConfig.from_settings(), to=[inv.email], subject="Your invitation to CRM Bridge",
                   body=_invite_text(url, principal.email, inv.role, inv.expires_at), now=now)
    except DeliveryFailed as exc:
        log.warning("invitation %s: email not sent (%s)", inv.id, exc.message)
        return InviteResult(inv.id, inv.email, False, str(exc), url)
    return InviteResult(inv.id, inv.email, True, None, None)


def revoke_invitation(*, session: Session, principal: Principal, invitation_id: int,
                      now: datetime | None = None) -> None:
    invitations.revoke_invitation(session=session, principal=principal, invitation_id=invitation_id, now=now)


def reset_email_text(url: str) -> str:
    return ("Someone asked to reset the password of your CRM Bridge console account.\n\n"
            f"Open this link to choose a new password (it works once, within 1 hour):\n{url}\n\n"
            "Every session of the account ends when the password changes. If you did not ask for this, "
            "ignore this message: your password stays as it is.\n")


def send_password_reset(
    *, session: Session, principal: Principal, account_id: int, now: datetime | None = None,
    smtp: SmtpConfig | None = None,
) -> str:
    """Email a reset link to the account's own address (the admin never sees the link). Returns the
    address. Raises DeliveryFailed (nothing is kept: the caller's transaction rolls back)."""
    address, url = reset.admin_reset_link(session=session, principal=principal, account_id=account_id, now=now)
    email_reset_link(address, url, smtp=smtp, now=now)
    return address


def email_reset_link(address: str, url: str, *, smtp: SmtpConfig | None = None, now: datetime | None = None) -> None:
    """The password-reset email (asked for by the account holder on /auth/reset, or sent by an admin).

    Raises:
        DeliveryFailed: the mail server could not be reached or refused it.
    """
    send_email(smtp or SmtpConfig.from_settings(), to=[address], subject="Reset your CRM Bridge password",
               body=reset_email_text(url), now=now)


def _get_in_scope(session: Session, principal: Principal, account_id: int) -> ConsoleAccount:
    account = session.get(ConsoleAccount, account_id)
    if account is None or not (principal.is_staff or (principal.is_tenant_admin and account.tenant_id is not None
                                                      and account.tenant_id == principal.tenant_id)):
        raise NotFound(NOT_IN_SCOPE)
    return account


def set_disabled(
    *, session: Session, principal: Principal, account_id: int, disabled: bool,
) -> ConsoleAccount:
    """Disable (every session ends at once; pending sign-in steps and reset links stop working) or
    re-enable an account."""
    _get_in_scope(session, principal, account_id)
    return auth.set_account_disabled(session, principal=principal, account_id=account_id, disabled=disabled)


def reset_account_mfa(*, session: Session, principal: Principal, account_id: int,
                      now: datetime | None = None) -> None:
    _get_in_scope(session, principal, account_id)
    mfa.reset_mfa(session, principal=principal, account_id=account_id, now=now)


def unlock_account(*, session: Session, principal: Principal, account_id: int,
                   now: datetime | None = None) -> None:
    """Lift a lockout (after 5 wrong passwords from an address, or 5 wrong codes) before it ends."""
    account = _get_in_scope(session, principal, account_id)
    account.locked_until = None
    account.failed_attempts = 0
    session.add(account)
    auth.clear_source_locks(session, account_id)
    record_event(session, principal=principal, action="console_account.unlock", tenant_id=account.tenant_id,
                 target=f"console_account:{account.id}", at=now or utcnow())


def my_mfa_status(*, session: Session, principal: Principal) -> mfa.MfaStatus:
    """The signed-in person's own two-factor status."""
    if principal.account_id is None:
        raise NotFound("This principal has no console account.")
    account = session.get(ConsoleAccount, principal.account_id)
    if account is None:
        raise NotFound("Your console account no longer exists: sign in again.")
    return mfa.mfa_status(session, account)
