"""Issue 16 in Chromium: one tenant in focus, carried in the address (?tenant=slug) across reloads, page
switches and every hand-off route; screens rerun what an action changed; sign-in and sign-out stay in
the tab, and a signed-out tab shows only the sign-in page on its next rerun."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import create_engine, text

from tests.e2e.conftest import Shooter
from tests.e2e.test_journey import RUNS_JS, choose, expand, main_text, open_page, press, settled, textbox
from tests.e2e.test_roles import sign_in

pytestmark = pytest.mark.e2e

PAGES_WITH_TENANT = ("Tenant", "SSO", "Users & sync", "Posture", "Alerts", "Audit log", "Onboarding", "Overview")


@pytest.fixture
def staff(browser, console):  # type: ignore[no-untyped-def]
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, ignore_https_errors=True)
    ctx.set_default_timeout(30_000)
    ctx.add_init_script(RUNS_JS)
    pg = ctx.new_page()
    sign_in(pg, console, "cs@crmbridge.example")
    settled(pg)
    yield pg
    ctx.close()


def _focus(page) -> str:  # type: ignore[no-untyped-def]
    m = re.search(r"Tenant in focus: (.+?) · (\S+)", main_text(page))
    return m.group(2) if m else ""


def _query_tenant(page) -> str | None:  # type: ignore[no-untyped-def]
    m = re.search(r"[?&]tenant=([\w-]+)", page.url)
    return m.group(1) if m else None


def _account_id(console, slug: str) -> int:  # type: ignore[no-untyped-def]
    engine = create_engine(console.env["CRMBRIDGE_DATABASE_URL"])
    with engine.connect() as c:
        return int(c.execute(text("SELECT a.id FROM crm_account a JOIN tenant t ON t.id = a.tenant_id "
                                  "WHERE t.slug = :s ORDER BY a.id LIMIT 1"), {"s": slug}).scalar_one())


def test_tenant_in_focus_survives_reload_page_switches_and_hand_offs(staff, console):
    from playwright.sync_api import expect

    page, shot = staff, Shooter(staff, console.shots, "focus-1")
    open_page(page, f"{console.url}/tenant?tenant=tinyco")
    expect(page.get_by_role("heading", name="Tiny Co", exact=True)).to_be_visible()
    assert _focus(page) == "tinyco"
    shot("tenant-in-focus")

    page.reload()
    settled(page)
    assert _focus(page) == "tinyco" and _query_tenant(page) == "tinyco"
    shot("after-reload")

    for title in PAGES_WITH_TENANT:  # the sidebar's links: a page switch keeps the tenant
        link = page.locator("[data-testid=stSidebarNav] a").filter(has_text=title).first
        mark_url = page.url
        link.click()
        page.wait_for_url(lambda u, m=mark_url: u != m)  # noqa: B023
        settled(page)
        page.wait_for_function("() => /[?&]tenant=tinyco/.test(location.search)")
        assert _focus(page) == "tinyco", (title, main_text(page)[:300])
        shot(f"page-{title.lower().replace(' ', '-').replace('&', 'and')}")

    # the credentials form's "Back to the console" comes back to this tenant
    page.goto(f"{console.url}/crm-accounts/{_account_id(console, 'tinyco')}/credentials")
    back = page.get_by_role("link", name="Back to the console")
    assert back.get_attribute("href", timeout=30_000).endswith("/tenant?tenant=tinyco")
    shot("credentials-form")
    back.click()
    settled(page)
    assert _focus(page) == "tinyco"
    expect(page.get_by_role("heading", name="Tiny Co", exact=True)).to_be_visible()
    shot("back-from-credentials-form")

    # the wizard hands off to the SSO page on the same tenant, and a reload keeps the wizard's step
    open_page(page, f"{console.url}/onboarding?tenant=hubco&step=sso")
    assert _focus(page) == "hubco"
    assert page.get_by_role("radio", name="Single sign-on", exact=True).is_checked()
    page.reload()
    settled(page)
    assert page.get_by_role("radio", name="Single sign-on", exact=True).is_checked() and _focus(page) == "hubco"
    shot("wizard-step-after-reload")
    page.get_by_role("link", name="Open the SSO page for this tenant").first.click()
    page.wait_for_url(re.compile(r"/sso\?.*tenant=hubco"))
    settled(page)
    assert _focus(page) == "hubco" and "Single sign-on —" in main_text(page)
    shot("wizard-to-sso")

    # a test login's return names its tenant, whatever was in focus before
    open_page(page, f"{console.url}/sso?trace=0&tenant=bigcorp")
    assert _focus(page) == "bigcorp"

    # the user changes it, with the sidebar's picker: the address follows
    choose(page, "Tenant", "Prof Services Ltd (profco)")
    page.wait_for_function("() => /[?&]tenant=profco/.test(location.search)")
    assert _focus(page) == "profco"
    shot("picked-another-tenant")


def test_out_of_scope_tenant_is_refused_not_swapped(page, console):
    shot = Shooter(page, console.shots, "focus-2")
    page.add_init_script(RUNS_JS)
    sign_in(page, console, "admin@bigcorp.example")
    open_page(page, f"{console.url}/tenant?tenant=tinyco")
    body = main_text(page)
    assert "not yours" in body and "BigCorp" in body
    assert "tom@tinyco.example" not in body and "anna@bigcorp.example" not in body
    shot("refused")


def test_created_tenant_added_user_and_account_appear_without_reload(staff, console):
    from playwright.sync_api import expect

    page, shot = staff, Shooter(staff, console.shots, "focus-3")
    open_page(page, f"{console.url}/tenants")
    expand(page, "Create a tenant")
    textbox(page, "Company name").fill("Focus Labs")
    textbox(page, "Short name (slug)").fill("focuslabs")
    press(page, "Create tenant")
    expect(page.get_by_text("Created Focus Labs.")).to_be_visible()
    grid = page.locator("[data-testid=stDataFrame]").first
    expect(grid).to_contain_text("focuslabs", timeout=30_000)  # listed at once, no reload
    shot("tenant-created-and-listed")

    page.get_by_role("link", name="Onboard Focus Labs").click()
    page.wait_for_url(re.compile(r"/onboarding\?.*tenant=focuslabs"))
    settled(page)
    assert _focus(page) == "focuslabs"

    open_page(page, f"{console.url}/tenant?tenant=focuslabs")
    expect(page.get_by_text("No user yet: add the first one below.")).to_be_visible()
    expect(page.get_by_text("No CRM account yet: add the first one below.")).to_be_visible()
    shot("empty-tenant")
    expand(page, "Add a user")
    form = page.locator("[data-testid=stForm]").filter(has=page.get_by_role("button", name="Add user"))
    form.get_by_role("textbox", name="Email", exact=True).fill("nia@focuslabs.example")
    form.get_by_role("textbox", name="Name", exact=True).fill("Nia Focus")
    press(page, "Add user")
    expect(page.get_by_text("Added nia@focuslabs.example.")).to_be_visible()
    expect(page.get_by_text("No user yet: add the first one below.")).to_have_count(0)
    expect(page.get_by_role("heading", name="Users (1)")).to_be_visible()
    shot("user-added")

    choose(page, "CRM", "HubSpot")
    textbox(page, "Label").fill("Focus HubSpot")
    textbox(page, "App client ID").fill("focus-labs-app")
    press(page, "Add CRM account")
    expect(page.get_by_text("Added Focus HubSpot.")).to_be_visible()
    expect(page.get_by_text("No CRM account yet: add the first one below.")).to_have_count(0)
    expect(page.locator("[data-testid=stExpander] summary").filter(has_text="Focus HubSpot").first).to_be_visible()
    assert _focus(page) == "focuslabs"
    shot("account-added")


def test_sign_out_stays_in_the_tab_and_an_old_tab_shows_nothing(browser, console):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, ignore_https_errors=True)
    ctx.set_default_timeout(30_000)
    ctx.add_init_script(RUNS_JS)
    try:
        old, page = ctx.new_page(), ctx.new_page()
        shot = Shooter(page, console.shots, "focus-4")
        sign_in(page, console, "admin@tinyco.example")
        open_page(old, f"{console.url}/audit")
        assert "tenant:tinyco" in main_text(old) or "Tiny Co" in main_text(old)
        out = page.locator("[data-testid=stSidebar] a").filter(has_text="Sign out").first
        assert out.get_attribute("target") in (None, "_self")
        shot("before-sign-out")
        out.click()
        page.wait_for_url(f"{console.url}/auth/logout")
        assert len(ctx.pages) == 2  # no new tab
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(f"{console.url}/auth/login")
        shot("signed-out")
        # the old tab's next rerun (any widget) finds no session: only the sign-in page remains
        old.bring_to_front()
        box = old.get_by_role("textbox", name="Actor contains", exact=True)
        box.fill("admin")
        box.press("Enter")
        old.get_by_role("link", name="Sign in").wait_for(timeout=30_000)
        assert "Tiny Co" not in old.locator("[data-testid=stApp]").inner_text()
        assert old.locator("[data-testid=stSidebarNav]").count() == 0
        Shooter(old, console.shots, "focus-4-old-tab")("shows-only-sign-in")
        sign_in_link = old.get_by_role("link", name="Sign in")
        assert sign_in_link.get_attribute("target") in (None, "_self")
        assert "next=" in (sign_in_link.get_attribute("href") or "")
    finally:
        ctx.close()
