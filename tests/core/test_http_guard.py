"""Issue 14: body limits (Medium 8), anti-framing + CSP and the websocket Origin (Medium 9), foreign Host
(Low, DNS rebinding) — each attack against the app server.py builds (its routes behind its middleware)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from core.http_guard import ACS_BODY_LIMIT, FORM_BODY_LIMIT, UPLOAD_BODY_LIMIT, body_limit_for

PUBLIC = "http://127.0.0.1:8501"  # CRMBRIDGE_PUBLIC_URL's default
WS = "ws://127.0.0.1:8501/_stcore/stream"


async def _echo_ws(ws: WebSocket) -> None:  # stands in for Streamlit's /_stcore/stream
    await ws.accept()
    await ws.send_text("hello")
    await ws.close()


@pytest.fixture
def server_app(app_db):  # type: ignore[no-untyped-def]
    import server

    routes = [*server.collect_routes(), WebSocketRoute("/_stcore/stream", _echo_ws)]
    return Starlette(routes=routes, middleware=server.middleware())


@pytest.fixture
def client(server_app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(server_app, base_url=PUBLIC) as c:
        yield c


class Chunks:
    """A chunked body of ``total`` bytes that counts how much of it the server pulled."""

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.total, self.chunk, self.sent = total, chunk, 0

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < self.total:
            self.sent += self.chunk
            yield b"a" * self.chunk


async def _raw_post(app, path: str, body: Chunks, host: str = "127.0.0.1:8501") -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    """POST ``body`` as the ASGI server hands a chunked request over: one http.request message per
    chunk as it arrives, no Content-Length (TestClient would buffer the whole body first)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", host.encode()), (b"transfer-encoding", b"chunked"),
                         (b"content-type", b"application/x-www-form-urlencoded")],
             "client": ("203.0.113.9", 40000), "server": ("127.0.0.1", 8501)}
    chunks = iter(body)
    sent: list[dict] = []

    async def receive() -> dict:
        piece = next(chunks, None)
        if piece is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": piece, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_chunked_oversized_logout_is_refused_while_streaming(server_app):
    """The reported attack: a huge chunked POST to /auth/logout (900 MB took the console to 1.1 GB). It
    gets 413 once the form limit is passed: the rest (here 512 MB) is never read, let alone buffered."""
    import anyio

    body = Chunks(512 * 1024 * 1024)
    status, text = anyio.run(_raw_post, server_app, "/auth/logout", body)
    assert status == 413, text
    assert b"limit" in text
    assert body.sent <= FORM_BODY_LIMIT + body.chunk, f"server pulled {body.sent} bytes"


def test_chunked_oversized_saml_post_is_refused_while_streaming(server_app):
    import anyio

    body = Chunks(256 * 1024 * 1024)
    status, _ = anyio.run(_raw_post, server_app, "/sso/bigcorp/acs", body)
    assert status == 413
    assert body.sent <= ACS_BODY_LIMIT + body.chunk


def test_declared_oversized_body_is_refused_before_reading(server_app):
    """A Content-Length over the limit is answered 413 without pulling a single body message."""
    import anyio

    pulled: list[dict] = []
    sent: list[dict] = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/auth/login", "raw_path": b"/auth/login", "query_string": b"",
             "root_path": "", "client": ("203.0.113.9", 40000), "server": ("127.0.0.1", 8501),
             "headers": [(b"host", b"127.0.0.1:8501"), (b"content-length", str(FORM_BODY_LIMIT + 1).encode()),
                         (b"content-type", b"application/x-www-form-urlencoded")]}

    async def receive() -> dict:
        msg = {"type": "http.request", "body": b"a" * 65536, "more_body": True}
        pulled.append(msg)
        return msg

    async def send(message: dict) -> None:
        sent.append(message)

    anyio.run(server_app, scope, receive, send)
    assert sent[0]["status"] == 413 and pulled == []


@pytest.mark.parametrize("path", ["/auth/login", "/auth/logout", "/sso/bigcorp/acs", "/connect/abc"])
def test_every_route_has_a_limit_and_a_small_form_still_works(client, path):
    r = client.post(path, content=Chunks(ACS_BODY_LIMIT + 512 * 1024),
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413, (path, r.status_code)
    ok = client.post(path, data={"x": "y"}, follow_redirects=False)
    assert ok.status_code != 413


def test_acs_and_metadata_upload_get_a_bounded_larger_limit():
    from core.sso.routes import MAX_ACS_BODY

    assert ACS_BODY_LIMIT == MAX_ACS_BODY
    assert body_limit_for("/auth/logout") == FORM_BODY_LIMIT
    assert FORM_BODY_LIMIT < body_limit_for("/sso/bigcorp/acs") == ACS_BODY_LIMIT <= 8 * 1024 * 1024
    assert body_limit_for("/_stcore/upload_file/abc/def") == UPLOAD_BODY_LIMIT <= 8 * 1024 * 1024


def test_every_response_forbids_framing_and_carries_a_csp(client):
    for r in (client.get("/auth/login"), client.get("/healthz"), client.get("/no-such-page"),
              client.post("/auth/logout", content=b"x" * (FORM_BODY_LIMIT + 1))):
        assert r.headers["x-frame-options"] == "DENY", r.url
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        img = next(d for d in csp.split("; ") if d.startswith("img-src ")).split()[1:]
        assert set(img) == {"'self'", "data:", "blob:", "https://fonts.gstatic.com"}  # no remote image beacons


def test_websocket_from_a_foreign_origin_is_refused(client):
    for origin in ("http://127.0.0.1:9999", "http://localhost:8501", "https://evil.example", None):
        headers = {"origin": origin} if origin else {}
        with pytest.raises(WebSocketDisconnect) as exc, client.websocket_connect(WS, headers=headers):
            pass
        assert exc.value.code == 1008, origin
    with client.websocket_connect(WS, headers={"origin": PUBLIC}) as ws:
        assert ws.receive_text() == "hello"


def test_foreign_host_header_is_refused_dns_rebinding(server_app):
    """A rebinding page at http://attacker.example:8501 reaches the server with its own Host header."""
    with TestClient(server_app, base_url="http://attacker.example:8501") as evil:
        r = evil.get("/auth/login")
        assert r.status_code == 421
        assert "Demo mode" not in r.text and "password" not in r.text.lower()
        assert "127.0.0.1:8501" in r.text  # says where the console is
        assert evil.get("/healthz").status_code == 200  # probes address the pod by IP
    with TestClient(server_app, base_url="http://127.0.0.1:8502") as other_port:
        assert other_port.get("/auth/login").status_code == 421
    with TestClient(server_app, base_url=PUBLIC) as good:
        assert good.get("/auth/login").status_code == 200


def test_the_largest_secret_the_credentials_form_accepts_fits_the_form_limit():
    """The secure credentials form's textarea takes 64 Ki characters (a PEM key, a JSON key file);
    form-encoded, every one may become %XX."""
    from urllib.parse import urlencode

    worst = urlencode({"secret": "\n" * 65536, "csrf": "x" * 64, "next": "/" * 200})
    assert len(worst) < FORM_BODY_LIMIT
