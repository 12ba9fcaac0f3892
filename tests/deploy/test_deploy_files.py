"""The deploy files say only what the code does: every command they run parses as a `crmbridge` command,
every CRMBRIDGE_* variable they name is a setting, and the README links them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from core.cli import build_parser
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "Dockerfile", ROOT / "docs" / "deploy.md", ROOT / "deploy" / "compose.yaml",
         ROOT / "deploy" / "crmbridge.env.example", *sorted((ROOT / "deploy" / "systemd").iterdir())]
NOT_SETTINGS = {"CRMBRIDGE_VERSION"}  # compose's image tag


def _commands() -> list[list[str]]:
    out: list[list[str]] = []
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    for svc in compose["services"].values():
        cmd = svc.get("command")
        if cmd and cmd[0] == "crmbridge":
            out.append(cmd[1:])
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart=") and "/bin/crmbridge " in line:
                out.append(shlex.split(line.split("/bin/crmbridge ", 1)[1]))
    return out


def test_every_deployed_command_is_a_crmbridge_command() -> None:
    commands = _commands()
    assert {c[0] for c in commands} >= {"db", "sync", "scheduler"}
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:  # argparse's refusal
            pytest.fail(f"`crmbridge {' '.join(argv)}` does not parse")


def test_every_variable_named_is_a_setting() -> None:
    fields = {f"CRMBRIDGE_{name.upper()}" for name in Settings.model_fields}
    for path in FILES:
        for var in set(re.findall(r"CRMBRIDGE_[A-Z_*]*[A-Z*]", path.read_text())):
            if var in NOT_SETTINGS:
                continue
            if "*" in var:  # a family, e.g. CRMBRIDGE_SCHEDULE_*_SECONDS: at least one setting matches
                pattern = re.compile(re.escape(var).replace(r"\*", "[A-Z_]+") + "$")
                assert any(pattern.match(f) for f in fields), f"{path.relative_to(ROOT)} names {var}"
                continue
            assert var in fields, f"{path.relative_to(ROOT)} names {var}, which is not a setting"


def test_the_readme_links_the_deploy_guide_and_files() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in ("docs/deploy.md", "Dockerfile", "deploy/compose.yaml", "deploy/systemd/"):
        assert f"]({target})" in readme
        assert (ROOT / target).exists()
