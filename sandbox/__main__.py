"""``python -m sandbox``: serve the CRM sandbox over HTTPS on loopback.

    python -m sandbox --port 8502 --scenario data/demo/sandbox.yaml --tls-dir data/sandbox-tls

Prints ``SANDBOX READY https://127.0.0.1:<port> <ca_file>`` on stdout once the socket listens (tests
read that line; ``--port 0`` picks a free port). Clients must trust ``<tls-dir>/ca.pem``.
"""

from __future__ import annotations

import argparse
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
) -> None:
    """Run the sandbox until interrupted. Refuses non-loopback hosts: it holds demo passwords."""
    import uvicorn

    from sandbox.app import create_app
    from sandbox.tls import ensure_tls

    if not _loopback(host):
        raise SystemExit(f"the sandbox binds loopback only (got {host!r}): use 127.0.0.1")
    files = ensure_tls(Path(tls_dir))
    os.environ.setdefault("SANDBOX_STATE_DIR", str(tls_dir))  # IdP keys survive restarts (see sandbox.idp)
    app = create_app(scenario, seed=seed)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms delayed-ACK stall per request
    sock.bind((host, port))
    sock.listen(128)
    actual = sock.getsockname()[1]
    config = uvicorn.Config(
        app, ssl_certfile=str(files.cert_file), ssl_keyfile=str(files.key_file),
        log_level=log_level, lifespan="off", access_log=False,
    )
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"SANDBOX READY https://{shown}:{actual} {files.ca_file}", flush=True)
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox", description="CRM sandbox (Salesforce, …)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8502)
    p.add_argument("--scenario", default=str(DEFAULT_SCENARIO))
    p.add_argument("--tls-dir", default=str(DEFAULT_TLS_DIR))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    serve(a.host, a.port, a.scenario, a.tls_dir, seed=a.seed, log_level=a.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
