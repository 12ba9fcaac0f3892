"""Real Salesforce bodies (tests/fidelity/salesforce, sources in its SOURCES.md) through our parsers, and
the sandbox's answers to the same requests in the same shape."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import requests
from lxml import etree
from pydantic import SecretStr
from requests.adapters import BaseAdapter

from core.providers.config import AccountConfig, HttpTransport
from core.providers.salesforce import SalesforceProvider, _map_oauth_error, _post_token

HERE = Path(__file__).parent / "salesforce"
SOAPENV = "http://schemas.xmlsoap.org/soap/envelope/"


def body(name: str) -> Any:
    return json.loads((HERE / name).read_text())


class Canned(BaseAdapter):
    """A requests adapter answering by URL path suffix with the real bodies."""

    def __init__(self, routes: dict[str, tuple[int, Any]]) -> None:
        super().__init__()
        self.routes = routes
        self.seen: list[str] = []

    def send(self, request: Any, **kwargs: Any) -> requests.Response:
        path = request.url.split("?")[0]
        self.seen.append(path)
        status, payload = next(v for k, v in self.routes.items() if path.rstrip("/").endswith(k))
        resp = requests.Response()
        resp.status_code = status
        resp._content = json.dumps(payload).encode()
        resp.headers["Content-Type"] = "application/json;charset=UTF-8"
        resp.url = request.url
        resp.request = request
        return resp

    def close(self) -> None:
        pass


def _transport(adapter: Canned) -> HttpTransport:
    s = requests.Session()
    s.mount("https://", adapter)
    return HttpTransport(requests_session=s)


def test_real_jwt_token_answer_parses() -> None:
    adapter = Canned({"/services/oauth2/token": (200, body("oauth_token_jwt_bearer.json"))})
    grant = _post_token(_transport(adapter), "https://login.salesforce.com/services/oauth2/token",
                        {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": "x"}, "jwt_bearer")
    assert grant.instance_url == "https://eu6.salesforce.com"
    assert grant.identity_url == "https://login.salesforce.com/id/xxxxxxxxxxEAI/yyyyyyyyyy" and grant.scope == "id full"


def test_real_audience_error_maps_to_the_fix() -> None:
    err = _map_oauth_error(400, body("oauth_error_audience_invalid.json"), "jwt_bearer")
    assert err.code == "invalid_audience" and "test.salesforce.com" in str(err)


def test_real_limits_answer_becomes_api_usage() -> None:
    adapter = Canned({"/services/oauth2/token": (200, body("oauth_token_jwt_bearer.json")),
                      "/limits": (200, body("rest_limits.json"))})
    account = AccountConfig(provider="salesforce", edition="enterprise", instance_url="https://eu6.my.salesforce.com",
                            credential_mode="api_user", auth_mode="oauth_client_credentials",
                            settings={"client_id": "c"})
    p = SalesforceProvider(account=account, credential={"client_secret": SecretStr("s")}, transport=_transport(adapter))
    usage = p.rest_limits()
    assert (usage.limit, usage.remaining, usage.used) == (100000, 14998, 85002)
    assert any(u.startswith("https://eu6.salesforce.com/services/data/") for u in adapter.seen)


# ---------------------------------------------------------------------------- the sandbox, same shape
def _keys_and_types(d: dict[str, Any]) -> dict[str, type]:
    return {k: type(v) for k, v in d.items()}


def test_sandbox_token_answer_has_the_real_fields(sandbox: Any) -> None:
    r = sandbox.http.post("/services/oauth2/token", data={
        "grant_type": "client_credentials", "client_id": "bigcorp-emea-integration",
        "client_secret": "demo-bigcorp-emea-secret"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    real = _keys_and_types(body("oauth_token_jwt_bearer.json"))
    ours = _keys_and_types(r.json())
    assert {k: real[k] for k in real} == {k: ours.get(k) for k in real}
    assert r.json()["token_type"] == "Bearer" and r.json()["id"].split("/id/")[1].count("/") == 1


def test_sandbox_refuses_a_wrong_audience_with_the_real_body(sandbox: Any) -> None:
    from tests.core.providers.test_salesforce import _rsa_and_cert

    key, cert = _rsa_and_cert()
    sandbox.http.post("/_sandbox/salesforce/bigcorp-emea/apps/bigcorp-emea-integration/certificate",
                      content=cert).raise_for_status()
    assertion = pyjwt.encode({"iss": "bigcorp-emea-integration", "sub": "integration@bigcorp-emea.example",
                              "aud": sandbox.base_url, "exp": int(time.time()) + 120}, key, algorithm="RS256")
    r = sandbox.http.post("/services/oauth2/token", data={
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion})
    assert r.status_code == 400 and r.json() == body("oauth_error_audience_invalid.json")


def test_sandbox_limits_answer_has_the_real_shape(sandbox: Any) -> None:
    token = sandbox.http.post("/services/oauth2/token", data={
        "grant_type": "client_credentials", "client_id": "bigcorp-emea-integration",
        "client_secret": "demo-bigcorp-emea-secret"}).json()
    base = token["instance_url"].removeprefix(sandbox.base_url)
    r = sandbox.http.get(f"{base}/services/data/v58.0/limits/",
                         headers={"Authorization": f"Bearer {token['access_token']}"})
    assert r.status_code == 200
    real, ours = body("rest_limits.json"), r.json()
    assert set(ours["DailyApiRequests"]) >= {"Max", "Remaining"}
    assert all(isinstance(ours["DailyApiRequests"][k], int) for k in ("Max", "Remaining"))
    assert set(real["DailyApiRequests"]) == {"Max", "Remaining"}


def _children(el: etree._Element) -> list[str]:
    return [etree.QName(c).localname for c in el if isinstance(c.tag, str)]


def test_sandbox_soap_login_answer_has_the_real_elements(sandbox: Any) -> None:
    real = etree.fromstring((HERE / "soap_login_response.xml").read_bytes())
    envelope = (
        f'<soapenv:Envelope xmlns:soapenv="{SOAPENV}" xmlns:urn="urn:partner.soap.sforce.com"><soapenv:Body>'
        "<urn:login><urn:username>ana@tinyco.example</urn:username><urn:password>Demo-Ana-2026TKNANA0001"
        "</urn:password></urn:login></soapenv:Body></soapenv:Envelope>")
    r = sandbox.http.post("/services/Soap/u/58.0", content=envelope,
                          headers={"Content-Type": "text/xml; charset=UTF-8", "SOAPAction": "login"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/xml")
    ours = etree.fromstring(r.content)

    def result(doc: etree._Element) -> etree._Element:
        return next(e for e in doc.iter() if isinstance(e.tag, str) and etree.QName(e).localname == "result")

    real_result, our_result = result(real), result(ours)
    # The real answer is the Enterprise WSDL's (simple-salesforce's fixture); the element names of the result
    # are the Partner API's too, in the same order.
    assert _children(our_result) == _children(real_result)
    real_info = next(c for c in real_result if etree.QName(c).localname == "userInfo")
    our_info = next(c for c in our_result if etree.QName(c).localname == "userInfo")
    missing = [n for n in _children(real_info) if n not in _children(our_info)]
    assert missing == []
