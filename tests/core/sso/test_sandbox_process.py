"""Against the sandbox's own process over real HTTPS on 127.0.0.1 (CA made at test start): metadata by
URL in demo mode, refused outside it, and a sign-in through the running IdP into the console's ACS."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from core.errors import MetadataInvalid
from core.settings import get_settings
from core.sso.keys import ensure_sp_keys
from core.sso.lint import lint_metadata
from core.sso.metadata import apply_import, fetch_document
from tests.core.sso.conftest import CONSOLE, SsoWorld, form_fields, staff_principal
from tests.fixtures.sandbox import SandboxHandle


@pytest.fixture
def demo_mode(monkeypatch: pytest.MonkeyPatch, sandbox: SandboxHandle) -> Iterator[None]:
    monkeypatch.setenv("CRMBRIDGE_DEMO", "1")
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_CA_FILE", str(sandbox.ca_file))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_metadata_url_is_fetched_from_the_sandbox_only_in_demo_mode(sandbox: SandboxHandle, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url = sandbox.url("/idp/bigcorp/metadata")
    monkeypatch.delenv("CRMBRIDGE_DEMO", raising=False)
    get_settings.cache_clear()
    with pytest.raises(MetadataInvalid) as exc:
        fetch_document(url)
    assert exc.value.code == "url_address"  # loopback is private outside demo mode
    monkeypatch.setenv("CRMBRIDGE_DEMO", "1")
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_CA_FILE", str(sandbox.ca_file))
    get_settings.cache_clear()
    try:
        res = fetch_document(url)
    finally:
        get_settings.cache_clear()
    report = lint_metadata(res.body)
    assert report.usable and report.entity_id == "urn:crmbridge:sandbox:idp:bigcorp"
    assert report.signature == {"present": True, "valid": True, "trusted": None}
    assert {e.url for e in report.sso} == {sandbox.url("/idp/bigcorp/sso")}


def test_sign_in_through_the_running_sandbox_idp(sso_world: SsoWorld, sandbox: SandboxHandle, demo_mode: None) -> None:
    w = sso_world
    metadata = fetch_document(sandbox.url("/idp/bigcorp/metadata")).body
    from core.db import session_scope

    with session_scope(w.engine) as s:
        apply_import(session=s, principal=staff_principal(), tenant_id=w.bigcorp.id, data=metadata,  # type: ignore[arg-type]
                     source="url", source_url=sandbox.url("/idp/bigcorp/metadata"))
        ensure_sp_keys(session=s, principal=staff_principal(), tenant_id=w.bigcorp.id)  # type: ignore[arg-type]
    # The IdP registers our SP from our metadata, as a real IdP's admin would.
    sp_md = w.console.get("/sso/bigcorp/metadata").content
    assert sandbox.http.put("/idp/bigcorp/sp-metadata", content=sp_md).status_code == 200
    start = w.console.get("/sso/bigcorp/login", params={"next": "/sso"}, follow_redirects=False)
    location = urlsplit(start.headers["location"])
    page = sandbox.http.get(location.path + "?" + location.query)
    assert page.status_code == 200 and "admin@bigcorp.example" in page.text
    _, fields = form_fields(page.text)
    posted = sandbox.http.post("/idp/bigcorp/login",
                               data={"pending": fields["pending"], "email": "admin@bigcorp.example"})
    action, acs_fields = form_fields(posted.text)
    assert action == f"{CONSOLE}/sso/bigcorp/acs"
    done = w.post_acs(action, acs_fields)
    assert done.status_code == 303 and done.headers["location"] == f"{CONSOLE}/sso"
    assert done.cookies.get("crmbridge_session")
