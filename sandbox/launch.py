"""Start the CRM sandbox in its own process and wait until it listens: the one launcher that ``make run``
(core/runner.py), the tests (tests/fixtures/sandbox.py) and the benchmarks (bench/) use.

    sb = launch(tls_dir=tmp / "tls", port=0)   # a free loopback port
    ... sb.base_url, sb.ca_file ...
    sb.stop()

It runs ``python -m sandbox`` (see sandbox/__main__.py) and reads its ``SANDBOX READY <url> <ca_file>``
line; the CA is made in ``tls_dir`` before the child starts, so the caller can trust it at once. The
sandbox imports nothing from core, and neither does this module.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sandbox.tls import ensure_tls

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCENARIO = ROOT / "data" / "demo" / "sandbox.yaml"
START_TIMEOUT_S = 60.0


class SandboxStartFailed(RuntimeError):
    """The sandbox process exited or printed something else before its READY line."""


@dataclass
class Launched:
    process: subprocess.Popen[str]
    base_url: str
    ca_file: Path
    ready_line: str

    def stop(self, timeout: float = 10.0) -> None:
        """End the sandbox (SIGTERM, then killed if it has not stopped within ``timeout`` seconds)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def launch(
    *,
    tls_dir: Path,
    port: int = 0,
    scenario: Path = DEFAULT_SCENARIO,
    seed: int | None = None,
    browser_port: int | None = None,
    console_url: str | None = None,
    log_file: Path | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Launched:
    """Start ``python -m sandbox`` on 127.0.0.1:``port`` (0: a free one) and return once it listens.

    ``log_file``: where the sandbox's stderr goes (``None``: this process's stderr).

    Raises:
        SandboxStartFailed: no READY line within ``timeout`` seconds, or the process ended first (the
            message carries what it printed, e.g. that the port is taken).
    """
    files = ensure_tls(Path(tls_dir))  # made here: the child reuses it and the caller can trust it now
    argv = [sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", str(port),
            "--scenario", str(scenario), "--tls-dir", str(tls_dir)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if browser_port is not None:
        argv += ["--browser-port", str(browser_port)]
    if console_url is not None:
        argv += ["--console-url", console_url]
    err: IO[str] | None = log_file.open("a", encoding="utf-8") if log_file is not None else None
    try:
        proc = subprocess.Popen(argv, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        if err is not None:
            err.close()  # the child holds its own descriptor
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    if not line.startswith("SANDBOX READY"):
        proc.kill()
        proc.wait()
        said = line or ("no output" if ready else f"nothing within {timeout:.0f} s")
        detail = ""
        if log_file is not None and log_file.exists():
            detail = " | " + " ".join(log_file.read_text(encoding="utf-8", errors="replace").split()[-60:])
        raise SandboxStartFailed(f"the CRM sandbox did not start on port {port} ({said}){detail}: "
                                 "is the port free?")
    _, _, base_url, *_ = line.split()
    return Launched(process=proc, base_url=base_url, ca_file=files.ca_file, ready_line=line)
