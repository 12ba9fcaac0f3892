"""Each demo role signs in through the real sign-in page and sees its pages and nothing else;
a refresh keeps the session; sign-out ends it."""

from __future__ import annotations

import pytest

from core.accounts.routes import DEMO_PASSWORD
from tests.e2e.conftest import Shooter, wait_streamlit

pytestmark = pytest.mark.e2e

ROLE_PAGES = {
    "cs@crmbridge.example": ({"Overview", "Tenants", "Onboarding", "Audit log"}, set()),
    "admin@bigcorp.example": ({"Overview", "Tenant", "Audit log"}, {"Tenants", "Onboarding", "Vault"}),
    "vp.sales@crmbridge.example": ({"Overview"}, {"Tenants", "Tenant", "Audit log", "Onboarding", "Vault"}),
}


_last_totp_step: dict[str, int] = {}


def sign_in(page, console, email: str) -> None:  # type: ignore[no-untyped-def]
    """Sign in through the real sign-in page; staff answer the TOTP step with the demo secret (a code is
    accepted once per 30-second step, so a second staff sign-in waits for the next step)."""
    page.goto(f"{console.url}/auth/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(DEMO_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("input[name=code], [data-testid='stApp']", timeout=30_000)
    mfa = page.locator("input[name=code]")
    if mfa.count():
        import time

        import pyotp

        from core.accounts.demo import DEMO_TOTP_SECRET

        totp = pyotp.TOTP(DEMO_TOTP_SECRET)
        step = int(time.time()) // 30
        if _last_totp_step.get(email) == step:
            time.sleep(30 - time.time() % 30 + 0.5)
            step = int(time.time()) // 30
        _last_totp_step[email] = step
        mfa.fill(totp.at(step * 30))
        page.get_by_role("button").first.click()
    wait_streamlit(page)


def nav_labels(page) -> set[str]:  # type: ignore[no-untyped-def]
    links = page.locator("[data-testid='stSidebarNav'] a")
    return {links.nth(i).inner_text().strip().splitlines()[-1].strip() for i in range(links.count())}


@pytest.mark.parametrize("email", list(ROLE_PAGES))
def test_each_role_sees_its_pages_and_refresh_keeps_session(page, console, email):
    shot = Shooter(page, console.shots, "roles-" + email.split("@")[0])
    page.goto(f"{console.url}/auth/login")
    shot("sign-in")
    sign_in(page, console, email)
    shot("landing")
    must, must_not = ROLE_PAGES[email]
    labels = nav_labels(page)
    assert must <= labels, labels
    assert not (must_not & labels), labels
    page.reload()
    wait_streamlit(page)
    assert email in page.locator("[data-testid='stSidebar']").inner_text()
    shot("after-refresh")


def test_sign_out_ends_the_session(page, console):
    sign_in(page, console, "admin@bigcorp.example")
    page.goto(f"{console.url}/auth/logout")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{console.url}/auth/login")  # the sign-out finished (a goto now would cancel it)
    page.goto(console.url)
    wait_streamlit(page)
    # the gate's one page (st.navigation) renders just after the script-run status clears
    page.get_by_role("link", name="Sign in").wait_for(timeout=15_000)
    assert page.get_by_text("not signed in").count() or page.get_by_text("Sign in").count()
    assert "admin@bigcorp.example" not in page.locator("[data-testid='stApp']").inner_text()
