"""Issue 14, medium 7: invitations are scoped to who issued them. A tenant admin inviting an address
staff (or another tenant) already invited used to revoke that invitation silently and replace it with
theirs; and the refusals told an admin whether an address or an account id existed in another tenant.
Now a tenant admin never changes an invitation or account outside their scope, and every out-of-scope
case reads the same as the others."""

from __future__ import annotations

import pytest
from sqlmodel import select

from core.accounts import invitations, mfa, reset, service
from core.accounts.models import ConsoleInvitation
from core.errors import AccessDenied, Conflict, LinkInvalid, NotFound
from core.tenants import auth
from core.tenants.access import Principal
from tests.conftest import make_tenant

PW = "correct horse battery"
STAFF = Principal(role="staff", email="cs@crmbridge.example")


@pytest.fixture
def world(session):  # type: ignore[no-untyped-def]
    acme, globex = make_tenant(session, "acme"), make_tenant(session, "globex")
    made = {}
    for email, role, tid in (("boss@crmbridge.example", "staff", None), ("admin@acme.example", "tenant_admin", acme.id),
                             ("admin@globex.example", "tenant_admin", globex.id)):
        made[email] = auth.create_console_account(session, principal=Principal.system(), email=email, role=role,
                                                  tenant_id=tid, password=PW)
    session.commit()
    return acme, globex, made


def _admin(account) -> Principal:  # type: ignore[no-untyped-def]
    return auth.principal_for(account)


def _live(session, email: str) -> list[ConsoleInvitation]:  # type: ignore[no-untyped-def]
    return session.exec(select(ConsoleInvitation).where(ConsoleInvitation.email == email,
                                                        ConsoleInvitation.revoked_at == None)).all()  # noqa: E711


def test_a_tenant_admin_cannot_hijack_a_staff_invitation(session, world):
    acme, _, made = world
    staff_inv, staff_link = invitations.create_invitation(session=session, principal=STAFF,
                                                          email="newhire@crmbridge.example", role="staff")
    session.commit()
    attacker = _admin(made["admin@acme.example"])
    with pytest.raises(Conflict) as exc:
        invitations.create_invitation(session=session, principal=attacker, email="NewHire@crmbridge.example",
                                      role="tenant_admin", tenant_id=acme.id)
    session.rollback()
    assert str(exc.value) == invitations.not_available("newhire@crmbridge.example")
    assert [i.id for i in _live(session, "newhire@crmbridge.example")] == [staff_inv.id]  # untouched
    # the staff member can still accept their own invitation and gets a staff account
    account = invitations.accept_invitation(session, token=staff_link.rsplit("/", 1)[1], password=PW)
    assert account.role == "staff" and account.tenant_id is None


def test_a_tenant_admin_cannot_replace_another_tenants_invitation(session, world):
    acme, globex, made = world
    theirs, _ = invitations.create_invitation(session=session, principal=_admin(made["admin@globex.example"]),
                                              email="ana@shared.example", role="tenant_admin", tenant_id=globex.id)
    session.commit()
    with pytest.raises(Conflict):
        invitations.create_invitation(session=session, principal=_admin(made["admin@acme.example"]),
                                      email="ana@shared.example", role="tenant_admin", tenant_id=acme.id)
    session.rollback()
    assert [i.id for i in _live(session, "ana@shared.example")] == [theirs.id]
    with pytest.raises(NotFound):
        invitations.revoke_invitation(session=session, principal=_admin(made["admin@acme.example"]),
                                      invitation_id=theirs.id)


def test_staff_invitations_to_my_tenant_stay_as_staff_sent_them(session, world):
    acme, _, made = world
    staff_inv, _ = invitations.create_invitation(session=session, principal=STAFF, email="cto@acme.example",
                                                 role="tenant_admin", tenant_id=acme.id)
    session.commit()
    admin = _admin(made["admin@acme.example"])
    with pytest.raises(Conflict, match="CRM Bridge staff already invited"):
        invitations.create_invitation(session=session, principal=admin, email="cto@acme.example",
                                      role="tenant_admin", tenant_id=acme.id)
    session.rollback()
    with pytest.raises(AccessDenied, match="ask them to revoke it"):
        invitations.revoke_invitation(session=session, principal=admin, invitation_id=staff_inv.id)
    session.rollback()
    assert [i.id for i in _live(session, "cto@acme.example")] == [staff_inv.id]


def test_a_tenant_admin_still_replaces_their_own_tenants_invitations(session, world):
    acme, _, made = world
    first, _ = invitations.create_invitation(session=session, principal=_admin(made["admin@acme.example"]),
                                             email="ops@acme.example", role="tenant_admin", tenant_id=acme.id)
    second, _ = invitations.create_invitation(session=session, principal=_admin(made["admin@acme.example"]),
                                              email="ops@acme.example", role="tenant_admin", tenant_id=acme.id)
    session.commit()
    assert [i.id for i in _live(session, "ops@acme.example")] == [second.id]
    assert first.revoked_at is not None


def test_refusals_read_the_same_whatever_exists_elsewhere(session, world):
    """No enumeration: staff's account, another tenant's account, another tenant's or staff's pending
    invitation all give the one wording; so do account ids outside the tenant and ids that do not exist."""
    acme, globex, made = world
    invitations.create_invitation(session=session, principal=STAFF, email="pending-staff@crmbridge.example",
                                  role="staff")
    invitations.create_invitation(session=session, principal=_admin(made["admin@globex.example"]),
                                  email="pending@globex.example", role="tenant_admin", tenant_id=globex.id)
    session.commit()
    admin = _admin(made["admin@acme.example"])
    words = set()
    for email in ("boss@crmbridge.example", "admin@globex.example", "pending-staff@crmbridge.example",
                  "pending@globex.example"):
        with pytest.raises(Conflict) as exc:
            invitations.create_invitation(session=session, principal=admin, email=email, role="tenant_admin",
                                          tenant_id=acme.id)
        session.rollback()
        words.add(str(exc.value).replace(email, "<email>"))
    assert words == {invitations.not_available("<email>")}
    assert "globex" not in next(iter(words)).lower()

    other_id, missing_id = made["admin@globex.example"].id, 10_000
    for act in (
        lambda i: service.set_disabled(session=session, principal=admin, account_id=i, disabled=True),
        lambda i: auth.set_account_disabled(session, principal=admin, account_id=i, disabled=True),
        lambda i: mfa.reset_mfa(session, principal=admin, account_id=i),
        lambda i: reset.admin_reset_link(session=session, principal=admin, account_id=i),
    ):
        messages = []
        for i in (other_id, missing_id):
            with pytest.raises((NotFound, AccessDenied, LinkInvalid)) as exc:
                act(i)
            session.rollback()
            messages.append((type(exc.value), str(exc.value)))
        assert messages[0] == messages[1]
    assert not made["admin@globex.example"].disabled
