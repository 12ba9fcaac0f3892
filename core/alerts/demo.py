"""Demo data for alerts: BigCorp's admin receives its alerts by email, staff get the digest, and one
evaluation of every source so the Alerts page shows what the demo tenants' data says. Deliveries stay
queued until `crmbridge alerts run` (demo mode has no mail server unless you start one).

Also enrols the demo staff accounts in TOTP (core.accounts.demo): core.demo calls the package demos
it lists, and until it lists core.accounts.demo this is where that happens (idempotent either way).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from core.accounts.demo import enrol_demo_staff
from core.alerts import engine, service, sources
from core.alerts.rules import params_for
from core.tenants.access import Principal


def load_demo(session: Any, *, scenario: dict[str, Any], principal: Principal, now: datetime,
              tenants: dict[str, int]) -> None:
    enrol_demo_staff(session, now=now)
    staff = [c["email"] for c in scenario.get("console_accounts", []) if c.get("role") == "staff"]
    if staff:
        service.add_email_channel(session=session, principal=principal, tenant_id=None, name="Customer success",
                                  recipients=", ".join(staff), now=now)
    for c in scenario.get("console_accounts", []):
        tid = tenants.get(c.get("tenant", ""))
        if c.get("role") == "tenant_admin" and tid is not None:
            service.add_email_channel(session=session, principal=principal, tenant_id=tid, name="Admins",
                                      recipients=c["email"], now=now)
    got = sources.collect(session, now=now, params=lambda _t, rule: params_for(rule))
    engine.evaluate(session, observations=got.observations, covered=got.covered, now=now)
    session.flush()
