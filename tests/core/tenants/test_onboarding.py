"""The onboarding state machine: resumable, validated, deferrable with a visible reason."""

from __future__ import annotations

import pytest
from sqlmodel import Session

from core import onboarding as ob
from core.errors import AccessDenied, InvalidInput
from core.tenants.service import create_tenant
from tests.conftest import admin_of, make_app_user, make_crm_account


@pytest.fixture
def fresh(session, staff):
    t = create_tenant(session=session, principal=staff, data={"name": "Initech", "slug": "initech"})
    session.commit()
    return t


def test_new_tenant_starts_at_crm_accounts(session, staff, fresh):
    view = ob.get_onboarding(session=session, principal=staff, tenant_id=fresh.id)
    assert view.current.key == "crm_accounts"
    assert view.progress == pytest.approx(1 / 7)


def test_steps_are_validated_by_their_checks(session, staff, fresh):
    with pytest.raises(InvalidInput, match="no CRM account"):
        ob.complete_step(session=session, principal=staff, tenant_id=fresh.id, step="crm_accounts")
    acc = make_crm_account(session, fresh)
    ob.complete_step(session=session, principal=staff, tenant_id=fresh.id, step="crm_accounts")
    ob.complete_step(session=session, principal=staff, tenant_id=fresh.id, step="credential_mode")
    with pytest.raises(InvalidInput, match="not passed yet: Main org"):
        ob.complete_step(session=session, principal=staff, tenant_id=fresh.id, step="connection_test")
    acc.last_test_ok = True
    session.add(acc)
    ob.complete_step(session=session, principal=staff, tenant_id=fresh.id, step="connection_test")
    assert fresh.onboarding_step == "sso"


def test_state_survives_a_new_session_and_another_person(engine, staff, fresh, session):
    make_crm_account(session, fresh)
    ob.complete_step(session=session, principal=staff, tenant_id=fresh.id, step="crm_accounts")
    session.commit()
    with Session(engine) as other:  # a restart, someone else resumes
        view = ob.get_onboarding(session=other, principal=admin_of(fresh), tenant_id=fresh.id)
        assert [s.status for s in view.steps][:3] == ["done", "done", "pending"]
        assert view.steps[1].by == staff.email


def test_defer_needs_a_reason_that_stays_visible(session, staff, fresh):
    with pytest.raises(InvalidInput, match="reason"):
        ob.defer_step(session=session, principal=staff, tenant_id=fresh.id, step="sso", reason="")
    ob.defer_step(session=session, principal=staff, tenant_id=fresh.id, step="sso",
                  reason="IdP admin on holiday until 8 Dec")
    view = ob.get_onboarding(session=session, principal=staff, tenant_id=fresh.id)
    assert view.deferred[0].reason == "IdP admin on holiday until 8 Dec"
    with pytest.raises(InvalidInput, match="cannot be deferred"):
        ob.defer_step(session=session, principal=staff, tenant_id=fresh.id, step="crm_accounts", reason="later on")


def test_go_live_needs_every_step_settled_then_marks_live(session, staff, fresh):
    with pytest.raises(InvalidInput, match="Not ready to go live"):
        ob.go_live(session=session, principal=staff, tenant_id=fresh.id)
    acc = make_crm_account(session, fresh)
    acc.last_test_ok = True
    make_app_user(session, fresh, "u@initech.example")
    for step in ("crm_accounts", "credential_mode", "connection_test", "users"):
        ob.complete_step(session=session, principal=staff, tenant_id=fresh.id, step=step)
    ob.defer_step(session=session, principal=staff, tenant_id=fresh.id, step="sso", reason="IdP not chosen yet")
    t = ob.go_live(session=session, principal=staff, tenant_id=fresh.id)
    assert t.status == "live"
    assert ob.get_onboarding(session=session, principal=staff, tenant_id=fresh.id).current is None


def test_tenant_admin_may_do_handed_steps_only_in_own_tenant(session, staff, fresh, other_tenant):
    make_crm_account(session, fresh)
    with pytest.raises(AccessDenied):
        ob.complete_step(session=session, principal=admin_of(fresh), tenant_id=fresh.id, step="crm_accounts")
    ob.complete_step(session=session, principal=admin_of(fresh), tenant_id=fresh.id, step="credential_mode")
    with pytest.raises(AccessDenied):
        ob.complete_step(session=session, principal=admin_of(other_tenant), tenant_id=fresh.id,
                         step="credential_mode")
    with pytest.raises(AccessDenied):
        ob.go_live(session=session, principal=admin_of(fresh), tenant_id=fresh.id)


def test_reopen_is_the_undo(session, staff, fresh):
    make_crm_account(session, fresh)
    ob.complete_step(session=session, principal=staff, tenant_id=fresh.id, step="crm_accounts")
    ob.reopen_step(session=session, principal=staff, tenant_id=fresh.id, step="crm_accounts")
    assert ob.get_onboarding(session=session, principal=staff, tenant_id=fresh.id).current.key == "crm_accounts"
