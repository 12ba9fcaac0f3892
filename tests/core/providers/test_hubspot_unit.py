"""HubSpot provider mapping rules that need no server: fields, errors, odd answers, configuration."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from core.errors import (
    ConfigurationError,
    MalformedResponse,
    ProviderUnavailable,
    RateLimited,
    RecordError,
    SessionExpired,
)
from core.providers.config import AccountConfig, HttpTransport
from core.providers.hubspot import (
    HubSpotProvider,
    error_for_response,
    opportunity_from_object,
    properties_from_fields,
)


def provider(handler: Any, *, mode: str = "api_token", credential: dict[str, str] | None = None,
             max_bytes: int = 1000) -> HubSpotProvider:
    account = AccountConfig(provider="hubspot", edition="professional", instance_url="https://api.hubapi.com",
                            auth_mode=mode, settings={"token_kind": "service_key", "client_id": "c"})
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return HubSpotProvider(account=account, credential={"token": "k"} if credential is None else credential,
                           transport=HttpTransport(httpx_client=client, max_response_bytes=max_bytes))


def test_fields_map_to_deal_properties_and_back() -> None:
    props = properties_from_fields({"name": "D", "stage": "closedwon", "amount": Decimal("10.50"),
                                    "close_date": date(2027, 1, 31), "owner_id": 101, "description": None})
    assert props == {"dealname": "D", "dealstage": "closedwon", "amount": "10.50", "closedate": "2027-01-31",
                     "hubspot_owner_id": "101", "description": ""}
    opp = opportunity_from_object({"id": "9", "properties": {
        "dealname": "D", "dealstage": "closedwon", "amount": "10.5", "closedate": "2027-01-31T00:00:00Z",
        "hubspot_owner_id": "101", "hs_lastmodifieddate": "1764320400000", "crb_idempotency_key": "k"}})
    assert (opp.amount, opp.close_date, opp.owner_id, opp.external_key) == (Decimal("10.5"), date(2027, 1, 31),
                                                                            "101", "k")
    assert opp.modified_at == datetime.fromtimestamp(1764320400, UTC)


def test_error_mapping_by_status_category_and_policy() -> None:
    ten = error_for_response(httpx.Response(429, json={"policyName": "TEN_SECONDLY_ROLLING"},
                                            headers={"X-HubSpot-RateLimit-Interval-Milliseconds": "10000"}))
    assert isinstance(ten, RateLimited) and ten.retry_after == 10
    search = error_for_response(httpx.Response(429, json={"policyName": "SECONDLY"}))
    assert isinstance(search, RateLimited) and search.retry_after == 1
    assert isinstance(error_for_response(httpx.Response(401, json={"category": "EXPIRED_AUTHENTICATION"})),
                      SessionExpired)
    assert isinstance(error_for_response(httpx.Response(502)), ProviderUnavailable)
    assert isinstance(error_for_response(httpx.Response(400, json={"category": "VALIDATION_ERROR"})), RecordError)


def test_configuration_errors_name_what_is_missing() -> None:
    with pytest.raises(ConfigurationError, match="Install the app in HubSpot"):
        provider(lambda r: httpx.Response(200), mode="oauth_authorization_code", credential={"client_secret": "s"})
    with pytest.raises(ConfigurationError, match="service key"):
        provider(lambda r: httpx.Response(200), credential={})


def test_html_truncated_and_oversized_answers_are_malformed() -> None:
    answers = [
        httpx.Response(200, text="<html>Maintenance</html>", headers={"Content-Type": "text/html"}),
        httpx.Response(200, content=b'{"portalId": 4', headers={"Content-Type": "application/json"}),
        httpx.Response(200, content=b" " * 5000, headers={"Content-Type": "application/json"}),
    ]
    for answer in answers:
        with pytest.raises(MalformedResponse):
            provider(lambda r, a=answer: a).account_details()


def test_refused_connection_is_unavailable() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(ProviderUnavailable):
        provider(refused).account_details()


def test_batch_results_are_matched_by_trace_id_not_by_an_echoed_key_or_position() -> None:
    # The spec's SimplePublicUpsertObject carries objectWriteTraceId; it promises neither an echo of the
    # idProperty value nor input order. These results have no key and come back reversed.
    sent: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        inputs = json.loads(request.content)["inputs"]
        sent.extend(inputs)
        return httpx.Response(200, json={"status": "COMPLETE", "results": [
            {"id": "2", "properties": {"hs_object_id": "2"}, "new": True, "objectWriteTraceId": "b"},
            {"id": "1", "properties": {"hs_object_id": "1"}, "new": False, "objectWriteTraceId": "a"},
        ]}, headers={"Content-Type": "application/json"})

    from core.providers.base import OpportunityChange

    res = provider(handler).push_opportunities([OpportunityChange("a", {"name": "A"}),
                                                OpportunityChange("b", {"name": "B"})])
    assert [(r.idempotency_key, r.crm_id, r.created) for r in res] == [("a", "1", False), ("b", "2", True)]
    assert [i["objectWriteTraceId"] for i in sent] == ["a", "b"]


def _strict_hubspot(bad: set[str], *, quote_value: bool) -> tuple[Any, list[int]]:
    """A HubSpot stand-in that fails a whole batch for any input whose amount is in ``bad`` (400, the first
    invalid input's errors only), as Atlas-Authority/marketing-automation#174 shows."""
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        inputs = json.loads(request.content)["inputs"]
        sizes.append(len(inputs))
        for inp in inputs:
            amount = inp["properties"].get("amount")
            if amount in bad:
                text = f"{amount} was not a valid number." if quote_value else "The value was not a valid number."
                detail = json.dumps([{"isValid": False, "message": text, "error": "INVALID_FLOAT", "name": "amount"}])
                return httpx.Response(400, json={
                    "status": "error", "message": f"Property values were not valid: {detail}",
                    "correlationId": "c0ffee00-0000-4000-8000-000000000000", "category": "VALIDATION_ERROR",
                    "errors": [{"message": text, "code": "INVALID_FLOAT"}], "context": {}},
                    headers={"Content-Type": "application/json"})
        return httpx.Response(200, json={"status": "COMPLETE", "results": [
            {"id": str(1000 + n), "properties": {}, "new": True, "objectWriteTraceId": inp["objectWriteTraceId"]}
            for n, inp in enumerate(inputs)]}, headers={"Content-Type": "application/json"})

    return handler, sizes


def test_a_whole_batch_400_is_split_until_only_the_bad_input_fails() -> None:
    from core.providers.base import OpportunityChange

    batch = [OpportunityChange(f"k{i}", {"name": f"N{i}", "amount": "oops" if i == 5 else str(i)})
             for i in range(16)]
    # The message names no value we can match: halving finds the bad input.
    handler, sizes = _strict_hubspot({"oops"}, quote_value=False)
    p = provider(handler, max_bytes=100_000)
    res = p.push_opportunities(batch)
    assert [r.idempotency_key for r in res if not r.ok] == ["k5"]
    assert all(r.ok and r.crm_id for r in res if r.idempotency_key != "k5")
    assert sizes == [16, 8, 4, 4, 2, 1, 1, 2, 8]
    assert p.calls_made == 9 and p.fallback_calls_made == 8
    # When the message quotes the value, the input is named at once: one extra call.
    handler, sizes = _strict_hubspot({"oops"}, quote_value=True)
    p = provider(handler, max_bytes=100_000)
    res = p.push_opportunities(batch)
    assert [r.idempotency_key for r in res if not r.ok] == ["k5"] and sizes == [16, 15]
    assert p.fallback_calls_made == 1


def test_a_400_that_is_not_about_property_values_fails_the_batch_without_retries() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json={"status": "error", "message": "Duplicate IDs found in batch input: [a]",
                                         "correlationId": "x", "category": "VALIDATION_ERROR"},
                              headers={"Content-Type": "application/json"})

    from core.providers.base import OpportunityChange

    res = provider(handler).push_opportunities([OpportunityChange("a", {"name": "A"}),
                                                OpportunityChange("b", {"name": "B"})])
    assert len(calls) == 1 and not any(r.ok for r in res) and "Duplicate IDs" in (res[0].error or "")


def test_a_rotated_refresh_token_is_handed_back_for_the_vault() -> None:
    saved: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/v1/token":
            return httpx.Response(200, json={"access_token": "a", "refresh_token": "rotated", "expires_in": 1800})
        return httpx.Response(200, json={"portalId": 1}, headers={"Content-Type": "application/json"})

    account = AccountConfig(provider="hubspot", edition="professional", instance_url="https://api.hubapi.com",
                            auth_mode="oauth_authorization_code", settings={"client_id": "c"})
    p = HubSpotProvider(account=account, credential={"client_secret": "s", "refresh_token": "old"},
                        transport=HttpTransport(httpx_client=httpx.Client(transport=httpx.MockTransport(handler))),
                        on_credential_update=saved.append)
    p.account_details()
    assert saved == [{"refresh_token": "rotated"}]


def test_an_access_token_from_the_install_is_used_before_refreshing() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"portalId": 7}, headers={"Content-Type": "application/json"})

    account = AccountConfig(provider="hubspot", edition="professional", instance_url="https://api.hubapi.com",
                            auth_mode="oauth_authorization_code", settings={"client_id": "c"})
    p = HubSpotProvider(account=account, credential={"client_secret": "s", "refresh_token": "r",
                                                     "access_token": "fresh"},
                        transport=HttpTransport(httpx_client=httpx.Client(transport=httpx.MockTransport(handler))))
    assert p.account_details()["portalId"] == 7
    assert seen == ["/account-info/v3/details"] and p.auth_calls_made == 0
