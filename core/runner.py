"""`make run`: start the CRM sandbox (its own process, https://127.0.0.1:8502) and the console
(http://127.0.0.1:8501) together; stop both on Ctrl-C. Demo mode only: the sandbox plays the demo CRMs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

from core.settings import ROOT, get_settings

log = logging.getLogger("crmbridge.run")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = get_settings()
    tls_dir = ROOT / "data" / "sandbox-tls"
    env = dict(os.environ)
    sandbox = None
    port = settings.sandbox_url.rsplit(":", 1)[-1].strip("/")
    if settings.demo:
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "sandbox", "--port", port, "--tls-dir", str(tls_dir),
             # sign-in/consent pages over loopback http (no certificate warning); callbacks follow the console
             "--browser-port", str(urlsplit(settings.sandbox_browser_url).port or 80),
             "--console-url", settings.public_url],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        assert sandbox.stdout is not None
        line = sandbox.stdout.readline().strip()
        if not line.startswith("SANDBOX READY"):
            sandbox.terminate()
            log.error("the CRM sandbox did not start (%s): is port %s free?", line or "no output", port)
            return 1
        ca_file = line.split()[-1]
        env["CRMBRIDGE_SANDBOX_CA_FILE"] = ca_file
        log.info("CRM sandbox: %s (CA %s)", line.split()[2], ca_file)
        # The demo loads once the sandbox answers: SSO imports its IdP metadata, providers test logins.
        demo = subprocess.run([sys.executable, "-m", "core", "demo", "load", "--if-empty"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        log.info("%s", (demo.stdout or demo.stderr).strip())
    log.info("CRM Bridge console: %s", settings.public_url)
    console = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=ROOT, env=env)

    def stop(*_: object) -> None:
        for proc in (console, sandbox):
            if proc and proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        while console.poll() is None and (sandbox is None or sandbox.poll() is None):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        for proc in (console, sandbox):
            if proc:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return console.returncode or 0


if __name__ == "__main__":
    raise SystemExit(main())
