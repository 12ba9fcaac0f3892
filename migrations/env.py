"""Alembic environment: the schema is SQLModel.metadata; the URL comes from settings (or the caller)."""

from __future__ import annotations

from alembic import context

import core.models
from core.db import make_engine
from core.settings import get_settings

config = context.config
target_metadata = core.models.metadata
# Data migrations that seal or open stored secrets read the server secret through this (only when they
# have rows to convert: an empty database migrates without one).
config.attributes.setdefault("server_secret", lambda: get_settings().server_secret())


def _url() -> str:
    return config.attributes.get("url") or get_settings().database_url


def run_migrations_offline() -> None:
    url = _url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, compare_type=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
