"""A SAML 2.0 identity provider for the sandbox: one IdP per tenant key (``bigcorp``, ``newco``…),
each signing real responses with an RSA key made when the sandbox starts, so SSO round trips work
offline against the console's real ACS.

Routes (mounted by sandbox/app.py through ``routes(state)``):
    GET       /idp/{tenant}/metadata   signed IdP metadata (SSO by HTTP-Redirect and HTTP-POST)
    PUT       /idp/{tenant}/sp-metadata register the tenant's SP from its metadata (``?encrypt=1``:
                                       encrypt assertions to its certificate)
    GET|POST  /idp/{tenant}/sso        receives an AuthnRequest, shows the login page
    POST      /idp/{tenant}/login      the demo user picked or typed an email: POST a signed
                                       response to the SP's ACS (auto-submitting form)

Like every part of the sandbox it imports nothing from ``core``: it is the IdP, not our code.
Tests and benchmarks can also call ``SamlIdp.issue_response`` directly.
"""

from __future__ import annotations

import base64
import html
import os
import re
import secrets
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import xmlsec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

NS_SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
NS_SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
NS_MD = "urn:oasis:names:tc:SAML:2.0:metadata"
NS_DS = "http://www.w3.org/2000/09/xmldsig#"
BINDING_POST = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
BINDING_REDIRECT = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"
NAMEID_EMAIL = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"
STATUS_SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
DEFAULT_TENANTS = ("bigcorp", "newco")
_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def _now() -> datetime:
    return datetime.now(UTC)


def _saml_time(dt: datetime, *, offset: bool = False) -> str:
    """SAML Core §1.3.3: "All SAML time values … MUST be expressed in UTC form, with no time zone component"
    (…Z). ``offset`` plays an IdP that writes ``+00:00`` instead (custom response templates and some
    libraries do), which python3-saml's OneLogin_Saml2_Utils.parse_SAML_to_time refuses."""
    text = dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return text[:-1] + "+00:00" if offset else text


def _new_id() -> str:
    return "_" + secrets.token_hex(20)


@dataclass
class IdpKey:
    key_pem: bytes
    cert_pem: bytes
    cert_b64: str


def make_key(common_name: str, *, bits: int = 2048, now: datetime | None = None, days: int = 365) -> IdpKey:
    """A fresh RSA key and self-signed certificate (made at sandbox start, never stored)."""
    now = now or _now()
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return IdpKey(
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        cert_b64=base64.b64encode(der).decode(),
    )


def load_or_make_key(tenant: str, *, now: datetime | None = None) -> IdpKey:
    """The tenant's IdP key. With ``SANDBOX_STATE_DIR`` set (``python -m sandbox`` sets it to its TLS
    folder) keys are kept there (0600), so the metadata a console imported stays valid across sandbox
    restarts, as a real IdP's would; tests leave it unset and get fresh keys each run."""
    folder = os.environ.get("SANDBOX_STATE_DIR")
    if not folder:
        return make_key(f"sandbox-idp-{tenant}", now=now)
    key_file, cert_file = Path(folder) / f"idp-{tenant}.key", Path(folder) / f"idp-{tenant}.pem"
    if key_file.exists() and cert_file.exists():
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        if cert.not_valid_after_utc > (now or _now()) + timedelta(days=7):
            der = cert.public_bytes(serialization.Encoding.DER)
            return IdpKey(key_pem=key_file.read_bytes(), cert_pem=cert_file.read_bytes(),
                          cert_b64=base64.b64encode(der).decode())
    made = make_key(f"sandbox-idp-{tenant}", now=now)
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(made.key_pem)
    cert_file.write_bytes(made.cert_pem)
    return made


@dataclass
class PendingLogin:
    tenant: str
    request_id: str | None
    acs_url: str
    audience: str
    relay_state: str | None


@dataclass
class RegisteredSp:
    """An SP the IdP knows from its metadata (as a real IdP registers an application)."""

    entity_id: str
    acs_urls: list[str]
    cert_pem: bytes | None  # the first certificate: responses are encrypted to it when asked
    encrypt: bool = False


def parse_sp_metadata(xml: bytes) -> RegisteredSp:
    root = _safe_xml(xml)
    if root.tag != f"{{{NS_MD}}}EntityDescriptor":
        raise ValueError("not an EntityDescriptor")
    sp = root.find(f"{{{NS_MD}}}SPSSODescriptor")
    if sp is None:
        raise ValueError("no SPSSODescriptor")
    acs = [el.get("Location") or "" for el in sp.iterchildren(f"{{{NS_MD}}}AssertionConsumerService")]
    cert_pem = None
    for node in sp.iter(f"{{{NS_DS}}}X509Certificate"):
        der = base64.b64decode("".join((node.text or "").split()))
        cert_pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        break
    return RegisteredSp(entity_id=root.get("entityID") or "", acs_urls=[a for a in acs if a], cert_pem=cert_pem)


@dataclass
class SamlIdp:
    """The sandbox IdP's state: keys per tenant, pending logins, demo users."""

    base_url: str | None = None
    tenants: tuple[str, ...] = DEFAULT_TENANTS
    #: the sandbox's plain-http loopback origin for browser pages (``python -m sandbox --browser-port``):
    #: the SSO URL in the metadata points there, so a browser opens the sign-in page without a
    #: certificate warning (http://127.0.0.1 is a potentially trustworthy origin:
    #: https://w3c.github.io/webappsec-secure-contexts/#is-origin-trustworthy)
    browser_url: str | None = None
    users: dict[str, list[str]] = field(default_factory=dict)
    clock: Callable[[], datetime] = _now
    keys: dict[str, IdpKey] = field(default_factory=dict)
    pending: dict[str, PendingLogin] = field(default_factory=dict)
    sps: dict[str, RegisteredSp] = field(default_factory=dict)
    #: Write time values with a "+00:00" offset instead of "Z" (a misconfigured IdP; see _saml_time).
    offset_timestamps: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        for t in self.tenants:
            self.keys.setdefault(t, load_or_make_key(t, now=self.clock()))

    # --- identities -------------------------------------------------------------------------------

    def base(self, request: Request | None = None) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        if request is not None:
            return str(request.base_url).rstrip("/")
        return "https://127.0.0.1:8502"

    def entity_id(self, tenant: str, request: Request | None = None) -> str:
        # Stable whatever host name the browser or the console used to reach the sandbox.
        return f"urn:crmbridge:sandbox:idp:{tenant}"

    def sso_url(self, tenant: str, request: Request | None = None) -> str:
        return f"{self.browser_url or self.base(request)}/idp/{tenant}/sso"

    def add_tenant(self, tenant: str, users: list[str]) -> None:
        """A new IdP (a provisioned tenant's): its key is kept like the scenario's (see load_or_make_key)."""
        self.keys.setdefault(tenant, load_or_make_key(tenant, now=self.clock()))
        self.users[tenant] = list(users)

    def cert_b64(self, tenant: str) -> str:
        return self.keys[tenant].cert_b64

    # --- documents ----------------------------------------------------------------------------------

    def metadata_xml(self, tenant: str, request: Request | None = None, *, sign: bool = True) -> bytes:
        entity = self.entity_id(tenant, request)
        sso = self.sso_url(tenant, request)
        cert = self.cert_b64(tenant)
        doc = f"""<md:EntityDescriptor xmlns:md="{NS_MD}" xmlns:ds="{NS_DS}" ID="{_new_id()}"
    entityID="{html.escape(entity)}">
  <md:IDPSSODescriptor WantAuthnRequestsSigned="false" protocolSupportEnumeration="{NS_SAMLP}">
    <md:KeyDescriptor use="signing">
      <ds:KeyInfo><ds:X509Data><ds:X509Certificate>{cert}</ds:X509Certificate></ds:X509Data></ds:KeyInfo>
    </md:KeyDescriptor>
    <md:NameIDFormat>{NAMEID_EMAIL}</md:NameIDFormat>
    <md:SingleSignOnService Binding="{BINDING_REDIRECT}" Location="{html.escape(sso)}"/>
    <md:SingleSignOnService Binding="{BINDING_POST}" Location="{html.escape(sso)}"/>
  </md:IDPSSODescriptor>
</md:EntityDescriptor>"""
        root = etree.fromstring(doc.encode())
        if sign:
            self._sign(root, tenant, after=None)
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8")

    def issue_response(self, tenant: str, **kwargs: Any) -> str:
        """A signed samlp:Response as the base64 the browser POSTs in ``SAMLResponse`` (the keyword
        arguments are ``response_xml``'s)."""
        return base64.b64encode(self.response_xml(tenant, **kwargs)).decode()

    def response_xml(
        self,
        tenant: str,
        *,
        email: str,
        acs_url: str,
        audience: str,
        in_response_to: str | None,
        now: datetime | None = None,
        issuer: str | None = None,
        name_id: str | None = None,
        lifetime: timedelta = timedelta(minutes=5),
        sign_assertion: bool = True,
        sign_response: bool = True,
        status: str = STATUS_SUCCESS,
        encrypt_for_cert_pem: bytes | str | None = None,
    ) -> bytes:
        now = now or self.clock()
        issuer = issuer or self.entity_id(tenant)
        irt = f' InResponseTo="{html.escape(in_response_to)}"' if in_response_to else ""
        e = html.escape
        resp_id, assertion_id = _new_id(), _new_id()
        off = self.offset_timestamps
        t_now, t_nb, t_exp = (_saml_time(now, offset=off), _saml_time(now - timedelta(seconds=30), offset=off),
                              _saml_time(now + lifetime, offset=off))
        assertion = (
            f'<saml:Assertion xmlns:saml="{NS_SAML}" ID="{assertion_id}" Version="2.0" IssueInstant="{t_now}">'
            f"<saml:Issuer>{e(issuer)}</saml:Issuer>"
            f'<saml:Subject><saml:NameID Format="{NAMEID_EMAIL}">{e(name_id if name_id is not None else email)}'
            '</saml:NameID><saml:SubjectConfirmation Method="urn:oasis:names:tc:SAML:2.0:cm:bearer">'
            f'<saml:SubjectConfirmationData NotOnOrAfter="{t_exp}" Recipient="{e(acs_url)}"{irt}/>'
            "</saml:SubjectConfirmation></saml:Subject>"
            f'<saml:Conditions NotBefore="{t_nb}" NotOnOrAfter="{t_exp}"><saml:AudienceRestriction>'
            f"<saml:Audience>{e(audience)}</saml:Audience></saml:AudienceRestriction></saml:Conditions>"
            f'<saml:AuthnStatement AuthnInstant="{t_now}" SessionIndex="{_new_id()}"><saml:AuthnContext>'
            "<saml:AuthnContextClassRef>urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
            "</saml:AuthnContextClassRef></saml:AuthnContext></saml:AuthnStatement>"
            '<saml:AttributeStatement><saml:Attribute Name="email" '
            'NameFormat="urn:oasis:names:tc:SAML:2.0:attrname-format:basic">'
            f"<saml:AttributeValue>{e(email)}</saml:AttributeValue></saml:Attribute></saml:AttributeStatement>"
            "</saml:Assertion>"
        )
        status_xml = f'<samlp:Status><samlp:StatusCode Value="{e(status)}"/></samlp:Status>'
        body = assertion if status == STATUS_SUCCESS else ""
        doc = (
            f'<samlp:Response xmlns:samlp="{NS_SAMLP}" xmlns:saml="{NS_SAML}" ID="{resp_id}" Version="2.0" '
            f'IssueInstant="{t_now}" Destination="{e(acs_url)}"{irt}><saml:Issuer>{e(issuer)}</saml:Issuer>'
            f"{status_xml}{body}</samlp:Response>"
        )
        root = etree.fromstring(doc.encode())
        a = root.find(f"{{{NS_SAML}}}Assertion")
        if a is not None and sign_assertion:
            self._sign(a, tenant, after=a.find(f"{{{NS_SAML}}}Issuer"))
        if a is not None and encrypt_for_cert_pem is not None:
            _encrypt_assertion(root, a, encrypt_for_cert_pem)
        if sign_response:
            self._sign(root, tenant, after=root.find(f"{{{NS_SAML}}}Issuer"))
        return etree.tostring(root)

    def _sign(self, node: etree._Element, tenant: str, *, after: etree._Element | None) -> None:
        key = self.keys[tenant]
        sig = xmlsec.template.create(node, xmlsec.Transform.EXCL_C14N, xmlsec.Transform.RSA_SHA256, ns="ds")
        if after is not None:
            after.addnext(sig)
        else:
            node.insert(0, sig)
        ref = xmlsec.template.add_reference(sig, xmlsec.Transform.SHA256, uri="#" + node.get("ID"))
        xmlsec.template.add_transform(ref, xmlsec.Transform.ENVELOPED)
        xmlsec.template.add_transform(ref, xmlsec.Transform.EXCL_C14N)
        ki = xmlsec.template.ensure_key_info(sig)
        xmlsec.template.add_x509_data(ki)
        xmlsec.tree.add_ids(node, ["ID"])
        ctx = xmlsec.SignatureContext()
        k = xmlsec.Key.from_memory(key.key_pem, xmlsec.KeyFormat.PEM, None)
        k.load_cert_from_memory(key.cert_pem, xmlsec.KeyFormat.PEM)
        ctx.key = k
        ctx.sign(sig)

    def register_sp(self, tenant: str, metadata: bytes, *, encrypt: bool = False) -> RegisteredSp:
        """Register the SP of ``tenant`` from its metadata: AuthnRequests must then come from that
        entity ID with one of its ACS URLs, and responses are encrypted to its certificate if asked."""
        sp = parse_sp_metadata(metadata)
        sp.encrypt = encrypt and sp.cert_pem is not None
        self.sps[tenant] = sp
        return sp

    # --- pending logins -------------------------------------------------------------------------------

    def remember(self, pending: PendingLogin) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            if len(self.pending) > 1000:  # a sandbox: keep memory bounded
                self.pending.clear()
            self.pending[token] = pending
        return token

    def take(self, token: str) -> PendingLogin | None:
        with self._lock:
            return self.pending.pop(token, None)


def _encrypt_assertion(root: etree._Element, assertion: etree._Element, cert_pem: bytes | str) -> None:
    """Replace the Assertion by an EncryptedAssertion (AES-256-CBC, key wrapped with RSA-OAEP)."""
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode()
    enc_data = xmlsec.template.encrypted_data_create(
        root, xmlsec.Transform.AES256, type=xmlsec.EncryptionType.ELEMENT, ns="xenc"
    )
    xmlsec.template.encrypted_data_ensure_cipher_value(enc_data)
    key_info = xmlsec.template.encrypted_data_ensure_key_info(enc_data, ns="dsig")
    enc_key = xmlsec.template.add_encrypted_key(key_info, xmlsec.Transform.RSA_OAEP)
    xmlsec.template.encrypted_data_ensure_cipher_value(enc_key)
    manager = xmlsec.KeysManager()
    manager.add_key(xmlsec.Key.from_memory(cert_pem, xmlsec.KeyFormat.CERT_PEM, None))
    ctx = xmlsec.EncryptionContext(manager)
    ctx.key = xmlsec.Key.generate(xmlsec.KeyData.AES, 256, xmlsec.KeyDataType.SESSION)
    wrapper = etree.SubElement(root, f"{{{NS_SAML}}}EncryptedAssertion")
    assertion.addprevious(wrapper)
    wrapper.append(assertion)
    encrypted = ctx.encrypt_xml(enc_data, assertion)
    del encrypted


# --- HTTP ------------------------------------------------------------------------------------------------


def _safe_xml(data: bytes) -> etree._Element:
    if _DTD.search(data):
        raise ValueError("DTD refused")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    return etree.fromstring(data, parser)


def _decode_authn_request(raw: str, *, deflated: bool) -> etree._Element:
    data = base64.b64decode(raw)
    if deflated:
        data = zlib.decompressobj(-15).decompress(data, 1_000_000)
    return _safe_xml(data)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto}"
        "button{margin:.2rem 0;padding:.4rem .8rem}input{padding:.4rem;width:18rem}</style>"
        f"</head><body>{body}</body></html>",
        status_code=status,
        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"},
    )


DEFAULT_USERS = {
    "bigcorp": ["admin@bigcorp.example", "anna@bigcorp.example", "marc@bigcorp.example", "jose@bigcorp.example"],
    "newco": ["nora@newco.example"],
}


def _tenants_from_section(section: dict[str, Any]) -> dict[str, list[str]]:
    """``idp: {tenants: {bigcorp: {users: [...]}, ...}}`` from the scenario, else the demo defaults."""
    tenants = section.get("tenants") if isinstance(section, dict) else None
    if not isinstance(tenants, dict) or not tenants:
        return {t: list(DEFAULT_USERS.get(t, [])) for t in DEFAULT_TENANTS}
    out: dict[str, list[str]] = {}
    for key, cfg in tenants.items():
        users = (cfg or {}).get("users", []) if isinstance(cfg, dict) else []
        out[str(key)] = [str(u) for u in users]
    return out


def _get_idp(state: Any) -> SamlIdp:
    """The IdP kept in the sandbox state (``state.vendors["idp"]``), built from ``state.section("idp")``.

    Keys are made once, when the sandbox starts; a scenario reset reloads the tenants' users only,
    so the metadata a console imported stays valid until the sandbox restarts."""
    if isinstance(state, SamlIdp):
        return state
    if state is None:
        return SamlIdp(users={t: list(DEFAULT_USERS.get(t, [])) for t in DEFAULT_TENANTS})
    vendors = getattr(state, "vendors", None)
    existing = vendors.get("idp") if isinstance(vendors, dict) else None
    if isinstance(existing, SamlIdp):
        return existing
    section = state.section("idp") if hasattr(state, "section") else {}
    users = _tenants_from_section(section)
    idp = SamlIdp(base_url=(section or {}).get("base_url"), tenants=tuple(users), users=users,
                  browser_url=getattr(state, "browser_url", None))
    if isinstance(vendors, dict):
        vendors["idp"] = idp
    if hasattr(state, "on_reset"):

        def _reload(st: Any) -> None:
            fresh = _tenants_from_section(st.section("idp"))
            for t in fresh:
                idp.keys.setdefault(t, load_or_make_key(t, now=idp.clock()))
            idp.users = fresh
            idp.pending.clear()

        state.on_reset(_reload)
    if hasattr(state, "add_inspector"):
        state.add_inspector(
            "idp", lambda key: {"users": idp.users.get(key, []), "entity_id": idp.entity_id(key)}
            if key in idp.keys else None,
        )
    return idp


def routes(state: Any = None) -> list[BaseRoute]:
    """The IdP's Starlette routes. ``state`` is the sandbox's ``SandboxState`` (the IdP keeps itself
    in ``state.vendors["idp"]``), a ``SamlIdp`` (tests, benchmarks), or None (demo defaults)."""
    idp = _get_idp(state)

    def _tenant(request: Request) -> str | None:
        t = request.path_params["tenant"]
        return t if t in idp.keys else None

    async def metadata(request: Request) -> Response:
        tenant = _tenant(request)
        if tenant is None:
            return PlainTextResponse("unknown IdP tenant", status_code=404)
        return Response(idp.metadata_xml(tenant, request), media_type="application/samlmetadata+xml")

    async def sso(request: Request) -> Response:
        tenant = _tenant(request)
        if tenant is None:
            return PlainTextResponse("unknown IdP tenant", status_code=404)
        if request.method == "POST":
            form = await request.form()
            raw, relay, deflated = form.get("SAMLRequest"), form.get("RelayState"), False
        else:
            raw, relay, deflated = (
                request.query_params.get("SAMLRequest"), request.query_params.get("RelayState"), True,
            )
        if not isinstance(raw, str) or not raw:
            return _page("Sandbox IdP", "<h1>No SAMLRequest</h1>", 400)
        try:
            req = _decode_authn_request(raw, deflated=deflated)
        except Exception:
            return _page("Sandbox IdP", "<h1>Unreadable AuthnRequest</h1>", 400)
        if req.tag != f"{{{NS_SAMLP}}}AuthnRequest":
            return _page("Sandbox IdP", "<h1>Not an AuthnRequest</h1>", 400)
        acs = req.get("AssertionConsumerServiceURL") or ""
        issuer_el = req.find(f"{{{NS_SAML}}}Issuer")
        audience = (issuer_el.text or "").strip() if issuer_el is not None else ""
        registered = idp.sps.get(tenant)
        if registered is not None:
            acs = acs or (registered.acs_urls[0] if registered.acs_urls else "")
            if audience != registered.entity_id or acs not in registered.acs_urls:
                return _page("Sandbox IdP", "<h1>Unknown application</h1><p>The AuthnRequest's issuer or ACS "
                             "URL does not match the SP metadata registered for this tenant.</p>", 400)
        if not acs.startswith(("https://", "http://")) or not audience:
            return _page("Sandbox IdP", "<h1>AuthnRequest lacks an ACS URL or issuer</h1>", 400)
        token = idp.remember(
            PendingLogin(tenant, req.get("ID"), acs, audience, relay if isinstance(relay, str) else None)
        )
        users = idp.users.get(tenant, [])
        buttons = "".join(
            f"<button name='email' value='{html.escape(u)}'>{html.escape(u)}</button><br>" for u in users
        )
        action = html.escape(f"{idp.browser_url or idp.base(request)}/idp/{tenant}/login")
        body = (
            f"<h1>Sandbox IdP — {html.escape(tenant)}</h1>"
            f"<p>Signing in to <code>{html.escape(audience)}</code>.</p>"
            f"<form method='post' action='{action}'><input type='hidden' name='pending' value='{token}'>"
            f"{buttons}<p><label>Email <input name='email' type='email' autocomplete='off' "
            "placeholder='someone@example.com'></label> <button type='submit'>Sign in</button></p></form>"
        )
        return _page("Sandbox IdP", body)

    async def login(request: Request) -> Response:
        tenant = _tenant(request)
        if tenant is None:
            return PlainTextResponse("unknown IdP tenant", status_code=404)
        form = await request.form()
        token = form.get("pending")
        # a picked user's button and the (empty) typed-email box both post ``email``: take the one given
        email = next((v for v in form.getlist("email") if isinstance(v, str) and v.strip()), None)
        pending = idp.take(token) if isinstance(token, str) else None
        if pending is None or pending.tenant != tenant:
            return _page("Sandbox IdP", "<h1>This sign-in expired: start again from the app.</h1>", 400)
        if not isinstance(email, str) or "@" not in email:
            return _page("Sandbox IdP", "<h1>Enter an email address.</h1>", 400)
        registered = idp.sps.get(tenant)
        saml_response = idp.issue_response(
            tenant,
            email=email.strip(),
            acs_url=pending.acs_url,
            audience=pending.audience,
            in_response_to=pending.request_id,
            encrypt_for_cert_pem=registered.cert_pem if registered is not None and registered.encrypt else None,
        )
        relay = (
            f"<input type='hidden' name='RelayState' value='{html.escape(pending.relay_state)}'>"
            if pending.relay_state
            else ""
        )
        body = (
            f"<form id='f' method='post' action='{html.escape(pending.acs_url)}'>"
            f"<input type='hidden' name='SAMLResponse' value='{saml_response}'>{relay}"
            "<noscript><button type='submit'>Continue</button></noscript></form>"
            "<script>document.getElementById('f').submit()</script>"
        )
        return _page("Signing in…", body)

    async def sp_metadata(request: Request) -> Response:
        tenant = _tenant(request)
        if tenant is None:
            return PlainTextResponse("unknown IdP tenant", status_code=404)
        body = await request.body()
        if len(body) > 1_000_000:
            return PlainTextResponse("too large", status_code=413)
        try:
            sp = idp.register_sp(tenant, body, encrypt=request.query_params.get("encrypt") == "1")
        except Exception as exc:
            return PlainTextResponse(f"not SP metadata: {exc}", status_code=400)
        return PlainTextResponse(f"registered {sp.entity_id}")

    return [
        Route("/idp/{tenant}/sp-metadata", sp_metadata, methods=["PUT"]),
        Route("/idp/{tenant}/metadata", metadata, methods=["GET"]),
        Route("/idp/{tenant}/sso", sso, methods=["GET", "POST"]),
        Route("/idp/{tenant}/login", login, methods=["POST"]),
    ]
