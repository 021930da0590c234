"""Shared fixtures: a fresh, migrated Postgres database for the session, emptied per test.

The server comes from ``OUTBOX_TEST_DATABASE_URL`` (default: the local server on loopback,
database ``test``); the suite creates its own database next to it and drops it at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from outbox import db, logs

ADMIN_URL = os.environ.get("OUTBOX_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


def pytest_configure(config: pytest.Config) -> None:
    # JSON through the masking processor, at debug level: every event a test provokes is
    # rendered exactly as in production, so leaks of personal data show up in tests.
    logs.configure(level="debug", fmt="json")


@contextmanager
def empty_database() -> Iterator[str]:
    """A database of our own on the test server, dropped afterwards; not migrated."""
    name = f"outbox_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"the tests need Postgres at {ADMIN_URL}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(ADMIN_URL, name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated database of our own for the whole session."""
    with empty_database() as url:
        db.upgrade(url)
        yield url


@pytest.fixture
def clean_db(database_url: str) -> str:
    """The session database with every outbox table emptied."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        tables = [row[0] for row in connection.execute(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) "
            "FROM pg_tables WHERE schemaname = 'outbox'")]
        if tables:
            connection.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
    return database_url


@pytest.fixture
def conn(clean_db: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the emptied database, for arranging and asserting."""
    with psycopg.connect(clean_db, autocommit=True) as connection:
        yield connection


def rows_by_state(connection: psycopg.Connection[Any]) -> dict[str, int]:
    return dict(connection.execute(
        "SELECT state, count(*) FROM outbox.message GROUP BY state").fetchall())
