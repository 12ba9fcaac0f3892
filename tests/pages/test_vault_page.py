"""AppTests: the staff Vault page and the tenant page's credentials component."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session, select
from streamlit.testing.v1 import AppTest

from core.clock import utcnow
from core.tenants.access import Principal
from core.vault import service
from core.vault.models import VaultConnectLink, VaultCredential
from core.vault.policy import get_policy, set_policy
from tests.conftest import admin_of, make_tenant, page_text, run_page, unescape_md
from tests.fixtures.vault import TEST_KEK_ID, make_vault_world

pytestmark = pytest.mark.usefixtures("vault_keys")
STAFF = Principal(role="staff", email="cs@crmbridge.example", account_id=1)
SYSTEM = Principal.system("test")


@pytest.fixture
def world(app_db):
    """Tiny Co (idle limit 60 days): user 1 holds a password stored 25 days ago (its 30-day TTL ends in
    5 days), user 2's
    self-destructed on a failed login (reconnect needed), plus an API secret."""
    with Session(app_db, expire_on_commit=False) as s:
        w = make_vault_world(s, make_tenant(s, "tinyco"))
        t = w.tenant.id
        set_policy(s, principal=SYSTEM, tenant_id=t, idle_days=60)
        service.put(s, principal=SYSTEM, tenant_id=t, crm_account_id=w.account.id, app_user_id=w.users[0].id,
                    purpose="crm-login", secret="canary-page-pw-1", now=utcnow() - timedelta(days=25))
        gone = service.put(s, principal=SYSTEM, tenant_id=t, crm_account_id=w.account.id, app_user_id=w.users[1].id,
                           purpose="crm-login", secret="canary-page-pw-2")
        service.put(s, principal=SYSTEM, tenant_id=t, crm_account_id=w.account.id, purpose="api-client-secret",
                    secret="canary-page-api", kind="client_secret")
        s.commit()
        service.report_auth_failure(s, gone, principal=SYSTEM)
    return w


def _render_credentials(tenant_id: int) -> None:
    from pages._credentials import render_credentials

    render_credentials(tenant_id)


def credentials_app(principal: Principal, tenant_id: int) -> AppTest:
    at = AppTest.from_function(_render_credentials, args=(tenant_id,), default_timeout=30)
    at.session_state["principal"] = principal
    return at.run()


def test_staff_sees_keys_states_expiring_and_last_sweep(world, app_db):
    at = run_page("vault.py", STAFF)
    assert not at.exception
    text = page_text(at)
    assert TEST_KEK_ID in text and "Tenant keys" in text
    assert "active,2" in text  # credentials by state
    assert "user1@tinyco.example" in text and "TTL" in text  # self-destructs within 7 days
    assert "No sweep has run yet" in text
    assert "canary-page" not in text
    [b for b in at.button if b.label == "Sweep now"][0].click().run()
    assert any("Destroyed 0 expired and 0 idle" in unescape_md(s.value) for s in at.success)


def test_rotate_from_the_page_shows_progress_and_the_new_key(world, app_db, vault_keys):
    at = run_page("vault.py", STAFF)
    rotate = [b for b in at.button if b.label == "Rotate key"][0]
    assert rotate.disabled  # needs the confirmation first
    at.checkbox[0].check().run()
    [b for b in at.button if b.label == "Rotate key"][0].click().run()
    assert not at.exception
    new = vault_keys.ring.active
    assert new != TEST_KEK_ID
    assert any(f"Active key is now {new}" in unescape_md(s.value) and f"retired {TEST_KEK_ID}" in unescape_md(s.value)
               for s in at.success)


def test_vault_page_is_for_staff_only(world, app_db):
    for who in (admin_of(world.tenant), Principal(role="leadership", email="vp@crmbridge.example")):
        at = run_page("vault.py", who)
        assert at.error and "for CRM Bridge staff" in unescape_md(at.error[0].value)
        assert TEST_KEK_ID not in page_text(at)


def test_credentials_component_for_the_tenant_admin(world, app_db):
    at = credentials_app(admin_of(world.tenant), world.tenant.id)
    assert not at.exception
    text = page_text(at)
    assert "user1@tinyco.example" in text and "API user" in text
    assert "reconnect needed" in text and "authentication failed" in text
    assert "in 4 d" in text  # expires in (TTL 30 days, stored 25 days ago)
    assert "canary-page" not in text
    assert "1 user(s) must reconnect" in text


def test_revoke_from_the_component(world, app_db):
    at = credentials_app(admin_of(world.tenant), world.tenant.id)
    at.text_input[0].input("laptop stolen")
    [b for b in at.button if b.label == "Revoke now"][0].click().run()
    assert not at.exception
    with Session(app_db) as s:
        left = s.exec(select(VaultCredential)).all()
    assert [c.purpose for c in left] == ["api-client-secret"]


def test_create_connect_link_from_the_component(world, app_db):
    at = credentials_app(admin_of(world.tenant), world.tenant.id)
    at.selectbox[-1].select_index(1)  # user 2, who must reconnect
    [b for b in at.button if b.label == "Create connect link"][0].click().run()
    assert not at.exception
    (code,) = at.code
    assert code.value.startswith("http://127.0.0.1:8501/connect/")
    assert any("user2@tinyco.example" in unescape_md(s.value) for s in at.success)
    with Session(app_db) as s:
        link = s.exec(select(VaultConnectLink)).one()
    assert link.app_user_id == world.users[1].id and code.value.rsplit("/", 1)[1] not in link.token_hash
    assert code.value not in repr(at.session_state.to_dict())  # shown once, not kept in session state


def test_component_refuses_another_tenants_admin(world, app_db):
    with Session(app_db, expire_on_commit=False) as s:
        other = make_tenant(s, "globex")
    at = credentials_app(admin_of(other), world.tenant.id)
    assert at.error and "do not have access" in unescape_md(at.error[0].value)
    assert "user1@tinyco.example" not in page_text(at)


def test_policy_from_the_component(world, app_db):
    at = credentials_app(admin_of(world.tenant), world.tenant.id)
    assert any("idle 60 d" in e.label for e in at.expander)
    [n for n in at.number_input if n.label.startswith("Destroy a user's credential unused")][0].set_value(7)
    [b for b in at.button if b.label == "Save policy"][0].click().run()
    assert not at.exception and any("Policy saved" in unescape_md(s.value) for s in at.success)
    with Session(app_db) as s:
        assert get_policy(s, world.tenant.id).idle_days == 7
