"""/healthz, and the console principal of a request for other packages' routes.

Sign-in and sign-out live with the console accounts (``core.accounts.routes``).
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core.db import get_engine, session_scope
from core.errors import SessionInvalid
from core.tenants import auth
from core.web import (
    SESSION_COOKIE,
)

log = logging.getLogger(__name__)


async def healthz(request: Request) -> Response:
    """ok only when the database answers AND accepts a write (the probe row is rewritten and
    committed); otherwise 503 naming what failed."""
    from starlette.concurrency import run_in_threadpool

    from core.clock import utcnow
    from core.db import describe_db_failure
    from core.tenants.models import HealthProbe

    def check() -> tuple[str, str | None]:
        try:
            with get_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - health reports any database failure
            return "unreachable", describe_db_failure(exc) or type(exc).__name__
        try:
            with session_scope() as s:
                probe = s.get(HealthProbe, 1) or HealthProbe(id=1, checked_at=utcnow())
                probe.checked_at, probe.checks = utcnow(), probe.checks + 1
                s.add(probe)
        except Exception as exc:  # noqa: BLE001
            return "write_failed", describe_db_failure(exc) or f"the database refused a write ({type(exc).__name__})"
        return "ok", None

    state, error = await run_in_threadpool(check)
    if state != "ok":
        log.warning("healthz: database %s: %s", state, error)
        return JSONResponse({"status": "error", "database": state, "error": error}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})


def principal_from_request(request: Request):  # type: ignore[no-untyped-def]
    """For other routes: the console principal of this request, or None."""
    token = request.cookies.get(SESSION_COOKIE)
    try:
        with session_scope() as s:
            return auth.principal_from_token(s, token)
    except SessionInvalid:
        return None


routes: list[BaseRoute] = [
    Route("/healthz", healthz, methods=["GET"]),
]
