"""Tenants: every customer with its status and CRM accounts; staff create tenants here."""

from __future__ import annotations

import streamlit as st

from core import labels
from core.db import session_scope
from core.errors import CrmBridgeError
from core.tenants.models import TenantStatus
from core.tenants.service import create_tenant, list_tenants
from pages._common import crm_slugs, csv_download, md, page_link, principal, show_error

p = principal()
st.title("Tenants")

c1, c2, c3 = st.columns([2, 1, 1])
search = c1.text_input("Search name or slug", key="tenants_search")
status = c2.selectbox("Status", ["all", *[s.value for s in TenantStatus]], key="tenants_status",
                      format_func=lambda v: "All" if v == "all" else labels.tenant_status(v))
provider = c3.selectbox("CRM", ["all", *crm_slugs()], key="tenants_provider",
                        format_func=lambda v: "All" if v == "all" else labels.provider(v))
page_size = 50
page_no = st.session_state.get("tenants_page", 0)

try:
    with session_scope() as s:
        rows, total = list_tenants(
            session=s, principal=p, status=None if status == "all" else status, search=search or None,
            provider=None if provider == "all" else provider, limit=page_size, offset=page_no * page_size,
        )
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()

created = st.session_state.pop("tenants_created", None)
if created:
    name, new_slug = created
    st.success(f"Created {md(name)}. Continue on the Onboarding page.")
    page_link("pages/onboarding.py", f"Onboard {md(name)}", icon=":material/rocket_launch:", tenant=new_slug)

st.caption(f"{total} tenant(s)")
if rows:
    table = [{"Name": r.name, "Slug": r.slug, "Status": labels.tenant_status(r.status),
              "Onboarding step": labels.step(r.onboarding_step), "CRM accounts": r.crm_accounts,
              "CRMs": ", ".join(labels.provider(x.strip()) for x in r.providers.split(",") if x.strip()),
              "Users": r.users} for r in rows]
    st.dataframe(table, hide_index=True, width="stretch")
    csv_download(table, "crmbridge-tenants.csv")
    pages = max(1, -(-total // page_size))
    if pages > 1:
        st.number_input("Page", 1, pages, page_no + 1, key="tenants_page_input",
                        on_change=lambda: st.session_state.update(
                            tenants_page=st.session_state["tenants_page_input"] - 1))
else:
    st.info("No tenant matches these filters.")

if p.is_staff:
    with st.expander("Create a tenant", expanded=not rows):
        with st.form("create_tenant", clear_on_submit=False):
            name = st.text_input("Company name", max_chars=200)
            slug = st.text_input("Short name (slug)", max_chars=63,
                                 help="Lowercase letters, digits and dashes; used in SSO URLs.")
            if st.form_submit_button("Create tenant", type="primary"):
                try:
                    with session_scope() as s:
                        t = create_tenant(session=s, principal=p, data={"name": name, "slug": slug})
                        st.session_state["tenants_created"] = (t.name, t.slug)
                    st.rerun()  # the list (and the sidebar's picker) shows the new tenant at once
                except CrmBridgeError as exc:
                    show_error(exc)
