"""Shared page piece: add an app user to a tenant."""

from __future__ import annotations

import streamlit as st

from core.db import session_scope
from core.errors import CrmBridgeError
from core.tenants.access import Principal
from core.tenants.service import create_app_user
from pages._common import md, show_error


def render_add_user(p: Principal, tenant_id: int, *, key: str = "add_user") -> None:
    flash = st.session_state.pop(f"{key}_flash", None)
    if flash:
        st.success(md(flash))
    with st.form(key, clear_on_submit=True):
        c1, c2 = st.columns(2)
        email = c1.text_input("Email", max_chars=254)
        name = c2.text_input("Name", max_chars=200)
        if st.form_submit_button("Add user"):
            try:
                with session_scope() as s:
                    create_app_user(session=s, principal=p, tenant_id=tenant_id, data={"email": email, "name": name})
                # rerun so every list on the page (and "no user yet") shows the new user at once
                st.session_state[f"{key}_flash"] = f"Added {email}."
                st.rerun()
            except CrmBridgeError as exc:
                show_error(exc)
