"""Import, diff and rejected re-import; IdP and SP key rollover; encrypted assertions; POST-only and
signed-request IdPs; pasted responses; the certificate watch."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

import pytest
from sqlmodel import Session, func, select

from core.clock import FrozenClock
from core.errors import AccessDenied, MetadataInvalid, NotFound
from core.sso.keys import complete_sp_rollover, ensure_sp_keys, sp_metadata, start_sp_rollover
from core.sso.metadata import apply_import, get_status, preview_import, sso_summary
from core.sso.models import SsoConfig, SsoSpKey
from core.sso.signin import consume_response, start_login
from core.sso.sp import sp_endpoints
from core.sso.testlogin import check_pasted_response, list_traces, start_test_login
from core.sso.watch import CertFinding, certificate_timeline, purge_expired, watch_certificates
from core.tenants.access import Principal
from core.tenants.models import AuditEvent, ConsoleAccount, ConsoleSession, Tenant
from sandbox.idp import SamlIdp, make_key
from tests.conftest import admin_of, make_tenant
from tests.core.sso.conftest import CONSOLE, SsoWorld, form_fields

STAFF = Principal(role="staff", email="cs@crmbridge.example")


def _with_extra_cert(metadata: bytes, cert_b64: str) -> bytes:
    """The IdP's (unsigned) metadata with one more signing KeyDescriptor: a rollover."""
    extra = (f'<md:KeyDescriptor use="signing"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>{cert_b64}'
             "</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>").encode()
    return metadata.replace(b"<md:NameIDFormat>", extra + b"<md:NameIDFormat>", 1)


def _events(session: Session, action: str) -> list[AuditEvent]:
    return list(session.exec(select(AuditEvent).where(AuditEvent.action == action)).all())


def _config(session: Session, tenant: Tenant) -> SsoConfig:
    return session.exec(select(SsoConfig).where(SsoConfig.tenant_id == tenant.id)).one()


def test_import_then_rejected_reimport_keeps_the_configuration(session: Session, vault_keys: Any, idp: SamlIdp,
                                                               clock: FrozenClock) -> None:
    t = make_tenant(session, "bigcorp")
    apply_import(session=session, principal=STAFF, tenant_id=t.id, data=idp.metadata_xml("bigcorp"),  # type: ignore[arg-type]
                 now=clock())
    session.commit()
    before = _config(session, t).model_dump()
    broken = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><md:EntityDescriptor '
              b'xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" entityID="x">&a;</md:EntityDescriptor>')
    sp_only = idp.metadata_xml("bigcorp").replace(b"IDPSSODescriptor", b"SPSSODescriptor")
    for bad in (broken, sp_only, b"<html>not metadata</html>"):
        with pytest.raises(MetadataInvalid) as exc:
            apply_import(session=session, principal=STAFF, tenant_id=t.id, data=bad, now=clock())  # type: ignore[arg-type]
        assert "configuration in force is unchanged" in str(exc.value)
        session.rollback()
        assert _config(session, t).model_dump() == before
    assert len(_events(session, "sso.metadata.import")) == 1
    assert not _events(session, "sso.metadata.replace")


def test_reimport_shows_a_diff_and_resets_tested(session: Session, vault_keys: Any, idp: SamlIdp,
                                                 clock: FrozenClock) -> None:
    t = make_tenant(session, "bigcorp")
    apply_import(session=session, principal=STAFF, tenant_id=t.id, data=idp.metadata_xml("bigcorp"),  # type: ignore[arg-type]
                 now=clock())
    cfg = _config(session, t)
    cfg.tested_at, cfg.last_test_ok = clock(), True
    session.commit()
    # The IdP rolled its key and moved its endpoint.
    other = idp.metadata_xml("newco").replace(b"urn:crmbridge:sandbox:idp:newco", b"urn:crmbridge:sandbox:idp:bigcorp")
    admin = admin_of(t)
    preview = preview_import(session=session, principal=admin, tenant_id=t.id, data=other, now=clock())  # type: ignore[arg-type]
    assert preview.report.usable and preview.diff is not None
    assert preview.diff.entity_id is None
    assert [e[1] for e in preview.diff.endpoints_added] == ["https://sandbox.test/idp/newco/sso"] * 2
    assert len(preview.diff.certs_added) == 1 and len(preview.diff.certs_removed) == 1
    assert preview.diff.certs_removed[0].sha256 != preview.diff.certs_added[0].sha256
    assert _config(session, t).version == 1  # a preview writes nothing
    apply_import(session=session, principal=admin, tenant_id=t.id, data=other, now=clock())  # type: ignore[arg-type]
    session.commit()
    cfg = _config(session, t)
    assert cfg.version == 2 and cfg.tested_at is None and cfg.sso_url.endswith("/idp/newco/sso")
    ev = _events(session, "sso.metadata.replace")[0]
    assert json.loads(ev.details)["diff"]["certs_removed"]
    with pytest.raises(AccessDenied):
        preview_import(session=session, principal=admin_of(make_tenant(session, "acme")), tenant_id=t.id,  # type: ignore[arg-type]
                       data=other)


def test_every_signing_certificate_is_trusted_during_an_idp_rollover(
    session: Session, vault_keys: Any, idp: SamlIdp, clock: FrozenClock
) -> None:
    t = make_tenant(session, "bigcorp")
    new_key = make_key("sandbox-idp-bigcorp-2026", now=clock())
    md = _with_extra_cert(idp.metadata_xml("bigcorp", sign=False), new_key.cert_b64)
    apply_import(session=session, principal=STAFF, tenant_id=t.id, data=md, now=clock())  # type: ignore[arg-type]
    session.commit()
    ep = sp_endpoints("bigcorp")
    old_key = idp.keys["bigcorp"]
    try:
        for key in (old_key, new_key):
            idp.keys["bigcorp"] = key
            start = start_test_login(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
            b64 = idp.issue_response("bigcorp", email="a@bigcorp.example", acs_url=ep.acs_url, audience=ep.entity_id,
                                     in_response_to=start.request_id, now=clock())
            out = consume_response(session=session, tenant_slug="bigcorp", saml_response=b64, now=clock())
            assert out.ok, out.message
        # A third key the metadata does not list is refused.
        idp.keys["bigcorp"] = make_key("stranger", now=clock())
        start = start_test_login(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
        b64 = idp.issue_response("bigcorp", email="a@bigcorp.example", acs_url=ep.acs_url, audience=ep.entity_id,
                                 in_response_to=start.request_id, now=clock())
        out = consume_response(session=session, tenant_slug="bigcorp", saml_response=b64, now=clock())
        assert not out.ok and out.code == "bad_signature"
    finally:
        idp.keys["bigcorp"] = old_key


def test_encrypted_assertions_decrypt_with_the_vaulted_sp_key_during_an_sp_rollover(
    session: Session, vault_keys: Any, idp: SamlIdp, clock: FrozenClock
) -> None:
    t = make_tenant(session, "bigcorp")
    apply_import(session=session, principal=STAFF, tenant_id=t.id, data=idp.metadata_xml("bigcorp"),  # type: ignore[arg-type]
                 now=clock())
    ensure_sp_keys(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    keys = start_sp_rollover(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    session.commit()
    assert sorted(k.state for k in keys) == ["active", "next"]
    md = sp_metadata(session=session, tenant_slug="bigcorp", now=clock())
    assert all(k.cert_pem.split("-----")[2].strip().replace("\n", "")[:60] in md.replace("\n", "") for k in keys)
    ep = sp_endpoints("bigcorp")
    for k in keys:  # the IdP may encrypt to either published certificate
        start = start_test_login(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
        b64 = idp.issue_response("bigcorp", email="a@bigcorp.example", acs_url=ep.acs_url, audience=ep.entity_id,
                                 in_response_to=start.request_id, now=clock(), encrypt_for_cert_pem=k.cert_pem)
        assert b"EncryptedAssertion" in base64.b64decode(b64)
        out = consume_response(session=session, tenant_slug="bigcorp", saml_response=b64, now=clock())
        assert out.ok, out.message
    # Encrypted to a certificate that is not ours: a clear "cannot decrypt".
    stranger = make_key("stranger", now=clock())
    start = start_test_login(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    b64 = idp.issue_response("bigcorp", email="a@bigcorp.example", acs_url=ep.acs_url, audience=ep.entity_id,
                             in_response_to=start.request_id, now=clock(), encrypt_for_cert_pem=stranger.cert_pem)
    out = consume_response(session=session, tenant_slug="bigcorp", saml_response=b64, now=clock())
    assert not out.ok and out.code == "cannot_decrypt" and "Cannot decrypt" in out.message
    # Completing the rollover retires the old key from the metadata.
    complete_sp_rollover(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    states = {k.state for k in session.exec(select(SsoSpKey)).all()}
    assert states == {"active", "retired"}
    assert not any("PRIVATE KEY" in k.vault_ref or "PRIVATE" in k.cert_pem for k in session.exec(select(SsoSpKey)))


def test_sp_keys_roll_over_by_date(session: Session, vault_keys: Any, idp: SamlIdp, clock: FrozenClock) -> None:
    t = make_tenant(session, "bigcorp")
    ensure_sp_keys(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    active = session.exec(select(SsoSpKey)).one()
    clock.now = active.not_after - timedelta(days=20)
    keys = ensure_sp_keys(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    assert sorted(k.state for k in keys) == ["active", "next"]
    clock.advance(days=8)
    keys = ensure_sp_keys(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    assert [k.state for k in keys] == ["active"] and keys[0].id != active.id
    assert _events(session, "sso.sp_key.rollover")


def test_post_only_idp_round_trip_through_the_post_binding(sso_world: SsoWorld) -> None:
    w = sso_world
    md = w.idp.metadata_xml("bigcorp", sign=False)
    redirect_line = next(line for line in md.splitlines() if b"HTTP-Redirect" in line)
    with w.session() as s:
        apply_import(session=s, principal=STAFF, tenant_id=w.bigcorp.id, data=md.replace(redirect_line, b""))  # type: ignore[arg-type]
        s.commit()
        assert _config(s, w.bigcorp).sso_binding.endswith("HTTP-POST")
    page = w.console.get("/sso/bigcorp/login", follow_redirects=False)
    assert page.status_code == 200  # an auto-submitting form, not a redirect
    action, fields = form_fields(page.text)
    assert action == "https://sandbox.test/idp/bigcorp/sso" and "SAMLRequest" in fields
    login = w.sandbox.post("/idp/bigcorp/sso", data=fields)
    assert login.status_code == 200, login.text
    _, pending = form_fields(login.text)
    posted = w.sandbox.post("/idp/bigcorp/login",
                            data={"pending": pending["pending"], "email": "admin@bigcorp.example"})
    acs_action, acs_fields = form_fields(posted.text)
    done = w.post_acs(acs_action, acs_fields)
    assert done.status_code == 303 and done.cookies.get("crmbridge_session")


def test_signed_authn_requests_when_the_idp_wants_them(session: Session, vault_keys: Any, idp: SamlIdp,
                                                       clock: FrozenClock) -> None:
    from onelogin.saml2.utils import OneLogin_Saml2_Utils

    t = make_tenant(session, "bigcorp")
    md = idp.metadata_xml("bigcorp", sign=False).replace(b'WantAuthnRequestsSigned="false"',
                                                           b'WantAuthnRequestsSigned="true"')
    apply_import(session=session, principal=STAFF, tenant_id=t.id, data=md, now=clock())  # type: ignore[arg-type]
    with pytest.raises(NotFound) as no_keys:  # an unsigned request would only fail at the IdP
        start_login(session=session, tenant_slug="bigcorp", relay_state="/x", now=clock())
    assert no_keys.value.code == "sp_keys_missing" and "Generate SP keys" in (no_keys.value.fix or "")
    ensure_sp_keys(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    start = start_login(session=session, tenant_slug="bigcorp", relay_state="/x", now=clock())
    query = urlsplit(start.url).query
    q = parse_qs(query)
    assert q["SigAlg"] == ["http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"]
    signed_part = query.split("&Signature=")[0]
    key = session.exec(select(SsoSpKey).where(SsoSpKey.state == "active")).one()
    assert OneLogin_Saml2_Utils.validate_binary_sign(
        signed_part, base64.b64decode(unquote_plus(query.split("&Signature=")[1])), key.cert_pem,
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256")


def test_pasted_response_is_checked_without_consuming_anything(session: Session, vault_keys: Any, idp: SamlIdp,
                                                               clock: FrozenClock) -> None:
    t = make_tenant(session, "bigcorp")
    session.add(ConsoleAccount(email="admin@bigcorp.example", role="tenant_admin", tenant_id=t.id))
    apply_import(session=session, principal=STAFF, tenant_id=t.id, data=idp.metadata_xml("bigcorp"),  # type: ignore[arg-type]
                 now=clock())
    ep = sp_endpoints("bigcorp")
    good = idp.issue_response("bigcorp", email="admin@bigcorp.example", acs_url=ep.acs_url, audience=ep.entity_id,
                              in_response_to="ONELOGIN_captured", now=clock())
    trace = check_pasted_response(session=session, principal=admin_of(t), tenant_id=t.id,  # type: ignore[arg-type]
                                  saml_response=good, now=clock())
    assert trace.ok and trace.source == "paste"
    checks = {c["name"]: c for c in json.loads(trace.checks_json)}
    assert checks["Answers a request CRM Bridge sent"]["ok"] is False
    assert checks["Audience is our SP entity ID"]["ok"] is True
    wrong = idp.issue_response("bigcorp", email="a@bigcorp.example", acs_url="https://elsewhere.example/acs",
                               audience="https://elsewhere.example/sp", in_response_to=None, now=clock())
    bad = check_pasted_response(session=session, principal=admin_of(t), tenant_id=t.id,  # type: ignore[arg-type]
                                saml_response=wrong, now=clock())
    assert not bad.ok and "ACS" in (bad.error or "")
    assert session.exec(select(func.count()).select_from(ConsoleSession)).one() == 0
    assert _config(session, t).tested_at is None
    traces = list_traces(session=session, principal=admin_of(t), tenant_id=t.id)  # type: ignore[arg-type]
    assert [x.id for x in traces] == [bad.id, trace.id]


def test_certificate_watch_thresholds_and_audit_events(session: Session, vault_keys: Any, clock: FrozenClock) -> None:
    t = make_tenant(session, "bigcorp")
    aging = SamlIdp(base_url="https://sandbox.test", tenants=("bigcorp",),
                    clock=lambda: clock() - timedelta(days=344, hours=12))  # cert: 365 days from then
    apply_import(session=session, principal=STAFF, tenant_id=t.id, data=aging.metadata_xml("bigcorp"),  # type: ignore[arg-type]
                 now=clock())
    system = Principal.system("scheduler")

    def watch() -> list[CertFinding]:
        return [f for f in watch_certificates(session=session, principal=system, now=clock())
                if f.code.startswith("idp_cert")]

    f = watch()
    assert [(x.code, x.severity, x.new) for x in f] == [("idp_cert_expiring_30", "warning", True)]
    # The watch rolls SP keys that exist, and creates none: that is the tenant's explicit step.
    assert session.exec(select(func.count()).select_from(SsoSpKey)).one() == 0
    ensure_sp_keys(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    assert [x.code for x in watch()] == ["idp_cert_expiring_30"] and not watch()[0].new
    assert len(_events(session, "sso.cert.expiring")) == 1
    clock.advance(days=14)
    assert [(x.code, x.severity, x.new) for x in watch()] == [("idp_cert_expiring_7", "error", True)]
    clock.advance(days=8)
    assert [(x.code, x.severity, x.new) for x in watch()] == [("idp_cert_expired", "error", True)]
    assert len(_events(session, "sso.cert.expiring")) == 2 and len(_events(session, "sso.cert.expired")) == 1
    with pytest.raises(AccessDenied):
        watch_certificates(session=session, principal=admin_of(t), now=clock())
    timeline = certificate_timeline(session=session, principal=admin_of(t), tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    assert {e.owner for e in timeline} == {"IdP", "SP"}
    assert next(e for e in timeline if e.owner == "IdP").state == "expired"


def test_status_and_summary_for_posture(session: Session, vault_keys: Any, idp: SamlIdp, clock: FrozenClock) -> None:
    t = make_tenant(session, "bigcorp")
    assert sso_summary(session=session, principal=STAFF, tenant_id=t.id)["configured"] is False  # type: ignore[arg-type]
    apply_import(session=session, principal=STAFF, tenant_id=t.id, data=idp.metadata_xml("bigcorp"),  # type: ignore[arg-type]
                 now=clock())
    st = get_status(session=session, principal=admin_of(t), tenant_id=t.id)  # type: ignore[arg-type]
    assert st.configured and not st.tested
    assert st.sp.acs_url == f"{CONSOLE}/sso/bigcorp/acs" and st.sp.entity_id == f"{CONSOLE}/sso/bigcorp/metadata"
    assert st.sp.certs == []  # importing generates no SP key
    ensure_sp_keys(session=session, principal=admin_of(t), tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    st = get_status(session=session, principal=admin_of(t), tenant_id=t.id)  # type: ignore[arg-type]
    assert [c["state"] for c in st.sp.certs] == ["active"]
    summary = sso_summary(session=session, principal=STAFF, tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    assert summary["configured"] and summary["signing_cert_expires"] > clock()


def test_replay_keys_are_kept_until_they_expire_then_purged(session: Session, vault_keys: Any, idp: SamlIdp,
                                                            clock: FrozenClock) -> None:
    from core.sso.models import SsoRequest, SsoSeenResponse

    t = make_tenant(session, "bigcorp")
    session.add(ConsoleAccount(email="admin@bigcorp.example", role="tenant_admin", tenant_id=t.id))
    apply_import(session=session, principal=STAFF, tenant_id=t.id, data=idp.metadata_xml("bigcorp"),  # type: ignore[arg-type]
                 now=clock())
    ep = sp_endpoints("bigcorp")
    start = start_login(session=session, tenant_slug="bigcorp", now=clock())
    b64 = idp.issue_response("bigcorp", email="admin@bigcorp.example", acs_url=ep.acs_url, audience=ep.entity_id,
                             in_response_to=start.request_id, now=clock())
    out = consume_response(session=session, tenant_slug="bigcorp", saml_response=b64, now=clock())
    assert out.ok and out.token
    seen = session.exec(select(SsoSeenResponse)).all()
    assert len(seen) == 2 and all(s.expires_at > clock() + timedelta(minutes=5) for s in seen)
    assert purge_expired(session=session, now=clock() + timedelta(minutes=1)) == 0
    clock.advance(days=2)
    assert purge_expired(session=session, now=clock()) == 3  # two ids and the old request
    assert not session.exec(select(SsoSeenResponse)).all() and not session.exec(select(SsoRequest)).all()


def test_importing_metadata_generates_no_sp_key_the_key_step_does(
    session: Session, vault_keys: Any, idp: SamlIdp, clock: FrozenClock
) -> None:
    """Key generation is an explicit step: an import writes the IdP configuration only; the SP metadata
    (public) says who generates the keys instead of generating them on a stranger's GET."""
    t = make_tenant(session, "bigcorp")
    apply_import(session=session, principal=STAFF, tenant_id=t.id, data=idp.metadata_xml("bigcorp"),  # type: ignore[arg-type]
                 now=clock())
    session.commit()
    assert session.exec(select(func.count()).select_from(SsoSpKey)).one() == 0
    assert not _events(session, "sso.sp_key.create")
    with pytest.raises(NotFound) as missing:
        sp_metadata(session=session, tenant_slug="bigcorp", now=clock())
    assert missing.value.code == "sp_keys_missing" and "Single sign-on page" in (missing.value.fix or "")
    assert session.exec(select(func.count()).select_from(SsoSpKey)).one() == 0
    keys = ensure_sp_keys(session=session, principal=admin_of(t), tenant_id=t.id, now=clock())  # type: ignore[arg-type]
    session.commit()
    assert [k.state for k in keys] == ["active"] and len(_events(session, "sso.sp_key.create")) == 1
    assert keys[0].cert_pem.split("-----")[2].strip().replace("\n", "")[:60] in sp_metadata(
        session=session, tenant_slug="bigcorp", now=clock()).replace("\n", "")
    # The step is idempotent: calling it again keeps the key.
    assert [k.id for k in ensure_sp_keys(session=session, principal=admin_of(t), tenant_id=t.id,  # type: ignore[arg-type]
                                         now=clock())] == [keys[0].id]
