"""The Users & sync page, per role: health table and filters, drill-down, and the admin's actions."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.clock import utcnow
from core.sync.models import JobState, RunStatus, SyncAccountState, SyncJob, SyncRun
from core.tenants.access import Principal
from core.tenants.models import AppUser, AppUserCrmIdentity, AuditEvent, CrmAccount, Tenant
from core.vault.models import VaultConnectLink
from tests.conftest import admin_of, page_text, run_page

PAGE = "users_sync.py"
STAFF = Principal(role="staff", email="cs@crmbridge.example")
LEADERSHIP = Principal(role="leadership", email="vp@crmbridge.example")


def seed(db: Engine, slug: str = "acme") -> tuple[Tenant, dict[str, int]]:
    """A per-user Salesforce account: ana healthy, bo failing (3 × 503), cy waiting for a reconnect."""
    now = utcnow()
    with Session(db, expire_on_commit=False) as s:
        t = Tenant(name=slug.title(), slug=slug, status="live")
        s.add(t)
        s.flush()
        acc = CrmAccount(tenant_id=t.id, provider="salesforce", edition="enterprise", label=f"{slug} org",  # type: ignore[arg-type]
                         credential_mode="per_user_password", instance_url="https://127.0.0.1:1/sf")
        s.add(acc)
        s.flush()
        jobs: dict[str, int] = {}
        for n, name in enumerate(("ana", "bo", "cy"), start=1):
            u = AppUser(tenant_id=t.id, email=f"{name}@{slug}.example", name=name.title())  # type: ignore[arg-type]
            s.add(u)
            s.flush()
            s.add(AppUserCrmIdentity(app_user_id=u.id, crm_account_id=acc.id, crm_user_id=f"005{slug}{n:06d}"))  # type: ignore[arg-type]
            job = SyncJob(tenant_id=t.id, crm_account_id=acc.id, app_user_id=u.id, owner_key=f"user:{u.id}",  # type: ignore[arg-type]
                          next_run_at=now + timedelta(minutes=3), created_at=now - timedelta(days=2))
            s.add(job)
            s.flush()
            for k in range(6):
                start = now - timedelta(minutes=5 * (6 - k))
                failed = name == "bo" and k >= 3
                s.add(SyncRun(job_id=job.id, tenant_id=t.id, crm_account_id=acc.id, app_user_id=u.id,  # type: ignore[arg-type]
                              status=(RunStatus.failed if failed else RunStatus.success).value, started_at=start,
                              finished_at=start + timedelta(seconds=2), records_in=0 if failed else 3,
                              records_out=0 if failed else 1, api_calls=2,
                              error="Salesforce answered HTTP 503 while querying" if failed else None,
                              fix="The CRM could not be reached: sync retries by itself with backoff." if failed
                              else None))
            job.last_success_at = now - timedelta(minutes=20 if name == "bo" else 5)
            if name == "bo":
                job.consecutive_failures = 3
                job.last_error = "Salesforce answered HTTP 503 while querying"
                job.last_error_fix = "The CRM could not be reached: sync retries by itself with backoff."
            if name == "cy":
                job.state = JobState.reconnect_needed.value
                job.last_error = "Salesforce rejected the login (INVALID_LOGIN)"
                job.last_error_fix = ("The CRM rejected the credential, so the vault destroyed it: ask the user to "
                                      "reconnect")
            s.add(job)
            jobs[name] = job.id  # type: ignore[assignment]
        s.commit()
        return t, jobs


def test_staff_sees_health_table_tiles_filters_and_drill_down(app_db: Engine) -> None:
    seed(app_db)
    at = run_page(PAGE, STAFF)
    assert not at.exception
    text = page_text(at)
    for email in ("ana@acme.example", "bo@acme.example", "cy@acme.example"):
        assert email in text
    assert "failing" in text and "reconnect needed" in text and "3 failed runs in a row" in text
    assert "**acme org** · Salesforce" in text and ":red-badge[failing]" in text  # the account tile
    assert "sync retries by itself" in text  # the last error's fix
    at.selectbox(key="sync_state_filter").select("failing").run()
    table = at.dataframe[0].value.to_csv()
    assert "bo@acme.example" in table and "ana@acme.example" not in table
    # The drill-down follows the filter: bo's runs timeline and recent errors with their fix.
    assert at.get("plotly_chart"), "the runs timeline is a plotly chart"
    assert "HTTP 503" in page_text(at)
    at.selectbox(key="sync_state_filter").select("paused").run()
    at.selectbox(key="sync_auth_filter").select("ok").run()
    assert "No user matches these filters." in page_text(at)


def test_tenant_admin_sees_only_their_tenant(app_db: Engine) -> None:
    acme, _ = seed(app_db, "acme")
    other, _ = seed(app_db, "globex")
    at = run_page(PAGE, admin_of(other))
    assert not at.exception
    text = page_text(at)
    assert "ana@globex.example" in text and "ana@acme.example" not in text


def test_leadership_gets_no_user_level_data(app_db: Engine) -> None:
    seed(app_db)
    at = run_page(PAGE, LEADERSHIP)
    assert not at.exception
    text = page_text(at)
    assert "ana@acme.example" not in text
    assert "staff and the tenant's admins" in text


def test_sync_now_pause_and_resume_are_recorded(app_db: Engine) -> None:
    tenant, jobs = seed(app_db)
    at = run_page(PAGE, admin_of(tenant))
    at.selectbox(key="sync_job_pick").select(jobs["ana"]).run()
    at.button(key="sync_now").click().run()
    assert not at.exception
    assert "sync requested" in page_text(at)
    with Session(app_db) as s:
        job = s.get(SyncJob, jobs["ana"])
        assert job is not None and job.next_run_at <= utcnow() + timedelta(seconds=1)
    at.button(key="sync_pause").click().run()
    with Session(app_db) as s:
        assert s.get(SyncJob, jobs["ana"]).state == JobState.paused  # type: ignore[union-attr]
    assert "paused" in page_text(at)
    at.button(key="sync_resume").click().run()
    with Session(app_db) as s:
        assert s.get(SyncJob, jobs["ana"]).state == JobState.active  # type: ignore[union-attr]
        actions = [e.action for e in s.exec(select(AuditEvent).where(AuditEvent.tenant_id == tenant.id))]
        assert {"sync.run_now", "sync.pause", "sync.resume"} <= set(actions)
        [actor] = {e.actor for e in s.exec(select(AuditEvent).where(AuditEvent.action == "sync.pause"))}
        assert actor == f"admin@{tenant.slug}.example"


def test_ask_to_reconnect_creates_a_connect_link_and_records_the_request(app_db: Engine) -> None:
    tenant, jobs = seed(app_db)
    at = run_page(PAGE, admin_of(tenant))
    at.selectbox(key="sync_job_pick").select(jobs["cy"]).run()
    at.button(key="sync_reconnect").click().run()
    assert not at.exception
    text = page_text(at)
    assert "Connect link created for cy@acme.example" in text and "/connect/" in text
    with Session(app_db) as s:
        [link] = s.exec(select(VaultConnectLink)).all()
        assert link.app_user_id == s.get(SyncJob, jobs["cy"]).app_user_id  # type: ignore[union-attr]
        assert s.get(SyncJob, jobs["cy"]).reconnect_requested_at is not None  # type: ignore[union-attr]
        assert s.exec(select(AuditEvent).where(AuditEvent.action == "sync.reconnect_requested")).first()
    url = next(c.value for c in at.code if "/connect/" in c.value)
    token = url.rsplit("/", 1)[-1]
    # The link is a bearer secret: shown once, never kept in session state.
    assert all(token not in str(at.session_state[k]) for k in at.session_state.keys())


def test_pause_account_pauses_every_user(app_db: Engine) -> None:
    tenant, _ = seed(app_db)
    with Session(app_db) as s:
        acc = s.exec(select(CrmAccount).where(CrmAccount.tenant_id == tenant.id)).one()
    at = run_page(PAGE, STAFF)
    at.button(key=f"pause_acc_{acc.id}").click().run()
    assert not at.exception
    with Session(app_db) as s:
        state = s.get(SyncAccountState, acc.id)
        assert state is not None and state.paused_by == STAFF.email
    at.selectbox(key="sync_state_filter").select("paused").run()
    table = at.dataframe[0].value.to_csv()
    assert "ana@acme.example" in table and "bo@acme.example" in table
