"""The Salesforce provider against the sandbox over real HTTPS on 127.0.0.1 (zeep + simple-salesforce)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
import threading
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest
import zeep
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from core.errors import (
    ApiDisabled,
    AuthenticationFailed,
    MalformedResponse,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)
from core.providers.base import OpportunityChange
from core.providers.config import AccountConfig, HttpTransport
from core.providers.salesforce import SalesforceProvider, SessionCache

REDIRECT = "http://127.0.0.1:8501/oauth/salesforce/callback"


def api_user(sandbox, org: str = "bigcorp-emea", *, secret: str | None = None, **settings) -> SalesforceProvider:
    secrets_by_org = {"bigcorp-emea": "demo-bigcorp-emea-secret", "bigcorp-americas": "demo-bigcorp-americas-secret"}
    account = AccountConfig(
        provider="salesforce", edition="enterprise", instance_url=sandbox.base_url, credential_mode="api_user",
        auth_mode="oauth_client_credentials", settings={"client_id": f"{org}-integration", **settings},
        label=org,
    )
    return SalesforceProvider(account=account, credential={"client_secret": SecretStr(secret or secrets_by_org[org])},
                              transport=sandbox.transport())


def password_user(sandbox, username: str, password: str, token: str, *, edition: str = "enterprise",
                  on_auth_failure=None, **kwargs) -> SalesforceProvider:
    account = AccountConfig(provider="salesforce", edition=edition, instance_url=sandbox.base_url,
                            credential_mode="per_user_password", auth_mode="password", label=username)
    cred = {"username": username, "password": SecretStr(password), "security_token": SecretStr(token)}
    return SalesforceProvider(account=account, credential=cred, transport=kwargs.pop("transport", None)
                              or sandbox.transport(), on_auth_failure=on_auth_failure, **kwargs)


def ana(sandbox, **kwargs) -> SalesforceProvider:
    return password_user(sandbox, "ana@tinyco.example", "Demo-Ana-2026", "TKNANA0001", **kwargs)


def changes(n: int, prefix: str = "key") -> list[OpportunityChange]:
    return [
        OpportunityChange(idempotency_key=f"{prefix}-{i:04d}", attribution="ana@tinyco.example",
                          fields={"name": f"Deal {i}", "stage": "Prospecting", "amount": Decimal("1000.50"),
                                  "close_date": dt.date(2026, 12, 31)})
        for i in range(n)
    ]


# -- connection test, licenses, quota -------------------------------------------------------------
def test_connection_test_reports_every_step_for_an_api_user(sandbox) -> None:
    p = api_user(sandbox)
    report = p.test_connection()
    assert report.ok, report.failed_step
    assert [s.name for s in report.steps] == ["reach", "authenticate", "api_access", "licenses", "quota"]
    assert report.identity == "integration@bigcorp-emea.example"
    assert report.org_id == "00D5g0000BigEmeMAK"
    assert report.detected_edition == "enterprise"
    assert "372 of 400" in report.steps[3].detail and "1 of 5 Integration" in report.steps[3].detail
    assert "client credentials" in report.steps[1].detail


def test_license_and_quota_read_match_the_org(sandbox) -> None:
    p = ana(sandbox)
    snap = p.license_snapshot()
    assert (snap.total, snap.used, snap.spare) == (10, 10, 0)
    assert (snap.integration_total, snap.integration_used, snap.integration_spare) == (5, 0, 5)
    header_usage = p.api_usage()  # from the LimitInfoHeader of the UserLicense query
    org = sandbox.inspect("tinyco")["salesforce"]
    assert header_usage is not None and header_usage.extra["source"] == "LimitInfoHeader"
    assert (header_usage.used, header_usage.limit) == (org["api_used"], org["api_limit"]) == (1851, 110_000)
    rest = p.rest_limits()  # simple-salesforce over REST /limits with the same session
    assert rest.extra["source"] == "REST /limits" and rest.limit == 110_000 and rest.used == 1851
    assert p.auth_calls_made == 1  # one login, reused for SOAP and REST


# -- pull and push -------------------------------------------------------------------------------
def test_pull_pages_through_query_more(sandbox) -> None:
    p = api_user(sandbox, query_batch_size=200)
    opps = list(p.pull_opportunities(None))
    assert len(opps) == 450 and p.pages_read == 3
    assert len({o.crm_id for o in opps}) == 450
    assert all(o.modified_at.tzinfo is not None for o in opps)
    assert [o.modified_at for o in opps] == sorted(o.modified_at for o in opps)
    cutoff = opps[300].modified_at
    recent = list(api_user(sandbox).pull_opportunities(cutoff))
    assert recent and all(o.modified_at >= cutoff for o in recent) and len(recent) < 450


def test_push_goes_in_batches_of_200_and_a_retry_never_duplicates(sandbox) -> None:
    p = api_user(sandbox, attribution_field="CrmBridge_Actor__c")
    before = sandbox.inspect("bigcorp-emea")["salesforce"]["opportunities"]
    results = p.push_opportunities(changes(450))
    assert len(results) == 450 and all(r.ok and r.created for r in results)
    assert sandbox.inspect("bigcorp-emea")["runtime"]["write_batches"] == 3  # 200 + 200 + 50
    assert sandbox.inspect("bigcorp-emea")["salesforce"]["opportunities"] == before + 450
    retry = p.push_opportunities(changes(450))
    assert [r.crm_id for r in retry] == [r.crm_id for r in results]
    assert not any(r.created for r in retry)
    assert sandbox.inspect("bigcorp-emea")["salesforce"]["opportunities"] == before + 450
    rows = {r["CrmBridge_Key__c"]: r for r in sandbox.http.get(
        "/_sandbox/salesforce/bigcorp-emea/opportunities").json() if r["CrmBridge_Key__c"]}
    assert Decimal(rows["key-0007"]["Amount"]) == Decimal("1000.5")
    assert rows["key-0007"]["CrmBridge_Actor__c"] == "ana@tinyco.example"


def test_updates_and_per_record_failures_come_back_in_order(sandbox) -> None:
    p = api_user(sandbox)
    existing = next(iter(p.pull_opportunities(None)))
    batch = [
        OpportunityChange(idempotency_key="u1", crm_id=existing.crm_id, fields={"stage": "Closed Won"}),
        OpportunityChange(idempotency_key="bad", fields={"name": "Refund", "stage": "Prospecting",
                                                          "amount": -5, "close_date": "2026-12-01"}),
        OpportunityChange(idempotency_key="new", fields={"name": "Fresh", "stage": "Prospecting",
                                                          "close_date": "2026-12-01"}),
    ]
    res = p.push_opportunities(batch)
    assert [r.idempotency_key for r in res] == ["u1", "bad", "new"]
    assert res[0].ok and not res[0].created and res[0].crm_id == existing.crm_id
    assert not res[1].ok and res[1].error_code == "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    with pytest.raises(ProviderRejected, match="Amount cannot be negative"):
        res[1].raise_for_error()
    assert res[2].ok and res[2].created


def test_a_paused_push_resumes_and_its_retry_does_not_duplicate(sandbox) -> None:
    sandbox.fault("bigcorp-emea", pause_after_batch=1)
    p = api_user(sandbox)
    before = sandbox.inspect("bigcorp-emea")["salesforce"]["opportunities"]
    outcome: dict[str, object] = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("r", p.push_opportunities(changes(450))))
    worker.start()
    assert sandbox.wait_paused("bigcorp-emea")
    # the first batch is in, the second waits: a crash here would leave 200 written
    assert sandbox.inspect("bigcorp-emea")["salesforce"]["opportunities"] == before + 200
    assert sandbox.release("bigcorp-emea") == 1
    worker.join(timeout=60)
    assert len(outcome["r"]) == 450  # type: ignore[arg-type]
    again = api_user(sandbox).push_opportunities(changes(450))
    assert not any(r.created for r in again)
    assert sandbox.inspect("bigcorp-emea")["salesforce"]["opportunities"] == before + 450


# -- limits and faults ---------------------------------------------------------------------------
def test_daily_limit_ends_in_rate_limited(sandbox) -> None:
    sandbox.http.post("/_sandbox/salesforce/tinyco/api-usage", json={"used": 110_000}).raise_for_status()
    p = ana(sandbox)
    with pytest.raises(RateLimited) as exc:
        p.license_snapshot()
    assert exc.value.code == "REQUEST_LIMIT_EXCEEDED" and "24-hour" in str(exc.value)
    with pytest.raises(RateLimited):
        p.rest_limits()
    report = ana(sandbox).test_connection()
    assert report.failed_step is not None and report.failed_step.name == "api_access"


def test_quota_exhaustion_fault_and_seeded_5xx(sandbox) -> None:
    sandbox.fault("bigcorp-americas", quota_exhausted=True)
    with pytest.raises(RateLimited):
        list(api_user(sandbox, "bigcorp-americas").pull_opportunities(None))
    sandbox.clear_faults("bigcorp-americas")
    sandbox.fault("bigcorp-americas", error_rate=1.0, error_status=503)
    with pytest.raises(ProviderUnavailable, match="HTTP 503"):
        api_user(sandbox, "bigcorp-americas").list_users()


def test_session_expiry_is_handled_by_one_transparent_login(sandbox) -> None:
    p = ana(sandbox)
    assert len(p.list_users()) == 10
    sandbox.expire_sessions("tinyco")
    assert len(p.list_users()) == 10
    assert p.auth_calls_made == 2


def test_sessions_are_reused_across_instances_through_a_cache(sandbox) -> None:
    cache = SessionCache()
    first = ana(sandbox, session_cache=cache)
    first.list_users()
    second = ana(sandbox, session_cache=cache)
    second.list_users()
    assert (first.auth_calls_made, second.auth_calls_made) == (1, 0)
    sandbox.expire_sessions("tinyco")
    second.list_users()  # the stale cached session is dropped and replaced once
    assert second.auth_calls_made == 1


def test_failed_login_of_a_per_user_credential_calls_the_auth_failure_callback(sandbox) -> None:
    reported: list[AuthenticationFailed] = []
    p = password_user(sandbox, "ana@tinyco.example", "old-password", "TKNANA0001",
                      on_auth_failure=reported.append)
    with pytest.raises(AuthenticationFailed, match="INVALID_LOGIN"):
        p.list_users()
    with pytest.raises(AuthenticationFailed):
        p.list_users()
    assert len(reported) == 1 and reported[0].code == "INVALID_LOGIN"
    no_token = password_user(sandbox, "ana@tinyco.example", "Demo-Ana-2026", "", on_auth_failure=reported.append)
    with pytest.raises(AuthenticationFailed, match="security token"):
        no_token.list_users()
    # an API user's failure is not a per-user credential: nothing to self-destruct
    api_reports: list[AuthenticationFailed] = []
    bad_api = api_user(sandbox, secret="wrong")
    bad_api._on_auth_failure = api_reports.append
    with pytest.raises(AuthenticationFailed, match="consumer key or secret"):
        bad_api.list_users()
    assert api_reports == []


def test_professional_without_the_api_add_on(sandbox) -> None:
    p = password_user(sandbox, "pia@profco.example", "Demo-Pia-2026", "TKNPIA0001", edition="professional")
    report = p.test_connection()
    assert not report.ok
    step = report.failed_step
    assert step is not None and "API_DISABLED_FOR_ORG" in step.detail
    assert step.fix is not None and "API add-on" in step.fix
    with pytest.raises(ApiDisabled):
        p.list_users()


def test_transport_failures_map_to_unavailable_and_malformed(sandbox) -> None:
    # system CAs do not know the sandbox
    untrusted = ana(sandbox, transport=HttpTransport(verify=True, url_policy=sandbox.url_policy()))
    report = untrusted.test_connection()
    assert report.steps[0].name == "reach" and not report.steps[0].ok and "TLS" in report.steps[0].detail
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    account = AccountConfig(provider="salesforce", edition="enterprise", instance_url=f"https://127.0.0.1:{closed}",
                            credential_mode="api_user", auth_mode="oauth_client_credentials",
                            settings={"client_id": "x"})
    from core.providers.transport import CrmUrlPolicy

    closed_port = CrmUrlPolicy.vendors(sandbox_url=account.instance_url)  # allowed, but nothing listens there
    refused = SalesforceProvider(account=account, credential={"client_secret": "y"},
                                 transport=sandbox.transport(url_policy=closed_port))
    with pytest.raises(ProviderUnavailable, match="connection refused"):
        refused.list_users()
    tiny = ana(sandbox, transport=sandbox.transport(max_response_bytes=2000))
    with pytest.raises(MalformedResponse, match="more than 2,000 bytes"):
        list(tiny.pull_opportunities(None))


def test_the_sandbox_enforces_salesforce_batch_limits(sandbox) -> None:
    p = api_user(sandbox)
    p.max_write_batch = 201  # type: ignore[misc]  # pretend to be a careless client
    with pytest.raises(ProviderRejected) as exc:
        p.push_opportunities(changes(201))
    assert exc.value.code == "EXCEEDED_ID_LIMIT"
    with pytest.raises(ProviderRejected) as small:
        list(api_user(sandbox, query_batch_size=100).pull_opportunities(None))
    assert small.value.code == "INVALID_BATCH_SIZE"


# -- OAuth ---------------------------------------------------------------------------------------
def _rsa_and_cert() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crm-bridge-jwt-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return pem_key, cert.public_bytes(serialization.Encoding.PEM).decode()


def jwt_user(sandbox, private_key: str) -> SalesforceProvider:
    account = AccountConfig(provider="salesforce", edition="enterprise", instance_url=sandbox.base_url,
                            credential_mode="api_user", auth_mode="jwt_bearer",
                            settings={"client_id": "bigcorp-emea-integration",
                                      "username": "integration@bigcorp-emea.example"})
    return SalesforceProvider(account=account, credential={"private_key": SecretStr(private_key)},
                              transport=sandbox.transport())


def test_jwt_bearer(sandbox) -> None:
    key, cert = _rsa_and_cert()
    sandbox.http.post("/_sandbox/salesforce/bigcorp-emea/apps/bigcorp-emea-integration/certificate",
                      content=cert).raise_for_status()
    report = jwt_user(sandbox, key).test_connection()
    assert report.ok, report.failed_step
    assert report.identity == "integration@bigcorp-emea.example" and "JWT bearer" in report.steps[1].detail
    other_key, _ = _rsa_and_cert()
    with pytest.raises(AuthenticationFailed, match="invalid_grant"):
        jwt_user(sandbox, other_key).list_users()


def _pkce() -> tuple[str, str]:
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def oauth_account(sandbox, org: str = "newco") -> AccountConfig:
    return AccountConfig(provider="salesforce", edition="enterprise", instance_url=sandbox.base_url,
                         credential_mode="per_user_oauth", auth_mode="oauth_authorization_code",
                         settings={"client_id": f"{org}-connected-app"}, label=org)


def _approve(sandbox, url: str, username: str, password: str) -> dict[str, str]:
    page = sandbox.http.get(url)
    assert page.status_code == 200 and "Allow access" in page.text
    query = parse_qs(urlsplit(url).query)
    form = {k: v[0] for k, v in query.items()}
    form.update(username=username, password=password, action="allow")
    answer = sandbox.http.post("/services/oauth2/authorize", data=form)
    assert answer.status_code == 302
    location = answer.headers["location"]
    assert location.startswith(REDIRECT)
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def test_web_server_flow_with_pkce_and_refresh(sandbox) -> None:
    account = oauth_account(sandbox)
    verifier, challenge = _pkce()
    url = SalesforceProvider.authorization_url(account, redirect_uri=REDIRECT, state="st-123",
                                               code_challenge=challenge, login_hint="nadia@newco.example")
    params = _approve(sandbox, url, "nadia@newco.example", "Demo-Nadia-2026")
    assert params["state"] == "st-123"
    cred = {"client_secret": SecretStr("demo-newco-app-secret")}
    grant = SalesforceProvider.exchange_code(account, cred, sandbox.transport(), code=params["code"],
                                             code_verifier=verifier, redirect_uri=REDIRECT)
    assert grant.refresh_token and grant.access_token and grant.refresh_token not in repr(grant)
    # the access token works as the SOAP session id; then the refresh token takes over
    rotated: list[dict[str, str]] = []
    p = SalesforceProvider(account=account, transport=sandbox.transport(), on_credential_update=rotated.append,
                           credential={**cred, "access_token": SecretStr(grant.access_token),
                                       "refresh_token": SecretStr(grant.refresh_token)})
    report = p.test_connection()
    assert report.ok and report.identity == "nadia@newco.example"
    sandbox.expire_sessions("newco")
    assert len(p.list_users()) == 5  # refreshed transparently
    assert p.auth_calls_made == 2
    assert rotated and rotated[0]["refresh_token"] != grant.refresh_token  # newco rotates refresh tokens


def test_a_wrong_pkce_verifier_or_reused_code_fails(sandbox) -> None:
    account = oauth_account(sandbox, "tinyco")
    verifier, challenge = _pkce()
    url = SalesforceProvider.authorization_url(account, redirect_uri=REDIRECT, state="s", code_challenge=challenge)
    params = _approve(sandbox, url, "ben@tinyco.example", "Demo-Ben-2026")
    with pytest.raises(AuthenticationFailed, match="invalid_grant"):
        SalesforceProvider.exchange_code(account, {}, sandbox.transport(), code=params["code"],
                                         code_verifier=_pkce()[0], redirect_uri=REDIRECT)
    with pytest.raises(AuthenticationFailed):  # a code is single use, even after a failed attempt
        SalesforceProvider.exchange_code(account, {}, sandbox.transport(), code=params["code"],
                                         code_verifier=verifier, redirect_uri=REDIRECT)


def test_a_revoked_refresh_token_is_a_per_user_auth_failure(sandbox) -> None:
    account = oauth_account(sandbox, "tinyco")
    verifier, challenge = _pkce()
    url = SalesforceProvider.authorization_url(account, redirect_uri=REDIRECT, state="s", code_challenge=challenge)
    code = _approve(sandbox, url, "chloe@tinyco.example", "Demo-Chloe-2026")["code"]
    grant = SalesforceProvider.exchange_code(account, {}, sandbox.transport(), code=code, code_verifier=verifier,
                                             redirect_uri=REDIRECT)
    sandbox.http.post("/_sandbox/salesforce/tinyco/revoke-refresh-tokens").raise_for_status()
    reported: list[AuthenticationFailed] = []
    p = SalesforceProvider(account=account, transport=sandbox.transport(), on_auth_failure=reported.append,
                           credential={"refresh_token": SecretStr(grant.refresh_token or "")})
    with pytest.raises(AuthenticationFailed, match="reconnect"):
        p.list_users()
    assert len(reported) == 1 and reported[0].code == "invalid_grant"


def test_consent_can_be_denied(sandbox) -> None:
    _, challenge = _pkce()
    url = SalesforceProvider.authorization_url(oauth_account(sandbox), redirect_uri=REDIRECT, state="s",
                                               code_challenge=challenge)
    form = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    answer = sandbox.http.post("/services/oauth2/authorize", data={**form, "action": "deny"})
    assert "error=access_denied" in answer.headers["location"]


def test_zeep_is_really_on_the_wire(sandbox) -> None:
    p = ana(sandbox)
    p.list_users()
    assert isinstance(p._zeep(), zeep.Client)
    assert p._zeep_transport is not None and p._zeep_transport.last_response is not None
    assert p._zeep_transport.last_response.url.startswith(sandbox.base_url + "/services/Soap/u/58.0/")


def test_my_domain_instance_urls_as_the_demo_uses_them(sandbox) -> None:
    def at_domain(username: str, password: str, token: str, org: str) -> SalesforceProvider:
        account = AccountConfig(provider="salesforce", edition="enterprise", credential_mode="per_user_password",
                                instance_url=f"{sandbox.base_url}/salesforce/{org}", auth_mode="password")
        return SalesforceProvider(account=account, transport=sandbox.transport(), credential={
            "username": username, "password": SecretStr(password), "security_token": SecretStr(token)})

    tom = at_domain("tom@tinyco.example", "Demo-Tom-2026", "TKNTOM0001", "tinyco")
    report = tom.test_connection()
    assert report.ok, report.failed_step
    assert report.crm_user_id == "005TINY0000000001"
    assert tom.session().server_url.startswith(f"{sandbox.base_url}/salesforce/tinyco/services/Soap/u/58.0/")
    assert tom.rest_limits().limit == 110_000  # simple-salesforce goes to the host; the session names the org
    stranger = at_domain("pia@profco.example", "Demo-Pia-2026", "TKNPIA0001", "tinyco")
    with pytest.raises(AuthenticationFailed, match="INVALID_LOGIN"):
        stranger.list_users()


@pytest.mark.parametrize("mode", ["html", "truncate"])
def test_html_pages_and_cut_off_bodies_are_malformed_responses(sandbox, mode: str) -> None:
    p = ana(sandbox)
    p.session()  # log in first: login answers are not corrupted
    sandbox.fault("tinyco", corrupt=mode)
    with pytest.raises(MalformedResponse, match="not a valid SOAP message"):
        p.list_users()
