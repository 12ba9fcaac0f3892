"""Users & sync: per-user sync health of one tenant, with a drill-down and the admin's actions.

Auth health (can we act in the CRM for this user?) and sync health (is data flowing?) are shown apart:
they call for different fixes. All data comes from core.sync.service.
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
import streamlit as st

from core import labels as human
from core.clock import utcnow
from core.db import session_scope
from core.errors import CrmBridgeError
from core.sync.health import AUTH_STATES, SYNC_STATES
from core.sync.service import (
    ask_to_reconnect,
    filter_users,
    lag_text,
    pause_account,
    pause_job,
    resume_account,
    resume_job,
    sync_now,
    sync_overview,
    user_detail,
)
from pages._common import ago, csv_download, md, principal, selected_tenant_id, show_error

ALL = "All"
COLOR = {"healthy": "green", "lagging": "orange", "failing": "red", "paused": "gray", "ok": "green",
         "expiring": "orange", "reconnect needed": "orange", "failed": "red", "not syncing yet": "gray"}
STATUS_COLOR = {"success": "#2e7d32", "partial": "#f9a825", "failed": "#c62828", "rate_limited": "#6a1b9a",
                "reconnect_needed": "#ef6c00", "abandoned": "#757575", "lease_lost": "#757575", "skipped": "#90a4ae",
                "running": "#1565c0"}

p = principal()
st.title("Users & sync")
st.caption("Auth health says whether we can act in the CRM for a user; sync health whether their data flows. "
           "A user turns failing only after 3 failed runs in a row.")
tenant_id = selected_tenant_id(p)
if tenant_id is None:
    if not p.is_staff:
        st.error("Users & sync shows each user's data: it is for CRM Bridge staff and the tenant's admins.")
    st.stop()

notice = st.session_state.pop("sync_notice", None)
if notice:
    st.success(md(notice))  # names a user or an account

try:
    with session_scope() as s:
        ov = sync_overview(session=s, principal=p, tenant_id=tenant_id)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()
c1, c2, c3, c4 = st.columns(4)
auth_f = c1.selectbox("Auth state", [ALL, *AUTH_STATES], key="sync_auth_filter")
sync_f = c2.selectbox("Sync state", [ALL, *SYNC_STATES], key="sync_state_filter")
provider_f = c3.selectbox("Provider", [ALL, *ov.providers], key="sync_provider_filter")
account_f = c4.selectbox("Account", [None, *ov.account_labels], key="sync_account_filter",
                         format_func=lambda a: ALL if a is None else ov.account_labels[a])
users = filter_users(ov.users, auth_state=None if auth_f == ALL else auth_f,
                     sync_state=None if sync_f == ALL else sync_f,
                     provider=None if provider_f == ALL else provider_f, crm_account_id=account_f)


def badge(state: str) -> str:
    return f":{COLOR.get(state, 'gray')}-badge[{state}]"


def _act(fn, ok: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """A sync action over every job of an account (or one job): shows that it is working, then reruns."""
    try:
        with st.spinner(f"{ok.split(':', 1)[0]}: updating its sync jobs…"), session_scope() as s:
            fn(session=s, principal=p, **kwargs)
    except CrmBridgeError as exc:
        show_error(exc)
        return
    st.session_state["sync_notice"] = ok
    st.rerun()


st.subheader("CRM accounts")
if not ov.accounts:
    st.info("This tenant has no CRM account yet: add one on the Tenant page.")
cols = st.columns(max(1, min(len(ov.accounts), 3)))
for i, a in enumerate(ov.accounts):
    with cols[i % len(cols)].container(border=True):
        state = a.sync if a.jobs else "not syncing yet"
        st.markdown(f"**{md(a.label)}** · {md(human.provider(a.provider))} · "
                    f"{md(human.credential_mode(a.credential_mode))}  \n"
                    f"Sync {badge(state)}")
        parts = [f"{n} {k}" for k, n in sorted(a.by_sync.items())]
        st.caption(f"{a.jobs} sync job(s): {', '.join(parts) or 'none'}")
        auth_parts = [f"{n} {k}" for k, n in sorted(a.by_auth.items()) if k != "ok"]
        if auth_parts:
            st.caption("Auth: " + ", ".join(auth_parts))
        st.caption(f"24 h: {a.records_in_24h} in · {a.records_out_24h} out · last success {ago(a.last_success_at)}")
        if a.paused_until:
            st.warning(f"Rate-limited: paused until {a.paused_until:%H:%M} UTC — {md(a.pause_reason or '')}")
        if a.paused_by:
            st.info(f"Paused by {md(a.paused_by)}")
            if st.button("Resume account", key=f"resume_acc_{a.crm_account_id}"):
                _act(resume_account, f"{a.label}: sync resumed.", crm_account_id=a.crm_account_id)
        elif st.button("Pause account", key=f"pause_acc_{a.crm_account_id}"):
            _act(pause_account, f"{a.label}: every sync of this account is paused.", crm_account_id=a.crm_account_id)

st.subheader(f"Users ({len(users)} of {ov.total})")
if not users:
    st.info("No user matches these filters." if ov.total else "No sync jobs yet: they appear once the tenant is "
            "live and its users are connected.")
    st.stop()
now = utcnow()
user_rows = [
    {"User": u.owner, "Account": u.account_label, "CRM": human.provider(u.provider),
     "Auth": u.auth, "Sync": u.sync,
     "Why": u.sync_reason, "Last success": ago(u.last_success_at, now), "Lag": lag_text(u.lag),
     "In 24 h": u.records_in_24h, "Out 24 h": u.records_out_24h, "Failures in a row": u.consecutive_failures,
     "Last error": u.last_error or "", "Fix": u.last_error_fix or ""} for u in users]
st.dataframe(user_rows, hide_index=True, width="stretch",
             column_config={"Why": st.column_config.TextColumn(width="medium"),
                            "Last error": st.column_config.TextColumn(width="large"),
                            "Fix": st.column_config.TextColumn(width="large")})
csv_download(user_rows, "crmbridge-sync-health.csv")

st.subheader("Drill-down")
labels = {u.job_id: f"{u.owner} — {u.account_label}" for u in users}
job_id = st.selectbox("User", list(labels), format_func=labels.__getitem__, key="sync_job_pick")
try:
    with session_scope() as s:
        d = user_detail(session=s, principal=p, job_id=job_id, runs=100)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()
h = d.health
st.markdown(f"Auth {badge(h.auth)} · Sync {badge(h.sync)} — {md(h.sync_reason)}")
m3, m4, m5 = st.columns(3)
m3.metric("Lag", lag_text(h.lag))
m4.metric("24 h in / out", f"{h.records_in_24h} / {h.records_out_24h}")
m5.metric("Pending changes", d.pending, help=f"{d.failed_records} rejected by the CRM")

a1, a2, a3 = st.columns(3)
if a1.button("Sync now", key="sync_now", disabled=h.job_state != "active"):
    _act(sync_now, f"{h.owner}: sync requested; the next worker poll runs it.", job_id=job_id)
if h.app_user_id is not None and a2.button("Ask to reconnect", key="sync_reconnect"):
    try:
        with session_scope() as s:
            req = ask_to_reconnect(session=s, principal=p, job_id=job_id)
        st.success(f"Connect link created for {md(req.email)}, valid until {req.expires_at:%Y-%m-%d %H:%M} UTC. "
                   "Send it to the user; it is shown only now.")
        st.code(req.url, language=None)
    except CrmBridgeError as exc:
        show_error(exc)
if h.job_state == "paused":
    if a3.button("Resume", key="sync_resume"):
        _act(resume_job, f"{h.owner}: sync resumed.", job_id=job_id)
elif a3.button("Pause", key="sync_pause", disabled=h.job_state != "active"):
    _act(pause_job, f"{h.owner}: sync paused.", job_id=job_id)

st.markdown("**Runs timeline**")
if d.runs:
    fig = go.Figure()
    for status in sorted({r.status for r in d.runs}):
        runs = [r for r in d.runs if r.status == status]
        fig.add_trace(go.Scatter(
            x=[r.started_at for r in runs], y=[r.records_in + r.records_out for r in runs], mode="markers",
            name=status.replace("_", " "), marker={"color": STATUS_COLOR.get(status, "#455a64"), "size": 9},
            customdata=[[r.records_in, r.records_out, r.api_calls, html.escape((r.error or "")[:120])] for r in runs],
            hovertemplate="%{x|%Y-%m-%d %H:%M}<br>in %{customdata[0]} · out %{customdata[1]} · "
                          "%{customdata[2]} API calls<br>%{customdata[3]}<extra></extra>",
        ))
    fig.update_layout(height=260, margin={"l": 10, "r": 10, "t": 10, "b": 10}, yaxis_title="records moved",
                      legend={"orientation": "h"})
    st.plotly_chart(fig, key=f"runs_{job_id}", width="stretch")
else:
    st.caption("No run yet.")

st.markdown("**Recent errors**")
if d.errors:
    st.dataframe([{"When": f"{e.at:%Y-%m-%d %H:%M}", "Where": e.what, "Error": e.error, "Fix": e.fix or ""}
                  for e in d.errors], hide_index=True, width="stretch",
                 column_config={"Error": st.column_config.TextColumn(width="large"),
                                "Fix": st.column_config.TextColumn(width="large")})
else:
    st.caption("No errors.")

st.markdown("**Credential**")
st.dataframe([{"": k.capitalize(), "Value": v} for k, v in d.credential.items() if v], hide_index=True)

if d.conflicts:
    st.markdown("**Conflicts settled**")
    st.dataframe([{"When": f"{c.at:%Y-%m-%d %H:%M}", "Record": c.crm_id or "", "Field": c.field,
                   "Our value": c.app_value or "", "CRM value": c.crm_value or "", "Kept": c.winner}
                  for c in d.conflicts], hide_index=True, width="stretch")
