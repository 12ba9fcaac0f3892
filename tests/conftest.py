"""Shared fixtures: a fresh database per test (SQLite in memory, or PostgreSQL when
CRMBRIDGE_TEST_DATABASE_URL is set), principals for each role, and tenant factories.

Under CI=true a test that skips because PostgreSQL, the browser or ../shared/samples is missing
is turned into a failure (see pytest_runtest_makereport below).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel

os.environ.setdefault("CRMBRIDGE_SECRET_KEY", "riVV7eHC8DewyVJKy-rTNB5NV2jJ6VZdKL9urJuCI_A")  # 32 random bytes

import core.models  # noqa: E402,F401
from core.clock import FrozenClock  # noqa: E402
from core.db import make_engine  # noqa: E402
from core.tenants.access import Principal  # noqa: E402
from core.tenants.models import AppUser, CrmAccount, Tenant  # noqa: E402

pytest_plugins: list[str] = [
    "tests.fixtures.sandbox", "tests.fixtures.vault", "tests.fixtures.accounts_alerts", "tests.fixtures.sync",
]

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT.parent / "shared" / "samples"
PG_URL = os.environ.get("CRMBRIDGE_TEST_DATABASE_URL", "")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# Skips that are a failure in CI: a missing install step must not pass quietly.
_CI_FATAL_SKIP_WORDS = ("postgres", "chromium", "browser", "samples", "playwright")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if IN_CI and rep.skipped and call.excinfo is not None:
        reason = str(call.excinfo.value).lower()
        if any(w in reason for w in _CI_FATAL_SKIP_WORDS):
            rep.outcome = "failed"
            rep.longrepr = f"skipped under CI=true (a missing install step?): {call.excinfo.value}"


def samples_dir(sub: str = "") -> Path:
    """The real-world samples, or a skip naming why (a fresh clone has no ../shared)."""
    path = SAMPLES / sub
    if not path.exists():
        pytest.skip(f"../shared/samples not present ({path}): real-sample tests need the shared folder")
    return path


@pytest.fixture
def samples() -> Path:
    return samples_dir()


def requires_postgres() -> str:
    if not PG_URL:
        pytest.skip("postgres: CRMBRIDGE_TEST_DATABASE_URL is not set (this test needs PostgreSQL)")
    return PG_URL


_pg_engine: Engine | None = None


def _fresh_pg_engine() -> Engine:
    global _pg_engine
    if _pg_engine is None:
        _pg_engine = make_engine(PG_URL)
        with _pg_engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        SQLModel.metadata.create_all(_pg_engine)
    else:
        names = ", ".join(f'"{t.name}"' for t in SQLModel.metadata.sorted_tables)
        with _pg_engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    return _pg_engine


@pytest.fixture
def engine() -> Iterator[Engine]:
    """A fresh, empty database with the full schema."""
    if PG_URL:
        yield _fresh_pg_engine()
        return
    eng = make_engine("sqlite://")
    SQLModel.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def file_engine(tmp_path: Path) -> Iterator[Engine]:
    """A database shared between threads or processes (SQLite file, or PostgreSQL)."""
    if PG_URL:
        yield _fresh_pg_engine()
        return
    eng = make_engine(f"sqlite:///{tmp_path / 'test.db'}")
    SQLModel.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as s:
        yield s


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def staff() -> Principal:
    return Principal(role="staff", email="cs@crmbridge.example", account_id=None)


@pytest.fixture
def leadership() -> Principal:
    return Principal(role="leadership", email="vp@crmbridge.example", account_id=None)


def admin_of(tenant: Tenant) -> Principal:
    return Principal(role="tenant_admin", email=f"admin@{tenant.slug}.example", tenant_id=tenant.id)


def make_tenant(session: Session, slug: str = "acme", *, status: str = "live") -> Tenant:
    t = Tenant(name=slug.title(), slug=slug, status=status)
    session.add(t)
    session.commit()
    session.refresh(t)
    return t


def make_crm_account(
    session: Session, tenant: Tenant, *, provider: str = "salesforce", edition: str = "enterprise",
    label: str = "Main org", credential_mode: str = "api_user", instance_url: str | None = None,
) -> CrmAccount:
    a = CrmAccount(
        tenant_id=tenant.id, provider=provider, edition=edition, label=label,
        credential_mode=credential_mode, instance_url=instance_url,
    )
    session.add(a)
    session.commit()
    session.refresh(a)
    return a


def make_app_user(session: Session, tenant: Tenant, email: str = "ana@acme.example") -> AppUser:
    u = AppUser(tenant_id=tenant.id, email=email, name=email.split("@")[0].title())
    session.add(u)
    session.commit()
    session.refresh(u)
    return u


@pytest.fixture
def tenant(session: Session) -> Tenant:
    return make_tenant(session, "acme")


@pytest.fixture
def other_tenant(session: Session) -> Tenant:
    return make_tenant(session, "globex")


@pytest.fixture
def app_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """The database the pages see: points CRMBRIDGE_DATABASE_URL at a fresh database and clears
    the cached settings/engine, so AppTest scripts (same process) use it through get_engine()."""
    from core.db import get_engine
    from core.settings import get_settings

    url = PG_URL or f"sqlite:///{tmp_path / 'app.db'}"
    if PG_URL:
        _fresh_pg_engine()
    monkeypatch.setenv("CRMBRIDGE_DATABASE_URL", url)
    get_settings.cache_clear()
    get_engine.cache_clear()
    eng = get_engine()
    if not PG_URL:
        SQLModel.metadata.create_all(eng)
    yield eng
    get_engine.cache_clear()
    get_settings.cache_clear()
    if not PG_URL:
        eng.dispose()


def run_page(page: str, principal: Principal | None, *, timeout: float = 30, **state: object):
    """Run one page file with AppTest as ``principal`` and return the AppTest."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "pages" / page), default_timeout=timeout)
    if principal is not None:
        at.session_state["principal"] = principal
    for k, v in state.items():
        at.session_state[k] = v
    return at.run()


def unescape_md(text: str) -> str:
    """What a reader sees of Markdown source: backslash escapes (pages escape tenant-supplied text with
    pages._common.md) show as the bare character."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text)


def page_text(at) -> str:  # type: ignore[no-untyped-def]
    """Everything a person would read on the rendered page (tables in full), for assertions."""
    parts: list[str] = []
    for name in ("title", "header", "subheader", "markdown", "caption", "text", "code", "error", "warning",
                 "info", "success", "exception", "json", "latex"):
        for el in getattr(at, name, []):
            value = str(getattr(el, "value", ""))
            parts.append(value if name in ("code", "text", "json", "exception") else unescape_md(value))
    for m in at.metric:
        parts.append(f"{m.label} {m.value} {getattr(m, 'delta', '')}")
    for d in at.dataframe:
        parts.append(d.value.to_csv())
    for t in getattr(at, "table", []):
        parts.append(t.value.to_csv())
    return "\n".join(parts)


def stored_bytes(engine: Engine) -> bytes:
    """Everything the database holds, as bytes to scan for canaries: the SQLite file and its -wal
    (free pages included), or on PostgreSQL every row of every table as text."""
    if engine.dialect.name == "sqlite":
        db = Path(str(engine.url.database))
        return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    out: list[str] = []
    with engine.connect() as conn:
        for table in SQLModel.metadata.sorted_tables:
            for row in conn.execute(table.select()):
                out.append(" ".join(str(v) for v in row))
    return "\n".join(out).encode()
