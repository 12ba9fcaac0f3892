"""The provider catalog: every entry validates, facts carry sources and dates, forms come from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.errors import ConfigurationError, InvalidInput, NotFound
from core.providers.catalog import CATALOG_FILE, Fact, get_catalog, load_catalog


def test_catalog_loads_and_every_fact_has_a_source_and_date() -> None:
    cat = get_catalog()
    assert "salesforce" in cat.slugs()
    for slug in cat.slugs():
        p = cat.provider(slug)
        assert p.auth_modes, f"{slug} has no auth modes"
        assert p.editions, f"{slug} has no editions"
        for ed_slug, ed in p.editions.items():
            facts = ed.facts()
            for name in ("api_access", "saml_sso", "integration_user_licenses", "daily_api_allocation",
                         "rate_limits", "login_methods", "attribution"):
                assert name in facts, f"{slug}/{ed_slug} lacks {name}"
            for name, fact in facts.items():
                assert isinstance(fact, Fact)
                assert fact.source.url.startswith(("https://", "file://")), f"{slug}/{ed_slug}/{name}"
                assert fact.as_of.year >= 2026


def test_salesforce_edition_facts_match_the_team_notes() -> None:
    cat = get_catalog()
    pro = cat.edition("salesforce", "professional")
    ent = cat.edition("salesforce", "enterprise")
    assert pro.api_access.value == "add_on" and pro.api_access.verified
    assert ent.api_access.value == "included"
    assert pro.integration_user_licenses.value == 0 and ent.integration_user_licenses.value == 5
    assert ent.daily_api_allocation.value.for_licenses(10) == 110_000
    assert cat.edition("salesforce", "unlimited").daily_api_allocation.value.for_licenses(10) == 150_000
    assert ent.rate_limits.value.concurrent_long_running == 25
    sf = cat.provider("salesforce")
    legacy = sf.auth_mode("password")
    assert legacy.status == "retiring" and legacy.retirement is not None
    assert legacy.retirement.when == "Summer '27"
    assert any("password" in r.affects_auth_modes for r in sf.retirements)
    assert sf.detect_edition("Enterprise Edition") == "enterprise"
    assert sf.detect_edition("Professional Edition") == "professional"


def test_forms_come_from_the_catalog_and_secrets_are_split_out() -> None:
    cat = get_catalog()
    names = [f.name for f in cat.form_fields("salesforce", "oauth_client_credentials")]
    assert names[0] == "instance_url" and "client_secret" in names
    settings, secrets = cat.validate_values("salesforce", "oauth_client_credentials", {
        "instance_url": "https://acme.my.salesforce.com", "client_id": "3MVGabc",
        "client_secret": "s3cret", "external_id_field": "",
    })
    assert secrets == {"client_secret": "s3cret"}
    assert "s3cret" not in settings.values()
    assert settings["external_id_field"] == "CrmBridge_Key__c"  # default filled in
    with pytest.raises(InvalidInput, match="My Domain URL"):
        cat.validate_values("salesforce", "oauth_client_credentials", {
            "instance_url": "acme.my.salesforce.com", "client_id": "x", "client_secret": "y"})
    with pytest.raises(InvalidInput, match="Consumer secret is required"):
        cat.validate_values("salesforce", "oauth_client_credentials", {
            "instance_url": "https://acme.my.salesforce.com", "client_id": "x"})
    with pytest.raises(InvalidInput, match="Unexpected"):
        cat.validate_values("salesforce", "password", {"instance_url": "https://a.example", "evil": "1"})
    with pytest.raises(NotFound):
        cat.provider("zoho")


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base() -> dict:
    return yaml.safe_load(CATALOG_FILE.read_text())


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d["salesforce"]["editions"]["enterprise"]["api_access"].update(source="nowhere"),
         "unknown source id"),
        (lambda d: d["salesforce"]["editions"]["enterprise"]["api_access"].pop("as_of"), "as_of"),
        (lambda d: d["salesforce"]["editions"]["enterprise"]["api_access"].update(value="maybe"),
         "api_access"),
        (lambda d: d["salesforce"]["auth_modes"][0]["fields"][1].update(secret=False), "must be secret"),
        (lambda d: d["salesforce"]["auth_modes"][0].update(mode="carrier_pigeon"), "carrier_pigeon"),
        (lambda d: d["salesforce"]["editions"]["enterprise"]["login_methods"].update(value=["telepathy"]),
         "unknown auth modes"),
        (lambda d: d.update({"Bad_Slug": d["salesforce"]}), "kebab-case"),
    ],
)
def test_invalid_entries_are_refused(tmp_path: Path, mutate, words: str) -> None:
    data = _base()
    mutate(data)
    with pytest.raises(ConfigurationError, match=words):
        load_catalog([_write(tmp_path, data)])


def test_a_provider_defined_in_two_files_is_refused(tmp_path: Path) -> None:
    a = _write(tmp_path, _base())
    b = tmp_path / "catalog.salesforce.yaml"
    b.write_text(yaml.safe_dump({"salesforce": _base()["salesforce"]}))
    with pytest.raises(ConfigurationError, match="defined twice"):
        load_catalog([a, b])
