"""Attribution through an API user, against the sandbox over HTTPS with the real providers:
Dynamics 365 records the real user through impersonation; Salesforce gets the actor in the attribution
field when the tenant set one up; the audit log holds the real actor and ``via`` either way."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.clock import FrozenClock
from core.providers.registry import create_provider
from core.sync.engine import SyncEngine, VaultCredentials
from core.sync.models import OutboxStatus, RunStatus, SyncOutbox
from core.sync.outbox import record_change
from core.sync.scheduler import ensure_jobs
from core.tenants.access import Principal
from core.tenants.models import AppUser, AppUserCrmIdentity, AuditEvent, CrmAccount, Tenant
from core.vault import service as vault

SYSTEM = Principal.system("test")
DYN_TENANT = "6f1c2b9e-5d3a-4c1e-9b7a-d1c0de5a2026"
DYN_APP = ("0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a926", "demo-dynco-app-secret")
OLGA, BEN = "5d0c1e6a-0000-4000-8000-000000000001", "5d0c1e6a-0000-4000-8000-000000000002"
SF_APP = ("bigcorp-emea-integration", "demo-bigcorp-emea-secret")


def setup(db: Engine, clock: FrozenClock, *, provider: str, edition: str, instance_url: str,
          settings: dict[str, Any], secret: dict[str, str], crm_ids: list[str]) -> tuple[CrmAccount, list[AppUser]]:
    with Session(db, expire_on_commit=False) as s:
        t = Tenant(name="Attr", slug="attr", status="live")
        s.add(t)
        s.flush()
        acc = CrmAccount(tenant_id=t.id, provider=provider, edition=edition, label=provider,  # type: ignore[arg-type]
                         credential_mode="api_user", instance_url=instance_url, settings_json=json.dumps(settings))
        s.add(acc)
        s.flush()
        users = []
        for i, crm_id in enumerate(crm_ids):
            u = AppUser(tenant_id=t.id, email=f"rep{i}@attr.example", name=f"Rep {i}")  # type: ignore[arg-type]
            s.add(u)
            s.flush()
            s.add(AppUserCrmIdentity(app_user_id=u.id, crm_account_id=acc.id, crm_user_id=crm_id))  # type: ignore[arg-type]
            users.append(u)
        vault.put(s, principal=SYSTEM, tenant_id=t.id, purpose="crm-login", crm_account_id=acc.id,  # type: ignore[arg-type]
                  kind="client_secret", secret=json.dumps(secret), now=clock())
        ensure_jobs(s, now=clock())
        s.commit()
        return acc, users


def run(db: Engine, clock: FrozenClock, sandbox: Any) -> str:
    transport = sandbox.transport()
    engine = SyncEngine(db, clock=clock, credentials=VaultCredentials(db, clock=clock),
                        provider_factory=lambda ctx, cred: create_provider(
                            account=ctx.account, credential=cred, transport=transport))
    try:
        [result] = engine.run_due()
    finally:
        transport.close()  # no keep-alive connection left for the sandbox to wait on at shutdown
    return result.status


def change(db: Engine, clock: FrozenClock, acc: CrmAccount, user: AppUser, **fields: Any) -> str:
    with Session(db) as s:
        row = record_change(session=s, principal=SYSTEM, crm_account_id=acc.id, actor_app_user_id=user.id,  # type: ignore[arg-type]
                            fields=fields, now=clock())
        s.commit()
        return row.idempotency_key


def audit(db: Engine) -> list[AuditEvent]:
    with Session(db) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action.startswith("opportunity."))))  # type: ignore[attr-defined]


def test_dynamics_writes_impersonating_each_actor(file_engine: Engine, clock: FrozenClock, sandbox: Any,
                                                  vault_keys: Any) -> None:
    acc, (olga, ben) = setup(
        file_engine, clock, provider="dynamics-365", edition="sales-enterprise",
        instance_url=sandbox.url("/dynamics/dynco"),
        settings={"auth_mode": "oauth_client_credentials", "authority_url": sandbox.url("/entra"),
                  "graph_url": sandbox.url("/graph"), "tenant_id": DYN_TENANT, "client_id": DYN_APP[0],
                  "impersonation": "true"},
        secret={"client_secret": DYN_APP[1]}, crm_ids=[OLGA, BEN])
    assert run(file_engine, clock, sandbox) == RunStatus.success  # first pull
    k1 = change(file_engine, clock, acc, olga, name="Olga's deal", stage="Develop", amount="1200")
    k2 = change(file_engine, clock, acc, ben, name="Ben's deal", stage="Develop", amount="800")
    clock.advance(minutes=10)
    assert run(file_engine, clock, sandbox) == RunStatus.success
    rows = {r.get("crb_idempotencykey"): r for r in sandbox.inspect("dynco")["dynamics"]["opportunities"]}
    app_user = rows[k1]["_createdonbehalfby_value"]
    assert rows[k1]["_createdby_value"] == OLGA and rows[k2]["_createdby_value"] == BEN
    assert app_user and app_user not in (OLGA, BEN)  # written by the application user, on their behalf
    events = {json.loads(e.details)["idempotency_key"]: e for e in audit(file_engine)}
    assert events[k1].actor == olga.email and events[k1].via == "api-user"
    assert json.loads(events[k1].details)["impersonated_crm_user"] == OLGA


def test_dynamics_ignored_batch_impersonation_is_written_per_actor_and_audited(
        file_engine: Engine, clock: FrozenClock, sandbox: Any, vault_keys: Any) -> None:
    """Issue 13 point 4: an environment that ignores per-part CallerObjectId in $batch. The records end up
    attributed to each actor and the audit entry says which way they were written."""
    sandbox.http.post("/_sandbox/dynamics/dynco/behaviour",
                      json={"batch_part_impersonation": "ignored"}).raise_for_status()
    acc, (olga, ben) = setup(
        file_engine, clock, provider="dynamics-365", edition="sales-enterprise",
        instance_url=sandbox.url("/dynamics/dynco"),
        settings={"auth_mode": "oauth_client_credentials", "authority_url": sandbox.url("/entra"),
                  "graph_url": sandbox.url("/graph"), "tenant_id": DYN_TENANT, "client_id": DYN_APP[0],
                  "impersonation": "true"},
        secret={"client_secret": DYN_APP[1]}, crm_ids=[OLGA, BEN])
    assert run(file_engine, clock, sandbox) == RunStatus.success
    k1 = change(file_engine, clock, acc, olga, name="Olga's deal", stage="Develop", amount="1200")
    k2 = change(file_engine, clock, acc, ben, name="Ben's deal", stage="Develop", amount="800")
    clock.advance(minutes=10)
    assert run(file_engine, clock, sandbox) == RunStatus.success
    rows = {r.get("crb_idempotencykey"): r for r in sandbox.inspect("dynco")["dynamics"]["opportunities"]}
    assert rows[k1]["_modifiedby_value"] == OLGA and rows[k2]["_modifiedby_value"] == BEN
    assert rows[k1]["_modifiedonbehalfby_value"] not in (None, OLGA, BEN)
    events = {json.loads(e.details)["idempotency_key"]: json.loads(e.details) for e in audit(file_engine)}
    assert events[k1]["write_path"] == events[k2]["write_path"] == (
        "per-actor requests ($batch impersonation ignored)")


def test_salesforce_writes_the_actor_to_the_attribution_field(file_engine: Engine, clock: FrozenClock,
                                                              sandbox: Any, vault_keys: Any) -> None:
    acc, (ana, _) = setup(
        file_engine, clock, provider="salesforce", edition="enterprise", instance_url=sandbox.base_url,
        settings={"auth_mode": "oauth_client_credentials", "client_id": SF_APP[0],
                  "attribution_field": "CrmBridge_Actor__c"},
        secret={"client_id": SF_APP[0], "client_secret": SF_APP[1]}, crm_ids=["005BIGE000000001", "005BIGE000000002"])
    assert run(file_engine, clock, sandbox) == RunStatus.success
    key = change(file_engine, clock, acc, ana, name="Attributed deal", stage="Prospecting", amount="5000",
                 close_date="2027-02-28")
    clock.advance(minutes=10)
    assert run(file_engine, clock, sandbox) == RunStatus.success
    crm = sandbox.http.get("/_sandbox/salesforce/bigcorp-emea/opportunities").json()
    [rec] = [r for r in crm if r.get("CrmBridge_Key__c") == key]
    assert rec["CrmBridge_Actor__c"] == ana.email
    [ev] = audit(file_engine)
    assert ev.actor == ana.email and ev.via == "api-user"
    assert json.loads(ev.details)["attribution_field"] == "CrmBridge_Actor__c"
    with Session(file_engine) as s:
        assert s.exec(select(SyncOutbox)).one().status == OutboxStatus.applied
