"""Bad input at the door (migration 0013), through plain SQL and through the Python helper.

Every rule is refused by name (23514 check_violation, or 23502 not_null_violation for a NULL),
the Python helper raises ``InvalidCommand`` with the same name before sending anything, and
no error the schema raises quotes the receiver or the text it was given.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb

from outbox import BlockMsisdn, InvalidCommand, UnblockMsisdn, enqueue
from outbox.commands import (
    DEFAULT_DATA_SIZE,
    MAX_DATA_DEPTH,
    WHITESPACE,
    canonical_receiver,
    validate_new,
)
from outbox.relay import RelayService
from outbox.settings import Settings
from outbox.testing import MemoryTransport

pytestmark = pytest.mark.integration

RECEIVER = "+6281234567890"
TEXT = "SECRET TEXT 4711"
SMS = {"receiver": RECEIVER, "message": TEXT}


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


#: data as JSON text, for numbers Python's json cannot write
RAW = '{"receiver": "' + RECEIVER + '", "message": "' + TEXT + '", %s}'

# (data, extra columns as SQL literals, rule): refused by a plain INSERT
DOOR = [
    ({**SMS, "id": 2**64}, {}, "message_data_number"),
    ({**SMS, "id": 2**63}, {}, "message_data_number"),
    ({**SMS, "id": -(2**63) - 1}, {}, "message_data_number"),
    (RAW % '"x": 0.300000000000000041', {}, "message_data_number"),
    (RAW % '"x": 1e-400', {}, "message_data_number"),
    (RAW % '"x": {"deep": [1e30]}', {}, "message_data_number"),
    (RAW % '"x": [-0.0, 1.0, 0.1, 0.30000000000000004, 9223372036854775807, 1e18, 1.5e-300]',
     {"priority": "10"}, "message_priority_range"),  # those numbers pass
    ({**SMS, "x": nested(MAX_DATA_DEPTH)}, {}, "message_data_depth"),
    ({**SMS, "message": "x" * (DEFAULT_DATA_SIZE + 1)}, {}, "message_data_size"),
    ({**SMS, "message": "\u00e9" * (DEFAULT_DATA_SIZE // 2)}, {}, "message_data_size"),
    (SMS, {"available_at": "'infinity'"}, "message_available_at_range"),
    (SMS, {"available_at": "'-infinity'"}, "message_available_at_range"),
    (SMS, {"available_at": "'10000-01-01 00:00+00'"}, "message_available_at_range"),
    (SMS, {"available_at": "'1969-12-31 23:59+00'"}, "message_available_at_range"),
    (SMS, {"created_at": "'infinity'"}, "message_created_at_range"),
    (SMS, {"expires_at": "'-infinity'"}, "message_expires_at_range"),
    (SMS, {"expires_at": "'infinity'"}, "message_expires_at_range"),
    (SMS, {"sent_at": "'infinity'"}, "message_sent_at_range"),
    (SMS, {"dedup_key": "''"}, "message_dedup_key_empty"),
    (SMS, {"priority": "10"}, "message_priority_range"),
    (SMS, {"attempts": "2147483647"}, "message_attempts_range"),
    (SMS, {"state": "'failed'"}, "message_state_new"),
    (SMS, {"state": "'sent'"}, "message_state_new"),
    ({**SMS, "expiration": "1e999"}, {}, "message_expiration_seconds"),
    ({**SMS, "expiration": "0x69000000"}, {}, "message_expiration_number"),
    ({**SMS, "expiration": "infinity"}, {}, "message_expiration_number"),
    ({**SMS, "receiver": f" {RECEIVER} x"}, {}, "message_receiver_msisdn"),
    ({**SMS, "message": "\t\u00a0\u3000"}, {}, "message_text_present"),
]
NOT_NULL = ["command", "data", "state", "attempts", "available_at", "created_at"]


def insert(conn: psycopg.Connection[Any], data: Any, columns: dict[str, str] | None = None,
           command: str | None = "send-sms") -> None:
    columns = columns or {}
    names = ", ".join(["command", "data", *columns])
    values = ", ".join(["%s", "%s::jsonb", *columns.values()])
    document = data if isinstance(data, str) or data is None else Jsonb(data)
    conn.execute(f"INSERT INTO outbox.message ({names}) VALUES ({values})", (command, document))


def assert_discreet(error: psycopg.Error) -> None:
    """Nothing the error carries names the receiver or the text."""
    diag = error.diag
    for part in (str(error), diag.message_primary, diag.message_detail, diag.message_hint,
                 diag.context, diag.internal_query):
        assert RECEIVER not in (part or "") and "6281234567890" not in (part or "")
        assert TEXT not in (part or "")


@pytest.mark.parametrize(("data", "columns", "rule"), DOOR,
                         ids=[f"{case[2]}-{i}" for i, case in enumerate(DOOR)])
def test_plain_insert_refuses_by_name(conn: psycopg.Connection[Any], data: Any,
                                      columns: dict[str, str], rule: str) -> None:
    with pytest.raises(pg_errors.CheckViolation) as caught:
        insert(conn, data, columns)
    assert caught.value.diag.constraint_name == rule
    assert str(caught.value).startswith("outbox.message: ")
    assert_discreet(caught.value)
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)


@pytest.mark.parametrize("column", NOT_NULL)
def test_a_null_in_a_not_null_column_is_named_without_quoting_the_row(
        conn: psycopg.Connection[Any], column: str) -> None:
    columns = {} if column in ("command", "data") else {column: "NULL"}
    with pytest.raises(pg_errors.NotNullViolation) as caught:
        insert(conn, None if column == "data" else SMS, columns,
               command=None if column == "command" else "send-sms")
    assert caught.value.diag.constraint_name == f"message_{column}_not_null"
    assert caught.value.diag.column_name == column
    assert "Failing row" not in str(caught.value)
    assert_discreet(caught.value)


UPDATES = [
    ("available_at = 'infinity'", "message_available_at_range"),
    ("expires_at = '-infinity'", "message_expires_at_range"),
    ("sent_at = 'infinity'", "message_sent_at_range"),
    ("created_at = '20000-01-01'", "message_created_at_range"),
    ("attempts = NULL", "message_attempts_not_null"),
    ("state = NULL", "message_state_not_null"),
    ("priority = NULL", "message_priority_not_null"),
    ("available_at = NULL", "message_available_at_not_null"),
    ("data = NULL", "message_data_not_null"),
    ("dedup_key = ''", "message_dedup_key_empty"),
    ("attempts = 2147483647", "message_attempts_range"),
    ("data = data || '{\"id\": 18446744073709551616}'", "message_data_number"),
]


@pytest.mark.parametrize("state", ["pending", "failed"])
@pytest.mark.parametrize(("assignment", "rule"), UPDATES, ids=[rule for _, rule in UPDATES])
def test_an_operators_update_is_refused_by_name_too(conn: psycopg.Connection[Any], state: str,
                                                    assignment: str, rule: str) -> None:
    if "data" in assignment and "NULL" not in assignment and state != "pending":
        pytest.skip("data is checked when it changes on a pending row (migration 0003)")
    insert(conn, SMS)
    conn.execute("UPDATE outbox.message SET state = %s", (state,))
    with pytest.raises(pg_errors.IntegrityError) as caught:
        conn.execute(f"UPDATE outbox.message SET {assignment}")
    assert caught.value.diag.constraint_name == rule
    assert_discreet(caught.value)


def test_the_relays_own_increments_past_a_million_attempts_stay_allowed(
        conn: psycopg.Connection[Any]) -> None:
    insert(conn, SMS, {"attempts": "1000000"})
    conn.execute("UPDATE outbox.message SET attempts = attempts + 1")
    conn.execute("UPDATE outbox.message SET state = 'sent', attempts = attempts + 1")
    assert conn.execute("SELECT attempts FROM outbox.message").fetchone() == (1_000_002,)


def test_a_huge_document_is_refused_on_its_size_alone(conn: psycopg.Connection[Any]) -> None:
    # 10 MB through plain SQL: refused from the stored size before anything reads it
    with pytest.raises(pg_errors.CheckViolation) as caught:
        conn.execute("INSERT INTO outbox.message (command, data) VALUES ('send-sms', "
                     "jsonb_build_object('receiver', %s::text, 'message', repeat('x', 10000000)))",
                     (RECEIVER,))
    assert caught.value.diag.constraint_name == "message_data_size"


# -- the Python helper: InvalidCommand, same names, nothing sent ------------------------------

HELPER = [
    ("send-sms", {**SMS, "id": 2**64}, {}, "message_data_number"),
    ("send-sms", {**SMS, "x": [2**63]}, {}, "message_data_number"),
    ("send-sms", {**SMS, "x": 1e19}, {}, "message_data_number"),  # 10000000000000000000 in jsonb
    ("send-sms", {**SMS, "x": 1e-310}, {}, "message_data_number"),
    ("send-sms", {**SMS, "x": math.nan}, {}, "message_data_number"),
    ("send-sms", {**SMS, "x": math.inf}, {}, "message_data_number"),
    ("send-sms", {**SMS, "x": nested(MAX_DATA_DEPTH)}, {}, "message_data_depth"),
    ("send-sms", {**SMS, "message": "x" * (DEFAULT_DATA_SIZE + 1)}, {}, "message_data_size"),
    ("send-sms", {**SMS, "message": "\u00e9" * (DEFAULT_DATA_SIZE // 2)}, {}, "message_data_size"),
    ("send-sms", {**SMS, "x": Decimal("1.5")}, {}, "message_data_storable"),
    ("send-sms", {**SMS, "x": datetime.now(UTC)}, {}, "message_data_storable"),
    ("send-sms", {**SMS, "receiver": f"\t{RECEIVER}\u00a0x"}, {}, "message_receiver_msisdn"),
    ("send-sms", {**SMS, "receiver": "+62812345678\u0661"}, {}, "message_receiver_msisdn"),
    ("send-sms", {**SMS, "message": "\u2003"}, {}, "message_text_present"),
    ("send-sms", {**SMS, "expiration": "0x69000000"}, {}, "message_expiration_number"),
    ("send-sms", {**SMS, "expiration": "1e999"}, {}, "message_expiration_seconds"),
    ("send-sms", {**SMS, "expiration": "\u0661\u0662"}, {}, "message_expiration_number"),
    (None, SMS, {}, "message_command_not_null"),
    ("send-sms", None, {}, "message_data_not_null"),
    ("send-sms", SMS, {"dedup_key": ""}, "message_dedup_key_empty"),
    ("send-sms", SMS, {"available_at": datetime(1900, 1, 1, tzinfo=UTC)},
     "message_available_at_range"),
]


@pytest.mark.parametrize(("command", "data", "options", "rule"), HELPER,
                         ids=[f"{case[3]}-{i}" for i, case in enumerate(HELPER)])
def test_python_helper_raises_invalid_command_with_the_databases_name(
        conn: psycopg.Connection[Any], command: Any, data: Any, options: dict[str, Any],
        rule: str) -> None:
    with conn.transaction():
        with pytest.raises(InvalidCommand) as caught:
            enqueue(conn, command, data, **options)
        assert caught.value.rule == rule
        assert RECEIVER not in str(caught.value) and TEXT not in str(caught.value)
        # the caller's transaction is still usable: nothing reached the database
        assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)


def test_python_helper_refuses_200_mb_before_sending_it(conn: psycopg.Connection[Any]) -> None:
    huge = "x" * 200_000_000
    with conn.transaction():
        with pytest.raises(InvalidCommand) as caught:
            enqueue(conn, "send-sms", {"receiver": RECEIVER, "message": huge})
        assert caught.value.rule == "message_data_size"
        assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)
    del huge


@contextmanager
def data_size_limit(conn: psycopg.Connection[Any], limit: int) -> Iterator[None]:
    conn.execute("SELECT outbox.set_message_data_size(%s)", (limit,))
    try:
        yield
    finally:
        conn.execute("SELECT outbox.set_message_data_size(%s)", (DEFAULT_DATA_SIZE,))


def test_the_size_limit_is_configurable_and_the_helper_reads_it(
        conn: psycopg.Connection[Any]) -> None:
    data = {**SMS, "message": "y" * 3000}
    enqueue(conn, "send-sms", data)  # under the default
    with data_size_limit(conn, 2048):
        with pytest.raises(pg_errors.CheckViolation) as caught:
            insert(conn, data)
        assert caught.value.diag.constraint_name == "message_data_size"
        with pytest.raises(InvalidCommand) as refused:
            enqueue(conn, "send-sms", data)
        assert refused.value.rule == "message_data_size"
        assert "2,048" in str(refused.value)
    with pytest.raises(pg_errors.InvalidParameterValue):
        conn.execute("SELECT outbox.set_message_data_size(100)")


@pytest.mark.parametrize("size", [1000, 1024, 4000, DEFAULT_DATA_SIZE - 40, DEFAULT_DATA_SIZE])
def test_helper_and_database_measure_the_size_alike(conn: psycopg.Connection[Any],
                                                    size: int) -> None:
    # numbers jsonb writes out longer (1e+16 -> 10000000000000000), escapes, multi-byte text
    head = {"receiver": RECEIVER, "n": 1e16, "f": 1.5e-7, "z": -0.0, "esc": "\"\\\n\x01é😀"}
    text_len = conn.execute("SELECT octet_length(%s::jsonb::text)",
                            (Jsonb({**head, "message": ""}),)).fetchone()[0]  # type: ignore[index]
    data = {**head, "message": "m" * (size - text_len)}
    sql_size = conn.execute("SELECT octet_length(%s::jsonb::text)",
                            (Jsonb(data),)).fetchone()[0]  # type: ignore[index]
    assert sql_size == size
    python: str
    try:
        validate_new("send-sms", data, now=time.time())
        python = "accepted"
    except InvalidCommand as exc:
        python = exc.rule
    try:
        with conn.transaction(force_rollback=True):
            insert(conn, data)
        database = "accepted"
    except pg_errors.CheckViolation as exc:
        database = exc.diag.constraint_name or "?"
    assert python == database == ("accepted" if size <= DEFAULT_DATA_SIZE else "message_data_size")


# -- one receiver rule, one canonical form ------------------------------------------------------

#: every character both sides trim, and a few look-alikes neither does
SPACES = st.sampled_from([*WHITESPACE, "\u200b", "\ufeff", "\x01"])
DIGITS = st.sampled_from("0123456789") | st.sampled_from("\u0660\u0661\u06f1\u0966\uff11\u00b2")
receiver_char = st.one_of(DIGITS, DIGITS, SPACES, st.sampled_from("+-@._ aZ#\u00e9"),
                          st.characters(codec="utf-8", exclude_characters="\x00"))
receivers = st.one_of(
    st.lists(receiver_char, max_size=20).map("".join),
    st.tuples(st.lists(SPACES, max_size=3).map("".join),
              st.from_regex(r"\+?[0-9]{1,17}", fullmatch=True),
              st.lists(SPACES, max_size=3).map("".join)).map("".join),
    st.tuples(st.lists(SPACES, max_size=2).map("".join), st.emails(),
              st.lists(SPACES, max_size=2).map("".join)).map("".join),
)
RECEIVER_COMMANDS = ["send-sms", "send-email", "block-msisdn", "unblock-msisdn", "create-otp"]


def data_for(command: str, receiver: str) -> dict[str, Any]:
    if command == "create-otp":
        return {"receiver": receiver, "reference": "ref-1", "message": "code %s"}
    if command == "send-email":
        return {"receiver": receiver, "subject": "s", "message": "m"}
    if command == "send-sms":
        return {"receiver": receiver, "message": "m"}
    return {"receiver": receiver}


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command=st.sampled_from(RECEIVER_COMMANDS), receiver=receivers)
def test_database_and_helper_accept_the_same_receivers_in_the_same_form(
        conn: psycopg.Connection[Any], command: str, receiver: str) -> None:
    data = data_for(command, receiver)
    try:
        _, stored, _ = validate_new(command, data, now=time.time())
        python, python_form = "accepted", stored["receiver"]
    except InvalidCommand as exc:
        python, python_form = exc.rule, None
    database_form = None
    try:
        with conn.transaction(force_rollback=True):
            row = conn.execute(
                "INSERT INTO outbox.message (command, data) VALUES (%s, %s) "
                "RETURNING data ->> 'receiver', ordering_key, outbox.canonical_receiver(%s)",
                (command, Jsonb(data), receiver)).fetchone()
            assert row is not None
            database, database_form = "accepted", row[0]
            assert row[2] == canonical_receiver(receiver)
            if command in ("block-msisdn", "unblock-msisdn"):
                assert row[1] == "msisdn:" + database_form.lstrip("+")
    except pg_errors.CheckViolation as exc:
        database = exc.diag.constraint_name or "?"
    assert python == database, (command, receiver)
    assert python_form == database_form
    if python_form is not None:
        assert python_form == receiver.strip(WHITESPACE)
        assert python_form == python_form.strip()  # nothing left for str.strip() either


def test_block_and_unblock_of_one_number_name_the_same_string_on_the_wire(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    enqueue(conn, BlockMsisdn(receiver=f" {RECEIVER}\t"))
    conn.execute("INSERT INTO outbox.message (command, data) VALUES ('unblock-msisdn', %s)",
                 (Jsonb({"receiver": f"\u00a0{RECEIVER}\u3000"}),))
    enqueue(conn, UnblockMsisdn(receiver=RECEIVER))
    # a row from before migration 0013 (the trigger disabled to write it as it was)
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("INSERT INTO outbox.message (command, data, priority) "
                     "VALUES ('block-msisdn', %s, 2)", (Jsonb({"receiver": f"  {RECEIVER} "}),))
    keys = {row[0] for row in conn.execute(
        "SELECT ordering_key FROM outbox.message WHERE ordering_key IS NOT NULL")}
    assert keys == {"msisdn:6281234567890"}

    transport = MemoryTransport()
    settings_ = Settings(transports={"default": "memory://"})
    service = RelayService(settings_, clean_db, transports_factory=lambda s: {"default": transport})
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while len(transport.delivered) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(20)
    assert service.errors == []
    receivers_sent = {envelope.body.split(b'"receiver":"')[1].split(b'"')[0]
                      for envelope in transport.delivered}
    assert receivers_sent == {RECEIVER.encode()}
    assert len(transport.delivered) == 4


def test_the_migration_brings_pending_rows_within_the_rules() -> None:
    from outbox import db  # noqa: PLC0415
    from tests.conftest import empty_database  # noqa: PLC0415

    with empty_database() as url:
        db.upgrade(url, "0012")
        with psycopg.connect(url, autocommit=True) as old:
            for columns in ("available_at = 'infinity'", "available_at = '-infinity'",
                            "created_at = 'infinity'", "expires_at = '-infinity'",
                            "expires_at = 'infinity'", "attempts = 2147483647",
                            "dedup_key = ''"):
                row = old.execute("INSERT INTO outbox.message (command, data) "
                                  "VALUES ('send-sms', %s) RETURNING id", (Jsonb(SMS),)).fetchone()
                assert row is not None
                old.execute(f"UPDATE outbox.message SET {columns} WHERE id = %s", (row[0],))
        db.upgrade(url)
        with psycopg.connect(url, autocommit=True) as new:
            rows = new.execute(
                "SELECT available_at <= now(), isfinite(created_at), expires_at::text, attempts,"
                " dedup_key FROM outbox.message ORDER BY id").fetchall()
    assert [row[0] for row in rows] == [True] * 7  # due now (or as it was)
    assert all(row[1] for row in rows)
    assert rows[3][2] is not None and rows[3][2].startswith("1970-01-01")  # expired at once
    assert rows[4][2] is None  # never expires
    assert rows[5][3] == 1_000_000
    assert rows[6][4] is None
