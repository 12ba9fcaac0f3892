"""Tenant: its CRM accounts (add, test, quota), credentials, and users."""

from __future__ import annotations

import streamlit as st

from core.db import session_scope
from core.errors import CrmBridgeError
from core.tenants.service import get_tenant, list_app_users, list_crm_accounts
from pages._common import ago, md, md_code, principal, selected_tenant_id, show_error
from pages._credentials import render_credentials
from pages._crm_accounts import render_add_crm_account, render_connection_test, render_quota
from pages._users import render_add_user

p = principal()
tenant_id = selected_tenant_id(p)
if tenant_id is None:
    st.stop()
try:
    with session_scope() as s:
        tenant = get_tenant(session=s, principal=p, tenant_id=tenant_id)
        accounts = list_crm_accounts(session=s, principal=p, tenant_id=tenant_id)
        users = list_app_users(session=s, principal=p, tenant_id=tenant_id, limit=1000)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()

st.title(md(tenant.name))
st.caption(f"{md_code(tenant.slug)} · status **{md(tenant.status)}** · "
           f"onboarding step **{md(tenant.onboarding_step)}**")

st.subheader("CRM accounts")
if accounts:
    st.dataframe(
        [{"Label": a.label, "CRM": a.provider, "Edition": a.edition, "Credential mode": a.credential_mode,
          "Status": a.status, "Last test": ("passed" if a.last_test_ok else "failed") if a.last_test_at else "never",
          "Tested": ago(a.last_test_at)} for a in accounts],
        hide_index=True, width="stretch",
    )
else:
    st.info("No CRM account yet: add the first one below.")

for a in accounts:
    with st.expander(f"{md(a.label)} — {md(a.provider)} {md(a.edition)}"):
        render_connection_test(a.id)
        render_quota(a.id)

with st.expander("Add a CRM account", expanded=not accounts):
    render_add_crm_account(tenant_id)

st.subheader("Stored credentials")
render_credentials(tenant_id)

st.subheader(f"Users ({len(users)})")
if users:
    st.dataframe(
        [{"Email": u.email, "Name": u.name, "Status": u.status, "Signs in by SSO": u.signs_in_by_sso}
         for u in users],
        hide_index=True, width="stretch",
    )
with st.expander("Add a user"):
    render_add_user(p, tenant_id)
