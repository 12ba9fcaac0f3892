"""IdP metadata lint: is this document usable as a tenant's SAML IdP, and what is wrong with it?

Usable means: safe, well-formed SAML 2.0 metadata; one IdP entity (chosen by ``entity_id`` in an
aggregate, an error when ambiguous); at least one SSO endpoint with the HTTP-POST or HTTP-Redirect
binding; at least one signing certificate that parses; ``validUntil`` not passed. Certificate dates
do not decide usability (the SAML metadata interoperability profile trusts keys, not dates) but each
expired, expiring or not-yet-valid certificate is a warning with its fix.

``lint_metadata`` never raises for a bad document: every problem is a finding. The report's
``to_json()`` is the exact shape ``crmbridge sso lint --json`` prints.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import xmlsec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from lxml import etree

from core.clock import utcnow
from core.errors import InvalidInput
from core.sso.parse import parse_xml

NS_MD = "urn:oasis:names:tc:SAML:2.0:metadata"
NS_DS = "http://www.w3.org/2000/09/xmldsig#"
SAML2_PROTOCOL = "urn:oasis:names:tc:SAML:2.0:protocol"
BINDING_POST = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
BINDING_REDIRECT = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"
USABLE_BINDINGS = (BINDING_POST, BINDING_REDIRECT)

_ENTITY = f"{{{NS_MD}}}EntityDescriptor"
_ENTITIES = f"{{{NS_MD}}}EntitiesDescriptor"
_IDP = f"{{{NS_MD}}}IDPSSODescriptor"
_SP = f"{{{NS_MD}}}SPSSODescriptor"
_SIG = f"{{{NS_DS}}}Signature"

SHA1_ALGS = {
    "http://www.w3.org/2000/09/xmldsig#rsa-sha1",
    "http://www.w3.org/2000/09/xmldsig#dsa-sha1",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha1",
    "http://www.w3.org/2000/09/xmldsig#sha1",
}
# Transforms a metadata signature may use; anything else (XPath, XSLT) is refused unverified.
SAFE_TRANSFORMS = {
    "http://www.w3.org/2000/09/xmldsig#enveloped-signature",
    "http://www.w3.org/2001/10/xml-exc-c14n#",
    "http://www.w3.org/2001/10/xml-exc-c14n#WithComments",
    "http://www.w3.org/TR/2001/REC-xml-c14n-20010315",
    "http://www.w3.org/TR/2001/REC-xml-c14n-20010315#WithComments",
    "http://www.w3.org/2006/12/xml-c14n11",
    "http://www.w3.org/2006/12/xml-c14n11#WithComments",
}
_DURATION_RE = re.compile(
    r"^-?P(?=\d|T\d)(\d+Y)?(\d+M)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+(\.\d+)?S)?)?$"
)
EXPIRING_DAYS = 30
MIN_RSA_BITS = 2048


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "info"
    code: str
    message: str
    fix: str

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "message": self.message, "fix": self.fix}


@dataclass
class CertInfo:
    use: str  # "signing" | "encryption" | "both"
    subject: str
    not_before: datetime
    not_after: datetime
    days_left: int
    key_type: str
    key_bits: int
    sha256: str
    der_b64: str = field(repr=False)

    @property
    def signing(self) -> bool:
        return self.use in ("signing", "both")

    def to_json(self) -> dict[str, Any]:
        return {
            "use": self.use,
            "subject": self.subject,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "days_left": self.days_left,
            "key_type": self.key_type,
            "key_bits": self.key_bits,
            "sha256": self.sha256,
        }


@dataclass
class Endpoint:
    binding: str
    url: str

    def to_json(self) -> dict[str, str]:
        return {"binding": self.binding, "url": self.url}


@dataclass
class LintReport:
    usable: bool = False
    entity_id: str | None = None
    entities: list[str] = field(default_factory=list)
    sso: list[Endpoint] = field(default_factory=list)
    certs: list[CertInfo] = field(default_factory=list)
    signature: dict[str, bool | None] = field(
        default_factory=lambda: {"present": False, "valid": None, "trusted": None}
    )
    valid_until: datetime | None = None
    findings: list[Finding] = field(default_factory=list)
    # Not part of the JSON: what the SP configuration is built from.
    slo: list[Endpoint] = field(default_factory=list)
    name_id_formats: list[str] = field(default_factory=list)
    want_authn_requests_signed: bool = False

    def add(self, severity: str, code: str, message: str, fix: str) -> None:
        self.findings.append(Finding(severity, code, message, fix))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def signing_certs(self) -> list[CertInfo]:
        return [c for c in self.certs if c.signing]

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def to_json(self) -> dict[str, Any]:
        return {
            "usable": self.usable,
            "entity_id": self.entity_id,
            "entities": list(self.entities),
            "sso": [e.to_json() for e in self.sso],
            "certs": [c.to_json() for c in self.certs],
            "signature": dict(self.signature),
            "valid_until": self.valid_until.isoformat() if self.valid_until else None,
            "findings": [f.to_json() for f in self.findings],
        }


# --- small helpers ---------------------------------------------------------------------------------


def parse_xs_datetime(value: str) -> datetime:
    """xs:dateTime as an aware UTC datetime (no zone means UTC, as SAML requires)."""
    v = value.strip()
    m = re.match(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})?$", v)
    if not m:
        raise ValueError(value)
    frac = (m.group(2) or "")[:7]
    dt = datetime.fromisoformat(m.group(1) + frac + ("+00:00" if m.group(3) in (None, "Z") else m.group(3)))
    return dt.astimezone(UTC)


def _is_saml2_idp(desc: etree._Element) -> bool:
    return SAML2_PROTOCOL in (desc.get("protocolSupportEnumeration") or "").split()


def _idp_descriptor(entity: etree._Element) -> etree._Element | None:
    for desc in entity.iterchildren(_IDP):
        if _is_saml2_idp(desc):
            return desc
    return None


def _all_entities(root: etree._Element) -> list[etree._Element]:
    if root.tag == _ENTITY:
        return [root]
    return list(root.iter(_ENTITY))


def _key_description(pub: Any) -> tuple[str, int]:
    if isinstance(pub, rsa.RSAPublicKey):
        return "RSA", pub.key_size
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return "EC", pub.curve.key_size
    if isinstance(pub, dsa.DSAPublicKey):
        return "DSA", pub.key_size
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "Ed25519", 256
    if isinstance(pub, ed448.Ed448PublicKey):
        return "Ed448", 456
    return type(pub).__name__, 0


def load_certificate(text: str) -> tuple[x509.Certificate, bool]:
    """Parse an ``X509Certificate`` element's text. Returns (certificate, was_pem_in_base64).

    Raises:
        ValueError: not base64, or not a certificate.
    """
    with warnings.catch_warnings():
        # Old IdP certificates carry negative serial numbers; cryptography warns but reads them.
        warnings.simplefilter("ignore")
        return _load_certificate(text)


def _load_certificate(text: str) -> tuple[x509.Certificate, bool]:
    compact = "".join(text.split())
    if compact.startswith("-----BEGIN"):
        return x509.load_pem_x509_certificate(text.strip().encode()), True
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64") from exc
    if raw.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(raw.strip()), True
    return x509.load_der_x509_certificate(raw), False


def cert_info(cert: x509.Certificate, use: str, now: datetime) -> CertInfo:
    der = cert.public_bytes(serialization.Encoding.DER)
    key_type, key_bits = _key_description(cert.public_key())
    not_after = cert.not_valid_after_utc
    return CertInfo(
        use=use,
        subject=cert.subject.rfc4514_string() or "(empty subject)",
        not_before=cert.not_valid_before_utc,
        not_after=not_after,
        days_left=int((not_after - now).total_seconds() // 86400),
        key_type=key_type,
        key_bits=key_bits,
        sha256=hashlib.sha256(der).hexdigest(),
        der_b64=base64.b64encode(der).decode(),
    )


def cert_pem(der_b64: str) -> str:
    body = "\n".join(der_b64[i : i + 64] for i in range(0, len(der_b64), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"


def verify_enveloped_signature(root: etree._Element, sig: etree._Element, pem_certs: list[str]) -> bool:
    """Verify ``sig`` (a direct child of ``root``) against each certificate; True if one verifies.

    The reference must cover the root itself (URI "" or "#<root ID>") and use only canonicalisation
    and enveloped transforms, so a signature over some other element (wrapping) never counts.
    """
    refs = sig.findall(f"{{{NS_DS}}}SignedInfo/{{{NS_DS}}}Reference")
    if len(refs) != 1:
        return False
    uri = refs[0].get("URI")
    root_id = root.get("ID")
    # No URI or "" = the whole document; "#id" must name the signed element itself (no wrapping).
    if not (uri in (None, "") or (root_id and uri == f"#{root_id}")):
        return False
    for t in refs[0].iter(f"{{{NS_DS}}}Transform"):
        if t.get("Algorithm") not in SAFE_TRANSFORMS:
            return False
    xmlsec.tree.add_ids(root, ["ID"])
    for pem in pem_certs:
        try:
            ctx = xmlsec.SignatureContext()
            ctx.key = xmlsec.Key.from_memory(pem.encode(), xmlsec.KeyFormat.CERT_PEM, None)  # type: ignore[attr-defined]
            ctx.set_enabled_key_data([xmlsec.KeyData.X509])  # type: ignore[attr-defined]
            ctx.verify(sig)
            return True
        except xmlsec.Error:
            continue
        except Exception:  # xmlsec raises plain errors on malformed input: never verified
            continue
    return False


# --- the lint ----------------------------------------------------------------------------------------


def lint_metadata(
    data: bytes | str,
    *,
    entity_id: str | None = None,
    pinned_certs: list[str] | None = None,
    now: datetime | None = None,
) -> LintReport:
    """Lint IdP metadata. ``pinned_certs`` are PEM certificates the tenant pinned for the metadata
    signature (``signature.trusted``); ``now`` decides validUntil and certificate dates."""
    now = now or utcnow()
    report = LintReport()
    try:
        root = parse_xml(data)
    except InvalidInput as exc:
        report.add("error", exc.code or "not_well_formed", exc.message, exc.fix or "")
        return report
    _lint_tree(report, root, entity_id=entity_id, pinned_certs=pinned_certs, now=now)
    report.usable = not report.errors
    return report


def _lint_tree(
    report: LintReport,
    root: etree._Element,
    *,
    entity_id: str | None,
    pinned_certs: list[str] | None,
    now: datetime,
) -> None:
    if root.tag not in (_ENTITY, _ENTITIES):
        tag = etree.QName(root).localname if isinstance(root.tag, str) else "?"
        ns = etree.QName(root).namespace if isinstance(root.tag, str) else None
        report.add(
            "error",
            "not_saml_metadata",
            f"The root element is <{tag}>"
            + (f" in namespace {ns}" if ns else " without a namespace")
            + f", not a SAML 2.0 <EntityDescriptor> or <EntitiesDescriptor> ({NS_MD}).",
            "Upload the IdP's SAML 2.0 metadata (often called 'IdP metadata' or 'federation "
            "metadata XML'), not a certificate, a settings export or an HTML page.",
        )
        return

    _lint_signature(report, root, pinned_certs)

    entities = _all_entities(root)
    if not report.signature["present"] and root.tag == _ENTITY:
        for desc in root.iterchildren(_IDP, _SP):
            if desc.find(_SIG) is not None:
                _lint_signature(report, desc, pinned_certs)
                break
    idps: list[tuple[etree._Element, etree._Element]] = []
    for ent in entities:
        desc = _idp_descriptor(ent)
        if desc is not None:
            idps.append((ent, desc))
    report.entities = [e.get("entityID") or "" for e, _ in idps]

    if not idps:
        has_sp = any(ent.find(_SP) is not None for ent in entities)
        has_saml1_idp = any(ent.find(_IDP) is not None for ent in entities)
        if has_sp:
            report.add(
                "error",
                "sp_metadata",
                "This is service-provider (SP) metadata: it has an SPSSODescriptor and no "
                "IDPSSODescriptor. CRM Bridge needs the metadata of the identity provider.",
                "In your IdP's admin console (Entra ID, Okta, Google Workspace, ADFS…), open the CRM "
                "Bridge application and download its 'IdP metadata' / 'Federation Metadata XML'.",
            )
        elif has_saml1_idp:
            report.add(
                "error",
                "no_saml2_idp",
                "The IdP descriptor does not support SAML 2.0 (protocolSupportEnumeration lacks "
                f"{SAML2_PROTOCOL}).",
                "Enable SAML 2.0 for this application at the IdP and export its metadata again.",
            )
        else:
            report.add(
                "error",
                "no_idp",
                "The document has no IdP entity (no IDPSSODescriptor).",
                "Download the identity provider's metadata, not an empty or partial file.",
            )
        _lint_valid_until(report, [root], now)
        return

    chosen: tuple[etree._Element, etree._Element] | None = None
    if entity_id is not None:
        for ent, desc in idps:
            if ent.get("entityID") == entity_id:
                chosen = (ent, desc)
                break
        if chosen is None:
            report.add(
                "error",
                "entity_not_found",
                f"No IdP entity with entityID {entity_id!r} in this document "
                f"({len(idps)} IdP entit{'y' if len(idps) == 1 else 'ies'} found).",
                "Pick one of the entity IDs listed under 'entities'.",
            )
            _lint_valid_until(report, [root], now)
            return
    elif len(idps) == 1:
        chosen = idps[0]
    else:
        report.add(
            "error",
            "ambiguous_entity",
            f"The document is an aggregate with {len(idps)} IdP entities; which one is the tenant's "
            "IdP is ambiguous.",
            "Choose the IdP by its entity ID (--entity-id, or the picker on the SSO page).",
        )
        _lint_valid_until(report, [root], now)
        return

    ent, desc = chosen
    report.entity_id = ent.get("entityID")
    if not report.entity_id:
        report.add(
            "error",
            "missing_entity_id",
            "The IdP's EntityDescriptor has no entityID attribute.",
            "Export the metadata again from the IdP; an entityID is mandatory in SAML 2.0.",
        )
    elif "{" in report.entity_id and "}" in report.entity_id:
        report.add(
            "warning",
            "entity_id_placeholder",
            f"The entity ID {report.entity_id!r} contains a placeholder: the IdP will sign responses "
            "with its real entity ID, which will not match.",
            "Download the tenant-specific metadata (for Entra ID: "
            "https://login.microsoftonline.com/<tenant-id>/federationmetadata/2007-06/federationmetadata.xml "
            "or the app's 'Federation Metadata XML').",
        )
    if ent.find(_SP) is not None:
        report.add(
            "info",
            "also_sp",
            "The entity also describes a service provider (SPSSODescriptor); only its IdP part is used.",
            "Nothing to do (ADFS publishes both).",
        )

    chain = [a for a in reversed(list(ent.iterancestors())) if a.tag == _ENTITIES] + [ent, desc]
    _lint_valid_until(report, chain, now)
    _lint_endpoints(report, desc)
    _lint_certs(report, desc, now)
    _lint_misc(report, desc)
    if not report.signature["present"] and ent is not root and ent.find(_SIG) is not None:
        # An unsigned aggregate holding a signed entity.
        _lint_signature(report, ent, pinned_certs)


def _lint_valid_until(report: LintReport, chain: list[etree._Element], now: datetime) -> None:
    earliest: datetime | None = None
    for el in chain:
        vu = el.get("validUntil")
        if vu:
            try:
                dt = parse_xs_datetime(vu)
            except ValueError:
                report.add(
                    "error",
                    "malformed_valid_until",
                    f"validUntil {vu!r} is not an xs:dateTime.",
                    "Export the metadata again; validUntil must look like 2030-01-01T00:00:00Z.",
                )
                continue
            earliest = dt if earliest is None or dt < earliest else earliest
        cd = el.get("cacheDuration")
        if cd is not None and not _DURATION_RE.match(cd.strip()):
            report.add(
                "warning",
                "malformed_cache_duration",
                f"cacheDuration {cd!r} is not a valid xs:duration"
                + (" (a 'T' must be followed by hours, minutes or seconds)" if cd.strip().endswith("T") else "")
                + "; it is ignored.",
                f"Ask the IdP to publish a valid duration (for example {cd.strip().rstrip('T') or 'P1D'}); "
                "CRM Bridge re-checks the metadata on its own schedule meanwhile.",
            )
    report.valid_until = earliest
    if earliest is not None and earliest <= now:
        report.add(
            "error",
            "metadata_expired",
            f"The metadata expired on {earliest.isoformat()} (validUntil); a SAML SP must not use it.",
            "Download fresh metadata from the IdP (its metadata URL serves a current copy).",
        )


def _lint_endpoints(report: LintReport, desc: etree._Element) -> None:
    for el in desc.iterchildren(f"{{{NS_MD}}}SingleSignOnService"):
        report.sso.append(Endpoint(el.get("Binding") or "", el.get("Location") or ""))
    for el in desc.iterchildren(f"{{{NS_MD}}}SingleLogoutService"):
        report.slo.append(Endpoint(el.get("Binding") or "", el.get("Location") or ""))
    usable = [e for e in report.sso if e.binding in USABLE_BINDINGS]
    bad_urls = [e for e in usable if not e.url.lower().startswith(("https://", "http://"))]
    for e in bad_urls:
        report.add(
            "warning",
            "sso_url_invalid",
            f"The SSO endpoint for {e.binding.rsplit(':', 1)[-1]} has no absolute URL ({e.url!r}).",
            "Export the metadata again from the IdP.",
        )
    usable = [e for e in usable if e not in bad_urls]
    if not usable:
        found = ", ".join(sorted({e.binding.rsplit(":", 1)[-1] for e in report.sso})) or "none"
        report.add(
            "error",
            "no_usable_sso_binding",
            f"The IdP has no SingleSignOnService with the HTTP-POST or HTTP-Redirect binding "
            f"(found: {found}).",
            "Enable the SAML 2.0 HTTP-Redirect or HTTP-POST binding for single sign-on at the IdP and "
            "export its metadata again.",
        )
        return
    bindings = {e.binding for e in usable}
    if bindings == {BINDING_POST}:
        report.add(
            "info",
            "post_only",
            "The IdP accepts sign-in requests by HTTP-POST only (no HTTP-Redirect). Usable: CRM Bridge "
            "sends its AuthnRequest by POST. (python3-saml's default metadata parse asks for Redirect "
            "and would find no SSO URL here.)",
            "Nothing to do.",
        )
    elif bindings == {BINDING_REDIRECT}:
        report.add(
            "info",
            "redirect_only",
            "The IdP accepts sign-in requests by HTTP-Redirect only.",
            "Nothing to do.",
        )
    if any(e.url.lower().startswith("http://") for e in usable):
        report.add(
            "warning",
            "sso_not_https",
            "An SSO endpoint uses plain http://: credentials and assertions would cross the network "
            "unencrypted.",
            "Configure the IdP to publish https:// endpoints.",
        )


def _lint_certs(report: LintReport, desc: etree._Element, now: datetime) -> None:
    by_hash: dict[str, CertInfo] = {}
    order: list[str] = []
    duplicates = 0
    unparseable = 0
    pem_wrapped = 0
    for kd in desc.iterchildren(f"{{{NS_MD}}}KeyDescriptor"):
        use = kd.get("use") or "both"
        if use not in ("signing", "encryption"):
            use = "both"
        cert_nodes = list(kd.iter(f"{{{NS_DS}}}X509Certificate"))
        if not cert_nodes:
            # Some exports put the base64 straight into X509Data.
            cert_nodes = [n for n in kd.iter(f"{{{NS_DS}}}X509Data") if (n.text or "").strip()]
        if not cert_nodes:
            report.add(
                "warning",
                "key_without_certificate",
                f"A {use} KeyDescriptor carries no X.509 certificate (a bare key value is not supported).",
                "Ask the IdP to publish its signing certificate in <ds:X509Certificate>.",
            )
        for node in cert_nodes:
            text = node.text or ""
            try:
                cert, wrapped = load_certificate(text)
            except ValueError:
                unparseable += 1
                continue
            if wrapped:
                pem_wrapped += 1
            info = cert_info(cert, use, now)
            prev = by_hash.get(info.sha256)
            if prev is not None:
                duplicates += 1
                if prev.use != info.use:
                    prev.use = "both"
                continue
            by_hash[info.sha256] = info
            order.append(info.sha256)
    report.certs = [by_hash[h] for h in order]

    if unparseable:
        report.add(
            "warning",
            "certificate_unparseable",
            f"{unparseable} certificate(s) in the metadata could not be read as X.509.",
            "Export the metadata again from the IdP; each <ds:X509Certificate> must hold base64 DER.",
        )
    if pem_wrapped:
        report.add(
            "warning",
            "pem_in_x509certificate",
            f"{pem_wrapped} <ds:X509Certificate> element(s) hold a base64-encoded PEM file (with "
            "-----BEGIN CERTIFICATE----- inside) instead of base64 DER. CRM Bridge unwraps it; many "
            "service providers (python3-saml, xmlsec) cannot.",
            "Ask the IdP administrator to publish the certificate as base64 DER (the text between the "
            "BEGIN/END lines of the PEM, without them).",
        )
    if duplicates:
        report.add(
            "info",
            "duplicate_certificate",
            f"{duplicates} certificate(s) are listed more than once; each is used once.",
            "Nothing to do.",
        )
    signing = report.signing_certs
    if not signing:
        report.add(
            "error",
            "no_signing_certificate",
            "The IdP publishes no signing certificate CRM Bridge can read, so no response could be "
            "verified.",
            "Add the IdP's token-signing certificate to its metadata (KeyDescriptor use=\"signing\") "
            "and export it again.",
        )
    elif len(signing) > 1:
        report.add(
            "info",
            "several_signing_certificates",
            f"{len(signing)} signing certificates are published (a key rollover): responses signed by "
            "any of them are accepted.",
            "After the rollover, re-import the metadata so the retired certificate is no longer trusted.",
        )
    for c in report.certs:
        label = f"The {c.use} certificate {c.subject!r} (SHA-256 {c.sha256[:16]}…)"
        if c.key_type == "RSA" and c.key_bits < MIN_RSA_BITS:
            report.add(
                "warning",
                "weak_key",
                f"{label} has an RSA key of {c.key_bits} bits (under {MIN_RSA_BITS}).",
                "Generate a new signing key of at least 2048 bits at the IdP and re-import the metadata.",
            )
        if c.not_after <= now:
            report.add(
                "warning",
                "certificate_expired",
                f"{label} expired on {c.not_after.date().isoformat()}. SAML trusts the key, not the "
                "dates, so responses still verify, but the IdP is likely to replace it without notice.",
                "Roll the IdP's signing certificate over and re-import the metadata.",
            )
        elif c.not_before > now:
            report.add(
                "warning",
                "certificate_not_yet_valid",
                f"{label} is not valid before {c.not_before.date().isoformat()}.",
                "Check the server clock; if it is right, the IdP published a future certificate for a "
                "rollover — keep the current one published too.",
            )
        elif c.days_left < EXPIRING_DAYS:
            report.add(
                "warning",
                "certificate_expiring",
                f"{label} expires in {c.days_left} day(s), on {c.not_after.date().isoformat()}.",
                "Add the new certificate at the IdP now and re-import the metadata so both are trusted "
                "during the rollover.",
            )


def _lint_misc(report: LintReport, desc: etree._Element) -> None:
    if (desc.get("WantAuthnRequestsSigned") or "").strip().lower() in ("true", "1"):
        report.want_authn_requests_signed = True
        report.add(
            "info",
            "want_authn_requests_signed",
            "The IdP wants signed AuthnRequests (WantAuthnRequestsSigned=true).",
            "CRM Bridge signs them with the tenant's SP key: give the IdP our SP metadata so it knows "
            "the certificate (and again after an SP key rollover).",
        )
    formats = [(el.text or "").strip() for el in desc.iterchildren(f"{{{NS_MD}}}NameIDFormat")]
    report.name_id_formats = [f for f in formats if f]
    if report.name_id_formats:
        short = ", ".join(f.rsplit(":", 1)[-1] for f in report.name_id_formats)
        only_transient = all(f.endswith(":transient") for f in report.name_id_formats)
        report.add(
            "warning" if only_transient else "info",
            "nameid_formats",
            f"NameID formats offered: {short}."
            + (" Only transient IDs: users cannot be matched to accounts by NameID." if only_transient else ""),
            "Configure the IdP to send the user's email address (NameID format emailAddress, or an "
            "'email' attribute)." if only_transient else "Nothing to do: CRM Bridge matches users by "
            "email address (NameID or the email attribute).",
        )


def _lint_signature(report: LintReport, el: etree._Element, pinned_certs: list[str] | None) -> None:
    sig = el.find(_SIG)
    if sig is None:
        report.signature = {"present": False, "valid": None, "trusted": None}
        return
    own: list[str] = []
    for node in sig.iter(f"{{{NS_DS}}}X509Certificate"):
        try:
            cert, _ = load_certificate(node.text or "")
        except ValueError:
            continue
        own.append(cert_pem(base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()))
    if not own:
        # No certificate in KeyInfo: the document's own signing certificates.
        desc = _idp_descriptor(el) if el.tag == _ENTITY else el
        if desc is not None:
            for node in desc.iter(f"{{{NS_DS}}}X509Certificate"):
                try:
                    cert, _ = load_certificate(node.text or "")
                except ValueError:
                    continue
                own.append(cert_pem(base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()))
    valid: bool | None = verify_enveloped_signature(el, sig, own) if own else False
    trusted: bool | None = None
    if pinned_certs:
        trusted = verify_enveloped_signature(el, sig, pinned_certs)
    report.signature = {"present": True, "valid": valid, "trusted": trusted}
    algs = {n.get("Algorithm") for n in sig.iter(f"{{{NS_DS}}}SignatureMethod", f"{{{NS_DS}}}DigestMethod")}
    if algs & SHA1_ALGS:
        report.add(
            "warning",
            "sha1_signature",
            "The metadata is signed with SHA-1, which is broken for signatures.",
            "Configure the IdP (or federation) to sign with RSA-SHA256.",
        )
    if not valid:
        report.add(
            "warning",
            "signature_invalid",
            "The metadata carries a signature that does not verify against its own certificate: the "
            "file was changed after signing (often re-indented or edited by hand).",
            "Download the metadata again directly from the IdP and upload it unchanged.",
        )
    if pinned_certs and not trusted:
        report.add(
            "error",
            "signature_untrusted",
            "The metadata signature does not verify against the certificate pinned for this tenant.",
            "Fetch the metadata from the IdP's official URL; if the IdP rolled its metadata-signing key, "
            "update the pinned certificate first.",
        )
