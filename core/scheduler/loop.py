"""The scheduler process: ``crmbridge scheduler`` runs every periodic job at its interval.

One thread per job sleeps until the job's next window, tries to win the job's row (see
``core.scheduler.service``) and, if it did, runs the job while a heartbeat renews the lease. Start one
scheduler or several (on PostgreSQL, on several machines, for availability): each job still runs once
per window. SIGTERM/SIGINT let the jobs in hand finish, then stop; a SIGKILL loses nothing either (the
lease lapses and another scheduler takes the job over).

Why no scheduling library: the timing here is "sleep until the next window boundary", a few lines; what
matters is the exclusion, and that must be the database's. APScheduler 3 documents that a job store
must never be shared between schedulers (so it cannot give once-per-interval across processes), and its
4.x line that can is a pre-release not meant for production.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.engine import Engine

from core.clock import Clock, utcnow
from core.errors import CrmBridgeError
from core.scheduler import service
from core.scheduler.jobs import JOBS, JobSpec
from core.scheduler.models import Outcome

log = logging.getLogger("crmbridge.scheduler")

MAX_SLEEP = 30.0  # look again at least this often (a dead scheduler's lease may have lapsed)


def scheduler_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def error_text(exc: BaseException) -> str:
    """A one-line error for the job's row and the Overview: our errors' own message (it names the fix);
    for anything else its type and first line (never the SQL parameters or a traceback)."""
    if isinstance(exc, CrmBridgeError):
        return str(exc)[:1000]
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:1000]


@dataclass
class RunRecord:
    job: str
    outcome: Outcome
    summary: str | None = None
    error: str | None = None


@dataclass
class Scheduler:
    engine: Engine
    intervals: dict[str, int]
    lease: timedelta = timedelta(seconds=120)
    jobs: Sequence[JobSpec] = JOBS
    clock: Clock = utcnow
    name: str = field(default_factory=scheduler_name)
    on_run: Callable[[RunRecord], None] | None = None

    def __post_init__(self) -> None:
        missing = [j.name for j in self.jobs if j.name not in self.intervals]
        if missing:
            raise ValueError(f"no interval for {', '.join(missing)}")
        service.ensure_rows(self.engine, [j.name for j in self.jobs])

    # -- one job, one window ------------------------------------------------------------------------
    def run_job(self, spec: JobSpec) -> RunRecord | None:
        """Run ``spec`` if this scheduler wins its current window; None when it is not ours to run."""
        interval = self.intervals[spec.name]
        c = service.claim(self.engine, job=spec.name, interval_seconds=interval, owner=self.name,
                          now=self.clock(), lease=self.lease)
        if c is None:
            return None
        log.debug("scheduler %s: %s started (window %s)", self.name, spec.name, f"{c.window_start:%Y-%m-%d %H:%M:%S}")
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(c, done), name=f"lease-{spec.name}", daemon=True)
        beat.start()
        try:
            summary = spec.run(self.engine, self.clock())
            record = RunRecord(spec.name, Outcome.success, summary=summary)
        except Exception as exc:  # noqa: BLE001 - a failed job is recorded, the scheduler goes on
            log.exception("scheduler %s: %s failed", self.name, spec.name)
            record = RunRecord(spec.name, Outcome.failed, error=error_text(exc))
        finally:
            done.set()
            beat.join(5)
        try:
            service.finish(self.engine, c, now=self.clock(), outcome=record.outcome, summary=record.summary,
                           error=record.error)
        except Exception:  # noqa: BLE001 - the lease lapses and the next window runs it again
            log.exception("scheduler %s: could not record the end of %s", self.name, spec.name)
        idle = spec.quiet and record.outcome == Outcome.success and (record.summary or "").startswith("0 ")
        log.log(logging.DEBUG if idle else logging.INFO, "scheduler %s: %s %s%s", self.name, spec.name,
                record.outcome.value, f": {record.summary or record.error}" if (record.summary or record.error) else "")
        if self.on_run is not None:
            self.on_run(record)
        return record

    def _heartbeat(self, c: service.Claim, done: threading.Event) -> None:
        every = max(0.5, c.lease.total_seconds() / 3)
        while not done.wait(every):
            try:
                if not service.renew(self.engine, c, now=self.clock()):
                    log.warning("scheduler %s: lost the lease of %s (another scheduler took it over)",
                                self.name, c.job)
                    return
            except Exception:  # noqa: BLE001 - try again on the next beat
                log.exception("scheduler %s: renewing the lease of %s failed", self.name, c.job)

    def run_once(self, names: Iterable[str] | None = None) -> list[RunRecord]:
        """Every (or each named) job that is due now and ours to run, one after the other."""
        wanted = set(names) if names is not None else None
        out = []
        for spec in self.jobs:
            if wanted is None or spec.name in wanted:
                r = self.run_job(spec)
                if r is not None:
                    out.append(r)
        return out

    # -- the process --------------------------------------------------------------------------------
    def seconds_to_next(self, spec: JobSpec, now: datetime) -> float:
        """Until the job's next window (plus a little jitter so N schedulers do not hit the row at the
        same instant), looking again at least every MAX_SLEEP seconds."""
        interval = self.intervals[spec.name]
        wait = (service.next_window(now, interval) - now).total_seconds()
        jitter = random.uniform(0, min(0.5, interval * 0.1))
        return max(0.05, min(wait + jitter, MAX_SLEEP))

    def serve(self, stop: threading.Event, names: Iterable[str] | None = None) -> None:
        """Run until ``stop`` is set: one thread per job."""
        wanted = set(names) if names is not None else None
        specs = [s for s in self.jobs if wanted is None or s.name in wanted]

        def loop(spec: JobSpec) -> None:
            while not stop.is_set():
                try:
                    self.run_job(spec)
                except Exception:  # noqa: BLE001 - the database went away, say: keep going
                    log.exception("scheduler %s: claiming %s failed", self.name, spec.name)
                    stop.wait(5)
                    continue
                stop.wait(self.seconds_to_next(spec, self.clock()))

        threads = [threading.Thread(target=loop, args=(s,), name=f"job-{s.name}", daemon=True) for s in specs]
        log.info("scheduler %s: %s", self.name,
                 ", ".join(f"{s.name} every {self.intervals[s.name]} s" for s in specs))
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
        log.info("scheduler %s: stopped", self.name)
