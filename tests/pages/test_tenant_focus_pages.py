"""AppTests for issue 16: the tenant in focus comes from the address (?tenant=slug) and is never
swapped; actions rerun what they changed; labels, not raw values."""

from __future__ import annotations

from sqlmodel import Session

from core.demo import load_scenario, read_scenario
from core.tenants.access import Principal
from tests.conftest import ROOT, page_text, unescape_md

STAFF = Principal(role="staff", email="cs@crmbridge.example", account_id=1)


def _demo(engine) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        slugs = load_scenario(s, read_scenario())
        s.commit()
    return slugs


def _run(page: str, principal: Principal, *, query: dict[str, str] | None = None, **state: object):  # type: ignore[no-untyped-def]
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "pages" / page), default_timeout=30)
    at.session_state["principal"] = principal
    for k, v in state.items():
        at.session_state[k] = v
    for k, v in (query or {}).items():
        at.query_params[k] = v
    return at.run()


def test_the_address_puts_a_tenant_in_focus_and_keeps_it_there(app_db):
    _demo(app_db)
    at = _run("tenant.py", STAFF, query={"tenant": "tinyco"})
    assert not at.exception
    assert unescape_md(at.title[0].value) == "Tiny Co" and at.query_params["tenant"] == "tinyco"
    at.run()  # any rerun (a widget, a page switch in this session) keeps it
    assert unescape_md(at.title[0].value) == "Tiny Co"


def test_a_tenant_admin_asking_for_another_tenant_is_refused_not_swapped(app_db):
    slugs = _demo(app_db)
    admin = Principal(role="tenant_admin", email="admin@bigcorp.example", tenant_id=slugs["bigcorp"])
    at = _run("tenant.py", admin, query={"tenant": "tinyco"})
    text = unescape_md(page_text(at))
    assert at.error and "not yours" in at.error[0].value and "BigCorp" in at.error[0].value
    assert not at.title and "EMEA sales" not in text  # neither tenant shown
    assert "tom@tinyco.example" not in text and "anna@bigcorp.example" not in text


def test_an_unknown_tenant_in_the_address_is_named_not_replaced(app_db):
    _demo(app_db)
    at = _run("sso.py", STAFF, query={"tenant": "nosuch"})
    assert at.error and "No tenant 'nosuch'" in at.error[0].value
    assert not at.title


def test_wizard_step_comes_from_the_address_and_go_live_stays_on_the_tenant(app_db):
    from core import onboarding as ob

    slugs = _demo(app_db)
    with Session(app_db) as s:
        for step in ("crm_accounts", "credential_mode"):
            ob.complete_step(session=s, principal=STAFF, tenant_id=slugs["newco"], step=step)
        for step in ("connection_test", "sso", "users"):
            ob.defer_step(session=s, principal=STAFF, tenant_id=slugs["newco"], step=step, reason="later")
        s.commit()
    at = _run("onboarding.py", STAFF, query={"tenant": "newco", "step": "go_live"})
    assert at.radio[0].value == "go_live"  # a reload comes back to this step
    next(b for b in at.button if b.label == "Go live").click().run()
    assert not at.exception
    assert any("NewCo is live." in unescape_md(x.value) for x in at.success)  # the step, after the flash
    assert unescape_md(at.title[0].value) == "Onboarding — NewCo" and at.query_params["tenant"] == "newco"
    assert at.radio[0].value == "go_live"  # not "1 of 7 steps" of another tenant


def test_created_tenant_is_listed_at_once(app_db):
    _demo(app_db)
    at = _run("tenants.py", STAFF)
    at.text_input[1].input("Initech")
    at.text_input[2].input("initech")
    next(b for b in at.button if b.label == "Create tenant").click().run()
    assert not at.exception
    assert any("Created Initech" in unescape_md(s.value) for s in at.success)
    assert "initech" in at.dataframe[0].value["Slug"].tolist()
    assert "7 tenant(s)" in page_text(at)


def test_added_user_replaces_no_user_yet_at_once(app_db):
    from core.tenants.service import create_tenant

    _demo(app_db)
    with Session(app_db) as s:
        t = create_tenant(session=s, principal=STAFF, data={"name": "Empty Co", "slug": "emptyco"})
        s.commit()
        tid = t.id
    at = _run("tenant.py", STAFF, query={"tenant": "emptyco"})
    assert any("No user yet" in i.value for i in at.info)
    assert any("No CRM account yet" in i.value for i in at.info)
    form_box = next(t for t in at.text_input if t.label == "Email" and "add_user" in str(t.form_id))
    form_box.input("new@empty.example")
    next(t for t in at.text_input if t.label == "Name" and "add_user" in str(t.form_id)).input("Nia New")
    next(b for b in at.button if b.label == "Add user").click().run()
    assert not at.exception and tid
    assert not any("No user yet" in i.value for i in at.info)
    assert "new@empty.example" in unescape_md(page_text(at))
    assert any("Added new@empty.example" in unescape_md(x.value) for x in at.success)


def test_tenant_page_speaks_labels_not_raw_values(app_db):
    _demo(app_db)
    text = page_text(_run("tenant.py", STAFF, query={"tenant": "bigcorp"}))
    text = unescape_md(text)
    assert "API user" in text or "Each user's" in text
    for raw in ("api_user", "per_user_oauth", "per_user_password", "go_live"):
        assert raw not in text, raw


def test_audit_log_names_tenants(app_db):
    _demo(app_db)
    at = _run("audit.py", STAFF)
    tenants = set(at.dataframe[0].value["Tenant"].tolist())
    assert "BigCorp" in tenants and not any(str(x).isdigit() for x in tenants)


def _focus_header(principal):  # type: ignore[no-untyped-def]
    """What dashboard.py runs on every page before the page itself: the focus header."""
    import streamlit as st

    from pages._common import render_focus

    focus = render_focus(principal)
    st.write(f"focus={focus.slug if focus else None}")


def test_leadership_clicking_through_to_a_tenant_keeps_the_page_and_shows_no_tenant_data(app_db):
    """Leadership's Adoption view puts ?tenant=slug in the address to point at one tenant's aggregate row;
    the header every page runs must not turn that into a refusal (the page used to stop) nor into a tenant
    in focus (leadership never sees one tenant's data)."""
    from streamlit.testing.v1 import AppTest

    _demo(app_db)
    lead = Principal(role="leadership", email="vp@crmbridge.example")
    at = AppTest.from_function(_focus_header, args=(lead,), default_timeout=30)
    at.query_params["tenant"] = "tinyco"
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "focus=None" in page_text(at)
    at = _run("adoption.py", lead, query={"tenant": "tinyco"})
    assert not at.exception and not at.error
    assert "Tiny Co" in unescape_md(page_text(at))
