"""SECURITY.md names a test for every defence: each named test must exist (a renamed or deleted test
breaks the table, not silently)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def named_tests() -> list[tuple[str, str]]:
    """(file, test) for every `file::test` and every `::test` shorthand (same file as the last one)."""
    out: list[tuple[str, str]] = []
    for line in (ROOT / "SECURITY.md").read_text().splitlines():
        current = None
        for file, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", line):
            current = file or current
            assert current, f"a ::{name} shorthand with no file before it: {line[:80]}"
            out.append((current, name))
    return out


def test_every_test_named_in_security_md_exists():
    names = named_tests()
    assert len(names) > 80
    missing = [f"{f}::{n}" for f, n in names
               if not re.search(rf"^(async )?def {n}\(", (ROOT / f).read_text(), flags=re.M)]
    assert missing == [], missing
