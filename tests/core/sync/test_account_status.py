"""Issue 16: a live, syncing tenant showed its CRM accounts as "new / never tested". An account's status
comes from whichever is newer: its latest connection test or its latest finished sync run."""

from __future__ import annotations

from datetime import timedelta

import pytest

from core.errors import AccessDenied
from core.sync.models import SyncJob, SyncRun
from core.sync.service import account_statuses
from core.tenants.models import CrmAccount
from tests.conftest import admin_of, make_tenant


def _account(session, tenant, label):  # type: ignore[no-untyped-def]
    acc = CrmAccount(tenant_id=tenant.id, provider="salesforce", edition="enterprise", label=label,
                     instance_url="https://a.example")
    session.add(acc)
    session.flush()
    return acc


def _run(session, acc, *, status, finished_at):  # type: ignore[no-untyped-def]
    job = SyncJob(tenant_id=acc.tenant_id, crm_account_id=acc.id, owner_key=f"account-{status}",
                  next_run_at=finished_at)
    session.add(job)
    session.flush()
    session.add(SyncRun(job_id=job.id, tenant_id=acc.tenant_id, crm_account_id=acc.id, status=status,
                        started_at=finished_at - timedelta(seconds=30), finished_at=finished_at))
    session.flush()


def test_status_follows_the_newest_test_or_sync(session, staff, tenant, clock):
    now = clock()
    never = _account(session, tenant, "Never")
    syncing = _account(session, tenant, "Syncing")  # never tested, but the scheduler syncs it
    _run(session, syncing, status="success", finished_at=now - timedelta(minutes=5))
    retested = _account(session, tenant, "Retested")  # synced, then a failing connection test
    _run(session, retested, status="success", finished_at=now - timedelta(hours=2))
    retested.last_test_at, retested.last_test_ok = now - timedelta(minutes=10), False
    broken = _account(session, tenant, "Broken")  # tested fine, then the sync started failing
    broken.last_test_at, broken.last_test_ok = now - timedelta(days=1), True
    _run(session, broken, status="failed", finished_at=now - timedelta(minutes=1))
    session.commit()

    st = account_statuses(session=session, principal=admin_of(tenant), tenant_id=tenant.id, now=now)
    assert st[never.id].label == "new · never tested"
    assert st[syncing.id].state == "syncing" and st[syncing.id].label == "syncing · last sync 5 min ago"
    assert st[retested.id].state == "failing" and "connection test failed 10 min ago" in st[retested.id].label
    assert st[broken.id].state == "sync failing"
    with pytest.raises(AccessDenied):
        account_statuses(session=session, principal=admin_of(make_tenant(session, "globex")), tenant_id=tenant.id)
