"""Issue 14 (Low): anonymous junk POSTs to the ACS each wrote an audit row, and each anonymous
/sso/*/login a database row. Both are rate-limited per source, and the refusals anyone can provoke are
audited once per source and window with a count."""

from __future__ import annotations

import json

from sqlmodel import func, select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.sso.models import SsoRequest
from core.tenants.models import AuditEvent
from tests.core.sso.conftest import CONSOLE, SsoWorld
from tests.core.sso.test_round_trip import _response


def _count(w: SsoWorld, model, *where) -> int:  # type: ignore[no-untyped-def]
    with w.session() as s:
        return int(s.exec(select(func.count()).select_from(model).where(*where)).one())


def _client(address: str) -> TestClient:
    from core.sso.routes import routes

    return TestClient(Starlette(routes=routes), base_url=CONSOLE, client=(address, 40000))


def test_anonymous_sign_in_starts_are_rate_limited_per_source(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    with _client("203.0.113.7") as flood:
        codes = [flood.get("/sso/bigcorp/login", follow_redirects=False).status_code for _ in range(60)]
        last = flood.get("/sso/bigcorp/login", follow_redirects=False)
    assert codes.count(302) == 20 and codes.count(429) == 40
    assert last.status_code == 429 and int(last.headers["retry-after"]) > 0
    assert "Too many single sign-on attempts" in last.text and "Wait" in last.text
    assert _count(w, SsoRequest) == 20  # 60 attempts, 20 rows
    with _client("198.51.100.4") as someone_else:  # another source is not locked out by the flood
        assert someone_else.get("/sso/bigcorp/login", follow_redirects=False).status_code == 302


def test_junk_acs_posts_write_one_aggregated_audit_row_per_source(sso_world: SsoWorld) -> None:
    w = sso_world
    w.import_idp("bigcorp")
    refused = AuditEvent.action == "sso.idp_initiated_refused"
    before = _count(w, AuditEvent, refused)
    with _client("203.0.113.8") as flood:
        codes = [flood.post("/sso/bigcorp/acs", data=_response(w, irt=None), follow_redirects=False).status_code
                 for _ in range(40)]
    assert codes.count(403) == 30 and codes.count(429) == 10  # 30 per minute, then refused unread
    assert _count(w, AuditEvent, refused) == before + 1  # not 30 rows
    with w.session() as s:
        row = s.exec(select(AuditEvent).where(refused)).all()[-1]
    details = json.loads(row.details)
    assert details["source"] == "203.0.113.8" and details["held_back_since_last"] == 0

    with _client("198.51.100.5") as other:  # a second source gets its own row
        assert other.post("/sso/bigcorp/acs", data=_response(w, irt=None), follow_redirects=False).status_code == 403
    assert _count(w, AuditEvent, refused) == before + 2


def test_held_back_refusals_are_counted_in_the_next_row() -> None:
    from core.ratelimit import NoiseAggregator

    t = [0.0]
    agg = NoiseAggregator(600, clock=lambda: t[0])
    assert agg.admit("k") == 0
    assert [agg.admit("k") for _ in range(29)] == [None] * 29
    t[0] = 601
    assert agg.admit("k") == 29
