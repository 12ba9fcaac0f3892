"""Shredding stored passwords when an account leaves per-user passwords is a core rule: calling the
service is enough, no page has to remember it (issue 17)."""

from __future__ import annotations

import json

import pytest
from sqlmodel import select

from core.connections import service
from core.errors import AccessDenied, CredentialDestroyed
from core.tenants.models import AuditEvent
from core.vault import service as vault
from tests.conftest import admin_of, make_tenant
from tests.fixtures.vault import make_vault_world


def _store_password(session, staff, world, user):  # type: ignore[no-untyped-def]
    return vault.put(session, principal=staff, tenant_id=world.tenant.id, purpose="crm-login",
                     crm_account_id=world.account.id, app_user_id=user.id, kind="password",
                     secret=json.dumps({"username": user.email, "password": "Corr3ct-Horse!", "security_token": ""}))


@pytest.mark.parametrize("new_mode", ["api_user", "per_user_oauth"])
def test_leaving_per_user_passwords_shreds_them_in_the_service(session, staff, tenant, vault_keys, new_mode):
    world = make_vault_world(session, tenant)
    other = make_vault_world(session, tenant, label="Second org", users=1, user_prefix="second")
    refs = [_store_password(session, staff, world, u) for u in world.users]
    kept = _store_password(session, staff, other, other.users[0])
    session.commit()

    service.set_credential_mode(session=session, principal=staff, account_id=world.account.id, mode=new_mode)
    session.commit()

    for ref in refs:
        with pytest.raises(CredentialDestroyed), vault.use(session, ref, principal=staff, reason="test"):
            pass
    with vault.use(session, kept, principal=staff, reason="test") as secret:  # another account: untouched
        assert json.loads(secret.get_secret_value())["password"] == "Corr3ct-Horse!"
    actions = [e.action for e in session.exec(select(AuditEvent))]
    assert "crm_account.credential_mode" in actions


def test_staying_on_or_moving_to_passwords_keeps_them_and_scope_is_checked(session, staff, tenant, vault_keys):
    world = make_vault_world(session, tenant, mode="api_user")
    service.set_credential_mode(session=session, principal=staff, account_id=world.account.id,
                                mode="per_user_password")
    ref = _store_password(session, staff, world, world.users[0])
    session.commit()
    service.set_credential_mode(session=session, principal=staff, account_id=world.account.id,
                                mode="per_user_password")  # no change: nothing shredded
    with vault.use(session, ref, principal=staff, reason="test") as secret:
        assert json.loads(secret.get_secret_value())["username"] == world.users[0].email
    outsider = admin_of(make_tenant(session, "globex"))
    with pytest.raises(AccessDenied):
        service.set_credential_mode(session=session, principal=outsider, account_id=world.account.id,
                                    mode="api_user")
    with vault.use(session, ref, principal=staff, reason="test"):  # the refused change shredded nothing
        pass
