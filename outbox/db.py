"""Database connections, the embedded Postgres, and migrations."""

from __future__ import annotations

import importlib.resources
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Engine

from outbox.errors import ConfigurationError, DatabaseUnavailable
from outbox.settings import Settings

VERSION_TABLE = "outbox_alembic_version"


def libpq_url(url: str) -> str:
    """A URL libpq understands (``postgresql://``), whatever SQLAlchemy driver it names."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError("DATABASE_URL is not a URL (expected postgresql://user@host/db)")
    base = scheme.split("+", 1)[0]
    if base not in ("postgresql", "postgres"):
        raise ConfigurationError(f"DATABASE_URL scheme {scheme!r} is not PostgreSQL")
    return f"postgresql://{rest}"


def sqlalchemy_url(url: str) -> str:
    """The same database for SQLAlchemy, always through psycopg 3."""
    return "postgresql+psycopg://" + libpq_url(url).partition("://")[2]


def resolve_database_url(settings: Settings) -> str:
    """``DATABASE_URL``, or the embedded Postgres (started on first use) when unset."""
    if settings.database_url:
        return libpq_url(settings.database_url)
    return embedded_url(settings.embedded_dir)


def embedded_url(directory: str) -> str:
    """Start (or reuse) the embedded Postgres kept in ``directory`` and return its URL.

    The server keeps running after this process exits, so a second terminal (``outbox
    enqueue``, ``psql "$(outbox db url)"``) reaches the same database.
    """
    path = Path(directory).absolute()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless here
            warnings.simplefilter("ignore")
            import pgserver  # noqa: PLC0415 - heavy, only for the embedded default

            server = pgserver.get_server(path, cleanup_mode=None)  # type: ignore[attr-defined]
    except Exception as exc:
        raise DatabaseUnavailable(f"cannot start the embedded Postgres in {path}: {exc}") from exc
    return str(server.get_uri())


def stop_embedded(directory: str) -> bool:
    """Stop the embedded Postgres kept in ``directory``; False when none was running there."""
    path = Path(directory).absolute()
    if not (path / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' XDG_RUNTIME_DIR warning, as above
        import pgserver  # noqa: PLC0415

        server = pgserver.get_server(path, cleanup_mode="stop")  # type: ignore[attr-defined]
        server.cleanup()
    return True


def connect(url: str, *, autocommit: bool = False, connect_timeout: int = 5,
            application_name: str = "outbox",
            keepalive_timeout: float | None = None) -> psycopg.Connection[Any]:
    """A psycopg connection, with an unreachable database reported as ``DatabaseUnavailable``.

    ``keepalive_timeout`` (seconds): notice within about that long that the server went
    silent (a partition, a frozen host) instead of when TCP gives up, hours later: TCP
    keepalives probe an idle connection and ``tcp_user_timeout`` bounds unacknowledged sends.
    """
    extra: dict[str, Any] = {}
    if keepalive_timeout is not None:
        idle = max(1, int(keepalive_timeout / 3))
        extra = {"keepalives": 1, "keepalives_idle": idle, "keepalives_interval": idle,
                 "keepalives_count": 2, "tcp_user_timeout": max(1000, int(keepalive_timeout * 1000))}
    try:
        return psycopg.connect(
            libpq_url(url), autocommit=autocommit, connect_timeout=connect_timeout,
            application_name=application_name, **extra,
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to the database: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_engine(url: str) -> Engine:
    return create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)


# --- migrations ------------------------------------------------------------------------


def alembic_config(url: str) -> AlembicConfig:
    """Alembic configured from the migrations shipped inside the installed package."""
    config = AlembicConfig()
    location = importlib.resources.files("outbox.migrations")
    config.set_main_option("script_location", str(location))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


@contextmanager
def _alembic(url: str) -> Iterator[AlembicConfig]:
    config = alembic_config(url)
    engine = make_engine(url)
    try:
        # Not engine.begin(): alembic opens one transaction per migration itself, and a
        # migration may need to step outside it (CREATE INDEX CONCURRENTLY).
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            yield config
    except psycopg.OperationalError as exc:  # pragma: no cover - raised as sqlalchemy's below
        raise DatabaseUnavailable(f"cannot connect to the database: {_first_line(exc)}") from exc
    except Exception as exc:
        if type(exc).__name__ == "OperationalError":
            raise DatabaseUnavailable(f"cannot connect to the database: {_first_line(exc)}") from exc
        raise
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    with _alembic(url) as config:
        alembic_command.upgrade(config, revision)


def downgrade(url: str, revision: str) -> None:
    """Step the schema back to ``revision`` (``"base"`` removes it, and every row with it)."""
    with _alembic(url) as config:
        alembic_command.downgrade(config, revision)


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("postgresql://localhost/unused"))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    except Exception as exc:
        if type(exc).__name__ == "OperationalError":
            raise DatabaseUnavailable(f"cannot connect to the database: {_first_line(exc)}") from exc
        raise
    finally:
        engine.dispose()


def check(url: str) -> list[str]:
    """Problems between the database and what this version expects; empty when all is well."""
    problems: list[str] = []
    current = current_revision(url)
    head = head_revision()
    if current != head:
        problems.append(f"database is at revision {current or 'none'}, this version needs {head}"
                        " (run `outbox db upgrade`)")
        return problems
    from alembic.autogenerate import compare_metadata  # noqa: PLC0415

    from outbox.models import metadata  # noqa: PLC0415

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={"include_schemas": True, "version_table": VERSION_TABLE,
                      "include_name": lambda name, type_, parents: type_ != "schema" or name == "outbox"},
            )
            diff = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    problems.extend(f"schema differs from the models: {entry!r}" for entry in diff)
    return problems


__all__ = [
    "alembic_config",
    "check",
    "connect",
    "current_revision",
    "downgrade",
    "embedded_url",
    "head_revision",
    "libpq_url",
    "make_engine",
    "resolve_database_url",
    "sqlalchemy_url",
    "upgrade",
]
