"""core.sso sits above connections, accounts, vault, providers and tenants' basics (Principal, models, audit)
and below onboarding, posture, alerts and sync (README, "how it is built"): counting every import, those
inside functions too, no module of core.sso reaches up."""

from __future__ import annotations

import ast
from pathlib import Path

import core.sso

# The orchestration and the packages above sso; tenants' service is the onboarding-facing one (tenant
# creation, lists, the wizard's data): sso reads tenants through its own lookups.
FORBIDDEN = ("core.tenants.onboarding", "core.tenants.service", "core.onboarding", "core.posture", "core.alerts",
             "core.sync", "core.scheduler", "core.wiring", "core.demo", "core.cli", "core.runner", "core.models")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_no_module_of_core_sso_imports_a_package_above_it() -> None:
    package = Path(core.sso.__file__).parent
    upward = [f"{path.name}:{line} imports {name}"
              for path in sorted(package.glob("*.py")) for line, name in _imports(path)
              if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert upward == [], "core.sso must not import packages above it: " + "; ".join(upward)
