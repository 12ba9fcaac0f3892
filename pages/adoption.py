"""Adoption: SSO adoption and integration maturity across tenants, for sales leadership and staff.

Counts and shares only — no user-level data. The upgrade pipeline lists tenants one step from their
next level and what that step is.
"""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from core.db import session_scope
from core.errors import CrmBridgeError
from core.posture.maturity import LEVELS
from core.posture.service import get_adoption
from pages._common import principal, show_error

WHO = {"tenant_admin": "Tenant admin", "customer_success": "Customer success", "sales": "Sales"}
MODE = {"api_user": "API user", "per_user_oauth": "Per-user OAuth", "per_user_password": "Stored passwords"}
LEVEL_LABEL = {lvl: f"{lvl} {name}" for lvl, (name, _) in LEVELS.items()}
LEVEL_ORDER = list(LEVEL_LABEL.values())

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

cols = st.columns(4)
cols[0].metric("Tenants", rep.tenants)
cols[1].metric("Tenants with tested SSO", f"{rep.sso_tested_share:.0%}", help=f"{rep.sso_tested} of {rep.tenants}")
cols[2].metric("Users signing in by SSO", f"{rep.users_sso_share:.0%}",
               help=f"{rep.users_sso:,} of {rep.users_total:,} active users")
cols[3].metric("One step from the next level", len(rep.pipeline))

crms = ["All CRMs"] + [f"{r.provider} {r.edition}" for r in rep.by_edition]
choice = st.selectbox("CRM and edition", crms, index=0)
sel = None if choice == "All CRMs" else next((r.provider, r.edition) for r in rep.by_edition
                                             if f"{r.provider} {r.edition}" == choice)

left, right = st.columns(2)
with left:
    st.subheader("Maturity today")
    if sel is None:
        dist = rep.levels
    else:
        dist = next(r.levels for r in rep.by_edition if (r.provider, r.edition) == sel)
    df = pd.DataFrame({"Level": [LEVEL_LABEL[k] for k in dist], "Tenants": list(dist.values())})
    fig = px.bar(df, x="Level", y="Tenants", category_orders={"Level": LEVEL_ORDER})
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 10, "b": 10})
    st.plotly_chart(fig, key="levels_now")
with right:
    st.subheader("Credential modes")
    if sel is None:
        modes = rep.credential_modes
    else:
        modes = next(r.modes for r in rep.by_edition if (r.provider, r.edition) == sel)
    df = pd.DataFrame({"Mode": [MODE.get(k, k) for k in modes], "CRM accounts": list(modes.values())})
    fig = px.bar(df, x="Mode", y="CRM accounts")
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 10, "b": 10})
    st.plotly_chart(fig, key="modes")

st.subheader("Maturity over time")
points = [t for t in rep.trend if (t.provider, t.edition) == ((None, None) if sel is None else sel)]
if points:
    df = pd.DataFrame({"Day": [t.day for t in points], "Level": [LEVEL_LABEL[t.level] for t in points],
                       "Tenants": [t.tenants for t in points]})
    fig = px.area(df, x="Day", y="Tenants", color="Level", category_orders={"Level": LEVEL_ORDER})
    fig.update_layout(height=340, margin={"l": 10, "r": 10, "t": 10, "b": 10})
    st.plotly_chart(fig, key="levels_trend")
else:
    st.caption("No daily posture history for this selection yet.")

if rep.sso_trend:
    st.subheader("SSO adoption over time")
    df = pd.DataFrame({"Day": [d for d, _, _ in rep.sso_trend] * 2,
                       "Share": [a for _, a, _ in rep.sso_trend] + [b for _, _, b in rep.sso_trend],
                       "Measure": ["Tenants with tested SSO"] * len(rep.sso_trend)
                       + ["Users signing in by SSO"] * len(rep.sso_trend)})
    fig = px.line(df, x="Day", y="Share", color="Measure")
    fig.update_layout(height=300, margin={"l": 10, "r": 10, "t": 10, "b": 10}, yaxis_tickformat=".0%")
    st.plotly_chart(fig, key="sso_trend")

st.subheader("By CRM and edition")
st.dataframe(
    [{"CRM": r.provider, "Edition": r.edition, "Tenants": r.tenants, "CRM accounts": r.accounts,
      "Tested SSO": f"{r.sso_tested_share:.0%}", "Users by SSO": f"{r.users_sso_share:.0%}",
      **{LEVEL_LABEL[k]: v for k, v in r.levels.items()},
      **{MODE.get(k, k): v for k, v in r.modes.items()}} for r in rep.by_edition],
    hide_index=True, width="stretch",
)

st.subheader("Upgrade pipeline")
st.caption("Tenants one step from their next level, and the step.")
if rep.pipeline:
    st.dataframe(
        [{"Tenant": r.tenant, "CRM": r.crm, "Level": LEVEL_LABEL[r.level], "Next level": LEVEL_LABEL[r.to_level],
          "Step": r.step, "Who acts": WHO.get(r.who, r.who)} for r in rep.pipeline],
        hide_index=True, width="stretch",
    )
else:
    st.info("No tenant is one step from its next level.")
st.caption(f"As of {rep.as_of:%Y-%m-%d %H:%M} UTC.")
