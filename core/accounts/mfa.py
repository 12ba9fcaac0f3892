"""TOTP multi-factor authentication (RFC 6238 through pyotp): required for staff, optional for others.

- Enrolment: a new secret is generated and shown once (QR code and text, on the plain HTML route);
  it is stored through core.accounts.secrets (the vault for tenant accounts) as a *pending* factor,
  and becomes active only when the first code from the app is confirmed. Ten single-use recovery
  codes are shown once at that point; only their SHA-256 is stored.
- Sign-in: after a correct password, an account with an active factor gets a challenge — server-side,
  5 minutes, single-use, not a session — and enters a code (or a recovery code) at /auth/mfa.
- A code is accepted within one 30-second step either side of now, and only once per step: the last
  accepted step is stored and updated with a conditional UPDATE, so a replayed code is refused even
  by two requests racing each other.
- 5 wrong codes in a row (across challenges) lock the account for the password lockout time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyotp
from sqlalchemy import update
from sqlmodel import Session, col, select

from core.accounts.models import FactorState, MfaChallenge, MfaFactor, MfaRecoveryCode
from core.accounts.secrets import forget_secret, read_secret, store_secret
from core.clock import utcnow
from core.errors import Conflict, InvalidInput, NotFound, SessionInvalid, SignInFailed
from core.tenants import auth
from core.tenants.access import NOT_IN_SCOPE, Principal
from core.tenants.audit import record_event
from core.tenants.models import ConsoleAccount, Role

ISSUER = "CRM Bridge"
STEP_SECONDS = 30
DIGITS = 6
CHALLENGE_TTL = timedelta(minutes=5)
CHALLENGE_MAX_FAILURES = 5
FACTOR_MAX_FAILURES = 5
RECOVERY_CODE_COUNT = 10
TOTP_METHOD = "password+totp"
RECOVERY_METHOD = "password+recovery"


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def purpose_for(account_id: int) -> str:
    return f"console-mfa-{account_id}"


def _owner(account_id: int) -> str:
    return f"console_account:{account_id}"


def mfa_required(account: ConsoleAccount) -> bool:
    """Staff must use a second factor; for other roles it is optional."""
    return account.role == Role.staff.value


def get_factor(session: Session, account_id: int) -> MfaFactor | None:
    return session.exec(select(MfaFactor).where(MfaFactor.account_id == account_id)).first()


def has_active_factor(session: Session, account_id: int) -> bool:
    f = get_factor(session, account_id)
    return f is not None and f.state == FactorState.active.value


def current_step(now: datetime) -> int:
    return int(now.timestamp()) // STEP_SECONDS


def code_at(secret: str, now: datetime) -> str:
    """The code an authenticator app shows at ``now`` (tests and the demo sign-in page use it)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).generate_otp(current_step(now))


def _matching_step(secret: str, code: str, now: datetime) -> int | None:
    code = "".join(code.split())
    if len(code) != DIGITS or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    t = current_step(now)
    found = None
    for step in (t - 1, t, t + 1):  # compare all three: no early exit
        if hmac.compare_digest(totp.generate_otp(step), code):
            found = step
    return found


def _principal(account: ConsoleAccount) -> Principal:
    return auth.principal_for(account)


def _read_factor_secret(session: Session, account: ConsoleAccount, factor: MfaFactor, *, reason: str,
                        now: datetime) -> str:
    assert account.id is not None
    return read_secret(session, factor.secret_ref, principal=_principal(account), owner=_owner(account.id),
                       purpose=purpose_for(account.id), reason=reason, now=now)


# --- enrolment -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrolment:
    """What the enrolment page shows once. Never stored, logged or passed to Streamlit."""

    secret: str
    uri: str

    @property
    def grouped(self) -> str:
        return " ".join(self.secret[i:i + 4] for i in range(0, len(self.secret), 4))

    def qr_svg(self) -> str | None:
        """An inline SVG QR code of the otpauth URI, or None when segno is not installed."""
        try:
            import segno
        except ModuleNotFoundError:
            return None
        return str(segno.make(self.uri, error="m").svg_inline(scale=5, border=2))


def begin_enrolment(
    session: Session, *, account: ConsoleAccount, now: datetime | None = None, secret: str | None = None,
) -> Enrolment:
    """Generate a new secret for ``account`` and keep it as a pending factor (replacing an unconfirmed
    one). ``secret`` is for the demo loader only.

    Raises:
        Conflict: the account already has an active factor.
    """
    now = now or utcnow()
    assert account.id is not None
    factor = get_factor(session, account.id)
    if factor is not None and factor.state == FactorState.active.value:
        raise Conflict(
            "Two-factor authentication is already set up for this account: to move it to a new device, "
            "ask an admin to reset it on the Console accounts page, then sign in again."
        )
    secret = secret or pyotp.random_base32(32)  # 160 bits, as RFC 4226 recommends
    ref = store_secret(session, principal=_principal(account), tenant_id=account.tenant_id,
                       owner=_owner(account.id), purpose=purpose_for(account.id), secret=secret, now=now)
    if factor is None:
        factor = MfaFactor(account_id=account.id, secret_ref=ref, created_at=now)
    factor.state = FactorState.pending.value
    factor.secret_ref = ref
    factor.last_step = None
    factor.failures = 0
    factor.created_at = now
    session.add(factor)
    session.flush()
    uri = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=account.email, issuer_name=ISSUER)
    return Enrolment(secret=secret, uri=uri)


def _new_recovery_codes(session: Session, account_id: int, now: datetime) -> list[str]:
    for old in session.exec(select(MfaRecoveryCode).where(MfaRecoveryCode.account_id == account_id)):
        session.delete(old)
    codes = []
    for _ in range(RECOVERY_CODE_COUNT):
        raw = base64.b32encode(secrets.token_bytes(10)).decode().lower()  # 80 bits, 16 characters
        codes.append("-".join(raw[i:i + 4] for i in range(0, 16, 4)))
        session.add(MfaRecoveryCode(account_id=account_id, code_hash=_hash(raw), created_at=now))
    return codes


def confirm_enrolment(
    session: Session, *, account: ConsoleAccount, code: str, now: datetime | None = None,
) -> list[str]:
    """Activate the pending factor when ``code`` matches; returns the recovery codes (shown once).

    Raises:
        InvalidInput: no pending enrolment, or the code does not match (nothing is activated).
    """
    now = now or utcnow()
    assert account.id is not None
    factor = get_factor(session, account.id)
    if factor is None or factor.state != FactorState.pending.value:
        raise InvalidInput("There is no enrolment waiting for a code: reload /auth/mfa/enrol to start again.")
    secret = _read_factor_secret(session, account, factor, reason="console sign-in: confirm enrolment", now=now)
    step = _matching_step(secret, code, now)
    if step is None:
        raise InvalidInput(
            "That code does not match: check the device's clock and enter the 6-digit code your app shows now."
        )
    factor.state = FactorState.active.value
    factor.confirmed_at = now
    factor.last_step = step
    factor.last_used_at = now
    factor.failures = 0
    session.add(factor)
    codes = _new_recovery_codes(session, account.id, now)
    record_event(session, principal=_principal(account), action="console_account.mfa.enrol",
                 tenant_id=account.tenant_id, target=_owner(account.id),
                 details={"factor": "totp", "recovery_codes": len(codes)}, at=now)
    session.flush()
    return codes


def regenerate_recovery_codes(
    session: Session, *, account: ConsoleAccount, code: str, now: datetime | None = None,
) -> list[str]:
    """New recovery codes (the old ones stop working), after a current code from the app."""
    now = now or utcnow()
    assert account.id is not None
    factor = get_factor(session, account.id)
    if factor is None or factor.state != FactorState.active.value:
        raise InvalidInput("Set up two-factor authentication first: open /auth/mfa/enrol.")
    secret = _read_factor_secret(session, account, factor, reason="console: new recovery codes", now=now)
    step = _matching_step(secret, code, now)
    if step is None or not _claim_step(session, factor, step):
        raise InvalidInput("That code is wrong or already used: enter the next code your app shows.")
    codes = _new_recovery_codes(session, account.id, now)
    record_event(session, principal=_principal(account), action="console_account.mfa.recovery_codes",
                 tenant_id=account.tenant_id, target=_owner(account.id), details={"count": len(codes)}, at=now)
    session.flush()
    return codes


# --- sign-in challenge -----------------------------------------------------------------------------


def start_challenge(session: Session, *, account_id: int, next_path: str = "/", now: datetime | None = None) -> str:
    """After a correct password: the single-use token of the second-factor step (for a cookie)."""
    now = now or utcnow()
    token = secrets.token_urlsafe(32)
    session.add(MfaChallenge(token_hash=_hash(token), account_id=account_id, next_path=next_path[:500],
                             created_at=now, expires_at=now + CHALLENGE_TTL))
    session.flush()
    return token


EXPIRED_STEP = "Your sign-in step expired or was already used: sign in again at /auth/login."


def open_challenge(session: Session, token: str | None, *, now: datetime | None = None) -> MfaChallenge:
    """The live challenge behind ``token``, or SessionInvalid."""
    now = now or utcnow()
    if not token or len(token) > 200:
        raise SessionInvalid(EXPIRED_STEP)
    ch = session.exec(select(MfaChallenge).where(MfaChallenge.token_hash == _hash(token))).first()
    if ch is None or ch.consumed_at is not None or now >= ch.expires_at:
        raise SessionInvalid(EXPIRED_STEP)
    return ch


def _claim_step(session: Session, factor: MfaFactor, step: int) -> bool:
    """Record ``step`` as used unless it (or a later one) already was: atomic, so a replay loses."""
    result = session.execute(
        update(MfaFactor)
        .where(col(MfaFactor.id) == factor.id,
               (col(MfaFactor.last_step).is_(None)) | (col(MfaFactor.last_step) < step))
        .values(last_step=step)
    )
    claimed = getattr(result, "rowcount", 0) == 1
    session.refresh(factor)
    return claimed


def _consume(session: Session, ch: MfaChallenge, now: datetime) -> bool:
    result = session.execute(
        update(MfaChallenge).where(col(MfaChallenge.id) == ch.id, col(MfaChallenge.consumed_at).is_(None))
        .values(consumed_at=now)
    )
    session.refresh(ch)
    return getattr(result, "rowcount", 0) == 1


def _claim_recovery_code(session: Session, account_id: int, code: str, now: datetime) -> bool:
    raw = "".join(code.lower().replace("-", "").split())
    if len(raw) != 16:
        return False
    result = session.execute(
        update(MfaRecoveryCode)
        .where(col(MfaRecoveryCode.account_id) == account_id, col(MfaRecoveryCode.code_hash) == _hash(raw),
               col(MfaRecoveryCode.used_at).is_(None))
        .values(used_at=now)
    )
    return getattr(result, "rowcount", 0) == 1


def recovery_codes_left(session: Session, account_id: int) -> int:
    return len(session.exec(select(MfaRecoveryCode.id).where(
        MfaRecoveryCode.account_id == account_id, col(MfaRecoveryCode.used_at).is_(None))).all())


@dataclass(frozen=True)
class Verified:
    account: ConsoleAccount
    method: str
    next_path: str


def verify_challenge(session: Session, *, token: str | None, code: str, now: datetime | None = None) -> Verified:
    """Check the second factor of a pending sign-in. On success the challenge is consumed and the
    caller starts a session with ``method``. Failure counters are committed before the error.

    Raises:
        SessionInvalid: the step expired, was used, or the account was disabled or locked meanwhile.
        SignInFailed: a wrong or replayed code (the message says which and how many tries are left).
    """
    now = now or utcnow()
    ch = open_challenge(session, token, now=now)
    account = session.get(ConsoleAccount, ch.account_id)
    if account is None or account.disabled or (account.locked_until and account.locked_until > now):
        raise SessionInvalid(auth.GENERIC_FAILURE)
    factor = get_factor(session, ch.account_id)
    if factor is None or factor.state != FactorState.active.value:
        raise SessionInvalid(EXPIRED_STEP)
    code = (code or "").strip()
    digits = "".join(code.split())
    method = TOTP_METHOD
    problem: str | None = None
    if digits.isdigit():
        secret = _read_factor_secret(session, account, factor, reason="console sign-in: second factor", now=now)
        step = _matching_step(secret, digits, now)
        if step is None:
            problem = "That code is not right"
        elif not _claim_step(session, factor, step):
            problem = "That code was already used"
    else:
        method = RECOVERY_METHOD
        if not _claim_recovery_code(session, ch.account_id, code, now):
            problem = "That recovery code is not right or was already used"
    if problem is None:
        if not _consume(session, ch, now):
            raise SessionInvalid(EXPIRED_STEP)
        factor.failures = 0
        factor.last_used_at = now
        session.add(factor)
        if method == RECOVERY_METHOD:
            record_event(session, principal=_principal(account), action="console_account.mfa.recovery_code_used",
                         tenant_id=account.tenant_id, target=_owner(ch.account_id),
                         details={"left": recovery_codes_left(session, ch.account_id)}, at=now)
        return Verified(account=account, method=method, next_path=ch.next_path)
    ch.failures += 1
    factor.failures += 1
    session.add(ch)
    if factor.failures >= FACTOR_MAX_FAILURES:
        factor.failures = 0
        account.locked_until = now + auth.LOCKOUT
        ch.consumed_at = now
        session.add(account)
        record_event(session, principal=account.email, action="account.locked", tenant_id=account.tenant_id,
                     target=_owner(ch.account_id), details={"reason": "second factor"}, at=now)
    elif ch.failures >= CHALLENGE_MAX_FAILURES:
        ch.consumed_at = now
    session.add(factor)
    session.commit()
    if ch.consumed_at is not None:
        raise SessionInvalid(f"{problem}. Too many wrong codes: sign in again at /auth/login "
                             "(after 5 wrong codes in a row the account is locked for 15 minutes).")
    left = CHALLENGE_MAX_FAILURES - ch.failures
    hint = ("wait for the next code in your app" if problem.endswith("already used")
            else "enter the 6-digit code your app shows now, or one of your recovery codes")
    raise SignInFailed(f"{problem}: {hint} ({left} tries left).")


# --- status and admin reset ------------------------------------------------------------------------


@dataclass(frozen=True)
class MfaStatus:
    enrolled: bool
    pending: bool
    required: bool
    recovery_codes_left: int
    confirmed_at: datetime | None


def mfa_status(session: Session, account: ConsoleAccount) -> MfaStatus:
    assert account.id is not None
    f = get_factor(session, account.id)
    active = f is not None and f.state == FactorState.active.value
    return MfaStatus(enrolled=active, pending=f is not None and not active, required=mfa_required(account),
                     recovery_codes_left=recovery_codes_left(session, account.id) if active else 0,
                     confirmed_at=f.confirmed_at if f else None)


def reset_mfa(session: Session, *, principal: Principal, account_id: int, now: datetime | None = None) -> None:
    """Remove an account's second factor and recovery codes (a lost device) and end its sessions.
    Staff, or the tenant's admin for an account of that tenant; never your own (ask another admin).
    The next sign-in leads to enrolment again (required for staff)."""
    now = now or utcnow()
    account = session.get(ConsoleAccount, account_id)
    if account is None:
        raise NotFound(NOT_IN_SCOPE)
    if not principal.is_staff and not (principal.is_tenant_admin and account.tenant_id == principal.tenant_id):
        raise NotFound(NOT_IN_SCOPE)  # the same words as for no account: ids of other tenants stay unknown
    if account.id == principal.account_id:
        raise InvalidInput("You cannot reset your own two-factor authentication: ask another admin.")
    factor = get_factor(session, account_id)
    if factor is None:
        raise InvalidInput(f"{account.email} has no two-factor authentication to reset.")
    forget_secret(session, factor.secret_ref, principal=principal, reason="console two-factor reset", now=now)
    session.delete(factor)
    for c in session.exec(select(MfaRecoveryCode).where(MfaRecoveryCode.account_id == account_id)):
        session.delete(c)
    auth.revoke_sessions(session, account_id=account_id, now=now)
    record_event(session, principal=principal, action="console_account.mfa.reset", tenant_id=account.tenant_id,
                 target=_owner(account_id), details={"email": account.email}, at=now)
    session.flush()
