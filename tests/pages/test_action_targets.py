"""Issue 16 point 3: advice you can carry out. Every posture finding's action names a console page and
the control on it that carries the action out; rendering that page as each role the finding names
(tenant admin findings: the tenant's admin and staff; customer success and sales: staff) shows the
control, enabled. And the control works: setting the attribution field through the new edit form
clears the finding it was linked from."""

from __future__ import annotations

import html
from datetime import timedelta
from typing import Any

import pytest
from sqlmodel import Session, select
from streamlit.testing.v1 import AppTest

from core.clock import utcnow
from core.connections.service import record_api_usage
from core.posture.rules import RULES, ActionTarget, Finding
from core.posture.service import get_posture
from core.providers.base import ApiUsage
from core.tenants.access import Principal
from core.tenants.models import CrmAccount, Tenant
from tests.conftest import ROOT
from tests.core.posture.seed import demo_world, sso_config

STAFF = Principal(role="staff", email="cs@crmbridge.example", account_id=1)


def _admin(tenant_id: int, slug: str) -> Principal:
    return Principal(role="tenant_admin", email=f"admin@{slug}.example", tenant_id=tenant_id)


def _roles(f: Finding, tenant_id: int, slug: str) -> list[Principal]:
    return [STAFF, _admin(tenant_id, slug)] if f.who == "tenant_admin" else [STAFF]


def _nodes(node: Any) -> list[Any]:
    out = [node]
    for child in getattr(node, "children", {}).values():
        out += _nodes(child)
    return out


def _control(at: AppTest, control: str) -> Any | None:
    """The widget keyed ``control``, the form with that id, or the (link) button labelled ``control``."""
    for n in _nodes(at._tree):
        if getattr(n, "key", None) == control:
            return n
        proto = getattr(n, "proto", None)
        if proto is None:
            continue
        form = getattr(proto, "form", None)
        if form is not None and getattr(form, "form_id", None) == control:
            return n
        if getattr(proto, "label", None) == control:
            return n
        body = getattr(proto, "body", None)  # a same-tab link (st.html <a href>), as sign-in and test logins use
        if isinstance(body, str) and "href=" in body and f">{html.escape(control)}</a>" in body:
            return n
    return None


def _render(page: str, principal: Principal, tenant_id: int, slug: str, account_id: int | None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / f"{page}.py"), default_timeout=60)
    at.session_state["principal"] = principal
    at.session_state["tenant_id"] = tenant_id
    at.query_params["tenant"] = slug
    if account_id is not None:
        at.query_params["account"] = str(account_id)
    return at.run()


def _world(engine) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The posture demo world, plus what makes the remaining rules fire: a tenant without SSO test,
    a failing SSO test, and an account near its API allocation."""
    now = utcnow()
    with Session(engine) as s:
        slugs = demo_world(s, now=now)
        sso_config(s, slugs["tinyco"], now=now, tested=False)
        sso_config(s, slugs["dynco"], now=now, ok=False)
        hub = s.exec(select(CrmAccount).where(CrmAccount.tenant_id == slugs["hubco"])).first()
        assert hub is not None and hub.id is not None
        for i in range(4):
            record_api_usage(session=s, principal=STAFF, account_id=hub.id, now=now, usage=ApiUsage(
                used=400_000 + 50_000 * i, limit=500_000, window="day", observed_at=now - timedelta(hours=3 - i)))
        empty = Tenant(name="Empty Co", slug="emptyco")
        s.add(empty)
        s.commit()
        assert empty.id is not None
        slugs["emptyco"] = empty.id
    return slugs


def test_every_finding_links_to_a_working_control_for_every_role_it_names(app_db):
    slugs = _world(app_db)
    seen: set[str] = set()
    checked: set[tuple[str, str, str]] = set()
    for slug, tenant_id in slugs.items():
        with Session(app_db) as s:
            report = get_posture(session=s, principal=STAFF, tenant_id=tenant_id)
        for f in report.findings:
            seen.add(f.rule)
            assert isinstance(f.target, ActionTarget), f"{f.rule} has no action target"
            for who in _roles(f, tenant_id, slug):
                if (slug, f.target.page, f.target.control + who.role) in checked:
                    continue
                at = _render(f.target.page, who, tenant_id, slug, f.target.account_id)
                assert not at.exception, (f.rule, who.role, at.exception)
                control = _control(at, f.target.control)
                assert control is not None, f"{f.rule}: no control {f.target.control!r} on {f.target.page} " \
                                            f"for {who.role} ({slug})"
                assert not getattr(control, "disabled", False), (f.rule, f.target.control)
                checked.add((slug, f.target.page, f.target.control + who.role))
    # the demo world exercises most rules; the pure test below covers the target of every rule
    assert {"no_crm_account", "api_not_available", "per_user_passwords", "no_spare_license",
            "api_user_without_attribution", "sso_missing", "sso_untested", "sso_failing",
            "idp_cert_expiring"} <= seen, seen


def test_every_rule_produces_findings_with_a_target(app_db):
    """No rule is left without a target: for each rule the demo world fires, every finding has one;
    and the rule list has not grown a rule whose findings fall through ``action_target``."""
    slugs = _world(app_db)
    fired: dict[str, Finding] = {}
    for tenant_id in slugs.values():
        with Session(app_db) as s:
            for f in get_posture(session=s, principal=STAFF, tenant_id=tenant_id).findings:
                fired.setdefault(f.rule, f)
    assert all(f.target is not None for f in fired.values())
    assert len(RULES) == 11  # a new rule: add its target in core.posture.rules.action_target, then here


def test_posture_page_shows_the_action_link_with_the_tenant_in_focus(app_db):
    slugs = _world(app_db)
    at = _render("posture", _admin(slugs["bigcorp"], "bigcorp"), slugs["bigcorp"], "bigcorp", None)
    assert not at.exception
    text = "\n".join(str(m.value) for m in at.markdown)
    with Session(app_db) as s:
        report = get_posture(session=s, principal=STAFF, tenant_id=slugs["bigcorp"])
    attribution = next(f for f in report.findings if f.rule == "api_user_without_attribution")
    assert attribution.target is not None
    assert f"[Set the attribution field →]({attribution.target.href('bigcorp')})" in text
    assert "?tenant=bigcorp&account=" in text


@pytest.mark.parametrize("role", ["tenant_admin", "staff"])
def test_setting_the_attribution_field_through_the_linked_control_clears_the_finding(app_db, role):
    slugs = _world(app_db)
    tid = slugs["bigcorp"]
    who = _admin(tid, "bigcorp") if role == "tenant_admin" else STAFF
    with Session(app_db) as s:
        before = get_posture(session=s, principal=STAFF, tenant_id=tid)
    f = next(f for f in before.findings if f.rule == "api_user_without_attribution")
    assert f.target is not None and f.target.page == "tenant"
    at = _render("tenant", who, tid, "bigcorp", f.target.account_id)
    field = _control(at, f.target.control)
    assert field is not None
    field.input("CrmBridge_Actor__c")
    at.button(key=f"FormSubmitter:crm_edit_{f.target.account_id}-Save settings").click().run()
    assert not at.exception
    assert any("Saved the settings" in str(x.value) for x in at.success), [e.value for e in at.error]
    with Session(app_db) as s:
        after = get_posture(session=s, principal=STAFF, tenant_id=tid)
        tenant = s.get(Tenant, tid)
        assert tenant is not None
    assert f.key not in {g.key for g in after.findings}
    assert after.maturity.level >= before.maturity.level
