"""What every page shares: the acting principal, the one way to show an error, formatting, and the
one way to put tenant-supplied text into anything Streamlit renders as Markdown.

Tenant-supplied strings (tenant names, CRM account labels and instance URLs, IdP entity ids and SSO
URLs, user names and emails, alert channel names, audit details, CRM and IdP error texts…) reach
pages from customers and their IdPs and CRMs. ``st.markdown``, ``st.caption``, ``st.info`` and the
other alerts, titles, expander, tab, button and metric labels all render Markdown (links, images,
autolinked URLs and emails, Streamlit's ``:color[]`` and ``$math$``), so every such value goes through
``md()`` (running text) or ``md_code()`` (a value shown as code). Table cells (st.dataframe) are plain
text and need neither.
"""

from __future__ import annotations

import re
from datetime import datetime

import streamlit as st

from core.errors import CrmBridgeError
from core.tenants.access import Principal

# The ASCII punctuation Markdown (CommonMark + GFM + Streamlit's extensions) can build on: links and
# images ([]()!), raw HTML and autolinks (<>&), URL and email autolink literals (: . @), emphasis and
# code (*_~`), headings, lists, tables and rules (# + - = | >), math ($) and the escape itself.
_MD_PUNCTUATION = re.compile(r"([\\`*_~\[\]()!<>&#|$:.@+=-])")


def md(value: object) -> str:
    """``value`` as literal text inside Markdown: the punctuation Markdown builds on backslash-escaped
    (CommonMark allows escaping any ASCII punctuation), so no link, image, autolink (``https://``, ``www.``,
    ``a@b.c``), raw HTML, emphasis, ``:color[…]`` or ``$math$`` can form; line breaks become spaces
    (no headings, lists or code blocks). It renders exactly as the original characters."""
    return _MD_PUNCTUATION.sub(r"\\\1", " ".join(str(value).split()))


def md_code(value: object) -> str:
    """``value`` as an inline code span (backslashes are literal inside code, so ``md`` does not fit
    there): fenced with one more backtick than the longest run inside it, so it cannot close early."""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if text else "` `"


def principal() -> Principal:
    """The principal dashboard.py resolved from the session cookie on this rerun."""
    p = st.session_state.get("principal")
    if not isinstance(p, Principal):
        st.error("You are not signed in. Open /auth/login to sign in.")
        st.stop()
    return p  # type: ignore[return-value]


def show_error(exc: CrmBridgeError) -> None:
    st.error(md(exc))  # messages quote tenant-supplied names and the CRM's or IdP's own words


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
