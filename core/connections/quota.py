"""API usage samples and the quota gauge with its forecast.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from core.clock import aware, utcnow
from core.connections.accounts import FORECAST_WINDOW, _load
from core.connections.models import ApiUsageSample
from core.providers.base import ApiUsage
from core.tenants.access import Principal
from core.tenants.models import CrmAccount

log = logging.getLogger(__name__)


# -- API usage and the quota gauge -----------------------------------------------------------------
def _add_sample(session: Session, account: CrmAccount, usage: ApiUsage, now: datetime) -> ApiUsageSample:
    assert account.id is not None
    sample = ApiUsageSample(
        tenant_id=account.tenant_id, crm_account_id=account.id, observed_at=usage.observed_at or now,
        used=max(usage.used, 0), limit=max(usage.limit, 0), window=usage.window[:30],
        source=str(usage.extra.get("source", ""))[:40],
    )
    session.add(sample)
    return sample


def record_api_usage(
    *, session: Session, principal: Principal, account_id: int, usage: ApiUsage, now: datetime | None = None
) -> ApiUsageSample:
    """Keep one reading of the CRM's own API counter (workers call this after each run)."""
    account = _load(session, principal, account_id)
    sample = _add_sample(session, account, usage, now or utcnow())
    session.flush()
    return sample


@dataclass
class QuotaGauge:
    used: int | None
    limit: int | None
    observed_at: datetime | None
    window: str = "24h rolling"
    rate_per_hour: float | None = None
    exhausted_at: datetime | None = None
    samples: list[tuple[datetime, int]] = field(default_factory=list)

    @property
    def fraction(self) -> float | None:
        if self.used is None or not self.limit:
            return None
        return self.used / self.limit

    @property
    def status(self) -> str:
        f = self.fraction
        if f is None:
            return "unknown"
        if f >= 1:
            return "exhausted"
        if f >= 0.9:
            return "critical"
        if f >= 0.75:
            return "warning"
        return "ok"

    def forecast_text(self, now: datetime) -> str:
        if self.used is None:
            return "No API usage recorded yet: run a connection test."
        if self.status == "exhausted":
            return "The allocation is used up: calls fail with REQUEST_LIMIT_EXCEEDED until the window frees."
        name, span, rolling = window_terms(self.window)
        rate = f" ({self.rate_per_hour:,.0f} calls/hour)" if self.rate_per_hour else ""
        lasts = f"At this rate{rate} the {name} allocation will last the window."
        if self.exhausted_at is None or not self.rate_per_hour:
            return lasts
        # A rolling window frees the calls made ``span`` ago: at a steady rate the usage levels off at
        # rate × span, so it runs out only when that exceeds the limit. A fixed window resets after ``span``.
        levels_off_at = self.rate_per_hour * span.total_seconds() / 3600 if span is not None else None
        if rolling and levels_off_at is not None and self.limit is not None and levels_off_at <= self.limit:
            return lasts
        if span is not None and self.exhausted_at - now > span:
            return lasts
        when = self.exhausted_at.strftime("%H:%M UTC")
        if self.exhausted_at.date() != now.date():
            when = self.exhausted_at.strftime("%a %d %b %H:%M UTC")
        return f"At this rate{rate} the {name} allocation is used up by {when}."


def window_terms(window: str | None) -> tuple[str, timedelta | None, bool]:
    """The vendor's quota window in words: ("24-hour", 24 h, rolling) for "24h rolling", ("daily",
    1 day, fixed) for "day", ("5-minute", 5 min, rolling) for "5min", ("10-second", ...) for "10s"."""
    text = (window or "").strip().lower()
    rolling = "rolling" in text or text.endswith(("min", "s")) and not text.endswith("ms")
    m = re.match(r"^(\d+)\s*(h|hour|hours|min|m|s|sec|d|day|days)\b", text)
    if text in ("day", "daily"):
        return "daily", timedelta(days=1), False
    if m is None:
        return (text or "API"), None, rolling
    n, unit = int(m.group(1)), m.group(2)
    if unit in ("h", "hour", "hours"):
        return f"{n}-hour", timedelta(hours=n), rolling
    if unit in ("min", "m"):
        return f"{n}-minute", timedelta(minutes=n), True
    if unit in ("s", "sec"):
        return f"{n}-second", timedelta(seconds=n), True
    return (f"{n}-day" if n != 1 else "daily"), timedelta(days=n), rolling


def quota_gauge(
    *, session: Session, principal: Principal, account_id: int, now: datetime | None = None
) -> QuotaGauge:
    """Latest usage and a forecast of when the allocation runs out at the recent rate (least squares
    over the last six hours of samples; no forecast when usage is flat or falling)."""
    now = now or utcnow()
    account = _load(session, principal, account_id)
    rows = session.exec(
        select(ApiUsageSample).where(ApiUsageSample.crm_account_id == account.id,
                                     col(ApiUsageSample.observed_at) >= now - timedelta(hours=24),
                                     col(ApiUsageSample.observed_at) <= now)
        .order_by(col(ApiUsageSample.observed_at))
    ).all()
    if not rows:
        latest = session.exec(select(ApiUsageSample).where(ApiUsageSample.crm_account_id == account.id)
                              .order_by(col(ApiUsageSample.observed_at).desc())).first()
        rows = [latest] if latest else []
    if not rows:
        return QuotaGauge(None, None, None)
    last = rows[-1]
    gauge = QuotaGauge(used=last.used, limit=last.limit, observed_at=aware(last.observed_at), window=last.window,
                       samples=[(aware(r.observed_at) or now, r.used) for r in rows])
    recent = [r for r in rows if (aware(r.observed_at) or now) >= now - FORECAST_WINDOW]
    if len(recent) >= 2:
        t0 = aware(recent[0].observed_at) or now
        xs = [((aware(r.observed_at) or now) - t0).total_seconds() / 3600 for r in recent]
        ys = [float(r.used) for r in recent]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var > 0:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
            if slope > 0:
                gauge.rate_per_hour = slope
                if last.used < last.limit:
                    base = aware(last.observed_at) or now
                    gauge.exhausted_at = base + timedelta(hours=(last.limit - last.used) / slope)
    return gauge
