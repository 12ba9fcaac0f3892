"""``crmbridge scheduler``: run every periodic job at its interval (see core.scheduler.jobs).

    crmbridge scheduler                  run until stopped (SIGTERM / Ctrl-C); any number, on any machines
    crmbridge scheduler --once           run each job that is due now, then exit (cron-style)
    crmbridge scheduler --job NAME …     only these jobs
    crmbridge scheduler status           when each job last ran, how it ended, whether it is late
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import timedelta


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _scheduler(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from core.db import get_engine
    from core.scheduler.jobs import BY_NAME, configured_intervals
    from core.scheduler.loop import Scheduler
    from core.settings import get_settings

    unknown = [n for n in (args.job or []) if n not in BY_NAME]
    if unknown:
        from core.errors import InvalidInput

        raise InvalidInput(f"Unknown job {', '.join(unknown)}: use one of {', '.join(BY_NAME)}.")
    s = get_settings()
    return Scheduler(get_engine(), configured_intervals(s), lease=timedelta(seconds=s.scheduler_lease_seconds))


def cmd_scheduler(args: argparse.Namespace) -> int:
    if args.action == "status":
        return cmd_status(args)
    from core.vault.service import require_keys_at_start

    # Its jobs sweep the vault and deliver alerts (sealed webhook URLs): a wrong key stops it before any job.
    require_keys_at_start(process="crmbridge scheduler")
    sched = _scheduler(args)
    if args.once:
        records = sched.run_once(args.job)
        for r in records:
            _out(f"{r.job}: {r.outcome.value}: {r.summary or r.error or ''}".rstrip(": "))
        if not records:
            _out("scheduler: nothing due (every job ran in its current window)")
        return 1 if any(r.outcome.value == "failed" for r in records) else 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sched.serve(stop, args.job)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from core.db import session_scope
    from core.scheduler.service import periodic_status
    from core.tenants.access import Principal

    with session_scope() as s:
        rows = periodic_status(session=s, principal=Principal.system("cli"))
    for r in rows:
        when = f"{r.last_started_at:%Y-%m-%d %H:%M:%S} UTC" if r.last_started_at else "never"
        _out(f"{r.name:<17} every {r.interval_seconds:>6} s  {r.status:<9} last {when}"
             + (f"  {r.last_error or r.last_summary}" if (r.last_error or r.last_summary) else ""))
    return 1 if any(r.late for r in rows) else 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("scheduler", help="run the periodic jobs (sync schedule, vault sweep, alerts, "
                                                "SSO watch, posture snapshot), each once per interval")
    p.add_argument("action", nargs="?", choices=["run", "status"], default="run",
                   help="run (default) or status: when each job last ran and whether it is late (exit 1 if so)")
    p.add_argument("--once", action="store_true", help="run each job that is due now, then exit")
    p.add_argument("--job", action="append", metavar="NAME", help="only this job (repeatable)")
    p.set_defaults(func=cmd_scheduler)
