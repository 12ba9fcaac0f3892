"""ASGI launcher: the Streamlit console plus the Starlette routes beside it (sign-in/out, SAML SP,
OAuth callbacks, connect links, /healthz). Run with `python server.py` (make run does)."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from streamlit.runtime.pages_manager import PagesManager

from core.http_guard import GuardMiddleware, inline_scripts
from core.settings import get_settings

log = logging.getLogger("crmbridge.server")
HERE = Path(__file__).resolve().parent

# Each package that serves HTTP exposes `routes` in its routes module.
ROUTE_MODULES = (
    "core.tenants.routes",
    "core.connections.routes",
    "core.sso.routes",
    "core.accounts.routes",
    "core.alerts.routes",
)


def collect_routes() -> list[BaseRoute]:
    from core.connections.link_routes import connect_link_routes
    from core.sso.connect_gate import connect_gate

    # connect links: the SSO step is handed in (the CRM test is core.connections.testing's, by default)
    routes: list[BaseRoute] = connect_link_routes(sso_gate=connect_gate)
    for name in ROUTE_MODULES:
        routes.extend(importlib.import_module(name).routes)
    return routes


def _streamlit_inline_scripts() -> list[str]:
    """Streamlit's page runs inline scripts; the CSP allows exactly these by hash (core knows no UI)."""
    try:
        page = (Path(st.__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
    except OSError:
        return []
    return inline_scripts(page)


def middleware() -> list[Middleware]:
    """In front of every request, Streamlit's included: Host check, body limits, anti-framing + CSP,
    websocket Origin check (core.http_guard)."""
    return [Middleware(GuardMiddleware, inline=_streamlit_inline_scripts())]


def startup_checks() -> None:
    """Refuse to start on missing keys (never invent them outside demo mode) and sweep the vault."""
    settings = get_settings()
    settings.server_secret()
    from core.db import get_engine
    from core.vault.service import sweep_on_start

    sweep_on_start(get_engine())


def start_or_explain() -> None:
    """``startup_checks``, with a refusal told in one clear line (exit 1) instead of a traceback."""
    from sqlalchemy.exc import DBAPIError

    from core.db import corrupt_database_message
    from core.errors import CrmBridgeError

    try:
        startup_checks()
    except CrmBridgeError as exc:
        sys.stderr.write(f"error: the CRM Bridge console refuses to start: {exc}\n")
        raise SystemExit(1) from None
    except DBAPIError as exc:
        message = corrupt_database_message(exc)
        if message is None:
            raise
        sys.stderr.write(f"error: the CRM Bridge console refuses to start: {message}\n")
        raise SystemExit(1) from None


# Streamlit runs any file in pages/ by its address, without dashboard.py's sign-in gate, until some
# session calls st.navigation (its "pages directory" mode, set per process at the first session). Our
# pages are only ever reached through dashboard.py's st.navigation: turn that mode off before any session.
PagesManager.uses_pages_directory = False

app = st.App(str(HERE / "dashboard.py"), routes=collect_routes(), middleware=middleware())

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = get_settings()
    start_or_explain()
    app.run(config={
        "server.port": s.port,
        "server.address": s.bind_address,
        "server.headless": True,
        "browser.gatherUsageStats": False,
        "server.fileWatcherType": "none",
        "client.toolbarMode": "minimal",
        "server.maxUploadSize": 6,  # MB; core.http_guard refuses a larger upload while it streams
    })
