"""AppTests for the SSO page, per role: staff and tenant admins import, compare, test and check;
leadership is refused; a tenant admin never sees another tenant."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.db import session_scope
from core.sso.authn import _settings_cache
from core.sso.keys import _metadata_cache
from core.sso.metadata import apply_import
from core.sso.models import SsoConfig, SsoSpKey, SsoTrace
from core.sso.sp import sp_endpoints
from core.tenants.access import Principal
from core.tenants.models import Tenant
from sandbox.idp import SamlIdp
from tests.conftest import page_text, run_page, unescape_md

STAFF = Principal(role="staff", email="cs@crmbridge.example", account_id=1)
LEAD = Principal(role="leadership", email="vp@crmbridge.example", account_id=2)


@pytest.fixture(scope="module")
def page_idp() -> SamlIdp:
    return SamlIdp(base_url="https://sandbox.test", tenants=("bigcorp", "newco"))


@pytest.fixture
def tenants(app_db: Engine, vault_keys: Any) -> dict[str, int]:
    _settings_cache.clear()
    _metadata_cache.clear()
    with session_scope(app_db) as s:
        out = {}
        for slug, name in (("bigcorp", "BigCorp"), ("newco", "NewCo")):
            t = Tenant(name=name, slug=slug, status="live")
            s.add(t)
            s.flush()
            out[slug] = t.id
    return out  # type: ignore[return-value]


def _admin(tenants: dict[str, int], slug: str = "bigcorp") -> Principal:
    return Principal(role="tenant_admin", email=f"admin@{slug}.example", tenant_id=tenants[slug], account_id=9)


def _config(engine: Engine, tenant_id: int) -> SsoConfig | None:
    with Session(engine) as s:
        return s.exec(select(SsoConfig).where(SsoConfig.tenant_id == tenant_id)).first()


def _button(at: Any, label: str) -> Any:
    return next(b for b in at.button if b.label == label)


def test_leadership_is_refused(tenants: dict[str, int]) -> None:
    at = run_page("sso.py", LEAD)
    assert at.error and "staff and tenant admins" in unescape_md(at.error[0].value)


def test_staff_imports_metadata_and_sees_the_sp_details(app_db: Engine, tenants: dict[str, int],
                                                        page_idp: SamlIdp) -> None:
    data = page_idp.metadata_xml("bigcorp")
    at = run_page("sso.py", STAFF, tenant_id=tenants["bigcorp"],
                  sso_import={"data": data, "source": "upload", "url": None, "name": "idp.xml"})
    assert not at.exception
    text = page_text(at)
    assert "Usable: IdP **urn:crmbridge:sandbox:idp:bigcorp**" in text
    assert "http://127.0.0.1:8501/sso/bigcorp/acs" in text and "http://127.0.0.1:8501/sso/bigcorp/metadata" in text
    _button(at, "Import this configuration").click().run()
    assert not at.exception
    assert "IdP configuration saved" in page_text(at)
    cfg = _config(app_db, tenants["bigcorp"])
    assert cfg is not None and cfg.idp_entity_id == "urn:crmbridge:sandbox:idp:bigcorp"
    # a link that opens in this tab (st.html, no target=_blank), back to this tenant's SSO page
    links = [h.proto.body for h in at.get("html")]
    assert any(">Start a test login</a>" in b and "target" not in b for b in links), links
    # SP metadata to hand to the IdP.
    _button(at, "Prepare SP metadata").click().run()
    assert not at.exception and at.session_state["sso_sp_xml"].startswith("<?xml")


def test_unusable_upload_cannot_be_imported_and_shows_fixes(app_db: Engine, tenants: dict[str, int],
                                                            page_idp: SamlIdp) -> None:
    sp_md = page_idp.metadata_xml("bigcorp").replace(b"IDPSSODescriptor", b"SPSSODescriptor")
    at = run_page("sso.py", STAFF, tenant_id=tenants["bigcorp"],
                  sso_import={"data": sp_md, "source": "upload", "url": None, "name": "sp.xml"})
    text = page_text(at)
    assert "Not usable" in text and "service-provider (SP) metadata" in text and "IdP metadata" in text
    assert _button(at, "Import this configuration").disabled
    assert _config(app_db, tenants["bigcorp"]) is None


def test_reimport_shows_the_diff_before_replacing(app_db: Engine, tenants: dict[str, int], page_idp: SamlIdp) -> None:
    with session_scope(app_db) as s:
        apply_import(session=s, principal=STAFF, tenant_id=tenants["bigcorp"],
                     data=page_idp.metadata_xml("bigcorp"))
    other = page_idp.metadata_xml("newco").replace(b"idp:newco", b"idp:bigcorp")
    admin = _admin(tenants)
    at = run_page("sso.py", admin, sso_import={"data": other, "source": "upload", "url": None, "name": "new.xml"})
    assert not at.exception
    text = page_text(at)
    assert "What replacing the configuration changes" in text
    assert "➕ certificate" in text and "➖ certificate" in text and "/idp/newco/sso" in text
    assert _config(app_db, tenants["bigcorp"]).version == 1  # type: ignore[union-attr]
    _button(at, "Replace the configuration").click().run()
    assert _config(app_db, tenants["bigcorp"]).version == 2  # type: ignore[union-attr]


def test_url_import_refuses_private_addresses(tenants: dict[str, int]) -> None:
    at = run_page("sso.py", STAFF, tenant_id=tenants["bigcorp"])
    at.text_input(key="sso_url").input("https://169.254.169.254/latest/meta-data").run()
    _button(at, "Fetch").click().run()
    assert at.error and "only fetches metadata from public addresses" in unescape_md(at.error[0].value)


def test_tenant_admin_sees_own_tenant_only_and_checks_a_pasted_response(
    app_db: Engine, tenants: dict[str, int], page_idp: SamlIdp
) -> None:
    with session_scope(app_db) as s:
        apply_import(session=s, principal=STAFF, tenant_id=tenants["newco"],
                     data=page_idp.metadata_xml("newco"))
        apply_import(session=s, principal=STAFF, tenant_id=tenants["bigcorp"],
                     data=page_idp.metadata_xml("bigcorp"))
    admin = _admin(tenants)
    at = run_page("sso.py", admin, tenant_id=tenants["newco"])  # a forged picker value is ignored
    text = page_text(at)
    assert "BigCorp" in text and "NewCo" not in text and "idp:newco" not in text
    ep = sp_endpoints("bigcorp")
    pasted = page_idp.issue_response("bigcorp", email="admin@bigcorp.example", acs_url=ep.acs_url,
                                     audience=ep.entity_id, in_response_to=None)
    at.text_area(key="sso_paste").input(pasted).run()
    _button(at, "Check against this tenant's configuration").click().run()
    assert not at.exception
    assert at.text_area(key="sso_paste").value == ""  # the captured response does not linger in the session
    assert any("valid for this configuration" in unescape_md(x.value) for x in at.success)
    text = page_text(at) + "\n".join(e.label for e in at.expander)
    assert "Pasted response" in text and "admin@bigcorp.example" in text and "python3-saml strict validation" in text
    with Session(app_db) as s:
        trace = s.exec(select(SsoTrace)).one()
    assert trace.tenant_id == tenants["bigcorp"] and trace.ok and trace.source == "paste"
    assert "Certificate timeline" in text and "IdP" in text


def test_only_staff_can_allow_idp_initiated(app_db: Engine, tenants: dict[str, int], page_idp: SamlIdp) -> None:
    with session_scope(app_db) as s:
        apply_import(session=s, principal=STAFF, tenant_id=tenants["bigcorp"],
                     data=page_idp.metadata_xml("bigcorp"))
    at = run_page("sso.py", _admin(tenants))
    assert not [t for t in at.toggle if t.key == "sso_idp_init"]
    at = run_page("sso.py", STAFF, tenant_id=tenants["bigcorp"])
    at.toggle(key="sso_idp_init").set_value(True).run()
    assert not at.exception and _config(app_db, tenants["bigcorp"]).allow_idp_initiated  # type: ignore[union-attr]


def test_an_admin_generates_sp_keys_as_an_explicit_step(app_db: Engine, tenants: dict[str, int],
                                                        page_idp: SamlIdp) -> None:
    """Metadata imported elsewhere (an API, a demo) leaves no SP key: the page says so and generates them on
    the admin's click, after which the SP metadata can be handed to the IdP."""
    with session_scope(app_db) as s:
        apply_import(session=s, principal=STAFF, tenant_id=tenants["bigcorp"], data=page_idp.metadata_xml("bigcorp"))
    at = run_page("sso.py", _admin(tenants))
    assert not at.exception and "no SP keys for this tenant yet" in page_text(at)
    assert "Prepare SP metadata" not in [b.label for b in at.button]
    _button(at, "Generate SP keys").click().run()
    assert not at.exception
    with Session(app_db) as s:
        assert [k.state for k in s.exec(select(SsoSpKey).where(SsoSpKey.tenant_id == tenants["bigcorp"]))] == ["active"]
    _button(at, "Prepare SP metadata").click().run()
    assert not at.exception and at.session_state["sso_sp_xml"].startswith("<?xml")
