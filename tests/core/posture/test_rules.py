"""Each finding against catalog facts and snapshots built here (no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.posture.rules import Severity, Who, account_world, evaluate, tenant_world
from core.posture.snapshot import ApiUsage, Attribution, IdpCert, Licenses, SsoState, SyncAbility
from core.providers.catalog import get_catalog
from tests.core.posture.factories import (
    NOW,
    TESTED_SSO,
    account,
    api_cred,
    catalog_edition,
    dynamics_facts,
    facts,
    one,
    rules_of,
    tenant,
    text_of,
    user_cred,
)

# --- Salesforce Professional without the API add-on ------------------------------------------------


def test_professional_without_add_on_is_blocking_and_cites_the_catalog():
    prof = catalog_edition("salesforce", "professional")
    ent = catalog_edition("salesforce", "enterprise")
    assert prof.api_access.value == "add_on"  # the fact the rule rests on
    a = account(edition="professional", mode="per_user_password", api_enabled=False, last_test_ok=False,
                last_error_code="API_DISABLED_FOR_ORG", last_test_at=NOW - timedelta(hours=1))
    f = one(evaluate(tenant(a)), "api_not_available")
    assert f.severity == Severity.blocking and f.who == Who.sales
    assert "without the API add-on" in f.title
    assert "Buy the Salesforce API add-on" in f.action
    # the upgrade target and its numbers come from the Enterprise facts
    assert f"upgrade to Enterprise (API included, {ent.integration_user_licenses.value} free Integration" in f.action
    text = text_of(f)
    assert "API_DISABLED_FOR_ORG" in text
    assert prof.api_access.source.title in text
    assert f.world == "2013"


def test_professional_with_unconfirmed_add_on_is_still_blocking():
    a = account(edition="professional", mode="per_user_password")  # no connection test yet
    f = one(evaluate(tenant(a)), "api_not_available")
    assert "not confirmed" in text_of(f)


def test_professional_with_the_add_on_has_no_api_finding():
    a = account(edition="professional", mode="per_user_password", api_enabled=True, last_test_ok=True)
    assert "api_not_available" not in rules_of(evaluate(tenant(a)))


def test_enterprise_includes_the_api():
    assert catalog_edition("salesforce", "enterprise").api_access.value == "included"
    assert "api_not_available" not in rules_of(evaluate(tenant(account(edition="enterprise"))))


def test_edition_without_api_says_upgrade():
    assert catalog_edition("salesforce", "essentials").api_access.value == "none"
    f = one(evaluate(tenant(account(edition="essentials"))), "api_not_available")
    assert "has no API" in f.title and f.action.startswith("Upgrade to Enterprise")


# --- no spare license -----------------------------------------------------------------------------------


def test_no_spare_license_on_enterprise_uses_a_free_integration_user_and_lists_what_it_destroys():
    free = catalog_edition("salesforce", "enterprise").integration_user_licenses.value
    creds = (user_cred("tom@tinyco.example"), user_cred("uma@tinyco.example"),
             user_cred("old@tinyco.example", state="failed"), user_cred("oa@tinyco.example", kind="oauth_refresh"))
    a = account(mode="per_user_password", credentials=creds,
                licenses=Licenses(total=10, used=10, integration_total=free, integration_used=0))
    f = one(evaluate(tenant(a)), "no_spare_license")
    assert f.who == Who.tenant_admin
    assert f"free Salesforce Integration user license ({free} free)" in f.action
    assert "destroys the 2 stored passwords listed" in f.action
    # the failed one is not stored any more; an OAuth token is not destroyed by the switch
    assert f.affected == ("tom@tinyco.example", "uma@tinyco.example")
    assert "10 of 10 used, 0 spare" in text_of(f)
    # never a user's address in the headline or the action
    assert "@" not in f.title and "@" not in f.action


def test_no_spare_license_without_integration_read_uses_the_catalog_count():
    free = catalog_edition("salesforce", "enterprise").integration_user_licenses.value
    a = account(mode="per_user_password", licenses=Licenses(total=10, used=10))
    f = one(evaluate(tenant(a)), "no_spare_license")
    assert f"({free} free)" in f.action


def test_no_spare_license_when_integration_licenses_are_all_used_means_one_more_license():
    a = account(mode="per_user_password", licenses=Licenses(total=10, used=10, integration_total=5,
                                                             integration_used=5))
    f = one(evaluate(tenant(a)), "no_spare_license")
    assert f.who == Who.sales and "Buy one more Salesforce license" in f.action


def test_no_spare_license_on_professional_means_one_more_license():
    assert catalog_edition("salesforce", "professional").integration_user_licenses.value == 0
    a = account(edition="professional", mode="per_user_password", api_enabled=True,
                licenses=Licenses(total=5, used=5))
    f = one(evaluate(tenant(a)), "no_spare_license")
    assert f.who == Who.sales
    assert "Buy one more Salesforce license" in f.action
    assert "Salesforce Professional has no Integration user licenses" in f.action


def test_a_spare_license_or_an_api_user_is_no_finding():
    spare = account(mode="per_user_password", licenses=Licenses(total=10, used=9))
    api = account(mode="api_user", licenses=Licenses(total=10, used=10))
    assert "no_spare_license" not in rules_of(evaluate(tenant(spare, api)))


# --- per-user passwords on Salesforce -------------------------------------------------------------------


def test_stored_passwords_cite_the_soap_login_retirement_from_the_catalog():
    ret = get_catalog().provider("salesforce").auth_mode("password").retirement
    assert ret is not None and ret.date is not None
    a = account(mode="per_user_password", credentials=(user_cred("a@x.example"), user_cred("b@x.example")))
    f = one(evaluate(tenant(a)), "per_user_passwords")
    days = (ret.date - NOW.date()).days
    assert 0 < days <= 365 and f.severity == Severity.high
    text = text_of(f)
    assert f"{ret.when} ({ret.date.isoformat()}, in {days} days)" in text
    assert ret.source.title in text
    assert "per-user OAuth" in f.action and "free Salesforce Integration user license" in f.action
    assert f.affected == ("a@x.example", "b@x.example")
    assert f.who == Who.tenant_admin


def test_stored_passwords_more_than_a_year_before_retirement_are_medium():
    a = account(mode="per_user_password", credentials=(user_cred(),))
    early = datetime(2026, 1, 5, tzinfo=UTC)
    f = one(evaluate(tenant(a, now=early)), "per_user_passwords")
    assert f.severity == Severity.medium


def test_stored_passwords_on_professional_point_to_a_full_license_not_an_integration_user():
    a = account(edition="professional", mode="per_user_password", api_enabled=True)
    f = one(evaluate(tenant(a)), "per_user_passwords")
    assert "API user on a full license (Salesforce Professional has no free Integration user licenses)" in f.action
    assert "2013 world" in f.action


def test_leftover_passwords_after_moving_to_oauth_still_count():
    a = account(mode="per_user_oauth", credentials=(user_cred(kind="oauth_refresh"), user_cred(kind="password")))
    assert "per_user_passwords" in rules_of(evaluate(tenant(a)))
    clean = account(mode="per_user_oauth")
    assert "per_user_passwords" not in rules_of(evaluate(tenant(clean)))


# --- HubSpot legacy private app ------------------------------------------------------------------------


def test_hubspot_private_app_token_is_legacy():
    hub = get_catalog().provider("hubspot")
    sunset = next(r for r in hub.retirements if "private app" in r.what.lower())
    ef = facts("hubspot", "professional")
    legacy = account(label="HubSpot", provider="hubspot", edition="professional", ef=ef, auth_mode="api_token",
                     token_kind="private_app")
    f = one(evaluate(tenant(legacy)), "hubspot_private_app")
    assert f.severity == Severity.medium and f.who == Who.tenant_admin
    assert "OAuth app install" in f.action and "service key" in f.action
    text = text_of(f)
    assert sunset.source.title in text and sunset.when in text
    # the provider module's own mode name is recognised too
    old_name = account(label="HubSpot", provider="hubspot", edition="professional", ef=ef, auth_mode="private_app")
    assert "hubspot_private_app" in rules_of(evaluate(tenant(old_name)))


def test_hubspot_service_key_is_not_legacy():
    key = account(label="HubSpot", provider="hubspot", edition="professional", auth_mode="api_token",
                  token_kind="service_key")
    assert "hubspot_private_app" not in rules_of(evaluate(tenant(key)))


def test_hubspot_oauth_install_is_fine():
    ok = account(label="HubSpot", provider="hubspot", edition="professional", auth_mode="oauth_authorization_code")
    assert "hubspot_private_app" not in rules_of(evaluate(tenant(ok)))


# --- API user without attribution -----------------------------------------------------------------------


def test_salesforce_api_user_without_attribution_field():
    assert catalog_edition("salesforce", "enterprise").attribution.value.attribution_field is True
    f = one(evaluate(tenant(account())), "api_user_without_attribution")
    assert "\"Attribution field on Opportunity\"" in f.action  # the catalog's field names the object
    assert "attribution field: yes" in text_of(f)
    ok = account(attribution=Attribution(field="CrmBridge_Actor__c"))
    assert "api_user_without_attribution" not in rules_of(evaluate(tenant(ok)))


def test_dynamics_api_user_without_impersonation_is_told_to_turn_it_on():
    ef = dynamics_facts()
    off = account(label="Dynamics 365", provider="dynamics-365", edition=ef.edition, ef=ef,
                  attribution=Attribution(impersonation=False))
    f = one(evaluate(tenant(off)), "api_user_without_attribution")
    assert "Turn on impersonation" in f.action and "Delegate role" in f.action
    on = account(label="Dynamics 365", provider="dynamics-365", edition=ef.edition, ef=ef,
                 attribution=Attribution(impersonation=True))
    assert "api_user_without_attribution" not in rules_of(evaluate(tenant(on)))


def test_per_user_accounts_are_attributed_by_definition():
    assert "api_user_without_attribution" not in rules_of(evaluate(tenant(account(mode="per_user_oauth"))))


# --- SSO ---------------------------------------------------------------------------------------------


def test_sso_missing_untested_failing_and_tested():
    a = account(attribution=Attribution(field="X__c"))
    missing = one(evaluate(tenant(a, users=(4, 0))), "sso_missing")
    assert missing.who == Who.customer_success and "0 of 4" in text_of(missing)
    # the CRM's own SAML fact is cited: Professional has SAML today (unlike 2013)
    prof = account(edition="professional", mode="per_user_oauth", api_enabled=True)
    assert "SAML SSO into Salesforce Professional itself yes" in text_of(one(evaluate(tenant(prof)), "sso_missing"))

    untested = SsoState(configured=True)
    assert one(evaluate(tenant(a, sso=untested)), "sso_untested").severity == Severity.medium
    failing = SsoState(configured=True, tested_at=NOW - timedelta(days=9), last_test_ok=False)
    f = one(evaluate(tenant(a, sso=failing)), "sso_failing")
    assert f.severity == Severity.high and "last passed" in text_of(f)
    assert not {"sso_missing", "sso_untested", "sso_failing"} & set(rules_of(evaluate(tenant(a, sso=TESTED_SSO))))


# --- IdP certificate expiring -------------------------------------------------------------------------


def _sso_with(*days_left: int) -> SsoState:
    certs = tuple(IdpCert(sha256=f"{i:064x}", not_after=NOW + timedelta(days=d, hours=1), subject=f"CN=idp{i}")
                  for i, d in enumerate(days_left))
    return SsoState(configured=True, tested_at=NOW, last_test_ok=True, certs=certs)


def test_idp_certificate_thresholds():
    def sev(*days: int) -> list[str]:
        return [f.severity for f in evaluate(tenant(account(), sso=_sso_with(*days))) if f.rule == "idp_cert_expiring"]

    assert sev(120) == []
    assert sev(60) == [Severity.low]
    assert sev(20) == [Severity.medium]
    assert sev(5) == [Severity.high]
    assert sev(-2) == [Severity.high]
    assert sev(5, 400) == [Severity.low]  # rollover: a newer certificate is already trusted


def test_expiring_certificate_says_when_and_what_to_do():
    f = one(evaluate(tenant(account(), sso=_sso_with(20))), "idp_cert_expiring")
    assert "expires in 20 days" in f.title and "re-import the metadata" in f.action


# --- API usage ----------------------------------------------------------------------------------------


def _usage(used: int, limit: int = 110_000, rate: float | None = None) -> ApiUsage:
    from core.posture.snapshot import forecast_exhaustion

    return ApiUsage(used=used, limit=limit, window="24h rolling", observed_at=NOW, rate_per_hour=rate,
                    resets_at=NOW + timedelta(hours=24),
                    exhausts_at=forecast_exhaustion(used=used, limit=limit, observed_at=NOW, rate_per_hour=rate))


def test_api_usage_above_80_percent_cites_the_catalog_allocation():
    alloc = catalog_edition("salesforce", "enterprise").daily_api_allocation.value
    expected = alloc.for_licenses(10)
    a = account(api_usage=_usage(int(expected * 0.85), expected), licenses=Licenses(total=10, used=10))
    f = one(evaluate(tenant(a)), "api_usage_high")
    assert f.severity == Severity.medium and f.who == Who.customer_success
    text = text_of(f)
    assert f"= {expected:,} for 10 licenses" in text and "85%" in text
    assert f"{alloc.base:,} + {alloc.per_license:,} per license" in text


def test_api_usage_at_80_percent_or_below_is_fine_and_95_is_high():
    assert "api_usage_high" not in rules_of(evaluate(tenant(account(api_usage=_usage(88_000)))))
    assert one(evaluate(tenant(account(api_usage=_usage(105_000)))), "api_usage_high").severity == Severity.high


def test_api_usage_forecast_to_run_out_before_reset():
    # 50% used, 10,000 requests an hour: the other 55,000 go in 5.5 h, long before the 24 h window resets
    f = one(evaluate(tenant(account(api_usage=_usage(55_000, rate=10_000)))), "api_usage_forecast")
    assert f.severity == Severity.high and "runs out 2026-11-28 14:30 UTC" in text_of(f)
    # 1,000 an hour: 55 h, after the reset
    assert not {"api_usage_forecast", "api_usage_high"} & set(
        rules_of(evaluate(tenant(account(api_usage=_usage(55_000, rate=1_000))))))


def test_reported_limit_differing_from_the_formula_is_pointed_out():
    a = account(api_usage=_usage(100_000, 120_000), licenses=Licenses(total=10, used=10))
    assert "differs from the formula's 110,000" in text_of(one(evaluate(tenant(a)), "api_usage_high"))


# --- many credentials expiring at once ----------------------------------------------------------------


def test_many_credentials_expiring_in_the_same_week():
    creds = tuple(user_cred(f"u{i}@x.example", expires_at=NOW + timedelta(days=10, hours=i * 20)) for i in range(4))
    creds += (user_cred("late@x.example", expires_at=NOW + timedelta(days=80)),)
    f = one(evaluate(tenant(account(mode="per_user_oauth", credentials=creds))), "credentials_expiring_together")
    assert f.severity == Severity.medium
    assert "4 of 5 stored user credentials" in text_of(f)
    assert f.affected == tuple(f"u{i}@x.example" for i in range(4))
    soon = tuple(user_cred(f"s{i}@x.example", expires_at=NOW + timedelta(days=2, hours=i)) for i in range(3))
    assert one(evaluate(tenant(account(mode="per_user_oauth", credentials=soon))),
               "credentials_expiring_together").severity == Severity.high


def test_spread_out_or_few_expiries_are_fine():
    spread = tuple(user_cred(f"u{i}@x.example", expires_at=NOW + timedelta(days=3 + 9 * i)) for i in range(4))
    few = tuple(user_cred(f"f{i}@x.example", expires_at=NOW + timedelta(days=5)) for i in range(2))
    for creds in (spread, few):
        assert "credentials_expiring_together" not in rules_of(
            evaluate(tenant(account(mode="per_user_oauth", credentials=creds))))


# --- accounts that cannot sync ------------------------------------------------------------------------


def test_api_user_without_a_stored_credential_cannot_sync():
    f = one(evaluate(tenant(account(credentials=()))), "account_cannot_sync")
    assert f.severity == Severity.blocking and "Store the API user's credential" in f.action
    failed = one(evaluate(tenant(account(credentials=(api_cred(state="failed"),)))), "account_cannot_sync")
    assert failed.who == Who.tenant_admin and "Rotate" in failed.action


def test_sync_health_failing_blocks_the_account():
    a = account(sync=SyncAbility(can_sync=False, reason="3 runs failed in a row"))
    assert "3 runs failed in a row" in text_of(one(evaluate(tenant(a)), "account_cannot_sync"))


def test_no_crm_account_is_blocking():
    assert rules_of(evaluate(tenant())) == ["no_crm_account", "sso_missing"]


# --- which world --------------------------------------------------------------------------------------


def test_worlds_follow_the_catalog():
    free = catalog_edition("salesforce", "enterprise").integration_user_licenses.value
    prof = account_world(account(edition="professional", mode="per_user_password"))
    assert prof.key == "2013"
    assert "no API without the paid add-on" in prof.explanation
    assert "SAML single sign-on now works in this edition" in prof.explanation
    assert "retires Summer '27" in prof.explanation
    ent = account_world(account(edition="enterprise"))
    assert ent.key == "today" and f"{free} free API-only Integration user licenses" in ent.explanation
    mixed = tenant_world(tenant(account(edition="professional"), account(edition="enterprise")))
    assert mixed.key == "mixed"
    assert tenant_world(tenant()).key == "unknown"


def test_findings_are_sorted_most_severe_first():
    t = tenant(account(edition="professional", mode="per_user_password"), sso=SsoState(configured=True))
    ranks = [f.rank for f in evaluate(t)]
    assert ranks == sorted(ranks) and evaluate(t)[0].severity == Severity.blocking


def test_dynamics_and_hubspot_are_in_todays_world_with_free_api_users():
    dyn = get_catalog().provider("dynamics-365").edition("sales-enterprise")
    assert dyn.extra["application_users"].value is True
    w = account_world(account(provider="dynamics-365", edition="sales-enterprise"))
    assert w.key == "today" and "API users that need no paid license" in w.explanation
    hub = account_world(account(provider="hubspot", edition="professional"))
    assert hub.key == "today"


def test_hubspot_api_user_is_told_to_use_a_deal_property():
    assert catalog_edition("hubspot", "professional").attribution.value.attribution_field is True
    a = account(label="HubSpot", provider="hubspot", edition="professional", auth_mode="oauth_authorization_code")
    f = one(evaluate(tenant(a)), "api_user_without_attribution")
    assert '"Attribution property on Deal"' in f.action and "crb_actor" in f.action  # the catalog's field
