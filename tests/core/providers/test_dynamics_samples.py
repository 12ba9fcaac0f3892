"""Real material: the Dataverse Web API samples in ../shared/samples/dynamics that apply to the Web API
(the WhoAmI payload and the documented 404 error body) go through our provider and map as documented, and
the sandbox answers the same shapes. The Organization-service (SOAP) samples do not apply: this provider
speaks the Web API only.

In-process transports (httpx.MockTransport) serve the vendor's own bytes here; everything else runs against
the sandbox over HTTPS.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from core.errors import MalformedResponse, ProviderRejected, RecordError
from core.providers.config import AccountConfig, HttpTransport
from core.providers.dynamics import Dynamics365Provider, error_for_response, parse_whoami
from tests.conftest import samples_dir

pytestmark = pytest.mark.samples

WHOAMI = "webapi-whoami-response-prismatic-example-payload.json"
NOT_FOUND = "webapi-error-404-resource-not-found-learn-microsoft-excerpt.json"
ZERO = "00000000-0000-0000-0000-000000000000"


def sample(name: str) -> bytes:
    return (samples_dir("dynamics") / name).read_bytes()


def whoami_body() -> bytes:
    """The raw Web API body: the sample wraps it in Prismatic's ``{"data": ...}`` action-output envelope."""
    return json.dumps(json.loads(sample(WHOAMI))["data"]).encode()


def mock_provider(handler: Any) -> Dynamics365Provider:
    account = AccountConfig(provider="dynamics-365", edition="sales-enterprise",
                            instance_url="https://my-org.crm.dynamics.com",
                            settings={"tenant_id": "contoso.onmicrosoft.com", "client_id": ZERO})
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return Dynamics365Provider(account=account, credential={"client_secret": "s"},
                               transport=HttpTransport(httpx_client=client))


def token_or(handler: Any) -> Any:
    def route(request: httpx.Request) -> httpx.Response:
        if request.url.host == "login.microsoftonline.com":
            return httpx.Response(200, json={"token_type": "Bearer", "expires_in": 3599, "access_token": "t"})
        return handler(request)

    return route


def test_whoami_sample_parses_to_its_three_ids() -> None:
    body = json.loads(whoami_body())
    assert body["@odata.context"].endswith("$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse")
    assert parse_whoami(body) == {"UserId": ZERO, "BusinessUnitId": ZERO, "OrganizationId": ZERO}


def test_whoami_sample_through_the_provider() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        assert request.headers["Authorization"] == "Bearer t"
        assert request.headers["OData-Version"] == "4.0"
        return httpx.Response(200, content=whoami_body(),
                              headers={"Content-Type": "application/json; odata.metadata=minimal"})

    p = mock_provider(token_or(handler))
    assert p.whoami()["OrganizationId"] == ZERO
    assert seen == ["/api/data/v9.2/WhoAmI"]


def test_whoami_without_ids_is_malformed() -> None:
    body = json.loads(whoami_body())
    del body["UserId"]
    with pytest.raises(MalformedResponse):
        parse_whoami(body)


def test_documented_404_maps_to_a_rejection_naming_the_fix() -> None:
    resp = httpx.Response(404, content=sample(NOT_FOUND), headers={"Content-Type": "application/json"})
    err = error_for_response(resp)
    assert type(err) is ProviderRejected
    assert err.code == "0x8006088a"
    assert "Resource not found for the segment 'Account'." in str(err)
    assert "plural and lowercase" in str(err)


def test_documented_404_through_the_provider() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, content=sample(NOT_FOUND), headers={"Content-Type": "application/json"})

    p = mock_provider(token_or(handler))
    with pytest.raises(ProviderRejected) as exc:
        p.whoami()
    assert exc.value.code == "0x8006088a" and not isinstance(exc.value, RecordError)


def test_sandbox_answers_the_documented_404_body(sandbox: Any) -> None:
    """GET /api/data/v9.2/Account (wrong casing) in the sandbox gives Microsoft's documented answer."""
    token = sandbox.http.post("/entra/6f1c2b9e-5d3a-4c1e-9b7a-d1c0de5a2026/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": "0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a926",
        "client_secret": "demo-dynco-app-secret", "scope": sandbox.url("/dynamics/dynco/.default")}).json()
    r = sandbox.http.get("/dynamics/dynco/api/data/v9.2/Account",
                         headers={"Authorization": f"Bearer {token['access_token']}"})
    assert r.status_code == 404
    assert r.json() == json.loads(sample(NOT_FOUND))
    who = sandbox.http.get("/dynamics/dynco/api/data/v9.2/WhoAmI",
                           headers={"Authorization": f"Bearer {token['access_token']}"}).json()
    real = json.loads(whoami_body())
    assert set(who) == set(real)
    assert who["@odata.context"].split("$metadata")[1] == real["@odata.context"].split("$metadata")[1]

