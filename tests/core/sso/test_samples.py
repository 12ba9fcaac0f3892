"""Real material: every file in ../shared/samples/idp-metadata and ../shared/samples/saml-responses
gets a verdict, printed as a table with the expected one. All match, or the case is listed in
docs/saml-divergences.md with a reason. Attacks are rejected with no crash and no network access.

Metadata verdicts use a fixed clock (REAL_NOW): validUntil dates decide usability, so a real clock
would flip some verdicts over the years.
"""

from __future__ import annotations

import base64
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.sso.lint import lint_metadata, load_certificate
from core.sso.sp import make_settings, validate_saml_response
from tests.conftest import ROOT, samples_dir
from tests.core.sso.sample_cases import REAL_NOW, Samples, load_raw, response_cases

DIVERGENCES = ROOT / "docs" / "saml-divergences.md"
UMU = "https://idp.umu.se/saml2/idp/metadata.php"
ANCHORS = "saml-responses/pysaml2-keys/"

# file -> (usable, why), per the definition of "usable" in the issue and the MANIFEST row.
METADATA_EXPECT: dict[str, tuple[bool, str]] = {
    "adfs-2012-federationmetadata-signed.xml": (True, "IdP+SP ADFS entity; signature no longer verifies (warning)"),
    "adfs-federationmetadata-signed-with-logout.xml": (True, "ADFS IdP; signature no longer verifies (warning)"),
    "adfs-v2-federationmetadata-signed-msidlab7.xml": (True, "ADFS 2.0, all data present, signature valid"),
    "adfs-v3-federationmetadata-signed-msidlab2.xml": (True, "ADFS 3.0, all data present, signature valid"),
    "broken-microsoftonline-sp-metadata-signed-two-signing-certs.xml": (False, "SP metadata, no IDPSSODescriptor"),
    "broken-missing-entityid.xml": (False, "comment before the XML declaration: not well-formed"),
    "broken-no-idpssodescriptor-sp-only.xml": (False, "SP only"),
    "broken-no-post-or-redirect-sso-binding.xml": (False, "not well-formed; and no SSO binding"),
    "broken-not-saml-metadata-root.xml": (False, "<root> is not metadata"),
    "broken-schema-invalid-entitydescriptor2.xml": (False, "EntityDescriptor2 root"),
    "broken-sp-entitiesdescriptor-aggregate-no-idp.xml": (False, "aggregate of SPs, no IdP"),
    "broken-sp-metadata-expired-validuntil-2014.xml": (False, "SP metadata, validUntil 2014"),
    "broken-sp-only-metadata-no-idpssodescriptor.xml": (False, "SP metadata"),
    "broken-xxe-billion-laughs-generic.xml": (False, "DTD refused before expansion"),
    "broken-xxe-remote-dtd-entity-sp-metadata.xml": (False, "DTD refused, nothing fetched"),
    "entra-id-federationmetadata-common-signed-4-signing-certs.xml": (True, "4 signing certs, signature valid"),
    "generic-cacheduration-only-P1DT.xml": (True, "no validUntil; malformed cacheDuration is a warning"),
    "generic-entitiesdescriptor-two-idps-expired-validuntil-pem-in-x509.xml": (False, "validUntil 2014 passed"),
    "generic-urn-example-idp-redirect-only.xml": (True, "Redirect-only SSO"),
    "generic-validuntil-2020-and-cacheduration-P2DT.xml": (False, "validUntil 2020 passed"),
    "google-style-boxyhq-metadata-validuntil-2026.xml": (False, "validUntil 2026-06-22 passed"),
    "google-workspace-metadata-C02dfl1r1.xml": (False, "validUntil 2021 passed"),
    "mocksaml-idp-metadata.xml": (True, "validUntil 2032"),
    "okta-oktapreview-metadata.xml": (True, "POST+Redirect, one signing cert"),
    "onelogin-certs-multi-signing-plus-encryption-rollover.xml": (True, "rollover, expired certs warn only"),
    "onelogin-certs-three-signing-certs-rollover.xml": (True, "rollover with a duplicate"),
    "onelogin-different-sign-and-encrypt-certs.xml": (True, "distinct signing and encryption certs"),
    "onelogin-idp-metadata.xml": (True, "expired cert warns only"),
    "onelogin-metadata-503983-post-and-soap.xml": (True, "POST-only IdPs are usable"),
    "onelogin-same-sign-and-encrypt-cert.xml": (True, "same cert for both uses"),
    "secureworks-idp-metadata.xml": (True, "POST-only"),
    "shibboleth-idp-descriptor-saml1-and-saml2-no-validuntil.xml": (True, "SAML 2.0 among SAML 1.1/Shibboleth"),
    "shibboleth-samltest-id-metadata-validuntil-2100.xml": (True, "validUntil 2100"),
    "shibboleth-testshib-entitiesdescriptor-crewjam.xml": (True, "aggregate with exactly one IdP"),
    "shibboleth-testshib-idp-metadata-crewjam.xml": (True, "TestShib IdP"),
    "shibboleth-testshib-providers-entitiesdescriptor.xml": (True, "aggregate with exactly one IdP"),
    "signed-sp-metadata-expired-signing-cert.xml": (False, "SP metadata (its signature verifies)"),
    "signed-sp-metadata-pytoolkit.xml": (False, "SP metadata (its signature verifies)"),
    "simplesamlphp-idp-example-metadata.xml": (True, "SimpleSAMLphp IdP"),
    "swamid-federation-signed-entitiesdescriptor-aggregate.xml": (
        False, "36 SAML 2.0 IdPs: ambiguous without --entity-id"),
}
# Extra metadata cases: (file, entity_id, usable, why).
METADATA_VARIANTS = [
    ("swamid-federation-signed-entitiesdescriptor-aggregate.xml", UMU, True, "pysaml2 test_swami_1's IdP"),
    ("generic-entitiesdescriptor-two-idps-expired-validuntil-pem-in-x509.xml",
     "https://bar.example.com/access/saml/idp.xml", False, "parse(entity_id=bar): the aggregate's validUntil passed"),
]
TRUST_ANCHORS = {
    "idp-metadata-roland-trust-anchor.xml": (True, "pysaml2 IdP (1024-bit key and http endpoints warn)"),
    "idp_example-metadata-used-as-trust.xml": (True, "pysaml2 IdP, validUntil 2036"),
}


@dataclass
class Row:
    file: str
    case: str
    expected: str
    actual: str
    divergence: str | None = None

    @property
    def ok(self) -> bool:
        return self.expected == self.actual or self.divergence is not None


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Any attempt to resolve or connect fails the test (recorded, then raised)."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise AssertionError(f"network access attempted: {args[:2]!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts


def _verdict(usable: bool) -> str:
    return "usable" if usable else "NOT usable"


def _metadata_rows(samples: Path) -> list[Row]:
    rows = []
    md_dir = samples / "idp-metadata"
    for path in sorted(md_dir.iterdir()):
        assert path.name in METADATA_EXPECT, f"no expectation for idp-metadata/{path.name}: add it"
        usable, why = METADATA_EXPECT[path.name]
        report = lint_metadata(path.read_bytes(), now=REAL_NOW)
        rows.append(Row(f"idp-metadata/{path.name}", f"lint ({why})", _verdict(usable), _verdict(report.usable)))
    for name, entity, usable, why in METADATA_VARIANTS:
        report = lint_metadata((md_dir / name).read_bytes(), entity_id=entity, now=REAL_NOW)
        rows.append(Row(f"idp-metadata/{name}", f"lint --entity-id {entity} ({why})", _verdict(usable),
                        _verdict(report.usable)))
    for name, (usable, why) in TRUST_ANCHORS.items():
        report = lint_metadata((samples / ANCHORS / name).read_bytes(), now=REAL_NOW)
        rows.append(Row(ANCHORS + name, f"lint ({why})", _verdict(usable), _verdict(report.usable)))
    return rows


def _response_rows(samples: Path) -> list[Row]:
    rows = []
    for c in response_cases(samples):
        raw = load_raw(samples / "saml-responses" / c.file)
        if c.mutate:
            raw = c.mutate(raw)
        result = validate_saml_response(
            settings=make_settings(c.settings), saml_response=base64.b64encode(raw).decode(),
            request_data=c.request, request_id=c.request_id, now=c.now,
        )
        expected = ("VALID" if c.expect_ok else "REJECT") + (f" [{c.expect_code}]" if c.expect_code else "")
        actual = ("VALID" if result.ok else "REJECT") + (f" [{result.code}]" if c.expect_code else "")
        if c.expect_name_id is not None:
            expected += f" nameid={c.expect_name_id}"
            actual += f" nameid={(result.name_id or '').strip()}"
        rows.append(Row(f"saml-responses/{c.file}", c.label, expected, actual, c.divergence))
    return rows


def _support_rows(samples: Path) -> list[Row]:
    rows = []
    s = Samples(samples)
    for path in sorted((samples / "saml-responses").rglob("*")):
        if not path.is_file() or path.parent == samples / "saml-responses":
            continue
        rel = str(path.relative_to(samples))
        if path.suffix == ".json":
            try:
                make_settings(s.py3(path.name))
                actual = "builds python3-saml settings"
            except Exception as exc:  # pragma: no cover - reported in the table
                actual = f"settings error: {exc}"
            rows.append(Row(rel, "python3-saml settings (custom_base_path → customPath-sp.crt)",
                            "builds python3-saml settings", actual))
        elif path.suffix in (".crt", ".pem"):
            try:
                load_certificate(path.read_text())
                actual = "X.509 certificate"
            except ValueError:
                actual = "unreadable"
            rows.append(Row(rel, "certificate", "X.509 certificate", actual))
    return rows


def _print(rows: list[Row]) -> str:
    w_file = max(len(r.file) for r in rows)
    w_case = min(70, max(len(r.case) for r in rows))
    lines = [f"{'file':{w_file}}  {'case':{w_case}}  {'expected':34}  {'actual':34}  verdict",
             "-" * (w_file + w_case + 90)]
    for r in rows:
        mark = "match" if r.expected == r.actual else ("DIVERGES (docs/saml-divergences.md)" if r.divergence
                                                       else "MISMATCH")
        lines.append(f"{r.file:{w_file}}  {r.case[:w_case]:{w_case}}  {r.expected:34}  {r.actual:34}  {mark}")
    return "\n".join(lines)


def _documented() -> set[str]:
    text = DIVERGENCES.read_text()
    return set(re.findall(r"^\|\s*`([^`]+)`", text, flags=re.M))


@pytest.mark.samples
def test_every_sample_file_gets_its_expected_verdict(no_network: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    samples = samples_dir()
    rows = _metadata_rows(samples) + _response_rows(samples) + _support_rows(samples)
    with capsys.disabled():
        print("\n" + _print(rows))
        print(f"{len(rows)} cases, {sum(r.expected == r.actual for r in rows)} match, "
              f"{sum(r.expected != r.actual and r.divergence is not None for r in rows)} documented divergences")
    assert no_network == []
    # Every file of both folders is covered.
    covered = {r.file for r in rows}
    on_disk = {str(p.relative_to(samples)) for d in ("idp-metadata", "saml-responses")
               for p in (samples / d).rglob("*") if p.is_file()}
    assert on_disk - covered == set(), "sample files without a verdict"
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n" + _print(bad)
    # A divergence that no longer diverges, or one missing from the committed table, is an error.
    documented = _documented()
    for r in rows:
        if r.divergence is not None:
            assert r.expected != r.actual, f"{r.file} [{r.case}] no longer diverges: drop it from the table"
            assert r.file in documented, f"{r.file} diverges but is not in {DIVERGENCES.name}"


@pytest.mark.samples
def test_attacks_are_rejected_without_crash_or_network(no_network: list[str]) -> None:
    samples = samples_dir()
    attacks = [c for c in response_cases(samples) if "attack" in c.file or "xxe" in c.file]
    assert len(attacks) >= 20
    for c in attacks:
        raw = load_raw(samples / "saml-responses" / c.file)
        if c.mutate:
            raw = c.mutate(raw)
        result = validate_saml_response(settings=make_settings(c.settings),
                                        saml_response=base64.b64encode(raw).decode(),
                                        request_data=c.request, request_id=c.request_id, now=c.now)
        if c.expect_ok:  # the comment-injection sample: valid, but the NameID is read whole
            assert result.ok and (result.name_id or "").strip() == c.expect_name_id, c.file
        else:
            assert not result.ok and result.error, c.file
    for name in ("broken-xxe-billion-laughs-generic.xml", "broken-xxe-remote-dtd-entity-sp-metadata.xml"):
        report = lint_metadata((samples / "idp-metadata" / name).read_bytes())
        assert [f.code for f in report.findings] == ["dtd_forbidden"]
    assert no_network == []


@pytest.mark.samples
def test_metadata_facts_from_the_manifest() -> None:
    md = samples_dir("idp-metadata")
    okta = lint_metadata((md / "okta-oktapreview-metadata.xml").read_bytes(), now=REAL_NOW)
    okta_fp = "9F:74:13:3B:BC:5A:7B:8B:2D:4F:8B:EF:1E:88:EB:D1:AE:BC:19:BF:CA:19:C6:2F:0F:4B:31:1D:68:98:B0:1B"
    assert okta.certs[0].sha256 == okta_fp.replace(":", "").lower()
    assert {e.binding.rsplit(":", 1)[-1] for e in okta.sso} == {"HTTP-POST", "HTTP-Redirect"}
    entra = lint_metadata((md / "entra-id-federationmetadata-common-signed-4-signing-certs.xml").read_bytes(),
                          now=REAL_NOW)
    assert len(entra.signing_certs) == 4 and entra.signature == {"present": True, "valid": True, "trusted": None}
    early = lint_metadata((md / "entra-id-federationmetadata-common-signed-4-signing-certs.xml").read_bytes(),
                          now=REAL_NOW.replace(year=2025))
    assert "certificate_not_yet_valid" in early.codes() and early.usable  # dates never decide usability
    umu = lint_metadata((md / "swamid-federation-signed-entitiesdescriptor-aggregate.xml").read_bytes(),
                        entity_id=UMU, now=REAL_NOW)
    assert [e.url for e in umu.sso] == ["https://idp.umu.se/saml2/idp/SSOService.php"]
    assert len(umu.signing_certs) == 1 and umu.signature["valid"] is True and len(umu.entities) == 36
    for name in ("adfs-2012-federationmetadata-signed.xml", "adfs-federationmetadata-signed-with-logout.xml"):
        r = lint_metadata((md / name).read_bytes(), now=REAL_NOW)
        assert r.signature == {"present": True, "valid": False, "trusted": None} and "signature_invalid" in r.codes()
    for name in ("google-workspace-metadata-C02dfl1r1.xml", "secureworks-idp-metadata.xml",
                 "onelogin-metadata-503983-post-and-soap.xml"):
        assert "post_only" in lint_metadata((md / name).read_bytes(), now=REAL_NOW).codes()
    p1dt = lint_metadata((md / "generic-cacheduration-only-P1DT.xml").read_bytes(), now=REAL_NOW)
    assert "malformed_cache_duration" in p1dt.codes() and p1dt.valid_until is None
    pem = lint_metadata((md / "generic-entitiesdescriptor-two-idps-expired-validuntil-pem-in-x509.xml").read_bytes(),
                        entity_id="https://foo.example.com/access/saml/idp.xml", now=REAL_NOW)
    assert {"pem_in_x509certificate", "metadata_expired"} <= pem.codes()
    sp = lint_metadata((md / "broken-microsoftonline-sp-metadata-signed-two-signing-certs.xml").read_bytes())
    assert "sp_metadata" in sp.codes() and "sha1_signature" in sp.codes()
    three = lint_metadata((md / "onelogin-certs-three-signing-certs-rollover.xml").read_bytes(), now=REAL_NOW)
    assert len(three.signing_certs) == 2 and "duplicate_certificate" in three.codes()


def test_divergence_table_names_real_files() -> None:
    samples = samples_dir()
    for name in _documented():
        assert (samples / name).is_file(), f"{name} in {DIVERGENCES.name} is not a sample file"
