"""Invitation, password reset and TOTP flows end to end over the Starlette routes (TestClient), with
emails delivered to a local SMTP server on 127.0.0.1."""

from __future__ import annotations

import re

import pytest
from sqlmodel import Session, select

from core.accounts import mfa, service
from core.accounts.models import MfaFactor
from core.clock import utcnow
from core.errors import SessionInvalid
from core.tenants import auth
from core.tenants.access import Principal
from core.tenants.models import AuditEvent, ConsoleAccount, Tenant

PW = "correct horse battery"
NEW_PW = "a brand new passphrase"
STAFF = Principal(role="staff", email="boss@crmbridge.example")


def _csrf(html: str) -> str:
    return html.split('name=csrf value="', 1)[1].split('"', 1)[0]


def _path(url: str) -> str:
    return url.split("127.0.0.1:8501", 1)[1]


def _sign_in(web, email: str, password: str = PW):  # type: ignore[no-untyped-def]
    page = web.get("/auth/login")
    return web.post("/auth/login", data={"email": email, "password": password, "csrf": _csrf(page.text)},
                    follow_redirects=False)


def _principal(engine, web):  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        return auth.principal_from_token(s, web.cookies.get("crmbridge_session"))


def _key_from_page(html: str) -> str:
    return re.search(r"Key: <code>([A-Z2-7 ]+)</code>", html).group(1).replace(" ", "")  # type: ignore[union-attr]


def _wrong_code(secret: str) -> str:
    now = utcnow()
    valid = {mfa.code_at(secret, now.__class__.fromtimestamp(now.timestamp() + d * 30, now.tzinfo))
             for d in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in valid)


def _make_tenant(engine, slug: str = "acme") -> int:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        t = Tenant(name=slug.title(), slug=slug, status="live")
        s.add(t)
        s.commit()
        return t.id  # type: ignore[return-value]


def _make_account(engine, email: str, role: str, tenant_id: int | None = None) -> int:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        a = auth.create_console_account(s, principal=Principal.system(), email=email, role=role,
                                        tenant_id=tenant_id, password=PW)
        s.commit()
        return a.id  # type: ignore[return-value]


# --- invitations ---------------------------------------------------------------------------------


def test_invitation_creates_account_once_and_signs_in(web, app_db, smtp_sink):
    tenant_id = _make_tenant(app_db)
    admin = Principal(role="tenant_admin", email="owner@acme.example", tenant_id=tenant_id)
    with Session(app_db) as s:
        result = service.invite_account(session=s, principal=admin, email="New.Admin@Acme.example",
                                        role="tenant_admin", tenant_id=tenant_id, smtp=smtp_sink.config)
        s.commit()
    assert result.emailed and result.link_for_manual_delivery is None
    link = _path(smtp_sink.link_to("new.admin@acme.example", "/auth/invite/"))

    page = web.get(link)  # opening the link changes nothing
    assert page.status_code == 200 and "new.admin@acme.example" in page.text
    short = web.post(link, data={"csrf": _csrf(page.text), "password": "short", "confirm": "short"})
    assert short.status_code == 400 and "too short" in short.text
    r = web.post(link, data={"csrf": _csrf(page.text), "name": "Nia", "password": PW, "confirm": PW},
                 follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    p = _principal(app_db, web)
    assert p.email == "new.admin@acme.example" and p.role == "tenant_admin" and p.tenant_id == tenant_id

    again = web.get(link)  # single use
    assert again.status_code == 410 and "already used" in again.text
    replay = web.post(link, data={"csrf": _csrf(page.text), "password": PW, "confirm": PW})
    assert replay.status_code == 410
    with Session(app_db) as s:
        actions = [e.action for e in s.exec(select(AuditEvent))]
    assert "console_account.invite" in actions and "console_account.invitation.accept" in actions


def test_invitation_expires_and_tenant_admin_cannot_invite_staff(web, app_db, smtp_sink, clock):
    tenant_id = _make_tenant(app_db)
    admin = Principal(role="tenant_admin", email="owner@acme.example", tenant_id=tenant_id)
    from core.errors import AccessDenied

    with Session(app_db) as s:
        with pytest.raises(AccessDenied):
            service.invite_account(session=s, principal=admin, email="x@crmbridge.example", role="staff",
                                   smtp=smtp_sink.config)
        from datetime import timedelta

        service.invite_account(session=s, principal=STAFF, email="late@acme.example", role="tenant_admin",
                               tenant_id=tenant_id, now=utcnow() - timedelta(days=4), smtp=smtp_sink.config)
        s.commit()
    link = _path(smtp_sink.link_to("late@acme.example", "/auth/invite/"))
    assert web.get(link).status_code == 410


def test_invited_staff_must_enrol_before_the_console_opens(web, app_db, smtp_sink):
    with Session(app_db) as s:
        service.invite_account(session=s, principal=STAFF, email="new.cs@crmbridge.example", role="staff",
                               smtp=smtp_sink.config)
        s.commit()
    link = _path(smtp_sink.link_to("new.cs@crmbridge.example", "/auth/invite/"))
    page = web.get(link)
    r = web.post(link, data={"csrf": _csrf(page.text), "password": PW, "confirm": PW}, follow_redirects=False)
    assert r.headers["location"] == "/auth/mfa/enrol"
    with pytest.raises(SessionInvalid, match="two-factor"):
        _principal(app_db, web)  # the enrolment-only session opens no console
    enrol = web.get("/auth/mfa/enrol")
    secret = _key_from_page(enrol.text)
    done = web.post("/auth/mfa/enrol", data={"csrf": _csrf(enrol.text), "code": mfa.code_at(secret, utcnow())})
    assert done.status_code == 200 and "recovery codes" in done.text
    assert _principal(app_db, web).role == "staff"


# --- password reset ------------------------------------------------------------------------------


def test_password_reset_link_works_once_and_ends_sessions(web, app_db, smtp_sink):
    tenant_id = _make_tenant(app_db)
    _make_account(app_db, "ana@acme.example", "tenant_admin", tenant_id)
    assert _sign_in(web, "ana@acme.example").status_code == 303
    old_session = web.cookies.get("crmbridge_session")

    page = web.get("/auth/reset")
    r = web.post("/auth/reset", data={"email": "ana@acme.example", "csrf": _csrf(page.text)})
    unknown = web.post("/auth/reset", data={"email": "nobody@acme.example", "csrf": _csrf(web.get("/auth/reset").text)})
    assert r.status_code == unknown.status_code == 200
    assert "If an account exists" in r.text and "If an account exists" in unknown.text  # same answer
    assert smtp_sink.bodies_to("nobody@acme.example") == []
    link = _path(smtp_sink.link_to("ana@acme.example", "/auth/reset/"))

    form = web.get(link)
    assert form.status_code == 200
    mismatch = web.post(link, data={"csrf": _csrf(form.text), "password": NEW_PW, "confirm": NEW_PW + "x"})
    assert mismatch.status_code == 400 and "differ" in mismatch.text
    done = web.post(link, data={"csrf": _csrf(form.text), "password": NEW_PW, "confirm": NEW_PW})
    assert done.status_code == 200 and "password was changed" in done.text

    with Session(app_db) as s, pytest.raises(SessionInvalid):
        auth.principal_from_token(s, old_session)  # every session ended
    assert web.post(link, data={"csrf": _csrf(form.text), "password": PW, "confirm": PW}).status_code == 410
    assert _sign_in(web, "ana@acme.example", PW).status_code == 401  # old password gone
    assert _sign_in(web, "ana@acme.example", NEW_PW).status_code == 303


def test_admin_reset_is_emailed_never_returned_and_refused_across_tenants(app_db, smtp_sink):
    a = _make_tenant(app_db, "acme")
    b = _make_tenant(app_db, "globex")
    target = _make_account(app_db, "ana@acme.example", "tenant_admin", a)
    from core.errors import NotFound

    with Session(app_db) as s:
        other_admin = Principal(role="tenant_admin", email="x@globex.example", tenant_id=b)
        with pytest.raises(NotFound, match="No such console account in your scope"):  # as if it did not exist
            service.send_password_reset(session=s, principal=other_admin, account_id=target, smtp=smtp_sink.config)
        sent_to = service.send_password_reset(session=s, principal=STAFF, account_id=target, smtp=smtp_sink.config)
        s.commit()
    assert sent_to == "ana@acme.example"
    assert "/auth/reset/" in smtp_sink.link_to("ana@acme.example", "/auth/reset/")


# --- MFA -----------------------------------------------------------------------------------------


def test_staff_first_sign_in_leads_to_enrolment_then_totp_with_wrong_and_replayed_codes(web, app_db):
    _make_account(app_db, "cs@crmbridge.example", "staff")
    r = _sign_in(web, "cs@crmbridge.example")
    assert r.status_code == 303
    with pytest.raises(SessionInvalid, match="/auth/mfa/enrol"):
        _principal(app_db, web)
    assert web.get("/auth/login", follow_redirects=False).headers["location"] == "/auth/mfa/enrol"

    enrol = web.get("/auth/mfa/enrol")
    assert enrol.status_code == 200 and "<svg" in enrol.text  # QR code
    secret = _key_from_page(enrol.text)
    bad = web.post("/auth/mfa/enrol", data={"csrf": _csrf(enrol.text), "code": _wrong_code(secret)})
    assert bad.status_code == 400 and "does not match" in bad.text
    code = mfa.code_at(secret, utcnow())
    ok = web.post("/auth/mfa/enrol", data={"csrf": _csrf(enrol.text), "code": code})
    assert ok.status_code == 200
    recovery = re.findall(r"<code>([a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4})</code>", ok.text)
    assert len(recovery) == 10
    assert _principal(app_db, web).email == "cs@crmbridge.example"
    with Session(app_db) as s:  # the secret is not in the database in clear
        factor = s.exec(select(MfaFactor)).one()
        assert secret not in factor.secret_ref and factor.state == "active"

    web.cookies.clear()
    r = _sign_in(web, "cs@crmbridge.example")
    assert r.headers["location"] == "/auth/mfa" and "crmbridge_session" not in r.headers.get("set-cookie", "")
    form = web.get("/auth/mfa")
    wrong = web.post("/auth/mfa", data={"csrf": _csrf(form.text), "code": _wrong_code(secret)})
    assert wrong.status_code == 401 and "not right" in wrong.text
    replayed = web.post("/auth/mfa", data={"csrf": _csrf(form.text), "code": code})  # used at enrolment
    assert replayed.status_code == 401 and "already used" in replayed.text
    assert web.cookies.get("crmbridge_session") is None


def test_totp_code_accepted_once_and_recovery_code_once(web, app_db):
    _make_account(app_db, "cs@crmbridge.example", "staff")
    _sign_in(web, "cs@crmbridge.example")
    enrol = web.get("/auth/mfa/enrol")
    secret = _key_from_page(enrol.text)
    # confirm with the previous step's code so the current one is still unused
    now = utcnow()
    prev = mfa.code_at(secret, now.__class__.fromtimestamp(now.timestamp() - 30, now.tzinfo))
    ok = web.post("/auth/mfa/enrol", data={"csrf": _csrf(enrol.text), "code": prev})
    recovery = re.findall(r"<code>([a-z2-7-]{19})</code>", ok.text)

    web.cookies.clear()
    _sign_in(web, "cs@crmbridge.example")
    form = web.get("/auth/mfa")
    code = mfa.code_at(secret, utcnow())
    r = web.post("/auth/mfa", data={"csrf": _csrf(form.text), "code": code}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert _principal(app_db, web).role == "staff"
    assert web.get("/auth/mfa").status_code == 401  # the step was single-use

    web.cookies.clear()
    _sign_in(web, "cs@crmbridge.example")
    form = web.get("/auth/mfa")
    again = web.post("/auth/mfa", data={"csrf": _csrf(form.text), "code": code})
    assert again.status_code == 401 and "already used" in again.text
    r = web.post("/auth/mfa", data={"csrf": _csrf(form.text), "code": recovery[0].upper()}, follow_redirects=False)
    assert r.status_code == 303

    web.cookies.clear()
    _sign_in(web, "cs@crmbridge.example")
    form = web.get("/auth/mfa")
    reused = web.post("/auth/mfa", data={"csrf": _csrf(form.text), "code": recovery[0]})
    assert reused.status_code == 401 and "recovery code" in reused.text


def test_five_wrong_codes_lock_the_account(web, app_db):
    acc = _make_account(app_db, "cs@crmbridge.example", "staff")
    _sign_in(web, "cs@crmbridge.example")
    enrol = web.get("/auth/mfa/enrol")
    secret = _key_from_page(enrol.text)
    web.post("/auth/mfa/enrol", data={"csrf": _csrf(enrol.text), "code": mfa.code_at(secret, utcnow())})
    web.cookies.clear()
    _sign_in(web, "cs@crmbridge.example")
    form = web.get("/auth/mfa")
    for _ in range(4):
        assert web.post("/auth/mfa", data={"csrf": _csrf(form.text), "code": _wrong_code(secret)}).status_code == 401
    last = web.post("/auth/mfa", data={"csrf": _csrf(form.text), "code": _wrong_code(secret)})
    assert "Too many wrong codes" in last.text
    with Session(app_db) as s:
        assert s.get(ConsoleAccount, acc).locked_until is not None  # type: ignore[union-attr]
    assert _sign_in(web, "cs@crmbridge.example").status_code == 401


def test_tenant_admin_optional_totp_stored_in_the_vault(web, app_db, vault_keys):
    tenant_id = _make_tenant(app_db)
    _make_account(app_db, "ana@acme.example", "tenant_admin", tenant_id)
    r = _sign_in(web, "ana@acme.example")
    assert r.headers["location"] == "/" and _principal(app_db, web).role == "tenant_admin"  # optional
    enrol = web.get("/auth/mfa/enrol")
    secret = _key_from_page(enrol.text)
    ok = web.post("/auth/mfa/enrol", data={"csrf": _csrf(enrol.text), "code": mfa.code_at(secret, utcnow())})
    assert ok.status_code == 200
    with Session(app_db) as s:
        assert s.exec(select(MfaFactor)).one().secret_ref.startswith("vault:")
    web.cookies.clear()
    assert _sign_in(web, "ana@acme.example").headers["location"] == "/auth/mfa"


def test_disabling_ends_an_active_session(web, app_db):
    tenant_id = _make_tenant(app_db)
    acc = _make_account(app_db, "ana@acme.example", "tenant_admin", tenant_id)
    _sign_in(web, "ana@acme.example")
    assert _principal(app_db, web).email == "ana@acme.example"
    admin = Principal(role="tenant_admin", email="owner@acme.example", tenant_id=tenant_id, account_id=999)
    with Session(app_db) as s:
        service.set_disabled(session=s, principal=admin, account_id=acc, disabled=True)
        s.commit()
    with pytest.raises(SessionInvalid, match="ended|disabled"):
        _principal(app_db, web)
    assert _sign_in(web, "ana@acme.example").status_code == 401


def test_mfa_reset_by_admin_ends_sessions_and_requires_enrolment_again(web, app_db):
    acc = _make_account(app_db, "cs@crmbridge.example", "staff")
    _sign_in(web, "cs@crmbridge.example")
    enrol = web.get("/auth/mfa/enrol")
    secret = _key_from_page(enrol.text)
    web.post("/auth/mfa/enrol", data={"csrf": _csrf(enrol.text), "code": mfa.code_at(secret, utcnow())})
    assert _principal(app_db, web).role == "staff"
    with Session(app_db) as s:
        service.reset_account_mfa(session=s, principal=Principal(role="staff", email="lead@crmbridge.example",
                                                                 account_id=12345), account_id=acc)
        s.commit()
    with pytest.raises(SessionInvalid):
        _principal(app_db, web)
    web.cookies.clear()
    _sign_in(web, "cs@crmbridge.example")
    assert web.get("/auth/login", follow_redirects=False).headers["location"] == "/auth/mfa/enrol"


def test_no_secret_reaches_the_database_audit_or_logs(web, app_db, smtp_sink, caplog, vault_keys):
    import logging

    from tests.conftest import stored_bytes

    caplog.set_level(logging.DEBUG)
    tenant_id = _make_tenant(app_db)
    _make_account(app_db, "cs@crmbridge.example", "staff")
    _make_account(app_db, "ana@acme.example", "tenant_admin", tenant_id)
    canaries: list[str] = []
    for email in ("cs@crmbridge.example", "ana@acme.example"):  # platform-sealed and vault-held secrets
        web.cookies.clear()
        _sign_in(web, email)
        enrol = web.get("/auth/mfa/enrol")
        secret = _key_from_page(enrol.text)
        done = web.post("/auth/mfa/enrol", data={"csrf": _csrf(enrol.text), "code": mfa.code_at(secret, utcnow())})
        canaries += [secret, *re.findall(r"<code>([a-z2-7-]{19})</code>", done.text)]
    page = web.get("/auth/reset")
    web.post("/auth/reset", data={"email": "ana@acme.example", "csrf": _csrf(page.text)})
    canaries.append(smtp_sink.link_to("ana@acme.example", "/auth/reset/").rsplit("/", 1)[1])
    with Session(app_db) as s:
        service.invite_account(session=s, principal=STAFF, email="new@acme.example", role="tenant_admin",
                               tenant_id=tenant_id, smtp=smtp_sink.config)
        s.commit()
        audit = " ".join(f"{e.target} {e.details}" for e in s.exec(select(AuditEvent)))
    canaries.append(smtp_sink.link_to("new@acme.example", "/auth/invite/").rsplit("/", 1)[1])
    stored = stored_bytes(app_db)
    assert len(canaries) == 2 + 20 + 2
    assert b"ana@acme.example" in stored  # the scan does see what is stored
    for c in canaries:
        for form in {c, c.replace("-", "")}:
            assert form.encode() not in stored, "a secret is in the database file"
            assert form not in caplog.text and form not in audit
