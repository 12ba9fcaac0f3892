"""Demo sync history, so the Users & sync page tells each demo tenant's story on first start.

Jobs come from the scheduler (one per API-user account, one per user of a per-user account); runs over
the last two days are generated with a seeded random generator, then each tenant gets its situation:

- ``tinyco`` (each user's stored password): most users healthy; one user failing for an hour (three
  5xx in a row); the last user never connected (reconnect needed); the vault demo's 27-day-old login
  shows as "expiring". One change was rejected by a validation rule and waits on its outbox row.
- ``profco`` (Professional without the API add-on): every run fails with API_DISABLED_FOR_ORG and its fix.
- ``bigcorp``: two healthy API-user orgs; EMEA hit its API limit yesterday (paused, then recovered),
  and one conflict was settled in the CRM's favour.
- ``dynco``: healthy; its pushed changes carry the impersonated Dynamics user in the audit log.
- ``hubco``: paused by its admin during a data clean-up.
- ``newco`` is still onboarding: no jobs yet.
"""

from __future__ import annotations

import json
import random
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlmodel import Session, col, select

from core.sync.engine import VIA_API_USER, VIA_OWN, acts_as_user
from core.sync.health import fix_for
from core.sync.models import (
    JobState,
    OutboxStatus,
    RunStatus,
    SyncAccountState,
    SyncConflict,
    SyncJob,
    SyncOpportunity,
    SyncOutbox,
    SyncRun,
)
from core.sync.scheduler import ensure_jobs
from core.tenants.access import Principal
from core.tenants.audit import record_event
from core.tenants.models import AppUser, AppUserCrmIdentity, CrmAccount

HISTORY = timedelta(hours=48)
DEMO_INTERVAL = 900  # the demo jobs run every 15 minutes
DEALS = ["Renewal", "Expansion", "New logo", "Pilot", "Upsell", "Services", "Multi-year", "Cross-sell"]
STAGES = ["Prospecting", "Qualification", "Needs Analysis", "Proposal/Price Quote", "Negotiation/Review",
          "Closed Won"]


def _runs(session: Session, job: SyncJob, rng: random.Random, now: datetime, *,
          fail_last: int = 0, error: str | None = None, fix: str | None = None, code: str | None = None,
          rate_limited_at: datetime | None = None) -> None:
    """A run every interval over the last 48 h (a few transient failures), the last ``fail_last`` failed."""
    job.interval_seconds = DEMO_INTERVAL
    every = timedelta(seconds=DEMO_INTERVAL)
    t = now - HISTORY + timedelta(minutes=rng.randrange(0, 15))
    times: list[datetime] = []
    while t < now - timedelta(minutes=1):
        times.append(t)
        t += every + timedelta(seconds=rng.randrange(-90, 90))
    last_ok: datetime | None = None
    for i, start in enumerate(times):
        failing = i >= len(times) - fail_last
        blip = not failing and rng.random() < 0.04
        status = RunStatus.failed if failing or blip else RunStatus.success
        err, efix, ecode = None, None, None
        if failing:
            err, efix, ecode = error, fix, code
        elif blip:
            err, efix, ecode = "Salesforce answered HTTP 503 while querying", fix_for_unavailable(), "503"
        if rate_limited_at is not None and abs((start - rate_limited_at).total_seconds()) < 15 * 60:
            status, ecode = RunStatus.rate_limited, "REQUEST_LIMIT_EXCEEDED"
            err = "The org's API request limit is used up (REQUEST_LIMIT_EXCEEDED)"
            efix = "The CRM's API limit is reached: the whole account is paused and resumes by itself."
        ok = status == RunStatus.success
        ins = rng.choice([0, 0, 0, 1, 1, 2, 3, 5, 8]) if ok else 0
        outs = rng.choice([0, 0, 1, 1, 2, 4]) if ok else 0
        session.add(SyncRun(job_id=job.id, tenant_id=job.tenant_id, crm_account_id=job.crm_account_id,  # type: ignore[arg-type]
                            app_user_id=job.app_user_id, worker="demo-worker:1/0", status=status.value,
                            started_at=start, finished_at=start + timedelta(seconds=rng.uniform(0.8, 6.0)),
                            records_in=ins, records_out=outs, duplicates=rng.randrange(0, 3), api_calls=2 + (outs > 0),
                            auth_calls=1, error=err, error_code=ecode, fix=efix))
        if ok:
            last_ok = start
    job.runs_total = len(times)
    job.last_run_at = times[-1] if times else None
    job.last_success_at = last_ok
    job.consecutive_failures = fail_last
    job.watermark = last_ok
    job.next_run_at = now + timedelta(minutes=rng.randrange(1, 5))
    if fail_last:
        job.last_error, job.last_error_fix, job.last_error_code = error, fix, code
        job.last_error_at = times[-1]
        job.attempts = fail_last
        if fail_last >= 3:
            job.failing_since = times[-fail_last + 2]
    session.add(job)


def fix_for_unavailable() -> str:
    from core.errors import ProviderUnavailable

    return fix_for(ProviderUnavailable("")) or ""


def _mirror(session: Session, account: CrmAccount, rng: random.Random, now: datetime,
            n: int = 8) -> list[SyncOpportunity]:
    owners: list[str | None] = [i.crm_user_id for i in session.exec(
        select(AppUserCrmIdentity).where(AppUserCrmIdentity.crm_account_id == account.id))]
    owners = owners or [None]
    rows = []
    for i in range(n):
        rows.append(SyncOpportunity(
            tenant_id=account.tenant_id, crm_account_id=account.id,  # type: ignore[arg-type]
            crm_id=f"006DEMO{account.id:03d}{i:05d}", name=f"{rng.choice(DEALS)} — {account.label} {i + 1}",
            stage=rng.choice(STAGES), amount=Decimal(rng.randrange(5, 400) * 250),
            close_date=date.fromordinal(now.date().toordinal() + rng.randrange(-20, 120)),
            owner_crm_id=rng.choice(owners), crm_modified_at=now - timedelta(hours=rng.uniform(1, 40)),
            created_at=now, updated_at=now))
    session.add_all(rows)
    session.flush()
    return rows


def _pushed(session: Session, account: CrmAccount, opp: SyncOpportunity, user: AppUser, fields: dict[str, str],
            at: datetime, *, via: str, impersonated: str | None = None) -> None:
    key = f"crb-demo-{account.id}-{opp.id}-{user.id}"
    session.add(SyncOutbox(tenant_id=account.tenant_id, crm_account_id=account.id, opportunity_id=opp.id,  # type: ignore[arg-type]
                           idempotency_key=key, operation="update", actor_app_user_id=user.id,  # type: ignore[arg-type]
                           actor_label=user.email, fields_json=json.dumps(fields), base_json="{}",
                           status=OutboxStatus.applied.value, attempts=1, via=via, created_at=at, updated_at=at,
                           applied_at=at))
    details: dict[str, Any] = {"crm_account_id": account.id, "idempotency_key": key, "fields": fields, "demo": True}
    if impersonated:
        details["impersonated_crm_user"] = impersonated
    record_event(session, principal=user.email, action="opportunity.update", tenant_id=account.tenant_id,
                 target=f"opportunity:{opp.crm_id}", details=details, via=via, at=at)


def load_demo(session: Session, *, scenario: dict[str, Any], principal: Principal, now: datetime,
              tenants: dict[str, int]) -> int:
    """Create the demo tenants' jobs and a plausible sync history. Returns the number of runs made."""
    ensure_jobs(session, now=now, principal=principal)
    session.flush()
    ids = set(tenants.values())
    by_slug = {v: k for k, v in tenants.items()}
    jobs = [j for j in session.exec(select(SyncJob).order_by(col(SyncJob.id))) if j.tenant_id in ids]
    accounts = {a.id: a for a in session.exec(select(CrmAccount).where(col(CrmAccount.tenant_id).in_(ids)))}
    users = {u.id: u for u in session.exec(select(AppUser).where(col(AppUser.tenant_id).in_(ids)))}
    made = 0
    seen_accounts: set[int] = set()
    for job in jobs:
        account = accounts[job.crm_account_id]
        slug = by_slug.get(job.tenant_id, "")
        rng = random.Random(f"crmbridge-demo:{slug}:{job.owner_key}:{account.label}")
        per_account = [j for j in jobs if j.crm_account_id == job.crm_account_id]
        first_of_account = job.crm_account_id not in seen_accounts
        seen_accounts.add(job.crm_account_id)
        if first_of_account:
            opps = _mirror(session, account, rng, now)
        if job.state == JobState.reconnect_needed:
            job.reconnect_since = now - timedelta(days=3)
            job.last_error = ("No credential is stored for this user: ask the user to reconnect (create a connect "
                              "link on the Users & sync page).")
            job.last_error_fix = ("No usable credential is stored: ask the user to reconnect (Users & sync → Ask to "
                                  "reconnect).")
            job.last_error_at = now - timedelta(days=3)
            job.consecutive_failures = 1
            session.add(job)
            continue
        if slug == "profco":
            from core.errors import ApiDisabled

            exc = ApiDisabled("API is not enabled for this org (API_DISABLED_FOR_ORG)")
            _runs(session, job, rng, now, fail_last=192,
                  error="Salesforce says API access is not enabled for this org (API_DISABLED_FOR_ORG): "
                        "Professional edition needs the API add-on, or upgrade to Enterprise.",
                  fix=fix_for(exc), code="API_DISABLED_FOR_ORG")
        elif slug == "tinyco" and per_account.index(job) == 2:
            _runs(session, job, rng, now, fail_last=3, code="503", error="Salesforce answered HTTP 503 while querying",
                  fix=fix_for_unavailable())
            record_event(session, principal=principal, action="sync.failing", tenant_id=job.tenant_id,
                         target=f"app_user:{job.app_user_id}", at=now - timedelta(minutes=20),
                         details={"job_id": job.id, "consecutive_failures": 3, "code": "503"})
        elif slug == "bigcorp" and first_of_account and "EMEA" in account.label:
            _runs(session, job, rng, now, rate_limited_at=now - timedelta(hours=20))
            record_event(session, principal=principal, action="sync.account.rate_limited", tenant_id=job.tenant_id,
                         target=f"crm_account:{account.id}", at=now - timedelta(hours=20),
                         details={"paused_until": now - timedelta(hours=19, minutes=45),
                                  "reason": "The org's API request limit is used up (REQUEST_LIMIT_EXCEEDED)"})
            session.add(SyncAccountState(crm_account_id=account.id, tenant_id=account.tenant_id,  # type: ignore[arg-type]
                                         paused_until=now - timedelta(hours=19, minutes=45), rate_limited_count=1,
                                         pause_reason="The org's API request limit is used up", updated_at=now))
        else:
            _runs(session, job, rng, now)
        made += job.runs_total
        if not first_of_account:
            continue
        # A few pushed changes, attributed to their real actors.
        actors = [users[i.app_user_id] for i in session.exec(select(AppUserCrmIdentity).where(
            AppUserCrmIdentity.crm_account_id == account.id)) if i.app_user_id in users]
        ident = {i.app_user_id: i.crm_user_id for i in session.exec(select(AppUserCrmIdentity).where(
            AppUserCrmIdentity.crm_account_id == account.id))}
        if actors and slug != "profco":
            via = VIA_API_USER if account.credential_mode == "api_user" else VIA_OWN
            for n, opp in enumerate(opps[:3]):
                actor = actors[n % len(actors)]
                _pushed(session, account, opp, actor, {"stage": opp.stage or "Qualification"},
                        now - timedelta(hours=2 + 5 * n), via=via,
                        impersonated=ident.get(actor.id or -1) if acts_as_user(account.provider) else None)
        if slug == "tinyco" and actors:
            session.add(SyncOutbox(
                tenant_id=account.tenant_id, crm_account_id=account.id, opportunity_id=opps[4].id,  # type: ignore[arg-type]
                idempotency_key=f"crb-demo-rejected-{account.id}", operation="update",
                actor_app_user_id=actors[0].id, actor_label=actors[0].email,  # type: ignore[arg-type]
                fields_json=json.dumps({"amount": "-1200.00"}), base_json="{}", status=OutboxStatus.failed.value,
                attempts=1, last_error="Amount cannot be negative", last_error_code="FIELD_CUSTOM_VALIDATION_EXCEPTION",
                created_at=now - timedelta(hours=5), updated_at=now - timedelta(hours=5)))
        if slug == "bigcorp" and "EMEA" in account.label and actors:
            session.add(SyncConflict(
                tenant_id=account.tenant_id, crm_account_id=account.id, opportunity_id=opps[5].id,  # type: ignore[arg-type]
                crm_id=opps[5].crm_id, field="stage", app_value="Negotiation/Review", crm_value="Closed Won",
                winner="crm", resolved_at=now - timedelta(hours=6)))
        if slug == "hubco":
            session.add(SyncAccountState(crm_account_id=account.id, tenant_id=account.tenant_id,  # type: ignore[arg-type]
                                         paused_by="admin@hubco.example", paused_at=now - timedelta(hours=1),
                                         pause_reason="paused by admin@hubco.example (data clean-up)",
                                         updated_at=now))
    session.flush()
    return made
