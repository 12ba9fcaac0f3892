"""The per-tenant SAML service provider: python3-saml settings built per tenant (``strict`` on),
SP key material, AuthnRequests for both bindings, signed SP metadata, and response validation.

Nothing here touches the database: core.sso's service modules (metadata, keys, authn, signin, …) load a
tenant's configuration and keys and call these functions. python3-saml reads the time from
``OneLogin_Saml2_Utils.now()``; to validate under an injected clock (tests, the real-sample verdicts) this
module wraps that function once so a context variable can override it (``saml_clock``) — without the
override it is the real clock.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import contextvars
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlsplit

import onelogin.saml2 as _saml2_package
import xmlsec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from onelogin.saml2.authn_request import OneLogin_Saml2_Authn_Request
from onelogin.saml2.constants import OneLogin_Saml2_Constants
from onelogin.saml2.metadata import OneLogin_Saml2_Metadata
from onelogin.saml2.response import OneLogin_Saml2_Response
from onelogin.saml2.settings import OneLogin_Saml2_Settings
from onelogin.saml2.utils import OneLogin_Saml2_Utils
from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

from core.clock import utcnow
from core.errors import InvalidInput
from core.settings import get_settings
from core.sso.lint import BINDING_POST, BINDING_REDIRECT, parse_xs_datetime
from core.sso.parse import parse_xml

log = logging.getLogger(__name__)
onelogin_saml2_dir = Path(_saml2_package.__file__ or ".").parent

NS_SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
NS_SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
NS_DS = "http://www.w3.org/2000/09/xmldsig#"
NAMEID_UNSPECIFIED = "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"
MAX_CLOCK_SKEW = timedelta(seconds=OneLogin_Saml2_Constants.ALLOWED_CLOCK_DRIFT)  # 300 s, both ways
REQUEST_TTL = timedelta(minutes=10)
MAX_RESPONSE_B64 = 2 * 1024 * 1024
SP_KEY_DAYS = 730
EMAIL_ATTRIBUTES = (
    "email",
    "mail",
    "emailaddress",
    "emailAddress",
    "Email",
    "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress",
    "urn:oid:0.9.2342.19200300.100.1.3",
)
SHA1_URIS = ("http://www.w3.org/2000/09/xmldsig#rsa-sha1", "http://www.w3.org/2000/09/xmldsig#sha1")

# --- the clock python3-saml sees ------------------------------------------------------------------------

_saml_now: contextvars.ContextVar[datetime | None] = contextvars.ContextVar("crmbridge_saml_now", default=None)
_real_saml_now = OneLogin_Saml2_Utils.now


def _now_for_saml() -> int:
    override = _saml_now.get()
    if override is None:
        return int(_real_saml_now())
    return calendar.timegm(override.astimezone(UTC).utctimetuple())


if not getattr(OneLogin_Saml2_Utils.now, "_crmbridge", False):
    _now_for_saml._crmbridge = True  # type: ignore[attr-defined]
    OneLogin_Saml2_Utils.now = staticmethod(_now_for_saml)  # type: ignore[method-assign]


# --- python3-saml's schema check, compiled once ----------------------------------------------------------
# python3-saml re-reads and compiles its XSD (saml-schema-protocol-2.0.xsd and its imports) for every
# response it validates: about half of a strict validation's time. Our validations check against the
# very same schema files, compiled once per thread (lxml schema objects are not shared across threads).

_schema_tls = threading.local()
_real_validate_xml = OneLogin_Saml2_XML.validate_xml
_cached_schema: contextvars.ContextVar[bool] = contextvars.ContextVar("crmbridge_cached_schema", default=False)


def _compiled_schema(name: str) -> etree.XMLSchema:
    cache: dict[str, etree.XMLSchema] | None = getattr(_schema_tls, "schemas", None)
    if cache is None:
        cache = _schema_tls.schemas = {}
    schema = cache.get(name)
    if schema is None:
        path = Path(onelogin_saml2_dir) / "schemas" / name
        schema = cache[name] = etree.XMLSchema(etree.parse(str(path)))
    return schema


def _validate_xml(xml: Any, schema: str, debug: bool = False) -> Any:
    if not _cached_schema.get():
        return _real_validate_xml(xml, schema, debug)
    try:
        xml = OneLogin_Saml2_XML.to_etree(xml)
    except Exception:
        return "unloaded_xml"
    if not _compiled_schema(schema).validate(xml):
        return "invalid_xml"
    return xml


if not getattr(OneLogin_Saml2_XML.validate_xml, "_crmbridge", False):
    _validate_xml._crmbridge = True  # type: ignore[attr-defined]
    OneLogin_Saml2_XML.validate_xml = staticmethod(_validate_xml)  # type: ignore[method-assign]


@contextmanager
def cached_schema(enabled: bool = True) -> Iterator[None]:
    """Validate against python3-saml's XSD compiled once per thread (in this context only)."""
    token = _cached_schema.set(enabled)
    try:
        yield
    finally:
        _cached_schema.reset(token)


@contextmanager
def saml_clock(now: datetime | None) -> Iterator[None]:
    """Make python3-saml read ``now`` (in this context only: other threads keep the real clock)."""
    token = _saml_now.set(now)
    try:
        yield
    finally:
        _saml_now.reset(token)


# --- endpoints and settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpEndpoints:
    entity_id: str
    acs_url: str
    metadata_url: str
    login_url: str


def sp_endpoints(slug: str) -> SpEndpoints:
    """The tenant's SP URLs, all under CRMBRIDGE_PUBLIC_URL (never the request's Host header)."""
    s = get_settings()
    metadata = s.public(f"/sso/{slug}/metadata")
    return SpEndpoints(
        entity_id=metadata,
        acs_url=s.public(f"/sso/{slug}/acs"),
        metadata_url=metadata,
        login_url=s.public(f"/sso/{slug}/login"),
    )


def request_data_for(url: str, post_data: dict[str, str] | None = None) -> dict[str, Any]:
    """python3-saml's request dict for a request received at ``url`` (our published ACS URL)."""
    parts = urlsplit(url)
    return {
        "https": "on" if parts.scheme == "https" else "off",
        "http_host": parts.netloc,
        "script_name": parts.path,
        "get_data": {},
        "post_data": post_data or {},
    }


@dataclass(frozen=True)
class IdpConfig:
    """The parts of a tenant's IdP configuration the SP settings need."""

    entity_id: str
    sso_url: str
    sso_binding: str
    signing_certs: tuple[str, ...]  # base64 DER
    slo_url: str | None = None
    want_authn_requests_signed: bool = False


def build_settings_dict(
    *,
    sp: SpEndpoints,
    idp: IdpConfig | None,
    sp_cert_pem: str | None = None,
    sp_cert_new_pem: str | None = None,
    sp_key_pem: str | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "strict": strict,
        "debug": False,
        "sp": {
            "entityId": sp.entity_id,
            "assertionConsumerService": {"url": sp.acs_url, "binding": BINDING_POST},
            "NameIDFormat": NAMEID_UNSPECIFIED,
            "x509cert": sp_cert_pem or "",
            "privateKey": sp_key_pem or "",
        },
        "security": {
            "authnRequestsSigned": bool(idp and idp.want_authn_requests_signed),
            "wantAssertionsSigned": False,  # a signed Response covers its assertion too
            "wantMessagesSigned": False,
            "wantNameId": True,
            "wantAttributeStatement": False,  # many IdPs send only a NameID
            "requestedAuthnContext": False,  # do not force password auth over MFA/passwordless
            "rejectDeprecatedAlgorithm": False,  # SHA-1 is flagged in traces and lint instead
            "signatureAlgorithm": OneLogin_Saml2_Constants.RSA_SHA256,
            "digestAlgorithm": OneLogin_Saml2_Constants.SHA256,
            "allowRepeatAttributeName": True,
        },
    }
    if sp_cert_new_pem:
        settings["sp"]["x509certNew"] = sp_cert_new_pem
    if idp is not None:
        idp_dict: dict[str, Any] = {
            "entityId": idp.entity_id,
            "singleSignOnService": {"url": idp.sso_url, "binding": idp.sso_binding},
        }
        certs = list(idp.signing_certs)
        if len(certs) == 1:
            idp_dict["x509cert"] = certs[0]
        elif certs:
            # Several signing certificates (a rollover): a response signed by any of them verifies.
            idp_dict["x509cert"] = certs[0]
            idp_dict["x509certMulti"] = {"signing": certs, "encryption": []}
        if idp.slo_url:
            idp_dict["singleLogoutService"] = {"url": idp.slo_url, "binding": BINDING_REDIRECT}
        settings["idp"] = idp_dict
    return settings


def make_settings(settings_dict: dict[str, Any]) -> OneLogin_Saml2_Settings:
    return OneLogin_Saml2_Settings(
        settings_dict, custom_base_path="/nonexistent-crmbridge-certs", sp_validation_only="idp" not in settings_dict
    )


# --- SP key material -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpKeyMaterial:
    key_pem: str = field(repr=False)
    cert_pem: str
    cert_sha256: str
    not_before: datetime
    not_after: datetime


def make_sp_key(common_name: str, *, now: datetime | None = None, days: int = SP_KEY_DAYS) -> SpKeyMaterial:
    """A new RSA-3072 key and self-signed certificate for a tenant's SP (signing and decryption)."""
    now = (now or utcnow()).replace(microsecond=0)
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    not_before, not_after = now - timedelta(minutes=5), now + timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return SpKeyMaterial(
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        cert_sha256=hashlib.sha256(der).hexdigest(),
        not_before=not_before,
        not_after=not_after,
    )


def sp_metadata_xml(
    *,
    sp: SpEndpoints,
    cert_pem_active: str,
    cert_pem_next: str | None,
    key_pem: str,
    now: datetime,
    valid_days: int = 7,
) -> str:
    """Signed SP metadata publishing the active certificate and, during a rollover, the next one."""
    d = build_settings_dict(sp=sp, idp=None, sp_cert_pem=cert_pem_active, sp_cert_new_pem=cert_pem_next)
    d["security"]["wantAssertionsEncrypted"] = False
    settings = make_settings(d)
    valid_until = (now + timedelta(days=valid_days)).strftime("%Y-%m-%dT%H:%M:%SZ")
    md = OneLogin_Saml2_Metadata.builder(
        settings.get_sp_data(), False, False, valid_until, "PT24H", None, None
    )
    # Both certificates for signing AND encryption: the IdP may encrypt to either during a rollover.
    if cert_pem_next:
        md = OneLogin_Saml2_Metadata.add_x509_key_descriptors(md, settings.get_sp_cert_new(), True)
    md = OneLogin_Saml2_Metadata.add_x509_key_descriptors(md, settings.get_sp_cert(), True)
    signed = OneLogin_Saml2_Metadata.sign_metadata(
        md, key_pem, cert_pem_active, OneLogin_Saml2_Constants.RSA_SHA256, OneLogin_Saml2_Constants.SHA256
    )
    text = signed.decode() if isinstance(signed, bytes) else str(signed)
    if not text.startswith("<?xml"):
        text = '<?xml version="1.0" encoding="UTF-8"?>\n' + text  # outside the signed element
    return text


# --- AuthnRequests ---------------------------------------------------------------------------------------------------


@dataclass
class AuthnStart:
    """How to send the browser to the IdP: a redirect URL, or an auto-submitting POST form."""

    request_id: str
    binding: str
    url: str  # for Redirect: the full URL with the query; for POST: the form action
    form: dict[str, str] = field(default_factory=dict)


def build_authn_request(
    *,
    settings: OneLogin_Saml2_Settings,
    idp: IdpConfig,
    relay_state: str | None,
    force_authn: bool = False,
    sign_key_pem: str | None = None,
    sign_cert_pem: str | None = None,
    now: datetime | None = None,
) -> AuthnStart:
    """An AuthnRequest for HTTP-Redirect (preferred) or HTTP-POST (POST-only IdPs such as Google).

    Signed when ``sign_key_pem`` is given (the IdP asked for signed requests)."""
    with saml_clock(now):
        req = OneLogin_Saml2_Authn_Request(settings, force_authn=force_authn, set_nameid_policy=True)
    xml = req.get_xml()
    request_id = req.get_id()
    if idp.sso_binding == BINDING_REDIRECT:
        saml_request = OneLogin_Saml2_Utils.deflate_and_base64_encode(xml)
        query = f"SAMLRequest={quote_plus(saml_request)}"
        if relay_state:
            query += f"&RelayState={quote_plus(relay_state)}"
        if sign_key_pem:
            alg = OneLogin_Saml2_Constants.RSA_SHA256
            query += f"&SigAlg={quote_plus(alg)}"
            sig = OneLogin_Saml2_Utils.sign_binary(
                query.encode(), sign_key_pem, xmlsec.Transform.RSA_SHA256  # type: ignore[attr-defined]
            )
            query += f"&Signature={quote_plus(base64.b64encode(sig).decode())}"
        sep = "&" if "?" in idp.sso_url else "?"
        return AuthnStart(request_id, BINDING_REDIRECT, idp.sso_url + sep + query)
    if sign_key_pem and sign_cert_pem:
        xml = OneLogin_Saml2_Utils.add_sign(
            xml, sign_key_pem, sign_cert_pem, sign_algorithm=OneLogin_Saml2_Constants.RSA_SHA256,
            digest_algorithm=OneLogin_Saml2_Constants.SHA256,
        )
    raw = xml if isinstance(xml, bytes) else str(xml).encode()
    form = {"SAMLRequest": base64.b64encode(raw).decode()}
    if relay_state:
        form["RelayState"] = relay_state
    return AuthnStart(request_id, BINDING_POST, idp.sso_url, form)


# --- response validation ---------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable / not reached
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class ResponseCheck:
    ok: bool = False
    code: str = ""
    error: str | None = None
    fix: str | None = None
    checks: list[Check] = field(default_factory=list)
    name_id: str | None = None
    email: str | None = None
    issuer: str | None = None
    response_id: str | None = None
    assertion_ids: list[str] = field(default_factory=list)
    in_response_to: str | None = None
    issue_instant: datetime | None = None
    skew_seconds: float | None = None
    expires_at: datetime | None = None
    decoded_xml: str = ""
    sha1: bool = False

    def fail(self, code: str, error: str, fix: str) -> ResponseCheck:
        self.ok, self.code, self.error, self.fix = False, code, error, fix
        return self

    def add(self, name: str, ok: bool | None, detail: str = "") -> None:
        self.checks.append(Check(name, ok, detail))


DecryptingSettings = Callable[[], AbstractContextManager[list[OneLogin_Saml2_Settings]]]

_ERROR_MAP: tuple[tuple[str, str, str], ...] = (
    ("No Signature found", "unsigned", "The IdP must sign the response or the assertion: enable "
     "response/assertion signing for the CRM Bridge application at the IdP."),
    ("Signature validation failed", "bad_signature", "The signature does not verify with the IdP "
     "certificate(s) in the configuration: the IdP may have rolled its signing certificate — re-import "
     "its metadata. If nothing changed, the response was altered and is rightly refused."),
    ("Invalid Signature Element", "bad_signature", "The signature is not where SAML puts it (possible "
     "signature wrapping): the response is refused."),
    ("Found an invalid Signed Element", "bad_signature", "The signed element is not the response or its "
     "assertion (possible signature wrapping): refused."),
    ("Expected exactly one signature", "bad_signature", "More than one signature where one is expected "
     "(possible signature wrapping): refused."),
    ("Duplicated ID", "duplicate_id", "Two elements share one ID (signature wrapping attempt): refused."),
    ("The response was received at", "wrong_destination", "Set the ACS (reply) URL at the IdP to "
     "this tenant's ACS URL shown on the SSO page."),
    ("The response has an empty Destination", "wrong_destination", "Set the ACS (reply) URL at the IdP."),
    ("is not a valid audience", "wrong_audience", "Set the Audience / SP entity ID (Identifier) at the "
     "IdP to this tenant's SP entity ID shown on the SSO page."),
    ("Invalid issuer", "wrong_issuer", "The response comes from another IdP entity than the one "
     "configured: import the metadata of the IdP that signs in this tenant's users."),
    ("Could not validate timestamp", "clock", "The assertion is outside its validity window: check "
     "that the IdP's and the server's clocks are right (NTP), then sign in again."),
    ("The attributes have expired", "clock", "The IdP session has expired: sign in again."),
    ("A valid SubjectConfirmation was not found", "subject_confirmation", "The assertion's "
     "SubjectConfirmation does not match (Recipient must be our ACS URL, it must not be expired, and it "
     "must answer our request): check the ACS URL at the IdP and the clocks."),
    ("The InResponseTo of the Response", "wrong_request", "The response answers another sign-in request: "
     "start the sign-in again from CRM Bridge."),
    ("The status code of the Response was not Success", "idp_refused", "The IdP refused the sign-in: "
     "check that the user is assigned to the CRM Bridge application at the IdP."),
    ("must contain 1 assertion", "assertion_count", "A SAML response carries exactly one assertion; this "
     "one is malformed or an attack: refused."),
    ("Unsupported SAML version", "malformed", "Only SAML 2.0 responses are accepted: configure the IdP "
     "for SAML 2.0."),
    ("Missing ID attribute", "malformed", "The response has no ID: it is malformed."),
    ("Not match the saml-schema", "malformed", "The response does not match the SAML 2.0 schema."),
    ("Missing Status", "malformed", "The response has no Status: it is malformed."),
    ("The Assertion must include", "malformed", "The assertion lacks a mandatory element."),
    ("NameID not found", "no_nameid", "Configure the IdP to send a NameID (the user's email address)."),
    ("An empty NameID", "no_nameid", "Configure the IdP to send a NameID (the user's email address)."),
    ("SPNameQualifier value mistmatch", "wrong_audience", "The NameID is qualified for another SP: set "
     "the SP entity ID at the IdP."),
    ("Issuer of the Assertion not found", "malformed", "The assertion has no Issuer: malformed."),
    ("There is an EncryptedAttribute", "unsupported", "Encrypted attributes are not supported: send "
     "plain attributes (the assertion itself may be encrypted)."),
    ("Found an Attribute element with duplicated Name", "malformed", "The assertion repeats an attribute."),
    ("Deprecated signature algorithm", "weak_signature", "Configure the IdP to sign with RSA-SHA256."),
)


#: python3-saml's OneLogin_Saml2_Utils.parse_SAML_to_time: "time data … does not match format …Z".
_TIME_FORMAT_ERROR = re.compile(r"time data .* does not match format")
_SAML_TIME_ATTRS = ("IssueInstant", "NotBefore", "NotOnOrAfter", "AuthnInstant", "SessionNotOnOrAfter")
_UTC_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def _non_utc_times(root: etree._Element, resp: OneLogin_Saml2_Response | None) -> list[tuple[str, str, str]]:
    """(element, attribute, value) of every SAML time value not written in the UTC 'Z' form, in the posted
    document and (for an encrypted assertion) the decrypted one."""
    found: list[tuple[str, str, str]] = []
    docs = [root] + ([resp.document] if resp is not None and getattr(resp, "document", None) is not None else [])
    for doc in docs:
        for el in doc.iter():
            if not isinstance(el.tag, str):
                continue
            for attr in _SAML_TIME_ATTRS:
                value = el.get(attr)
                if value is not None and not _UTC_Z.match(value.strip()):
                    item = (f"saml:{etree.QName(el).localname}" if etree.QName(el).namespace == NS_SAML
                            else f"samlp:{etree.QName(el).localname}", attr, value)
                    if item not in found:
                        found.append(item)
    return found


def _map_error(message: str) -> tuple[str, str]:
    for needle, code, fix in _ERROR_MAP:
        if needle in message:
            return code, fix
    return "invalid", "Check the IdP configuration against the SSO page, then run a test login."


def decode_saml_response(value: str) -> bytes:
    """Base64 as POSTed (line breaks tolerated), strictly decoded.

    Raises:
        InvalidInput: too large or not base64.
    """
    compact = re.sub(r"\s+", "", value or "")
    if not compact:
        raise InvalidInput("No SAMLResponse was posted.", fix="Sign in again from the IdP.", code="empty")
    if len(compact) > MAX_RESPONSE_B64:
        raise InvalidInput("The SAMLResponse is too large.", fix="Sign in again.", code="too_large")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(
            "The SAMLResponse is not valid base64.",
            fix="Paste the SAMLResponse value exactly as captured (base64, not the decoded XML).",
            code="not_base64",
        ) from exc


def _scd_in_response_to(root: etree._Element) -> str | None:
    for scd in root.iter(f"{{{NS_SAML}}}SubjectConfirmationData"):
        irt = scd.get("InResponseTo")
        if irt:
            return irt
    return None


def response_in_response_to(root: etree._Element) -> str | None:
    """The request a response answers: the Response's InResponseTo, else its SubjectConfirmationData's."""
    return root.get("InResponseTo") or _scd_in_response_to(root)


def inspect_response(value: str) -> tuple[bytes, etree._Element]:
    """Decode and safely parse a posted SAMLResponse (DTDs refused before any expansion).

    Raises:
        InvalidInput: not base64, too large, DTD, not well-formed, not a samlp:Response.
    """
    raw = decode_saml_response(value)
    root = parse_xml(raw, max_bytes=MAX_RESPONSE_B64)
    if root.tag != f"{{{NS_SAMLP}}}Response":
        local = etree.QName(root).localname if isinstance(root.tag, str) else "?"
        raise InvalidInput(
            f"The document is a <{local}>, not a SAML 2.0 <samlp:Response>.",
            fix="Paste the whole SAMLResponse the IdP posted to the ACS, not an assertion or a request.",
            code="not_a_response",
        )
    return raw, root


def _structural_checks(result: ResponseCheck, root: etree._Element) -> bool:
    """Our own checks before python3-saml: at most one assertion anywhere in the document (none is
    left to python3-saml, which reports the IdP's error Status first), and unique IDs."""
    # ``root`` comes from our own parser (plain lxml elements): iter() takes several tags natively.
    n_assert = sum(1 for _ in root.iter(f"{{{NS_SAML}}}Assertion", f"{{{NS_SAML}}}EncryptedAssertion"))
    if n_assert > 1:
        result.add("Exactly one assertion", False, f"found {n_assert}")
        result.fail(
            "assertion_count",
            f"SAML Response must contain 1 assertion (found {n_assert} anywhere in the document): refused.",
            "A SAML response carries exactly one assertion; this one is malformed or an attack.",
        )
        return False
    ids: dict[str, int] = {}
    for v in root.xpath("//@ID | //@Id | //@id"):
        ids[str(v)] = ids.get(str(v), 0) + 1
    dup = sorted(k for k, n in ids.items() if n > 1)
    if dup:
        result.add("Unique IDs", False, f"duplicated: {', '.join(dup[:3])}")
        result.fail("duplicate_id", "Duplicated ID in the response (signature wrapping attempt): refused.",
                    "Nothing to fix on our side: the response is malformed or an attack.")
        return False
    return True


def validate_saml_response(
    *,
    settings: OneLogin_Saml2_Settings,
    saml_response: str,
    request_data: dict[str, Any],
    request_id: str | None,
    now: datetime | None = None,
    decrypting: DecryptingSettings | None = None,
    trace: bool = False,
    parsed: tuple[bytes, etree._Element] | None = None,
) -> ResponseCheck:
    """Validate a posted SAMLResponse against a tenant's settings. Never raises for a bad response.

    Order: strict base64 → DTD refusal and safe parse (no network) → samlp:Response root → unique IDs
    and exactly one assertion → decryption (with the SP keys ``decrypting`` yields; without one an
    encrypted assertion is a clear "cannot decrypt") → python3-saml ``is_valid`` (strict per the
    settings) under ``now`` → clock skew bound on IssueInstant. ``parsed`` is what
    ``inspect_response(saml_response)`` returned, when the caller already ran it.
    """
    now = now or utcnow()
    result = ResponseCheck()
    try:
        raw, root = parsed if parsed is not None else inspect_response(saml_response)
    except InvalidInput as exc:
        result.add("Safe, well-formed SAML 2.0 Response", False, exc.message)
        return result.fail(exc.code or "malformed", exc.message, exc.fix or "")
    result.add("Safe, well-formed SAML 2.0 Response", True, "no DTD, no entities, parsed without network")
    result.response_id = root.get("ID")
    result.in_response_to = response_in_response_to(root)
    if trace:
        result.decoded_xml = _display_xml(root)
    if not _structural_checks(result, root):
        return result
    result.add("Exactly one assertion, unique IDs", True)

    post = {"SAMLResponse": saml_response}
    rd = dict(request_data)
    rd["post_data"] = post
    encrypted = root.find(f"{{{NS_SAML}}}EncryptedAssertion") is not None
    resp: OneLogin_Saml2_Response | None = None
    try:
        with saml_clock(now), cached_schema():
            if not encrypted:
                resp = OneLogin_Saml2_Response(settings, saml_response)
            else:
                resp = _decrypt(settings, saml_response, decrypting, result)
                if resp is None:
                    return result
            ok = resp.is_valid(rd, request_id=request_id, raise_exceptions=True)
    except Exception as exc:  # python3-saml raises plain and library errors alike
        message = str(exc) or type(exc).__name__
        bad_times = _non_utc_times(root, resp) if _TIME_FORMAT_ERROR.search(message) else []
        if bad_times:
            where = "; ".join(f'{attr}="{value}" on <{elem}>' for elem, attr, value in bad_times[:4])
            result.add("SAML time values in UTC ('Z')", False, where)
            if trace and resp is not None:
                _detail_checks(result, resp, settings, rd, now)
            _fill_identity(result, resp)
            return result.fail(
                "timestamp_format",
                f"The IdP wrote SAML time values with a UTC offset instead of the 'Z' form: {where}. SAML 2.0 "
                "requires every time value in UTC with no time zone component (SAML Core §1.3.3), and the "
                "response is refused.",
                "At the IdP, have the CRM Bridge application issue timestamps (IssueInstant, NotBefore, "
                "NotOnOrAfter, AuthnInstant) in UTC ending in 'Z' — e.g. 2026-12-04T10:00:00Z, not "
                "2026-12-04T10:00:00+00:00; this is usually the IdP's date/time format or time zone setting "
                "for the application, or a custom response template. Then run a test login.",
            )
        code, fix = _map_error(message)
        result.add("python3-saml strict validation", False, message)
        if trace and resp is not None:
            _detail_checks(result, resp, settings, rd, now)
        _fill_identity(result, resp)
        return result.fail(code, message, fix)
    if not ok:  # pragma: no cover - raise_exceptions=True raises instead
        return result.fail("invalid", resp.get_error() or "invalid", "Run a test login.")
    result.add("python3-saml strict validation" if settings.is_strict() else "python3-saml validation", True)
    if trace:
        _detail_checks(result, resp, settings, rd, now)
    if not settings.get_security_data().get("allowRepeatAttributeName"):
        try:
            resp.get_attributes()
        except Exception as exc:  # duplicated attribute names when the settings forbid them
            result.add("Attributes readable", False, str(exc))
            _fill_identity(result, resp)
            return result.fail("malformed", str(exc), "Configure the IdP to send each attribute once.")
    _fill_identity(result, resp)

    doc = resp.document
    if not settings.is_strict():
        # Non-strict (the real-sample cross-checks only): signature and structure, no clock.
        result.ok, result.code = True, "ok"
        return result
    issue = doc.get("IssueInstant")
    if issue:
        try:
            result.issue_instant = parse_xs_datetime(issue)
            result.skew_seconds = round((now - result.issue_instant).total_seconds(), 3)
        except ValueError:
            pass
    if result.issue_instant is None:
        result.add("Clock skew", False, "no readable IssueInstant")
        return result.fail("malformed", "The response has no readable IssueInstant.", "It is malformed.")
    skew = now - result.issue_instant
    if skew < -MAX_CLOCK_SKEW:
        result.add("Clock skew", False, f"{result.skew_seconds:+.0f} s (limit ±{MAX_CLOCK_SKEW.total_seconds():.0f} s)")
        return result.fail(
            "clock",
            f"The response was issued {-skew.total_seconds():.0f} s in the future by our clock; at most "
            f"{MAX_CLOCK_SKEW.total_seconds():.0f} s of clock skew is accepted.",
            "Check that the IdP's and the server's clocks are right (NTP), then sign in again.",
        )
    if skew > REQUEST_TTL + MAX_CLOCK_SKEW:
        result.add("Clock skew", False, f"issued {skew.total_seconds():.0f} s ago")
        return result.fail(
            "clock",
            f"The response was issued {skew.total_seconds():.0f} s ago; a response must reach the ACS within "
            f"{(REQUEST_TTL + MAX_CLOCK_SKEW).total_seconds() / 60:.0f} minutes of being issued (a stale or "
            "captured response is refused).",
            "Sign in again; if this repeats, check the IdP's and the server's clocks (NTP).",
        )
    result.add("Clock skew", True, f"{result.skew_seconds:+.1f} s (limit ±{MAX_CLOCK_SKEW.total_seconds():.0f} s)")
    result.expires_at = _expiry(resp, now)
    result.sha1 = any(
        el.get("Algorithm") in SHA1_URIS
        for tag in (f"{{{NS_DS}}}SignatureMethod", f"{{{NS_DS}}}DigestMethod")
        for el in doc.iter(tag)
    )
    if result.sha1:
        result.add("Signature algorithm", None, "SHA-1: accepted, but ask the IdP to sign with RSA-SHA256")
    result.ok, result.code = True, "ok"
    return result


def _decrypt(
    settings: OneLogin_Saml2_Settings,
    saml_response: str,
    decrypting: DecryptingSettings | None,
    result: ResponseCheck,
) -> OneLogin_Saml2_Response | None:
    fix = ("Give the IdP this tenant's current SP metadata (its encryption certificate), or turn "
           "assertion encryption off at the IdP.")
    if decrypting is None:
        result.add("Decrypt the assertion", False, "no SP private key available")
        result.fail("cannot_decrypt", "Cannot decrypt the encrypted assertion: no SP private key is "
                    "available for it.", fix)
        return None
    with decrypting() as candidates:
        for s in candidates:
            try:
                resp = OneLogin_Saml2_Response(s, saml_response)
            except Exception:  # wrong key: try the next published one
                continue
            result.add("Decrypt the assertion", True)
            return resp
    result.add("Decrypt the assertion", False, "none of the SP keys decrypts it")
    result.fail("cannot_decrypt", "Cannot decrypt the encrypted assertion with any of this tenant's SP "
                "keys.", fix)
    return None


def _fill_identity(result: ResponseCheck, resp: OneLogin_Saml2_Response | None) -> None:
    if resp is None:
        return
    try:
        result.name_id = resp.get_nameid()
    except Exception:
        result.name_id = None
    try:
        issuers = resp.get_issuers()
        result.issuer = issuers[0] if issuers else None
    except Exception:
        result.issuer = None
    doc = resp.decrypted_document if resp.encrypted else resp.document
    aids = [a.get("ID") for a in doc.iterchildren(f"{{{NS_SAML}}}Assertion")] if doc is not None else []
    result.assertion_ids = [a for a in aids if a]
    email = result.name_id if result.name_id and "@" in result.name_id else None
    if email is None:
        try:
            attrs = resp.get_attributes()
        except Exception:
            attrs = {}
        for name in EMAIL_ATTRIBUTES:
            values = attrs.get(name) or []
            if values and isinstance(values[0], str) and "@" in values[0]:
                email = values[0]
                break
    result.email = email.strip().lower() if email else None


def _expiry(resp: OneLogin_Saml2_Response, now: datetime) -> datetime:
    """How long the response id must be remembered: its latest NotOnOrAfter plus the skew."""
    latest = now
    doc = resp.decrypted_document if resp.encrypted else resp.document
    for el in (*doc.iter(f"{{{NS_SAML}}}Conditions"), *doc.iter(f"{{{NS_SAML}}}SubjectConfirmationData")):
        v = el.get("NotOnOrAfter")
        if v:
            try:
                latest = max(latest, parse_xs_datetime(v))
            except ValueError:
                continue
    return min(latest, now + timedelta(days=1)) + MAX_CLOCK_SKEW


def _display_xml(root: etree._Element) -> str:
    """The decoded response for a trace, signature values removed so it is no bearer token."""
    clone = etree.fromstring(etree.tostring(root))
    for sv in clone.iter(f"{{{NS_DS}}}SignatureValue"):
        sv.text = "(removed)"
    text = etree.tostring(clone, pretty_print=True).decode()
    return text[:200_000]


def _detail_checks(
    result: ResponseCheck,
    resp: OneLogin_Saml2_Response,
    settings: OneLogin_Saml2_Settings,
    request_data: dict[str, Any],
    now: datetime,
) -> None:
    """Individual checks for a trace (test login, pasted response), beside python3-saml's verdict."""
    doc = resp.decrypted_document if resp.encrypted else resp.document
    idp = settings.get_idp_data()
    sp = settings.get_sp_data()
    try:
        issuers = resp.get_issuers()
        result.add("Issuer is the configured IdP", all(i == idp.get("entityId") for i in issuers),
                   f"{', '.join(issuers)} (expected {idp.get('entityId')})")
    except Exception as exc:
        result.add("Issuer is the configured IdP", False, str(exc))
    try:
        status = OneLogin_Saml2_Utils.get_status(resp.document)
        code = status.get("code", "")
        result.add("Status Success", code.endswith(":Success"), code.rsplit(":", 1)[-1]
                   + (f" — {status.get('msg')}" if status.get("msg") else ""))
    except Exception as exc:
        result.add("Status Success", False, str(exc))
    acs = OneLogin_Saml2_Utils.get_self_url_no_query(request_data)
    dest = resp.document.get("Destination")
    result.add("Destination is our ACS URL", None if dest is None else dest.startswith(acs),
               f"{dest} (ours: {acs})" if dest is not None else "no Destination")
    try:
        audiences = resp.get_audiences()
        result.add("Audience is our SP entity ID", not audiences or sp["entityId"] in audiences,
                   f"{', '.join(audiences) or 'none'} (ours: {sp['entityId']})")
    except Exception as exc:
        result.add("Audience is our SP entity ID", False, str(exc))
    for cond in doc.iter(f"{{{NS_SAML}}}Conditions"):
        nb, noa = cond.get("NotBefore"), cond.get("NotOnOrAfter")
        ok = True
        try:
            if nb and parse_xs_datetime(nb) > now + MAX_CLOCK_SKEW:
                ok = False
            if noa and parse_xs_datetime(noa) + MAX_CLOCK_SKEW <= now:
                ok = False
        except ValueError:
            ok = False
        result.add("Within NotBefore / NotOnOrAfter (±300 s)", ok, f"{nb or '-'} … {noa or '-'}; now {now.isoformat()}")
        break
    signed = []
    certs = (idp.get("x509certMulti") or {}).get("signing") or [idp.get("x509cert")]
    certs = [c for c in certs if c]
    for label, xpath, d in (
        ("Response", OneLogin_Saml2_Utils.RESPONSE_SIGNATURE_XPATH, resp.document),
        ("Assertion", OneLogin_Saml2_Utils.ASSERTION_SIGNATURE_XPATH, doc),
    ):
        if d.xpath(xpath, namespaces=OneLogin_Saml2_Constants.NSMAP):
            verified = bool(certs) and bool(
                OneLogin_Saml2_Utils.validate_sign(d, cert=certs[0], xpath=xpath, multicerts=certs)
            )
            signed.append(f"{label}: {'verified' if verified else 'does NOT verify'}")
    result.add("Signature by an IdP signing certificate", bool(signed) and all("NOT" not in s for s in signed),
               "; ".join(signed) or "nothing is signed")
