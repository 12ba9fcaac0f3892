"""``crmbridge posture TENANT_SLUG [--json]`` and ``crmbridge posture-snapshot`` (for cron)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core.db import session_scope
from core.tenants.access import Principal


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _text(report: Any) -> str:
    d = report.to_dict()
    lines = [f"{d['tenant']['name']} ({d['tenant']['slug']}): level {d['level']} — {d['level_name']}",
             f"  {d['world']['title']}: {d['world']['explanation']}"]
    step = d["next_step"]
    if step:
        lines.append(f"  next step → level {step['to_level']} ({step['who']}): {step['title']}")
        lines.append(f"    {step['action']}")
    for f in d["findings"]:
        lines.append(f"  [{f['severity']}] {f['title']} ({f['who']})")
        for e in f["evidence"]:
            src = f"  — {e['source']}" if e["source"] else ""
            lines.append(f"      {e['label']}: {e['value']}{src}")
        lines.append(f"      do: {f['action']}")
        if f["affected"]:
            lines.append(f"      affected: {', '.join(f['affected'])}")
    for gap in d["catalog_gaps"]:
        lines.append(f"  catalog gap: {gap}")
    return "\n".join(lines)


def cmd_posture(args: argparse.Namespace) -> int:
    from core.posture.service import get_posture_by_slug

    with session_scope() as s:
        report = get_posture_by_slug(session=s, principal=Principal.system("cli"), slug=args.tenant_slug)
    _out(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else _text(report))
    return 0


def cmd_posture_snapshot(args: argparse.Namespace) -> int:
    from core.posture.service import record_daily_snapshots

    with session_scope() as s:
        n = record_daily_snapshots(session=s, principal=Principal.system("cli"))
    _out(f"posture: recorded today's snapshot for {n} tenant(s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("posture", help="a tenant's findings, maturity level and next step")
    p.add_argument("tenant_slug", metavar="TENANT_SLUG", help="the tenant's slug, e.g. tinyco")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_posture)
    snap = subparsers.add_parser("posture-snapshot", help="record today's posture row for every tenant (cron)")
    snap.set_defaults(func=cmd_posture_snapshot)
