"""AppTests: the Posture page (staff, tenant admins) and the Adoption page (leadership, staff)."""

from __future__ import annotations

from sqlmodel import Session, select

from core.clock import utcnow
from core.demo import read_scenario
from core.posture.demo import load_demo
from core.tenants.access import Principal
from core.tenants.models import AppUser, ConsoleAccount
from tests.conftest import page_text, run_page, unescape_md
from tests.core.posture.seed import demo_world

STAFF = Principal(role="staff", email="cs@crmbridge.example", account_id=1)
LEAD = Principal(role="leadership", email="vp.sales@crmbridge.example", account_id=2)


def _world(engine, *, history: bool = False) -> dict[str, int]:  # type: ignore[no-untyped-def]
    now = utcnow()
    with Session(engine) as s:
        slugs = demo_world(s, now=now)
        if history:
            load_demo(s, scenario=read_scenario(), principal=Principal.system("demo"), now=now, tenants=slugs)
            s.commit()
    return slugs


def _admin(slugs: dict[str, int], slug: str) -> Principal:
    return Principal(role="tenant_admin", email=f"admin@{slug}.example", tenant_id=slugs[slug])


# --- Posture page ---------------------------------------------------------------------------------------


def test_posture_staff_picks_a_tenant_and_sees_level_step_and_evidence(app_db):
    slugs = _world(app_db)
    at = run_page("posture.py", STAFF, tenant_id=slugs["tinyco"])
    assert not at.exception
    text = page_text(at)
    assert "Posture — Tiny Co" in text
    assert "Maturity level 1 of 4" in text and "Stored passwords" in text
    assert "Next step → level 2" in text and "free Salesforce Integration user license" in text
    assert "Today's world" in text
    assert "High (" in text and "Medium (" in text
    # evidence with the numbers and the catalog source
    assert "10 of 10 used, 0 spare" in text and "SOAP API Developer Guide" in text
    # staff may see which of the tenant's users a switch would affect
    assert "tom@tinyco.example" in text


def test_posture_staff_sees_profco_blocked_with_the_sales_step(app_db):
    slugs = _world(app_db)
    at = run_page("posture.py", STAFF, tenant_id=slugs["profco"])
    text = page_text(at)
    assert "Maturity level 0 of 4" in text and "Blocked" in text
    assert "Blocking (1)" in text and "Professional without the API add-on" in text
    assert "API_DISABLED_FOR_ORG" in text and "Who acts: **Sales**" in text
    assert "The 2013 world" in text


def test_posture_tenant_admin_sees_own_tenant(app_db):
    slugs = _world(app_db)
    at = run_page("posture.py", _admin(slugs, "bigcorp"))
    assert not at.exception
    text = page_text(at)
    assert "Posture — BigCorp" in text and "Maturity level 3 of 4" in text
    assert "Americas sales: API-user writes not attributed" in text
    assert "IdP signing certificate expires in" in text
    assert "Tiny Co" not in text


def test_posture_tenant_admin_cannot_see_another_tenants_posture(app_db):
    slugs = _world(app_db)
    at = run_page("posture.py", _admin(slugs, "bigcorp"), tenant_id=slugs["tinyco"])
    text = page_text(at)
    assert "Posture — BigCorp" in text
    assert "Tiny Co" not in text and "tom@tinyco.example" not in text
    # an admin principal forged for another tenant id reaches only that tenant, never a second one
    stray = Principal(role="tenant_admin", email="admin@bigcorp.example", tenant_id=10_000)
    at = run_page("posture.py", stray, tenant_id=slugs["tinyco"])
    assert at.error and "Tiny Co" not in page_text(at)


def test_posture_refuses_leadership(app_db):
    _world(app_db)
    at = run_page("posture.py", LEAD)
    assert not at.exception
    text = page_text(at)
    assert "Adoption page" in text and "Maturity level" not in text


# --- Adoption page --------------------------------------------------------------------------------------


def _everything_shown(at) -> str:  # type: ignore[no-untyped-def]
    """Page text plus every plotly chart's spec (its data points and labels)."""
    charts = [el.proto.spec for el in at.get("plotly_chart")]
    return page_text(at) + "\n" + "\n".join(charts) + "\n" + "\n".join(str(sb.options) for sb in at.selectbox)


def test_adoption_leadership_sees_figures_charts_and_pipeline_without_user_level_data(app_db):
    _world(app_db, history=True)
    at = run_page("adoption.py", LEAD)
    assert not at.exception
    text = page_text(at)
    assert "SSO adoption and integration maturity" in text
    assert "Tenants 6" in text and "Tenants with tested SSO 17%" in text and "Users signing in by SSO 20%" in text
    assert len(at.get("plotly_chart")) == 4
    assert "Upgrade pipeline" in text and "BigCorp" in text and "Americas sales: API-user writes not attributed" in text
    shown = _everything_shown(at)
    with Session(app_db) as s:
        users = s.exec(select(AppUser)).all()
        consoles = s.exec(select(ConsoleAccount)).all()
    assert users
    for u in users:
        assert u.email not in shown and u.name not in shown
    for c in consoles:
        assert c.email not in shown and (not c.name or c.name not in shown)
    assert "@" not in shown


def test_adoption_filters_by_crm_and_edition(app_db):
    _world(app_db, history=True)
    at = run_page("adoption.py", LEAD)
    options = at.selectbox[0].options
    assert "Salesforce · Professional" in options, options  # the catalog's names, not slugs
    assert not any("-" in o.split(" · ")[0] or "_" in o for o in options), options
    at.selectbox[0].select("Salesforce · Professional").run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == 4
    tables = [el.value for el in at.dataframe]
    listed = next(t for t in tables if "Next step" in t.columns and len(t) and "Prof" in " ".join(t["Tenant"]))
    assert set(listed["Tenant"]) == {"Prof Services Ltd"}, listed  # the filter narrows the tenant list


def test_adoption_staff_sees_it_too(app_db):
    _world(app_db)
    at = run_page("adoption.py", STAFF)
    assert not at.exception and "Tenants 6" in page_text(at)


def test_adoption_refuses_tenant_admins(app_db):
    slugs = _world(app_db)
    at = run_page("adoption.py", _admin(slugs, "tinyco"))
    assert at.error and "staff and leadership" in unescape_md(at.error[0].value)
    assert "Upgrade pipeline" not in page_text(at)


def _figures(at) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {m.label: str(m.value) for m in at.metric}


def _levels_shown(at) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Tenants per maturity level as the page's caption states them (both pages print the same words)."""
    import re

    for c in at.caption:
        if str(c.value).startswith("Maturity levels:"):
            return {f"level {k}": int(v) for k, v in re.findall(r"level (\d): (\d+)", str(c.value))}
    return {}


def test_overview_and_adoption_show_the_same_sso_and_maturity_figures(app_db):
    """Issue 16: leadership Overview said 17 % of tenants had tested SSO while Adoption said 29 %, and
    "one step from the next level" always equalled the tenant count. Both pages now read one core
    definition: rendered from the same data they agree, and one-step counts only one-action tenants."""
    _world(app_db, history=True)
    for who in (LEAD, STAFF):
        overview = run_page("overview.py", who)
        adoption = run_page("adoption.py", who)
        assert not overview.exception and not adoption.exception
        o, a = _figures(overview), _figures(adoption)
        for label in ("Tenants", "Tenants with tested SSO", "Users signing in by SSO", "One step from the next level"):
            assert o[label] == a[label], (who.role, label, o[label], a[label])
        assert o["Tenants with tested SSO"] == "17%"
        levels_o, levels_a = _levels_shown(overview), _levels_shown(adoption)
        assert levels_o and levels_o == levels_a
        assert sum(levels_o.values()) == int(o["Tenants"])
        assert int(o["One step from the next level"]) < int(o["Tenants"])
