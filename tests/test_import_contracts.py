"""The import contracts in .importlinter hold (core never imports streamlit, sandbox imports nothing
from core, providers stay adapters, core's layers point down only, no cycles between core's
packages), so `make test` fails on a violation as CI's `make lint-imports` does.

The planted tests copy core/ and sandbox/ to a temporary directory, add one import *inside a function*
and check the contracts break and name that edge: "import on use" must not hide an upward edge."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(where: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(where)}
    return subprocess.run([LINT, "--no-cache", "--no-logo"], cwd=where, env=env, capture_output=True, text=True,
                          timeout=120)


def _copy(tmp_path: Path) -> Path:
    for name in ("core", "sandbox"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def _plant(path: Path, body: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + f"\n\ndef _planted() -> None:\n    {body}\n",
                    encoding="utf-8")


def test_the_contracts_hold() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_a_function_level_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    _plant(tree / "core" / "tenants" / "access.py", "from core.alerts import service  # noqa: F401")
    done = _lint(tree)
    assert done.returncode == 1, done.stdout
    assert "core layers: top may import below, never up BROKEN" in done.stdout
    assert "core.tenants.access -> core.alerts.service" in done.stdout
    assert "no import cycles between core's packages and modules BROKEN" in done.stdout


def test_sandbox_importing_core_inside_a_function_breaks(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    _plant(tree / "sandbox" / "state.py", "from core import settings  # noqa: F401")
    done = _lint(tree)
    assert done.returncode == 1, done.stdout
    assert "sandbox.state -> core.settings" in done.stdout


def test_core_importing_streamlit_inside_a_function_breaks(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    _plant(tree / "core" / "db.py", "import streamlit  # noqa: F401")
    done = _lint(tree)
    assert done.returncode == 1, done.stdout
    assert "core.db -> streamlit" in done.stdout
