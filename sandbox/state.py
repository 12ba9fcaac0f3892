"""Shared sandbox state: the scenario, per-org fault injection, and reset.

The sandbox is the CRM, not our code: nothing here imports ``core``.

Scenario files
--------------
A scenario is YAML (or a dict) with one top-level section per vendor module::

    seed: 42                    # optional; create_app(seed=...) wins
    salesforce: {orgs: {...}}   # sandbox/salesforce.py
    dynamics: {environments: {...}}   # sandbox/dynamics.py
    hubspot: {portals: {...}}   # sandbox/hubspot.py
    idp: {tenants: {...}}       # sandbox/idp.py

``load_scenario(path)`` also merges ``include: [file, ...]`` (relative to the file) and every sibling
named ``<stem>.*.yaml`` (``sandbox.dynamics.yaml`` beside ``sandbox.yaml``), so each vendor's orgs can
live in its own file. Sections merge one level deep (``salesforce.orgs`` from two files combine); the
same key defined twice is an error.

Vendor modules
--------------
Each ``sandbox/<vendor>.py`` exposes ``routes(state: SandboxState) -> list[BaseRoute]``. It builds its
own store from ``state.section("<vendor>")``, keeps it in ``state.vendors["<vendor>"]``, and registers
``state.on_reset(fn)`` to rebuild it (``POST /_sandbox/reset``) and optionally
``state.add_inspector("<vendor>", fn)`` so ``GET /_sandbox/orgs/{key}`` can show its view of an org.
Handlers should be ``async def`` (one event loop: no locks needed).

Faults (per org key; keys are unique across vendors)
----------------------------------------------------
``Faults``: ``latency_ms``, ``error_rate`` (seeded: the same seed and call order give the same
failures), ``error_status`` (default 503), ``quota_exhausted`` (the vendor answers its own quota
error), ``pause_after_batch`` (write batches after the N-th wait until released), ``corrupt``
(``"html"``: answer 200 with an HTML page; ``"truncate"``: cut the body in half — for the client's
MalformedResponse handling; vendors apply it with ``corrupt_response``). Vendor handlers call::

    status = await state.before_call(org_key)      # latency, then maybe a 5xx status to answer
    await state.batch_gate(org_key)                 # before processing each write batch
    state.epoch(org_key)                            # bumped by expire_sessions(): older sessions die

Tests drive them through the admin endpoints in sandbox/app.py (``/_sandbox/...``).

Console URL and provisioned orgs
--------------------------------
Strings in the scenario may say ``${CONSOLE_URL}`` (the console's public URL: ``--console-url`` /
``SANDBOX_CONSOLE_URL``, default ``http://127.0.0.1:8501``), so the OAuth callback URLs an org's apps
list follow the console's port instead of being written into data/demo/. Orgs made through
``POST /_sandbox/provision`` (sandbox/provision.py) are scenario fragments kept in
``<state dir>/provisioned.yaml`` (``SANDBOX_STATE_DIR``, which ``python -m sandbox`` sets to its TLS
folder, where the IdP keys already live) and merged into the scenario on every load and reset, so they
survive a restart as the demo's own orgs do.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

VENDOR_SECTIONS = ("salesforce", "dynamics", "hubspot", "idp")
DEFAULT_CONSOLE_URL = "http://127.0.0.1:8501"
PROVISIONED_FILE = "provisioned.yaml"
_VAR = re.compile(r"\$\{([A-Z_]+)\}")


class ScenarioError(ValueError):
    pass


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ScenarioError(f"scenario {path} must be a mapping")
    return data


def _merge(into: dict[str, Any], data: dict[str, Any], origin: str) -> None:
    for key, value in data.items():
        if key == "include":
            continue
        if key not in into:
            into[key] = copy.deepcopy(value)
            continue
        if key == "seed":
            continue
        if not (isinstance(into[key], dict) and isinstance(value, dict)):
            raise ScenarioError(f"{origin}: top-level key {key!r} defined twice")
        for sub, subval in value.items():
            if sub not in into[key]:
                into[key][sub] = copy.deepcopy(subval)
            elif isinstance(into[key][sub], dict) and isinstance(subval, dict):
                clash = set(into[key][sub]) & set(subval)
                if clash:
                    raise ScenarioError(f"{origin}: {key}.{sub} keys defined twice: {sorted(clash)}")
                into[key][sub].update(copy.deepcopy(subval))
            else:
                raise ScenarioError(f"{origin}: {key}.{sub} defined twice")


def load_scenario(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The merged scenario dict (see the module docstring for includes and sibling files)."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    merged: dict[str, Any] = {}
    main = _read_yaml(path)
    _merge(merged, main, str(path))
    extra = [path.parent / p for p in main.get("include", [])]
    extra += sorted(p for p in path.parent.glob(f"{path.stem}.*.yaml") if p != path)
    seen = {path.resolve()}
    for p in extra:
        if p.resolve() in seen:
            continue
        seen.add(p.resolve())
        _merge(merged, _read_yaml(p), str(p))
    return merged


def substitute(value: Any, variables: dict[str, str]) -> Any:
    """``value`` with every ``${NAME}`` in its strings replaced; an unknown name is an error."""
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            if m.group(1) not in variables:
                raise ScenarioError(f"unknown scenario variable ${{{m.group(1)}}}: use one of {sorted(variables)}")
            return variables[m.group(1)]

        return _VAR.sub(repl, value)
    if isinstance(value, dict):
        return {k: substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables) for v in value]
    return value


@dataclass
class Faults:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    quota_exhausted: bool = False
    pause_after_batch: int | None = None
    corrupt: str | None = None  # "html": a 200 HTML page instead of the answer; "truncate": cut in half

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _OrgRuntime:
    faults: Faults = field(default_factory=Faults)
    rng: random.Random = field(default_factory=random.Random)
    epoch: int = 0
    batches: int = 0
    waiting: int = 0
    calls: int = 0
    injected_errors: int = 0
    gate: asyncio.Event | None = None
    paused_event: asyncio.Event | None = None


class SandboxState:
    """Everything the running sandbox knows. One instance per app."""

    def __init__(
        self, scenario: str | Path | dict[str, Any], *, seed: int | None = None, console_url: str | None = None,
        browser_url: str | None = None, state_dir: str | Path | None = None,
    ) -> None:
        self._source = scenario
        self.console_url = (console_url or os.environ.get("SANDBOX_CONSOLE_URL") or DEFAULT_CONSOLE_URL).rstrip("/")
        #: the plain-http loopback origin serving the browser-facing pages (None: HTTPS only)
        self.browser_url = browser_url.rstrip("/") if browser_url else None
        folder = state_dir or os.environ.get("SANDBOX_STATE_DIR")
        self.state_dir = Path(folder) if folder else None
        self._provisioned_mem: dict[str, dict[str, Any]] = {}  # without a state folder (tests)
        self.scenario: dict[str, Any] = self._load()
        self.seed: int = seed if seed is not None else int(self.scenario.get("seed", 0))
        self.vendors: dict[str, Any] = {}
        self._reset_hooks: list[Callable[[SandboxState], None]] = []
        self._inspectors: dict[str, Callable[[str], dict[str, Any] | None]] = {}
        self._orgs: dict[str, _OrgRuntime] = {}

    # -- scenario -----------------------------------------------------------------------------
    @property
    def variables(self) -> dict[str, str]:
        return {"CONSOLE_URL": self.console_url}

    def _load(self) -> dict[str, Any]:
        merged = load_scenario(self._source)
        for key, record in self.provisioned().items():
            _merge(merged, record.get("scenario") or {}, f"{PROVISIONED_FILE} ({key})")
        return substitute(merged, self.variables)

    def provisioned(self) -> dict[str, dict[str, Any]]:
        """Provisioned orgs by ``<tenant>:<crm>`` (empty without a state folder or before the first)."""
        if self.state_dir is None:
            return dict(self._provisioned_mem)
        path = self.state_dir / PROVISIONED_FILE
        if not path.exists():
            return {}
        return dict(_read_yaml(path).get("provisioned") or {})

    def save_provisioned(self, key: str, record: dict[str, Any]) -> None:
        """Keep a provisioned org (0600: it holds its demo passwords) and merge it into the live scenario."""
        records = self.provisioned()
        records[key] = record
        if self.state_dir is None:
            self._provisioned_mem = records
        else:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path = self.state_dir / PROVISIONED_FILE
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                yaml.safe_dump({"provisioned": records}, fh, sort_keys=True)
            os.replace(tmp, path)
        _merge(self.scenario, substitute(record.get("scenario") or {}, self.variables), f"provisioned {key}")

    def org_keys(self) -> set[str]:
        """Every org key in use (keys are unique across vendors)."""
        keys: set[str] = set()
        keys |= set(self.section("salesforce").get("orgs") or {})
        keys |= set(self.section("dynamics").get("environments") or {})
        keys |= set(self.section("hubspot").get("portals") or {})
        return {str(k) for k in keys}

    def section(self, name: str) -> dict[str, Any]:
        value = self.scenario.get(name) or {}
        if not isinstance(value, dict):
            raise ScenarioError(f"scenario section {name!r} must be a mapping")
        return value

    def on_reset(self, fn: Callable[[SandboxState], None]) -> None:
        self._reset_hooks.append(fn)

    def add_inspector(self, vendor: str, fn: Callable[[str], dict[str, Any] | None]) -> None:
        self._inspectors[vendor] = fn

    def reset(self, scenario: str | Path | dict[str, Any] | None = None) -> None:
        """Reload the scenario, clear faults and sessions, and let each vendor rebuild its store."""
        if scenario is not None:
            self._source = scenario
        self.scenario = self._load()
        for rt in self._orgs.values():
            if rt.gate is not None:
                rt.gate.set()  # never leave a request hanging across a reset
        self._orgs.clear()
        for hook in self._reset_hooks:
            hook(self)

    def inspect(self, org: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for vendor, fn in self._inspectors.items():
            view = fn(org)
            if view is not None:
                out[vendor] = view
        rt = self._orgs.get(org)
        out["runtime"] = {
            "faults": (rt.faults if rt else Faults()).public(),
            "epoch": rt.epoch if rt else 0,
            "write_batches": rt.batches if rt else 0,
            "paused_requests": rt.waiting if rt else 0,
            "calls": rt.calls if rt else 0,
            "injected_errors": rt.injected_errors if rt else 0,
        }
        return out

    # -- faults -------------------------------------------------------------------------------
    def _rt(self, org: str) -> _OrgRuntime:
        rt = self._orgs.get(org)
        if rt is None:
            rt = _OrgRuntime(rng=random.Random(f"{self.seed}:{org}"))
            self._orgs[org] = rt
        return rt

    def faults(self, org: str) -> Faults:
        return self._rt(org).faults

    def set_faults(self, org: str, **changes: Any) -> Faults:
        rt = self._rt(org)
        for k, v in changes.items():
            if not hasattr(rt.faults, k):
                raise ScenarioError(f"unknown fault {k!r}: use one of {sorted(Faults().public())}")
            setattr(rt.faults, k, v)
        if "error_rate" in changes:
            rt.rng = random.Random(f"{self.seed}:{org}")
        if "pause_after_batch" in changes:
            rt.batches = 0
            if changes["pause_after_batch"] is None and rt.gate is not None:
                rt.gate.set()
        return rt.faults

    def clear_faults(self, org: str) -> None:
        rt = self._rt(org)
        if rt.gate is not None:
            rt.gate.set()
        rt.faults = Faults()
        rt.batches = 0

    def expire_sessions(self, org: str) -> int:
        rt = self._rt(org)
        rt.epoch += 1
        return rt.epoch

    def epoch(self, org: str) -> int:
        return self._rt(org).epoch

    async def before_call(self, org: str) -> int | None:
        """Apply latency; return an HTTP status to answer instead (seeded 5xx), else None."""
        rt = self._rt(org)
        rt.calls += 1
        f = rt.faults
        if f.latency_ms > 0:
            await asyncio.sleep(f.latency_ms / 1000.0)
        if f.error_rate > 0 and rt.rng.random() < f.error_rate:
            rt.injected_errors += 1
            return f.error_status
        return None

    async def batch_gate(self, org: str, *, timeout: float = 120.0) -> None:
        """Count a write batch; past ``pause_after_batch`` wait until released (or timeout)."""
        rt = self._rt(org)
        rt.batches += 1
        limit = rt.faults.pause_after_batch
        if limit is None or rt.batches <= limit:
            return
        if rt.gate is None or rt.gate.is_set():
            rt.gate = asyncio.Event()
        if rt.paused_event is None:
            rt.paused_event = asyncio.Event()
        rt.waiting += 1
        rt.paused_event.set()
        try:
            await asyncio.wait_for(rt.gate.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            rt.waiting -= 1

    def release(self, org: str, *, clear: bool = True) -> int:
        """Let paused batches continue; ``clear`` also removes the pause so later batches run."""
        rt = self._rt(org)
        waiting = rt.waiting
        if clear:
            rt.faults.pause_after_batch = None
        if rt.gate is not None:
            rt.gate.set()
        rt.paused_event = None
        return waiting

    async def wait_paused(self, org: str, timeout: float = 10.0) -> bool:
        """Block until a write batch of ``org`` is paused (True) or ``timeout`` passes (False)."""
        rt = self._rt(org)
        if rt.waiting:
            return True
        if rt.paused_event is None:
            rt.paused_event = asyncio.Event()
        try:
            await asyncio.wait_for(rt.paused_event.wait(), timeout)
        except TimeoutError:
            return False
        return rt.waiting > 0


def corrupt_response(state: SandboxState, org: str, body: bytes, media_type: str) -> tuple[bytes, str]:
    """Apply the org's ``corrupt`` fault to a response body: (body, media type)."""
    mode = state.faults(org).corrupt
    if mode == "html":
        return b"<html><body><h1>Maintenance</h1><p>Back soon.</p></body></html>", "text/html"
    if mode == "truncate":
        return body[: len(body) // 2], media_type
    return body, media_type
