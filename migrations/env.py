"""Alembic environment: the URL comes from outbox's settings, never from alembic.ini."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from outbox.models import metadata

config = context.config
#: Not "alembic_version": the application that owns the database may use alembic too.
VERSION_TABLE = "outbox_alembic_version"


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from outbox.db import sqlalchemy_url  # noqa: PLC0415
    from outbox.settings import Settings  # noqa: PLC0415 - only when run by the alembic CLI

    return sqlalchemy_url(Settings.from_env().database_url)


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    if type_ == "schema":
        return name == "outbox"
    return True


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True,
                      include_schemas=True, include_name=include_name,
                      version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)


def _run(connection: object) -> None:
    # Keep alembic's own bookkeeping in the public schema: outbox.* is created by the first
    # migration, and alembic needs its version table before that.
    context.configure(connection=connection, target_metadata=metadata,  # type: ignore[arg-type]
                      include_schemas=True, include_name=include_name,
                      version_table=VERSION_TABLE, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
