"""The whole journey in a real browser (issue 9), against the servers `make run` starts:

0. sales leadership notes today's adoption figures;
1. customer success (staff) onboards a new Salesforce tenant, Initrode, end to end using only what the
   console shows: the tenant, a new Salesforce org and IdP made in the sandbox from the wizard ("Create a
   sandbox org", whose instance URL, keys, secrets and IdP metadata URL are read off the wizard page), a
   CRM account from the catalog form (an API user by OAuth client credentials, whose secret goes in the
   secure HTML form that runs the connection test against that org), the credential mode, the SSO
   metadata imported by URL from the new IdP and a test login through it, a user, an invitation for the
   tenant's admin, and go-live;
2. the invited admin sets a password, later signs in through Initrode's SSO, and sees posture and sync
   health (after the scheduler's sync pass, as a deployment's cron runs it);
3. the admin adds Initrode's field-sales Salesforce account, where each user connects their own login
   (per-user OAuth), and sends a connect link; the app user opens it in a fresh browser, signs in
   through Initrode's SSO first (the tenant has tested SSO), then with Salesforce on the sandbox's
   consent page, and the admin sees the stored credential;
4. after the nightly posture snapshot, leadership sees Initrode counted in adoption;
5. staff onboards a Dynamics 365 tenant, Dunder, the same way on a new sandbox environment and IdP.

The browser ignores no certificate error: the sandbox's IdP sign-in and OAuth consent pages open on its
plain-http loopback origin, and the console runs on a non-default port (every redirect follows it).

The tests run in order and share browser contexts (one per person). Every step is screenshotted into
the folder printed at the start of the run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.e2e.conftest import Console, Shooter
from tests.e2e.test_roles import sign_in

pytestmark = pytest.mark.e2e

TENANT, SLUG = "Initrode", "initrode"
ADMIN = "admin@initrode.example"  # the wizard lists it among the new IdP's users
ADMIN_PASSWORD = "Initrode-admin-2026!"
USER_EMAIL, USER_NAME = "sales@initrode.example", "Sam Seller"  # a user of the new org, per the wizard
API_USER_MODE = "API user — OAuth client credentials (Salesforce Integration user)"
PER_USER_OAUTH_MODE = "Each user — OAuth web-server flow with PKCE"

# Counts finished Streamlit script runs, so an action can wait for the rerun it caused.
RUNS_JS = """(() => { window.__stRuns = 0; window.__stLast = 0;
new MutationObserver(ms => { for (const m of ms) { window.__stLast = performance.now();
  if (m.target.getAttribute('data-test-script-state') === 'notRunning' && m.oldValue !== 'notRunning')
    window.__stRuns++; } })
.observe(document, {subtree: true, attributes: true, attributeFilter: ['data-test-script-state'],
                    attributeOldValue: true}); })();"""
VISUALS_JS = """() => [...document.querySelectorAll('[data-testid=stPlotlyChart], [data-testid=stDataFrame]')]
  .filter(e => e.checkVisibility()).every(e => e.querySelector('.main-svg, [role=gridcell], [role=columnheader]'))"""


# -- Streamlit helpers ------------------------------------------------------------------------------
def _runs(page) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    return tuple(page.evaluate("() => [window.__stRuns || 0, performance.now()]"))  # type: ignore[return-value]


def settled(page, mark: tuple[int, float] = (0, 0.0)) -> None:  # type: ignore[no-untyped-def]
    """Wait until the script run after ``mark`` has finished and the page has been quiet for 0.4 s (a
    run too short to be seen as "running" counts after 1.5 s), with charts and tables drawn."""
    n, t0 = mark
    page.wait_for_function(
        f"""() => ((window.__stRuns || 0) > {n} || performance.now() - {t0} > 1500)
        && performance.now() - window.__stLast > 400 && !document.querySelector('[data-stale=true]')
        && document.querySelector(
             "[data-testid=stApp][data-test-script-state=notRunning][data-test-connection-state=CONNECTED]")""")
    page.wait_for_function(VISUALS_JS)


def rerun(page, action: Callable[[], Any]) -> None:  # type: ignore[no-untyped-def]
    mark = _runs(page)
    action()
    settled(page, mark)


def open_page(page, url: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(url)
    settled(page)


def press(page, name: str) -> None:  # type: ignore[no-untyped-def]
    """Click a button and wait for the rerun. Focus first: a text box losing focus re-renders its form,
    which would swallow a click landing at the same moment."""
    button = page.get_by_role("button", name=name, exact=True)
    button.focus()
    rerun(page, button.click)


def choose(page, label: str, option: str, *, in_form: bool = False) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.get_by_role("combobox", name=label, exact=True)
    if box.input_value() == option:
        return
    item = page.get_by_role("option", name=option, exact=True)
    box.focus()
    for _ in range(3):  # the first click can land while a text box's blur re-renders the form
        if box.get_attribute("aria-expanded") != "true":
            box.click()
        try:
            item.wait_for(timeout=3_000)
            break
        except PlaywrightTimeout:
            continue
    for attempt in range(3):  # a late rerun can redraw the list under the click: open it again and retry
        try:
            if in_form:
                item.click(timeout=10_000)
            else:
                rerun(page, lambda: item.click(timeout=10_000))
            return
        except PlaywrightTimeout:
            if attempt == 2 or box.input_value() == option:
                if box.input_value() == option:
                    return
                raise
            settled(page)
            if box.get_attribute("aria-expanded") != "true":
                box.click()
            item.wait_for(timeout=5_000)


def textbox(page, label: str):  # type: ignore[no-untyped-def]
    return page.get_by_role("textbox", name=label, exact=True)


def expand(page, title: str):  # type: ignore[no-untyped-def]
    exp = page.locator("[data-testid=stExpander] details").filter(
        has=page.locator("summary").filter(has_text=title)).first
    if exp.get_attribute("open") is None:
        exp.locator("summary").first.click()
    return exp


def pick_step(page, title: str) -> None:  # type: ignore[no-untyped-def]
    radio = page.get_by_role("radio", name=title, exact=True)
    if not radio.is_checked():
        label = page.locator("label").filter(has=page.locator("input[type=radio]")).filter(has_text=title).first
        rerun(page, label.click)
    assert radio.is_checked()


def _read_grid(grid) -> tuple[list[str], list[str]]:  # type: ignore[no-untyped-def]
    return grid.locator("[role=columnheader]").all_inner_texts(), grid.locator("[role=gridcell]").all_inner_texts()


def _rows(heads: list[str], cells: list[str]) -> list[dict[str, str]]:
    return [dict(zip(heads, cells[i:i + len(heads)], strict=True)) for i in range(0, len(cells), len(heads))]


def _drawn(heads: list[str], cells: list[str], needs: tuple[str, ...]) -> bool:
    return bool(heads) and len(cells) % len(heads) == 0 and set(needs) <= set(heads)


def table(page, index: int, needs: tuple[str, ...] = ()) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    """The rows of the index-th visible st.dataframe, read from its accessible grid.

    The grid is in the DOM before its header and cells are: scroll it into view and wait (up to 30 s)
    until the header (with the ``needs`` columns) is drawn and the cells fill whole rows, so a
    half-drawn grid is never read."""
    grid = page.locator("[data-testid=stDataFrame]").nth(index)
    grid.scroll_into_view_if_needed()
    heads: list[str] = []
    cells: list[str] = []
    for _ in range(120):
        heads, cells = _read_grid(grid)
        if _drawn(heads, cells, needs):
            return _rows(heads, cells)
        page.wait_for_timeout(250)
    raise AssertionError(f"table {index} was never drawn whole: headers {heads}, {len(cells)} cells")


def table_after(page, heading: str, needs: tuple[str, ...] = ()) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    """The rows of the first st.dataframe below the heading ``heading`` that has the ``needs`` columns
    (a page still drawing can show a later table before this one: wait up to 30 s, then fail)."""
    grids = page.locator("[data-testid=stDataFrame]")
    seen: list[list[str]] = []
    for _ in range(120):
        seen = []
        for i in range(grids.count()):
            grid = grids.nth(i)
            if grid.evaluate(
                """(g, h) => [...document.querySelectorAll('h1,h2,h3')].filter(x => x.innerText.trim() === h)
                     .some(x => x.compareDocumentPosition(g) & Node.DOCUMENT_POSITION_FOLLOWING)""", heading):
                grid.scroll_into_view_if_needed()
                heads, cells = _read_grid(grid)
                if _drawn(heads, cells, needs):
                    return _rows(heads, cells)
                seen.append(heads)
                break
        page.wait_for_timeout(250)
    raise AssertionError(f"no table with columns {needs} after {heading!r}; the first one there had {seen}")


def main_text(page) -> str:  # type: ignore[no-untyped-def]
    return page.locator("[data-testid=stMain]").inner_text()


def sidebar_text(page) -> str:  # type: ignore[no-untyped-def]
    return page.locator("[data-testid=stSidebar]").inner_text()


def metric(page, label: str) -> str:  # type: ignore[no-untyped-def]
    m = page.locator("[data-testid=stMetric]").filter(has=page.get_by_text(label, exact=True)).first
    return m.locator("[data-testid=stMetricValue]").inner_text().strip()


# -- the shared state of the journey ----------------------------------------------------------------
@dataclass
class Journey:
    console: Console
    browser: Any
    pages: dict[str, Any] = field(default_factory=dict)
    shooters: dict[str, Shooter] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def person(self, who: str, prefix: str):  # type: ignore[no-untyped-def]
        """The browser of one person (a context of its own: its own cookies); created on first use."""
        if who not in self.pages:
            ctx = self.browser.new_context(viewport={"width": 1400, "height": 1000})  # no TLS errors ignored
            ctx.set_default_timeout(30_000)
            ctx.add_init_script(RUNS_JS)
            self.pages[who] = ctx.new_page()
        self.shooters[who] = Shooter(self.pages[who], self.console.shots, prefix)
        return self.pages[who], self.shooters[who]

    def cli(self, *args: str) -> str:
        r = self.console.crmbridge(*args)
        assert r.returncode == 0, f"crmbridge {' '.join(args)} failed:\n{r.stderr}{r.stdout}"
        return r.stdout


@pytest.fixture(scope="module")
def journey(browser, console) -> Iterator[Journey]:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    j = Journey(console=console, browser=browser)
    yield j
    for pg in j.pages.values():
        pg.context.close()


def create_sandbox_org(page, shot, crm: str, key: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Press "Create a sandbox org" in the wizard and read what it shows: {title: value} for every value
    to type, plus ``users`` ({email: (role, password, CRM user id)}) and ``idp_users``."""
    from playwright.sync_api import expect

    choose(page, "Sandbox CRM", crm)
    press(page, "Create a sandbox org")
    box = page.locator(f".st-key-sandbox_org_{key}")
    expect(box).to_be_visible()
    expect(box.get_by_text("IdP metadata URL:")).to_be_visible()
    box.scroll_into_view_if_needed()
    shot(f"sandbox-{key}-org")
    text = box.inner_text()
    values: dict[str, Any] = dict(re.findall(r"^(.+?): (\S+)$", text, re.M))
    values["users"] = {m[0]: (m[1], m[2], m[3]) for m in re.findall(
        r"^(\S+@\S+) \(([\w ]+)\)(?:: password (\S+))?, CRM user id (\S+)$", text, re.M)}
    values["idp_users"] = re.findall(r"(\S+@\S+\.example)", text.split("IdP users", 1)[1].split("\n", 1)[0])
    return values


def _percent(text: str) -> int:
    m = re.fullmatch(r"(\d+)%", text)
    assert m, text
    return int(m.group(1))


# -- 0. leadership, before ----------------------------------------------------------------------------
def test_0_leadership_notes_todays_adoption(journey):
    journey.cli("posture-snapshot")  # today's row, as the scheduler (cron) records it every day
    page, shot = journey.person("leadership", "journey-0-leadership-before")
    sign_in(page, journey.console, "vp.sales@crmbridge.example")
    open_page(page, f"{journey.console.url}/adoption")
    assert "SSO adoption and integration maturity" in main_text(page)
    tenants, tested = int(metric(page, "Tenants")), _percent(metric(page, "Tenants with tested SSO"))
    journey.notes.update(tenants_before=tenants, tested_before=round(tested * tenants / 100))
    shot("adoption-before")


# -- 1. staff onboards Initrode ------------------------------------------------------------------------
def test_1_staff_onboards_a_salesforce_tenant_end_to_end(journey):
    from playwright.sync_api import expect

    c = journey.console
    page, shot = journey.person("staff", "journey-1-staff")
    sign_in(page, c, "cs@crmbridge.example")
    settled(page)
    assert "Signed in as cs@crmbridge.example" in sidebar_text(page)
    shot("signed-in")

    # the tenant
    open_page(page, f"{c.url}/tenants")
    expand(page, "Create a tenant")
    textbox(page, "Company name").fill(TENANT)
    textbox(page, "Short name (slug)").fill(SLUG)
    shot("create-tenant")
    press(page, "Create tenant")
    expect(page.get_by_text(f"Created {TENANT}. Continue on the Onboarding page.")).to_be_visible()
    shot("tenant-created")

    # onboarding: a new Salesforce org and IdP in the sandbox, then an account from the catalog form
    open_page(page, f"{c.url}/onboarding")
    choose(page, "Tenant", f"{TENANT} ({SLUG})")
    expect(page.get_by_text("1 of 7 steps settled")).to_be_visible()
    expect(page.get_by_text("Check: no CRM account yet: add one")).to_be_visible()
    sf = create_sandbox_org(page, shot, "Salesforce", "salesforce")
    journey.notes["sf"] = sf
    assert sf["Callback URL registered on the connected app"] == f"{c.url}/oauth/salesforce/callback"
    assert ADMIN in sf["idp_users"] and USER_EMAIL in sf["users"], sf
    choose(page, "CRM", "Salesforce")
    choose(page, "Edition", "Enterprise")
    choose(page, "How CRM Bridge signs in", API_USER_MODE)
    textbox(page, "Label").fill("Salesforce")
    textbox(page, "My Domain URL").fill(sf["Instance URL"])
    textbox(page, "Consumer key").fill(sf["Consumer key (API user — client credentials)"])
    assert page.get_by_role("textbox", name="Consumer secret").count() == 0  # never a Streamlit widget
    shot("crm-account-form")
    press(page, "Add CRM account")
    expect(page.get_by_text("Added Salesforce. Next: enter its consumer secret in the secure form")).to_be_visible()
    shot("crm-account-added")

    # the secret goes in the secure HTML form, which runs the connection test against the sandbox org
    secure_form = page.get_by_role("link", name="Enter credentials (secure form)").first.get_attribute("href")
    assert secure_form and re.fullmatch(rf"{re.escape(c.url)}/crm-accounts/\d+/credentials", secure_form)
    page.goto(secure_form)
    expect(page.get_by_role("heading", name="Credentials for Salesforce")).to_be_visible()
    secret = sf["Consumer secret (API user — client credentials)"]
    page.get_by_label("Consumer secret").fill(secret)
    assert page.get_by_label("Test the connection right away").is_checked()
    shot("secure-form")
    page.get_by_role("button", name="Save credentials").click()
    expect(page.get_by_text(f"The connection test passed as integration@{SLUG}.example.")).to_be_visible()
    assert "Authenticated with OAuth client credentials" in page.locator("body").inner_text()
    assert secret not in page.content()
    shot("connection-test-passed")

    # CRM accounts, credential mode, connection test: done
    open_page(page, f"{c.url}/onboarding")
    choose(page, "Tenant", f"{TENANT} ({SLUG})")
    for settled_steps, title, check in ((2, "CRM accounts", "Check: 1 CRM account(s)"),
                                        (3, "Credential mode", "Check: Salesforce: API user"),
                                        (4, "Connection test", "Check: all 1 account(s) passed")):
        pick_step(page, title)
        expect(page.get_by_text(check)).to_be_visible()
        if title == "Connection test":
            expect(page.get_by_text("Salesforce — last test: passed")).to_be_visible()
        shot(f"step-{title.lower().replace(' ', '-')}")
        press(page, "Mark step done")
        expect(page.get_by_text(f"{settled_steps} of 7 steps settled")).to_be_visible()

    # SSO: import the IdP metadata by URL from the sandbox IdP, then a test login through it
    open_page(page, f"{c.url}/sso")
    choose(page, "Tenant", f"{TENANT} ({SLUG})")
    expect(page.get_by_role("heading", name=f"Single sign-on — {TENANT}")).to_be_visible()
    page.get_by_role("tab", name="From a URL").click()
    textbox(page, "Metadata URL (https)").fill(sf["IdP metadata URL"])
    rerun(page, lambda: page.keyboard.press("Enter"))
    press(page, "Fetch")
    expect(page.get_by_text(f"Usable: IdP urn:crmbridge:sandbox:idp:{SLUG}.")).to_be_visible()
    shot("sso-metadata-linted")
    press(page, "Import this configuration")
    # Importing, then the explicit SP key step the page takes next: the IdP needs our SP metadata.
    expect(page.get_by_text("IdP configuration saved; SP keys ready. Give the IdP our SP metadata, then run a "
                            "test login.")).to_be_visible()
    assert metric(page, "IdP configured") == "yes" and metric(page, "Tested") == "not yet"
    shot("sso-imported")
    test_login = page.get_by_role("link", name="Start a test login").get_attribute("href")
    assert test_login == f"{c.url}/sso/{SLUG}/test"
    page.goto(test_login)  # → the sandbox IdP's login page, on its loopback-http origin (no TLS warning)
    expect(page.get_by_role("heading", name=f"Sandbox IdP — {SLUG}")).to_be_visible()
    assert page.url.startswith(f"{c.sandbox_browser_url}/idp/{SLUG}/sso?")
    shot("idp-login-page")
    page.get_by_role("button", name=ADMIN, exact=True).click()  # → the ACS → back on the SSO page
    page.wait_for_url(re.compile(rf"/sso\?trace=\d+&tenant={SLUG}$"))
    settled(page)
    expect(page.get_by_role("heading", name=f"Single sign-on — {TENANT}")).to_be_visible()
    assert metric(page, "Tested") == "yes"
    expect(page.get_by_text(re.compile(rf"Test login #\d+ — ✅ passed — {re.escape(ADMIN)}"))).to_be_visible()
    shot("sso-test-login-passed")

    open_page(page, f"{c.url}/onboarding")
    choose(page, "Tenant", f"{TENANT} ({SLUG})")
    pick_step(page, "Single sign-on")
    expect(page.get_by_text("Check: SSO tested with a valid response")).to_be_visible()
    shot("step-sso")
    press(page, "Mark step done")
    expect(page.get_by_text("5 of 7 steps settled")).to_be_visible()

    # users: one app user
    pick_step(page, "Users")
    textbox(page, "Email").fill(USER_EMAIL)
    textbox(page, "Name").fill(USER_NAME)
    press(page, "Add user")
    expect(page.get_by_text(f"Added {USER_EMAIL}.")).to_be_visible()
    shot("user-added")
    press(page, "Mark step done")
    expect(page.get_by_text("6 of 7 steps settled")).to_be_visible()

    # invite the tenant's admin (no mail server in the test: the page shows the link to pass on)
    open_page(page, f"{c.url}/accounts")
    textbox(page, "Email").fill(ADMIN)
    textbox(page, "Name (optional)").fill("Ines Admin")
    choose(page, "Role", "Tenant admin", in_form=True)
    choose(page, "Tenant (tenant admins only)", TENANT, in_form=True)
    shot("invite-form")
    press(page, "Send invitation")
    expect(page.get_by_text(f"The invitation for {ADMIN} is valid")).to_be_visible()
    link = page.locator("[data-testid=stCode]").inner_text().strip()
    assert re.fullmatch(rf"{re.escape(c.url)}/auth/invite/[\w-]+", link), link
    journey.notes["invitation"] = link
    shot("admin-invited")

    # go live
    open_page(page, f"{c.url}/onboarding")
    choose(page, "Tenant", f"{TENANT} ({SLUG})")
    pick_step(page, "Go live")
    for title in ("CRM accounts", "Credential mode", "Connection test", "Single sign-on", "Users"):
        expect(page.get_by_text(f"{title}: done").first).to_be_visible()
    shot("go-live-checklist")
    press(page, "Go live")
    expect(page.get_by_text(f"{TENANT} is live.")).to_be_visible()
    # the wizard stays on the tenant that went live (issue 16): no other tenant's "1 of 7 steps"
    expect(page.get_by_role("heading", name=f"Onboarding — {TENANT}")).to_be_visible()
    assert re.search(rf"[?&]tenant={SLUG}\b", page.url), page.url
    shot("live")

    open_page(page, f"{c.url}/tenants")
    row = next(r for r in table(page, 0, needs=("Slug",)) if r["Slug"] == SLUG)
    assert (row["Name"], row["Status"], row["CRM accounts"], row["Users"]) == (TENANT, "Live", "1", "1"), row
    shot("tenants-list")


# -- 2. the invited admin ---------------------------------------------------------------------------------
def test_2_invited_admin_signs_in_through_sso_and_sees_posture_and_sync(journey):
    from playwright.sync_api import expect

    c = journey.console
    page, shot = journey.person("admin", "journey-2-admin")
    page.goto(journey.notes["invitation"])
    expect(page.get_by_text(f"You were invited as {ADMIN}.")).to_be_visible()
    page.get_by_label("New password (at least 12 characters)").fill(ADMIN_PASSWORD)
    page.get_by_label("Repeat the password").fill(ADMIN_PASSWORD)
    shot("invitation")
    page.get_by_role("button", name="Create my account").click()
    page.wait_for_url(f"{c.url}/")
    settled(page)
    assert f"Signed in as {ADMIN} · tenant admin" in sidebar_text(page)
    expect(page.get_by_role("heading", name=TENANT)).to_be_visible()
    shot("account-created")

    page.goto(f"{c.url}/auth/logout")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{c.url}/auth/login")

    # later: through Initrode's SSO (the sandbox IdP), no password
    page.goto(f"{c.url}/sso/{SLUG}/login")
    expect(page.get_by_role("heading", name=f"Sandbox IdP — {SLUG}")).to_be_visible()
    shot("sso-sign-in")
    page.get_by_role("button", name=ADMIN, exact=True).click()
    page.wait_for_url(f"{c.url}/")
    settled(page)
    assert f"Signed in as {ADMIN} · tenant admin" in sidebar_text(page)
    expect(page.get_by_role("heading", name=TENANT)).to_be_visible()
    shot("signed-in-by-sso")

    open_page(page, f"{c.url}/posture")
    expect(page.get_by_role("heading", name=f"Posture — {TENANT}")).to_be_visible()
    assert metric(page, "Level") == "SSO tested"
    expect(page.get_by_text("Salesforce: Salesforce Enterprise includes the API")).to_be_visible()
    shot("posture")

    # what a deployment's cron and workers do: schedule the new tenant's sync job and run it
    assert "jobs created" in journey.cli("sync", "schedule")
    journey.cli("sync", "worker", "--once")
    open_page(page, f"{c.url}/users_sync")
    expect(page.get_by_role("heading", name="Users & sync")).to_be_visible()
    expect(page.get_by_text("Salesforce · salesforce")).to_be_visible()
    expect(page.get_by_text("healthy", exact=True).first).to_be_visible()  # the account tile's sync badge
    expect(page.get_by_text(re.compile(r"24 h: \d+ in · 0 out · last success just now"))).to_be_visible()
    shot("users-and-sync")


# -- 3. a per-user OAuth account and a connect link -----------------------------------------------------
def test_3_app_user_connects_through_a_link_and_the_sandbox_oauth_consent(journey):
    from playwright.sync_api import expect

    c = journey.console
    page, shot = journey.person("admin", "journey-3-connect-admin")
    sf = journey.notes["sf"]  # read off the wizard in step 1 (the connected app lists our callback URL)
    _, sf_password, sf_user_id = sf["users"][USER_EMAIL]

    open_page(page, f"{c.url}/tenant")
    expand(page, "Add a CRM account")
    choose(page, "CRM", "Salesforce")
    choose(page, "Edition", "Enterprise")
    choose(page, "How CRM Bridge signs in", PER_USER_OAUTH_MODE)
    textbox(page, "Label").fill("Field sales")
    textbox(page, "My Domain URL").fill(sf["Instance URL"])
    textbox(page, "Consumer key").fill(sf["Consumer key (each user — OAuth)"])
    shot("per-user-account-form")
    press(page, "Add CRM account")
    expect(page.get_by_text("Added Field sales.")).to_be_visible()
    secure_form = page.get_by_role("link", name="Enter credentials (secure form)").first.get_attribute("href")
    page.goto(secure_form)
    expect(page.get_by_role("heading", name="Credentials for Field sales")).to_be_visible()
    page.get_by_label("Consumer secret (optional)").fill(sf["Consumer secret (each user — OAuth)"])
    page.get_by_label("Test the connection right away").uncheck()  # nobody has connected yet
    page.get_by_role("button", name="Save credentials").click()
    expect(page.get_by_role("heading", name="Credentials saved")).to_be_visible()

    open_page(page, f"{c.url}/tenant")
    expand(page, "Map a user to their CRM user id")
    choose(page, "User", f"{USER_EMAIL} ({USER_NAME})", in_form=True)
    choose(page, "CRM account", "Field sales", in_form=True)
    textbox(page, "CRM user id").fill(sf_user_id)
    press(page, "Save CRM user id")
    expect(page.get_by_text(f"{USER_EMAIL} is {sf_user_id} in Field sales")).to_be_visible()
    link_box = expand(page, "Create a connect link")
    assert link_box.get_by_role("combobox", name="User and CRM account").input_value() == \
        f"{USER_EMAIL} · Field sales"
    press(page, "Create connect link")
    expect(page.get_by_text(f"Send this link to {USER_EMAIL}.")).to_be_visible()
    link = page.locator("[data-testid=stCode]").inner_text().strip()
    assert re.fullmatch(rf"{re.escape(c.url)}/connect/[\w.-]+", link), link
    shot("connect-link-created")

    # the app user, in a browser of their own
    user, user_shot = journey.person("app-user", "journey-3-connect-user")
    user.goto(link)  # Initrode has tested SSO: the user signs in through it before the link says anything
    expect(user.get_by_role("heading", name=f"Sandbox IdP — {SLUG}")).to_be_visible()
    assert link.rsplit("/", 1)[1] not in user.url  # the link's token never goes to the IdP
    user_shot("connect-sso-first")
    user.get_by_role("textbox", name="Email").fill(USER_EMAIL)
    user.get_by_role("button", name="Sign in", exact=True).click()
    user.wait_for_url(link)
    expect(user.get_by_role("heading", name=f"Connect Salesforce for {USER_NAME}")).to_be_visible()
    user_shot("connect-link")
    user.get_by_role("button", name="Sign in with Salesforce").click()
    expect(user.get_by_role("heading", name="Allow access?")).to_be_visible()  # the sandbox's consent page
    assert user.url.startswith(f"{c.sandbox_browser_url}/salesforce/")  # loopback http: no TLS warning
    user.get_by_label("Username").fill(USER_EMAIL)
    user.get_by_label("Password").fill(sf_password)
    user_shot("consent")
    user.get_by_role("button", name="Allow").click()
    expect(user.get_by_role("heading", name="Connected")).to_be_visible()
    expect(user.get_by_text("Field sales is connected.")).to_be_visible()
    assert user.url.startswith(f"{c.url}/oauth/salesforce/callback?")
    user_shot("connected")

    open_page(page, f"{c.url}/tenant")
    creds = table_after(page, "Stored credentials", needs=("Owner", "State"))
    mine = [r for r in creds if r["Owner"] == USER_EMAIL]
    assert len(mine) == 1, creds
    assert (mine[0]["CRM account"], mine[0]["Purpose"], mine[0]["Kind"], mine[0]["State"]) == \
        ("Field sales", "crm-login", "oauth_refresh", "active"), mine
    page.get_by_role("heading", name="Stored credentials").scroll_into_view_if_needed()
    shot("credential-stored")


# -- 4. leadership, after ----------------------------------------------------------------------------------
def test_4_leadership_sees_the_new_tenant_counted_in_adoption(journey):
    from playwright.sync_api import expect

    c = journey.console
    before, tested_before = journey.notes["tenants_before"], journey.notes["tested_before"]
    tested_share = f"{(tested_before + 1) / (before + 1):.0%}"  # Initrode's SSO is tested
    # the nightly posture snapshot (cron), which the leadership overview aggregates
    assert f"snapshot for {before + 1} tenant(s)" in journey.cli("posture-snapshot")
    page, shot = journey.person("leadership", "journey-4-leadership-after")
    open_page(page, f"{c.url}/adoption")
    assert int(metric(page, "Tenants")) == before + 1
    assert metric(page, "Tenants with tested SSO") == tested_share
    expect(page.get_by_role("heading", name="Upgrade pipeline: next step and who acts")).to_be_visible()
    # the pipeline is a chart; the tenants with their level, next step and who acts are in the table below it
    listed = {r["Tenant"]: r for r in table_after(page, "All tenants", needs=("Tenant", "Next step", "Who acts"))}
    assert TENANT in listed, listed
    row = listed[TENANT]
    assert row["Level"] == "3 SSO tested", row
    assert "API-user writes not attributed" in row["Next step"] and row["Who acts"] == "Tenant admin", row
    shot("adoption-after")
    open_page(page, f"{c.url}/")
    assert int(metric(page, "Tenants")) == before + 1
    assert metric(page, "Tenants with tested SSO") == tested_share
    shot("overview-after")


# -- 5. a Dynamics 365 tenant on a new sandbox environment and IdP ---------------------------------------
DYN_TENANT, DYN_SLUG = "Dunder Paper", "dunder"
DYN_MODE = "Application user — Microsoft Entra ID client credentials"


def test_5_staff_onboards_a_dynamics_tenant_on_a_new_sandbox_environment(journey):
    from playwright.sync_api import expect

    c = journey.console
    page, shot = journey.person("staff", "journey-5-dynamics")
    open_page(page, f"{c.url}/tenants")
    expand(page, "Create a tenant")
    textbox(page, "Company name").fill(DYN_TENANT)
    textbox(page, "Short name (slug)").fill(DYN_SLUG)
    press(page, "Create tenant")
    expect(page.get_by_text(f"Created {DYN_TENANT}. Continue on the Onboarding page.")).to_be_visible()

    open_page(page, f"{c.url}/onboarding")
    choose(page, "Tenant", f"{DYN_TENANT} ({DYN_SLUG})")
    expect(page.get_by_text("1 of 7 steps settled")).to_be_visible()
    dyn = create_sandbox_org(page, shot, "Dynamics 365", "dynamics")
    admin = f"admin@{DYN_SLUG}.example"
    assert admin in dyn["idp_users"], dyn
    choose(page, "CRM", "Microsoft Dynamics 365 Sales")
    choose(page, "Edition", "Dynamics 365 Sales Enterprise")
    choose(page, "How CRM Bridge signs in", DYN_MODE)
    textbox(page, "Label").fill("Dynamics 365")
    textbox(page, "Environment URL").fill(dyn["Instance URL"])
    for title in ("Directory (tenant) ID", "Application (client) ID"):
        textbox(page, title).fill(dyn[title])
    for title in ("Microsoft Entra authority (advanced)", "Microsoft Graph endpoint (advanced)"):
        textbox(page, f"{title} (optional)").fill(dyn[title])
    shot("crm-account-form")
    press(page, "Add CRM account")
    expect(page.get_by_text("Added Dynamics 365. Next: enter its client secret value in the secure form")) \
        .to_be_visible()
    page.goto(page.get_by_role("link", name="Enter credentials (secure form)").first.get_attribute("href"))
    expect(page.get_by_role("heading", name="Credentials for Dynamics 365")).to_be_visible()
    page.get_by_label("Client secret value").fill(dyn["Client secret value"])
    page.get_by_role("button", name="Save credentials").click()
    expect(page.get_by_text(re.compile(r"The connection test passed"))).to_be_visible()
    assert dyn["Client secret value"] not in page.content()
    shot("connection-test-passed")

    open_page(page, f"{c.url}/onboarding")
    choose(page, "Tenant", f"{DYN_TENANT} ({DYN_SLUG})")
    for settled_steps, title in ((2, "CRM accounts"), (3, "Credential mode"), (4, "Connection test")):
        pick_step(page, title)
        press(page, "Mark step done")
        expect(page.get_by_text(f"{settled_steps} of 7 steps settled")).to_be_visible()

    # SSO from the IdP metadata URL the wizard showed; the test login opens the IdP over loopback http
    open_page(page, f"{c.url}/sso")
    choose(page, "Tenant", f"{DYN_TENANT} ({DYN_SLUG})")
    page.get_by_role("tab", name="From a URL").click()
    textbox(page, "Metadata URL (https)").fill(dyn["IdP metadata URL"])
    rerun(page, lambda: page.keyboard.press("Enter"))
    press(page, "Fetch")
    expect(page.get_by_text(f"Usable: IdP urn:crmbridge:sandbox:idp:{DYN_SLUG}.")).to_be_visible()
    press(page, "Import this configuration")
    # Importing, then the explicit SP key step the page takes next: the IdP needs our SP metadata.
    expect(page.get_by_text("IdP configuration saved; SP keys ready. Give the IdP our SP metadata, then run a "
                            "test login.")).to_be_visible()
    page.goto(page.get_by_role("link", name="Start a test login").get_attribute("href"))
    expect(page.get_by_role("heading", name=f"Sandbox IdP — {DYN_SLUG}")).to_be_visible()
    assert page.url.startswith(f"{c.sandbox_browser_url}/idp/{DYN_SLUG}/sso?")
    shot("idp-login-page")
    page.get_by_role("button", name=admin, exact=True).click()
    page.wait_for_url(re.compile(rf"/sso\?trace=\d+&tenant={DYN_SLUG}$"))
    settled(page)
    assert metric(page, "Tested") == "yes"
    shot("sso-test-login-passed")

    open_page(page, f"{c.url}/onboarding")
    choose(page, "Tenant", f"{DYN_TENANT} ({DYN_SLUG})")
    pick_step(page, "Single sign-on")
    press(page, "Mark step done")
    expect(page.get_by_text("5 of 7 steps settled")).to_be_visible()
    pick_step(page, "Users")
    email, (_, _, crm_id) = next((e, u) for e, u in dyn["users"].items() if e != admin)
    textbox(page, "Email").fill(email)
    textbox(page, "Name").fill("Sam Seller")
    press(page, "Add user")
    expect(page.get_by_text(f"Added {email}.")).to_be_visible()
    assert re.fullmatch(r"[0-9a-f-]{36}", crm_id)  # the systemuserid the wizard shows, for mapping
    press(page, "Mark step done")
    expect(page.get_by_text("6 of 7 steps settled")).to_be_visible()
    pick_step(page, "Go live")
    press(page, "Go live")
    expect(page.get_by_text(f"{DYN_TENANT} is live.")).to_be_visible()
    shot("live")
