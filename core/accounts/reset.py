"""Password reset by an expiring (1 hour), single-use link sent to the account's own address.

Self-service (/auth/reset) answers the same whether or not the address has an account. An admin can
send the link too, but never sees it: whoever holds the link controls the account. Completing a
reset ends every session of the account, clears a lockout, and keeps the second factor (a reset
never bypasses MFA). Only the SHA-256 of the token is stored; a newer link revokes older ones.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from core.accounts.models import PasswordResetLink
from core.clock import utcnow
from core.errors import InvalidInput, LinkInvalid, NotFound
from core.settings import get_settings
from core.tenants import auth
from core.tenants.access import NOT_IN_SCOPE, Principal
from core.tenants.audit import record_event
from core.tenants.models import ConsoleAccount

RESET_TTL = timedelta(hours=1)
SELF_SERVICE_COOLDOWN = timedelta(minutes=1)
INVALID = "This reset link was already used, replaced by a newer one, or has expired: request a new one at /auth/reset."


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def reset_url(token: str) -> str:
    return get_settings().public(f"/auth/reset/{token}")


def _new_link(session: Session, account: ConsoleAccount, *, requested_by: str, now: datetime) -> str:
    for old in session.exec(select(PasswordResetLink).where(
            PasswordResetLink.account_id == account.id, col(PasswordResetLink.used_at).is_(None),
            col(PasswordResetLink.revoked_at).is_(None))):
        old.revoked_at = now
        session.add(old)
    token = secrets.token_urlsafe(32)
    session.add(PasswordResetLink(token_hash=_hash(token), account_id=account.id,  # type: ignore[arg-type]
                                  requested_by=requested_by[:254], created_at=now, expires_at=now + RESET_TTL))
    session.flush()
    return reset_url(token)


def request_reset(session: Session, *, email: str, now: datetime | None = None) -> tuple[str, str] | None:
    """Self-service: (address, link) to email when the address has an enabled account and no link was
    made in the last minute, else None. The caller answers the same either way."""
    now = now or utcnow()
    try:
        email_n = auth.normalize_email(email)
    except InvalidInput:  # a bad address gets the same answer as an unknown one
        return None
    account = session.exec(select(ConsoleAccount).where(ConsoleAccount.email == email_n)).first()
    if account is None or account.disabled:
        return None
    recent = session.exec(select(PasswordResetLink).where(
        PasswordResetLink.account_id == account.id, PasswordResetLink.created_at > now - SELF_SERVICE_COOLDOWN)).first()
    if recent is not None:
        return None
    url = _new_link(session, account, requested_by="self", now=now)
    record_event(session, principal=account.email, action="console_account.password_reset.request",
                 tenant_id=account.tenant_id, target=f"console_account:{account.id}",
                 details={"requested_by": "self"}, at=now)
    return account.email, url


def admin_reset_link(
    *, session: Session, principal: Principal, account_id: int, now: datetime | None = None,
) -> tuple[str, str]:
    """An admin asks for a reset: (address, link) for the caller to email — never to show."""
    now = now or utcnow()
    account = session.get(ConsoleAccount, account_id)
    if account is None:
        raise NotFound(NOT_IN_SCOPE)
    if not principal.is_staff and not (principal.is_tenant_admin and account.tenant_id == principal.tenant_id):
        raise NotFound(NOT_IN_SCOPE)  # the same words as for no account: ids of other tenants stay unknown
    if account.disabled:
        raise LinkInvalid(f"{account.email} is disabled: enable the account before sending a reset link.")
    url = _new_link(session, account, requested_by=principal.email, now=now)
    record_event(session, principal=principal, action="console_account.password_reset.request",
                 tenant_id=account.tenant_id, target=f"console_account:{account.id}",
                 details={"requested_by": principal.email}, at=now)
    return account.email, url


def link_for_token(session: Session, token: str, *, now: datetime | None = None) -> PasswordResetLink:
    """The live reset link (opening it changes nothing). Raises LinkInvalid."""
    now = now or utcnow()
    if not token or len(token) > 200:
        raise LinkInvalid(INVALID)
    link = session.exec(select(PasswordResetLink).where(PasswordResetLink.token_hash == _hash(token))).first()
    if link is None or link.used_at is not None or link.revoked_at is not None or now >= link.expires_at:
        raise LinkInvalid(INVALID)
    account = session.get(ConsoleAccount, link.account_id)
    if account is None or account.disabled:
        raise LinkInvalid(INVALID)
    return link


def complete_reset(session: Session, *, token: str, password: str, now: datetime | None = None) -> ConsoleAccount:
    """Set the new password, consume the link, end every session. Raises LinkInvalid, InvalidInput."""
    now = now or utcnow()
    link = link_for_token(session, token, now=now)
    new_hash = auth.hash_password(password)
    claimed = session.execute(
        update(PasswordResetLink)
        .where(col(PasswordResetLink.id) == link.id, col(PasswordResetLink.used_at).is_(None),
               col(PasswordResetLink.revoked_at).is_(None))
        .values(used_at=now)
    )
    if getattr(claimed, "rowcount", 0) != 1:
        raise LinkInvalid(INVALID)
    account = session.get(ConsoleAccount, link.account_id)
    assert account is not None
    account.password_hash = new_hash
    account.failed_attempts = 0
    account.locked_until = None
    session.add(account)
    auth.clear_source_locks(session, account.id)  # type: ignore[arg-type]
    ended = auth.revoke_sessions(session, account_id=account.id, now=now)  # type: ignore[arg-type]
    record_event(session, principal=account.email, action="console_account.password_reset",
                 tenant_id=account.tenant_id, target=f"console_account:{account.id}",
                 details={"sessions_ended": ended, "requested_by": link.requested_by}, at=now)
    session.flush()
    return account
