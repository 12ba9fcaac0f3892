"""Issue 16 in Chromium: a posture finding's action link opens the control that carries it out (same
tab, the tenant in focus), and the leadership view's charts and rows click through to a tenant."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import Shooter
from tests.e2e.test_journey import main_text, open_page, rerun, settled
from tests.e2e.test_roles import sign_in

pytestmark = pytest.mark.e2e


def test_a_findings_action_link_opens_a_working_control(page, console):
    shot = Shooter(page, console.shots, "issue16-action")
    sign_in(page, console, "admin@bigcorp.example")
    from tests.e2e.test_journey import RUNS_JS

    page.add_init_script(RUNS_JS)
    open_page(page, f"{console.url}/posture")
    shot("posture")
    link = page.get_by_role("link", name=re.compile(r"^Set the attribution field")).first
    link.scroll_into_view_if_needed()
    href = link.get_attribute("href") or ""
    assert "tenant=bigcorp" in href and "account=" in href, href
    rerun(page, link.click)
    page.wait_for_url(re.compile(r"/tenant\?.*tenant=bigcorp.*account=\d+"))
    settled(page)
    shot("tenant-control")
    field = page.get_by_role("textbox", name=re.compile(r"^Attribution field on Opportunity"))
    field.wait_for(state="visible")
    assert field.is_enabled()
    field.fill("CrmBridge_Actor__c")
    button = page.get_by_role("button", name="Save settings").first
    button.focus()
    rerun(page, button.click)
    page.get_by_text(re.compile(r"^Saved the settings of")).wait_for(timeout=30_000)
    shot("saved")


def test_the_leadership_views_charts_and_rows_click_through_to_a_tenant(page, console):
    from tests.e2e.test_journey import RUNS_JS

    shot = Shooter(page, console.shots, "issue16-leadership")
    sign_in(page, console, "vp.sales@crmbridge.example")
    page.add_init_script(RUNS_JS)
    open_page(page, f"{console.url}/adoption")
    shot("adoption")
    assert "Tenant in focus" not in main_text(page)
    assert "@" not in main_text(page)

    # a chart: click a bar of "Maturity today" -> the tenant list narrows to that level
    bars = page.locator(".st-key-levels_now .bars .point path")
    bars.first.wait_for()
    n = bars.count()
    clicked = None
    for i in range(n):
        box = bars.nth(i).bounding_box()
        if box and box["height"] > 2:
            clicked = bars.nth(i)
            break
    assert clicked is not None, "no bar drawn in Maturity today"
    rerun(page, lambda: clicked.click(force=True))
    page.get_by_role("heading", name=re.compile(r"^Tenants at \d ")).wait_for(timeout=30_000)
    shot("chart-selected")
    if "Tenant in focus" not in main_text(page):
        # a row: select the first tenant of the narrowed list (the row marker column of the grid)
        grid = page.locator(".st-key-tenant_table").first
        grid.scroll_into_view_if_needed()
        box = grid.bounding_box()
        assert box is not None
        rerun(page, lambda: page.mouse.click(box["x"] + 14, box["y"] + 35 + 17))
    page.get_by_role("heading", name=re.compile(r"^Tenant in focus: ")).wait_for(timeout=30_000)
    assert re.search(r"[?&]tenant=[a-z0-9-]+", page.url), page.url
    shot("tenant-in-focus")
    text = main_text(page)
    assert "Maturity level" in text and "@" not in text
    # the tenant in focus is in the URL: a reload keeps it
    page.reload()
    settled(page)
    page.get_by_role("heading", name=re.compile(r"^Tenant in focus: ")).wait_for(timeout=30_000)
