"""Overview: the landing page, per role."""

from __future__ import annotations

import streamlit as st

from core.db import session_scope
from core.errors import CrmBridgeError
from core.tenants.service import get_tenant, list_crm_accounts, list_tenants, tenant_counts
from pages._common import principal, show_error

p = principal()
st.title("Overview")

try:
    with session_scope() as s:
        if p.is_tenant_admin and p.tenant_id is not None:
            tenant = get_tenant(session=s, principal=p, tenant_id=p.tenant_id)
            accounts = list_crm_accounts(session=s, principal=p, tenant_id=p.tenant_id)
            st.subheader(tenant.name)
            cols = st.columns(3)
            cols[0].metric("Status", tenant.status)
            cols[1].metric("CRM accounts", len(accounts))
            cols[2].metric("Failing connection tests", sum(1 for a in accounts if a.last_test_ok is False))
        else:
            counts = tenant_counts(session=s, principal=p)
            cols = st.columns(4)
            cols[0].metric("Tenants", counts.tenants)
            cols[1].metric("Live", counts.by_status.get("live", 0))
            cols[2].metric("Onboarding", counts.by_status.get("onboarding", 0))
            cols[3].metric("CRM accounts", counts.crm_accounts)
            st.caption("Tenants by CRM: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.by_provider.items())))
            if p.is_staff:
                rows, _ = list_tenants(session=s, principal=p, status="onboarding", limit=20)
                st.subheader("Onboardings in flight")
                if rows:
                    st.dataframe([{"Tenant": r.name, "Step": r.onboarding_step, "CRM accounts": r.crm_accounts}
                                  for r in rows], hide_index=True, width="stretch")
                else:
                    st.info("No onboarding in flight.")
except CrmBridgeError as exc:
    show_error(exc)
