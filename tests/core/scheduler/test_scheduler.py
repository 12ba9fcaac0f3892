"""`crmbridge scheduler`: each periodic job once per interval window however many schedulers run (the
database's conditional UPDATE decides), takeover after a dead scheduler's lease lapses, each run's
start/end/outcome/error recorded, and the status the Overview shows (late, failed, never ran)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core.clock import FrozenClock
from core.errors import AccessDenied, ProviderUnavailable
from core.scheduler import service
from core.scheduler.jobs import JOBS, JobSpec, configured_intervals
from core.scheduler.loop import Scheduler, error_text
from core.scheduler.models import Outcome, PeriodicJob, PeriodicRun
from core.settings import Settings
from core.tenants.access import Principal

STAFF = Principal(role="staff", email="cs@crmbridge.example")
START = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)  # on a window boundary for 60 s and daily


class Recorder:
    """Job functions that record each call (which scheduler, at what time) and can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, datetime]] = []
        self.lock = threading.Lock()
        self.fail: Exception | None = None

    def spec(self, name: str, who: list[str]) -> JobSpec:
        def run(engine: Engine, now: datetime) -> str:
            with self.lock:
                self.calls.append((name, who[0], now))
            if self.fail is not None:
                raise self.fail
            return f"{name} did its work"

        return JobSpec(name, name.title(), "test job", "schedule_sync_seconds", run)


def two_schedulers(db: Engine, clock: FrozenClock, rec: Recorder, intervals: dict[str, int],
                   lease: timedelta = timedelta(seconds=60)) -> tuple[Scheduler, Scheduler]:
    out = []
    for name in ("sched-a", "sched-b"):
        specs = [rec.spec(job, [name]) for job in intervals]
        out.append(Scheduler(db, intervals, lease=lease, jobs=specs, clock=clock, name=name))
    return out[0], out[1]


def runs(db: Engine, job: str | None = None) -> list[PeriodicRun]:
    with Session(db) as s:
        q = select(PeriodicRun).order_by(col(PeriodicRun.id))
        if job:
            q = q.where(PeriodicRun.job == job)
        return list(s.exec(q))


def row(db: Engine, job: str) -> PeriodicJob:
    with Session(db) as s:
        r = s.get(PeriodicJob, job)
        assert r is not None
        return r


def test_two_schedulers_run_each_job_once_per_window(file_engine: Engine) -> None:
    clock, rec = FrozenClock(START), Recorder()
    a, b = two_schedulers(file_engine, clock, rec, {"fast": 60, "daily": 86400})
    a.run_once()
    b.run_once()  # same window: nothing left for b
    assert Counter(c[0] for c in rec.calls) == {"fast": 1, "daily": 1}
    clock.advance(seconds=59)  # still the same 60 s window
    b.run_once()
    a.run_once()
    assert len(rec.calls) == 2
    clock.advance(seconds=1)  # 09:01:00, the next window of the fast job; the daily one waits for midnight
    b.run_once()
    a.run_once()
    assert [(c[0], c[1]) for c in rec.calls[2:]] == [("fast", "sched-b")]
    clock.advance(hours=15)  # 00:01 the next day: one run each, not one per missed window
    a.run_once()
    b.run_once()
    assert Counter(c[0] for c in rec.calls) == {"fast": 3, "daily": 2}
    fast = row(file_engine, "fast")
    assert fast.last_outcome == Outcome.success and fast.last_summary == "fast did its work"
    assert fast.runs_total == 3 and fast.last_owner == "sched-a" and fast.lease_token is None
    assert fast.last_started_at == fast.last_finished_at == clock()
    windows = [(r.job, r.window_start) for r in runs(file_engine)]
    assert len(windows) == len(set(windows)) == 5


def test_racing_schedulers_never_run_a_window_twice(file_engine: Engine) -> None:
    """Four schedulers on four threads hit the same job at the same instant, window after window: the
    database lets exactly one of them run it each time (SQLite: BEGIN IMMEDIATE; PostgreSQL: the row
    lock and the re-checked WHERE clause)."""
    clock, rec = FrozenClock(START), Recorder()
    scheds = [Scheduler(file_engine, {"race": 60}, jobs=[rec.spec("race", [f"s{i}"])], clock=clock, name=f"s{i}")
              for i in range(4)]
    windows = 12
    barrier = threading.Barrier(len(scheds))
    errors: list[BaseException] = []

    def go(s: Scheduler) -> None:
        try:
            s.run_once()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        barrier.wait(60)

    for _ in range(windows):
        threads = [threading.Thread(target=go, args=(s,)) for s in scheds]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        clock.advance(seconds=60)
    assert errors == []
    per_window = Counter(c[2] for c in rec.calls)
    assert len(per_window) == windows and set(per_window.values()) == {1}
    assert row(file_engine, "race").runs_total == windows


def test_a_dead_schedulers_job_is_taken_over_after_its_lease_lapses(file_engine: Engine) -> None:
    clock, rec = FrozenClock(START), Recorder()
    a, b = two_schedulers(file_engine, clock, rec, {"daily": 86400}, lease=timedelta(seconds=120))
    # scheduler a wins the window and dies before finishing (no heartbeat, no finish)
    dead = service.claim(file_engine, job="daily", interval_seconds=86400, owner="sched-a", now=clock(),
                         lease=timedelta(seconds=120))
    assert dead is not None
    assert b.run_once() == []  # a holds the lease: b does not run it
    st = service.job_status(row(file_engine, "daily"), name="daily", title="", what="", interval_seconds=86400,
                            now=clock())
    assert st.status == "running" and not st.late
    clock.advance(seconds=121)
    st = service.job_status(row(file_engine, "daily"), name="daily", title="", what="", interval_seconds=86400,
                            now=clock())
    assert st.status == "stalled" and st.late  # the Overview says so until someone takes over
    [r] = b.run_once()  # same day, lease lapsed: b takes it over
    assert r.outcome == Outcome.success and [(c[0], c[1]) for c in rec.calls] == [("daily", "sched-b")]
    history = runs(file_engine, "daily")
    assert [(h.owner, h.outcome) for h in history] == [("sched-a", "abandoned"), ("sched-b", "success")]
    assert "stopped renewing" in (history[0].error or "")
    # the dead scheduler's late writes change nothing
    assert service.renew(file_engine, dead, now=clock()) is False
    assert service.finish(file_engine, dead, now=clock(), outcome=Outcome.success) is False
    assert row(file_engine, "daily").last_owner == "sched-b"
    assert a.run_once() == []  # and the window is done


def test_a_running_job_keeps_its_lease_by_renewing_it(file_engine: Engine) -> None:
    clock = FrozenClock(START)
    service.ensure_rows(file_engine, ["slow"])
    c = service.claim(file_engine, job="slow", interval_seconds=60, owner="a", now=clock(), lease=timedelta(seconds=30))
    assert c is not None
    for _ in range(5):  # a job running for 2.5 lease lengths, heartbeat every 15 s
        clock.advance(seconds=15)
        assert service.renew(file_engine, c, now=clock())
        assert service.claim(file_engine, job="slow", interval_seconds=60, owner="b", now=clock(),
                             lease=timedelta(seconds=30)) is None
    assert service.finish(file_engine, c, now=clock(), outcome=Outcome.success, summary="done")


def test_a_failed_run_records_its_error_and_the_next_window_tries_again(file_engine: Engine) -> None:
    clock, rec = FrozenClock(START), Recorder()
    a, _ = two_schedulers(file_engine, clock, rec, {"alerts": 300})
    rec.fail = ProviderUnavailable("The SMTP relay refused the connection: check CRMBRIDGE_SMTP_HOST.")
    [r] = a.run_once()
    assert r.outcome == Outcome.failed
    failed = row(file_engine, "alerts")
    assert failed.last_outcome == "failed" and failed.failures_in_a_row == 1 and failed.lease_token is None
    assert failed.last_error == "The SMTP relay refused the connection: check CRMBRIDGE_SMTP_HOST."
    assert failed.last_success_at is None and failed.last_finished_at == clock()
    st = service.job_status(failed, name="alerts", title="", what="", interval_seconds=300, now=clock())
    assert st.status == "failed" and not st.late
    assert a.run_once() == []  # a failure does not retry inside its window (no hot loop)
    rec.fail = None
    clock.advance(seconds=300)
    [r] = a.run_once()
    assert r.outcome == Outcome.success
    ok = row(file_engine, "alerts")
    assert ok.failures_in_a_row == 0 and ok.last_error is None and ok.last_success_at == clock()


def test_error_text_is_one_line_without_sql_parameters() -> None:
    from sqlalchemy.exc import IntegrityError

    exc = IntegrityError("INSERT INTO x VALUES (%(secret)s)", {"secret": "canary-31337"}, Exception("dup key"))
    text = error_text(exc)
    assert text.startswith("IntegrityError: ") and "canary" not in text and "\n" not in text


def test_status_says_when_each_job_last_ran_and_whether_it_is_late() -> None:
    now = START + timedelta(hours=3)

    def status(started: datetime | None, outcome: str = "success", interval: int = 300) -> service.JobStatus:
        r = PeriodicJob(name="j", last_started_at=started, last_finished_at=started, last_outcome=outcome)
        return service.job_status(None if started is None else r, name="j", title="J", what="",
                                  interval_seconds=interval, now=now)

    assert status(None).status == "never ran" and status(None).late
    assert status(now - timedelta(seconds=100)).status == "on time"
    on_time = status(now - timedelta(seconds=100))
    assert on_time.next_due_at == service.next_window(now - timedelta(seconds=100), 300)
    # due at the next 5-minute window, late once half an interval (150 s) past it: now is 12:00:00
    assert status(now - timedelta(seconds=299)).status == "on time"  # ran 11:55:01, due 12:00, late 12:02:30
    assert status(now - timedelta(seconds=301)).late  # ran 11:54:59, due 11:55, late since 11:57:30
    assert status(now - timedelta(hours=2)).status == "late"
    assert status(now - timedelta(seconds=10), outcome="failed").status == "failed"
    # a daily job that ran yesterday at 09:00 is due at midnight and late an hour after that
    assert status(START - timedelta(days=1), interval=86400).status == "late"
    assert status(START, interval=86400).status == "on time"


def test_status_is_for_staff(engine: Engine) -> None:
    with Session(engine) as s:
        rows = service.periodic_status(session=s, principal=STAFF, now=START)
        assert [r.name for r in rows] == [j.name for j in JOBS]
        assert all(r.status == "never ran" for r in rows)
        for who in (Principal(role="tenant_admin", email="a@acme.example", tenant_id=1),
                    Principal(role="leadership", email="vp@crmbridge.example")):
            with pytest.raises(AccessDenied):
                service.periodic_status(session=s, principal=who)


def test_intervals_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRMBRIDGE_SCHEDULE_POSTURE_SECONDS", "7")
    intervals = configured_intervals(Settings())
    assert intervals["posture-snapshot"] == 7
    assert intervals["sync-schedule"] == 60 and intervals["alerts-digest"] == 86400
    assert set(intervals) == {"sync-schedule", "sync-wake", "vault-sweep", "alerts-run", "alerts-digest",
                              "sso-watch", "posture-snapshot"}


def test_every_real_job_runs_and_records_success(file_engine: Engine, vault_keys: Any) -> None:
    """The jobs the README lists, wired to their services, on an empty database."""
    clock = FrozenClock(START)
    sched = Scheduler(file_engine, configured_intervals(Settings()), clock=clock, name="real")
    records = sched.run_once()
    assert {r.job: r.outcome for r in records} == {j.name: Outcome.success for j in JOBS}
    with Session(file_engine) as s:
        rows = service.periodic_status(session=s, principal=STAFF, now=clock())
    assert {r.name: r.status for r in rows} == {j.name: "on time" for j in JOBS}
    assert next(r for r in rows if r.name == "posture-snapshot").last_summary == \
        "today's posture snapshot recorded for 0 tenant(s)"


def test_history_is_pruned(file_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "KEEP_RUNS", 3)
    clock, rec = FrozenClock(START), Recorder()
    a, _ = two_schedulers(file_engine, clock, rec, {"fast": 60})
    for _ in range(6):
        a.run_once()
        clock.advance(seconds=60)
    kept = runs(file_engine, "fast")
    assert [r.started_at for r in kept] == [START + timedelta(minutes=m) for m in (3, 4, 5)]  # the newest 3
    assert row(file_engine, "fast").runs_total == 6


def test_serve_stops_on_request(file_engine: Engine) -> None:
    rec = Recorder()
    sched = Scheduler(file_engine, {"tick": 1}, jobs=[rec.spec("tick", ["s"])], name="s")
    stop = threading.Event()
    t = threading.Thread(target=sched.serve, args=(stop,))
    t.start()
    deadline = threading.Event()
    for _ in range(600):  # until it has run at least once (generous on a busy machine)
        if rec.calls:
            break
        deadline.wait(0.1)
    stop.set()
    t.join(60)
    assert not t.is_alive() and rec.calls
