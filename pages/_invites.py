"""Shared page pieces for console accounts: show an invitation's outcome, and invite a tenant's admin
(used by the onboarding wizard to hand the credential and SSO steps to the tenant)."""

from __future__ import annotations

import streamlit as st

from core.accounts.service import InviteResult, invite_account
from core.db import session_scope
from core.errors import CrmBridgeError
from pages._common import md, principal, show_error


def show_invite_result(result: InviteResult) -> None:
    if result.emailed:
        st.success(f"Invitation emailed to {md(result.email)}. The link works once, for 3 days.")
    else:
        st.warning(f"The invitation for {md(result.email)} is valid but the email could not be sent "
                   f"({md(result.error)}). Send them this link another way — it is shown only now:")
        st.code(result.link_for_manual_delivery or "", language=None)


def render_invite_admin(tenant_id: int) -> None:
    """Invite the tenant's admin: they set a password (or sign in by the tenant's SSO once tested)."""
    p = principal()
    with st.form(f"invite_admin_{tenant_id}", clear_on_submit=True):
        email = st.text_input("Admin's email", max_chars=254)
        name = st.text_input("Admin's name (optional)", max_chars=200)
        if st.form_submit_button("Invite the tenant's admin"):
            try:
                with session_scope() as s:
                    result = invite_account(session=s, principal=p, email=email, role="tenant_admin",
                                            tenant_id=tenant_id, name=name)
                show_invite_result(result)
            except CrmBridgeError as exc:
                show_error(exc)
