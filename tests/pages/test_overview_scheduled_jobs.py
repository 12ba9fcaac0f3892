"""The Overview tells staff when each periodic job last ran and whether it is late or failed."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session

from core.clock import FrozenClock, utcnow
from core.scheduler.jobs import configured_intervals
from core.scheduler.loop import Scheduler
from core.scheduler.models import PeriodicJob
from core.settings import Settings
from core.tenants.access import Principal
from tests.conftest import make_tenant, page_text, run_page

STAFF = Principal(role="staff", email="cs@crmbridge.example", account_id=1)


def test_staff_are_told_to_start_the_scheduler_when_no_job_ever_ran(app_db):
    at = run_page("overview.py", STAFF)
    assert not at.exception
    text = page_text(at)
    assert "Scheduled jobs" in text and "No scheduled job has run yet" in text and "crmbridge scheduler" in text
    assert text.count("never ran") >= 7


def test_staff_see_each_jobs_last_run_and_which_are_late_or_failed(app_db, vault_keys):
    with Session(app_db) as s:
        make_tenant(s, "acme")
    clock = FrozenClock(utcnow())
    Scheduler(app_db, configured_intervals(Settings()), clock=clock, name="sched-1").run_once()
    text = page_text(run_page("overview.py", STAFF))
    assert "No scheduled job has run yet" not in text and "Late:" not in text
    assert "today's posture snapshot recorded for 1 tenant(s)" in text and "on time" in text
    assert "sched-1" in text
    with Session(app_db) as s:  # the scheduler stopped two days ago; the last alerts run failed
        posture = s.get(PeriodicJob, "posture-snapshot")
        assert posture is not None
        posture.last_started_at = posture.last_finished_at = clock() - timedelta(days=2)
        alerts = s.get(PeriodicJob, "alerts-run")
        assert alerts is not None
        alerts.last_outcome, alerts.last_error = "failed", "The SMTP relay refused the connection: check the host."
        s.add_all([posture, alerts])
        s.commit()
    at = run_page("overview.py", STAFF)
    late = "\n".join(w.value for w in at.warning)
    assert "Posture snapshot" in late and "2 d ago" in late and "Alerts" not in late
    errors = "\n".join(e.value for e in at.error)
    assert "Alerts" in errors and "SMTP relay refused" in errors


def test_tenant_admins_and_leadership_do_not_see_the_platform_jobs(app_db):
    with Session(app_db) as s:
        t = make_tenant(s, "acme")
    admin = Principal(role="tenant_admin", email="admin@acme.example", tenant_id=t.id)
    for who in (admin, Principal(role="leadership", email="vp@crmbridge.example")):
        at = run_page("overview.py", who)
        assert not at.exception and "Scheduled jobs" not in page_text(at)
