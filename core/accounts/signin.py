"""What happens after a correct password (called by the /auth/login route in core.accounts.routes):

- an account with an active TOTP factor gets the second-factor step: a challenge token in an
  HttpOnly cookie scoped to /auth/mfa, and a redirect there;
- a staff account without one gets an enrolment-only session (it opens /auth/mfa/enrol and nothing
  else; the console refuses it and says where to go);
- anyone else gets a console session.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlmodel import Session
from starlette.responses import RedirectResponse, Response

from core.accounts import mfa
from core.errors import DeliveryFailed, SessionInvalid
from core.mail import SmtpConfig, send_email
from core.settings import get_settings
from core.tenants import auth
from core.tenants.models import ConsoleAccount
from core.web import set_session_cookie

log = logging.getLogger("crmbridge.accounts")

MFA_COOKIE = "crmbridge_mfa"
MFA_PATH = "/auth/mfa"


def _secure() -> bool:
    return get_settings().public_url.startswith("https://")


def set_mfa_cookie(response: Response, token: str) -> None:
    response.set_cookie(MFA_COOKIE, token, max_age=int(mfa.CHALLENGE_TTL.total_seconds()), httponly=True,
                        samesite="lax", secure=_secure(), path=MFA_PATH)


def clear_mfa_cookie(response: Response) -> None:
    response.delete_cookie(MFA_COOKIE, path=MFA_PATH, httponly=True, samesite="lax", secure=_secure())


def after_password(
    session: Session, *, account: ConsoleAccount, next_path: str, now: datetime | None = None,
) -> Response:
    assert account.id is not None
    if mfa.has_active_factor(session, account.id):
        token = mfa.start_challenge(session, account_id=account.id, next_path=next_path, now=now)
        resp: Response = RedirectResponse(MFA_PATH, status_code=303)
        set_mfa_cookie(resp, token)
        return resp
    if mfa.mfa_required(account):
        session_token = auth.start_session(session, account_id=account.id, method=auth.ENROL_ONLY_METHOD,
                                           lifetime=auth.ENROL_ONLY_LIFETIME, now=now)
    else:
        session_token = auth.start_session(session, account_id=account.id, method="password", now=now)
    resp = RedirectResponse(next_path, status_code=303)
    set_session_cookie(resp, session_token)
    return resp


def enrolment_pending(session: Session, token: str | None) -> bool:
    """True when ``token`` is a live enrolment-only session (the sign-in page sends it to enrolment)."""
    if not token:
        return False
    try:
        row, _ = auth.session_from_token(session, token)
    except SessionInvalid:
        return False
    return row.method == auth.ENROL_ONLY_METHOD


def lock_notice_text(address: str, until: datetime) -> str:
    return ("Someone entered a wrong password for your CRM Bridge console account 5 times from the network "
            f"address {address}. Sign-in to your account from that address is paused until {until:%Y-%m-%d %H:%M} "
            "UTC; sign-in from anywhere else works as usual.\n\n"
            "If this was you, wait and try again (or reset your password at /auth/reset). If it was not, your "
            "password held, but consider changing it; the event is in the audit log as account.locked.\n")


def lock_notifier(smtp: SmtpConfig | None = None) -> auth.LockNotice:
    """What /auth/login passes to ``auth.authenticate(on_lock=...)``: email the account holder when
    wrong passwords from one address pause sign-in to their account (a failed email is logged, never
    raised: the lock and its audit event stand)."""
    def notify(account: ConsoleAccount, address: str, until: datetime) -> None:
        try:
            send_email(smtp or SmtpConfig.from_settings(), to=[account.email],
                       subject="CRM Bridge: sign-in to your account was paused", body=lock_notice_text(address, until))
        except DeliveryFailed as exc:
            log.warning("lock notice for console account %s not sent: %s", account.id, exc.message)
    return notify
