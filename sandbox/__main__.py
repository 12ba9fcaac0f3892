"""``python -m sandbox``: serve the CRM sandbox over HTTPS on loopback.

    python -m sandbox --port 8502 --scenario data/demo/sandbox.yaml --tls-dir data/sandbox-tls

Prints ``SANDBOX READY https://127.0.0.1:<port> <ca_file>`` on stdout once the socket listens (tests
read that line; ``--port 0`` picks a free port). Clients must trust ``<tls-dir>/ca.pem``.

``--browser-port N`` also serves the browser-facing pages (IdP sign-in, OAuth consent) over plain http
on loopback, where browsers treat ``http://127.0.0.1`` as a secure context and show no certificate
warning; the IdP metadata then points its SSO URL there. ``--console-url`` is the console's public URL
(``${CONSOLE_URL}`` in the scenario: the OAuth callback URLs the orgs' apps list).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCENARIO = ROOT / "data" / "demo" / "sandbox.yaml"
DEFAULT_TLS_DIR = ROOT / "data" / "sandbox-tls"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: str = "127.0.0.1",
    port: int = 8502,
    scenario: str | Path = DEFAULT_SCENARIO,
    tls_dir: str | Path = DEFAULT_TLS_DIR,
    *,
    seed: int | None = None,
    log_level: str = "warning",
    browser_port: int | None = None,
    console_url: str | None = None,
) -> None:
    """Run the sandbox until interrupted. Refuses non-loopback hosts: it holds demo passwords."""
    import uvicorn

    from sandbox.app import browser_app, create_app
    from sandbox.tls import ensure_tls

    if not _loopback(host):
        raise SystemExit(f"the sandbox binds loopback only (got {host!r}): use 127.0.0.1")
    files = ensure_tls(Path(tls_dir))
    # IdP keys and provisioned orgs survive restarts (see sandbox.idp and sandbox.state)
    os.environ.setdefault("SANDBOX_STATE_DIR", str(tls_dir))
    shown = f"[{host}]" if ":" in host else host
    sock = _listen(host, port)
    actual = sock.getsockname()[1]
    browser_sock = _listen(host, browser_port) if browser_port is not None else None
    browser_url = f"http://{shown}:{browser_sock.getsockname()[1]}" if browser_sock is not None else None
    app = create_app(scenario, seed=seed, console_url=console_url, browser_url=browser_url)
    server = uvicorn.Server(uvicorn.Config(
        app, ssl_certfile=str(files.cert_file), ssl_keyfile=str(files.key_file),
        log_level=log_level, lifespan="off", access_log=False,
    ))
    print(f"SANDBOX READY https://{shown}:{actual} {files.ca_file}", flush=True)
    if browser_url:
        print(f"sandbox: sign-in and consent pages also at {browser_url} (plain http, loopback)", file=sys.stderr,
              flush=True)
    if browser_sock is None:
        server.run(sockets=[sock])
        return
    browser = uvicorn.Server(uvicorn.Config(browser_app(app), log_level=log_level, lifespan="off",
                                            access_log=False))

    async def both() -> None:
        await asyncio.gather(server.serve(sockets=[sock]), browser.serve(sockets=[browser_sock]))

    asyncio.run(both())


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms delayed-ACK stall per request
    sock.bind((host, port))
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox", description="CRM sandbox (Salesforce, …)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8502)
    p.add_argument("--scenario", default=str(DEFAULT_SCENARIO))
    p.add_argument("--tls-dir", default=str(DEFAULT_TLS_DIR))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--browser-port", type=int, default=None,
                   help="also serve the sign-in and consent pages over plain http on this loopback port")
    p.add_argument("--console-url", default=None, help="the console's public URL (OAuth callback URLs)")
    a = p.parse_args(argv)
    serve(a.host, a.port, a.scenario, a.tls_dir, seed=a.seed, log_level=a.log_level,
          browser_port=a.browser_port, console_url=a.console_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
