"""Issue 14 against the real server (core.runner → server.py), run first so nobody has signed in yet:
only the sign-in page exists before sign-in, the console carries anti-framing and a CSP that Streamlit
works under, its websocket refuses foreign origins, a foreign Host is refused, an oversized chunked body
gets 413."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Shooter, wait_streamlit

pytestmark = pytest.mark.e2e


def _nav_labels(page) -> list[str]:  # type: ignore[no-untyped-def]
    links = page.locator("[data-testid='stSidebarNav'] a")
    return [links.nth(i).inner_text().strip() for i in range(links.count())]


def test_before_sign_in_only_the_sign_in_page_exists(page, console):
    """After a restart, before anyone signs in, the sidebar listed every file of pages/ and ran them
    without the gate (Streamlit's pages-directory mode): /tenants, /vault, /common."""
    shot = Shooter(page, console.shots, "before-sign-in")
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    for path in ("/tenants", "/vault", "/common", "/audit", "/"):
        page.goto(f"{console.url}{path}")
        wait_streamlit(page)
        if path == "/common":  # not a page: Streamlit says so and runs the main page (the sign-in)
            page.get_by_text("Page not found").wait_for(timeout=15_000)
            shot("common")
            page.keyboard.press("Escape")
        page.get_by_role("link", name="Sign in").first.wait_for(timeout=15_000)
        shot(path.strip("/") or "root")
        assert _nav_labels(page) == [], path
        assert page.get_by_role("link", name="Sign in").count() == 1, path
        body = page.locator("[data-testid='stMain']").inner_text()
        assert "Traceback" not in body and "KeyError" not in body, path
        assert page.locator("[data-testid='stException']").count() == 0, path
    assert violations == [], "\n".join(violations)  # the CSP lets Streamlit run


def test_console_cannot_be_framed_and_has_a_csp(console):
    import httpx

    for path in ("/", "/auth/login", "/_stcore/health"):
        r = httpx.get(f"{console.url}{path}")
        assert r.headers.get("x-frame-options") == "DENY", path
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), path


def test_websocket_refuses_a_foreign_origin(console):
    import websockets
    from websockets.sync.client import connect

    ws_url = console.url.replace("http://", "ws://") + "/_stcore/stream"

    def attempt(origin: str) -> bool:
        try:
            with connect(ws_url, origin=origin, open_timeout=10):  # type: ignore[arg-type]
                return True
        except (websockets.exceptions.InvalidStatus, websockets.exceptions.ConnectionClosed):
            return False

    port = console.url.rsplit(":", 1)[1]
    # Streamlit itself lets any localhost origin on any port in.
    assert attempt("http://localhost:1") is False
    assert attempt("http://127.0.0.1:9") is False
    assert attempt("https://evil.example") is False
    assert attempt(f"http://127.0.0.1:{port}") is True


def test_foreign_host_and_oversized_chunked_body_are_refused(console):
    import httpx

    port = console.url.rsplit(":", 1)[1]
    r = httpx.get(f"{console.url}/auth/login", headers={"host": f"rebind.evil.example:{port}"})
    assert r.status_code == 421 and "demo-password" not in r.text
    assert httpx.get(f"{console.url}/healthz", headers={"host": "10.0.0.5:8501"}).status_code == 200

    def chunks():  # 200 MB, chunked, as fast as the server will take it
        for _ in range(200 * 16):
            yield b"a" * 65536

    try:
        r = httpx.post(f"{console.url}/auth/logout", content=chunks(), timeout=60,
                       headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413
    except httpx.HTTPError:
        pass  # the server answered 413 and closed the connection while the client was still sending
    assert httpx.get(f"{console.url}/healthz").status_code == 200
