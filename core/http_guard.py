"""One ASGI middleware in front of everything the server answers (the Streamlit console, its websocket,
and the Starlette routes beside it), installed by server.py through ``st.App(middleware=...)``:

- Host: a request whose Host header is not CRMBRIDGE_PUBLIC_URL's host:port is refused (421), so a
  DNS-rebinding page on another name cannot read the console. ``/healthz`` answers any Host (probes
  address the pod or 127.0.0.1; it says only ok / what failed).
- Request bodies: a limit per path enforced while the body streams in (Content-Length checked first, a
  chunked body counted as it arrives); past the limit the request gets 413 and nothing more is read.
- Anti-framing and a Content-Security-Policy on every HTTP response (Streamlit's pages too).
- Websocket: the Origin must be the public URL's origin (Streamlit itself lets any localhost origin in).

- A database error that escapes a route (disk full, read-only, unreachable) becomes a 503 page saying
  what failed and the fix, not a bare 500.

Nothing here touches the database; the limits are module constants so tests and SECURITY.md name them.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from core.settings import get_settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KIB = 1024
MIB = 1024 * KIB
# every form: sign-in, sign-out, invitations, connect links, credentials (a secret textarea holds up to
# 64 Ki characters, which form-encoding can triple)
FORM_BODY_LIMIT = 256 * KIB
ACS_BODY_LIMIT = 4 * MIB + 16 * KIB  # a 2 MiB base64 SAML response form-encoded (= core.sso.routes.MAX_ACS_BODY)
UPLOAD_BODY_LIMIT = 6 * MIB  # Streamlit's file upload (IdP metadata XML; core.sso.fetch caps a document at 5 MiB)
# (path pattern, limit); the first match wins, FORM_BODY_LIMIT otherwise.
BODY_LIMITS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"^/sso/[^/]+/acs$"), ACS_BODY_LIMIT),
    (re.compile(r"^/_stcore/upload_file(/|$)"), UPLOAD_BODY_LIMIT),
)
log = logging.getLogger(__name__)
HOST_EXEMPT_PATHS = frozenset({"/healthz"})

# The inline scripts the policy lets run, by hash: Streamlit's index.html has one; the SAML POST
# binding's auto-submitting form (core.sso.routes) the other.
SAML_AUTOSUBMIT_SCRIPT = "document.getElementById('saml').submit()"


def _script_hash(body: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


def inline_scripts(html: str) -> list[str]:
    """The inline ``<script>`` bodies of an HTML page, to allow by hash (the web layer passes the UI's page)."""
    return re.findall(r"<script>(.*?)</script>", html, flags=re.S)


def content_security_policy(inline: Sequence[str] = ()) -> str:
    """``inline``: the inline scripts the UI's own page runs (server.py passes Streamlit's): core knows no UI."""
    hashes = " ".join(_script_hash(s) for s in [*inline, SAML_AUTOSUBMIT_SCRIPT])
    # 'unsafe-eval': Streamlit's bundle (protobuf decoding, charts) compiles functions at run time.
    # 'unsafe-inline' styles: Streamlit's emotion CSS-in-JS and the HTML routes' <style>.
    return "; ".join((
        "default-src 'self'",
        f"script-src 'self' {hashes} 'unsafe-eval'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob: https://fonts.gstatic.com",  # st.set_page_config's material favicon
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "frame-src 'self' blob: data:",
        "object-src 'none'",
        "base-uri 'self'",
        "frame-ancestors 'none'",
    ))


def body_limit_for(path: str) -> int:
    for pattern, limit in BODY_LIMITS:
        if pattern.match(path):
            return limit
    return FORM_BODY_LIMIT


def _default_port(scheme: str) -> int:
    return 443 if scheme in ("https", "wss") else 80


def public_origin() -> tuple[str, str, int]:
    """(scheme, host, port) of CRMBRIDGE_PUBLIC_URL, host lower-cased."""
    parts = urlsplit(get_settings().public_url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _default_port(scheme)


def _split_host(value: str, scheme: str) -> tuple[str, int] | None:
    """'Host' or the netloc of an Origin → (host, port); None when unreadable."""
    try:
        parts = urlsplit(f"//{value.strip()}")
        return (parts.hostname or "").lower(), parts.port or _default_port(scheme)
    except ValueError:
        return None


def host_allowed(host_header: str | None) -> bool:
    scheme, host, port = public_origin()
    if not host_header:
        return False
    return _split_host(host_header, scheme) == (host, port)


def origin_allowed(origin: str | None) -> bool:
    if not origin:
        return False
    scheme, host, port = public_origin()
    try:
        parts = urlsplit(origin.strip())
        o_scheme = parts.scheme.lower()
        o_host, o_port = (parts.hostname or "").lower(), parts.port or _default_port(o_scheme)
    except ValueError:
        return False
    return (o_scheme, o_host, o_port) == (scheme, host, port)


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def _plain(send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), (b"connection", b"close"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _db_failure_page(send: Send, what: str) -> None:
    from core.web import esc

    body = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Database problem · CRM Bridge"
            f"</title></head><body><h1>The database refused this change</h1><p role=alert>{esc(what)}</p>"
            "<p>An operator can check <code>/healthz</code>.</p></body></html>").encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"), (b"retry-after", b"60")]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """See the module docstring. ``csp`` is computed once per process."""

    def __init__(self, app: ASGIApp, *, inline: Sequence[str] = ()) -> None:
        self.app = app
        self.csp = content_security_policy(inline).encode()

    def _security_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-frame-options", b"DENY"),
            (b"content-security-policy", self.csp),
            (b"x-content-type-options", b"nosniff"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not host_allowed(_header(scope, b"host")) or not origin_allowed(_header(scope, b"origin")):
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})
            return
        await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path") or "/"
        security = self._security_headers()

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers") or ()}
                message["headers"] = [*(message.get("headers") or ()),
                                      *((k, v) for k, v in security if k not in present)]
            await send(message)

        if path not in HOST_EXEMPT_PATHS and not host_allowed(_header(scope, b"host")):
            scheme, host, port = public_origin()
            await _plain(send_secured, 421, f"This server answers only for {host}:{port} (CRMBRIDGE_PUBLIC_URL); "
                         "open the console at its public address.")
            return

        limit = body_limit_for(path)
        length = _header(scope, b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            await _plain(send_secured, 413, f"The request body is over the limit of {limit} bytes for {path}.")
            return

        received = 0
        too_large = False
        started = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body") or b"")
                if received > limit:
                    too_large = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started, replaced
            if too_large and not started:
                # The app caught the overflow and answered something else: the answer is 413.
                if not replaced:
                    replaced = True
                    await _plain(send_secured, 413, f"The request body is over the limit of {limit} bytes.")
                return
            if replaced:
                return
            if message["type"] == "http.response.start":
                started = True
            await send_secured(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not started and not replaced:
                await _plain(send_secured, 413, f"The request body is over the limit of {limit} bytes.")
        except Exception as exc:
            # A database that refuses writes (disk full, read-only, unreachable): say what failed
            # instead of a bare 500. Anything else goes on to the server's error handling.
            from core.db import describe_db_failure

            what = describe_db_failure(exc)
            if what is None or started or replaced:
                raise
            log.error("%s %s: %s", scope.get("method"), path, what)
            await _db_failure_page(send_secured, what)
