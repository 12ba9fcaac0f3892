"""``crmbridge alerts ...`` (for cron):

    crmbridge alerts run [--no-deliver]   read every source, fire/recover alerts, deliver what is due
    crmbridge alerts deliver              only retry/send due deliveries
    crmbridge alerts digest               queue and send the cross-tenant digest to staff channels
    crmbridge alerts status               firing alerts and failing deliveries

Exit code 0, or 1 when a delivery failed for good in this pass.
"""

from __future__ import annotations

import argparse
import sys


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    from core.alerts.service import run_alerts
    from core.db import session_scope
    from core.tenants.access import Principal
    from core.vault.service import require_keys_at_start

    require_keys_at_start(process="crmbridge alerts run")
    with session_scope() as s:
        r = run_alerts(session=s, principal=Principal.system("cli"), deliver=not args.no_deliver)
    _out(f"alerts: {r.observations} observation(s), {len(r.notices)} notice(s)"
         + (f", skipped sources: {', '.join(r.skipped)}" if r.skipped else ""))
    for n in r.notices:
        _out(f"  {n.kind:10} tenant {n.tenant_id}: {n.title}")
    _out(f"deliveries: {r.report.sent} sent, {r.report.retrying} retrying, {r.report.failed} failed")
    for e in r.report.errors:
        _out(f"  error: {e}")
    return 1 if r.report.failed else 0


def cmd_deliver(args: argparse.Namespace) -> int:
    from core.alerts.engine import deliver_due
    from core.clock import utcnow
    from core.db import session_scope
    from core.vault.service import require_keys_at_start

    require_keys_at_start(process="crmbridge alerts deliver")
    with session_scope() as s:
        rep = deliver_due(s, now=utcnow())
    _out(f"deliveries: {rep.sent} sent, {rep.retrying} retrying, {rep.failed} failed")
    return 1 if rep.failed else 0


def cmd_digest(args: argparse.Namespace) -> int:
    from core.alerts.service import send_staff_digest
    from core.db import session_scope
    from core.tenants.access import Principal
    from core.vault.service import require_keys_at_start

    require_keys_at_start(process="crmbridge alerts digest")
    with session_scope() as s:
        digest = send_staff_digest(session=s, principal=Principal.system("cli"))
    _out(digest.title if digest else "digest: nothing new since the last one")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from core.alerts.service import list_active, list_deliveries
    from core.db import session_scope
    from core.tenants.access import Principal

    p = Principal.system("cli")
    with session_scope() as s:
        active = list_active(session=s, principal=p, tenant_id=None)
        failing = [d for d in list_deliveries(session=s, principal=p, tenant_id=None, limit=500)
                   if d.status in ("retrying", "failed")]
    _out(f"{len(active)} alert(s) firing")
    for a in active:
        _out(f"  {a.tenant}: {a.title} (since {a.since:%Y-%m-%d %H:%M} UTC)")
    _out(f"{len(failing)} delivery(ies) failing")
    for d in failing:
        _out(f"  #{d.id} {d.status} after {d.attempts} attempt(s) to {d.channel}: {d.last_error}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    alerts = subparsers.add_parser("alerts", help="alert rules, notices and deliveries").add_subparsers(
        dest="alerts_command", required=True)
    run = alerts.add_parser("run", help="evaluate every alert source and deliver what is due (cron)")
    run.add_argument("--no-deliver", action="store_true", help="evaluate only; deliver on the next pass")
    run.set_defaults(func=cmd_run)
    alerts.add_parser("deliver", help="send due and retried deliveries").set_defaults(func=cmd_deliver)
    alerts.add_parser("digest", help="send the cross-tenant digest to staff channels").set_defaults(func=cmd_digest)
    alerts.add_parser("status", help="firing alerts and failing deliveries").set_defaults(func=cmd_status)
