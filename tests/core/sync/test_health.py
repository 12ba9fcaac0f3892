"""Health rules: auth health apart from sync health; failing only after 3 in a row; lag; pauses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.errors import ApiDisabled, AuthenticationFailed, CrmBridgeError, ProviderUnavailable, RateLimited
from core.sync.health import AuthHealth, SyncHealth, auth_health, fix_for, lag_limit, sync_health

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
FIVE_MIN = timedelta(minutes=5)


def sync(**kw):  # type: ignore[no-untyped-def]
    args = {"job_state": "active", "account_paused": False, "consecutive_failures": 0,
            "last_success_at": NOW - timedelta(minutes=2), "created_at": NOW - timedelta(days=1),
            "interval": FIVE_MIN, "now": NOW, **kw}
    return sync_health(**args)


@pytest.mark.parametrize("failures,expected", [(0, "healthy"), (1, "healthy"), (2, "healthy"), (3, "failing"),
                                               (7, "failing")])
def test_a_user_turns_failing_only_after_three_failures_in_a_row(failures: int, expected: str) -> None:
    state, reason = sync(consecutive_failures=failures)
    assert state == expected
    if failures in (1, 2):
        assert "retrying" in reason


def test_lagging_after_three_intervals_without_success_and_at_least_fifteen_minutes() -> None:
    assert lag_limit(FIVE_MIN) == timedelta(minutes=15)
    assert lag_limit(timedelta(hours=1)) == timedelta(hours=3)
    assert sync(last_success_at=NOW - timedelta(minutes=14))[0] == SyncHealth.healthy
    state, reason = sync(last_success_at=NOW - timedelta(minutes=16))
    assert state == SyncHealth.lagging and "16 min" in reason
    # Never synced: lag counts from when the job was created.
    assert sync(last_success_at=None, created_at=NOW - timedelta(minutes=5))[0] == SyncHealth.healthy
    assert sync(last_success_at=None, created_at=NOW - timedelta(hours=2))[0] == SyncHealth.lagging
    # Failing wins over lagging: three failures in a row say more than the lag.
    assert sync(last_success_at=NOW - timedelta(hours=2), consecutive_failures=3)[0] == SyncHealth.failing


def test_paused_for_admin_pause_account_pause_and_reconnect() -> None:
    assert sync(job_state="paused") == (SyncHealth.paused, "paused by an admin")
    assert sync(account_paused=True, consecutive_failures=5)[0] == SyncHealth.paused
    assert sync(job_state="reconnect_needed")[1] == "waiting for the user to reconnect"


def test_auth_health_is_separate_from_sync_health() -> None:
    ok = {"job_state": "active", "now": NOW, "per_user": True}
    assert auth_health(credential_state="connected", ends_at=NOW + timedelta(days=20), **ok) == AuthHealth.ok
    assert auth_health(credential_state="connected", ends_at=NOW + timedelta(days=6), **ok) == AuthHealth.expiring
    assert auth_health(credential_state="connected", ends_at=None, **ok) == AuthHealth.ok
    assert auth_health(credential_state="reconnect needed", ends_at=None, **ok) == AuthHealth.reconnect_needed
    assert auth_health(credential_state="not connected", ends_at=None, **ok) == AuthHealth.reconnect_needed
    assert auth_health(credential_state="invalid", ends_at=None, **ok) == AuthHealth.failed
    parked = {**ok, "job_state": "reconnect_needed"}
    assert auth_health(credential_state=None, ends_at=None, **parked) == AuthHealth.reconnect_needed
    api_user = {**parked, "per_user": False}
    assert auth_health(credential_state="failed", ends_at=None, **api_user) == AuthHealth.failed
    assert auth_health(credential_state="connected", ends_at=None, **api_user) == AuthHealth.failed
    # A user can be failing to sync with a perfectly good credential, and the other way round.
    assert sync(consecutive_failures=3)[0] == SyncHealth.failing
    assert auth_health(credential_state="connected", ends_at=NOW + timedelta(days=2), **ok) == AuthHealth.expiring
    assert sync()[0] == SyncHealth.healthy


def test_every_error_comes_with_a_fix() -> None:
    assert "reconnect" in (fix_for(AuthenticationFailed("INVALID_LOGIN")) or "")
    assert "resumes by itself" in (fix_for(RateLimited("REQUEST_LIMIT_EXCEEDED")) or "")
    assert "API add-on" in (fix_for(ApiDisabled("API_DISABLED_FOR_ORG")) or "")
    assert "retries by itself" in (fix_for(ProviderUnavailable("503")) or "")
    assert fix_for(ProviderUnavailable("503", fix="Check status.salesforce.com")) == "Check status.salesforce.com"
    assert fix_for(CrmBridgeError("odd")) is None


def test_health_does_not_import_the_engine_it_serves() -> None:
    """The engine uses health's ``fix_for``; health must not import the engine back (a module cycle
    breaks ``import core.sync.health`` alone), not even inside a function."""
    import ast
    from pathlib import Path

    import core.sync.health as health

    tree = ast.parse(Path(health.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"core.sync.engine", "core.sync.worker", "core.sync.service"}
