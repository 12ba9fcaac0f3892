"""Demo mode: staff must sign in with a second factor, so the demo staff accounts are enrolled with a
known TOTP secret that the sign-in page shows (with the current code) in demo mode only — demo mode
serves loopback only, and the demo passwords are on that page already.

``load_demo`` has the signature core.demo calls for package demos; it is idempotent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from core.accounts import mfa
from core.clock import utcnow
from core.settings import get_settings
from core.tenants.access import Principal
from core.tenants.models import ConsoleAccount, Role
from core.web import esc

DEMO_TOTP_SECRET = "CRMBRIDGEDEMOSTAFFTOTPKEYABCDEFG"


def enrol_demo_staff(session: Session, *, now: datetime | None = None) -> list[str]:
    """Give every staff account without a second factor the demo TOTP secret. Returns their emails."""
    now = now or utcnow()
    done = []
    for account in session.exec(select(ConsoleAccount).where(ConsoleAccount.role == Role.staff.value)):
        assert account.id is not None
        if mfa.has_active_factor(session, account.id):
            continue
        mfa.begin_enrolment(session, account=account, now=now, secret=DEMO_TOTP_SECRET)
        mfa.confirm_enrolment(session, account=account, code=mfa.code_at(DEMO_TOTP_SECRET, now), now=now)
        factor = mfa.get_factor(session, account.id)
        assert factor is not None
        factor.last_step = None  # the code shown on the sign-in page right now must still work
        session.add(factor)
        done.append(account.email)
    session.flush()
    return done


def load_demo(session: Session, *, scenario: dict[str, Any], principal: Principal, now: datetime,
              tenants: dict[str, int]) -> None:
    enrol_demo_staff(session, now=now)


def demo_mfa_note(now: datetime | None = None) -> str:
    """The sign-in page's demo note about the staff second factor (empty outside demo mode)."""
    if not get_settings().demo:
        return ""
    code = mfa.code_at(DEMO_TOTP_SECRET, now or utcnow())
    grouped = " ".join(DEMO_TOTP_SECRET[i:i + 4] for i in range(0, len(DEMO_TOTP_SECRET), 4))
    return (f"<p class=note>Staff sign in with a second factor. The demo staff account uses the TOTP secret "
            f"<code>{esc(grouped)}</code> (add it to any authenticator app); the code right now is "
            f"<code>{esc(code)}</code> — reload this page for a fresh one.</p>")
