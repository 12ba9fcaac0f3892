"""Engine and session factory. Alembic (migrations/) owns the schema.

SQLite runs with WAL, a busy timeout (the console and a worker write together), foreign keys and
``secure_delete`` (destroyed credentials do not linger in free pages).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Column, DateTime, event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session, create_engine

from core.settings import get_settings


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Build an engine for ``url`` with the pragmas and pool this product needs."""
    if url.startswith("sqlite"):
        memory = url in {"sqlite://", "sqlite:///:memory:"}
        kwargs: dict = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        if memory:
            kwargs["poolclass"] = StaticPool
        else:
            path = url.split("///", 1)[-1]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA secure_delete=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn) -> None:  # type: ignore[no-untyped-def]
            # Take the write lock at BEGIN so two writers queue on busy_timeout instead of
            # failing on lock upgrade ("database is locked").
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        # pysqlite's own transaction handling must be off for the BEGIN above to take effect.
        @event.listens_for(engine, "connect")
        def _autocommit_off(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=10)


@lru_cache(maxsize=4)
def get_engine(url: str | None = None) -> Engine:
    return make_engine(url or get_settings().database_url)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error (nothing half-written)."""
    with Session(engine or get_engine(), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column: use core.clock.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_column(*, nullable: bool = True, index: bool = False) -> Any:
    """``Field(sa_column=...)`` helper: ``created_at: datetime = Field(sa_column=utc_column(...))``."""
    return Column(UTCDateTime(), nullable=nullable, index=index)


# (substring of the driver's message, what failed, the fix) — SQLite and PostgreSQL wording.
_DB_FAILURES = (
    (("database or disk is full", "no space left on device", "could not extend file", "disk full"),
     "the database's disk is full", "free space on the database's disk (or raise its quota), then try again"),
    (("disk i/o error", "could not write", "input/output error", "file too large"),
     "the database could not write to its disk (full, over a size limit or failing)",
     "check the database's disk (free space, quota, errors), then try again"),
    (("readonly database", "read-only", "read only"),
     "the database is read-only", "make the database writable (file permissions, or a read-write PostgreSQL "
     "server), then try again"),
    (("database is locked", "lock timeout", "deadlock detected"),
     "the database was busy (locked) too long", "try again in a moment"),
    (("connection refused", "could not connect", "server closed the connection", "unable to open database",
      "connection is closed", "terminating connection"),
     "the database cannot be reached", "check that the database server is running and reachable, then try again"),
)


def describe_db_failure(exc: BaseException) -> str | None:
    """A sentence naming what failed and the fix, for a database error from SQLAlchemy; None for
    anything else. Nothing was saved: the transaction rolled back (``session_scope``)."""
    from sqlalchemy.exc import DBAPIError

    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:  # the DBAPIError may be wrapped
        seen.add(id(err))
        if isinstance(err, DBAPIError):
            break
        err = err.__cause__ or err.__context__
    if not isinstance(err, DBAPIError):
        return None
    text = str(err.orig or err).lower()
    for needles, what, fix in _DB_FAILURES:
        if any(n in text for n in needles):
            return f"Nothing was saved: {what}. Fix: {fix}."
    if err.connection_invalidated:
        return "Nothing was saved: the connection to the database was lost. Fix: try again."
    return None
