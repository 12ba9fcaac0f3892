"""Sign-in, lockout, per-address throttling, sessions and the sign-in routes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.errors import Conflict, InvalidInput, SessionInvalid, SignInFailed
from core.tenants import auth
from core.tenants.access import Principal
from core.tenants.models import AuditEvent, ConsoleSession

PW = "correct horse battery"


@pytest.fixture
def account(session, tenant):
    acc = auth.create_console_account(session, principal=Principal.system(), email="Admin@Acme.example",
                                      role="tenant_admin", tenant_id=tenant.id, password=PW)
    session.commit()
    return acc


def test_sign_in_and_session_round_trip(session, account, clock):
    acc = auth.authenticate(session, email="admin@acme.example", password=PW, address="1.2.3.4", now=clock())
    token = auth.start_session(session, account_id=acc.id, now=clock())
    session.commit()
    p = auth.principal_from_token(session, token, now=clock.advance(minutes=5))
    assert p.role == "tenant_admin" and p.tenant_id == account.tenant_id
    # only the hash is stored
    assert session.query(ConsoleSession).filter(ConsoleSession.token_hash == token).count() == 0


def test_one_generic_message_for_unknown_email_and_wrong_password(session, account, clock):
    with pytest.raises(SignInFailed) as a:
        auth.authenticate(session, email="nobody@acme.example", password=PW, address="1.1.1.1", now=clock())
    with pytest.raises(SignInFailed) as b:
        auth.authenticate(session, email="admin@acme.example", password="wrong password!", address="1.1.1.1",
                          now=clock())
    assert str(a.value) == str(b.value)


def _fail(session, clock, address: str, times: int = 5) -> None:  # type: ignore[no-untyped-def]
    for _ in range(times):
        with pytest.raises(SignInFailed):
            auth.authenticate(session, email="admin@acme.example", password="nope-nope-nope", address=address,
                              now=clock())


def test_lockout_after_five_failures_pauses_that_address_for_fifteen_minutes(session, account, clock):
    _fail(session, clock, "9.9.9.9")
    with pytest.raises(SignInFailed):  # right password, but locked from this address
        auth.authenticate(session, email="admin@acme.example", password=PW, address="9.9.9.9", now=clock())
    clock.advance(minutes=16)
    assert auth.authenticate(session, email="admin@acme.example", password=PW, address="9.9.9.9", now=clock())


def test_a_stranger_cannot_lock_the_holder_out_from_elsewhere(session, account, clock):
    """Issue 14 (low): 5 wrong passwords from an attacker's address used to lock the account everywhere."""
    _fail(session, clock, "6.6.6.6", times=12)
    assert auth.authenticate(session, email="admin@acme.example", password=PW, address="10.0.0.7", now=clock())
    with pytest.raises(SignInFailed):  # the attacker's address stays paused, right password or not
        auth.authenticate(session, email="admin@acme.example", password=PW, address="6.6.6.6", now=clock())


def test_each_further_lock_from_one_address_lasts_twice_as_long(session, account, clock):
    assert [auth.lock_duration(n) for n in (1, 2, 3)] == [timedelta(minutes=15), timedelta(minutes=30),
                                                          timedelta(hours=1)]
    assert auth.lock_duration(40) == timedelta(days=1)
    _fail(session, clock, "9.9.9.9")
    clock.advance(minutes=16)
    _fail(session, clock, "9.9.9.9")  # the second lock: 30 minutes
    clock.advance(minutes=20)
    with pytest.raises(SignInFailed):
        auth.authenticate(session, email="admin@acme.example", password=PW, address="9.9.9.9", now=clock())
    clock.advance(minutes=11)
    assert auth.authenticate(session, email="admin@acme.example", password=PW, address="9.9.9.9", now=clock())


def test_a_lock_is_audited_with_the_address_and_the_holder_is_told(session, account, clock):
    told: list[tuple[str, str]] = []
    for _ in range(5):
        with pytest.raises(SignInFailed):
            auth.authenticate(session, email="admin@acme.example", password="nope-nope-nope", address="6.6.6.6",
                              now=clock(), on_lock=lambda acc, addr, until: told.append((acc.email, addr)))
    assert told == [("admin@acme.example", "6.6.6.6")]
    event = session.exec(select(AuditEvent).where(AuditEvent.action == "account.locked")).one()
    assert event.tenant_id == account.tenant_id and "6.6.6.6" in event.details  # the tenant admin sees it


def test_address_throttle_stops_wholesale_lockouts(session, account, clock):
    for i in range(auth.ADDRESS_MAX_FAILURES):
        with pytest.raises(SignInFailed):
            auth.authenticate(session, email=f"guess{i}@acme.example", password="x", address="6.6.6.6", now=clock())
    with pytest.raises(SignInFailed, match="Too many failed sign-ins"):
        auth.authenticate(session, email="admin@acme.example", password=PW, address="6.6.6.6", now=clock())
    # the real admin from another address is unaffected
    assert auth.authenticate(session, email="admin@acme.example", password=PW, address="7.7.7.7", now=clock())


def test_session_idle_absolute_expiry_and_revocation(session, account, clock):
    token = auth.start_session(session, account_id=account.id, now=clock())
    session.commit()
    with pytest.raises(SessionInvalid):
        auth.principal_from_token(session, token, now=clock() + timedelta(minutes=61))
    token2 = auth.start_session(session, account_id=account.id, now=clock())
    for _ in range(15):  # active every 55 minutes, but the absolute limit is 12 h
        clock.advance(minutes=55)
        try:
            auth.principal_from_token(session, token2, now=clock())
        except SessionInvalid:
            break
    else:
        pytest.fail("absolute expiry did not end the session")
    token3 = auth.start_session(session, account_id=account.id, now=clock())
    auth.end_session(session, token3, now=clock())
    with pytest.raises(SessionInvalid):
        auth.principal_from_token(session, token3, now=clock())


def test_disabling_ends_every_session(session, staff, account, clock):
    t1 = auth.start_session(session, account_id=account.id, now=clock())
    t2 = auth.start_session(session, account_id=account.id, now=clock())
    auth.set_account_disabled(session, principal=staff, account_id=account.id, disabled=True)
    session.commit()
    for t in (t1, t2):
        with pytest.raises(SessionInvalid):
            auth.principal_from_token(session, t, now=clock())


def test_forged_token_is_refused(session, account):
    with pytest.raises(SessionInvalid):
        auth.principal_from_token(session, "forged-token-value")
    with pytest.raises(SessionInvalid):
        auth.principal_from_token(session, None)


def test_account_creation_rules(session, staff, tenant, account):
    with pytest.raises(InvalidInput, match="Unknown role"):
        auth.create_console_account(session, principal=staff, email="x@y.z", role="root")
    with pytest.raises(InvalidInput, match="tenant"):
        auth.create_console_account(session, principal=staff, email="x@y.z", role="tenant_admin")
    with pytest.raises(InvalidInput, match="not tied"):
        auth.create_console_account(session, principal=staff, email="x@y.z", role="staff", tenant_id=tenant.id)
    with pytest.raises(Conflict):
        auth.create_console_account(session, principal=staff, email="ADMIN@acme.example", role="leadership")
    with pytest.raises(InvalidInput, match="too short"):
        auth.create_console_account(session, principal=staff, email="s@y.z", role="staff", password="short")


# --- the routes ----------------------------------------------------------------------------------


@pytest.fixture
def client(app_db):
    from sqlmodel import Session

    from core.accounts.routes import routes as account_routes
    from core.tenants.routes import routes as tenant_routes

    with Session(app_db) as s:
        auth.create_console_account(s, principal=Principal.system(), email="cs@crmbridge.example", role="staff",
                                    password=PW)
        s.commit()
    return TestClient(Starlette(routes=tenant_routes + account_routes), base_url="http://127.0.0.1:8501")


def _csrf(client: TestClient) -> str:
    page = client.get("/auth/login")
    assert page.status_code == 200
    return page.text.split('name=csrf value="', 1)[1].split('"', 1)[0]


def test_login_route_sets_httponly_lax_cookie(client):
    token = _csrf(client)
    r = client.post("/auth/login", data={"email": "cs@crmbridge.example", "password": PW, "csrf": token},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "crmbridge_session=" in cookie and "httponly" in cookie and "samesite=lax" in cookie


def test_login_without_csrf_is_refused(client):
    client.get("/auth/login")
    r = client.post("/auth/login", data={"email": "cs@crmbridge.example", "password": PW}, follow_redirects=False)
    assert r.status_code == 400 and "crmbridge_session" not in r.headers.get("set-cookie", "")
    assert "try signing in again" in r.text


def test_login_failure_shows_generic_message(client):
    token = _csrf(client)
    r = client.post("/auth/login", data={"email": "cs@crmbridge.example", "password": "wrong-wrong", "csrf": token})
    assert r.status_code == 401 and "Wrong email or password" in r.text


def test_open_redirect_after_login_is_refused(client):
    token = _csrf(client)
    r = client.post("/auth/login", data={"email": "cs@crmbridge.example", "password": PW, "csrf": token,
                                         "next": "//evil.example/x"}, follow_redirects=False)
    assert r.headers["location"] == "/"


def test_logout_ends_session_everywhere(client, app_db):
    from sqlmodel import Session

    token = _csrf(client)
    client.post("/auth/login", data={"email": "cs@crmbridge.example", "password": PW, "csrf": token},
                follow_redirects=False)
    session_token = client.cookies.get("crmbridge_session")
    page = client.get("/auth/logout")
    csrf = page.text.split('name=csrf value="', 1)[1].split('"', 1)[0]
    r = client.post("/auth/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    with Session(app_db) as s, pytest.raises(SessionInvalid):
        auth.principal_from_token(s, session_token)


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}
