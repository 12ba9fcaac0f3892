"""What every page shares: the acting principal, the one way to show an error, formatting."""

from __future__ import annotations

from datetime import datetime

import streamlit as st

from core.errors import CrmBridgeError
from core.tenants.access import Principal


def principal() -> Principal:
    """The principal dashboard.py resolved from the session cookie on this rerun."""
    p = st.session_state.get("principal")
    if not isinstance(p, Principal):
        st.error("You are not signed in. Open /auth/login to sign in.")
        st.stop()
    return p  # type: ignore[return-value]


def show_error(exc: CrmBridgeError) -> None:
    st.error(str(exc))


def ago(dt: datetime | None, now: datetime | None = None) -> str:
    if dt is None:
        return "never"
    from core.clock import utcnow

    secs = ((now or utcnow()) - dt).total_seconds()
    future = secs < 0
    secs = abs(secs)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= n:
            v = f"{int(secs // n)} {unit}"
            return f"in {v}" if future else f"{v} ago"
    return "just now"


def selected_tenant_id(p: Principal, *, key: str = "tenant_id") -> int | None:
    """The tenant this page works on: a tenant admin's own; for staff the tenant picked in the sidebar
    (the list comes from the core service, so scope is enforced there, not here)."""
    if p.is_tenant_admin:
        return p.tenant_id
    if not p.is_staff:
        return None
    from core.db import session_scope
    from core.tenants.service import list_tenants

    with session_scope() as s:
        rows, _ = list_tenants(session=s, principal=p, limit=5000)
    if not rows:
        st.sidebar.info("No tenants yet: create one on the Tenants page.")
        return None
    ids = [r.id for r in rows]
    names = {r.id: f"{r.name} ({r.slug})" for r in rows}
    current = st.session_state.get(key)
    index = ids.index(current) if current in ids else 0
    chosen = st.sidebar.selectbox("Tenant", ids, index=index, format_func=names.__getitem__, key="_tenant_picker")
    st.session_state[key] = chosen
    return chosen
