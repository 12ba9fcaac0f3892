"""Real HubSpot material (tests/fidelity/hubspot, sources in its SOURCES.md) through our parsers, and the
sandbox's answers to the same requests checked against it: status, key headers, field names, nesting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from core.errors import AuthenticationFailed, RecordError
from core.providers.base import OpportunityChange
from core.providers.config import AccountConfig, HttpTransport
from core.providers.hubspot import (
    HubSpotProvider,
    _invalid_properties,
    _named_inputs,
    _token_error,
    error_for_response,
)

HERE = Path(__file__).parent / "hubspot"
AUTH = {"Authorization": "Bearer demo-hubco-service-key"}
JSON_TYPES = {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict}


def load(name: str) -> Any:
    return json.loads((HERE / name).read_text())


DEALS = load("spec_crm_deals_v3_schemas.json")
OAUTH = load("spec_oauth_2026_03_introspect.json")


def conforms(value: dict[str, Any], schema: dict[str, Any], *, extra_ok: bool = False) -> list[str]:
    """What ``value`` lacks or has wrong against an OpenAPI object schema (required fields present, declared
    fields of the declared JSON type, no undeclared fields unless ``extra_ok``)."""
    problems = [f"missing {k}" for k in schema.get("required", []) if k not in value]
    props = schema.get("properties", {})
    for k, v in value.items():
        if k not in props:
            if not extra_ok and not schema.get("additionalProperties"):
                problems.append(f"undeclared {k}")
            continue
        want = JSON_TYPES.get(props[k].get("type", ""))
        if want is not None and v is not None and not isinstance(v, want):
            problems.append(f"{k} is {type(v).__name__}, spec says {props[k]['type']}")
    return problems


def _json(status: int, payload: Any) -> httpx.Response:
    return httpx.Response(status, json=payload, headers={"Content-Type": "application/json;charset=utf-8"})


def _oauth_provider(handler: Any) -> HubSpotProvider:
    account = AccountConfig(provider="hubspot", edition="professional", instance_url="https://api.hubapi.com",
                            auth_mode="oauth_authorization_code", settings={"client_id": "c"})
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return HubSpotProvider(account=account, credential={"client_secret": "s", "refresh_token": "r"},
                           transport=HttpTransport(httpx_client=client))


# ---------------------------------------------------------------------------- real bodies, our parsers
def test_real_v1_token_info_is_read_when_falling_back() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/oauth/v1/token":
            return _json(200, {"access_token": "a", "refresh_token": "r", "expires_in": 1800})
        if path == "/oauth/2026-03/token/introspect":
            return _json(404, {"status": "error", "message": "not found", "category": "OBJECT_NOT_FOUND"})
        if path.startswith("/oauth/v1/access-tokens/"):
            return _json(200, load("oauth_v1_access_token_info.json"))
        if path == "/account-info/v3/details":
            return _json(200, {"portalId": 62515})
        return _json(200, {"results": []})

    p = _oauth_provider(handler)
    report = p.test_connection()
    auth = next(s for s in report.steps if s.name == "authenticate")
    assert auth.ok and report.identity == "test@hubspot.com" and report.crm_user_id == "123"
    assert "3 scopes" in auth.detail and "fallback" in auth.detail and p.fallback_calls_made == 1


def test_real_error_bodies_map_to_errors_naming_the_fix() -> None:
    err = error_for_response(_json(400, load("error_validation_docs.json")))
    assert isinstance(err, RecordError) and err.code == "VALIDATION_ERROR"
    assert "human readable message" in str(err)
    oauth = _token_error(_json(400, load("error_oauth_v3_standardized.json")))
    assert isinstance(oauth, AuthenticationFailed) and oauth.code == "BAD_REFRESH_TOKEN" and "reinstall" in str(oauth)


def test_real_whole_batch_message_names_the_bad_input() -> None:
    message = (HERE / "batch_invalid_property_message_issue174.txt").read_text().strip()
    details = _invalid_properties(_json(400, {"status": "error", "message": message, "category": "VALIDATION_ERROR"}))
    assert details == [{"isValid": False, "message": "Email address name@domain.<INVALID TLD> is invalid",
                        "error": "INVALID_EMAIL", "name": "email"}]
    items = [(i, OpportunityChange(f"k{i}", {}), {"properties": {"email": e}})
             for i, e in enumerate(["a@example.com", "name@domain.<INVALID TLD>", "b@example.org"])]
    assert _named_inputs(details, items) == {1}


# ---------------------------------------------------------------------------- the sandbox, same shape
def test_sandbox_batch_upsert_answer_matches_the_spec(sandbox: Any) -> None:
    inputs = [{"idProperty": "crb_idempotency_key", "id": f"fid-{i}", "objectWriteTraceId": f"t{i}",
               "properties": {"dealname": f"F {i}", "dealstage": "qualifiedtobuy"}} for i in range(3)]
    r = sandbox.http.post("/hubspot/crm/v3/objects/deals/batch/upsert", json={"inputs": inputs}, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert "X-HubSpot-RateLimit-Max" in r.headers and "X-HubSpot-RateLimit-Remaining" in r.headers
    answer = r.json()
    assert conforms(answer, DEALS["BatchResponseSimplePublicUpsertObject"]) == []
    for result in answer["results"]:
        assert conforms(result, DEALS["SimplePublicUpsertObject"]) == []
        assert "crb_idempotency_key" not in result["properties"]  # the spec does not promise the echo
    assert sorted(x["objectWriteTraceId"] for x in answer["results"]) == ["t0", "t1", "t2"]


def test_sandbox_whole_batch_400_matches_the_spec_error(sandbox: Any) -> None:
    inputs = [{"idProperty": "crb_idempotency_key", "id": "fid-bad", "properties": {"amount": "lots"}}]
    r = sandbox.http.post("/hubspot/crm/v3/objects/deals/batch/upsert", json={"inputs": inputs}, headers=AUTH)
    assert r.status_code == 400
    answer = r.json()
    assert conforms(answer, DEALS["Error"], extra_ok=True) == []
    assert answer["status"] == "error"  # as in the docs' example body and #174
    for detail in answer["errors"]:
        assert conforms(detail, DEALS["ErrorDetail"]) == []
    real = (HERE / "batch_invalid_property_message_issue174.txt").read_text().strip()
    prefix = "Property values were not valid: "
    assert answer["message"].startswith(prefix) and real.startswith(prefix)
    ours_detail = json.loads(answer["message"][len(prefix):])[0]
    real_detail = json.loads(real[len(prefix):])[0]
    assert list(ours_detail) == list(real_detail)  # isValid, message, error, name — same keys, same order
    docs = load("error_validation_docs.json")
    assert set(docs) <= set(answer) | {"errors"}


def test_sandbox_search_answer_matches_the_spec(sandbox: Any) -> None:
    r = sandbox.http.post("/hubspot/crm/v3/objects/deals/search", headers=AUTH,
                          json={"limit": 2, "properties": ["dealname", "hs_lastmodifieddate"]})
    assert r.status_code == 200
    answer = r.json()
    assert conforms(answer, DEALS["CollectionResponseWithTotalSimplePublicObject"]) == []
    for result in answer["results"]:
        assert conforms(result, DEALS["SimplePublicObject"]) == []
    assert set(answer["paging"]["next"]) >= {"after"}


def test_sandbox_introspection_matches_the_2026_03_spec(sandbox: Any) -> None:
    token = sandbox.http.post("/hubspot/oauth/v1/token", data={
        "grant_type": "refresh_token", "client_id": "crmbridge-hubspot-app",
        "client_secret": "demo-hubspot-app-secret", "refresh_token": "demo-hubco-refresh-token"}).json()["access_token"]
    op = OAUTH["paths./oauth/2026-03/token/introspect"]["post"]
    form = set(op["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]["properties"])
    sent = {"client_id": "crmbridge-hubspot-app", "client_secret": "demo-hubspot-app-secret", "token": token,
            "token_type_hint": "access_token"}
    assert set(sent) == form
    r = sandbox.http.post("/hubspot/oauth/2026-03/token/introspect", data=sent)
    assert r.status_code == 200
    answer = r.json()
    assert conforms(answer, OAUTH["PublicAccessTokenInfoResponse"]) == []
    assert answer["active"] is True and answer["token_use"] == "access_token"
    # The v1 answer it replaces, real and ours: the same field names and types.
    v1 = sandbox.http.get(f"/hubspot/oauth/v1/access-tokens/{token}")
    real = load("oauth_v1_access_token_info.json")
    assert v1.status_code == 200
    assert {k: type(v) for k, v in real.items()} == {k: type(v1.json().get(k)) for k in real}
