"""Console sign-in and server-side sessions.

- Passwords: argon2id. Unknown emails are checked against a dummy hash so timing reveals nothing,
  and every failure gives one generic message.
- Lockout per (account, client address): 5 wrong passwords from one address pause sign-in to that
  account *from that address* (15 minutes, doubling with each further lock up to a day), so a
  stranger cannot lock the real holder out from elsewhere. Each lock is audited (``account.locked``
  with the address) and the caller's ``on_lock`` tells the holder (core.accounts emails them).
  Per-address throttling (30 failures per 15 minutes) stops one client from guessing many emails.
- Offboarded tenants: a correct password of one of its accounts is refused with a message saying
  so; no session starts for its accounts and their live sessions stop working.
- Sessions: a random token in an HttpOnly, SameSite=Lax cookie; only its SHA-256 is stored. Absolute
  and idle expiry; revocable (sign-out, disabling an account) everywhere at once.
- Second factor (core.accounts.mfa): a session's ``method`` says how it was earned. Staff sessions
  count only when earned with a second factor (``MFA_METHODS``); a staff member who has not enrolled
  yet gets an enrolment-only session (``ENROL_ONLY_METHOD``, 15 minutes) that opens nothing but
  /auth/mfa/enrol — ``principal_from_token`` refuses it for the console.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import Session, select

from core.clock import utcnow
from core.db import DriverStatements
from core.errors import Conflict, InvalidInput, NotFound, SessionInvalid, SignInFailed
from core.settings import get_settings
from core.tenants.access import (
    NOT_IN_SCOPE,
    Principal,
    offboarded_message,
    require_not_offboarded,
    require_staff,
)
from core.tenants.audit import record_event, record_event_lean
from core.tenants.models import (
    ConsoleAccount,
    ConsoleSession,
    Role,
    SignInLock,
    SignInThrottle,
    Tenant,
    TenantStatus,
)

MAX_FAILURES = 5
LOCKOUT = timedelta(minutes=15)  # the first lock of an (account, address); each further one doubles
LOCKOUT_MAX = timedelta(days=1)
LOCK_MEMORY = timedelta(days=1)  # an (account, address) quiet this long starts afresh
ADDRESS_WINDOW = timedelta(minutes=15)
ADDRESS_MAX_FAILURES = 30
SEEN_WRITE_EVERY = timedelta(seconds=60)
# Session methods (core.accounts sets the second-factor ones).
ENROL_ONLY_METHOD = "mfa-enrol"
ENROL_ONLY_LIFETIME = timedelta(minutes=15)
MFA_METHODS = frozenset({"password+totp", "password+recovery", "invite+totp"})
ENROL_FIRST = (
    "Staff accounts need two-factor authentication before the console opens: set it up at /auth/mfa/enrol "
    "(sign in again at /auth/login if that page says your step expired)."
)
GENERIC_FAILURE = (
    "Wrong email or password, or the account is locked or disabled. Check both and try again; "
    "after 5 failed attempts sign-in from your network is paused for 15 minutes (longer if it goes on)."
)
OFFBOARDED_SIGN_IN = "console sign-in is closed for its accounts"
LockNotice = Callable[[ConsoleAccount, str, datetime], None]


_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
_DUMMY_HASH = _hasher.hash("not-a-real-password-used-for-timing-only")


def hash_password(password: str) -> str:
    if len(password) < 12:
        raise InvalidInput("The password is too short: use at least 12 characters.")
    if len(password) > 1024:
        raise InvalidInput("The password is too long: use at most 1,024 characters.")
    return _hasher.hash(password)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def normalize_email(email: str) -> str:
    email = (email or "").strip().lower()
    if "@" not in email or len(email) > 254 or len(email) < 3:
        raise InvalidInput(f"{email!r} is not an email address: enter it as name@company.com.")
    return email


def _throttle(session: Session, address: str, now: datetime) -> SignInThrottle:
    row = session.get(SignInThrottle, address)
    if row is None:
        row = SignInThrottle(address=address, window_start=now, failures=0)
    elif now - row.window_start > ADDRESS_WINDOW:
        row.window_start, row.failures = now, 0
    return row


def lock_duration(locks: int) -> timedelta:
    """How long the ``locks``-th lock in a row of one (account, address) lasts: 15 min, 30, 60, … a day."""
    return min(LOCKOUT * (2 ** min(max(locks - 1, 0), 16)), LOCKOUT_MAX)


def _source_lock(session: Session, account_id: int, address: str, now: datetime) -> SignInLock:
    row = session.get(SignInLock, (account_id, address))
    if row is None:
        row = SignInLock(account_id=account_id, address=address, failures=0, locks=0, last_failure_at=now)
    elif now - row.last_failure_at > LOCK_MEMORY and not (row.locked_until and row.locked_until > now):
        row.failures, row.locks, row.locked_until = 0, 0, None
    return row


def active_source_locks(session: Session, account_id: int, now: datetime | None = None) -> list[SignInLock]:
    """The addresses sign-in to this account is paused from right now."""
    now = now or utcnow()
    return [r for r in session.exec(select(SignInLock).where(SignInLock.account_id == account_id))
            if r.locked_until is not None and r.locked_until > now]


def clear_source_locks(session: Session, account_id: int) -> None:
    """Lift every per-address lock of an account (an admin's unlock, a password reset)."""
    for r in session.exec(select(SignInLock).where(SignInLock.account_id == account_id)):
        session.delete(r)


def _tenant_offboarded(session: Session, account: ConsoleAccount) -> Tenant | None:
    if account.tenant_id is None:
        return None
    tenant = session.get(Tenant, account.tenant_id)
    return tenant if tenant is not None and tenant.status == TenantStatus.offboarded.value else None


def authenticate(
    session: Session, *, email: str, password: str, address: str, now: datetime | None = None,
    on_lock: LockNotice | None = None,
) -> ConsoleAccount:
    """Check a console sign-in. Commits the failure counters itself (they must survive the error).

    ``on_lock(account, address, locked_until)`` is called (after the commit) when this failure starts
    a lock, so the caller can tell the account holder.

    Raises:
        SignInFailed: with one generic message for every reason (unknown email, wrong password,
            locked from this address, disabled), a throttling message naming the wait when the address
            is throttled, or, for a correct password of an offboarded tenant's account, a message
            saying the tenant is offboarded.
    """
    now = now or utcnow()
    throttle = _throttle(session, address, now)
    if throttle.failures >= ADDRESS_MAX_FAILURES:
        wait = int((throttle.window_start + ADDRESS_WINDOW - now).total_seconds() // 60) + 1
        raise SignInFailed(f"Too many failed sign-ins from your network: wait {wait} minutes and try again.")
    try:
        email_n = normalize_email(email)
    except InvalidInput:
        email_n = ""
    account = session.exec(select(ConsoleAccount).where(ConsoleAccount.email == email_n)).first()
    ok = False
    try:
        ok = _hasher.verify(account.password_hash if account and account.password_hash else _DUMMY_HASH,
                            password or "")
    except (VerificationError, InvalidHashError):
        ok = False
    source = _source_lock(session, account.id, address, now) if account is not None and account.id else None
    # account.locked_until is the second-factor lock (5 wrong codes after a correct password)
    locked = bool(account and ((account.locked_until and account.locked_until > now)
                               or (source and source.locked_until and source.locked_until > now)))
    if account is None or not ok or locked or account.disabled or not account.password_hash:
        throttle.failures += 1
        session.add(throttle)
        started: datetime | None = None
        if account is not None and source is not None and not locked:
            source.failures += 1
            source.last_failure_at = now
            if source.failures >= MAX_FAILURES:
                source.locks += 1
                source.failures = 0
                source.locked_until = started = now + lock_duration(source.locks)
                record_event(session, principal="anonymous", action="account.locked",
                             tenant_id=account.tenant_id, target=f"console_account:{account.id}", at=now,
                             details={"email": account.email, "address": address, "until": started,
                                      "lock": source.locks, "reason": f"{MAX_FAILURES} wrong passwords"})
            session.add(source)
        session.commit()
        if started is not None and on_lock is not None and account is not None:
            on_lock(account, address, started)
        raise SignInFailed(GENERIC_FAILURE)
    gone = _tenant_offboarded(session, account)
    if gone is not None:
        raise SignInFailed(offboarded_message(gone.name, OFFBOARDED_SIGN_IN), code="tenant_offboarded")
    held = session.get(SignInLock, (account.id, address))
    if held is not None:  # a correct password from this address forgets its failures
        session.delete(held)
    account.failed_attempts = 0
    account.locked_until = None
    account.last_sign_in_at = now
    session.add(account)
    return account


def principal_for(account: ConsoleAccount) -> Principal:
    return Principal(role=account.role, email=account.email, account_id=account.id, tenant_id=account.tenant_id)


def start_session(
    session: Session, *, account_id: int, method: str = "password", now: datetime | None = None,
    lifetime: timedelta | None = None,
) -> str:
    """Create a server-side session and return the cookie token (shown to nobody else). ``lifetime``
    shortens the absolute lifetime (an enrolment-only session lasts 15 minutes)."""
    now = now or utcnow()
    account = session.get(ConsoleAccount, account_id)
    if account is None or account.disabled:
        raise SessionInvalid("This console account is disabled: ask CRM Bridge staff to re-enable it.")
    gone = _tenant_offboarded(session, account)
    if gone is not None:
        raise SessionInvalid(offboarded_message(gone.name, OFFBOARDED_SIGN_IN), code="tenant_offboarded")
    token = secrets.token_urlsafe(32)
    settings = get_settings()
    session.add(ConsoleSession(
        token_hash=_token_hash(token), account_id=account_id, method=method, created_at=now,
        last_seen_at=now, expires_at=now + min(lifetime or timedelta(hours=settings.session_absolute_hours),
                                               timedelta(hours=settings.session_absolute_hours)),
    ))
    record_event(session, principal=principal_for(account), action="session.start",
                 tenant_id=account.tenant_id, target=f"console_account:{account_id}",
                 details={"method": method}, at=now)
    session.flush()
    return token


_LEAN_SESSION_SQL = ("INSERT INTO console_session (token_hash, account_id, method, created_at, last_seen_at,"
                     " expires_at) VALUES (?, ?, ?, ?, ?, ?)")
_LEAN_SIGNED_IN_SQL = "UPDATE console_account SET last_sign_in_at = ? WHERE id = ?"


def start_session_lean(session: Session, *, account: Principal, method: str, now: datetime) -> str:
    """``start_session`` for the SSO sign-in, in hand-written statements on the session's DB-API
    connection, in its transaction (session row, ``session.start`` audit event through
    ``record_event_lean``, the account's last sign-in): the same rows without the ORM's unit of work or
    SQLAlchemy's per-statement work, which cost the ACS more than the statements (bench/sso.py's
    acs_ratio). ``account`` is the enabled account the caller just read (its id, role, email and tenant)."""
    assert account.account_id is not None
    token = secrets.token_urlsafe(32)
    hours = timedelta(hours=get_settings().session_absolute_hours)
    db = DriverStatements(session.connection())
    db.execute(_LEAN_SESSION_SQL, (_token_hash(token), account.account_id, method, db.time(now), db.time(now),
                                   db.time(now + hours)))
    record_event_lean(session, principal=account, action="session.start", tenant_id=account.tenant_id,
                      target=f"console_account:{account.account_id}", details={"method": method}, at=now,
                      driver=db)
    db.execute(_LEAN_SIGNED_IN_SQL, (db.time(now), account.account_id))
    return token


def session_from_token(
    session: Session, token: str | None, *, now: datetime | None = None
) -> tuple[ConsoleSession, ConsoleAccount]:
    """The live session row behind a cookie and its account, whatever its method (the enrolment route
    accepts enrolment-only sessions; the console does not: use ``principal_from_token``)."""
    if not token or len(token) > 200:
        raise SessionInvalid("You are not signed in: open /auth/login to sign in.")
    now = now or utcnow()
    row = session.exec(select(ConsoleSession).where(ConsoleSession.token_hash == _token_hash(token))).first()
    if row is None:
        raise SessionInvalid("Your session has ended: sign in again at /auth/login.")
    account = session.get(ConsoleAccount, row.account_id)
    gone = _tenant_offboarded(session, account) if account is not None else None
    if gone is not None:  # ended by the offboarding (or refused if a replica missed it): say why
        raise SessionInvalid(offboarded_message(gone.name, "its console sessions have ended"),
                             code="tenant_offboarded")
    if row.revoked_at is not None:
        raise SessionInvalid("Your session has ended: sign in again at /auth/login.")
    idle = timedelta(minutes=get_settings().session_idle_minutes)
    if now >= row.expires_at or now - row.last_seen_at > idle:
        raise SessionInvalid("Your session expired: sign in again at /auth/login.")
    if account is None or account.disabled:
        raise SessionInvalid("This console account is disabled: ask CRM Bridge staff to re-enable it.")
    return row, account


def principal_from_token(session: Session, token: str | None, *, now: datetime | None = None) -> Principal:
    """Resolve a session cookie to its Principal, or raise SessionInvalid (missing, forged, expired,
    idle, revoked, the account disabled, an enrolment-only session, or a staff session earned
    without a second factor)."""
    now = now or utcnow()
    row, account = session_from_token(session, token, now=now)
    if row.method == ENROL_ONLY_METHOD:
        raise SessionInvalid(ENROL_FIRST)
    if account.role == Role.staff.value and row.method not in MFA_METHODS:
        raise SessionInvalid("Staff sessions need a second factor: sign in again at /auth/login.")
    if now - row.last_seen_at > SEEN_WRITE_EVERY:
        row.last_seen_at = now
        session.add(row)
        session.commit()
    return principal_for(account)


def end_session(session: Session, token: str | None, *, now: datetime | None = None) -> None:
    if not token:
        return
    row = session.exec(select(ConsoleSession).where(ConsoleSession.token_hash == _token_hash(token))).first()
    if row is not None and row.revoked_at is None:
        row.revoked_at = now or utcnow()
        session.add(row)
        account = session.get(ConsoleAccount, row.account_id)
        if account is not None:
            record_event(session, principal=principal_for(account), action="session.end",
                         tenant_id=account.tenant_id, target=f"console_account:{account.id}", at=row.revoked_at)


def revoke_tenant_sessions(session: Session, *, tenant_id: int, now: datetime | None = None) -> int:
    """End every console session of a tenant's accounts at once (offboarding)."""
    now = now or utcnow()
    ids = session.exec(select(ConsoleAccount.id).where(ConsoleAccount.tenant_id == tenant_id)).all()
    return sum(revoke_sessions(session, account_id=i, now=now) for i in ids if i is not None)


def revoke_sessions(session: Session, *, account_id: int, now: datetime | None = None) -> int:
    """End every session of an account at once (disabling, password reset)."""
    now = now or utcnow()
    rows = session.exec(
        select(ConsoleSession).where(ConsoleSession.account_id == account_id, ConsoleSession.revoked_at == None)  # noqa: E711
    ).all()
    for r in rows:
        r.revoked_at = now
        session.add(r)
    return len(rows)


def create_console_account(
    session: Session,
    *,
    principal: Principal,
    email: str,
    role: str,
    tenant_id: int | None = None,
    password: str | None = None,
    name: str = "",
) -> ConsoleAccount:
    """Create a console account (staff only). Tenant admins must name their tenant; others must not."""
    require_staff(principal)
    email_n = normalize_email(email)
    try:
        role_v = Role(role).value
    except ValueError:
        raise InvalidInput(
            f"Unknown role {role!r}: use one of {', '.join(r.value for r in Role)}."
        ) from None
    if role_v == Role.tenant_admin.value:
        if tenant_id is None or session.get(Tenant, tenant_id) is None:
            raise InvalidInput("A tenant admin belongs to one tenant: choose an existing tenant.")
        require_not_offboarded(session, tenant_id, "no new console account can be created for it")
    elif tenant_id is not None:
        raise InvalidInput(f"A {role_v} account is not tied to a tenant: leave the tenant empty.")
    if session.exec(select(ConsoleAccount).where(ConsoleAccount.email == email_n)).first():
        raise Conflict(f"A console account for {email_n} already exists: edit it instead.")
    if len(name) > 200:
        raise InvalidInput("The name is too long: use at most 200 characters.")
    account = ConsoleAccount(
        email=email_n, name=name, role=role_v, tenant_id=tenant_id,
        password_hash=hash_password(password) if password else None,
    )
    session.add(account)
    session.flush()
    record_event(session, principal=principal, action="console_account.create", tenant_id=tenant_id,
                 target=f"console_account:{account.id}", details={"email": email_n, "role": role_v})
    return account


def set_account_disabled(
    session: Session, *, principal: Principal, account_id: int, disabled: bool
) -> ConsoleAccount:
    """Disable (ending every session at once) or re-enable a console account."""
    account = session.get(ConsoleAccount, account_id)
    if account is None:
        raise NotFound(NOT_IN_SCOPE)
    if not principal.is_staff and not (
        principal.is_tenant_admin and account.tenant_id == principal.tenant_id
    ):
        raise NotFound(NOT_IN_SCOPE)  # the same words as for no account: ids of other tenants stay unknown
    if account.id == principal.account_id and disabled:
        raise InvalidInput("You cannot disable your own account: ask another admin.")
    account.disabled = disabled
    session.add(account)
    if disabled:
        revoke_sessions(session, account_id=account_id)
    record_event(session, principal=principal, action="console_account.disable" if disabled else
                 "console_account.enable", tenant_id=account.tenant_id, target=f"console_account:{account.id}")
    return account
