"""The real credential tester behind a connect link, against the sandbox over real HTTPS: the form's
password goes as a typed SecretStr to the Salesforce provider's SOAP login(), a refusal comes back as
the provider's typed error (never classified by step name), and only the link user's own login is
stored."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import SecretStr
from sqlmodel import Session, select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.connections import links as connect
from core.connections.link_routes import connect_link_routes
from core.connections.links import CredentialCheck, LoginSecret, parse_login_secret
from core.connections.testing import test_link_login
from core.errors import AuthenticationFailed
from core.tenants.access import Principal
from core.tenants.models import AppUserCrmIdentity, AuditEvent
from core.vault import service as vault
from tests.conftest import make_tenant
from tests.fixtures.vault import make_vault_world

STAFF = Principal(role="staff", email="cs@crmbridge.example")
TOM_ID = "005TINY0000000001"  # data/demo/sandbox.yaml: tom@tinyco.example


@pytest.fixture
def tom_link(app_db, vault_keys, sandbox_app):  # type: ignore[no-untyped-def]
    with Session(app_db, expire_on_commit=False) as s:
        world = make_vault_world(s, make_tenant(s, "tinyco"))
        world.account.instance_url = f"{sandbox_app.base_url}/salesforce/tinyco"
        s.add(world.account)
        ident = s.exec(select(AppUserCrmIdentity).where(AppUserCrmIdentity.app_user_id == world.users[0].id)).one()
        ident.crm_user_id = TOM_ID
        s.add(ident)
        url = connect.create_connect_link(s, principal=STAFF, tenant_id=world.tenant.id,
                                          app_user_id=world.users[0].id, crm_account_id=world.account.id)
        s.commit()
    return world, url.rsplit("/", 1)[1]


def _submit(client: TestClient, token: str, **form: str):  # type: ignore[no-untyped-def]
    page = client.get(f"/connect/{token}")
    csrf = re.search(r"name=csrf value='([^']+)'", page.text).group(1)  # type: ignore[union-attr]
    return client.post(f"/connect/{token}", data={"csrf": csrf, "action": "store", **form})


def test_the_real_tester_logs_in_at_the_sandbox_and_stores_only_the_users_own_login(app_db, tom_link):
    world, token = tom_link
    client = TestClient(Starlette(routes=connect_link_routes()))  # the product's tester: no hook to set
    page = client.get(f"/connect/{token}").text
    assert "name=security_token" in page and "Salesforce username" in page  # the catalog's user_fields

    wrong = _submit(client, token, username="tom@tinyco.example", password="not-his", security_token="TKNTOM0001")
    assert wrong.status_code == 400 and "did not accept this login" in wrong.text
    other = _submit(client, token, username="uma@tinyco.example", password="Demo-Uma-2026",
                    security_token="TKNUMA0002")
    assert other.status_code == 400 and "different" in other.text  # Uma's real login, on Tom's link
    with Session(app_db) as s:
        failures = s.exec(select(AuditEvent).where(AuditEvent.action == "vault.link.test_failed")).all()
        assert [json.loads(e.details)["error"] for e in failures] == ["AuthenticationFailed", "identity_mismatch"]
        assert vault.find_credential(s, tenant_id=world.tenant.id, crm_account_id=world.account.id,
                                     app_user_id=world.users[0].id, purpose="crm-login") is None

    ok = _submit(client, token, username="tom@tinyco.example", password="Demo-Tom-2026", security_token="TKNTOM0001")
    assert ok.status_code == 200 and "Connected" in ok.text
    with Session(app_db) as s:
        ref = vault.find_credential(s, tenant_id=world.tenant.id, crm_account_id=world.account.id,
                                    app_user_id=world.users[0].id, purpose="crm-login")
        with vault.use(s, ref, principal=STAFF, reason="test") as secret:
            assert parse_login_secret(secret).password.get_secret_value() == "Demo-Tom-2026"


def test_the_real_tester_raises_the_providers_typed_error(app_db, tom_link):
    world, _ = tom_link
    check = CredentialCheck(
        tenant_id=world.tenant.id, crm_account_id=world.account.id, provider="salesforce", edition="enterprise",
        instance_url=world.account.instance_url, settings_json=world.account.settings_json or "{}",
        app_user_id=world.users[0].id, expected_crm_user_id=TOM_ID,
        login=LoginSecret("tom@tinyco.example", SecretStr("wrong"), SecretStr("TKNTOM0001")))
    with pytest.raises(AuthenticationFailed) as err:
        test_link_login(check)
    assert err.value.code == "INVALID_LOGIN" and "wrong" not in str(err.value)
    good = CredentialCheck(**{**check.__dict__, "login": LoginSecret("tom@tinyco.example", SecretStr("Demo-Tom-2026"),
                                                                     SecretStr("TKNTOM0001"))})
    assert connect.same_crm_user(TOM_ID, test_link_login(good))
