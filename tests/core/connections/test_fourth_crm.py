"""Adding a CRM is a catalog entry, one class and one registry line (issue 17). A test-only fourth CRM,
"Acme", goes through onboarding, a connect link, posture and sync against a minimal double on
127.0.0.1 (real HTTP). Its three places are test-only: fourth_crm/catalog.acme.yaml (given to the code
through CRMBRIDGE_CATALOG_FILES), fourth_crm/provider.py, and the ``register(...)`` line below; no
production file names it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from sqlmodel import Session, select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.clock import utcnow
from core.connections import links, service
from core.connections.link_routes import connect_link_routes
from core.connections.testing import test_link_login
from core.posture.gather import gather_tenant
from core.posture.service import posture_of
from core.providers import registry
from core.providers.catalog import get_catalog
from core.providers.config import HttpTransport
from core.providers.transport import CrmUrlPolicy
from core.settings import get_settings
from core.sync.engine import SyncEngine
from core.sync.models import SyncOpportunity, SyncOutbox
from core.sync.outbox import record_change
from core.sync.scheduler import ensure_jobs
from core.tenants import service as tenants
from core.tenants.access import Principal
from core.tenants.models import CrmAccount
from tests.core.connections.fourth_crm.double import AcmeDouble
from tests.core.connections.fourth_crm.provider import AcmeCrmProvider

HERE = Path(__file__).parent / "fourth_crm"
STAFF = Principal(role="staff", email="cs@crmbridge.example")
ANA_ID = "ACME-U-1"


@pytest.fixture
def acme(monkeypatch: pytest.MonkeyPatch) -> Iterator[AcmeDouble]:
    double = AcmeDouble()
    double.state.users["ana@acme.example"] = {"password": "Acme-Ana-2026", "id": ANA_ID, "name": "Ana"}
    monkeypatch.setenv("CRMBRIDGE_CATALOG_FILES", str(HERE / "catalog.acme.yaml"))  # 1. the catalog entry
    get_settings.cache_clear()
    get_catalog.cache_clear()
    registry.register("acme-crm", AcmeCrmProvider)  # 3. the registry line (2. is the class itself)
    yield double
    registry.unregister("acme-crm")
    double.stop()
    get_settings.cache_clear()
    get_catalog.cache_clear()


def test_a_fourth_crm_needs_only_its_catalog_entry_class_and_registry_line(app_db, vault_keys, acme):
    policy = CrmUrlPolicy.vendors(sandbox_url=acme.base_url)  # the double is this test's only loopback origin
    transport = partial(HttpTransport, url_policy=policy)
    assert "Acme CRM" in [get_catalog().provider(s).name for s in get_catalog().slugs()]

    # onboarding: the tenant, the CRM account from the catalog's form, a user with their Acme identity
    with Session(app_db, expire_on_commit=False) as s:
        tenant = tenants.create_tenant(session=s, principal=STAFF, data={"name": "Acme Buyer", "slug": "buyer"})
        s.flush()
        account = service.add_crm_account(
            session=s, principal=STAFF, tenant_id=tenant.id, provider="acme-crm", edition="team", label="Acme",
            auth_mode="password", values={"instance_url": acme.base_url}, url_policy=policy)
        assert account.credential_mode == "per_user_password"
        user = tenants.create_app_user(session=s, principal=STAFF, tenant_id=tenant.id,
                                       data={"email": "ana@buyer.example", "name": "Ana"})
        s.flush()
        tenants.set_crm_identity(session=s, principal=STAFF, app_user_id=user.id, crm_account_id=account.id,
                                 crm_user_id=ANA_ID)
        url = links.create_connect_link(s, principal=STAFF, tenant_id=tenant.id, app_user_id=user.id,
                                        crm_account_id=account.id)
        s.commit()

    # the connect link: the form comes from the catalog, the real tester logs in at the double
    client = TestClient(Starlette(routes=connect_link_routes(tester=partial(test_link_login, transport=transport()))))
    token = url.rsplit("/", 1)[1]
    page = client.get(f"/connect/{token}")
    assert "Connect Acme CRM for Ana" in page.text and "Acme login" in page.text and "security_token" not in page.text
    csrf = re.search(r"name=csrf value='([^']+)'", page.text).group(1)  # type: ignore[union-attr]
    done = client.post(f"/connect/{token}", data={"csrf": csrf, "action": "store", "username": "ana@acme.example",
                                                  "password": "Acme-Ana-2026"})
    assert done.status_code == 200 and "Connected" in done.text, done.text
    assert "POST /api/login" in acme.state.requests

    # the connection test keeps the provider's typed licenses and quota; posture reads them
    with Session(app_db, expire_on_commit=False) as s:
        report = service.test_crm_account(session=s, principal=STAFF, account_id=account.id, transport=transport())
        s.commit()
        assert report.ok, report.failed_step
        assert report.licenses is not None and (report.licenses.total, report.licenses.used) == (10, 10)
        snap = gather_tenant(s, tenant.id, now=utcnow())
        assert snap is not None
        (acc_snap,) = snap.accounts
        assert acc_snap.facts.provider_name == "Acme CRM"
        assert acc_snap.licenses is not None and acc_snap.licenses.used == 10
        assert acc_snap.api_usage is not None and acc_snap.api_usage.limit == 1000
        rules = {f.rule for f in posture_of(snap).findings}
        assert "api_usage_high" in rules  # 95 % of the daily quota used, read as numbers, not text
        assert {"per_user_passwords", "no_spare_license"} <= rules  # 10 of 10 licenses used

    # sync: a change made in our app reaches the double as Ana, and the double's record comes back
    acme.state.opportunities["OPP-77"] = {"id": "OPP-77", "name": "Made in Acme", "stage": "Prospecting",
                                          "modified_at": utcnow().isoformat(), "last_modified_by": ANA_ID}
    with Session(app_db, expire_on_commit=False) as s:
        tenants.set_tenant_status(session=s, principal=STAFF, tenant_id=tenant.id, status="live")  # go live
        record_change(session=s, principal=Principal.system("app"), crm_account_id=account.id,
                      actor_app_user_id=user.id, fields={"name": "Made in our app", "stage": "Qualification"})
        ensure_jobs(s, now=utcnow(), tenant_id=tenant.id)
        s.commit()
    sync = SyncEngine(app_db, provider_factory=lambda ctx, credential: AcmeCrmProvider(
        account=ctx.account, credential=credential, transport=transport()))
    results = sync.run_due(limit=5)
    assert results, "no sync job was due for Ana's connected account"
    with Session(app_db) as s:
        names = {o.name for o in s.exec(select(SyncOpportunity).where(SyncOpportunity.crm_account_id == account.id))}
        assert {"Made in Acme", "Made in our app"} <= names
        assert all(e.status == "applied" for e in s.exec(select(SyncOutbox)))
        assert s.get(CrmAccount, account.id).status == "connected"
    pushed = [o for o in acme.state.opportunities.values() if o.get("name") == "Made in our app"]
    assert pushed and pushed[0]["last_modified_by"] == ANA_ID  # written with Ana's own login
