"""Engine and session factory. Alembic (migrations/) owns the schema.

SQLite runs with WAL, a busy timeout (the console and a worker write together), foreign keys and
``secure_delete`` (destroyed credentials do not linger in free pages).
"""

from __future__ import annotations

import os
import stat
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
            private_sqlite_file(Path(url.split("///", 1)[-1].split("?", 1)[0]))
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


def private_sqlite_file(path: Path) -> None:
    """Create the SQLite file readable by its owner only (0600) before SQLite opens it — SQLite gives
    its -wal and -shm files the database file's mode — and tighten a file an older version left
    readable by others (it holds wrapped keys, ciphertexts, session hashes and the audit log)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            try:
                mode = stat.S_IMODE(p.stat().st_mode)
                if mode & 0o077:
                    p.chmod(mode & 0o700)
            except (FileNotFoundError, PermissionError):
                pass  # not there, or not ours: SQLite reports what matters when it opens it


_CORRUPT = ("file is not a database", "database disk image is malformed", "malformed database schema")


def corrupt_database_message(exc: BaseException, url: str | None = None) -> str | None:
    """For an error that says the database file is damaged, the message an operator needs: which
    file, that nothing was changed, and how to restore it. None for any other error."""
    raw = str(getattr(exc, "orig", None) or exc).strip()
    text = raw.splitlines()[0] if raw else ""
    if not any(marker in text.lower() for marker in _CORRUPT):
        return None
    url = url or get_settings().database_url
    if url.startswith("sqlite"):
        where = url.split("///", 1)[-1].split("?", 1)[0]
        aside = f"move it aside for analysis (mv {where} {where}.corrupt, and its -wal and -shm files), "
    else:
        where = "the PostgreSQL database"
        aside = ""
    return (
        f"The database file {where} is corrupt ({text}); nothing was changed. Stop the console and the "
        f"sync workers, {aside}restore your latest backup in its place, then run `crmbridge db upgrade` and "
        "`crmbridge audit verify --checkpoint <your last checkpoint>` to see what the backup lacks."
    )


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
    corrupt = corrupt_database_message(err)
    if corrupt is not None:
        return corrupt
    text = str(err.orig or err).lower()
    for needles, what, fix in _DB_FAILURES:
        if any(n in text for n in needles):
            return f"Nothing was saved: {what}. Fix: {fix}."
    if err.connection_invalidated:
        return "Nothing was saved: the connection to the database was lost. Fix: try again."
    return None


_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy's SQLite DateTime stores a value (UTC, see UTCDateTime)


class DriverStatements:
    """Hand-written SQL on the DB-API connection under a SQLAlchemy ``Connection``, in its transaction: for
    the few hot paths (the ACS's sign-in) where SQLAlchemy's per-statement work costs more than the
    statement. SQL is written with ``?`` placeholders (SQLite's); PostgreSQL gets ``%s``. ``time()`` binds
    an aware datetime the way ``UTCDateTime`` would. The caller's ``Session``/``Connection`` still owns
    the transaction: it commits or rolls back everything, these statements included."""

    def __init__(self, conn: Any) -> None:
        self.dialect = conn.dialect.name
        self.pg = self.dialect == "postgresql"
        self.cursor = conn.connection.driver_connection.cursor()

    def execute(self, sql: str, params: tuple[Any, ...]) -> Any:
        self.cursor.execute(sql.replace("?", "%s") if self.pg else sql, params)
        return self.cursor

    def time(self, value: Any) -> Any:
        utc = value.astimezone(UTC)
        return utc if self.pg else utc.strftime(_SQLITE_TIME)
