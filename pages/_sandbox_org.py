"""Demo mode: the onboarding wizard's "Create a sandbox org" — a new CRM org and IdP in the CRM sandbox
for the tenant, and the values to type into the console's forms (core.tenants.sandbox_org)."""

from __future__ import annotations

import streamlit as st

from core.db import session_scope
from core.errors import CrmBridgeError
from core.settings import get_settings
from core.tenants.sandbox_org import SANDBOX_CRMS, SandboxOrg, create_sandbox_org, list_sandbox_orgs
from pages._common import principal, show_error


def _show(org: SandboxOrg) -> None:
    with st.container(border=True, key=f"sandbox_org_{org.crm}"):
        st.markdown(f"**Sandbox {org.crm_name} — `{org.org}`**")
        st.markdown(f"- Instance URL: `{org.instance_url}`\n- IdP metadata URL: `{org.idp_metadata_url}`\n"
                    f"- IdP users (any email can be typed on its sign-in page): "
                    + ", ".join(f"`{u}`" for u in org.idp_users))
        st.markdown("Type these into the CRM account form and its secure credentials form:\n\n"
                    + "\n".join(f"- {f.title}: `{f.value}`" for f in org.fields))
        people = [f"- {u.username} ({u.role})" + (f": password `{u.password}`" if u.password else "")
                  + (f", CRM user id `{u.id}`" if u.id else "") for u in org.users]
        st.markdown("Users in the org (demo credentials for its sign-in and consent pages):\n\n" + "\n".join(people))


def render_sandbox_org(tenant_id: int) -> None:
    """The tenant's sandbox orgs and a button that makes one (demo mode only; nothing otherwise)."""
    settings = get_settings()
    if not settings.demo:
        return
    p = principal()
    with st.expander("Demo: a sandbox CRM org and IdP for this tenant", expanded=True):
        st.caption(
            "The CRM sandbox plays a new Salesforce org, Dynamics 365 environment or HubSpot portal and a "
            "SAML IdP for this tenant. Its sign-in and consent pages open at "
            f"{settings.sandbox_browser_url} (plain http on loopback, so no certificate warning); the APIs the "
            "console calls stay on https.")
        try:
            with session_scope() as s:
                orgs = list_sandbox_orgs(session=s, principal=p, tenant_id=tenant_id)
        except CrmBridgeError as exc:
            show_error(exc)
            orgs = []
        for org in orgs:
            _show(org)
        c1, c2 = st.columns([2, 1])
        crm = c1.selectbox("Sandbox CRM", list(SANDBOX_CRMS), format_func=SANDBOX_CRMS.__getitem__,
                           key=f"sandbox_crm_{tenant_id}")
        c2.write("")
        if c2.button("Create a sandbox org", key=f"sandbox_create_{tenant_id}"):
            try:
                with session_scope() as s:
                    made = create_sandbox_org(session=s, principal=p, tenant_id=tenant_id, crm=crm)
                st.session_state["onboarding_flash_info"] = f"Sandbox {made.crm_name} org {made.org} is ready."
                st.rerun()
            except CrmBridgeError as exc:
                show_error(exc)
