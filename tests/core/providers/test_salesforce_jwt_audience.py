"""Salesforce JWT bearer audience (issue 13, point 9): Salesforce accepts only its login host as ``aud`` —
https://login.salesforce.com for production and Developer Edition orgs, https://test.salesforce.com for
sandboxes (Salesforce Help, "OAuth 2.0 JWT Bearer Flow for Server-to-Server Integration") — and answers
anything else with ``invalid_grant`` / ``audience is invalid``. The sandbox plays that; the provider derives
the audience from the org's My Domain host, with the account's ``jwt_audience`` field to override it."""

from __future__ import annotations

from typing import Any

import jwt as pyjwt
import pytest
from pydantic import SecretStr

from core.errors import AuthenticationFailed
from core.providers.catalog import get_catalog
from core.providers.config import AccountConfig
from core.providers.salesforce import SalesforceProvider, jwt_audience_for
from tests.core.providers.test_salesforce import _rsa_and_cert

ORG = "bigcorp-emea"


def _jwt_provider(sandbox: Any, key: str, **settings: Any) -> SalesforceProvider:
    account = AccountConfig(provider="salesforce", edition="enterprise", instance_url=sandbox.base_url,
                            credential_mode="api_user", auth_mode="jwt_bearer",
                            settings={"client_id": f"{ORG}-integration", "username": f"integration@{ORG}.example",
                                      **settings})
    return SalesforceProvider(account=account, credential={"private_key": SecretStr(key)},
                              transport=sandbox.transport())


@pytest.fixture
def key(sandbox: Any) -> str:
    pem, cert = _rsa_and_cert()
    sandbox.http.post(f"/_sandbox/salesforce/{ORG}/apps/{ORG}-integration/certificate", content=cert).raise_for_status()
    return pem


def _assertion(key: str, aud: str) -> str:
    import time

    return pyjwt.encode({"iss": f"{ORG}-integration", "sub": f"integration@{ORG}.example", "aud": aud,
                         "exp": int(time.time()) + 120}, key, algorithm="RS256")


def test_sandbox_accepts_only_the_login_host_of_the_org_type(sandbox: Any, key: str) -> None:
    def grant(aud: str) -> Any:
        return sandbox.http.post("/services/oauth2/token", data={
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": _assertion(key, aud)})

    assert grant("https://login.salesforce.com").status_code == 200
    for wrong in ("https://test.salesforce.com", sandbox.base_url, "https://acme.my.salesforce.com"):
        r = grant(wrong)
        assert r.status_code == 400
        assert r.json() == {"error": "invalid_grant", "error_description": "audience is invalid"}
    sandbox.http.post(f"/_sandbox/salesforce/{ORG}/org-type", json={"org_type": "sandbox"}).raise_for_status()
    assert grant("https://test.salesforce.com").status_code == 200
    assert grant("https://login.salesforce.com").json()["error_description"] == "audience is invalid"


def test_production_org_signs_in_with_the_derived_audience(sandbox: Any, key: str) -> None:
    report = _jwt_provider(sandbox, key).test_connection()
    assert report.ok, report.failed_step


def test_sandbox_org_needs_test_salesforce_com_and_says_so(sandbox: Any, key: str) -> None:
    sandbox.http.post(f"/_sandbox/salesforce/{ORG}/org-type", json={"org_type": "sandbox"}).raise_for_status()
    # The emulator's host (127.0.0.1) does not show the org type, so the derived audience is the production
    # one: refused, with the fix named.
    with pytest.raises(AuthenticationFailed) as exc:
        _jwt_provider(sandbox, key).list_users()
    assert exc.value.code == "invalid_audience" and "audience is invalid" in str(exc.value)
    assert "https://test.salesforce.com" in str(exc.value) and "Login host" in str(exc.value)
    # The account field overrides it.
    report = _jwt_provider(sandbox, key, jwt_audience="https://test.salesforce.com").test_connection()
    assert report.ok, report.failed_step


@pytest.mark.parametrize(("url", "audience"), [
    ("https://acme.my.salesforce.com", "https://login.salesforce.com"),
    ("https://acme-dev-ed.develop.my.salesforce.com", "https://login.salesforce.com"),
    ("https://acme--uat.sandbox.my.salesforce.com", "https://test.salesforce.com"),
    ("https://ACME--UAT.sandbox.my.salesforce.com/", "https://test.salesforce.com"),
    ("https://acme--uat.cs42.my.salesforce.com", "https://test.salesforce.com"),
    ("https://cs42.salesforce.com", "https://test.salesforce.com"),
    ("https://speed-fun-1234.scratch.my.salesforce.com", "https://test.salesforce.com"),
    ("https://test.salesforce.com", "https://test.salesforce.com"),
    ("https://login.salesforce.com", "https://login.salesforce.com"),
])
def test_audience_is_derived_from_the_my_domain_host(url: str, audience: str) -> None:
    assert jwt_audience_for(url) == audience
    assert jwt_audience_for(url, "https://acme.my.site.com/customers/") == "https://acme.my.site.com/customers"


def test_the_assertion_carries_the_derived_audience() -> None:
    pem, _ = _rsa_and_cert()
    account = AccountConfig(provider="salesforce", edition="enterprise",
                            instance_url="https://acme--uat.sandbox.my.salesforce.com", credential_mode="api_user",
                            auth_mode="jwt_bearer", settings={"client_id": "c", "username": "u@acme.example"})
    p = SalesforceProvider(account=account, credential={"private_key": SecretStr(pem)}, transport=None)  # type: ignore[arg-type]
    claims = pyjwt.decode(p._jwt_assertion(), options={"verify_signature": False})
    assert claims["aud"] == "https://test.salesforce.com"


def test_catalog_offers_the_override_field() -> None:
    field = next(f for f in get_catalog().provider("salesforce").account_fields if f.name == "jwt_audience")
    assert not field.required and field.check("https://test.salesforce.com") == "https://test.salesforce.com"
