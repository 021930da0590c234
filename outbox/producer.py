"""The Python helper: put a command in the outbox inside the caller's transaction.

``enqueue`` never commits and never opens a transaction of its own: the row becomes visible
to the relay when (and only if) the caller's transaction commits. It accepts a SQLAlchemy
``Session`` or ``Connection``, or a psycopg 3 ``Connection`` or ``Cursor``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import Connection as SAConnection
from sqlalchemy.orm import Session

from outbox.commands import Command, validate
from outbox.errors import InvalidCommand
from outbox.store import LOWEST_PRIORITY, insert_message

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
        # not a Mapping: validate() refuses it, naming the rule
        name, payload = command, dict(data) if isinstance(data, Mapping) else data  # type: ignore[assignment]
    canonical = validate(name, payload, now=time.time())
    _check_storable(payload)
    if dedup_key is not None and not dedup_key:
        raise InvalidCommand("message_dedup_key_empty", "dedup_key must be non-empty or None")
    check_priority(priority)
    if isinstance(target, psycopg.Connection):
        with target.cursor() as cursor:
            return insert_message(cursor, canonical, payload, dedup_key=dedup_key, route=route,
                                  available_at=available_at, priority=priority,
                                  ordering_key=ordering_key, enqueued_by=enqueued_by)
    if isinstance(target, psycopg.Cursor):
        return insert_message(target, canonical, payload, dedup_key=dedup_key, route=route,
                              available_at=available_at, priority=priority,
                              ordering_key=ordering_key, enqueued_by=enqueued_by)
    if isinstance(target, Session | SAConnection):
        params = {"command": canonical, "data": json.dumps(payload), "dedup_key": dedup_key,
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


def check_priority(priority: Any) -> None:
    """The database's ``message_priority_range`` rule, checked before the INSERT."""
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                 or not 0 <= priority <= LOWEST_PRIORITY):
        raise InvalidCommand("message_priority_range",
                             "priority must be a whole number from 0 (most urgent) to 9")


def _check_storable(value: Any) -> None:
    """Refuse, by name, text that Postgres' jsonb cannot hold (NUL, lone surrogates), instead
    of letting the INSERT fail with a driver error that aborts the caller's transaction."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidCommand("message_data_storable", "data holds a NUL character, which "
                                 "PostgreSQL's jsonb cannot store")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidCommand("message_data_storable", "data holds text that is not valid "
                                 "Unicode (a lone surrogate)") from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_storable(key)
            _check_storable(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_storable(item)


__all__ = ["check_priority", "enqueue"]
