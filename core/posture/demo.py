"""Demo posture history: 90 daily rows per demo tenant that end where the tenant stands today.

Called by ``core.demo.load_demo`` after the tenants (and the vault, SSO and sync demo data) exist.
Today's row comes from the real service (``record_daily_snapshots``); the 89 days before it tell a
plausible story that climbs to today's level: a tenant now at level 3 was on stored passwords two
months ago, moved to an API user, then tested SSO, and its users moved to SSO sign-in gradually.
Tenants still onboarding only have rows since their onboarding began.
"""

from __future__ import annotations

import logging
import zlib
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from core.posture.gather import gather_tenants
from core.posture.models import PostureSnapshot
from core.posture.service import posture_of, record_daily_snapshots, snapshot_row
from core.tenants.access import Principal

log = logging.getLogger(__name__)

HISTORY_DAYS = 90
ONBOARDING_DAYS = 12  # a tenant still onboarding started this many days ago


def _levels(slug: str, live: int, days: int) -> list[int]:
    """Levels for ``days`` past days (oldest first), rising one at a time to ``live``."""
    start = 0 if live == 0 else max(1, live - 2)
    steps = live - start
    if steps <= 0:
        return [live] * days
    jitter = zlib.crc32(slug.encode()) % 9  # deterministic, differs per tenant
    # Transitions spread over the window, e.g. at ~30% and ~65% for two steps.
    cuts = [int(days * (i + 1) / (steps + 1)) + jitter - 4 for i in range(steps)]
    out, level = [], start
    for d in range(days):
        while cuts and d >= cuts[0]:
            cuts.pop(0)
            level += 1
        out.append(level)
    return out


def _history_row(today_row: PostureSnapshot, *, level: int, live_level: int, taken_at: datetime,
                 ramp: float) -> PostureSnapshot:
    """A past day's row: today's counts, adjusted to what ``level`` implies on that day."""
    accounts = today_row.accounts_api_user + today_row.accounts_per_user_oauth + today_row.accounts_per_user_password
    row = PostureSnapshot(**today_row.model_dump(exclude={"id", "day", "taken_at"}),
                          day=taken_at.date(), taken_at=taken_at)
    row.level = level
    if level >= 3 and today_row.sso_state == "tested":
        # Users move to SSO sign-in gradually once SSO is tested.
        row.users_sso = round(today_row.users_sso * ramp)
    if level == live_level:
        return row
    row.one_step_away = True
    if level <= 1 < live_level:  # before moving off stored passwords
        row.accounts_api_user, row.accounts_per_user_oauth = 0, 0
        row.accounts_per_user_password = max(accounts, 1)
        row.stored_passwords = max(row.users_total, 1)
        row.next_rule = "per_user_passwords"
        row.findings_high = max(row.findings_high, 1)
    if level <= 2 < live_level:  # before SSO was tested
        row.sso_state = "untested" if level == 2 else "missing"
        row.users_sso = 0
        if level == 2:
            row.next_rule = "sso_untested"
        row.findings_medium = max(row.findings_medium, 1)
    if level == 3:
        row.next_rule = "api_user_without_attribution"
    if level == 0:
        row.next_rule, row.findings_blocking = "account_cannot_sync", max(row.findings_blocking, 1)
    return row


def load_demo(session: Session, *, scenario: dict[str, Any], principal: Principal, now: datetime,
              tenants: dict[str, int]) -> None:
    """Seed today's posture row (from the live data) and a 90-day history for the demo tenants."""
    ids = list(tenants.values())
    if not ids:
        return
    record_daily_snapshots(session=session, principal=principal, now=now)
    onboarding = {t["slug"] for t in scenario.get("tenants", []) if t.get("status") == "onboarding"}
    q = select(col(PostureSnapshot.tenant_id), col(PostureSnapshot.day)).where(
        col(PostureSnapshot.tenant_id).in_(ids))
    existing = {(tid, day) for tid, day in session.exec(q)}
    added = 0
    for snap in gather_tenants(session, ids, now=now):
        report = posture_of(snap)
        today_row = snapshot_row(snap, report)
        live = report.maturity.level
        days = ONBOARDING_DAYS if snap.slug in onboarding else HISTORY_DAYS - 1
        levels = _levels(snap.slug, live, days)
        first_top = next((i for i, lvl in enumerate(levels) if lvl >= 3), days)
        for i, level in enumerate(levels):
            offset = days - i  # days before today
            taken_at = now - timedelta(days=offset)
            if (snap.tenant_id, taken_at.date()) in existing:
                continue
            progress = (i - first_top + 1) / max(days - first_top, 1) if i >= first_top else 0.0
            session.add(_history_row(today_row, level=level, live_level=live, taken_at=taken_at,
                                     ramp=min(1.0, 0.3 + 0.7 * progress)))
            added += 1
    session.flush()
    log.info("posture demo: %d history rows for %d tenants", added, len(ids))
