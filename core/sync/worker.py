"""The sync worker process: claim due jobs and run them, ``concurrency`` at a time.

    crmbridge sync worker [--once] [--concurrency N]

Each thread claims one job at a time (``jobs.claim_jobs``) and runs it (``engine.SyncEngine``). With
``--once`` every thread stops when no job is due; otherwise it polls. SIGTERM/SIGINT finish the jobs
in hand, then stop (a SIGKILL loses nothing either: the lease lapses and another worker takes over).
On PostgreSQL any number of workers may run on any number of machines; on SQLite run one worker with
concurrency 1 (SQLite has one writer at a time).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from core.clock import Clock, utcnow
from core.sync.engine import RunResult, SyncEngine, VaultCredentials, worker_name
from core.sync.jobs import is_postgres

log = logging.getLogger("crmbridge.sync.worker")


@dataclass
class WorkerStats:
    runs: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, result: RunResult) -> None:
        with self._lock:
            self.runs += 1
            self.by_status[result.status] = self.by_status.get(result.status, 0) + 1

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.by_status.items()))
        return f"{self.runs} run(s)" + (f" ({parts})" if parts else "")


def _schedule(engine: Engine, clock: Clock) -> None:
    from core.sync.scheduler import run_scheduler

    try:
        run_scheduler(engine, now=clock(), sweep=False)
    except (IntegrityError, OperationalError) as exc:  # another scheduler ran at the same moment
        log.info("sync worker: scheduler pass skipped (%s)", type(exc).__name__)


def run_worker(
    *,
    engine: Engine,
    concurrency: int = 1,
    once: bool = False,
    clock: Clock = utcnow,
    sync_engine: SyncEngine | None = None,
    poll_seconds: float = 5.0,
    schedule: bool = True,
    schedule_every: float = 60.0,
    stop: threading.Event | None = None,
    name: str | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> WorkerStats:
    """Run until stopped (or, with ``once``, until nothing is due). Returns what was run."""
    if concurrency < 1:
        concurrency = 1
    if concurrency > 1 and not is_postgres(engine):
        log.warning("sync worker: SQLite has one writer at a time; running with concurrency 1, not %d "
                    "(use PostgreSQL to scale out)", concurrency)
        concurrency = 1
    base = name or worker_name()
    sync_engine = sync_engine or SyncEngine(engine, clock=clock)
    if schedule or isinstance(sync_engine.credentials, VaultCredentials):
        # Before any credential is read (or swept): a worker on the wrong vault key would take every
        # decrypt failure for tampering. Raises (exit non-zero from the CLI) and changes nothing.
        from core.vault.service import require_keys_at_start

        require_keys_at_start(engine, process=f"sync worker {base}", now=clock())
    stop = stop or threading.Event()
    stats = WorkerStats()
    if schedule:
        _schedule(engine, clock)
    last_schedule = time.monotonic()
    schedule_lock = threading.Lock()

    def loop(idx: int) -> None:
        nonlocal last_schedule
        me = f"{base}/{idx}"
        while not stop.is_set():
            try:
                results = sync_engine.run_due(worker=me, limit=1)
            except Exception:  # the database went away, say: keep the worker alive and try again
                log.exception("sync worker %s: claiming or finishing a job failed", me)
                if once:
                    return
                stop.wait(poll_seconds)
                continue
            for r in results:
                stats.add(r)
                if on_result is not None:
                    on_result(r)
            if results:
                continue
            if once:
                return
            if schedule and time.monotonic() - last_schedule >= schedule_every:
                with schedule_lock:
                    if time.monotonic() - last_schedule >= schedule_every:
                        last_schedule = time.monotonic()
                        _schedule(engine, clock)
            stop.wait(poll_seconds)

    def guarded(idx: int) -> None:
        try:
            loop(idx)
        except Exception:  # keep the log; the other threads go on
            log.exception("sync worker thread %d stopped on an error", idx)

    threads = [threading.Thread(target=guarded, args=(i,), name=f"sync-worker-{i}", daemon=True)
               for i in range(concurrency)]
    previous: dict[signal.Signals, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
    log.info("sync worker %s: %s", base, stats)
    return stats
