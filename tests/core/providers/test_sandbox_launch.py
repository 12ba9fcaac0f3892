"""sandbox.launch, the one launcher `make run`, the tests and the benchmarks start the sandbox with."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from sandbox.launch import SandboxStartFailed, launch


def test_launch_serves_https_with_the_ca_it_made_and_stops(tmp_path: Path) -> None:
    sb = launch(tls_dir=tmp_path / "tls", log_file=tmp_path / "sandbox.log")
    try:
        assert sb.base_url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(sb.ca_file))
        assert httpx.get(sb.base_url + "/_sandbox/health", verify=ctx, timeout=30).status_code == 200
    finally:
        sb.stop()
    assert sb.process.poll() is not None


def test_a_taken_port_is_named_in_the_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(SandboxStartFailed, match=rf"port {port}.*is the port free"):
            launch(tls_dir=tmp_path / "tls", port=port, log_file=tmp_path / "sandbox.log")
