"""Real-world material (../shared/samples/salesforce): our shipped WSDL agrees with the real Partner
WSDL, real responses parse through it, real faults map to the right errors, and the sandbox speaks
the same shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import zeep
from lxml import etree

from core.errors import AuthenticationFailed, SessionExpired
from core.providers.base import OpportunityChange
from core.providers.salesforce import WSDL_PATH, _push_result, map_fault, record_fields
from tests.conftest import samples_dir

pytestmark = pytest.mark.samples

WSDL = "http://schemas.xmlsoap.org/wsdl/"
SOAP = "http://schemas.xmlsoap.org/wsdl/soap/"
XSD = "http://www.w3.org/2001/XMLSchema"


def _real_wsdl() -> Path:
    return samples_dir("salesforce") / "partner-wsdl-api-v58-wsdl2zksforce.wsdl"


def _qname(el: etree._Element, value: str | None) -> str | None:
    if value is None:
        return None
    prefix, _, local = value.rpartition(":")
    return f"{{{el.nsmap.get(prefix or None, '')}}}{local}"


class Wsdl:
    def __init__(self, path: Path) -> None:
        self.doc = etree.parse(str(path), etree.XMLParser(resolve_entities=False, no_network=True))
        self.root = self.doc.getroot()
        self.types: dict[str, etree._Element] = {}
        self.elements: dict[str, etree._Element] = {}
        for schema in self.root.iter(f"{{{XSD}}}schema"):
            tns = schema.get("targetNamespace")
            for child in schema:
                name = child.get("name")
                if name is None:
                    continue
                key = f"{{{tns}}}{name}"
                if child.tag in (f"{{{XSD}}}complexType", f"{{{XSD}}}simpleType"):
                    self.types[key] = child
                elif child.tag == f"{{{XSD}}}element":
                    self.elements[key] = child

    def section(self, tag: str) -> dict[str, etree._Element]:
        return {el.get("name"): el for el in self.root.findall(f"{{{WSDL}}}{tag}")}


def _particles(node: etree._Element) -> list[tuple]:
    """The content model of a type or element: every element/any in document order, with occurrence."""
    out: list[tuple] = []
    for el in node.iter(f"{{{XSD}}}element", f"{{{XSD}}}any", f"{{{XSD}}}extension", f"{{{XSD}}}restriction",
                        f"{{{XSD}}}enumeration"):
        if el is node:
            continue
        tag = etree.QName(el).localname
        if tag == "element":
            out.append(("element", el.get("name"), _qname(el, el.get("type")), el.get("minOccurs", "1"),
                        el.get("maxOccurs", "1"), el.get("nillable", "false")))
        elif tag == "any":
            out.append(("any", el.get("namespace"), el.get("minOccurs", "1"), el.get("maxOccurs", "1")))
        elif tag in {"extension", "restriction"}:
            out.append((tag, _qname(el, el.get("base"))))
    return out


def _enumerations(node: etree._Element) -> set[str]:
    return {e.get("value") for e in node.iter(f"{{{XSD}}}enumeration")}


def test_every_type_and_element_we_declare_matches_the_real_partner_wsdl() -> None:
    ours, real = Wsdl(WSDL_PATH), Wsdl(_real_wsdl())
    assert ours.root.get("targetNamespace") == real.root.get("targetNamespace") == "urn:partner.soap.sforce.com"
    assert ours.types and ours.elements
    for key, node in ours.types.items():
        assert key in real.types, f"type {key} is not in the real WSDL"
        if etree.QName(node).localname == "simpleType":
            assert _particles(node)[:1] == _particles(real.types[key])[:1], f"{key}: base differs"
            extra = _enumerations(node) - _enumerations(real.types[key])
            assert not extra, f"{key}: values the real WSDL does not have: {sorted(extra)}"
        else:
            assert _particles(node) == _particles(real.types[key]), f"type {key} differs from the real one"
    for key, node in ours.elements.items():
        assert key in real.elements, f"element {key} is not in the real WSDL"
        assert _particles(node) == _particles(real.elements[key]), f"element {key} differs"
        assert _qname(node, node.get("type")) == _qname(real.elements[key], real.elements[key].get("type"))


def test_every_operation_message_and_header_matches_the_real_partner_wsdl() -> None:
    ours, real = Wsdl(WSDL_PATH), Wsdl(_real_wsdl())
    real_msgs, our_msgs = real.section("message"), ours.section("message")
    for name, msg in our_msgs.items():
        assert name in real_msgs, f"message {name} is not in the real WSDL"
        real_parts = {p.get("name"): _qname(p, p.get("element")) for p in real_msgs[name]}
        for part in msg:
            assert real_parts.get(part.get("name")) == _qname(part, part.get("element")), f"{name}.{part.get('name')}"
    real_ops = {o.get("name"): o for o in real.section("portType")["Soap"]}
    ours_ops = {o.get("name"): o for o in ours.section("portType")["Soap"]}
    assert set(ours_ops) == {"login", "getUserInfo", "query", "queryMore", "create", "update", "upsert", "logout"}
    for name, op in ours_ops.items():
        r = real_ops[name]
        for io in ("input", "output"):
            assert op.find(f"{{{WSDL}}}{io}").get("message") == r.find(f"{{{WSDL}}}{io}").get("message")
        faults = {f.get("name") for f in op.findall(f"{{{WSDL}}}fault")}
        assert faults <= {f.get("name") for f in r.findall(f"{{{WSDL}}}fault")}, name
    real_bind = {o.get("name"): o for o in real.section("binding")["SoapBinding"].findall(f"{{{WSDL}}}operation")}
    for op in ours.section("binding")["SoapBinding"].findall(f"{{{WSDL}}}operation"):
        r = real_bind[op.get("name")]
        for io in ("input", "output"):
            ours_h = {h.get("part") for h in op.find(f"{{{WSDL}}}{io}").findall(f"{{{SOAP}}}header")}
            real_h = {h.get("part") for h in r.find(f"{{{WSDL}}}{io}").findall(f"{{{SOAP}}}header")}
            assert ours_h <= real_h, f"{op.get('name')} {io} headers {ours_h - real_h} are not in the real binding"
    # the headers we rely on are really there
    assert "QueryOptions" in {h.get("part") for h in real_bind["query"].iter(f"{{{SOAP}}}header")}
    assert "LimitInfoHeader" in {h.get("part") for h in real_bind["create"].iter(f"{{{SOAP}}}header")}


@pytest.fixture(scope="module")
def client() -> zeep.Client:
    return zeep.Client(str(WSDL_PATH), settings=zeep.Settings(strict=False, forbid_dtd=True))


def _reply(client: zeep.Client, op: str, name: str, status: int = 200):
    r = requests.Response()
    r.status_code = status
    r._content = (samples_dir("salesforce") / name).read_bytes()
    r.headers["Content-Type"] = "text/xml; charset=utf-8"
    binding = client.service._binding
    return binding.process_reply(client, binding.get(op), r)


def test_real_login_responses_parse(client: zeep.Client) -> None:
    res = _reply(client, "login", "soapforce-login-response.xml")
    assert res.sessionId.startswith("00DA0000000YpZ4!")
    assert res.serverUrl == "https://na7.salesforce.com/services/Soap/u/28.0/00DA0000000YpZ4"
    assert res.userInfo.organizationId == "00DA0000000YpZ4MAK"
    assert res.userInfo.sessionSecondsValid == 7200
    meta = _reply(client, "login", "metaforce-login-success-response.xml")
    assert meta.serverUrl == "https://na12-api.salesforce.com/services/Soap/u/23.0/00DU0000000Ilbh"


def test_real_get_user_info_and_query_responses_parse(client: zeep.Client) -> None:
    info = _reply(client, "getUserInfo", "soapforce-get-user-info-response.xml").body.result
    assert (info.userEmail, info.userFullName) == ("johndoe@email.com", "John Doe")
    result = _reply(client, "query", "soapforce-query-response.xml").body.result
    assert result.done is True and result.size == 2
    rows = [record_fields(r) for r in result.records]
    assert [r["Name"] for r in rows] == ["Opportunity 1", "Opportunity 2"]
    assert rows[0]["Id"] == "006A000000LZhwNIAT" and rows[1]["StageName"] == "Value Proposition"


def test_real_create_failure_parses_into_a_per_record_error(client: zeep.Client) -> None:
    results = _reply(client, "create", "soapforce-create-response-failure.xml").body.result
    pr = _push_result(OpportunityChange(idempotency_key="k1", fields={}), results[0], created=False)
    assert not pr.ok
    assert pr.error_code == "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY"
    assert "insufficient access" in (pr.error or "")
    ok = _reply(client, "create", "soapforce-create-response.xml").body.result[0]
    assert _push_result(OpportunityChange(idempotency_key="k2", fields={}), ok, created=True).crm_id == (
        "006A000000LbiizIAB")


def test_real_faults_map_to_the_right_errors(client: zeep.Client) -> None:
    with pytest.raises(zeep.exceptions.Fault) as login_fault:
        _reply(client, "login", "fault-INVALID_LOGIN-metaforce.xml", 500)
    err = map_fault(login_fault.value)
    assert isinstance(err, AuthenticationFailed) and err.code == "INVALID_LOGIN"
    assert "security token" in str(err)
    with pytest.raises(zeep.exceptions.Fault) as session_fault:
        _reply(client, "query", "fault-INVALID_SESSION_ID-metaforce.xml", 500)
    err2 = map_fault(session_fault.value)
    assert isinstance(err2, SessionExpired) and err2.code == "INVALID_SESSION_ID"


def _shape(xml: bytes) -> list[str]:
    root = etree.fromstring(xml)
    return [etree.QName(el).localname for el in root.iter() if isinstance(el.tag, str)]


def test_the_sandbox_speaks_the_same_shapes_as_the_real_service(sandbox) -> None:
    envelope = (
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:urn="urn:partner.soap.sforce.com"><soapenv:Body><urn:login>'
        "<urn:username>{u}</urn:username><urn:password>{p}</urn:password>"
        "</urn:login></soapenv:Body></soapenv:Envelope>"
    )
    headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}
    bad = sandbox.http.post("/services/Soap/u/58.0", headers=headers,
                            content=envelope.format(u="ana@tinyco.example", p="nope"))
    real_bad = (samples_dir("salesforce") / "fault-INVALID_LOGIN-metaforce.xml").read_bytes()
    assert bad.status_code == 500
    assert _shape(bad.content) == _shape(real_bad)
    assert b"<faultcode>sf:INVALID_LOGIN</faultcode>" in bad.content
    good = sandbox.http.post("/services/Soap/u/58.0", headers=headers,
                             content=envelope.format(u="ana@tinyco.example", p="Demo-Ana-2026TKNANA0001"))
    real_good = (samples_dir("salesforce") / "metaforce-login-success-response.xml").read_bytes()
    ours = set(_shape(good.content))
    assert set(_shape(real_good)) <= ours  # every element the real response has, we have
