"""The SSO step of a connect link: where the tenant has tested SSO, the link's app user signs in
through it before the link page shows or takes a submission. server.py hands ``connect_gate`` to
``core.connections.link_routes.connect_link_routes(sso_gate=...)`` (an explicit parameter, no hook)."""

from __future__ import annotations

from core.connections.link_routes import SsoGateRequest
from core.db import session_scope
from core.sso.connect import CONNECT_PASS_COOKIE, connect_gate_target, connect_pass_ok


def connect_gate(req: SsoGateRequest) -> str | None:
    """The SSO sign-in URL the user must pass first (coming back to ``req.link_url``), or None."""
    if connect_pass_ok(req.request.cookies.get(CONNECT_PASS_COOKIE), tenant_id=req.tenant_id,
                       email=req.app_user_email):
        return None
    with session_scope() as s:
        return connect_gate_target(session=s, tenant_id=req.tenant_id, app_user_email=req.app_user_email,
                                   link_url=req.link_url)
