"""Invitations instead of shared passwords: single-use links that expire (3 days by default).

Staff invite any role; a tenant admin invites tenant admins of their own tenant only. The account is
created when the invitee opens the link and chooses a password (plain HTML form at
/auth/invite/{token}); only the SHA-256 of the link's token is stored.

Invitations are scoped to who issued them: staff may replace or revoke any invitation; a tenant admin
only those their own tenant's admins issued. Inviting the same address again from the same scope
revokes the earlier link; an address that has an account or a pending invitation outside the
tenant admin's scope (another tenant's, staff's) is refused with one generic wording, whatever the
reason, and nothing is changed.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from core.accounts.models import ConsoleInvitation
from core.clock import utcnow
from core.errors import AccessDenied, Conflict, InvalidInput, LinkInvalid, NotFound
from core.settings import get_settings
from core.tenants import auth
from core.tenants.access import Principal, require_not_offboarded
from core.tenants.audit import record_event
from core.tenants.models import ConsoleAccount, Role, Tenant

INVITE_TTL = timedelta(days=3)
def not_available(email: str) -> str:
    """The one refusal a tenant admin gets for an address outside their scope (an account or an
    invitation of another tenant, or of staff): it never says which, or where."""
    return f"{email} cannot be invited to your tenant: ask CRM Bridge staff to look into it."


INVALID = ("This invitation link was already used, revoked or has expired: ask whoever invited you to send a "
           "new one (the Console accounts page).")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invite_url(token: str) -> str:
    return get_settings().public(f"/auth/invite/{token}")


def _check_may_invite(session: Session, principal: Principal, role: str, tenant_id: int | None) -> None:
    try:
        role_v = Role(role).value
    except ValueError:
        raise InvalidInput(f"Unknown role {role!r}: use one of {', '.join(r.value for r in Role)}.") from None
    if role_v == Role.tenant_admin.value:
        if tenant_id is None or session.get(Tenant, tenant_id) is None:
            raise InvalidInput("A tenant admin belongs to one tenant: choose an existing tenant.")
    elif tenant_id is not None:
        raise InvalidInput(f"A {role_v} account is not tied to a tenant: leave the tenant empty.")
    require_not_offboarded(session, tenant_id, "nobody can be invited to it")
    if principal.is_staff:
        return
    if principal.is_tenant_admin and role_v == Role.tenant_admin.value and tenant_id == principal.tenant_id:
        return
    raise AccessDenied("Tenant admins can invite admins of their own tenant only: ask CRM Bridge staff for others.")


def _issued_in_scope(session: Session, inv: ConsoleInvitation, principal: Principal) -> bool:
    """May ``principal`` replace or revoke ``inv``? Staff: any. A tenant admin: one of their own tenant
    that an admin of that tenant issued (never one staff issued, never another tenant's)."""
    if principal.is_staff:
        return True
    if not principal.is_tenant_admin or inv.tenant_id is None or inv.tenant_id != principal.tenant_id:
        return False
    issuer = session.exec(select(ConsoleAccount).where(ConsoleAccount.email == inv.invited_by)).first()
    return (issuer is not None and issuer.role == Role.tenant_admin.value
            and issuer.tenant_id == principal.tenant_id)


def create_invitation(
    *,
    session: Session,
    principal: Principal,
    email: str,
    role: str,
    tenant_id: int | None = None,
    name: str = "",
    now: datetime | None = None,
    ttl: timedelta = INVITE_TTL,
) -> tuple[ConsoleInvitation, str]:
    """Create an invitation and return it with its link (the only time the link exists in clear).

    Raises:
        AccessDenied, InvalidInput, Conflict (an account with that email exists, or, for a tenant admin,
        the address is taken outside their scope: one generic message).
    """
    now = now or utcnow()
    email_n = auth.normalize_email(email)
    _check_may_invite(session, principal, role, tenant_id)
    if len(name) > 200:
        raise InvalidInput("The name is too long: use at most 200 characters.")
    existing = session.exec(select(ConsoleAccount).where(ConsoleAccount.email == email_n)).first()
    if existing is not None:
        if principal.is_staff or (existing.tenant_id is not None and existing.tenant_id == principal.tenant_id):
            raise Conflict(f"A console account for {email_n} already exists: send a password reset instead.")
        raise Conflict(not_available(email_n))
    pending = [inv for inv in session.exec(select(ConsoleInvitation).where(
        ConsoleInvitation.email == email_n, col(ConsoleInvitation.accepted_at).is_(None),
        col(ConsoleInvitation.revoked_at).is_(None))) if inv.expires_at > now]
    for old in pending:
        if _issued_in_scope(session, old, principal):
            continue
        if old.tenant_id is not None and old.tenant_id == principal.tenant_id:  # staff invited them here
            raise Conflict(f"CRM Bridge staff already invited {email_n} to your tenant; that invitation stays as "
                           "it is: ask them to send it again if it was lost.")
        raise Conflict(not_available(email_n))
    for old in pending:
        old.revoked_at = now
        session.add(old)
    token = secrets.token_urlsafe(32)
    inv = ConsoleInvitation(token_hash=_hash(token), email=email_n, name=name.strip(), role=Role(role).value,
                            tenant_id=tenant_id, invited_by=principal.email[:254], created_at=now,
                            expires_at=now + ttl)
    session.add(inv)
    session.flush()
    record_event(session, principal=principal, action="console_account.invite", tenant_id=tenant_id,
                 target=f"console_invitation:{inv.id}",
                 details={"email": email_n, "role": inv.role, "expires_at": inv.expires_at}, at=now)
    return inv, invite_url(token)


def invitation_for_token(session: Session, token: str, *, now: datetime | None = None) -> ConsoleInvitation:
    """The live invitation behind a link (opening it changes nothing). Raises LinkInvalid."""
    now = now or utcnow()
    if not token or len(token) > 200:
        raise LinkInvalid(INVALID)
    inv = session.exec(select(ConsoleInvitation).where(ConsoleInvitation.token_hash == _hash(token))).first()
    if inv is None or inv.accepted_at is not None or inv.revoked_at is not None or now >= inv.expires_at:
        raise LinkInvalid(INVALID)
    return inv


def accept_invitation(
    session: Session, *, token: str, password: str, name: str = "", now: datetime | None = None,
) -> ConsoleAccount:
    """Create the invited account with the chosen password and consume the link (once only).

    Raises:
        LinkInvalid: used, revoked, expired or unknown link. InvalidInput: password rules.
    """
    now = now or utcnow()
    inv = invitation_for_token(session, token, now=now)
    auth.hash_password(password)  # the password rules, before anything is written
    claimed = session.execute(
        update(ConsoleInvitation)
        .where(col(ConsoleInvitation.id) == inv.id, col(ConsoleInvitation.accepted_at).is_(None),
               col(ConsoleInvitation.revoked_at).is_(None))
        .values(accepted_at=now)
    )
    if getattr(claimed, "rowcount", 0) != 1:
        raise LinkInvalid(INVALID)
    if session.exec(select(ConsoleAccount).where(ConsoleAccount.email == inv.email)).first():
        raise LinkInvalid(f"A console account for {inv.email} already exists: sign in, or reset the password.")
    account = auth.create_console_account(
        session, principal=Principal.system("invitation"), email=inv.email, role=inv.role,
        tenant_id=inv.tenant_id, password=password, name=(name or inv.name).strip()[:200],
    )
    session.refresh(inv)
    inv.account_id = account.id
    session.add(inv)
    record_event(session, principal=auth.principal_for(account), action="console_account.invitation.accept",
                 tenant_id=account.tenant_id, target=f"console_account:{account.id}",
                 details={"invitation": inv.id, "invited_by": inv.invited_by}, at=now)
    session.flush()
    return account


def revoke_invitation(
    *, session: Session, principal: Principal, invitation_id: int, now: datetime | None = None,
) -> ConsoleInvitation:
    now = now or utcnow()
    inv = session.get(ConsoleInvitation, invitation_id)
    if inv is None or not (principal.is_staff or (principal.is_tenant_admin and inv.tenant_id == principal.tenant_id
                                                  and inv.tenant_id is not None)):
        raise NotFound("No such invitation in your scope.")
    if not _issued_in_scope(session, inv, principal):
        raise AccessDenied(f"CRM Bridge staff sent the invitation for {inv.email}: ask them to revoke it.")
    if inv.accepted_at is not None:
        raise InvalidInput(f"The invitation for {inv.email} was already accepted: disable the account instead.")
    if inv.revoked_at is None:
        inv.revoked_at = now
        session.add(inv)
        record_event(session, principal=principal, action="console_account.invitation.revoke",
                     tenant_id=inv.tenant_id, target=f"console_invitation:{inv.id}", details={"email": inv.email},
                     at=now)
    return inv


def list_invitations(
    *, session: Session, principal: Principal, tenant_id: int | None = None, now: datetime | None = None,
) -> list[ConsoleInvitation]:
    """Invitations not yet accepted, revoked or expired, in the principal's scope."""
    now = now or utcnow()
    if principal.is_tenant_admin:
        tenant_id = principal.tenant_id
    elif not principal.is_staff:
        raise AccessDenied("Console accounts are managed by CRM Bridge staff and tenant admins.")
    q = select(ConsoleInvitation).where(col(ConsoleInvitation.accepted_at).is_(None),
                                        col(ConsoleInvitation.revoked_at).is_(None))
    if tenant_id is not None:
        q = q.where(ConsoleInvitation.tenant_id == tenant_id)
    rows = session.exec(q.order_by(col(ConsoleInvitation.created_at).desc())).all()
    return [r for r in rows if r.expires_at > now]
