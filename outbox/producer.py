"""The Python helper: put a command in the outbox inside the caller's transaction.

``enqueue`` never commits and never opens a transaction of its own: the row becomes visible
to the relay when (and only if) the caller's transaction commits. It accepts a SQLAlchemy
``Session`` or ``Connection``, or a psycopg 3 ``Connection`` or ``Cursor``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import Connection as SAConnection
from sqlalchemy.orm import Session

from outbox.commands import DEFAULT_DATA_SIZE, Command, check_times, validate_new
from outbox.errors import InvalidCommand
from outbox.store import LOWEST_PRIORITY, SELECT_DATA_SIZE_LIMIT, insert_message

_SA_INSERT = text(
    "INSERT INTO outbox.message (command, data, dedup_key, route, available_at, priority, "
    "ordering_key, enqueued_by) VALUES (:command, CAST(:data AS jsonb), :dedup_key, :route, "
    "coalesce(:available_at, now()), :priority, :ordering_key, :enqueued_by) "
    "ON CONFLICT ((outbox.dedup_digest(dedup_key))) WHERE dedup_key IS NOT NULL DO NOTHING "
    "RETURNING id"
)
_SA_INSERT_NO_DEDUP = text(
    "INSERT INTO outbox.message (command, data, route, available_at, priority, ordering_key, "
    "enqueued_by) VALUES (:command, CAST(:data AS jsonb), :route, coalesce(:available_at, now()), "
    ":priority, :ordering_key, :enqueued_by) RETURNING id"
)
_SA_SELECT = text(
    "SELECT id FROM outbox.message WHERE outbox.dedup_digest(dedup_key) = "
    "outbox.dedup_digest(:dedup_key) AND dedup_key = :dedup_key")


def enqueue(
    target: Session | SAConnection | psycopg.Connection[Any] | psycopg.Cursor[Any],
    command: Command | str,
    data: Mapping[str, Any] | None = None,
    *,
    dedup_key: str | None = None,
    route: str | None = None,
    available_at: datetime | None = None,
    priority: int | None = None,
    ordering_key: str | None = None,
    enqueued_by: str | None = None,
) -> int:
    """Insert one command; return its row id (the existing row's id for a used ``dedup_key``).

    ``command`` is a typed command (``SendSms(...)``) or a command name with its ``data``.
    ``priority`` runs from 0 (most urgent) to 9; None takes the command's default.
    ``ordering_key``: rows with the same key are published one after another in id order
    (None: the receiver for block-msisdn and unblock-msisdn, no key for the others).
    Raises ``InvalidCommand`` naming the broken rule before touching the database, so the
    caller's transaction is not aborted by bad input. ``enqueued_by`` names the network
    service user the row came through (``outbox gateway`` sets it).
    """
    if isinstance(command, Command):
        if data is not None:
            raise TypeError("pass data only with a command name, not with a typed command")
        name, payload = command.command, command.to_data()
    else:
        # not a Mapping: validate_new() refuses it, naming the rule
        name, payload = command, data  # type: ignore[assignment]
    if isinstance(target, psycopg.Connection | psycopg.Cursor):
        cursor_or_connection = target

        def data_size() -> int:
            row = cursor_or_connection.execute(SELECT_DATA_SIZE_LIMIT).fetchone()
            return int(row[0]) if row is not None else DEFAULT_DATA_SIZE

        canonical, payload, encoded = validate_new(name, payload, now=time.time(),
                                                   data_size=data_size)
        _check_columns(dedup_key, available_at, priority)
        if isinstance(target, psycopg.Connection):
            with target.cursor() as cursor:
                return insert_message(cursor, canonical, payload, dedup_key=dedup_key,
                                      route=route, available_at=available_at,
                                      priority=priority, ordering_key=ordering_key,
                                      enqueued_by=enqueued_by, encoded=encoded)
        return insert_message(target, canonical, payload, dedup_key=dedup_key, route=route,
                              available_at=available_at, priority=priority,
                              ordering_key=ordering_key, enqueued_by=enqueued_by,
                              encoded=encoded)
    if isinstance(target, Session | SAConnection):
        session = target

        def sa_data_size() -> int:
            value = session.execute(text(SELECT_DATA_SIZE_LIMIT)).scalar()
            return int(value) if value is not None else DEFAULT_DATA_SIZE

        canonical, payload, encoded = validate_new(name, payload, now=time.time(),
                                                   data_size=sa_data_size)
        _check_columns(dedup_key, available_at, priority)
        params = {"command": canonical, "data": encoded, "dedup_key": dedup_key,
                  "route": route, "available_at": available_at, "priority": priority,
                  "ordering_key": ordering_key, "enqueued_by": enqueued_by}
        row = target.execute(_SA_INSERT if dedup_key is not None else _SA_INSERT_NO_DEDUP,
                             params).first()
        if row is None:
            row = target.execute(_SA_SELECT, {"dedup_key": dedup_key}).first()
        assert row is not None
        return int(row[0])
    raise TypeError(
        f"cannot enqueue through {type(target).__name__}: pass a SQLAlchemy Session or "
        "Connection, or a psycopg Connection or Cursor"
    )


def _check_columns(dedup_key: str | None, available_at: datetime | None, priority: Any) -> None:
    """The rules on the other columns, after the data's (the database's order)."""
    check_priority(priority)
    check_times(available_at=available_at)
    if dedup_key is not None and not dedup_key:
        raise InvalidCommand("message_dedup_key_empty", "dedup_key must be non-empty or None")


def check_priority(priority: Any) -> None:
    """The database's ``message_priority_range`` rule, checked before the INSERT."""
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                 or not 0 <= priority <= LOWEST_PRIORITY):
        raise InvalidCommand("message_priority_range",
                             "priority must be a whole number from 0 (most urgent) to 9")


__all__ = ["check_priority", "enqueue"]
