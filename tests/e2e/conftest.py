"""Browser tests: Playwright drives Debian's Chromium against the same servers `make run` starts
(core.runner: the console and the CRM sandbox), on free loopback ports with a throwaway database.
The browser trusts no extra CA and ignores no certificate error: the sandbox's sign-in and consent pages
open on its plain-http loopback origin (CRMBRIDGE_SANDBOX_BROWSER_URL), as in `make run`.

Screenshots of every step go to a folder printed at the start of the run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Console:
    url: str
    sandbox_url: str
    sandbox_browser_url: str
    env: dict[str, str]
    shots: Path
    tmp: Path

    def crmbridge(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, env=self.env, text=True,
                              capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def shots_dir() -> Path:
    d = ROOT / "test-artifacts" / f"e2e-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    d.mkdir(parents=True, exist_ok=True)
    sys.stderr.write(f"\n[e2e] screenshots: {d}\n")
    print(f"\n[e2e] screenshots: {d}")
    return d


@pytest.fixture(scope="session")
def console(tmp_path_factory: pytest.TempPathFactory, shots_dir: Path) -> Iterator[Console]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium browser not installed at {CHROMIUM}: apt-get install -y chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("playwright (python package) is not installed: pip install playwright")
    tmp = tmp_path_factory.mktemp("e2e")
    port, sandbox_port, browser_port = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMBRIDGE_")}
    env.update({
        "CRMBRIDGE_DEMO": "1",
        "CRMBRIDGE_DATABASE_URL": f"sqlite:///{tmp / 'e2e.db'}",
        "CRMBRIDGE_PORT": str(port),
        "CRMBRIDGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "CRMBRIDGE_SANDBOX_URL": f"https://127.0.0.1:{sandbox_port}",
        "CRMBRIDGE_SANDBOX_BROWSER_URL": f"http://127.0.0.1:{browser_port}",
        "CRMBRIDGE_SECRET_KEY_FILE": str(tmp / "secret.key"),
        "CRMBRIDGE_VAULT_KEY_FILE": str(tmp / "vault-keys.json"),
        # the CLI (`console.crmbridge("sync", "worker", ...)`) trusts the sandbox's CA as core.runner's console does
        "CRMBRIDGE_SANDBOX_CA_FILE": str(ROOT / "data" / "sandbox-tls" / "ca.pem"),
        # no mail server listens there: an invitation shows its link for manual delivery (deterministic)
        "CRMBRIDGE_SMTP_PORT": str(_free_port()),
        "PYTHONUNBUFFERED": "1",
    })
    c = Console(url=f"http://127.0.0.1:{port}", sandbox_url=f"https://127.0.0.1:{sandbox_port}",
                sandbox_browser_url=f"http://127.0.0.1:{browser_port}", env=env, shots=shots_dir, tmp=tmp)
    assert port != 8501  # the journey runs the console on a non-default port (every redirect must follow)
    for args in (("db", "upgrade"),):  # core.runner loads the demo once the sandbox answers
        r = c.crmbridge(*args)
        assert r.returncode == 0, r.stderr + r.stdout
    log = open(tmp / "servers.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "core.runner"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180  # a loaded CI machine starts slowly
    while True:
        try:
            if httpx.get(f"{c.url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the console did not start:\n" + (tmp / "servers.log").read_text()[-4000:])
        time.sleep(0.3)
    yield c
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()
    shutil.copy(tmp / "servers.log", shots_dir / "servers.log")


@pytest.fixture(scope="session")
def browser(console: Console):  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()
    pw.stop()


@pytest.fixture
def page(browser, console):  # type: ignore[no-untyped-def]
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})  # certificate errors stay errors
    ctx.set_default_timeout(30_000)
    pg = ctx.new_page()
    yield pg
    ctx.close()


class Shooter:
    def __init__(self, page, folder: Path, prefix: str) -> None:  # type: ignore[no-untyped-def]
        self.page, self.folder, self.prefix, self.n = page, folder, prefix, 0

    def __call__(self, name: str) -> Path:
        self.n += 1
        path = self.folder / f"{self.prefix}-{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def wait_streamlit(page) -> None:  # type: ignore[no-untyped-def]
    """Wait until Streamlit has finished running the script."""
    page.wait_for_selector("[data-testid='stApp']", timeout=30_000)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=30_000)
    page.wait_for_timeout(300)
