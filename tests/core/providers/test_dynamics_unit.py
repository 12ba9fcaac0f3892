"""Dynamics 365 provider mapping rules that need no server: field mapping, error mapping, odd answers."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import httpx
import pytest

from core.errors import MalformedResponse, ProviderUnavailable, RateLimited, RecordError, SessionExpired
from core.providers.config import AccountConfig, HttpTransport
from core.providers.dynamics import Dynamics365Provider, error_for_response, opportunity_from_row, row_from_fields


def provider(handler: Any, **kw: Any) -> Dynamics365Provider:
    account = AccountConfig(provider="dynamics-365", edition="sales-enterprise",
                            instance_url="https://org.crm.dynamics.com",
                            settings={"tenant_id": "t.onmicrosoft.com", "client_id": "c"})

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.host == "login.microsoftonline.com":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 3599})
        return handler(request)

    client = httpx.Client(transport=httpx.MockTransport(route))
    return Dynamics365Provider(account=account, credential={"client_secret": "s"},
                               transport=HttpTransport(httpx_client=client, max_response_bytes=1000), **kw)


def test_neutral_fields_map_to_dataverse_columns_and_back() -> None:
    row = row_from_fields({"name": "Big deal", "stage": "propose", "amount": Decimal("12.50"),
                           "close_date": date(2027, 1, 31), "owner_id": "5d0c1e6a-0000-4000-8000-000000000001"})
    assert row == {"name": "Big deal", "salesstage": 2, "estimatedvalue": 12.5, "estimatedclosedate": "2027-01-31",
                   "ownerid@odata.bind": "/systemusers(5d0c1e6a-0000-4000-8000-000000000001)"}
    opp = opportunity_from_row({"opportunityid": "o1", "name": "Big deal", "salesstage": 2, "estimatedvalue": 12.5,
                                "estimatedclosedate": "2027-01-31", "_ownerid_value": "u1",
                                "modifiedon": "2026-11-28T09:00:00Z", "crb_idempotencykey": "k1"})
    assert (opp.stage, opp.amount, opp.close_date, opp.owner_id, opp.external_key) == (
        "Propose", Decimal("12.5"), date(2027, 1, 31), "u1", "k1")


def test_unknown_stage_is_a_record_error_before_any_call() -> None:
    with pytest.raises(RecordError) as exc:
        row_from_fields({"stage": "Negotiation"})
    assert "Qualify, Develop, Propose, Close" in str(exc.value)


def test_error_mapping_by_status_and_code() -> None:
    def resp(status: int, code: str = "0x1", headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.Response(status, json={"error": {"code": code, "message": "m"}}, headers=headers)

    throttled = error_for_response(resp(429, "0x80072322", {"Retry-After": "42"}))
    assert isinstance(throttled, RateLimited) and throttled.retry_after == 42
    assert isinstance(error_for_response(resp(401)), SessionExpired)
    assert isinstance(error_for_response(resp(502)), ProviderUnavailable)
    assert isinstance(error_for_response(resp(400, "0x80044331")), RecordError)


def test_an_html_page_is_a_malformed_response() -> None:
    p = provider(lambda r: httpx.Response(200, text="<html>Sign in</html>", headers={"Content-Type": "text/html"}))
    with pytest.raises(MalformedResponse) as exc:
        p.whoami()
    assert "HTML page" in str(exc.value)


def test_truncated_json_is_a_malformed_response() -> None:
    truncated = httpx.Response(200, content=b'{"UserId": "0000', headers={"Content-Type": "application/json"})
    p = provider(lambda r: truncated)
    with pytest.raises(MalformedResponse):
        p.whoami()


def test_an_oversized_body_is_refused() -> None:
    p = provider(lambda r: httpx.Response(200, content=b" " * 2000, headers={"Content-Type": "application/json"}))
    with pytest.raises(MalformedResponse) as exc:
        p.whoami()
    assert "more than we accept" in str(exc.value)


def test_timeouts_and_refused_connections_are_unavailable() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    for handler in (timeout, refused):
        with pytest.raises(ProviderUnavailable):
            provider(handler).whoami()


def test_a_second_401_after_refresh_is_an_authentication_failure() -> None:
    from core.errors import AuthenticationFailed

    p = provider(lambda r: httpx.Response(401))
    with pytest.raises(AuthenticationFailed):
        p.whoami()
    assert p.auth_calls_made == 2 and p.calls_made == 2
