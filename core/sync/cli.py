"""``crmbridge sync …``: the worker and the scheduler.

    crmbridge sync worker [--once] [--concurrency N]   claim and run due jobs
    crmbridge sync schedule                            create/wake jobs and sweep the vault (for cron)
    crmbridge sync status                              jobs by state, due now, paused accounts
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import func
from sqlmodel import Session, col, select


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_worker(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from core.db import get_engine
    from core.settings import get_settings
    from core.sync.engine import SyncConfig, SyncEngine
    from core.sync.worker import run_worker

    settings = get_settings()
    engine = get_engine()
    sync_engine = SyncEngine(engine, config=SyncConfig(lease=timedelta(seconds=settings.sync_lease_seconds)))
    stats = run_worker(engine=engine, concurrency=args.concurrency, once=args.once, sync_engine=sync_engine,
                       poll_seconds=args.poll if args.poll is not None else settings.worker_poll_seconds)
    _out(f"sync worker: {stats}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from core.clock import utcnow
    from core.db import get_engine
    from core.sync.scheduler import run_scheduler

    result = run_scheduler(get_engine(), now=utcnow(), sweep=not args.no_sweep)
    _out(f"sync schedule: {result}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from core.clock import utcnow
    from core.db import get_engine
    from core.sync.jobs import count_due
    from core.sync.models import SyncAccountState, SyncJob

    now = utcnow()
    with Session(get_engine()) as s:
        by_state = dict(s.exec(select(SyncJob.state, func.count()).group_by(col(SyncJob.state))).all())
        due = count_due(s, now)
        paused = list(s.exec(select(SyncAccountState).where(
            (col(SyncAccountState.paused_until) > now) | col(SyncAccountState.paused_by).is_not(None))))
    _out("jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(by_state.items())) or "none"))
    _out(f"due now: {due}")
    for p in paused:
        _out(f"paused account {p.crm_account_id}: {p.paused_by or ''} {p.pause_reason or ''}".rstrip())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sync = subparsers.add_parser("sync", help="sync workers and scheduler").add_subparsers(
        dest="sync_command", required=True)
    w = sync.add_parser("worker", help="claim and run due sync jobs")
    w.add_argument("--once", action="store_true", help="stop when no job is due")
    w.add_argument("--concurrency", type=int, default=1, help="jobs run at a time (PostgreSQL; SQLite runs 1)")
    w.add_argument("--poll", type=float, default=None,
                   help="seconds between polls when idle (default: CRMBRIDGE_WORKER_POLL_SECONDS, 2)")
    w.set_defaults(func=cmd_worker)
    sc = sync.add_parser("schedule", help="create and wake jobs, then sweep the vault (run from cron)")
    sc.add_argument("--no-sweep", action="store_true", help="skip the vault sweep")
    sc.set_defaults(func=cmd_schedule)
    st = sync.add_parser("status", help="jobs by state and paused accounts")
    st.set_defaults(func=cmd_status)
