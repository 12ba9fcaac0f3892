"""Install benchmark: how long a new user waits from `make run` on a fresh clone to a console that answers.

cold_uv_s     = `make run` in a fresh clone with no .venv (uv's package cache warm) until /healthz answers 200:
                pinned uv into .tools, `uv sync --frozen` from uv.lock, migrations, sandbox, demo load, console.
cold_pip_s    = the same clone and the same steps, but installed the way `make run` did before the lock:
                `python -m venv`, `pip install --upgrade pip`, `pip install -e '.[dev]'` (resolving open
                ranges; pip's cache warm), then the same migrate and `python -m core.runner`.
warm_s        = `make run` again in the clone that already has its .venv (a restart).
cold_ratio    = cold_pip_s / cold_uv_s (target >= 3: cold `make run` at most a third of the old path).

Each path runs twice and the second run is reported, so both installers read a warm cache and neither is
charged for a first download. The console and sandbox use free ports, so this runs beside `make run`.

Run: .venv/bin/python bench/install.py. The last line is ``RESULT cold_ratio=X cold_uv_s=Y cold_pip_s=Z warm_s=W``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("PYTHON", "python3")
OLD_INSTALL = (
    f"{PYTHON} -m venv .venv && .venv/bin/python -m pip install -q --upgrade pip"
    " && .venv/bin/python -m pip install -q -e '.[dev]'"
    " && CRMBRIDGE_DEMO=1 .venv/bin/crmbridge db upgrade && CRMBRIDGE_DEMO=1 exec .venv/bin/python -m core.runner"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clone(into: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(into)], check=True)
    return into


def _time_to_healthz(cwd: Path, command: list[str], timeout: float = 600.0) -> float:
    port, sandbox_port = _free_port(), _free_port()
    env = dict(os.environ, CRMBRIDGE_PORT=str(port), CRMBRIDGE_PUBLIC_URL=f"http://127.0.0.1:{port}",
               CRMBRIDGE_SANDBOX_URL=f"https://127.0.0.1:{sandbox_port}", PYTHON=PYTHON)
    env.pop("VIRTUAL_ENV", None)
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"{' '.join(command)} exited with {proc.returncode} before /healthz answered")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"/healthz did not answer within {timeout:.0f} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _fresh(work: Path, name: str) -> Path:
    path = work / name
    if path.exists():
        shutil.rmtree(path)
    return _clone(path)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="crmbridge-install-") as tmp:
        work = Path(tmp)
        uv_runs, pip_runs = [], []
        for attempt in (1, 2):
            clone = _fresh(work, "uv")
            uv_runs.append(_time_to_healthz(clone, ["make", "run", f"PYTHON={PYTHON}"]))
            print(f"cold make run (uv.lock, frozen), run {attempt}: {uv_runs[-1]:.1f} s", flush=True)
            old = _fresh(work, "pip")
            pip_runs.append(_time_to_healthz(old, ["sh", "-c", OLD_INSTALL]))
            print(f"cold old pip path (resolving),  run {attempt}: {pip_runs[-1]:.1f} s", flush=True)
        warm = _time_to_healthz(clone, ["make", "run", f"PYTHON={PYTHON}"])
        print(f"warm restart (make run, .venv present): {warm:.1f} s")
    cold_uv, cold_pip = uv_runs[-1], pip_runs[-1]
    print(f"RESULT cold_ratio={cold_pip / cold_uv:.2f} cold_uv_s={cold_uv:.1f} cold_pip_s={cold_pip:.1f}"
          f" warm_s={warm:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
