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
