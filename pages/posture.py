"""Posture: a tenant's maturity level, its single next step, and its findings by severity with evidence.

Tenant admins see their own tenant; staff pick any tenant in the sidebar.
"""

from __future__ import annotations

import streamlit as st

from core.db import session_scope
from core.errors import CrmBridgeError
from core.posture.maturity import LEVELS
from core.posture.rules import ActionTarget, Severity
from core.posture.service import get_posture
from pages._common import evidence_table, md, principal, selected_tenant_id, show_error

WHO = {"tenant_admin": "Tenant admin", "customer_success": "Customer success", "sales": "Sales"}
ICON = {"blocking": ":material/block:", "high": ":material/error:", "medium": ":material/warning:",
        "low": ":material/info:", "info": ":material/info:"}

PAGE_FILES = {"tenant": "tenant.py", "sso": "sso.py", "users_sync": "users_sync.py"}


def action_link(target: ActionTarget | None, slug: str) -> None:
    """A same-tab link to the page and control that carry the action out, with the tenant in focus
    (``?tenant=slug``) and the account whose panel opens (``&account=id``)."""
    if target is None:
        return
    params = {"tenant": slug, **({"account": str(target.account_id)} if target.account_id is not None else {})}
    try:
        st.page_link(f"pages/{PAGE_FILES[target.page]}", label=target.label, icon=":material/arrow_forward:",
                     query_params=params)
    except Exception:  # the page runs outside the console's navigation (a single-page test run)
        st.markdown(f"[{target.label} →]({target.href(slug)})")


p = principal()
if not (p.is_staff or p.is_tenant_admin):
    st.title("Posture")
    st.info("Posture is shown per tenant, to CRM Bridge staff and each tenant's admins. "
            "Cross-tenant figures are on the Adoption page.")
    st.stop()

tenant_id = selected_tenant_id(p)
if tenant_id is None:
    st.stop()
try:
    with session_scope() as s:
        report = get_posture(session=s, principal=p, tenant_id=tenant_id)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()

m = report.maturity
st.title(f"Posture — {md(report.name)}")
cols = st.columns(3)
cols[0].metric("Maturity level", f"{m.level} of 4", help=m.meaning)
cols[1].metric("Level", m.name)
counts = {sev: len(fs) for sev, fs in report.by_severity().items()}
cols[2].metric("Blocking / high findings", f"{counts.get('blocking', 0)} / {counts.get('high', 0)}")

st.caption(" → ".join(f"**{lvl} {name}**" if lvl == m.level else f"{lvl} {name}" for lvl, (name, _) in LEVELS.items()))

step = m.next_step
if step is None:
    st.success("Top level: no stored passwords, SSO tested, and every write attributed to its real actor.")
else:
    st.subheader(f"Next step → level {step.to_level}")
    st.info(f"**{md(step.title)}**\n\n{md(step.action)}\n\nWho acts: **{md(WHO.get(step.who, step.who))}**"
            + (f" · {step.steps_left} steps before level {step.to_level}" if step.steps_left > 1 else ""))
    gate = next((f for f in report.findings if f.key in m.gating), None)
    action_link(gate.target if gate else None, report.slug)

st.subheader(report.world.title)
st.markdown(md(report.world.explanation))  # names the CRM accounts
if report.world.evidence:
    with st.expander("Catalog facts behind this"):
        evidence_table([(e.label, e.value, e.source, e.url) for e in report.world.evidence], first="Fact")

st.subheader(f"Findings ({len(report.findings)})")
if not report.findings:
    st.success("No findings.")
for sev in Severity:
    found = report.by_severity().get(sev.value, [])
    if not found:
        continue
    st.markdown(f"#### {sev.value.title()} ({len(found)})")
    for f in found:
        with st.container(border=True):
            st.markdown(f"{ICON.get(sev.value, '')} **{md(f.title)}**")
            st.markdown(f"**Do:** {md(f.action)}")
            action_link(f.target, report.slug)
            st.markdown(f"**Who acts:** {md(WHO.get(f.who, f.who))} · **Unlocks:** {md(f.unlocks)}")
            evidence_table([(e.label, e.value, e.source, e.url) for e in f.evidence])
            if f.affected:
                st.caption(f"Users affected ({len(f.affected)}): " + md(", ".join(f.affected)))

if report.catalog_gaps:
    st.caption("Facts missing from the provider catalog (advice is limited until they are added): "
               + md("; ".join(report.catalog_gaps)))
st.caption(f"As of {report.taken_at:%Y-%m-%d %H:%M} UTC.")
