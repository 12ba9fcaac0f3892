"""Streamlit entry: page config, the sign-in gate, role-based navigation."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit

import streamlit as st

from core.db import describe_db_failure, session_scope
from core.errors import SessionInvalid
from core.tenants.auth import principal_from_token
from core.web import SESSION_COOKIE
from pages._common import md, render_focus, same_tab_link

HERE = Path(__file__).resolve().parent

# (file, title, icon, roles that see it). A page whose file is absent is left out.
PAGES = (
    ("pages/overview.py", "Overview", ":material/home:", {"staff", "tenant_admin", "leadership"}),
    ("pages/onboarding.py", "Onboarding", ":material/rocket_launch:", {"staff"}),
    ("pages/tenants.py", "Tenants", ":material/domain:", {"staff"}),
    ("pages/tenant.py", "Tenant", ":material/settings:", {"staff", "tenant_admin"}),
    ("pages/sso.py", "SSO", ":material/key:", {"staff", "tenant_admin"}),
    ("pages/users_sync.py", "Users & sync", ":material/sync:", {"staff", "tenant_admin"}),
    ("pages/posture.py", "Posture", ":material/health_and_safety:", {"staff", "tenant_admin"}),
    ("pages/adoption.py", "Adoption", ":material/insights:", {"leadership", "staff"}),
    ("pages/vault.py", "Vault", ":material/lock:", {"staff"}),
    ("pages/accounts.py", "Console accounts", ":material/group:", {"staff", "tenant_admin"}),
    ("pages/alerts.py", "Alerts", ":material/notifications:", {"staff", "tenant_admin"}),
    ("pages/audit.py", "Audit log", ":material/history:", {"staff", "tenant_admin"}),
)

st.set_page_config(page_title="CRM Bridge", page_icon=":material/hub:", layout="wide")

def _here() -> str:
    """This page's path and query (the tenant in focus), for the sign-in to return to."""
    url = urlsplit(st.context.url or "/")
    return (url.path or "/") + (f"?{url.query}" if url.query else "")


token = st.context.cookies.get(SESSION_COOKIE)
try:
    with session_scope() as s:
        principal = principal_from_token(s, token)
except SessionInvalid as exc:
    st.session_state.pop("principal", None)
    reason = str(exc)

    def sign_in() -> None:
        st.title("CRM Bridge")
        st.info(reason)
        # in this tab (a new one left this tab showing the console), back to this address after sign-in:
        # a bookmark of /tenant?tenant=acme opens Acme once signed in
        same_tab_link("Sign in", "/auth/login?next=" + quote(_here(), safe="/"), primary=True)

    # Before sign-in the app has exactly one page: no sidebar list of pages/, and any address
    # (/tenants, /common, ...) shows this page (server.py also turns off pages/ discovery).
    # Each console page's address shows the sign-in too (a bookmark works after signing in).
    gate = [st.Page(sign_in, title="Sign in", icon=":material/login:", default=True)] + [
        st.Page(sign_in, title="Sign in", url_path=Path(f).stem) for f, *_ in PAGES if Path(f).stem != "overview"
    ]
    st.navigation(gate, position="hidden").run()
    st.stop()
except Exception as exc:  # signing the session in touches the database
    what = describe_db_failure(exc)
    if what is None:
        raise
    failure = what

    def database_problem() -> None:
        st.title("CRM Bridge")
        st.error(failure, icon=":material/database:")

    st.navigation([st.Page(database_problem, title="CRM Bridge", default=True)], position="hidden").run()
    st.stop()

st.session_state["principal"] = principal
with st.sidebar:
    st.caption(f"Signed in as **{md(principal.email)}** · {principal.role.replace('_', ' ')}")
    same_tab_link("Sign out", "/auth/logout")  # this tab: the sign-out page ends the session here


pages = [
    st.Page(str(HERE / f), title=title, icon=icon, default=(f == "pages/overview.py"))
    for f, title, icon, roles in PAGES
    if principal.role in roles and (HERE / f).exists()
]
page = st.navigation(pages)
render_focus(principal)  # the tenant in focus: in the address, the sidebar picker and the header
try:
    page.run()
except Exception as exc:  # a page's write hit a database that refuses writes: say what, not a traceback
    what = describe_db_failure(exc)
    if what is None:
        raise
    st.error(what, icon=":material/database:")

