"""HubSpot provider against the sandbox process over real HTTPS (127.0.0.1, CA made at test start).

Nothing sleeps: the provider's ``sleep`` and ``monotonic`` are a fake clock that also moves the sandbox's
HubSpot clock, so a 10-second rate-limit window really passes.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from core.errors import AuthenticationFailed, ProviderRejected, RateLimited
from core.providers.base import OpportunityChange
from core.providers.config import AccountConfig
from core.providers.hubspot import HubSpotProvider
from core.providers.registry import create_provider

PORTAL = "hubco"
CLIENT = "crmbridge-hubspot-app"
SECRET = "demo-hubspot-app-secret"
REFRESH = "demo-hubco-refresh-token"
REDIRECT = "http://127.0.0.1:8501/oauth/hubspot/callback"


class FakeTime:
    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self.t = 1000.0
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.t += seconds
        self.sandbox.http.post("/_sandbox/hubspot/advance", json={"seconds": seconds}).raise_for_status()

    def monotonic(self) -> float:
        return self.t


def account(sandbox: Any, mode: str = "oauth_authorization_code", **settings: Any) -> AccountConfig:
    return AccountConfig(provider="hubspot", edition="professional", instance_url=sandbox.url("/hubspot"),
                         auth_mode=mode, settings={"client_id": CLIENT, "authorize_url":
                                                   sandbox.url("/hubspot/oauth/authorize"), **settings})


def provider(sandbox: Any, *, mode: str = "oauth", clock: FakeTime | None = None, **kw: Any) -> HubSpotProvider:
    clock = clock or FakeTime(sandbox)
    if mode == "oauth":
        acct, cred = account(sandbox), {"client_secret": SECRET, "refresh_token": kw.pop("refresh", REFRESH)}
    elif mode == "service_key":
        acct, cred = account(sandbox, "api_token", token_kind="service_key"), {
            "token": kw.pop("token", "demo-hubco-service-key")}
    else:
        acct, cred = account(sandbox, "api_token", token_kind="private_app"), {"token": "demo-hubco-private-app-token"}
    p = create_provider(account=acct, credential=cred, transport=sandbox.transport(), sleep=clock.sleep,
                        monotonic=clock.monotonic, **kw)
    assert isinstance(p, HubSpotProvider)
    return p


def changes(n: int, prefix: str = "k") -> list[OpportunityChange]:
    return [OpportunityChange(idempotency_key=f"{prefix}-{i:05d}",
                              fields={"name": f"Deal {prefix} {i}", "stage": "qualifiedtobuy", "amount": 100 + i})
            for i in range(n)]


def deals(sandbox: Any) -> list[dict[str, Any]]:
    return sandbox.inspect(PORTAL)["hubspot"]["deals"]


def limits(sandbox: Any, **body: Any) -> None:
    sandbox.http.post(f"/_sandbox/hubspot/{PORTAL}/limits", json=body).raise_for_status()


# --------------------------------------------------------------------------- connection and auth modes
def test_oauth_connection_test_names_the_installing_user_and_portal(sandbox: Any) -> None:
    report = provider(sandbox).test_connection()
    assert report.ok, report.failed_step
    assert (report.identity, report.crm_user_id, report.org_id) == ("sam@hubco.example", "101", "4242001")


def test_service_key_connection_detects_the_tier_from_the_daily_limit(sandbox: Any) -> None:
    report = provider(sandbox, mode="service_key").test_connection()
    assert report.ok and report.identity == "service key"
    assert report.detected_edition == "professional"


def test_legacy_private_app_token_still_works(sandbox: Any) -> None:
    p = provider(sandbox, mode="private_app")
    assert p.test_connection().ok
    assert len(p.list_users()) == 3


def test_license_snapshot_counts_portal_users(sandbox: Any) -> None:
    snap = provider(sandbox).license_snapshot()
    assert (snap.total, snap.used) == (3, 3)
    assert snap.detail[-1] == {"integration_needs_seat": False}


def test_rate_limit_headers_become_api_usage(sandbox: Any) -> None:
    oauth = provider(sandbox)
    oauth.account_details()
    usage = oauth.api_usage()
    assert usage is not None and (usage.window, usage.limit, usage.used) == ("10s", 100, 1)  # OAuth: no daily
    key = provider(sandbox, mode="service_key")
    key.account_details()
    key.account_details()
    daily = key.api_usage()
    assert daily is not None and (daily.window, daily.limit) == ("day", 625_000)
    assert daily.used == 3  # account-wide: the OAuth app's call counts too
    assert daily.extra["burst_limit"] == 190


def test_owners_are_the_users(sandbox: Any) -> None:
    users = provider(sandbox).list_users()
    assert [(u.crm_user_id, u.name, u.email) for u in users][:2] == [
        ("101", "Sam Rivera", "sam@hubco.example"), ("102", "Ivy Moss", "ivy@hubco.example")]


# --------------------------------------------------------------------------- push and pull
def test_push_sends_100_per_batch_upsert_and_a_retry_creates_nothing(sandbox: Any) -> None:
    p = provider(sandbox)
    first = p.push_opportunities(changes(250))
    assert p.calls_made == 3 and all(r.ok and r.created for r in first)
    again = p.push_opportunities(changes(250))
    assert p.calls_made == 6 and all(r.ok and not r.created for r in again)
    assert [r.crm_id for r in again] == [r.crm_id for r in first]
    assert len(deals(sandbox)) == 40 + 250


def test_updates_by_id_and_per_record_errors(sandbox: Any) -> None:
    p = provider(sandbox)
    created = p.push_opportunities(changes(2))
    results = p.push_opportunities([
        OpportunityChange("u1", {"stage": "closedwon"}, crm_id=created[0].crm_id),
        OpportunityChange("u2", {"stage": "not-a-stage"}, crm_id=created[1].crm_id),
        OpportunityChange("u3", {"name": "ghost"}, crm_id="999"),
    ])
    assert [r.ok for r in results] == [True, False, False]
    assert results[1].error_code == "VALIDATION_ERROR" and "allowed options" in (results[1].error or "")
    assert results[2].error_code == "OBJECT_NOT_FOUND"
    stage = {d["id"]: d["properties"]["dealstage"] for d in deals(sandbox)}
    assert stage[created[0].crm_id] == "closedwon"


def test_pull_pages_of_200_since_a_timestamp(sandbox: Any) -> None:
    p = provider(sandbox)
    seeded = list(p.pull_opportunities(None))
    assert len(seeded) == 40 and p.calls_made == 1
    since = max(o.modified_at for o in seeded)
    p.push_opportunities(changes(450))
    before = p.calls_made
    later = list(p.pull_opportunities(since))
    assert p.calls_made - before == 3  # 451 results (the boundary deal too): 200 + 200 + 51
    assert {o.external_key for o in later} >= {f"k-{i:05d}" for i in range(450)}


def test_pull_continues_past_the_10000_result_cap_from_the_last_timestamp(sandbox: Any) -> None:
    limits(sandbox, oauth_burst=1000)
    p = provider(sandbox)
    p.push_opportunities(changes(10_050))
    before = p.calls_made
    pulled = list(p.pull_opportunities(None))
    assert len(pulled) == 10_090 == len({o.crm_id for o in pulled})  # nothing lost, nothing twice
    assert p.calls_made - before == 51  # 50 pages up to the cap, then one page of the continued query
    assert [o.modified_at for o in pulled] == sorted(o.modified_at for o in pulled)


# --------------------------------------------------------------------------- limits, 429, tokens
def test_burst_429_is_waited_out_and_retried(sandbox: Any) -> None:
    limits(sandbox, oauth_burst=3)
    clock = FakeTime(sandbox)
    other = provider(sandbox, clock=FakeTime(sandbox))
    for _ in range(3):
        other.account_details()  # another worker of the same app fills the 10-second window
    p = provider(sandbox, clock=clock)
    assert p.account_details()["portalId"] == 4242001
    assert clock.waits == [10.0]  # TEN_SECONDLY_ROLLING: wait the window, then succeed
    assert sandbox.inspect(PORTAL)["hubspot"]["rate_limits"]["throttled"] == {"TEN_SECONDLY_ROLLING": 1}


def test_provider_paces_itself_from_the_headers(sandbox: Any) -> None:
    limits(sandbox, oauth_burst=5)
    clock = FakeTime(sandbox)
    p = provider(sandbox, clock=clock)
    for _ in range(12):
        p.account_details()
    assert sandbox.inspect(PORTAL)["hubspot"]["rate_limits"]["throttled"] == {}  # never answered 429
    assert len(clock.waits) == 2


def test_search_is_held_to_five_per_second(sandbox: Any) -> None:
    clock = FakeTime(sandbox)
    p = provider(sandbox, clock=clock)
    for _ in range(7):
        list(p.pull_opportunities(None))
    assert len(clock.waits) == 1 and 0 < clock.waits[0] <= 1.05
    assert "SECONDLY" not in sandbox.inspect(PORTAL)["hubspot"]["rate_limits"]["throttled"]


def test_daily_limit_is_not_waited_for(sandbox: Any) -> None:
    sandbox.fault(PORTAL, quota_exhausted=True)
    clock = FakeTime(sandbox)
    with pytest.raises(RateLimited) as exc:
        provider(sandbox, clock=clock).account_details()
    assert exc.value.code == "DAILY" and exc.value.retry_after is None and clock.waits == []
    assert "midnight" in str(exc.value)


def test_expired_access_token_is_refreshed_once(sandbox: Any) -> None:
    clock = FakeTime(sandbox)
    p = provider(sandbox, clock=clock)
    p.account_details()
    clock.sleep(1801)  # the server's token (expires_in 1800) has expired; our clock did not move
    p.account_details()
    assert p.auth_calls_made == 2 and p.calls_made == 3
    sandbox.expire_sessions(PORTAL)
    p.account_details()
    assert p.auth_calls_made == 3


def test_revoked_refresh_token_is_an_authentication_failure_naming_the_fix(sandbox: Any) -> None:
    p = provider(sandbox, refresh="revoked-token")
    report = p.test_connection()
    assert report.failed_step is not None and report.failed_step.name == "authenticate"
    assert "reinstall the app" in (report.failed_step.fix or "")
    with pytest.raises(AuthenticationFailed) as exc:
        p.account_details()
    assert exc.value.code == "BAD_REFRESH_TOKEN"


def test_deleted_service_key_is_an_authentication_failure(sandbox: Any) -> None:
    with pytest.raises(AuthenticationFailed) as exc:
        provider(sandbox, mode="service_key", token="deleted-key").account_details()
    assert "Service keys" in str(exc.value)


# --------------------------------------------------------------------------- app install
def test_app_install_flow_yields_a_working_refresh_token(sandbox: Any) -> None:
    acct = account(sandbox)
    url = HubSpotProvider.authorization_url(acct, redirect_uri=REDIRECT, state="st-1", code_challenge="ignored")
    page = sandbox.http.get(url)
    assert page.status_code == 200 and "Connect CRM Bridge" in page.text
    form = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    approved = sandbox.http.post("/hubspot/oauth/authorize", data={**form, "portal": PORTAL,
                                 "user": "ivy@hubco.example", "decision": "approve"})
    assert approved.status_code == 302
    back = parse_qs(urlsplit(approved.headers["location"]).query)
    assert back["state"] == ["st-1"]
    grant = HubSpotProvider.exchange_code(acct, {"client_secret": SECRET}, sandbox.transport(),
                                          code=back["code"][0], code_verifier="", redirect_uri=REDIRECT)
    assert grant.refresh_token and grant.refresh_token not in repr(grant) and grant.access_token not in repr(grant)
    p = provider(sandbox, refresh=grant.refresh_token)
    report = p.test_connection()
    assert report.ok and report.identity == "ivy@hubco.example"
    with pytest.raises(AuthenticationFailed) as exc:  # an install code works once
        HubSpotProvider.exchange_code(acct, {"client_secret": SECRET}, sandbox.transport(),
                                      code=back["code"][0], code_verifier="", redirect_uri=REDIRECT)
    assert exc.value.code == "BAD_AUTH_CODE"


# --------------------------------------------------------------------------- the vendor's caps, raw
def _bearer(sandbox: Any) -> dict[str, str]:
    return {"Authorization": "Bearer demo-hubco-service-key"}


def test_sandbox_refuses_more_than_100_inputs_per_batch(sandbox: Any) -> None:
    inputs = [{"properties": {"dealname": f"d{i}"}} for i in range(101)]
    r = sandbox.http.post("/hubspot/crm/v3/objects/deals/batch/create", json={"inputs": inputs},
                          headers=_bearer(sandbox))
    assert r.status_code == 400 and r.json()["category"] == "VALIDATION_ERROR"
    assert "maximum number of inputs supported in a batch request is 100" in r.json()["message"]
    assert len(deals(sandbox)) == 40


def test_sandbox_refuses_search_pages_over_200_and_paging_past_10000(sandbox: Any) -> None:
    big = sandbox.http.post("/hubspot/crm/v3/objects/deals/search", json={"limit": 201}, headers=_bearer(sandbox))
    assert big.status_code == 400 and "less than or equal to 200" in big.json()["message"]
    far = sandbox.http.post("/hubspot/crm/v3/objects/deals/search", json={"limit": 10, "after": "10000"},
                            headers=_bearer(sandbox))
    assert far.status_code == 400 and "10000" in far.json()["message"]


def _install(sandbox: Any, scope: str, user: str = "ivy@hubco.example") -> tuple[AccountConfig, str]:
    acct = account(sandbox)
    url = HubSpotProvider.authorization_url(acct, redirect_uri=REDIRECT, state="st", code_challenge="-")
    form = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    form["scope"] = scope
    approved = sandbox.http.post("/hubspot/oauth/authorize",
                                 data={**form, "portal": PORTAL, "user": user, "decision": "approve"})
    code = parse_qs(urlsplit(approved.headers["location"]).query)["code"][0]
    grant = HubSpotProvider.exchange_code(acct, {"client_secret": SECRET}, sandbox.transport(), code=code,
                                          code_verifier="", redirect_uri=REDIRECT)
    assert grant.refresh_token
    return acct, grant.refresh_token


def test_missing_scope_is_refused_with_the_fix(sandbox: Any) -> None:
    _, refresh = _install(sandbox, "crm.objects.deals.read")
    p = provider(sandbox, refresh=refresh)
    assert len(list(p.pull_opportunities(None))) == 40  # the granted scope works
    with pytest.raises(ProviderRejected) as exc:
        p.list_users()  # owners need crm.objects.owners.read
    assert exc.value.code == "MISSING_SCOPES" and "Add the missing scopes" in str(exc.value)
