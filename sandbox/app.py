"""The sandbox ASGI app: every vendor module's routes plus the ``/_sandbox`` admin API.

    app = create_app("data/demo/sandbox.yaml", seed=7)

Vendor modules (``sandbox.salesforce``, ``sandbox.dynamics``, ``sandbox.hubspot``, ``sandbox.idp``)
are imported lazily; one that does not exist yet is skipped. Each exposes
``routes(state) -> list[BaseRoute]`` (see sandbox/state.py).

Admin API (loopback only, like the whole sandbox; JSON in and out):

    GET    /_sandbox/health                        {"ok": true, "vendors": [...], "seed": n}
    POST   /_sandbox/reset                         reload the scenario, clear faults and sessions
    GET    /_sandbox/orgs/{org}                    each vendor's view of the org + runtime counters
    GET    /_sandbox/faults/{org}                  current faults
    POST   /_sandbox/faults/{org}                  merge {latency_ms, error_rate, error_status,
                                                   quota_exhausted, pause_after_batch, corrupt}
    DELETE /_sandbox/faults/{org}                  clear every fault
    POST   /_sandbox/faults/{org}/expire-sessions  every session/token issued so far is invalid
    POST   /_sandbox/faults/{org}/release          paused write batches continue (pause removed)
    GET    /_sandbox/faults/{org}/wait-paused?timeout=10   blocks until a batch is paused
    POST   /_sandbox/provision                     a new org + IdP for a console tenant (sandbox/provision.py)
    GET    /_sandbox/provision/{tenant}            what was provisioned for it

``browser_app(app)`` is the same sandbox restricted to the pages a person's browser opens (IdP sign-in,
OAuth consent/install pages); ``python -m sandbox --browser-port`` serves it over plain http on loopback
so an ordinary browser opens them without a certificate warning, while every API stays HTTPS.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sandbox.state import VENDOR_SECTIONS, SandboxState, ScenarioError

log = logging.getLogger("sandbox")


def _vendor_routes(state: SandboxState) -> tuple[list[BaseRoute], list[str]]:
    routes: list[BaseRoute] = []
    loaded: list[str] = []
    for name in VENDOR_SECTIONS:
        module_name = f"sandbox.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                log.info("sandbox: %s not present, skipped", module_name)
                continue
            raise
        routes.extend(module.routes(state))
        loaded.append(name)
    return routes, loaded


def _admin_routes(state: SandboxState, vendors: list[str]) -> list[BaseRoute]:
    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "vendors": vendors, "seed": state.seed})

    async def reset(request: Request) -> JSONResponse:
        state.reset()
        return JSONResponse({"ok": True})

    async def org(request: Request) -> JSONResponse:
        return JSONResponse(state.inspect(request.path_params["org"]))

    async def faults(request: Request) -> JSONResponse:
        key = request.path_params["org"]
        if request.method == "DELETE":
            state.clear_faults(key)
        elif request.method == "POST":
            body: dict[str, Any] = await request.json() if await request.body() else {}
            try:
                state.set_faults(key, **body)
            except ScenarioError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(state.faults(key).public())

    async def expire(request: Request) -> JSONResponse:
        return JSONResponse({"epoch": state.expire_sessions(request.path_params["org"])})

    async def release(request: Request) -> JSONResponse:
        return JSONResponse({"released": state.release(request.path_params["org"])})

    async def wait_paused(request: Request) -> JSONResponse:
        timeout = min(float(request.query_params.get("timeout", "10")), 60.0)
        paused = await state.wait_paused(request.path_params["org"], timeout)
        return JSONResponse({"paused": paused})

    return [
        Route("/_sandbox/health", health),
        Route("/_sandbox/reset", reset, methods=["POST"]),
        Route("/_sandbox/orgs/{org}", org),
        Route("/_sandbox/faults/{org}", faults, methods=["GET", "POST", "DELETE"]),
        Route("/_sandbox/faults/{org}/expire-sessions", expire, methods=["POST"]),
        Route("/_sandbox/faults/{org}/release", release, methods=["POST"]),
        Route("/_sandbox/faults/{org}/wait-paused", wait_paused),
    ]


def create_app(
    scenario: str | Path | dict[str, Any], *, seed: int | None = None, console_url: str | None = None,
    browser_url: str | None = None,
) -> Starlette:
    """Build the sandbox for ``scenario`` (a YAML path or a dict). ``seed`` drives injected faults;
    ``console_url`` fills ``${CONSOLE_URL}`` in the scenario; ``browser_url`` is where browser pages are
    served over plain http (IdP metadata points its SSO URL there)."""
    from sandbox import provision

    state = SandboxState(scenario, seed=seed, console_url=console_url, browser_url=browser_url)
    vendor_routes, vendors = _vendor_routes(state)
    app = Starlette(routes=_admin_routes(state, vendors) + provision.routes(state) + vendor_routes)
    app.state.sandbox = state
    return app


#: the pages a person's browser opens: the IdP's sign-in page and its form, and the OAuth consent /
#: app-install pages (Salesforce at login.salesforce.com or My Domain, HubSpot's install page)
BROWSER_PATHS = re.compile(
    r"^/(idp/[^/]+/(sso|login)|(salesforce/[^/]+/)?services/oauth2/authorize|hubspot/oauth/authorize)$"
)


def browser_app(app: ASGIApp) -> ASGIApp:
    """``app`` restricted to BROWSER_PATHS: every API (tokens, SOAP, REST, admin) answers 404 here."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not BROWSER_PATHS.match(scope.get("path", "")):
            response = PlainTextResponse(
                "Only the sign-in and consent pages are served over http here; APIs are on the sandbox's "
                "https port.", status_code=404)
            await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return wrapped
