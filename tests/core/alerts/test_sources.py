"""Each alert rule end to end from the other packages' real data (vault, sync, SSO, posture's quota
reads) through ``run_alerts``: it fires once, stays quiet while the condition holds, and recovers."""

from __future__ import annotations

import json
from datetime import timedelta

from core.alerts import service
from core.sso.models import SsoConfig
from core.sync.models import SyncJob
from core.tenants.access import Principal
from core.vault import service as vault
from tests.conftest import make_crm_account
from tests.fixtures.vault import make_vault_world

SYSTEM = Principal.system("test")


def _run(session, now, rule):
    r = service.run_alerts(session=session, principal=SYSTEM, now=now, deliver=False)
    assert r.skipped == []  # every source read its package's data
    return [(n.kind, n.level) for n in r.notices if n.rule == rule]


def test_api_user_authentication_failed_and_recovered(session, tenant, staff, clock, vault_keys):
    acc = make_crm_account(session, tenant, credential_mode="api_user")
    ref = vault.put(session, principal=staff, tenant_id=tenant.id, crm_account_id=acc.id, purpose="crm-login",
                    secret="client-secret-1", kind="client_secret", now=clock())
    session.commit()
    assert _run(session, clock(), "api_user_auth") == []
    assert vault.report_auth_failure(session, ref, principal=staff, now=clock()) == "failed"
    assert _run(session, clock(), "api_user_auth") == [("fired", "")]
    clock.advance(hours=1)
    assert _run(session, clock(), "api_user_auth") == []
    vault.put(session, principal=staff, tenant_id=tenant.id, crm_account_id=acc.id, purpose="crm-login",
              secret="client-secret-2", kind="client_secret", now=clock())
    session.commit()
    assert _run(session, clock(), "api_user_auth") == [("recovered", "")]


def test_credentials_destroyed_in_bulk(session, tenant, staff, clock, vault_keys):
    world = make_vault_world(session, tenant, users=3)
    refs = [vault.put(session, principal=staff, tenant_id=tenant.id, crm_account_id=world.account.id,
                      app_user_id=u.id, purpose="crm-login", secret=f"pw-{u.id}", now=clock()) for u in world.users]
    session.commit()
    for ref in refs[:2]:
        vault.report_auth_failure(session, ref, principal=staff, now=clock())
    assert _run(session, clock(), "credentials_destroyed") == []  # 2 is below the threshold of 3
    vault.report_auth_failure(session, refs[2], principal=staff, now=clock.advance(minutes=5))
    assert _run(session, clock(), "credentials_destroyed") == [("fired", "")]
    assert _run(session, clock.advance(hours=2), "credentials_destroyed") == []
    assert _run(session, clock.advance(hours=23), "credentials_destroyed") == [("recovered", "")]


def test_credentials_expiring_in_bulk(session, tenant, staff, clock, vault_keys):
    world = make_vault_world(session, tenant, users=3)
    for u in world.users:
        vault.put(session, principal=staff, tenant_id=tenant.id, crm_account_id=world.account.id, app_user_id=u.id,
                  purpose="crm-login", secret=f"pw-{u.id}", now=clock())
    session.commit()
    assert _run(session, clock(), "credentials_expiring") == []  # idle limit 14 days away
    assert _run(session, clock.advance(days=8), "credentials_expiring") == [("fired", "")]
    assert _run(session, clock.advance(days=1), "credentials_expiring") == []


def test_sync_failing_after_damping_then_recovered(session, tenant, clock):
    acc = make_crm_account(session, tenant, credential_mode="api_user")
    job = SyncJob(tenant_id=tenant.id, crm_account_id=acc.id, owner_key="account", next_run_at=clock(),
                  consecutive_failures=2, last_success_at=clock(), created_at=clock(),
                  last_error="The CRM could not be reached")
    session.add(job)
    session.commit()
    assert _run(session, clock(), "sync_failing") == []  # two failures in a row are not "failing"
    job.consecutive_failures = 3
    session.add(job)
    session.commit()
    assert _run(session, clock(), "sync_failing") == [("fired", "")]
    job.consecutive_failures = 4
    session.add(job)
    session.commit()
    assert _run(session, clock(), "sync_failing") == []
    job.consecutive_failures, job.last_success_at = 0, clock.advance(minutes=5)
    session.add(job)
    session.commit()
    assert _run(session, clock(), "sync_failing") == [("recovered", "")]


def _cert(sha: str, not_after) -> dict:
    return {"use": "signing", "subject": "CN=idp.acme.example", "sha256": sha, "der_b64": "",
            "not_before": (not_after - timedelta(days=365)).isoformat(), "not_after": not_after.isoformat()}


def test_idp_certificate_expiring_in_90_30_7_days(session, tenant, clock):
    cfg = SsoConfig(tenant_id=tenant.id, idp_entity_id="https://idp.acme.example", sso_url="https://idp/sso",
                    sso_binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST", metadata_xml="<x/>",
                    metadata_sha256="0" * 64, certs_json=json.dumps([_cert("ab" * 32, clock() + timedelta(days=40))]))
    session.add(cfg)
    session.commit()
    assert _run(session, clock(), "idp_cert_expiring") == [("fired", "90")]
    assert _run(session, clock.advance(days=5), "idp_cert_expiring") == []
    assert _run(session, clock.advance(days=6), "idp_cert_expiring") == [("escalated", "30")]
    assert _run(session, clock.advance(days=23), "idp_cert_expiring") == [("escalated", "7")]
    cfg.certs_json = json.dumps([_cert("cd" * 32, clock() + timedelta(days=700))])  # rolled over
    session.add(cfg)
    session.commit()
    assert _run(session, clock(), "idp_cert_expiring") == [("recovered", "7")]


def test_crm_quota_above_80_percent_or_forecast_to_run_out(session, tenant, clock):
    acc = make_crm_account(session, tenant)

    def usage(used: int, rate: float | None = None) -> None:
        acc.last_test_summary = json.dumps({"api_usage": {
            "used": used, "limit": 100_000, "window": "24h rolling", "observed_at": clock().isoformat(),
            **({"rate_per_hour": rate} if rate else {})}})
        session.add(acc)
        session.commit()

    usage(50_000)
    assert _run(session, clock(), "crm_quota") == []
    usage(85_000)
    assert _run(session, clock(), "crm_quota") == [("fired", "above")]
    usage(86_000)
    assert _run(session, clock(), "crm_quota") == []
    usage(90_000, rate=5_000)  # 10,000 left at 5,000/h: gone in 2 h, long before the window resets
    assert _run(session, clock(), "crm_quota") == [("escalated", "forecast")]
    usage(20_000, rate=100)
    assert _run(session, clock(), "crm_quota") == [("recovered", "forecast")]
