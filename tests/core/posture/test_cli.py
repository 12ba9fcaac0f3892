"""`crmbridge posture TENANT_SLUG --json` against a database with the demo tenants."""

from __future__ import annotations

import json

from sqlmodel import Session, select

from core.cli import main
from core.posture.models import PostureSnapshot
from tests.core.posture.factories import NOW
from tests.core.posture.seed import demo_world


def test_posture_json_prints_findings_level_and_next_step(app_db, capsys):
    with Session(app_db) as s:
        demo_world(s, now=NOW)
    assert main(["posture", "tinyco", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tenant"]["slug"] == "tinyco"
    assert out["level"] == 1 and out["level_name"] == "Stored passwords"
    assert out["next_step"]["rule"] == "per_user_passwords" and out["next_step"]["to_level"] == 2
    assert out["world"]["key"] == "today"
    rules = {f["rule"]: f for f in out["findings"]}
    assert rules["per_user_passwords"]["severity"] == "high"
    assert all({"severity", "evidence", "action", "who", "unlocks"} <= set(f) for f in out["findings"])


def test_posture_text_and_unknown_tenant(app_db, capsys):
    with Session(app_db) as s:
        demo_world(s, now=NOW)
    assert main(["posture", "profco"]) == 0
    text = capsys.readouterr().out
    assert "level 0 — Blocked" in text and "[blocking]" in text and "The 2013 world" in text
    assert main(["posture", "nosuch"]) == 1
    assert "No tenant 'nosuch'" in capsys.readouterr().err


def test_posture_snapshot_command_records_today(app_db, capsys):
    with Session(app_db) as s:
        demo_world(s, now=NOW)
    assert main(["posture-snapshot"]) == 0
    assert "6 tenant(s)" in capsys.readouterr().out
    with Session(app_db) as s:
        assert len(s.exec(select(PostureSnapshot)).all()) == 6
