"""Tenant: its CRM accounts (add, test, quota), credentials, and users."""

from __future__ import annotations

import streamlit as st

from core import labels
from core.db import session_scope
from core.errors import CrmBridgeError
from core.sync.service import account_statuses
from core.tenants.service import get_tenant, list_app_users, list_crm_accounts
from pages._common import ago, csv_download, md, md_code, principal, selected_tenant_id, show_error
from pages._credentials import render_credentials
from pages._crm_accounts import (
    render_add_crm_account,
    render_connection_test,
    render_credential_mode,
    render_edit_crm_account,
    render_quota,
)
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
        statuses = account_statuses(session=s, principal=p, tenant_id=tenant_id)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()

st.title(md(tenant.name))
st.caption(f"{md_code(tenant.slug)} · status **{md(labels.tenant_status(tenant.status))}** · onboarding step "
           f"**{md(labels.step(tenant.onboarding_step))}**")

st.subheader("CRM accounts")
if accounts:
    st.dataframe(
        [{"Label": a.label, "CRM": labels.provider(a.provider), "Edition": a.edition,
          "Credential mode": labels.credential_mode(a.credential_mode),
          "Status": statuses[a.id].label if a.id in statuses else labels.humanize(a.status),
          "Last test": ("passed" if a.last_test_ok else "failed") if a.last_test_at else "never",
          "Tested": ago(a.last_test_at)} for a in accounts],
        hide_index=True, width="stretch",
    )
else:
    st.info("No CRM account yet: add the first one below.")

flash = st.session_state.pop("crm_flash", None)
if flash:
    st.success(flash)
focus = st.query_params.get("account")  # a posture finding's action link opens this account's panel
for a in accounts:
    with st.expander(f"{md(a.label)} — {md(labels.provider(a.provider))} {md(a.edition)}",
                     expanded=focus == str(a.id)):
        render_connection_test(a.id)
        render_quota(a.id)
        render_credential_mode(a.id, a.credential_mode)
        render_edit_crm_account(a.id)

# kept open right after an add, so its confirmation (and the secure form's link) shows
with st.expander("Add a CRM account", expanded=not accounts or f"crm_added_{tenant_id}" in st.session_state):
    render_add_crm_account(tenant_id)

st.subheader("Stored credentials")
render_credentials(tenant_id)

st.subheader(f"Users ({len(users)})")
if users:
    user_rows = [{"Email": u.email, "Name": u.name, "Status": labels.humanize(u.status),
                  "Signs in by SSO": u.signs_in_by_sso} for u in users]
    st.dataframe(user_rows, hide_index=True, width="stretch")
    csv_download(user_rows, f"crmbridge-{tenant.slug}-users.csv")
else:
    st.info("No user yet: add the first one below.")
with st.expander("Add a user", expanded="add_user_flash" in st.session_state):
    render_add_user(p, tenant_id)
