"""Issue 14, medium 5: an offboarded tenant keeps no access. Offboarding ends its console sessions at
once, refuses its accounts' password sign-in and any new session, and refuses vault writes (stored
credentials, new connect links, submissions on links made before), each saying the tenant is offboarded."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from sqlmodel import Session, select

from core.connections import links as connect
from core.connections.links import CredentialCheck
from core.errors import AccessDenied, LinkInvalid, SessionInvalid, SignInFailed
from core.tenants import auth
from core.tenants.access import Principal
from core.tenants.models import AuditEvent, ConsoleSession, Tenant
from core.tenants.service import set_tenant_status
from core.vault import service
from core.vault.models import VaultCredential
from tests.conftest import admin_of, make_tenant
from tests.fixtures.vault import make_vault_world

PW = "correct horse battery"
STAFF = Principal(role="staff", email="cs@crmbridge.example")


@pytest.fixture
def admin(session, tenant):
    acc = auth.create_console_account(session, principal=Principal.system(), email="admin@acme.example",
                                      role="tenant_admin", tenant_id=tenant.id, password=PW)
    session.commit()
    return acc


def _offboard(session: Session, tenant: Tenant) -> None:
    set_tenant_status(session=session, principal=STAFF, tenant_id=tenant.id, status="offboarded")
    session.commit()


def test_offboarding_ends_the_tenants_live_sessions_at_once(session, tenant, other_tenant, admin):
    token = auth.start_session(session, account_id=admin.id)
    other = auth.create_console_account(session, principal=Principal.system(), email="admin@globex.example",
                                        role="tenant_admin", tenant_id=other_tenant.id, password=PW)
    other_token = auth.start_session(session, account_id=other.id)
    session.commit()
    assert auth.principal_from_token(session, token).tenant_id == tenant.id

    _offboard(session, tenant)

    with pytest.raises(SessionInvalid, match="offboarded"):
        auth.principal_from_token(session, token)
    rows = session.exec(select(ConsoleSession).where(ConsoleSession.account_id == admin.id)).all()
    assert rows and all(r.revoked_at is not None for r in rows)  # ended, not just hidden
    assert auth.principal_from_token(session, other_token).tenant_id == other_tenant.id  # others unaffected
    event = session.exec(select(AuditEvent).where(AuditEvent.action == "tenant.status")).one()
    assert '"sessions_ended":1' in event.details.replace(" ", "")


def test_a_session_of_an_offboarded_tenant_is_refused_even_if_not_revoked(session, tenant, admin):
    token = auth.start_session(session, account_id=admin.id)
    tenant.status = "offboarded"  # e.g. set by another replica or a script, without the service
    session.add(tenant)
    session.commit()
    with pytest.raises(SessionInvalid, match="Acme has been offboarded"):
        auth.principal_from_token(session, token)


def test_password_sign_in_is_refused_and_says_the_tenant_is_offboarded(session, tenant, admin):
    _offboard(session, tenant)
    with pytest.raises(SignInFailed, match="Acme has been offboarded from CRM Bridge") as exc:
        auth.authenticate(session, email="admin@acme.example", password=PW, address="1.2.3.4")
    assert exc.value.code == "tenant_offboarded"
    # a wrong password still gets the generic message: strangers learn nothing about the tenant
    with pytest.raises(SignInFailed) as wrong:
        auth.authenticate(session, email="admin@acme.example", password="not the password", address="1.2.3.4")
    assert "offboarded" not in str(wrong.value)


def test_no_session_starts_for_an_offboarded_tenants_account(session, tenant, admin):
    """SSO, invitations and the second factor all end in start_session: it refuses too."""
    _offboard(session, tenant)
    with pytest.raises(SessionInvalid, match="offboarded"):
        auth.start_session(session, account_id=admin.id, method="sso")
    assert session.exec(select(ConsoleSession)).all() == []


def test_sign_in_route_refuses_an_offboarded_tenants_admin(web, app_db):
    with Session(app_db, expire_on_commit=False) as s:
        t = make_tenant(s, "acme")
        auth.create_console_account(s, principal=Principal.system(), email="admin@acme.example",
                                    role="tenant_admin", tenant_id=t.id, password=PW)
        s.commit()
        _offboard(s, t)
    page = web.get("/auth/login")
    csrf = page.text.split('name=csrf value="', 1)[1].split('"', 1)[0]
    resp = web.post("/auth/login", data={"email": "admin@acme.example", "password": PW, "csrf": csrf},
                    follow_redirects=False)
    assert resp.status_code == 401
    assert "Acme has been offboarded from CRM Bridge" in resp.text
    assert "crmbridge_session" not in resp.cookies


@pytest.mark.usefixtures("vault_keys")
def test_vault_refuses_new_credentials_and_connect_links_for_an_offboarded_tenant(session, tenant):
    world = make_vault_world(session, tenant)
    tid, acc, user = world.ids
    _offboard(session, tenant)
    for who in (STAFF, admin_of(tenant)):
        with pytest.raises(AccessDenied, match="Acme has been offboarded.*no new credentials") as exc:
            service.put(session, principal=who, tenant_id=tid, purpose="crm-login", secret="s3cret-value",
                        crm_account_id=acc, app_user_id=user)
        assert exc.value.code == "tenant_offboarded"
        with pytest.raises(AccessDenied, match="offboarded.*no new connect link"):
            connect.create_connect_link(session, principal=who, tenant_id=tid, app_user_id=user, crm_account_id=acc)
    session.rollback()
    assert session.exec(select(VaultCredential)).all() == []


@pytest.mark.usefixtures("vault_keys")
def test_a_connect_link_made_before_offboarding_stores_nothing_and_sends_no_password(file_engine):
    with Session(file_engine, expire_on_commit=False) as s:
        tenant = make_tenant(s, "acme")
        world = make_vault_world(s, tenant)
        url = connect.create_connect_link(s, principal=STAFF, tenant_id=tenant.id, app_user_id=world.users[0].id,
                                          crm_account_id=world.account.id)
        s.commit()
        _offboard(s, tenant)
    token = url.rsplit("/", 1)[1]
    seen: list[CredentialCheck] = []

    def tester(check: CredentialCheck) -> str:
        seen.append(check)
        return "005ACME00000001"

    try:
        with Session(file_engine) as s:
            assert connect.open_link(s, token, audit=False).state == "offboarded"
        with pytest.raises(LinkInvalid, match="Acme has been offboarded"):
            connect.submit_link(token, username="user1@acme.example", password=SecretStr("Corr3ct-Horse!"),
                                engine=file_engine, tester=tester)
    finally:
        pass
    assert seen == []  # the password never went anywhere
    with Session(file_engine) as s:
        assert s.exec(select(VaultCredential)).all() == []
