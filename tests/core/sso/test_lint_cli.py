"""The lint report's JSON shape, the pinned-certificate trust, safe parsing, and `crmbridge sso lint`."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from core.cli import main
from core.errors import InvalidInput
from core.sso.lint import lint_metadata
from core.sso.parse import parse_xml
from sandbox.idp import SamlIdp, make_key
from tests.conftest import samples_dir

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)


def test_json_has_exactly_the_documented_shape(idp: SamlIdp) -> None:
    out = lint_metadata(idp.metadata_xml("bigcorp"), now=NOW).to_json()
    assert list(out) == ["usable", "entity_id", "entities", "sso", "certs", "signature", "valid_until", "findings"]
    assert out["usable"] is True and out["entity_id"] == "urn:crmbridge:sandbox:idp:bigcorp"
    assert out["entities"] == ["urn:crmbridge:sandbox:idp:bigcorp"]
    assert all(set(e) == {"binding", "url"} for e in out["sso"]) and len(out["sso"]) == 2
    (cert,) = out["certs"]
    assert set(cert) == {"use", "subject", "not_before", "not_after", "days_left", "key_type", "key_bits", "sha256"}
    assert cert["use"] == "signing" and cert["key_type"] == "RSA" and cert["key_bits"] == 2048
    assert isinstance(cert["days_left"], int) and len(cert["sha256"]) == 64
    datetime.fromisoformat(cert["not_before"]), datetime.fromisoformat(cert["not_after"])
    assert out["signature"] == {"present": True, "valid": True, "trusted": None}
    assert out["valid_until"] is None
    assert all(set(f) == {"severity", "code", "message", "fix"} for f in out["findings"])
    json.dumps(out)  # serialisable as is


def test_pinned_certificate_decides_trust(idp: SamlIdp) -> None:
    md = idp.metadata_xml("bigcorp")
    own = idp.keys["bigcorp"].cert_pem.decode()
    stranger = make_key("someone-else").cert_pem.decode()
    assert lint_metadata(md, pinned_certs=[own], now=NOW).signature["trusted"] is True
    untrusted = lint_metadata(md, pinned_certs=[stranger], now=NOW)
    assert untrusted.signature == {"present": True, "valid": True, "trusted": False}
    assert not untrusted.usable and "signature_untrusted" in untrusted.codes()
    tampered = md.replace(b"/idp/bigcorp/sso", b"/idp/evil/sso")
    t = lint_metadata(tampered, pinned_certs=[own], now=NOW)
    assert t.signature == {"present": True, "valid": False, "trusted": False} and not t.usable


def test_certificate_dates_warn_but_never_decide(idp: SamlIdp) -> None:
    young = SamlIdp(base_url="https://sandbox.test", tenants=("x",), clock=lambda: NOW + timedelta(days=10))
    r = lint_metadata(young.metadata_xml("x"), now=NOW)
    assert r.usable and "certificate_not_yet_valid" in r.codes()
    soon = SamlIdp(base_url="https://sandbox.test", tenants=("x",), clock=lambda: NOW - timedelta(days=350))
    r = lint_metadata(soon.metadata_xml("x"), now=NOW)
    assert r.usable and "certificate_expiring" in r.codes() and r.certs[0].days_left == 15


def test_dtd_is_refused_before_expansion() -> None:
    lol = b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">' + b"".join(
        f'<!ENTITY lol{i} "{"&lol{};".format(i - 1 if i > 1 else "") * 10}">'.encode() for i in range(1, 10)
    ) + b"]><lolz>&lol9;</lolz>"
    started = time.perf_counter()
    with pytest.raises(InvalidInput) as exc:
        parse_xml(lol)
    assert exc.value.code == "dtd_forbidden" and time.perf_counter() - started < 1
    utf16 = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a SYSTEM "http://evil.example/x.dtd"><a/>'
    with pytest.raises(InvalidInput):
        parse_xml(utf16.encode("utf-16"))
    with pytest.raises(InvalidInput) as exc:
        parse_xml(b"<a>" * 10 + b"unclosed")
    assert exc.value.code == "not_well_formed"


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["sso", "lint", *args])
    return code, capsys.readouterr().out


def test_cli_exit_codes_and_json(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    md = samples_dir("idp-metadata")
    code, out = _cli(capsys, str(md / "okta-oktapreview-metadata.xml"), "--json")
    assert code == 0 and json.loads(out)["entity_id"] == "http://www.okta.com/1"
    code, out = _cli(capsys, str(md / "broken-sp-only-metadata-no-idpssodescriptor.xml"))
    assert code == 1 and out.startswith("NOT USABLE") and "sp_metadata" in out
    agg = str(md / "swamid-federation-signed-entitiesdescriptor-aggregate.xml")
    code, out = _cli(capsys, agg, "--json")
    assert code == 1 and json.loads(out)["findings"][-1]["code"] == "ambiguous_entity"
    code, out = _cli(capsys, agg, "--entity-id", "https://idp.umu.se/saml2/idp/metadata.php", "--json")
    assert code == 0 and len(json.loads(out)["entities"]) == 36
    assert _cli(capsys, "/nonexistent/metadata.xml")[0] == 2
    with pytest.raises(SystemExit) as exc:
        main(["sso", "lint"])
    assert exc.value.code == 2
    # A URL to a loopback address is refused by the SSRF rules (outside demo mode): not usable.
    code, out = _cli(capsys, "https://127.0.0.1:9/metadata", "--json")
    assert code == 1 and json.loads(out)["findings"][0]["code"] == "url_address"
