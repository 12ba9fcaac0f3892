"""The one alerts route: revealing a webhook's signing secret once, on a plain HTML page (never through
Streamlit). GET shows what will happen; the POST (CSRF-protected, bound to the session) reveals it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from core.alerts import service
from core.alerts.channels import SIGNATURE_HEADER
from core.db import session_scope
from core.errors import CrmBridgeError, SessionInvalid
from core.tenants import auth
from core.web import SESSION_COOKIE, csrf_ok, csrf_token_for, esc, html_page


def _binding(token: str, channel_id: int) -> str:
    return f"webhook-secret|{channel_id}|{token[:16]}"


def _problem(message: str, status: int) -> Response:
    return html_page("Webhook secret", f"<h1>Webhook signing secret</h1><p class=error role=alert>{esc(message)}</p>"
                     "<p><a href=/alerts>Back to Alerts</a></p>", status)


async def secret_get(request: Request) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    channel_id = int(request.path_params["channel_id"])
    try:
        with session_scope() as s:
            p = auth.principal_from_token(s, token)
            row = service.get_channel(session=s, principal=p, channel_id=channel_id)
    except SessionInvalid as exc:
        return _problem(str(exc), 401)
    except CrmBridgeError as exc:
        return _problem(str(exc), 404)
    if row.kind != "webhook":
        return _problem("No such webhook channel in your scope.", 404)
    assert token is not None
    if not row.secret_to_reveal:
        return _problem("The signing secret was already shown once: rotate it on the Alerts page to get a new one.",
                        410)
    body = f"""<h1>Webhook signing secret</h1>
<p>Channel <b>{esc(row.name)}</b> posts to <code>{esc(row.target)}</code>. Each request carries
<code>{SIGNATURE_HEADER}: t=&lt;unix time&gt;,v1=&lt;hex&gt;</code>, where v1 is HMAC-SHA256 of
<code>"&lt;t&gt;." + body</code> under this secret.</p>
<p>The secret is shown <b>once</b>: copy it into the receiver's configuration right away.</p>
<form method=post><input type=hidden name=csrf value="{csrf_token_for(_binding(token, channel_id))}">
<button type=submit>Show the secret</button></form>"""
    return html_page("Webhook secret", body)


async def secret_post(request: Request) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    channel_id = int(request.path_params["channel_id"])
    form = await request.form()
    if not token or not csrf_ok(_binding(token, channel_id), str(form.get("csrf") or "")):
        return _problem("The form expired or was not sent from this page: reload it and try again.", 400)
    try:
        with session_scope() as s:
            p = auth.principal_from_token(s, token)
            secret = service.reveal_webhook_secret(session=s, principal=p, channel_id=channel_id)
    except SessionInvalid as exc:
        return _problem(str(exc), 401)
    except CrmBridgeError as exc:
        return _problem(str(exc), 400)
    return html_page("Webhook secret", f"<h1>Webhook signing secret</h1><p><code>{esc(secret)}</code></p>"
                     "<p class=note>This page will not show it again.</p><p><a href=/alerts>Back to Alerts</a></p>")


routes: list[BaseRoute] = [
    Route("/alerts/webhooks/{channel_id:int}/secret", secret_get, methods=["GET"]),
    Route("/alerts/webhooks/{channel_id:int}/secret", secret_post, methods=["POST"]),
]
