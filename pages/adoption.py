"""Adoption: the leadership view — SSO adoption and integration maturity across tenants, over time, the
upgrade pipeline by next step and who acts, and the tenants one step away.

Aggregates only — no user-level data: tenants appear by name with their counts and next step, never a
user, an email or a finding's evidence. Every chart and table clicks through to a tenant: the tenant in
focus is carried in the URL (``?tenant=slug``) and shown in a card here; staff also get a link to the
tenant's posture.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import labels
from core.db import session_scope
from core.errors import CrmBridgeError
from core.posture.adoption import TenantRow
from core.posture.maturity import LEVELS
from core.posture.service import get_adoption
from pages._common import md, principal, show_error

WHO = {"tenant_admin": "Tenant admin", "customer_success": "Customer success", "sales": "Sales", "": "—"}
MODE = {"api_user": "API user", "per_user_oauth": "Per-user OAuth", "per_user_password": "Stored passwords"}
SSO = {"tested": "Tested", "untested": "Not tested", "failing": "Failing", "missing": "Not set up"}
LEVEL_LABEL = {lvl: f"{lvl} {name}" for lvl, (name, _) in LEVELS.items()}
LEVEL_ORDER = list(LEVEL_LABEL.values())
# Colours follow meaning: blocked is red, the top level green, the levels between go from amber to green.
LEVEL_COLOUR = {LEVEL_LABEL[0]: "#b91c1c", LEVEL_LABEL[1]: "#ea580c", LEVEL_LABEL[2]: "#eab308",
                LEVEL_LABEL[3]: "#65a30d", LEVEL_LABEL[4]: "#15803d"}
WHO_COLOUR = {"Tenant admin": "#2563eb", "Customer success": "#7c3aed", "Sales": "#0891b2", "—": "#94a3b8"}
# The next step by rule, in words (the step's own title names an account; the pipeline groups by kind).
STEP = {"no_crm_account": "Add a CRM account", "api_not_available": "Buy the API add-on or upgrade",
        "account_cannot_sync": "Make an account sync", "per_user_passwords": "Stop storing passwords",
        "sso_missing": "Set up SSO", "sso_untested": "Test SSO", "sso_failing": "Fix the SSO test login",
        "api_user_without_attribution": "Attribute API-user writes", "unknown": "Review the findings"}
LAYOUT: dict[str, Any] = {"margin": {"l": 10, "r": 10, "t": 10, "b": 10}, "legend_title_text": ""}


def _whole_tenants(fig: Any, top: float, *, axis: str = "y") -> None:
    """Axes that count tenants show whole numbers only (no 0.5 tenant ticks)."""
    step = max(1, math.ceil(max(top, 1) / 6))
    kw = {"tick0": 0, "dtick": step, "tickformat": ",d", "rangemode": "tozero"}
    (fig.update_yaxes if axis == "y" else fig.update_xaxes)(**kw)


def _picked(event: Any) -> list[dict]:
    try:
        return list(event.selection.points) if event is not None else []
    except AttributeError:
        return list((event or {}).get("selection", {}).get("points", []))


def _focus(slug: str) -> None:
    st.query_params["tenant"] = slug
    st.rerun()


def _crm(provider: str, edition: str) -> str:
    return f"{labels.provider(provider)} · {labels.edition(provider, edition)}"


p = principal()
try:
    with session_scope() as s:
        rep = get_adoption(session=s, principal=p)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()

st.title("SSO adoption and integration maturity")
if not rep.tenants:
    st.info("No tenants yet.")
    st.stop()

figs = rep.figures  # the one definition Overview shows too
rows: list[TenantRow] = rep.tenant_rows
by_slug = {r.slug: r for r in rows}

cols = st.columns(4)
cols[0].metric("Tenants", figs.tenants)
cols[1].metric("Tenants with tested SSO", f"{figs.sso_tested_share:.0%}", help=f"{figs.sso_tested} of {figs.tenants}")
cols[2].metric("Users signing in by SSO", f"{figs.users_sso_share:.0%}",
               help=f"{figs.users_sso:,} of {figs.users_total:,} active users")
cols[3].metric("One step from the next level", figs.one_step_away,
               help="Tenants whose next level is exactly one action away")

# --- the tenant in focus (from the URL, or a click on any chart or row below) -----------------------
focus = by_slug.get(st.query_params.get("tenant") or "")
if focus is not None:
    with st.container(border=True, key="tenant_focus"):
        st.subheader(f"Tenant in focus: {md(focus.name)}")
        c = st.columns(4)
        c[0].metric("Maturity level", f"{focus.level} of 4", help=LEVELS[focus.level][1])
        c[1].metric("SSO", SSO.get(focus.sso_state, focus.sso_state))
        c[2].metric("Users signing in by SSO", f"{focus.users_sso:,} of {focus.users_total:,}")
        c[3].metric("CRM", ", ".join(_crm(*pe) for pe in sorted(set(focus.editions))) or "none")
        if focus.step:
            st.markdown(f"**Next step** → level {focus.to_level}: {md(STEP.get(focus.rule, focus.step))} · "
                        f"who acts: **{WHO.get(focus.who, focus.who)}**"
                        + (" · *one step away*" if focus.one_step_away else ""))
        else:
            st.success("Top level: nothing left to upgrade.")
        if p.is_staff:
            try:
                st.page_link("pages/posture.py", label=f"Open {md(focus.name)}'s posture",
                             icon=":material/arrow_forward:", query_params={"tenant": focus.slug})
            except Exception:  # outside the console's navigation (a single-page test run)
                st.markdown(f"[Open {md(focus.name)}'s posture](/posture?tenant={quote(focus.slug)})")
        if st.button("Clear the tenant in focus", key="clear_focus"):
            del st.query_params["tenant"]
            st.rerun()

crms = {"All CRMs": None} | {_crm(r.provider, r.edition): (r.provider, r.edition) for r in rep.by_edition}
sel = crms[st.selectbox("CRM and edition", list(crms), index=0)]

# --- over time (daily posture snapshots, aggregates only) -------------------------------------------
left, right = st.columns(2)
with left:
    st.subheader("Maturity over time")
    points = [t for t in rep.trend if (t.provider, t.edition) == ((None, None) if sel is None else sel)]
    if points:
        fig = go.Figure()
        for lvl, label in LEVEL_LABEL.items():
            mine = [t for t in points if t.level == lvl]
            fig.add_trace(go.Scatter(x=[t.day for t in mine], y=[t.tenants for t in mine], name=label,
                                     mode="lines", stackgroup="levels", line={"color": LEVEL_COLOUR[label]}))
        fig.update_layout(height=320, xaxis_title="Day", yaxis_title="Tenants", **LAYOUT)
        per_day: dict = {}
        for t in points:
            per_day[t.day] = per_day.get(t.day, 0) + t.tenants
        _whole_tenants(fig, float(max(per_day.values(), default=1)))
        st.plotly_chart(fig, key="levels_trend")
    else:
        st.caption("No daily posture history for this selection yet.")
with right:
    st.subheader("SSO adoption over time")
    if rep.sso_trend:
        days = [d for d, _, _ in rep.sso_trend]
        fig = go.Figure([
            go.Scatter(x=days, y=[a for _, a, _ in rep.sso_trend], name="Tenants with tested SSO",
                       mode="lines+markers", line={"color": "#15803d"}),
            go.Scatter(x=days, y=[b for _, _, b in rep.sso_trend], name="Users signing in by SSO",
                       mode="lines+markers", line={"color": "#2563eb"})])
        fig.update_layout(height=320, yaxis_tickformat=".0%", yaxis_range=[0, 1], xaxis_title="Day",
                          yaxis_title="Share", **LAYOUT)
        st.plotly_chart(fig, key="sso_trend")
    else:
        st.caption("No daily posture history yet.")

# --- today: click a bar to list its tenants ----------------------------------------------------------
in_sel = [r for r in rows if sel is None or sel in r.editions]
left, right = st.columns(2)
with left:
    st.subheader("Maturity today")
    st.caption("Click a bar to list its tenants.")
    counts = {LEVEL_LABEL[lvl]: sum(1 for r in in_sel if r.level == lvl) for lvl in LEVELS}
    fig = go.Figure(go.Bar(x=list(counts), y=list(counts.values()), name="Tenants",
                           marker={"color": [LEVEL_COLOUR[k] for k in counts]}))
    fig.update_layout(height=320, showlegend=False, xaxis_title="Level", yaxis_title="Tenants", **LAYOUT)
    _whole_tenants(fig, float(max(counts.values())))
    levels_event = st.plotly_chart(fig, key="levels_now", on_select="rerun", selection_mode="points")
    if sel is None:  # the same words Overview uses, from the same core figures
        st.caption("Maturity levels: " + ", ".join(f"level {k}: {v}" for k, v in sorted(figs.levels.items())))
with right:
    st.subheader("Upgrade pipeline: next step and who acts")
    st.caption("Every tenant below the top level, by its next step. Click a bar to list its tenants.")
    todo = [r for r in in_sel if r.step]
    pipe_event: Any = None
    if todo:
        grouped: dict[tuple[str, str], int] = {}
        for r in todo:
            k = (STEP.get(r.rule, r.rule.replace("_", " ")), WHO.get(r.who, r.who))
            grouped[k] = grouped.get(k, 0) + 1
        fig = go.Figure()
        for who_label in sorted({k[1] for k in grouped}):
            bars = [(k[0], n) for k, n in grouped.items() if k[1] == who_label]
            fig.add_trace(go.Bar(y=[b[0] for b in bars], x=[b[1] for b in bars], name=who_label, orientation="h",
                                 marker={"color": WHO_COLOUR.get(who_label, "#94a3b8")}))
        fig.update_layout(height=320, barmode="stack", xaxis_title="Tenants", legend_title_text="Who acts",
                          margin=LAYOUT["margin"])
        totals: dict[str, int] = {}
        for (step_label, _), n in grouped.items():
            totals[step_label] = totals.get(step_label, 0) + n
        _whole_tenants(fig, float(max(totals.values())), axis="x")
        pipe_event = st.plotly_chart(fig, key="pipeline", on_select="rerun", selection_mode="points")
    else:
        st.success("Every tenant is at the top level.")

# Chart clicks narrow the tenant list (one tenant: it comes into focus).
listed, why = in_sel, "All tenants"
picked_levels = {str(pt.get("x")) for pt in _picked(levels_event)}
if picked_levels:
    listed = [r for r in listed if LEVEL_LABEL[r.level] in picked_levels]
    why = "Tenants at " + ", ".join(sorted(picked_levels))
picked_steps = {(str(pt.get("y")), str(pt.get("legendgroup") or "")) for pt in _picked(pipe_event)}
if picked_steps:
    names = {s for s, _ in picked_steps}
    listed = [r for r in listed if r.step and STEP.get(r.rule, r.rule.replace("_", " ")) in names]
    why = "Tenants whose next step is " + ", ".join(sorted(names))
if (picked_levels or picked_steps) and len(listed) == 1 and (focus is None or focus.slug != listed[0].slug):
    _focus(listed[0].slug)


def _tenant_table(items: list[TenantRow], *, key: str) -> None:
    """Tenants (aggregate facts only); selecting a row brings the tenant into focus."""
    df = pd.DataFrame([{"Tenant": r.name, "Level": LEVEL_LABEL[r.level], "SSO": SSO.get(r.sso_state, r.sso_state),
                        "Next step": r.step or "—", "Who acts": WHO.get(r.who, r.who)} for r in items])
    # Widths that add up to the page's width, so no column is cut off (the CRM is in the tenant's card).
    event = st.dataframe(
        df, hide_index=True, width="stretch", key=key, on_select="rerun", selection_mode="single-row",
        column_config={"Tenant": st.column_config.TextColumn(width=170, pinned=True),
                       "Level": st.column_config.TextColumn(width=160),
                       "SSO": st.column_config.TextColumn(width=95),
                       "Next step": st.column_config.TextColumn(width=320),
                       "Who acts": st.column_config.TextColumn(width=130)},
    )
    chosen = list(getattr(getattr(event, "selection", None), "rows", []) or [])
    if chosen and 0 <= chosen[0] < len(items) and (focus is None or focus.slug != items[chosen[0]].slug):
        _focus(items[chosen[0]].slug)


st.subheader("Tenants one step away")
st.caption("Tenants whose next level is one action away, and that action. Select a row to focus the tenant.")
one_step = [r for r in in_sel if r.one_step_away]
SHOWN = 50  # rows per tenant table: the charts narrow the list, the table never ships thousands of rows
if one_step:
    _tenant_table(sorted(one_step, key=lambda r: (-r.level, r.name))[:SHOWN], key="one_step_table")
    if len(one_step) > SHOWN:
        st.caption(f"The {SHOWN} closest to the top level of {len(one_step):,}: click a chart bar to narrow the list.")
else:
    st.info("No tenant is one step from its next level.")

st.subheader(why)
st.caption("Select a row to focus the tenant." + (f" Showing {SHOWN} of {len(listed):,}: click a chart bar to "
                                                  "narrow the list." if len(listed) > SHOWN else ""))
_tenant_table(listed[:SHOWN], key="tenant_table")

st.subheader("By CRM and edition")
st.dataframe(
    [{"CRM": labels.provider(r.provider), "Edition": labels.edition(r.provider, r.edition),
      "Tenants": r.tenants, "CRM accounts": r.accounts,
      "Tested SSO": f"{r.sso_tested_share:.0%}", "Users by SSO": f"{r.users_sso_share:.0%}",
      **{MODE.get(k, k): v for k, v in r.modes.items()}} for r in rep.by_edition],
    hide_index=True, width="stretch",
)
st.dataframe(
    [{"CRM": labels.provider(r.provider), "Edition": labels.edition(r.provider, r.edition),
      **{LEVEL_LABEL[k]: v for k, v in r.levels.items()}}
     for r in rep.by_edition],
    hide_index=True, width="stretch",
)
st.caption(f"As of {rep.as_of:%Y-%m-%d %H:%M} UTC.")
