"""`make run`: the whole product on one machine — the CRM sandbox (demo mode, https://127.0.0.1:8502),
the console (http://127.0.0.1:8501), one scheduler (``crmbridge scheduler``: sync schedule, vault sweep,
alerts, SSO watch, posture snapshot) and one sync worker (``crmbridge sync worker``). Ctrl-C or SIGTERM
stops them all.

Nothing is passed to the children that a command typed by hand in another terminal would not get: they
read the same settings (in demo mode the sandbox CA is ``data/sandbox-tls/ca.pem``, where the sandbox
started here writes it), so ``crmbridge sync worker`` run by hand works the same as the one started here.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from core.settings import ROOT, SANDBOX_TLS_DIR, get_settings
from sandbox.launch import Launched, SandboxStartFailed, launch

log = logging.getLogger("crmbridge.run")

RESTART_DELAY = 5.0  # a scheduler or worker that stopped on its own is started again after this long


@dataclass
class Child:
    name: str
    argv: list[str]
    essential: bool  # the console and the sandbox: when one stops, everything stops
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    stopped_at: float | None = field(default=None)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, cwd=ROOT)
        self.stopped_at = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _start_sandbox(port: int) -> Launched:
    """The demo's sandbox, through the same launcher the tests and benchmarks use."""
    settings = get_settings()
    # sign-in/consent pages over loopback http (no certificate warning); callbacks follow the console
    return launch(tls_dir=SANDBOX_TLS_DIR, port=port,
                  browser_port=urlsplit(settings.sandbox_browser_url).port or 80, console_url=settings.public_url)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = get_settings()
    sandbox = None
    if settings.demo:
        port = int(settings.sandbox_url.rsplit(":", 1)[-1].strip("/"))
        try:
            sandbox = _start_sandbox(port)
        except SandboxStartFailed as exc:
            log.error("%s", exc)
            return 1
        log.info("CRM sandbox: %s (CA %s)", sandbox.base_url, sandbox.ca_file)
        # The demo loads once the sandbox answers: SSO imports its IdP metadata, providers test logins.
        demo = subprocess.run([sys.executable, "-m", "core", "demo", "load", "--if-empty"], cwd=ROOT,
                              capture_output=True, text=True)
        log.info("%s", (demo.stdout or demo.stderr).strip())
    log.info("CRM Bridge console: %s", settings.public_url)
    children = [
        Child("console", [sys.executable, str(ROOT / "server.py")], essential=True),
        Child("scheduler", [sys.executable, "-m", "core", "scheduler"], essential=False),
        Child("sync worker", [sys.executable, "-m", "core", "sync", "worker"], essential=False),
    ]
    for c in children:
        c.start()
    log.info("Scheduler and sync worker started: %s", "Ctrl-C stops everything")

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        while not stopping:
            if sandbox is not None and sandbox.process.poll() is not None:
                log.error("the CRM sandbox stopped (exit %s): stopping everything", sandbox.process.returncode)
                code = 1
                break
            essential_down = next((c for c in children if c.essential and not c.alive()), None)
            if essential_down is not None:
                assert essential_down.proc is not None
                code = essential_down.proc.returncode or 0
                log.error("the %s stopped (exit %s): stopping everything", essential_down.name, code)
                break
            now = time.monotonic()
            for c in children:
                if c.essential or c.alive():
                    continue
                if c.stopped_at is None:
                    c.stopped_at = now
                    log.warning("the %s stopped (exit %s): starting it again in %.0f s", c.name,
                                c.proc.returncode if c.proc else None, RESTART_DELAY)
                elif now - c.stopped_at >= RESTART_DELAY:
                    c.restarts += 1
                    c.start()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        procs: list[subprocess.Popen] = [c.proc for c in children if c.proc is not None]  # type: ignore[type-arg]
        if sandbox is not None:
            procs.append(sandbox.process)
        for p in procs:  # the scheduler and the worker finish the job in hand, then exit
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
