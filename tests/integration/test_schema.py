"""The database refuses bad input at INSERT time, names the rule, and keeps the good."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from outbox import InvalidCommand, SendSms, db, enqueue
from outbox.commands import CreateOtp
from tests.conftest import empty_database
from tests.unit.test_commands import BAD_INPUT, GOOD_INPUT, NOW

pytestmark = pytest.mark.integration


def _shift(data: Any) -> Any:
    """BAD_INPUT is written for NOW; move its expirations to the real clock."""
    if isinstance(data, dict) and isinstance(data.get("expiration"), int | float) and not \
            isinstance(data.get("expiration"), bool):
        data = {**data, "expiration": data["expiration"] - NOW + time.time()}
    return data


@pytest.mark.parametrize(("command", "data", "rule"), BAD_INPUT,
                         ids=[f"{case[2]}-{i}" for i, case in enumerate(BAD_INPUT)])
def test_plain_insert_refuses_bad_input_naming_the_rule(
        conn: psycopg.Connection[Any], command: str, data: object, rule: str) -> None:
    with pytest.raises(pg_errors.CheckViolation) as caught:
        conn.execute("INSERT INTO outbox.message (command, data) VALUES (%s, %s)",
                     (command, Jsonb(_shift(data))))
    assert caught.value.diag.constraint_name == rule
    assert str(caught.value).startswith("outbox.message: ")
    assert "6281234567890" not in str(caught.value)
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)


@pytest.mark.parametrize(("command", "data", "rule"), BAD_INPUT,
                         ids=[f"{case[2]}-{i}" for i, case in enumerate(BAD_INPUT)])
def test_python_helper_refuses_bad_input_naming_the_rule(
        conn: psycopg.Connection[Any], command: str, data: Any, rule: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        enqueue(conn, command, _shift(data))
    assert caught.value.rule == rule
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)


@pytest.mark.parametrize(("command", "data", "canonical"), GOOD_INPUT)
def test_good_input_is_stored_under_the_same_name_python_gives_it(
        conn: psycopg.Connection[Any], command: str, data: Any, canonical: str) -> None:
    conn.execute("INSERT INTO outbox.message (command, data) VALUES (%s, %s)",
                 (command, Jsonb(_shift(data))))
    assert conn.execute("SELECT command FROM outbox.message").fetchone() == (canonical,)


def test_sql_enqueue_function_refuses_bad_input_too(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(pg_errors.CheckViolation) as caught:
        conn.execute("SELECT outbox.enqueue('send-sms', %s)",
                     (Jsonb({"receiver": "abc", "message": "x"}),))
    assert caught.value.diag.constraint_name == "message_receiver_msisdn"


def test_device_aliases_are_stored_under_readme_names(conn: psycopg.Connection[Any]) -> None:
    conn.execute("""INSERT INTO outbox.message (command, data) VALUES
        ('send-mail', '{"receiver": "a@example.com", "subject": "s", "message": "m"}'),
        ('request-otp', '{"receiver": "0812345", "reference": "r", "message": "Code %s"}'),
        ('Send-Message', '{"receiver": "0812345", "message": "m"}')""")
    commands = [row[0] for row in conn.execute("SELECT command FROM outbox.message ORDER BY id")]
    assert commands == ["send-email", "create-otp", "send-sms"]


def test_expiration_fills_expires_at(conn: psycopg.Connection[Any]) -> None:
    expiration = int(time.time()) + 600
    conn.execute("INSERT INTO outbox.message (command, data) VALUES ('send-sms', %s)",
                 (Jsonb({"receiver": "0812345", "message": "m", "expiration": expiration}),))
    row = conn.execute("SELECT extract(epoch FROM expires_at) FROM outbox.message").fetchone()
    assert row is not None and int(row[0]) == expiration


def test_sql_enqueue_returns_the_existing_id_for_a_used_dedup_key(
        conn: psycopg.Connection[Any]) -> None:
    data = Jsonb({"receiver": "0812345", "message": "m"})
    first = conn.execute("SELECT outbox.enqueue('send-sms', %s, dedup_key => 'order-1')",
                         (data,)).fetchone()
    again = conn.execute("SELECT outbox.enqueue('send-sms', %s, dedup_key => 'order-1')",
                         (data,)).fetchone()
    other = conn.execute("SELECT outbox.enqueue('send-sms', %s, route => 'sms')",
                         (data,)).fetchone()
    assert first == again != other
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (2,)


def test_plain_insert_with_a_used_dedup_key_fails_naming_dedup(
        conn: psycopg.Connection[Any]) -> None:
    insert = ("INSERT INTO outbox.message (command, data, dedup_key) VALUES "
              "('send-sms', '{\"receiver\": \"0812345\", \"message\": \"m\"}', 'k')")
    conn.execute(insert)
    with pytest.raises(pg_errors.UniqueViolation) as caught:
        conn.execute(insert)
    assert caught.value.diag.constraint_name == "message_dedup_key_unique"


def test_python_helper_dedups_and_joins_the_callers_transaction(clean_db: str) -> None:
    with psycopg.connect(clean_db) as connection:
        first = enqueue(connection, SendSms(receiver="0812345", message="m"), dedup_key="k")
        again = enqueue(connection, SendSms(receiver="0812345", message="other"), dedup_key="k")
        assert first == again
        with psycopg.connect(clean_db) as other:  # not committed: invisible elsewhere
            assert other.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)
        connection.commit()
    with psycopg.connect(clean_db) as other:
        assert other.execute("SELECT count(*) FROM outbox.message").fetchone() == (1,)


def test_a_rolled_back_transaction_leaves_nothing_to_send(clean_db: str) -> None:
    engine = create_engine(db.sqlalchemy_url(clean_db))
    try:
        with Session(engine) as session:
            enqueue(session, SendSms(receiver="0812345", message="m"))
            enqueue(session.connection(), CreateOtp(receiver="0812345", reference="r",
                                                    message="Code %s"))
            session.rollback()
        with Session(engine) as session, session.begin():
            enqueue(session, "block-msisdn", {"receiver": "0812345"})
    finally:
        engine.dispose()
    with psycopg.connect(clean_db) as connection:
        rows = connection.execute("SELECT command FROM outbox.message").fetchall()
    assert rows == [("block-msisdn",)]


@pytest.mark.parametrize("text", ["a\x00b", "lone \ud800 surrogate"])
def test_python_helper_names_text_postgres_cannot_store(conn: psycopg.Connection[Any],
                                                        text: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        enqueue(conn, "send-sms", {"receiver": "0812345", "message": "m", "note": [text]})
    assert caught.value.rule == "message_data_storable"
    conn.execute("SELECT 1")  # the caller's session is still usable


def test_enqueue_refuses_unknown_targets() -> None:
    with pytest.raises(TypeError, match="SQLAlchemy Session"):
        enqueue(object(), SendSms(receiver="0812345", message="m"))  # type: ignore[arg-type]


def test_notify_arrives_on_commit_only(clean_db: str) -> None:
    received: list[str] = []
    with psycopg.connect(clean_db, autocommit=True) as listener:
        listener.execute("LISTEN outbox_message")
        with psycopg.connect(clean_db) as app:
            enqueue(app, SendSms(receiver="0812345", message="m"))
            app.rollback()
            enqueue(app, SendSms(receiver="0812345", message="m"))
            enqueue(app, SendSms(receiver="0812345", message="n"))
            app.commit()

        def listen() -> None:
            received.extend(n.channel for n in listener.notifies(timeout=1.0))

        thread = threading.Thread(target=listen)
        thread.start()
        thread.join()
    assert received == ["outbox_message"]  # one per committed transaction


def test_a_notify_says_how_urgent_its_rows_are(clean_db: str) -> None:
    """The payload is the row's priority (migration 0015): one per priority a transaction
    inserted, whichever path of the trigger (the plain send-sms, anything else) ran."""
    with psycopg.connect(clean_db, autocommit=True) as listener:
        listener.execute("LISTEN outbox_message")
        with psycopg.connect(clean_db) as app:
            for _ in range(3):
                enqueue(app, SendSms(receiver="0812345", message="m"))
            app.execute("INSERT INTO outbox.message (command, data) VALUES ('create-otp', "
                        "'{\"receiver\": \"0812345\", \"reference\": \"r\", "
                        "\"message\": \"code %s\"}')")
            app.execute("INSERT INTO outbox.message (command, data, priority) VALUES "
                        "('send-sms', '{\"receiver\": \"0812345\", \"message\": \"m\"}', 3)")
            app.commit()
        payloads = sorted(n.payload for n in listener.notifies(timeout=1.0))
    assert payloads == ["0", "3", "5"]


def test_models_match_the_migrations(database_url: str) -> None:
    assert db.check(database_url) == []
    assert db.current_revision(database_url) == db.head_revision()


def test_plain_insert_needs_no_python(conn: psycopg.Connection[Any]) -> None:
    """The SQL an application in any language writes (quoted in the README)."""
    conn.execute("""
        INSERT INTO outbox.message (command, data)
        VALUES ('send-sms', jsonb_build_object('receiver', '+6281234567890',
                                               'message', 'Your parcel is on its way'))""")
    data = conn.execute("SELECT data FROM outbox.message").fetchone()
    assert data is not None
    assert json.loads(json.dumps(data[0]))["receiver"] == "+6281234567890"


@pytest.mark.parametrize(("column", "value", "rule"), [
    ("state", "bogus", "message_state_valid"),
    ("attempts", -1, "message_attempts_nonnegative"),
])
def test_state_and_attempts_are_guarded_on_insert_and_on_update(
        conn: psycopg.Connection[Any], column: str, value: Any, rule: str) -> None:
    data = Jsonb({"receiver": "+6281234567890", "message": "m"})
    with pytest.raises(pg_errors.CheckViolation) as refused:
        conn.execute(f"INSERT INTO outbox.message (command, data, {column}) "
                     "VALUES ('send-sms', %s, %s)", (data, value))
    assert refused.value.diag.constraint_name == rule
    row = conn.execute("INSERT INTO outbox.message (command, data) VALUES ('send-sms', %s) "
                       "RETURNING id", (data,)).fetchone()
    assert row is not None
    for state in ("pending", "sent", "failed", "expired"):  # the relay's own updates pass
        conn.execute("UPDATE outbox.message SET state = %s, attempts = attempts + 1 "
                     "WHERE id = %s", (state, row[0]))
    with pytest.raises(pg_errors.CheckViolation) as refused:
        conn.execute(f"UPDATE outbox.message SET {column} = %s WHERE id = %s", (value, row[0]))
    assert refused.value.diag.constraint_name == rule
    assert conn.execute("SELECT state, attempts FROM outbox.message").fetchall() == [
        ("expired", 4)]


def test_every_migration_downgrades_and_upgrades_again() -> None:
    with empty_database() as url:
        db.upgrade(url)
        db.downgrade(url, "base")
        assert db.current_revision(url) is None
        with psycopg.connect(url) as connection:
            assert connection.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'").fetchone() == (0,)
        db.upgrade(url, "0005")
        with psycopg.connect(url, autocommit=True) as connection:
            # 0005's table still refuses a bad state with its CHECK constraint
            with pytest.raises(pg_errors.CheckViolation) as refused:
                connection.execute("INSERT INTO outbox.message (command, data, state) VALUES "
                                   "('send-sms', '{\"receiver\": \"+62812\", \"message\": \"m\"}',"
                                   " 'bogus')")
            assert refused.value.diag.constraint_name == "message_state_valid"
        db.upgrade(url)
        assert db.check(url) == []
