"""The onboarding wizard's "Create a sandbox org" (demo mode), against the real sandbox process."""

from __future__ import annotations

import pytest
from sqlmodel import Session

from core.settings import get_settings
from core.tenants.access import Principal
from core.tenants.models import Tenant
from tests.conftest import page_text, run_page

STAFF = Principal(role="staff", email="cs@crmbridge.example", account_id=1)


@pytest.fixture
def demo_console(app_db, sandbox, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CRMBRIDGE_DEMO", "1")
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_URL", sandbox.base_url)
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_CA_FILE", str(sandbox.ca_file))
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_BROWSER_URL", "http://127.0.0.1:18503")
    get_settings.cache_clear()
    with Session(app_db) as s:
        t = Tenant(name="Soylent", slug="soylent", status="onboarding", onboarding_step="crm_accounts")
        s.add(t)
        s.commit()
    yield sandbox
    get_settings.cache_clear()


def test_the_wizard_makes_a_sandbox_org_and_shows_what_to_type(demo_console):
    at = run_page("onboarding.py", STAFF)
    assert not at.exception
    assert "Sandbox Salesforce" not in page_text(at)
    assert "http://127.0.0.1:18503" in page_text(at)  # where the sign-in pages open, said up front
    at.selectbox(key=next(k for k in (w.key for w in at.selectbox) if k and k.startswith("sandbox_crm_"))) \
        .set_value("salesforce").run()
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("sandbox_create_"))).click().run()
    assert not at.exception, at.exception
    text = page_text(at)
    assert "Sandbox Salesforce org soylent is ready." in text
    assert f"Instance URL: `{demo_console.base_url}/salesforce/soylent`" in text
    assert f"IdP metadata URL: `{demo_console.base_url}/idp/soylent/metadata`" in text
    assert "admin@soylent.example (admin): password `Demo-" in text
    # shown again on the next visit: read back from the sandbox
    assert f"Instance URL: `{demo_console.base_url}/salesforce/soylent`" in page_text(run_page("onboarding.py", STAFF))


def test_outside_demo_mode_the_wizard_offers_no_sandbox_org(app_db):
    with Session(app_db) as s:
        s.add(Tenant(name="Realco", slug="realco", status="onboarding", onboarding_step="crm_accounts"))
        s.commit()
    at = run_page("onboarding.py", STAFF)
    assert not at.exception
    assert "Create a sandbox org" not in [b.label for b in at.button]
