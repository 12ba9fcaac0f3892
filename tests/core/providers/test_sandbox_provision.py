"""The sandbox plays an org and an IdP for any new tenant (issue 15): provisioning, restarts, the
console URL in callback URLs, and the plain-http origin that serves browser pages only."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree
from starlette.testclient import TestClient

from sandbox.app import browser_app, create_app

ROOT = Path(__file__).resolve().parents[3]
SCENARIO = ROOT / "data" / "demo" / "sandbox.yaml"
CONSOLE = "http://127.0.0.1:9123"
BROWSER = "http://127.0.0.1:9124"
API = "https://127.0.0.1:9125"
NS_MD = "urn:oasis:names:tc:SAML:2.0:metadata"


def _client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path))
    return TestClient(create_app(SCENARIO, console_url=CONSOLE, browser_url=BROWSER), base_url=API)


def _fields(view: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {f["title"]: f["value"] for f in view["fields"]}


def test_demo_callback_urls_follow_the_console_url_not_port_8501(tmp_path, monkeypatch):
    c = _client(tmp_path, monkeypatch)
    q = {"response_type": "code", "client_id": "tinyco-connected-app", "state": "s"}
    ok = c.get("/salesforce/tinyco/services/oauth2/authorize",
               params={**q, "redirect_uri": f"{CONSOLE}/oauth/salesforce/callback"})
    assert ok.status_code == 200 and "Allow access?" in ok.text
    old = c.get("/salesforce/tinyco/services/oauth2/authorize",
                params={**q, "redirect_uri": "http://127.0.0.1:8501/oauth/salesforce/callback"})
    assert old.status_code == 400 and "redirect_uri_mismatch" in old.text
    hub = c.get("/hubspot/oauth/authorize", params={"client_id": "crmbridge-hubspot-app", "state": "s",
                                                    "redirect_uri": f"{CONSOLE}/oauth/hubspot/callback"})
    assert hub.status_code == 200 and "Connect CRM Bridge to HubSpot" in hub.text


def test_a_provisioned_salesforce_org_answers_with_the_values_it_shows(tmp_path, monkeypatch):
    c = _client(tmp_path, monkeypatch)
    r = c.post("/_sandbox/provision", json={"tenant": "umbrella", "name": "Umbrella", "crm": "salesforce"})
    assert r.status_code == 201, r.text
    view = r.json()
    f = _fields(view)
    assert view["instance_url"] == f["My Domain URL"] == f"{API}/salesforce/umbrella"
    assert f["Callback URL registered on the connected app"] == f"{CONSOLE}/oauth/salesforce/callback"
    # the API user's client credentials work at the org's My Domain (as Salesforce's token endpoint)
    tok = c.post("/salesforce/umbrella/services/oauth2/token", data={
        "grant_type": "client_credentials", "client_id": f["Consumer key (API user — client credentials)"],
        "client_secret": f["Consumer secret (API user — client credentials)"]})
    assert tok.status_code == 200 and tok.json()["access_token"], tok.text
    # a user signs in on the consent page with the password shown, and gets a code for the console
    admin = next(u for u in view["users"] if u["role"] == "admin")
    consent = c.post("/salesforce/umbrella/services/oauth2/authorize", data={
        "response_type": "code", "client_id": f["Consumer key (each user — OAuth)"], "state": "s",
        "redirect_uri": f"{CONSOLE}/oauth/salesforce/callback", "username": admin["username"],
        "password": admin["password"], "action": "allow"}, follow_redirects=False)
    assert consent.status_code in (302, 303) and consent.headers["location"].startswith(
        f"{CONSOLE}/oauth/salesforce/callback?code="), consent.text
    # the tenant's IdP: metadata with its SSO URL on the browser origin
    assert view["idp_metadata_url"] == f"{API}/idp/umbrella/metadata"
    md = etree.fromstring(c.get("/idp/umbrella/metadata").content)
    assert md.get("entityID") == "urn:crmbridge:sandbox:idp:umbrella"
    locations = {e.get("Location") for e in md.iter(f"{{{NS_MD}}}SingleSignOnService")}
    assert locations == {f"{BROWSER}/idp/umbrella/sso"}
    # asking again gives the same org (200), not a second one
    again = c.post("/_sandbox/provision", json={"tenant": "umbrella", "name": "Umbrella", "crm": "salesforce"})
    assert again.status_code == 200 and _fields(again.json()) == f


def test_a_provisioned_dynamics_environment_issues_tokens_and_shares_the_tenants_idp(tmp_path, monkeypatch):
    c = _client(tmp_path, monkeypatch)
    c.post("/_sandbox/provision", json={"tenant": "umbrella", "crm": "salesforce"}).raise_for_status()
    r = c.post("/_sandbox/provision", json={"tenant": "umbrella", "name": "Umbrella", "crm": "dynamics"})
    assert r.status_code == 201, r.text
    f = _fields(r.json())
    assert f["Environment URL"] == f"{API}/dynamics/umbrella-dyn"  # org keys are unique across vendors
    tok = c.post(f"/entra/{f['Directory (tenant) ID']}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": f["Application (client) ID"],
        "client_secret": f["Client secret value"], "scope": f"{f['Environment URL']}/.default"})
    assert tok.status_code == 200, tok.text
    who = c.get("/dynamics/umbrella-dyn/api/data/v9.2/WhoAmI",
                headers={"Authorization": f"Bearer {tok.json()['access_token']}"})
    assert who.status_code == 200, who.text
    assert r.json()["idp_metadata_url"] == f"{API}/idp/umbrella/metadata"
    listed = c.get("/_sandbox/provision/umbrella").json()["orgs"]
    assert [o["crm"] for o in listed] == ["dynamics", "salesforce"]


def test_provisioned_orgs_and_their_idp_key_survive_a_sandbox_restart(tmp_path, monkeypatch):
    c = _client(tmp_path, monkeypatch)
    view = c.post("/_sandbox/provision", json={"tenant": "umbrella", "crm": "salesforce"}).json()
    metadata = c.get("/idp/umbrella/metadata").content
    assert (tmp_path / "provisioned.yaml").stat().st_mode & 0o077 == 0  # demo passwords: owner only
    c.post("/_sandbox/reset").raise_for_status()
    restarted = _client(tmp_path, monkeypatch)
    f = _fields(view)
    tok = restarted.post("/salesforce/umbrella/services/oauth2/token", data={
        "grant_type": "client_credentials", "client_id": f["Consumer key (API user — client credentials)"],
        "client_secret": f["Consumer secret (API user — client credentials)"]})
    assert tok.status_code == 200, tok.text
    cert = etree.fromstring(metadata).findtext(".//{http://www.w3.org/2000/09/xmldsig#}X509Certificate")
    again = etree.fromstring(restarted.get("/idp/umbrella/metadata").content)
    assert again.findtext(".//{http://www.w3.org/2000/09/xmldsig#}X509Certificate") == cert
    assert restarted.get("/_sandbox/provision/umbrella").json()["orgs"][0]["fields"] == view["fields"]


@pytest.mark.parametrize("body", [{"tenant": "Not A Slug", "crm": "salesforce"}, {"tenant": "ok", "crm": "zoho"}])
def test_bad_provisioning_requests_are_refused_naming_the_fix(tmp_path, monkeypatch, body):
    r = _client(tmp_path, monkeypatch).post("/_sandbox/provision", json=body)
    assert r.status_code == 400 and ("slug" in r.json()["error"] or "use one of" in r.json()["error"])
    assert not (tmp_path / "provisioned.yaml").exists()


def test_the_plain_http_origin_serves_sign_in_and_consent_pages_only(tmp_path, monkeypatch):
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path))
    app = create_app(SCENARIO, console_url=CONSOLE, browser_url=BROWSER)
    c = TestClient(browser_app(app), base_url=BROWSER)
    q = {"response_type": "code", "client_id": "tinyco-connected-app", "state": "s",
         "redirect_uri": f"{CONSOLE}/oauth/salesforce/callback"}
    assert c.get("/salesforce/tinyco/services/oauth2/authorize", params=q).status_code == 200
    assert c.get("/idp/bigcorp/sso").status_code == 400  # reached the IdP: no SAMLRequest given
    for path in ("/salesforce/tinyco/services/oauth2/token", "/_sandbox/health", "/idp/bigcorp/metadata",
                 "/_sandbox/provision/bigcorp", "/hubspot/crm/v3/objects/deals"):
        assert c.get(path).status_code == 404, path
    assert c.post("/_sandbox/provision", json={"tenant": "x", "crm": "salesforce"}).status_code == 404


def test_a_provisioned_hubspot_portal_can_install_the_app_back_to_the_console(tmp_path, monkeypatch):
    c = _client(tmp_path, monkeypatch)
    r = c.post("/_sandbox/provision", json={"tenant": "umbrella", "name": "Umbrella", "crm": "hubspot"})
    assert r.status_code == 201, r.text
    f = _fields(r.json())
    assert f["Authorize URL"] == f"{BROWSER}/hubspot/oauth/authorize"  # opened by a browser: the http origin
    q = {"client_id": f["App client ID"], "redirect_uri": f"{CONSOLE}/oauth/hubspot/callback", "state": "s"}
    page = c.get("/hubspot/oauth/authorize", params=q)
    assert page.status_code == 200 and f["Account to pick on the install page"] in page.text
    done = c.post("/hubspot/oauth/authorize", data={**q, "portal": "umbrella", "user": "admin@umbrella.example",
                                                     "decision": "approve"}, follow_redirects=False)
    assert done.status_code == 302 and done.headers["location"].startswith(f"{CONSOLE}/oauth/hubspot/callback?code=")
