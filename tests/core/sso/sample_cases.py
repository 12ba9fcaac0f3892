"""Expected verdicts for every file in ../shared/samples/saml-responses, built from MANIFEST.md.

Each case names the settings, request data, request id and frozen clock its MANIFEST row gives. The
expected verdict is python3-saml's where MANIFEST records a cross-check (those ran ``strict=false``:
signature and structure only), otherwise the source suite's. Encrypted samples whose SP key was left
out of the samples are expected to be rejected with "cannot decrypt". Supporting files (settings,
certificates, trust-anchor metadata) get a verdict of their own kind.

Where our verdict disagrees with a row, the case carries ``divergence`` and docs/saml-divergences.md
lists the file and why.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.sso.lint import lint_metadata, load_certificate
from core.sso.sp import SpEndpoints, build_settings_dict

REAL_NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)  # "the real clock" of python3-saml's tests, frozen
PY3_DEFAULT_REQUEST = {"http_host": "example.com", "script_name": "index.html"}
PITBULK_REQUEST = {"https": "on", "http_host": "pitbulk.no-ip.org", "script_name": "/newonelogin/demo1/index.php?acs"}
STUFF_ACS = b"http://stuff.com/endpoints/endpoints/acs.php"
STALE = (
    "issued in 2014 (IssueInstant) though valid until 2054: python3-saml accepts it, our ACS refuses any "
    "response issued more than 15 minutes (request lifetime + 300 s skew) before now"
)


@dataclass
class Case:
    file: str
    label: str
    expect_ok: bool
    source: str  # where the expectation comes from
    settings: dict[str, Any] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=lambda: dict(PY3_DEFAULT_REQUEST))
    request_id: str | None = None
    now: datetime = REAL_NOW
    expect_code: str | None = None
    expect_name_id: str | None = None
    mutate: Callable[[bytes], bytes] | None = None
    divergence: str | None = None


def load_raw(path: Path) -> bytes:
    """The response XML (``.base64``/``.b64`` files hold base64 of it)."""
    data = path.read_bytes()
    if path.name.endswith((".base64", ".b64")):
        return base64.b64decode(b"".join(data.split()))
    return data


class Samples:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.resp = root / "saml-responses"
        self.md = root / "idp-metadata"

    def py3(self, name: str, *, strict: bool = False, **override: Any) -> dict[str, Any]:
        d = json.loads((self.resp / "python3-saml-settings" / name).read_text())
        if d.pop("custom_base_path", None):
            # customPath's SP certificate (its key was left out of the samples).
            d["sp"]["x509cert"] = (self.resp / "python3-saml-settings" / "customPath-sp.crt").read_text()
            d.setdefault("security", {})["authnRequestsSigned"] = False  # needs the absent key
        d["strict"] = strict
        d.setdefault("security", {})
        for path, value in override.items():
            section, key = path.split("__")
            d.setdefault(section, {})[key] = value
        return d

    def idp_from_metadata(self, path: Path) -> tuple[str, list[str]]:
        r = lint_metadata(path.read_bytes(), now=REAL_NOW)
        assert r.entity_id, path
        return r.entity_id, [c.der_b64 for c in r.signing_certs]

    def keyinfo_cert(self, raw: bytes) -> str:
        """The certificate in the response's own KeyInfo (double-encoded PEM unwrapped) as base64 DER."""
        from cryptography.hazmat.primitives import serialization
        from lxml import etree

        root = etree.fromstring(raw, etree.XMLParser(resolve_entities=False, no_network=True))
        node = next(root.iter("{http://www.w3.org/2000/09/xmldsig#}X509Certificate"))
        cert, _ = load_certificate(node.text or "")
        return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

    def sha1_of(self, cert_file: Path) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        c = x509.load_pem_x509_certificate(cert_file.read_bytes())
        return hashlib.sha1(c.public_bytes(serialization.Encoding.DER)).hexdigest()

    def generic(
        self, *, idp_entity: str, certs: list[str] | None = None, fingerprint: str | None = None,
        sp_entity: str = "http://sp.example.com/metadata", acs: str = "http://sp.example.com/acs",
        strict: bool = False,
    ) -> dict[str, Any]:
        d: dict[str, Any] = {
            "strict": strict,
            "debug": False,
            "sp": {"entityId": sp_entity, "assertionConsumerService": {"url": acs}},
            "idp": {"entityId": idp_entity, "singleSignOnService": {"url": "https://idp.example/sso"}},
            "security": {},
        }
        if certs:
            d["idp"]["x509cert"] = certs[0]
            if len(certs) > 1:
                d["idp"]["x509certMulti"] = {"signing": certs, "encryption": []}
        if fingerprint:
            d["idp"]["certFingerprint"] = fingerprint
            d["idp"]["certFingerprintAlgorithm"] = "sha1"
        return d

    def production(
        self, *, sp_entity: str, acs: str, idp_entity: str, certs: list[str]
    ) -> dict[str, Any]:
        """The settings our ACS builds (strict on), pointed at the row's SP URLs and IdP."""
        from core.sso.sp import IdpConfig

        sp = SpEndpoints(entity_id=sp_entity, acs_url=acs, metadata_url=sp_entity, login_url=acs)
        idp = IdpConfig(entity_id=idp_entity, sso_url="https://idp.example/sso",
                        sso_binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect",
                        signing_certs=tuple(certs))
        return build_settings_dict(sp=sp, idp=idp, strict=True)


def _rewrite_destination(raw: bytes) -> bytes:
    return raw.replace(STUFF_ACS, b"http://example.com/index.html")


def _request_for(url: str) -> dict[str, Any]:
    from urllib.parse import urlsplit

    p = urlsplit(url)
    return {"https": "on" if p.scheme == "https" else "off", "http_host": p.netloc,
            "script_name": p.path + (f"?{p.query}" if p.query else "")}


def response_cases(root: Path) -> list[Case]:
    s = Samples(root)
    R = s.resp
    cases: list[Case] = []

    def add(file: str, label: str, ok: bool, source: str, **kw: Any) -> None:
        cases.append(Case(file=file, label=label, expect_ok=ok, source=source, **kw))

    # --- python3-saml's own fixtures (settings1 unless noted; real clock) -------------------------
    add("py3saml-valid-signed-response-and-assertion.xml.base64", "strict, pitbulk request", True,
        "python3-saml testGetAssertionNotOnOrAfter (verified here)", settings=s.py3("settings1.json", strict=True),
        request=dict(PITBULK_REQUEST), divergence=STALE)
    add("py3saml-valid-signed-response-and-assertion.xml.base64", "strict, default request", False,
        "python3-saml: strict with default request data -> destination error",
        settings=s.py3("settings1.json", strict=True), expect_code="wrong_destination")
    add("py3saml-valid-signed-response-and-assertion.xml.base64", "idp cert NotValidCert", False,
        "python3-saml testIsValid2: idp.x509cert='NotValidCert'",
        settings=s.py3("settings1.json", idp__x509cert="NotValidCert"), expect_code="bad_signature")
    add("py3saml-valid-signed-response2-settings2.xml.base64", "settings2 non-strict", True,
        "python3-saml testIsValid2 (verified here)", settings=s.py3("settings2.json"))
    add("py3saml-valid-signed-message-only-expired-cert.xml.base64", "settings1 non-strict", True,
        "python3-saml testIsValidSign (verified here)", settings=s.py3("settings1.json"))
    add("py3saml-valid-signed-message-only-expired-cert.xml.base64", "settings6 fingerprint", True,
        "python3-saml testIsValidSignFingerprint", settings=s.py3("settings6.json"))
    add("py3saml-valid-signed-assertion-only-expired-cert.xml.base64", "settings1 non-strict", True,
        "python3-saml testIsValidSign", settings=s.py3("settings1.json"))
    add("py3saml-valid-double-signed-expired-cert.xml.base64", "settings1 non-strict", True,
        "python3-saml testIsValidSign", settings=s.py3("settings1.json"))
    add("py3saml-valid-double-signed-settings2.xml.base64", "settings2 non-strict", True,
        "python3-saml testIsValidSign", settings=s.py3("settings2.json"))
    fp10 = "657302a5e11a4794a1e50a705988d66c9377575d"
    add("py3saml-valid-empty-reference-uri-message-signed.xml.base64", "settings10 + fingerprint", True,
        "python3-saml testMessageSignedIsValidSignWithEmptyReferenceURI",
        settings=s.py3("settings10.json", idp__x509cert="", idp__certFingerprint=fp10))
    add("py3saml-valid-empty-reference-uri-assertion-signed.xml.base64", "settings10 + fingerprint", True,
        "python3-saml testAssertionSignedIsValidSignWithEmptyReferenceURI",
        settings=s.py3("settings10.json", idp__x509cert="", idp__certFingerprint=fp10))
    add("py3saml-valid-strict-no-inresponseto-on-response.xml.base64", "strict, pitbulk", True,
        "python3-saml testIsValidWithoutInResponseTo",
        settings=s.py3("settings1.json", strict=True,
                       idp__entityId="https://pitbulk.no-ip.org/simplesaml/saml2/idp/metadata.php",
                       sp__entityId="https://pitbulk.no-ip.org/newonelogin/demo1/metadata.php"),
        request={"https": "on", "http_host": "pitbulk.no-ip.org", "script_name": "newonelogin/demo1/index.php?acs"},
        divergence=STALE)
    for f in ("py3saml-valid-encrypted-assertion-unsigned.xml.base64",
              "py3saml-valid-encrypted-signed-assertion.xml.base64",
              "py3saml-valid-signed-message-encrypted-assertion.xml.base64",
              "py3saml-valid-double-signed-encrypted-assertion.xml.base64"):
        add(f, "settings1, SP key left out", False, "MANIFEST 'Left out on purpose': customPath-sp.key absent",
            settings=s.py3("settings1.json"), expect_code="cannot_decrypt")
    add("py3saml-unsigned-response-no-signature.xml.base64", "settings1", False, "python3-saml testIsValid",
        settings=s.py3("settings1.json"), expect_code="unsigned")
    add("adfs-response-py3saml.xml.base64", "settings1 (no ADFS cert)", False,
        "python3-saml: parse-only fixture; no certificate trusts it", settings=s.py3("settings1.json"))
    add("oracle-idm-opensaml-signed-response-unsigned-assertion.xml", "settings1 (no Oracle cert)", False,
        "python3-saml: parse-only fixture (nameid someone@example.org); settings1's cert is not Oracle's",
        settings=s.py3("settings1.json"), expect_name_id="someone@example.org")
    add("simplesamlphp-signed-response-and-assertion.xml", "settings1", False,
        "python3-saml: parse-only fixture (nameid someone@example.com); signed by another IdP",
        settings=s.py3("settings1.json"), expect_name_id="someone@example.com")
    add("onelogin-response1-signed-other-cert.xml.base64", "settings1", False,
        "python3-saml testIsInValidReference (verified here)", settings=s.py3("settings1.json"),
        expect_code="bad_signature", expect_name_id="support@onelogin.com")
    add("py3saml-invalid-expired.xml.base64", "strict", False, "python3-saml testIsInValidExpired",
        settings=s.py3("settings1.json", strict=True), expect_code="clock")
    add("py3saml-invalid-wrong-destination-unsigned.xml.base64", "strict", False,
        "python3-saml testIsInValidDestination", settings=s.py3("settings1.json", strict=True),
        expect_code="wrong_destination")
    add("py3saml-invalid-audience.xml.base64", "strict, stuff.com request", False,
        "python3-saml testIsInValidAudience", settings=s.py3("settings1.json", strict=True),
        request={"http_host": "stuff.com", "script_name": "endpoints/endpoints/acs.php"},
        expect_code="wrong_audience")
    add("py3saml-invalid-empty-destination.xml.base64", "strict", False, "python3-saml testIsInValidDestination",
        settings=s.py3("settings1.json", strict=True), expect_code="wrong_destination")
    add("py3saml-attack-signature-wrapping.xml.base64", "settings1", False, "python3-saml testValidateSign",
        settings=s.py3("settings1.json"))
    roland_entity, roland_certs = s.idp_from_metadata(R / "pysaml2-keys" / "idp-metadata-roland-trust-anchor.xml")
    add("py3saml-attack-signature-wrapping2-pysaml2-origin.xml.base64", "roland trust anchor", False,
        "cross-check: INVALID 'SAML Response must contain 1 assertion'",
        settings=s.generic(idp_entity=roland_entity, certs=roland_certs), expect_code="assertion_count")
    add("onelogin-attack-signature-wrapping-response4.xml.base64", "settings1", False,
        "python3-saml testDoesNotAllowSignatureWrappingAttack (verified here)", settings=s.py3("settings1.json"),
        expect_code="assertion_count")
    add("py3saml-attack-wrapped-signature-in-entitydescriptor.xml.base64", "settings1", False,
        "python3-saml testOnlyRetrieveAssertionWithIDThatMatchesSignatureReference",
        settings=s.py3("settings1.json"))
    add("onelogin-attack-node-text-comment-injection.xml.base64", "settings1", False,
        "python3-saml testNodeTextAttack: nameid read in full ('support@onelogin.com'); signed by "
        "another cert than settings1's", settings=s.py3("settings1.json"), expect_name_id="support@onelogin.com")
    add("py3saml-invalid-signature-no-keyinfo-bad-sig.xml.base64", "settings1", False,
        "python3-saml testIsInValidNoKey", settings=s.py3("settings1.json"), expect_code="bad_signature")
    add("py3saml-invalid-multiple-assertions.xml.base64", "settings1", False,
        "python3-saml testIsInValidMultipleAssertions (verified here)", settings=s.py3("settings1.json"),
        expect_code="assertion_count")
    add("py3saml-invalid-saml11-not-saml2.xml.base64", "settings1", False, "python3-saml testValidateVersion",
        settings=s.py3("settings1.json"), expect_code="not_a_response")
    add("py3saml-invalid-no-id.xml.base64", "settings1", False, "python3-saml testValidateID",
        settings=s.py3("settings1.json"), expect_code="malformed")
    add("py3saml-invalid-status-responder.xml.base64", "settings1", False, "python3-saml testCheckStatus",
        settings=s.py3("settings1.json"), expect_code="idp_refused")
    add("py3saml-invalid-status-responder-with-message.xml.base64", "settings1", False,
        "python3-saml testCheckStatus", settings=s.py3("settings1.json"), expect_code="idp_refused")
    add("py3saml-invalid-notbefore-in-future.xml.base64", "strict", False, "python3-saml testValidateTimestamps",
        settings=s.py3("settings1.json", strict=True))
    add("py3saml-invalid-notonorafter-passed.xml.base64", "strict", False, "python3-saml testValidateTimestamps",
        settings=s.py3("settings1.json", strict=True))
    for f in ("py3saml-invalid-issuer-assertion.xml.base64", "py3saml-invalid-issuer-response.xml.base64"):
        add(f, "strict, Destination rewritten", False, "python3-saml testIsInValidIssuer",
            settings=s.py3("settings1.json", strict=True), mutate=_rewrite_destination, expect_code="wrong_issuer")
    for f in ("py3saml-invalid-subjectconfirmation-recipient.xml.base64",
              "py3saml-invalid-subjectconfirmation-inresponseto.xml.base64",
              "py3saml-invalid-subjectconfirmation-notonorafter-passed.xml.base64",
              "py3saml-invalid-subjectconfirmation-notbefore-future.xml.base64",
              "py3saml-invalid-subjectconfirmation-no-method.xml.base64",
              "py3saml-invalid-subjectconfirmation-no-data.xml.base64"):
        add(f, "strict, Destination rewritten", False, "python3-saml testIsInValidSubjectConfirmation",
            settings=s.py3("settings1.json", strict=True), mutate=_rewrite_destination,
            expect_code="subject_confirmation")
    add("py3saml-invalid-sessionnotonorafter-passed.xml.base64", "strict, Destination rewritten", False,
        "python3-saml testIsInValidSessionIndex", settings=s.py3("settings1.json", strict=True),
        mutate=_rewrite_destination, expect_code="clock")
    add("py3saml-invalid-no-conditions.xml.base64", "strict", False, "python3-saml testCheckOneCondition",
        settings=s.py3("settings1.json", strict=True), mutate=_rewrite_destination, expect_code="malformed")
    add("py3saml-invalid-no-authnstatement.xml.base64", "strict", False,
        "python3-saml testCheckOneAuthnStatement", settings=s.py3("settings1.json", strict=True),
        mutate=_rewrite_destination, expect_code="malformed")
    add("py3saml-invalid-encrypted-attribute.xml.base64", "strict", False, "python3-saml testIsInValidEncAttrs",
        settings=s.py3("settings1.json", strict=True), mutate=_rewrite_destination)
    add("py3saml-invalid-duplicated-attribute-name.xml.base64", "settings1", False,
        "python3-saml testIsInValidDuplicatedAttrs", settings=s.py3("settings1.json"))
    add("py3saml-invalid-no-attributestatement-signed.xml.base64", "strict", False,
        "python3-saml testIsValidOptionalStatement", settings=s.py3("settings1.json", strict=True),
        mutate=_rewrite_destination)
    add("py3saml-invalid-no-signature-no-attributestatement.xml.base64", "settings1", False,
        "python3-saml testIsInValidNoStatement", settings=s.py3("settings1.json"), expect_code="unsigned")
    add("py3saml-invalid-wrong-spnamequalifier.xml.base64", "strict", False, "python3-saml testReturnNameId",
        settings=s.py3("settings1.json", strict=True), mutate=_rewrite_destination)
    add("py3saml-invalid-empty-nameid.xml.base64", "strict", False, "python3-saml testReturnNameId",
        settings=s.py3("settings1.json", strict=True), mutate=_rewrite_destination)
    add("py3saml-invalid-no-nameid.xml.base64", "strict", False, "python3-saml testReturnNameId",
        settings=s.py3("settings1.json", strict=True), mutate=_rewrite_destination)
    add("py3saml-invalid-no-issuer-in-assertion.xml.base64", "strict", False, "python3-saml testGetIssuers",
        settings=s.py3("settings1.json", strict=True), mutate=_rewrite_destination)
    add("py3saml-invalid-no-status.xml.base64", "settings1", False, "python3-saml utils_test get_status",
        settings=s.py3("settings1.json"), expect_code="malformed")
    add("py3saml-invalid-no-status-code.xml.base64", "settings1", False, "python3-saml utils_test get_status",
        settings=s.py3("settings1.json"), expect_code="malformed")

    # --- ruby-saml fixtures ----------------------------------------------------------------------------
    add("broken-xxe-billion-laughs-response-rubysaml.xml", "any settings", False,
        "ruby-saml 'Prevent XEE attack': no Doctype nodes allowed", settings=s.py3("settings1.json"),
        expect_code="dtd_forbidden")
    add("attack-xpath-eval-injection-reference-uri-rubysaml.xml", "settings1", False,
        "ruby-saml 'not allow arbitrary code execution'", settings=s.py3("settings1.json"))
    for f, ok, why in (
        ("adfs-response-rsa-sha1-rubysaml.xml", False,
         "cross-check: xmlsec 'failed to verify' even with the decoded cert"),
        ("adfs-response-rsa-sha256-rubysaml.xml", True, "cross-check: decoded cert validate_sign() = True"),
        ("adfs-response-rsa-sha384-rubysaml.xml", False, "cross-check: xmlsec 'failed to verify'"),
        ("adfs-response-rsa-sha512-rubysaml.xml", True, "cross-check: decoded cert validate_sign() = True"),
        ("adfs-response-default-xmlns-digest-rubysaml.xml", True, "cross-check: decoded cert validate_sign() = True"),
    ):
        raw = load_raw(R / f)
        issuer = "http://login.example.com/issuer"
        try:
            from lxml import etree

            root = etree.fromstring(raw, etree.XMLParser(resolve_entities=False, no_network=True))
            iss = root.find("{urn:oasis:names:tc:SAML:2.0:assertion}Issuer")
            if iss is None:
                iss = next(root.iter("{urn:oasis:names:tc:SAML:2.0:assertion}Issuer"))
            issuer = (iss.text or "").strip()
        except StopIteration:
            pass
        add(f, "non-strict, KeyInfo cert unwrapped", ok, why,
            settings=s.generic(idp_entity=issuer, certs=[s.keyinfo_cert(raw)]),
            expect_code=None if ok else "bad_signature")
    add("adfs-response-unsigned-encrypted-assertion-rubysaml.xml", "ruby-saml.key left out", False,
        "MANIFEST 'Left out on purpose': ruby-saml.key absent", settings=s.py3("settings1.json"),
        expect_code="cannot_decrypt")
    add("starfieldtms-signed-response-time-window-rubysaml.xml.base64", "non-strict, fingerprint", True,
        "cross-check: VALID with certFingerprint",
        settings=s.generic(idp_entity="https://saml.beeline.com",
                           fingerprint="8D:BA:53:8E:A3:B6:F9:F1:69:6C:BB:D9:D8:BD:41:B3:AC:4F:9D:4D"),
        now=datetime(2012, 11, 28, 17, 55, tzinfo=UTC))
    add("attack-signature-wrapping-encrypted-assertion-rubysaml.xml.base64", "fingerprint, key left out", False,
        "ruby-saml: INVALID 'Found an invalid Signed Element'",
        settings=s.generic(idp_entity="https://app.onelogin.com/saml/metadata/xxx",
                           fingerprint="385b1eec71143f00db6af936e2ea12a28771d72c"))
    add("attack-concealed-signed-assertion-rubysaml.xml", "settings1", False,
        "ruby-saml: 'SAML Response must contain 1 assertion'", settings=s.py3("settings1.json"),
        expect_code="assertion_count")
    add("attack-doubled-signed-assertion-rubysaml.xml", "settings1", False,
        "ruby-saml: 'SAML Response must contain 1 assertion'", settings=s.py3("settings1.json"),
        expect_code="assertion_count")
    add("attack-duplicated-id-multiple-signed-rubysaml.xml.base64", "fingerprint C5:19:85:D9…", False,
        "ruby-saml: 'Duplicated ID. SAML Response rejected'",
        settings=s.generic(idp_entity="idp", fingerprint="C5:19:85:D9:47:F1:BE:57:08:20:25:05:08:46:EB:27:F6:CA:B7:83"),
        expect_code="duplicate_id")
    add("rubysaml-invalid-status-requester-unsupportedbinding.xml.base64", "settings1", False,
        "ruby-saml: status Requester => UnsupportedBinding", settings=s.py3("settings1.json"),
        expect_code="idp_refused")
    for f in ("rubysaml-valid-signed-message-encrypted-unsigned-assertion.xml.base64",
              "rubysaml-valid-signed-message-encrypted-signed-assertion.xml.base64",
              "rubysaml-valid-unsigned-message-encrypted-signed-assertion.xml.base64",
              "rubysaml-invalid-nothing-signed-encrypted-assertion.xml.base64"):
        add(f, "ruby-saml.key left out", False, "MANIFEST 'Left out on purpose': ruby-saml.key absent",
            settings=s.generic(idp_entity="https://pitbulk.no-ip.org/simplesaml/saml2/idp/metadata.php",
                               fingerprint="EE:17:4E:FB:A8:81:71:12:0D:2A:78:43:BC:E7:0C:07:58:79:F4:F4",
                               sp_entity="http://rubysaml.com:3000/saml/metadata", acs="http://rubysaml.com:3000/saml/acs"),
            now=datetime(2015, 3, 19, 14, 30, 31, tzinfo=UTC), expect_code="cannot_decrypt")
    ruby_fp = s.sha1_of(R / "ruby-saml-certs" / "ruby-saml.crt")
    add("attack-comment-injection-nameid-rubysaml.xml.base64", "fingerprint SHA1(ruby-saml.crt)", True,
        "ruby-saml: name_id must be the full 'test@onelogin.com'",
        settings=s.generic(idp_entity="https://app.onelogin.com/saml2", fingerprint=ruby_fp),
        expect_name_id="test@onelogin.com")
    add("attack-cdata-injection-nameid-rubysaml.xml.base64", "fingerprint SHA1(ruby-saml.crt)", False,
        "ruby-saml: INVALID 'Invalid Signature on SAML Response'",
        settings=s.generic(idp_entity="https://app.onelogin.com/saml2", fingerprint=ruby_fp),
        expect_code="bad_signature")

    # --- crewjam/saml real responses (frozen clocks) -----------------------------------------------------
    ol_entity, ol_certs = s.idp_from_metadata(s.md / "onelogin-metadata-503983-post-and-soap.xml")
    ngrok_sp, ngrok_acs = "https://29ee6d2e.ngrok.io/saml/metadata", "https://29ee6d2e.ngrok.io/saml/acs"
    add("onelogin-real-response-2016-crewjam.b64", "non-strict (cross-check)", True,
        "cross-check: VALID, nameid ross@kndr.org", settings=s.generic(idp_entity=ol_entity, certs=ol_certs),
        expect_name_id="ross@kndr.org")
    add("onelogin-real-response-2016-crewjam.b64", "our strict ACS settings, 2016-01-05 17:53:12", True,
        "crewjam TestSPCanHandleOneloginResponse",
        settings=s.production(sp_entity=ngrok_sp, acs=ngrok_acs, idp_entity=ol_entity, certs=ol_certs),
        request=_request_for(ngrok_acs), request_id="id-d40c15c104b52691eccf0a2a5c8a15595be75423",
        now=datetime(2016, 1, 5, 17, 53, 12, tzinfo=UTC), expect_name_id="ross@kndr.org")
    add("onelogin-real-response-2016-crewjam.b64", "our strict ACS settings, today", False,
        "expired by the real clock", settings=s.production(sp_entity=ngrok_sp, acs=ngrok_acs,
                                                           idp_entity=ol_entity, certs=ol_certs),
        request=_request_for(ngrok_acs), request_id="id-d40c15c104b52691eccf0a2a5c8a15595be75423")
    g_entity, g_certs = s.idp_from_metadata(s.md / "google-workspace-metadata-C02dfl1r1.xml")
    add("google-workspace-real-response-2016-crewjam.b64", "non-strict (cross-check)", True,
        "cross-check: VALID, nameid ross@octolabs.io", settings=s.generic(idp_entity=g_entity, certs=g_certs),
        expect_name_id="ross@octolabs.io")
    add("google-workspace-real-response-2016-crewjam.b64", "our strict ACS settings, 2016-01-05 16:55:39", True,
        "crewjam TestSPCanHandlePlaintextResponse",
        settings=s.production(sp_entity=ngrok_sp, acs=ngrok_acs, idp_entity=g_entity, certs=g_certs),
        request=_request_for(ngrok_acs), request_id="id-fd419a5ab0472645427f8e07d87a3a5dd0b2e9a6",
        now=datetime(2016, 1, 5, 16, 55, 39, tzinfo=UTC), expect_name_id="ross@octolabs.io")
    add("google-workspace-real-response-2016-crewjam.b64", "NameID comment injected", False,
        "crewjam TestSPRejectsInjectedComment (CVE-2018-7340)",
        settings=s.generic(idp_entity=g_entity, certs=g_certs),
        mutate=lambda b: b.replace(b"ross@octolabs.io<", b"ross@octolabs.io<!-- and a comment -->.example.com<", 1),
        expect_code="bad_signature")
    add("google-workspace-response-for-malformed-attr-test-crewjam.b64", "as-is", True,
        "crewjam TestSPRejectsMalformedResponse (as-is valid)", settings=s.generic(idp_entity=g_entity, certs=g_certs))
    add("google-workspace-response-for-malformed-attr-test-crewjam.b64", "'::foo=\"bar\"' injected", False,
        "crewjam TestSPRejectsMalformedResponse", settings=s.generic(idp_entity=g_entity, certs=g_certs),
        mutate=lambda b: b.replace(b"<saml2p:Response", b'<saml2p:Response ::foo="bar"', 1),
        expect_code="not_well_formed")
    ts_entity, ts_certs = s.idp_from_metadata(s.md / "shibboleth-testshib-idp-metadata-crewjam.xml")
    for f in ("shibboleth-testshib-encrypted-response-2015-crewjam.xml",
              "shibboleth-testshib-response-no-issuer-crewjam.xml"):
        add(f, "sp_key.pem left out", False, "MANIFEST 'Left out on purpose': sp_key.pem absent",
            settings=s.generic(idp_entity=ts_entity, certs=ts_certs, sp_entity="https://15661444.ngrok.io/saml2/metadata",
                               acs="https://15661444.ngrok.io/saml2/acs"),
            now=datetime(2015, 12, 1, 1, 57, 9, tzinfo=UTC), expect_code="cannot_decrypt")
    sw_entity, sw_certs = s.idp_from_metadata(s.md / "secureworks-idp-metadata.xml")
    sw_acs = "https://preview.docrocket-ross.test.octolabs.io/saml/acs"
    add("secureworks-assertion-signed-not-response-crewjam.xml", "non-strict (cross-check)", True,
        "cross-check: VALID, nameid rkinder@secureworks.com", settings=s.generic(idp_entity=sw_entity, certs=sw_certs),
        expect_name_id="rkinder@secureworks.com")
    add("secureworks-keyinfo-rsakeyvalue-not-x509-crewjam.xml", "non-strict (cross-check)", True,
        "cross-check: VALID", settings=s.generic(idp_entity=sw_entity, certs=sw_certs))
    add("secureworks-attack-multiple-assertions-evil-crewjam.xml", "non-strict", False,
        "cross-check: INVALID 'SAML Response must contain 1 assertion'",
        settings=s.generic(idp_entity=sw_entity, certs=sw_certs), expect_code="assertion_count")
    del sw_acs
    ss_entity, ss_certs = s.idp_from_metadata(s.md / "simplesamlphp-idp-example-metadata.xml")
    add("simplesamlphp-signed-assertion-response-2014-crewjam.b64", "non-strict (cross-check)", True,
        "cross-check: VALID", settings=s.generic(idp_entity=ss_entity, certs=ss_certs),
        expect_name_id="_ce3d2948b4cf20146dee0a0b3dd6f69b6cf86f62d7")
    for f, fs in (("attack-xsw-permutation-one-crewjam.b64", (ol_entity, ol_certs)),
                  ("attack-xsw-permutation-two-crewjam.b64", (ol_entity, ol_certs)),
                  ("attack-xsw-permutation-three-crewjam.b64", (ss_entity, ss_certs)),
                  ("attack-xsw-permutation-four-crewjam.b64", (ss_entity, ss_certs))):
        add(f, "trust anchor of the row", False, "cross-check: INVALID 'SAML Response must contain 1 assertion'",
            settings=s.generic(idp_entity=fs[0], certs=fs[1]), expect_code="assertion_count")

    # --- others ----------------------------------------------------------------------------------------------
    add("entra-id-azure-ad-signed-assertion-2017.xml", "as a response", False,
        "MANIFEST: a Response-level validator rejects it as 'not a samlp:Response'",
        settings=s.generic(idp_entity="https://sts.windows.net/add29489-7269-41f4-8841-b63c95564420/"),
        expect_code="not_a_response")
    cz_raw = load_raw(R / "cz-nia-eidentita-signed-response-and-assertion.xml")
    add("cz-nia-eidentita-signed-response-and-assertion.xml", "non-strict, CZ cert", True,
        "EnvelopedSignatureReaderTests: both signatures verify with the CZ certificate",
        settings=s.generic(idp_entity="https://mojeid.regtest.nic.cz/saml/idp.xml", certs=[s.keyinfo_cert(cz_raw)]))
    ms_entity, ms_certs = s.idp_from_metadata(s.md / "mocksaml-idp-metadata.xml")
    add("mocksaml-jackson-identity-federation-response.xml", "non-strict (cross-check)", True,
        "cross-check: VALID against mocksaml-idp-metadata.xml",
        settings=s.generic(idp_entity=ms_entity, certs=ms_certs),
        expect_name_id="kiran@boxyhq.com",
        divergence="the file's NameID and email are jackson@example.com; MANIFEST's claims come from jackson's stub")
    add("okta-encrypted-assertion-pysaml2.xml", "test_1/test_2 keys left out", False,
        "MANIFEST 'Left out on purpose': keys absent -> rejected with 'cannot decrypt'",
        settings=s.py3("settings1.json"), expect_code="cannot_decrypt",
        divergence="a bare EncryptedAssertion: refused as not a samlp:Response before any decryption is tried")
    add("okta-encrypted-assertion-pysaml2.expected-decrypted-assertion.xml", "as a response", False,
        "equality target of the Okta decryption test: a bare Assertion, not a Response",
        settings=s.py3("settings1.json"), expect_code="not_a_response")
    add("pysaml2-invalid-assertion-signature-false-signed.xml", "roland trust anchor", False,
        "pysaml2 test_false_sign; cross-check INVALID 'Signature validation failed'",
        settings=s.generic(idp_entity=roland_entity, certs=roland_certs), expect_code="bad_signature")
    for f in ("attack-pysaml2-signed-xsw-assertion-wrapper.xml", "attack-pysaml2-signed-xsw-assertion-extensions.xml",
              "attack-pysaml2-signed-xsw-assertion-assertion.xml",
              "attack-pysaml2-signed-xsw-assertion-in-assertion-first-sig.xml",
              "attack-pysaml2-signed-xsw-response-in-response-first-sig.xml"):
        add(f, "roland trust anchor", False, "pysaml2 test_xsw; cross-check INVALID 'must contain 1 assertion'",
            settings=s.generic(idp_entity=roland_entity, certs=roland_certs), expect_code="assertion_count")
    return cases


SUPPORT_KINDS = {
    ".json": "python3-saml settings",
    ".crt": "certificate",
    ".pem": "certificate",
    ".xml": "trust-anchor IdP metadata",
}
