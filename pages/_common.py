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
from dataclasses import dataclass
from datetime import datetime

import streamlit as st

from core.errors import CrmBridgeError
from core.tenants.access import Principal

# The ASCII punctuation Markdown (CommonMark + GFM + Streamlit's extensions) can build on: links and
# images ([]()!), raw HTML and autolinks (<>&), URL and email autolink literals (: . @), emphasis and
# code (*_~`), headings, lists, tables and rules (# + - = | >), math ($) and the escape itself.
_MD_PUNCTUATION = re.compile(r"([\\`*_~\[\]()!<>&#|$:.@+=-])")


def crm_slugs() -> list[str]:
    """Every CRM the catalog knows (a new CRM appears here with its catalog entry)."""
    from core.providers.catalog import get_catalog

    return get_catalog().slugs()


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
    """The tenant this page works on: the tenant in focus (see ``tenant_focus``)."""
    return focus_tenant_id(p)


# --- the tenant in focus ----------------------------------------------------------------------------------
# One tenant is in focus per browser tab. It lives in the address (``?tenant=<slug>``), so a reload, a
# bookmark and every hand-off route (the credentials form's "Back to the console", the SSO test login's
# return, the wizard's links) keep it; this session's state remembers it across page switches (the
# sidebar's links drop the query string). Only the user changes it: with the sidebar's picker (staff) or
# by opening an address that names another tenant. core.tenants.service.resolve_focus enforces scope.
FOCUS_PARAM = "tenant"
FOCUS_STATE = "tenant_id"  # the id of the tenant in focus (also what page tests set)
PICKER_KEY = "_tenant_picker"


@dataclass(frozen=True)
class Focus:
    id: int
    slug: str
    name: str


def _focus_slug_from_state(p: Principal) -> str | None:
    """The slug remembered for this session (after a page switch the address has no ?tenant=)."""
    from core.db import session_scope
    from core.tenants.service import get_tenant, tenant_choices

    remembered = st.session_state.get(FOCUS_STATE)
    with session_scope() as s:
        if isinstance(remembered, int):
            try:
                return get_tenant(session=s, principal=p, tenant_id=remembered).slug
            except CrmBridgeError:
                pass  # gone or out of scope: fall back to the first tenant
        if p.is_staff:
            first = tenant_choices(session=s, principal=p)[:1]
            return first[0].slug if first else None
    return None


def tenant_focus(p: Principal) -> Focus | None:
    """The tenant in focus, resolved from the address through core's scope check. An address naming a
    tenant this principal may not open (or none at all) shows why and stops the page: the focus is
    never swapped for another tenant in silence. None: no tenant to focus on (leadership, no tenants)."""
    from core.db import session_scope
    from core.tenants.service import resolve_focus

    if p.is_leadership:
        # Leadership never has a tenant's data in focus. On the Adoption page ``?tenant=`` points at one
        # tenant's row of the cross-tenant aggregates (core.posture.adoption, scoped there): read by that
        # page only, never resolved into a tenant here.
        return None
    asked = st.query_params.get(FOCUS_PARAM)
    slug = asked or _focus_slug_from_state(p)
    try:
        with session_scope() as s:
            tenant = resolve_focus(session=s, principal=p, slug=slug)
            focus = Focus(int(tenant.id), tenant.slug, tenant.name) if tenant is not None else None  # type: ignore[arg-type]
    except CrmBridgeError as exc:
        st.error(str(exc), icon=":material/block:")
        st.stop()
    if focus is None:
        return None
    st.session_state[FOCUS_STATE] = focus.id
    if st.query_params.get(FOCUS_PARAM) != focus.slug:
        st.query_params[FOCUS_PARAM] = focus.slug  # the address names the tenant on the page
    return focus


def focus_tenant_id(p: Principal) -> int | None:
    f = tenant_focus(p)
    if f is None and p.is_staff:
        st.info("No tenants yet: create one on the Tenants page.")
    return f.id if f is not None else None


def choose_focus(slug: str | None) -> None:
    """The user picked another tenant: put it in the address (and so in focus). Clearing the picker
    changes nothing: the tenant in focus stays until another one is picked."""
    if not slug:
        return
    st.query_params[FOCUS_PARAM] = slug
    st.query_params.pop("step", None)  # the wizard's step belongs to the tenant that was in focus


def render_focus(p: Principal) -> Focus | None:
    """dashboard.py, on every page: the sidebar picker (staff) and the header naming the tenant in focus."""
    focus = tenant_focus(p)
    if p.is_staff:
        from core.db import session_scope
        from core.tenants.service import tenant_choices

        with session_scope() as s:
            choices = tenant_choices(session=s, principal=p)
        slugs = [c.slug for c in choices]
        names = {c.slug: f"{c.name} ({c.slug})" for c in choices}
        if focus is not None and focus.slug in names:
            st.session_state[PICKER_KEY] = focus.slug  # follows the address (a hand-off, a reload)
        if slugs:
            st.sidebar.selectbox("Tenant", slugs, format_func=names.__getitem__, key=PICKER_KEY,
                                 index=None, placeholder="Choose a tenant",
                                 on_change=lambda: choose_focus(st.session_state[PICKER_KEY]))
    if focus is not None:
        st.caption(f":material/domain: Tenant in focus: **{md(focus.name)}** · {md_code(focus.slug)}")
    return focus


def page_link(page: str, label: str, *, tenant: str | None = None, icon: str | None = None,
              **params: str) -> None:
    """A link to another console page (``pages/sso.py``) with ``tenant`` in focus there (and any other
    parameters). Outside dashboard.py's navigation (a page run on its own) it is a plain link."""
    from urllib.parse import urlencode

    from streamlit.errors import StreamlitAPIException

    query = dict(params)
    if tenant:
        query[FOCUS_PARAM] = tenant
    try:
        st.page_link(page, label=label, icon=icon, query_params=query or None)
    except StreamlitAPIException:
        stem = page.rsplit("/", 1)[-1].removesuffix(".py")
        st.markdown(f"[{label}](/{stem}{'?' + urlencode(query) if query else ''})")


def same_tab_link(label: str, url: str, *, primary: bool = False) -> None:
    """A link to a route beside the console (sign-in, sign-out, secure forms, test logins) that opens in
    this tab: st.link_button always opens a new one, which left the old tab showing data."""
    from html import escape

    style = ("display:inline-block;padding:0.4rem 0.9rem;border-radius:0.5rem;text-decoration:none;"
             + ("background:#ff4b4b;color:white;" if primary else "border:1px solid #d0d3da;color:inherit;"))
    st.html(f'<a href="{escape(url, quote=True)}" style="{style}">{escape(label)}</a>')


def csv_download(rows: list[dict[str, object]], file_name: str, *, label: str = "Export CSV",
                 key: str | None = None) -> None:
    """CSV export of a table as shown (spreadsheet formulas neutralised, as the audit export does)."""
    from core.export import to_csv

    if rows:
        st.download_button(label, to_csv(rows), file_name=file_name, mime="text/csv", key=key or f"csv_{file_name}",
                           icon=":material/download:")


def evidence_table(rows: list[tuple[str, str, str | None, str | None]], *, first: str = "Evidence") -> None:
    """Evidence with its source: the vendor document's title and a link to it (never an internal path),
    long values wrapped rather than cut off."""
    from core.labels import source_title, source_url

    st.dataframe(
        [{first: label, "Value": value, "Source": source_title(src), "Link": source_url(url)}
         for label, value, src, url in rows],
        hide_index=True, width="stretch",
        column_config={first: st.column_config.TextColumn(width="medium"),
                       "Value": st.column_config.TextColumn(width="large"),
                       "Source": st.column_config.TextColumn(width="large"),
                       "Link": st.column_config.LinkColumn(width="small", display_text="open")},
    )
