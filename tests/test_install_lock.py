"""The environment the tests run in is exactly the locked set: `make` installs with `uv sync --frozen`,
so every installed distribution must be in uv.lock at the locked version. A package that crept in by
some other install, or a version resolved afresh, fails here and names itself."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, set[str]]:
    """Name → the versions the lock allows (one per Python-version fork, e.g. numpy for 3.11 and 3.12+)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text(encoding="utf-8"))
    versions: dict[str, set[str]] = {}
    for p in lock["package"]:
        versions.setdefault(_norm(p["name"]), set()).add(p["version"])
    return versions


def test_every_installed_distribution_is_the_locked_version() -> None:
    locked = _locked()
    installed = {_norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    # pip/setuptools may live in a venv made by `python -m venv`; uv's venvs have neither.
    installed = {n: v for n, v in installed.items() if n not in {"pip", "setuptools", "wheel"}}
    not_locked = sorted(n for n in installed if n not in locked)
    wrong = sorted(f"{n} {installed[n]} (locked {sorted(locked[n])})" for n in installed
                   if n in locked and installed[n] not in locked[n])
    assert not not_locked, f"installed but not in uv.lock (run `make clean test`): {not_locked}"
    assert not wrong, f"installed at another version than uv.lock pins: {wrong}"


def test_every_locked_registry_package_carries_hashes() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text(encoding="utf-8"))
    unhashed = []
    for p in lock["package"]:
        if "registry" not in p.get("source", {}):
            continue  # the project itself (editable)
        files = p.get("wheels", []) + ([p["sdist"]] if "sdist" in p else [])
        if not files or any(not f.get("hash", "").startswith("sha256:") for f in files):
            unhashed.append(p["name"])
    assert not unhashed, f"locked without a sha256 for every file: {unhashed}"


def test_every_direct_dependency_has_an_upper_bound() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    deps = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    open_ended = [d for d in deps if "<" not in d]
    assert not open_ended, f"direct dependencies without an upper bound on the major version: {open_ended}"
