"""Issue 14 (Low): a full disk made every write a bare 500 while /healthz said ok. /healthz now proves the
database accepts a write, and a route whose write fails says what failed.

The full disk is real, not a stub: the process's file-size limit (RLIMIT_FSIZE) makes the operating
system refuse to extend the SQLite database and its WAL, as a full disk refuses to allocate."""

from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.tenants import auth
from core.tenants.access import Principal
from tests.conftest import PG_URL

PW = "correct horse battery"


@contextmanager
def disk_full(engine) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """No file of this process may grow past 1 KiB while inside (SQLite's WAL starts empty)."""
    import sqlite3

    raw = sqlite3.connect(str(engine.url.database), timeout=5)
    busy, _, _ = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    raw.close()
    assert busy == 0
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of killing the process
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.fixture
def client(app_db):  # type: ignore[no-untyped-def]
    from sqlmodel import Session

    import server

    with Session(app_db) as s:
        auth.create_console_account(s, principal=Principal.system(), email="cs@crmbridge.example", role="staff",
                                    password=PW)
        s.commit()
    app = Starlette(routes=server.collect_routes(), middleware=server.middleware())
    with TestClient(app, base_url="http://127.0.0.1:8501", raise_server_exceptions=False) as c:
        yield c


def test_healthz_writes_and_says_ok(client, app_db):
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}
    assert client.get("/healthz").status_code == 200
    with app_db.connect() as conn:
        assert conn.execute(text("SELECT checks FROM health_probe WHERE id = 1")).scalar_one() == 2


@pytest.mark.sqlite_only
@pytest.mark.skipif(bool(PG_URL), reason="the full disk is simulated for the SQLite file (PostgreSQL's disk "
                    "belongs to its server process)")
def test_full_disk_healthz_and_routes_say_what_failed(client, app_db):
    page = client.get("/auth/login")
    csrf = page.text.split('name=csrf value="', 1)[1].split('"', 1)[0]
    with disk_full(app_db):
        health = client.get("/healthz")
        signed_in = client.post("/auth/login", data={"email": "cs@crmbridge.example", "password": PW,
                                                     "csrf": csrf}, follow_redirects=False)
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "error" and body["database"] == "write_failed"
    assert "could not write to its disk" in body["error"] and "Fix:" in body["error"]

    assert signed_in.status_code == 503, signed_in.text
    assert "could not write to its disk" in signed_in.text and "Nothing was saved" in signed_in.text
    assert "Internal Server Error" not in signed_in.text and "Traceback" not in signed_in.text
    assert "crmbridge_session" not in signed_in.headers.get("set-cookie", "")

    # Space again: everything works, nothing was half-written.
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}


def test_describe_db_failure_names_the_fix_and_ignores_other_errors():
    from sqlalchemy.exc import OperationalError

    from core.db import describe_db_failure

    full = OperationalError("INSERT …", {}, Exception("database or disk is full"))
    assert "disk is full" in describe_db_failure(full) and "free space" in describe_db_failure(full)  # type: ignore[operator]
    ro = OperationalError("UPDATE …", {}, Exception("attempt to write a readonly database"))
    assert "read-only" in describe_db_failure(ro)  # type: ignore[operator]
    assert describe_db_failure(ValueError("x")) is None
