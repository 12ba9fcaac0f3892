"""Shared page piece: a tenant's SSO state for the onboarding wizard (import and test live on the SSO page)."""

from __future__ import annotations

import streamlit as st

from core.db import session_scope
from core.errors import CrmBridgeError
from core.sso.metadata import get_status
from core.tenants.service import get_tenant
from pages._common import ago, md, md_code, page_link, principal, same_tab_link, show_error


def render_sso_status(tenant_id: int) -> None:
    p = principal()
    try:
        with session_scope() as s:
            status = get_status(session=s, principal=p, tenant_id=tenant_id)
            slug = get_tenant(session=s, principal=p, tenant_id=tenant_id).slug
    except CrmBridgeError as exc:
        show_error(exc)
        return
    # the SSO page opens on this same tenant (?tenant=): never another customer's IdP import
    if not status.configured:
        st.info("No IdP metadata yet: import it (upload or URL) on the SSO page and read its lint.")
        page_link("pages/sso.py", "Open the SSO page for this tenant", icon=":material/key:", tenant=slug)
        return
    st.markdown(f"IdP **{md(status.idp_entity_id)}** · SSO endpoint {md_code(status.sso_url)} "
                f"({md(status.sso_binding)})")
    if not status.sp.certs:
        st.warning("No SP keys yet: generate them on the SSO page (Our service provider) before giving the IdP "
                   "our SP metadata.")
    if status.tested:
        st.success(f"Test login passed {ago(status.tested_at)}.")
    elif status.last_test_ok is False:
        st.error("The last test login failed: its trace on the SSO page says which check failed and how to fix it.")
    else:
        st.warning("Metadata imported; the test login has not been run yet.")
    page_link("pages/sso.py", "Open the SSO page for this tenant", icon=":material/key:", tenant=slug)
    same_tab_link("Run a test login", f"/sso/{slug}/test")
