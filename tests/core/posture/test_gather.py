"""gather: snapshots from the database rows other packages write, and from the catalog."""

from __future__ import annotations

import json
from datetime import timedelta

from core.posture.gather import edition_facts, gather_tenant, gather_tenants
from core.providers.catalog import get_catalog
from tests.conftest import make_app_user, make_crm_account, make_tenant
from tests.core.posture.factories import NOW
from tests.core.posture.seed import sso_config, store_cred


def test_edition_facts_carry_values_sources_and_the_upgrade_path():
    cat = get_catalog()
    ef = edition_facts("salesforce", "professional")
    assert ef.known and ef.edition_name == "Professional"
    api = ef.fact("api_access")
    assert api is not None and api.value == "add_on"
    assert api.source == cat.edition("salesforce", "professional").api_access.source.title
    assert ef.value("daily_api_allocation")["per_license"] == 1000
    assert ef.upgrade is not None and ef.upgrade.edition == "enterprise"
    assert ef.retirement_for("password") is not None
    assert edition_facts("salesforce", "enterprise").upgrade is None  # already includes the API
    unknown = edition_facts("nocrm", "gold")
    assert not unknown.known and unknown.fact("api_access") is None


def test_gather_reads_accounts_vault_sso_and_users(session):
    t = make_tenant(session, "acme")
    acc = make_crm_account(session, t, credential_mode="per_user_password")
    acc.settings_json = json.dumps({"auth_mode": "password"})
    acc.last_test_ok, acc.last_test_at = True, NOW - timedelta(hours=2)
    acc.last_test_summary = json.dumps({
        "licenses": {"total": 10, "used": 10, "integration_total": 5, "integration_used": 1},
        "api_usage": {"used": 90_000, "limit": 110_000, "window": "24h rolling", "rate_per_hour": 2_000},
    })
    ana = make_app_user(session, t, "ana@acme.example")
    bob = make_app_user(session, t, "bob@acme.example")
    bob.signs_in_by_sso = True
    store_cred(session, acc, user=ana, expires_at=NOW + timedelta(days=10))
    store_cred(session, acc, user=bob, state="failed")
    sso_config(session, t.id, now=NOW, tested=True, ok=True, cert_days=(20, 400))
    session.commit()

    snap = gather_tenant(session, t.id, now=NOW)
    assert snap is not None and snap.slug == "acme"
    assert (snap.users_total, snap.users_sso) == (2, 1)
    (a,) = snap.accounts
    assert a.credential_mode == "per_user_password" and a.auth_mode == "password"
    assert a.api_enabled is True and a.facts.edition == "enterprise"
    assert [c.user_label for c in a.stored_passwords(NOW)] == ["ana@acme.example"]  # bob's failed one is not
    assert a.licenses is not None and a.licenses.spare == 0 and a.licenses.integration_spare == 4
    u = a.api_usage
    assert u is not None and u.fraction > 0.8
    assert u.resets_at == NOW - timedelta(hours=2) + timedelta(hours=24)
    assert u.exhausts_at == NOW - timedelta(hours=2) + timedelta(hours=10)  # 20,000 left at 2,000/h
    assert snap.sso.tested and [c.not_after.date() for c in snap.sso.certs] == [
        (NOW + timedelta(days=20)).date(), (NOW + timedelta(days=400)).date()]


def test_gather_detects_api_disabled_and_attribution_settings(session):
    t = make_tenant(session, "prof")
    prof = make_crm_account(session, t, edition="professional", label="Prof", credential_mode="per_user_password")
    prof.last_test_ok = False
    prof.last_test_summary = "api_access failed: API_DISABLED_FOR_ORG"
    ent = make_crm_account(session, t, label="Ent")
    ent.settings_json = json.dumps({"attribution_field": "CrmBridge_Actor__c"})
    dyn = make_crm_account(session, t, provider="dynamics-365", edition="sales-enterprise", label="Dyn")
    dyn.settings_json = json.dumps({"impersonation": "false"})
    session.commit()
    snap = gather_tenant(session, t.id, now=NOW)
    assert snap is not None
    by = {a.label: a for a in snap.accounts}
    assert by["Prof"].api_enabled is False and by["Prof"].last_error_code == "API_DISABLED_FOR_ORG"
    assert by["Ent"].attribution.enabled and by["Ent"].attribution.field == "CrmBridge_Actor__c"
    assert not by["Dyn"].attribution.enabled


def test_professional_add_on_recorded_in_settings_counts_as_enabled(session):
    t = make_tenant(session, "prof2")
    acc = make_crm_account(session, t, edition="professional")
    acc.settings_json = json.dumps({"api_add_on": True})
    session.commit()
    snap = gather_tenant(session, t.id, now=NOW)
    assert snap is not None and snap.accounts[0].api_enabled is True


def test_gather_tenants_skips_offboarded_and_keeps_tenants_apart(session):
    a = make_tenant(session, "alpha")
    b = make_tenant(session, "beta")
    make_tenant(session, "gone", status="offboarded")
    acc_a = make_crm_account(session, a)
    store_cred(session, acc_a, kind="client_secret")
    make_crm_account(session, b)
    session.commit()
    snaps = {s.slug: s for s in gather_tenants(session, now=NOW)}
    assert set(snaps) == {"alpha", "beta"}
    assert len(snaps["alpha"].accounts[0].credentials) == 1
    assert snaps["beta"].accounts[0].credentials == ()


def test_gather_reads_licenses_and_quota_as_typed_data_never_from_step_text(session):
    """core.connections stores the provider's typed ``licenses`` and ``api_usage``; posture reads those.
    A step's English text (a vendor's wording, any language) is never parsed for numbers."""
    t = make_tenant(session, "rep")
    acc = make_crm_account(session, t, credential_mode="per_user_password")
    acc.last_test_ok, acc.last_test_at = True, NOW - timedelta(minutes=5)
    steps = [{"name": "reach", "ok": True, "detail": "answered"},
             {"name": "licenses", "ok": True,
              "detail": "10 of 10 Salesforce licenses used; 0 of 5 Integration licenses used"},
             {"name": "quota", "ok": True, "detail": "95,000 of 110,000 API requests used in the rolling 24 h (86%)"}]
    acc.last_test_summary = json.dumps({"ok": True, "steps": steps})
    session.commit()
    (a,) = gather_tenant(session, t.id, now=NOW).accounts  # type: ignore[union-attr]
    assert a.licenses is None and a.api_usage is None  # text only: nothing read

    acc.last_test_summary = json.dumps({"ok": True, "steps": steps,
                                        "licenses": {"total": 12, "used": 10, "integration_total": 5,
                                                     "integration_used": 0},
                                        "api_usage": {"used": 95_000, "limit": 110_000, "window": "24h rolling"}})
    session.add(acc)
    session.commit()
    (a,) = gather_tenant(session, t.id, now=NOW).accounts  # type: ignore[union-attr]
    assert a.licenses is not None and (a.licenses.total, a.licenses.used) == (12, 10)
    assert a.licenses.integration_spare == 5
    assert a.api_usage is not None and (a.api_usage.used, a.api_usage.limit) == (95_000, 110_000)
    assert a.api_usage.resets_at == NOW - timedelta(minutes=5) + timedelta(hours=24)


def test_sync_health_maps_to_sync_ability():
    from core.posture.gather import _sync_ability
    from core.sync.health import AccountHealth

    def h(**kw):  # type: ignore[no-untyped-def]
        return AccountHealth(crm_account_id=1, label="Main", provider="salesforce", credential_mode="api_user", **kw)

    assert _sync_ability(h()).can_sync is None  # no job yet
    assert _sync_ability(h(jobs=2, by_sync={"healthy": 1, "failing": 1})).can_sync is True
    failing = _sync_ability(h(jobs=2, by_sync={"failing": 2}))
    assert failing.can_sync is False and "3 runs in a row" in (failing.reason or "")
    paused = _sync_ability(h(jobs=1, by_sync={"paused": 1}, paused_by="cs@crmbridge.example",
                             pause_reason="customer asked"))
    assert paused.can_sync is False and paused.reason == "customer asked"
    waiting = _sync_ability(h(jobs=3, by_sync={"paused": 3}, by_auth={"reconnect needed": 3}))
    assert waiting.can_sync is False
    limited = _sync_ability(h(jobs=1, by_sync={"paused": 1}, paused_until=NOW + timedelta(hours=1)))
    assert limited.can_sync is None and "rate-limited" in (limited.reason or "")


def test_calendar_day_quota_resets_at_midnight(session):
    t = make_tenant(session, "hub")
    acc = make_crm_account(session, t, provider="hubspot", edition="professional")
    acc.last_test_ok, acc.last_test_at = True, NOW
    acc.last_test_summary = json.dumps({"api_usage": {"used": 600_000, "limit": 625_000, "window": "day"}})
    session.commit()
    snap = gather_tenant(session, t.id, now=NOW)
    assert snap is not None and snap.accounts[0].api_usage is not None
    assert snap.accounts[0].api_usage.resets_at == NOW.replace(hour=0) + timedelta(days=1)
