"""Dynamics 365 provider against the sandbox process over real HTTPS (127.0.0.1, CA made at test start).

Waits never sleep: the provider's ``sleep`` moves the sandbox's Dynamics clock forward instead, so a
Retry-After of 300 s passes in a millisecond and the sliding window really slides.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from core.errors import ApiDisabled, AuthenticationFailed, ProviderRejected, ProviderUnavailable, RateLimited
from core.providers.base import OpportunityChange
from core.providers.config import AccountConfig
from core.providers.dynamics import Dynamics365Provider
from core.providers.registry import create_provider

ENV = "dynco"
TENANT = "6f1c2b9e-5d3a-4c1e-9b7a-d1c0de5a2026"
APP = "0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a926"
APP_USER = "5d0c1e6a-0000-4000-8000-0000000000a1"
SECRETS = {
    APP: "demo-dynco-app-secret",
    "0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a927": "demo-dynco-nodelegate-secret",
    "0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a928": "demo-dynco-expired-secret",
    "0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a929": "demo-dynco-notadded-secret",
}
OLGA, BEN = "5d0c1e6a-0000-4000-8000-000000000001", "5d0c1e6a-0000-4000-8000-000000000002"


class SandboxClock:
    """The provider's ``sleep``: records each wait and moves the sandbox's Dynamics clock by it."""

    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.sandbox.http.post(f"/_sandbox/dynamics/{ENV}/advance", json={"seconds": seconds}).raise_for_status()


def account(sandbox: Any, **settings: Any) -> AccountConfig:
    base = {"authority_url": sandbox.url("/entra"), "graph_url": sandbox.url("/graph"), "tenant_id": TENANT,
            "client_id": APP, "impersonation": "true"}
    base.update(settings)
    return AccountConfig(provider="dynamics-365", edition="sales-enterprise",
                         instance_url=sandbox.url(f"/dynamics/{ENV}"), auth_mode="oauth_client_credentials",
                         settings=base, label="Dynamics 365")


def provider(sandbox: Any, *, client_id: str = APP, secret: str | None = None, **kw: Any) -> Dynamics365Provider:
    kw.setdefault("sleep", SandboxClock(sandbox))
    kw.setdefault("max_retry_wait", 900)
    p = create_provider(account=account(sandbox, client_id=client_id),
                        credential={"client_secret": secret if secret is not None else SECRETS[client_id]},
                        transport=sandbox.transport(), **kw)
    assert isinstance(p, Dynamics365Provider)
    return p


def changes(n: int, prefix: str = "k", actor: str | None = None) -> list[OpportunityChange]:
    return [OpportunityChange(idempotency_key=f"{prefix}-{i:05d}",
                              fields={"name": f"Deal {prefix} {i}", "stage": "Develop", "amount": 1000 + i},
                              act_as_crm_user_id=actor) for i in range(n)]


def opportunities(sandbox: Any) -> list[dict[str, Any]]:
    return sandbox.inspect(ENV)["dynamics"]["opportunities"]


def limits(sandbox: Any, **body: Any) -> None:
    sandbox.http.post(f"/_sandbox/dynamics/{ENV}/limits", json=body).raise_for_status()


def raw_token(sandbox: Any) -> str:
    r = sandbox.http.post(f"/entra/{TENANT}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": APP, "client_secret": SECRETS[APP],
        "scope": sandbox.url(f"/dynamics/{ENV}/.default")})
    r.raise_for_status()
    return str(r.json()["access_token"])


# --------------------------------------------------------------------------- connection, licenses, quota
def test_connection_test_reports_identity_org_edition_and_each_step(sandbox: Any) -> None:
    report = provider(sandbox).test_connection()
    assert report.ok, report.failed_step
    assert [s.name for s in report.steps] == ["reach", "authenticate", "api_access", "licenses", "quota"]
    assert report.crm_user_id == APP_USER
    assert report.identity == "# CRM Bridge"
    assert report.org_id == "8a1f4c2e-2026-4d0c-9d11-0000000d7c01"
    assert report.detected_edition == "sales-enterprise"


def test_license_snapshot_counts_dynamics_seats_and_free_application_users(sandbox: Any) -> None:
    snap = provider(sandbox).license_snapshot()
    # DYN365_ENTERPRISE_SALES 21/25 + DYN365_ENTERPRISE_TEAM_MEMBERS 4/10; the Office SKU is not a CRM seat.
    assert (snap.total, snap.used, snap.spare) == (35, 25, 10)
    assert snap.detail[-1] == {"application_users": 3, "application_users_need_license": False}


def test_api_usage_comes_from_the_service_protection_headers(sandbox: Any) -> None:
    p = provider(sandbox)
    p.whoami()
    p.whoami()
    usage = p.api_usage()
    assert usage is not None
    assert (usage.limit, usage.window, usage.used, usage.remaining) == (6000, "5min", 2, 5998)


def test_list_users_returns_people_not_application_users(sandbox: Any) -> None:
    users = {u.crm_user_id: u for u in provider(sandbox).list_users()}
    assert set(users) == {OLGA, BEN, "5d0c1e6a-0000-4000-8000-000000000003", "5d0c1e6a-0000-4000-8000-000000000004"}
    assert users[OLGA].email == "olga@dynco.example" and users[OLGA].active
    assert not users["5d0c1e6a-0000-4000-8000-000000000004"].active


# --------------------------------------------------------------------------- pull and push
def test_push_uses_one_upsertmultiple_per_thousand_and_a_retry_creates_nothing(sandbox: Any) -> None:
    p = provider(sandbox)
    before = len(opportunities(sandbox))
    first = p.push_opportunities(changes(2500))
    assert p.calls_made == 3 and p.auth_calls_made == 1
    # UpsertMultiple answers 204 No Content: success, without ids (they come with the next pull)
    assert all(r.ok and r.write_path == "UpsertMultiple" for r in first)
    ids = {o["crb_idempotencykey"]: o["opportunityid"] for o in opportunities(sandbox)}
    again = p.push_opportunities(changes(2500))  # the same batch retried (e.g. after a timeout)
    assert p.calls_made == 6
    assert all(r.ok for r in again)
    assert len(opportunities(sandbox)) == before + 2500
    assert {o["crb_idempotencykey"]: o["opportunityid"] for o in opportunities(sandbox)} == ids


def test_pull_pages_at_5000_and_follows_next_link_without_duplicates(sandbox: Any) -> None:
    p = provider(sandbox)
    p.push_opportunities(changes(5100))
    pushed = p.calls_made
    rows = list(p.pull_opportunities(None))
    assert p.calls_made - pushed == 2  # 5,160 rows: one full page of 5,000 and one of 160
    assert len(rows) == 5160 == len({r.crm_id for r in rows})
    assert [r.modified_at for r in rows] == sorted(r.modified_at for r in rows)
    first = next(r for r in rows if r.external_key == "k-00000")
    assert (first.stage, first.amount, first.name) == ("Develop", 1000, "Deal k 0")


def test_a_larger_page_request_gains_nothing(sandbox: Any) -> None:
    """Dataverse ignores odata.maxpagesize above 5,000: asking for 20,000 still costs two calls."""
    p = provider(sandbox)
    p.push_opportunities(changes(5100))
    p.max_page_size = 20_000  # type: ignore[misc]
    pushed = p.calls_made
    assert len(list(p.pull_opportunities(None))) == 5160
    assert p.calls_made - pushed == 2


def test_pull_since_returns_only_later_changes(sandbox: Any) -> None:
    p = provider(sandbox)
    seeded = list(p.pull_opportunities(None))
    since = max(r.modified_at for r in seeded)
    SandboxClock(sandbox)(5)
    p.push_opportunities(changes(3, "late"))
    later = list(p.pull_opportunities(since))
    assert {r.external_key for r in later} >= {"late-00000", "late-00001", "late-00002"}
    assert len(later) <= 4  # the three new ones (plus the boundary record at exactly ``since``)


def test_a_record_error_fails_only_that_record(sandbox: Any) -> None:
    p = provider(sandbox)
    batch = changes(4)
    batch[2] = OpportunityChange(idempotency_key="too-long", fields={"name": "x" * 301})
    results = p.push_opportunities(batch)
    assert [r.ok for r in results] == [True, True, False, True]
    assert results[2].error_code == "0x80044331" and "maximum allowed length" in (results[2].error or "")
    assert p.calls_made == 2  # the bulk message rolled back; one $batch gave each record its own result


# --------------------------------------------------------------------------- impersonation
def test_impersonation_records_the_real_user_and_the_application_user_on_behalf(sandbox: Any) -> None:
    p = provider(sandbox)
    p.list_users()  # the directory lookup the sync does once; object ids come with it
    calls = p.calls_made
    p.push_opportunities(changes(3, "olga", actor=OLGA))
    assert p.calls_made - calls == 1
    rows = [o for o in opportunities(sandbox) if (o["crb_idempotencykey"] or "").startswith("olga")]
    assert {(o["_createdby_value"], o["_createdonbehalfby_value"], o["_ownerid_value"]) for o in rows} == {
        (OLGA, APP_USER, OLGA)}


def test_mixed_actors_share_one_batch_and_each_record_keeps_its_actor(sandbox: Any) -> None:
    p = provider(sandbox)
    mixed = changes(4, "olga", actor=OLGA) + changes(4, "ben", actor=BEN)
    results = p.push_opportunities(mixed)
    assert all(r.ok for r in results)
    # one lookup of the two users' Entra object ids, then one $batch for the eight records
    assert p.calls_made == 2
    by_key = {o["crb_idempotencykey"]: o for o in opportunities(sandbox)}
    assert by_key["olga-00001"]["_createdby_value"] == OLGA
    assert by_key["ben-00001"]["_createdby_value"] == BEN
    assert by_key["ben-00001"]["_createdonbehalfby_value"] == APP_USER
    # an update by another user keeps the creator and records the modifier
    p.push_opportunities([OpportunityChange("olga-00001", {"stage": "Propose"}, act_as_crm_user_id=BEN)])
    row = {o["crb_idempotencykey"]: o for o in opportunities(sandbox)}["olga-00001"]
    assert (row["_createdby_value"], row["_modifiedby_value"], row["_modifiedonbehalfby_value"]) == (
        OLGA, BEN, APP_USER)
    assert row["salesstage"] == 2


def test_impersonation_without_the_delegate_role_names_the_fix(sandbox: Any) -> None:
    p = provider(sandbox, client_id="0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a927")
    with pytest.raises(ProviderRejected) as exc:
        p.push_opportunities(changes(2, actor=OLGA))
    assert exc.value.code == "0x80040220"
    assert "Delegate role" in str(exc.value)


# --------------------------------------------------------------------------- service protection
def test_service_protection_429_is_honoured_by_waiting_retry_after(sandbox: Any) -> None:
    limits(sandbox, requests=4)
    clock = SandboxClock(sandbox)
    p = provider(sandbox, sleep=clock)
    for _ in range(10):
        p.whoami()
    # 4 answered, a 429 waited out (until the oldest request leaves the 300 s window), 4 more, again, 2 more
    assert len(clock.waits) == 2 and all(295 <= w <= 301 for w in clock.waits)
    assert p.calls_made == 12
    assert sandbox.inspect(ENV)["dynamics"]["service_protection"]["throttled"] == 2


def test_batch_and_bulk_messages_count_once_toward_the_request_limit(sandbox: Any) -> None:
    """Microsoft: a $batch "will avoid the number of requests limit"; a bulk message "counts as single
    request". Three requests carrying 1,000 + 6 records fit under a limit of 3."""
    limits(sandbox, requests=3)
    clock = SandboxClock(sandbox)
    p = provider(sandbox, sleep=clock)
    p.push_opportunities(changes(1000))  # UpsertMultiple: 1 request
    p.push_opportunities(changes(3, "a", actor=OLGA) + changes(3, "b", actor=BEN))  # lookup + $batch: 2
    assert clock.waits == [] and p.calls_made == 3
    counted = sandbox.inspect(ENV)["dynamics"]["service_protection"]["counted_in_window"]
    assert counted == {APP_USER: 3}
    p.whoami()  # the fourth request in the window is refused, waited out, and retried
    assert len(clock.waits) == 1


def test_rate_limited_when_the_wait_would_be_too_long(sandbox: Any) -> None:
    sandbox.fault(ENV, quota_exhausted=True)
    p = provider(sandbox, max_retry_wait=60)
    with pytest.raises(RateLimited) as exc:
        p.whoami()
    assert exc.value.retry_after == 300 and exc.value.code == "0x80072322"
    assert "Retry-After" in str(exc.value)


# --------------------------------------------------------------------------- tokens and failures
def test_expired_token_is_refreshed_once_transparently(sandbox: Any) -> None:
    p = provider(sandbox)
    p.whoami()
    SandboxClock(sandbox)(3700)  # the server's clock passes the token's expires_in; ours has not
    p.whoami()
    assert p.auth_calls_made == 2 and p.calls_made == 3  # one 401, one refresh, one retry
    sandbox.expire_sessions(ENV)
    p.whoami()
    assert p.auth_calls_made == 3


@pytest.mark.parametrize(("client_id", "secret", "code", "fix"), [
    (APP, "wrong-secret", "AADSTS7000215", "secret's Value"),
    ("0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a928", None, "AADSTS7000222", "create a new secret"),
    ("0c1b2a39-8d7e-4f60-a5b4-00000000dead", "x", "AADSTS700016", "Application (client) ID"),
])
def test_failed_authentication_names_the_fix(sandbox: Any, client_id: str, secret: str | None, code: str,
                                             fix: str) -> None:
    p = provider(sandbox, client_id=client_id, secret=secret if secret is not None else SECRETS.get(client_id, ""))
    report = p.test_connection()
    assert not report.ok and report.failed_step is not None
    assert report.failed_step.name == "authenticate"
    assert fix in (report.failed_step.fix or "")
    with pytest.raises(AuthenticationFailed) as exc:
        p.whoami()
    assert exc.value.code == code


def test_unknown_directory_is_an_authentication_failure(sandbox: Any) -> None:
    acct = account(sandbox, tenant_id="00000000-0000-0000-0000-000000000000")
    p = Dynamics365Provider(account=acct, credential={"client_secret": SECRETS[APP]}, transport=sandbox.transport())
    with pytest.raises(AuthenticationFailed) as exc:
        p.whoami()
    assert exc.value.code == "AADSTS90002"


def test_app_registration_that_is_not_an_application_user(sandbox: Any) -> None:
    p = provider(sandbox, client_id="0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a929")
    report = p.test_connection()
    assert report.failed_step is not None and report.failed_step.name == "api_access"
    assert "application user" in (report.failed_step.fix or "")
    with pytest.raises(ApiDisabled):
        p.whoami()


def test_server_errors_are_provider_unavailable(sandbox: Any) -> None:
    sandbox.fault(ENV, error_rate=1.0, error_status=503)
    with pytest.raises(ProviderUnavailable):
        provider(sandbox).whoami()


# --------------------------------------------------------------------------- the vendor's caps, raw
def test_sandbox_refuses_more_than_1000_operations_in_a_batch(sandbox: Any) -> None:
    token = raw_token(sandbox)
    boundary = "batch_cap"
    part = ("--batch_cap\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            "GET /api/data/v9.2/WhoAmI HTTP/1.1\r\n\r\n\r\n")
    r = sandbox.http.post(f"/dynamics/{ENV}/api/data/v9.2/$batch", content=(part * 1001 + "--batch_cap--\r\n"),
                          headers={"Authorization": f"Bearer {token}",
                                   "Content-Type": f"multipart/mixed; boundary={boundary}"})
    assert r.status_code == 400
    assert "contains too many parts" in r.json()["error"]["message"]
    assert "'1000'" in r.json()["error"]["message"]


def test_sandbox_refuses_more_than_1000_targets_in_a_bulk_message(sandbox: Any) -> None:
    token = raw_token(sandbox)
    targets = [{"@odata.type": "Microsoft.Dynamics.CRM.opportunity", "name": f"n{i}"} for i in range(1001)]
    r = sandbox.http.post(f"/dynamics/{ENV}/api/data/v9.2/opportunities/Microsoft.Dynamics.CRM.CreateMultiple",
                          json={"Targets": targets}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 400
    assert "exceeds the maximum of 1000" in r.json()["error"]["message"]
    assert len(opportunities(sandbox)) == 60  # nothing was written


def test_unauthenticated_web_api_call_gets_a_bearer_challenge(sandbox: Any) -> None:
    r = sandbox.http.get(f"/dynamics/{ENV}/api/data/v9.2/WhoAmI")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")


def test_transport_is_the_callers(sandbox: Any) -> None:
    """Nothing reaches the sandbox without the caller's CA: a client that does not trust it fails TLS."""
    from core.providers.config import HttpTransport

    p = Dynamics365Provider(account=account(sandbox), credential={"client_secret": SECRETS[APP]},
                            transport=HttpTransport(httpx_client=httpx.Client(timeout=10),
                                                    url_policy=sandbox.url_policy()))
    with pytest.raises(ProviderUnavailable) as exc:
        p.whoami()
    assert "TLS" in str(exc.value) or "certificate" in str(exc.value).lower()
