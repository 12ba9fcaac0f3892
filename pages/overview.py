"""Overview: the landing page, per role — staff see onboardings in flight and tenants needing
attention; a tenant admin their health, posture and next step; leadership the adoption headline."""

from __future__ import annotations

import streamlit as st

from core.db import session_scope
from core.errors import CrmBridgeError
from core.posture.overview import headline, needing_attention
from core.posture.service import adoption_figures, get_posture
from core.scheduler.service import periodic_status
from core.sync.service import sync_overview
from core.tenants.service import get_tenant, list_crm_accounts, list_tenants
from pages._common import ago, md, principal, show_error

p = principal()
st.title("Overview")


def _tenant_admin_view(tenant_id: int) -> None:
    with session_scope() as s:
        tenant = get_tenant(session=s, principal=p, tenant_id=tenant_id)
        accounts = list_crm_accounts(session=s, principal=p, tenant_id=tenant_id)
        report = get_posture(session=s, principal=p, tenant_id=tenant_id)
        sync = sync_overview(session=s, principal=p, tenant_id=tenant_id)
    st.subheader(md(tenant.name))
    cols = st.columns(4)
    cols[0].metric("Maturity level", f"{report.maturity.level} of 4", help=report.maturity.meaning)
    cols[1].metric("CRM accounts", len(accounts))
    cols[2].metric("Failing connection tests", sum(1 for a in accounts if a.last_test_ok is False))
    failing_users = sum(1 for u in sync.users if u.sync == "failing" or u.auth in ("reconnect needed", "failed"))
    cols[3].metric("Users needing attention", failing_users)
    if report.next_step:
        st.info(f"**Next step:** {md(report.next_step.title)} — {md(report.next_step.action)}")
    urgent = [f for f in report.findings if f.severity in ("blocking", "high")]
    if urgent:
        st.markdown("**Needs attention**")
        for f in urgent[:5]:
            st.markdown(f"- **{md(f.severity)}** · {md(f.title)}: {md(f.action)}")
    if sync.accounts:
        st.markdown("**Sync by CRM account**")
        st.dataframe([{"Account": a.label, "CRM": a.provider, "Jobs": a.jobs, "Records in (24 h)": a.records_in_24h,
                       "Records out (24 h)": a.records_out_24h,
                       "Healthy": a.by_sync.get("healthy", 0), "Failing": a.by_sync.get("failing", 0)}
                      for a in sync.accounts], hide_index=True, width="stretch")


def _aggregate_view() -> None:
    with session_scope() as s:
        h = headline(session=s, principal=p)
        # The same figures, over the same tenants and postures, as the Adoption page shows (issue 16).
        fig = adoption_figures(session=s, principal=p)
        attention = needing_attention(session=s, principal=p) if p.is_staff else []
        onboarding = list_tenants(session=s, principal=p, status="onboarding", limit=20)[0] if p.is_staff else []
    cols = st.columns(4)
    cols[0].metric("Tenants", fig.tenants, help=f"{h.live} live, {h.onboarding} onboarding (offboarded not counted)")
    cols[1].metric("Tenants with tested SSO", f"{fig.sso_tested_share:.0%}",
                   help=f"{fig.sso_tested} of {fig.tenants}")
    cols[2].metric("Users signing in by SSO", f"{fig.users_sso_share:.0%}",
                   help=f"{fig.users_sso:,} of {fig.users_total:,} active users")
    cols[3].metric("One step from the next level", fig.one_step_away,
                   help="Tenants whose next level is exactly one action away")
    if fig.tenants:
        st.caption("Maturity levels: " + ", ".join(f"level {k}: {v}" for k, v in sorted(fig.levels.items()))
                   + (f" · as of {h.as_of}" if h.as_of else ""))
    if h.stored_password_tenants:
        st.caption(f"{h.stored_password_tenants} tenant(s) still rely on stored passwords.")
    if p.role == "leadership":
        try:
            st.page_link("pages/adoption.py", label="Open the leadership view: trends, pipeline, tenants →",
                         icon=":material/insights:")
        except Exception:  # outside the console's navigation (a single-page test run)
            st.markdown("[Open the leadership view: trends, pipeline, tenants →](/adoption)")
    if p.is_staff:
        st.subheader("Onboardings in flight")
        if onboarding:
            st.dataframe([{"Tenant": r.name, "Step": r.onboarding_step, "CRM accounts": r.crm_accounts}
                          for r in onboarding], hide_index=True, width="stretch")
        else:
            st.info("No onboarding in flight.")
        st.subheader("Tenants needing attention")
        if attention:
            st.dataframe([{"Tenant": a.name, "Slug": a.slug, "Why": a.reason,
                           "Level": a.level if a.level is not None else ""} for a in attention],
                         hide_index=True, width="stretch")
        else:
            st.success("No tenant has a blocking or high finding or a failing connection test.")


def _every(seconds: int) -> str:
    for unit, n in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n and seconds % n == 0:
            v = seconds // n
            return f"{v} {unit}" + ("s" if unit == "day" and v > 1 else "")
    return f"{seconds} s"


def _scheduled_jobs_view() -> None:
    """Staff: when each periodic job last ran, how it ended, and whether it is late."""
    with session_scope() as s:
        jobs = periodic_status(session=s, principal=p)
    st.subheader("Scheduled jobs")
    if all(j.status == "never ran" for j in jobs):
        st.warning("No scheduled job has run yet: start the scheduler (`crmbridge scheduler`; `make run` starts "
                   "one) so sync jobs, the vault sweep, alerts, the SSO watch and posture snapshots happen.")
    else:
        late = [j for j in jobs if j.late]
        failed = [j for j in jobs if j.status == "failed"]
        if late:
            st.warning("Late: " + ", ".join(f"**{j.title}** ({j.status}, last ran {ago(j.last_started_at)})"
                                             for j in late)
                       + ". Is a `crmbridge scheduler` process running and reaching the database?")
        for j in failed:
            st.error(f"**{j.title}** failed {ago(j.last_finished_at)}: {j.last_error}")
    st.dataframe([{"Job": j.title, "Every": _every(j.interval_seconds), "Status": j.status,
                   "Last run": ago(j.last_started_at),
                   "Started (UTC)": f"{j.last_started_at:%Y-%m-%d %H:%M:%S}" if j.last_started_at else "",
                   "Finished (UTC)": f"{j.last_finished_at:%Y-%m-%d %H:%M:%S}" if j.last_finished_at else "",
                   "Next due": ago(j.next_due_at) if j.next_due_at else "now",
                   "Result": j.last_error or j.last_summary or "", "By": j.last_owner or ""} for j in jobs],
                 hide_index=True, width="stretch",
                 column_config={"Status": st.column_config.TextColumn(help="late: it should have run by now")})
    st.caption("Each job runs once per interval however many schedulers run (the database decides). "
               "Intervals: CRMBRIDGE_SCHEDULE_*_SECONDS.")


try:
    if p.is_tenant_admin and p.tenant_id is not None:
        _tenant_admin_view(p.tenant_id)
    else:
        _aggregate_view()
        if p.is_staff:
            _scheduled_jobs_view()
except CrmBridgeError as exc:
    show_error(exc)
