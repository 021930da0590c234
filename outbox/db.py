"""Database connections, the embedded Postgres, and migrations."""

from __future__ import annotations

import importlib.resources
import os
import secrets
import signal
import time
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

from outbox.errors import ConfigurationError, DatabaseUnavailable, OutboxError
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


def resolve_database_url(settings: Settings, *, create: bool = False) -> str:
    """``DATABASE_URL``, or the embedded Postgres when unset.

    Only ``create`` (``outbox run`` and ``outbox db upgrade``, what ``make run`` calls) may
    set up a new embedded database; any other command run where there is none (another
    folder than the project's) is refused rather than leave a second server behind.
    """
    if settings.database_url:
        return libpq_url(settings.database_url)
    path = Path(settings.embedded_dir).absolute()
    if not create and not (path / "PG_VERSION").exists():
        raise ConfigurationError(
            f"DATABASE_URL is not set and there is no embedded Postgres in {path} (run the "
            "command from the folder where `make run` keeps it, or set DATABASE_URL)")
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
    except ImportError:
        raise ConfigurationError(
            "DATABASE_URL is not set and the embedded Postgres is not installed "
            "(pip install 'outbox-otp[embedded]', or set DATABASE_URL)") from None
    except Exception as exc:
        raise DatabaseUnavailable(f"cannot start the embedded Postgres in {path}: "
                                  f"{_first_line(exc)}") from exc
    return str(server.get_uri())


#: how long ``stop_embedded`` waits for the server to be gone
STOP_TIMEOUT = 30.0


def stop_embedded(directory: str, *, timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop the embedded Postgres kept in ``directory``: the pid it had, or None when none
    was running there. Raises ``OutboxError`` when it is still running after ``timeout``.

    Not through pgserver: it stops the server only when the caller holds its last "handle",
    and a relay killed without cleaning up leaves its handle behind forever. A fast shutdown
    (SIGINT to the postmaster) disconnects the clients (a running relay too) and stops
    cleanly; the pid file is the server's own.
    """
    pid = _postmaster_pid(Path(directory).absolute())
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise OutboxError(f"the embedded Postgres (pid {pid}) is still running "
                              f"{timeout:g} s after it was asked to stop")
        time.sleep(0.1)
    return pid


def _postmaster_pid(path: Path) -> int | None:
    """The pid in ``postmaster.pid`` when that process is alive and is a postgres (a stale
    file's pid may belong to another process by now)."""
    try:
        pid = int((path / "postmaster.pid").read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid  # no /proc (macOS): trust the server's own file
    return pid if b"postgres" in command else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"  # a zombie has stopped; only its parent's wait is missing


_DEV_OTP_FILE = "otp-secret"


def development_otp_secret_path(settings: Settings) -> Path:
    """``.outbox/otp-secret``: beside the embedded database's folder."""
    return Path(settings.embedded_dir).absolute().parent / _DEV_OTP_FILE


def development_otp_secret(settings: Settings, *, create: bool) -> Path | None:
    """Where the development OTP secret of the embedded set-up is kept (next to its
    database, mode 0600), creating it when ``create``; None when there is none.

    Only for the embedded database (no ``DATABASE_URL``): that is ``make run`` on a
    developer's machine, where managed ``create-otp`` should work out of the box. A real
    deployment sets ``OUTBOX_OTP_SECRET``.
    """
    if settings.database_url or settings.otp_secret:
        return None
    path = development_otp_secret_path(settings)
    if path.exists() or not create:
        return path if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return path


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
    "development_otp_secret",
    "development_otp_secret_path",
    "downgrade",
    "embedded_url",
    "head_revision",
    "libpq_url",
    "make_engine",
    "resolve_database_url",
    "sqlalchemy_url",
    "stop_embedded",
    "upgrade",
]
