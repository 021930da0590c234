"""Property-based bad input (hypothesis): every case goes through a plain ``INSERT`` and through
``outbox.enqueue()``, each in its own transaction.

Each attempt ends one of three ways:

* ``accepted``: a row (which the relay must then take to ``sent``, ``failed`` or ``expired``
  with a reason);
* ``refused: <rule>``: refused with a name: a ``check_violation`` carrying the constraint name,
  or ``InvalidCommand.rule``; what Postgres (or psycopg) cannot take at all, before any rule of
  ours runs (``\\u0000`` in jsonb, a lone surrogate, a NUL byte in a text column), is named by
  its SQLSTATE or error class and counted apart;
* anything else is ``refused_without_a_name``: the property is broken.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from outbox.errors import InvalidCommand
from outbox.producer import enqueue

#: Postgres refusing the JSON itself, before any rule of ours runs
JSON_INPUT_ERRORS = {"22P02": "invalid JSON input", "22P05": "JSON with \\u0000"}

COMMANDS = ["send-sms", "send-email", "block-msisdn", "unblock-msisdn", "create-otp",
            "send-mail", "request-otp", "send-message", "verify-otp", "validate-otp",
            "SEND-SMS", " send-sms ", "Send-Email", "echo", "", "send_sms"]


def _later(seconds: int) -> int:
    return int(time.time()) + seconds


any_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec=None), max_size=10),  # lone surrogates too
    st.sampled_from(["", " ", "\t", "\x00", "a\x00b", "é", "😀", "%s", "%d", "%%", "%%s"]),
)
msisdn = st.from_regex(r"\+?[0-9]{3,15}", fullmatch=True)
email = st.emails()
printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF,
                                           exclude_categories=("Cs",)), min_size=1,
                    max_size=80).filter(lambda t: t.strip() != "")
future = st.integers(min_value=120, max_value=7200).map(_later)

#: values a field should never hold, whatever the command
bad_value = st.one_of(
    any_text, st.none(), st.booleans(), st.integers(min_value=-(10**14), max_value=10**14),
    st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.from_regex(r"\+?[0-9]{1,2}|[0-9]{16,20}", fullmatch=True),  # MSISDN-like, wrong length
    st.sampled_from(["a@b", "@b.c", "a b@c.d", "a@@b.c", "%s and %s", "%d", "no code here"]),
    st.integers(min_value=0, max_value=7200).map(lambda s: _later(s) * 1000),  # milliseconds
    st.integers(min_value=1, max_value=10**6).map(lambda s: _later(-s)),  # already past
    st.integers(min_value=1, max_value=3).map(_later),  # about to expire
    st.integers(min_value=0, max_value=7200).map(lambda s: str(_later(s))),  # seconds as text
)

VALID_NAMES = {
    "send-sms": ["send-sms", "SEND-SMS", " send-sms ", "send-message"],
    "send-email": ["send-email", "send-mail", "Send-Email", "send-message"],
    "block-msisdn": ["block-msisdn"],
    "unblock-msisdn": ["unblock-msisdn"],
    "create-otp": ["create-otp", "request-otp"],
}


@st.composite
def valid_case(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    command = draw(st.sampled_from(sorted(VALID_NAMES)))
    name = draw(st.sampled_from(VALID_NAMES[command]))
    if command == "send-email":
        data: dict[str, Any] = {"receiver": draw(email), "subject": draw(printable),
                                "message": draw(printable)}
    elif command == "create-otp":
        data = {"receiver": draw(st.one_of(msisdn, email)), "reference": draw(printable),
                "message": draw(printable).replace("%", "%%") + " %s"}
    else:
        data = {"receiver": draw(msisdn)}
        if command == "send-sms":
            data["message"] = draw(printable)
    if command != "block-msisdn" and command != "unblock-msisdn" and draw(st.booleans()):
        data["expiration"] = draw(future)
    return name, data


@st.composite
def mutated_case(draw: st.DrawFn) -> tuple[str, Any]:
    """A valid command with one field dropped or replaced by a bad value."""
    name, data = draw(valid_case())
    key = draw(st.sampled_from(["receiver", "message", "subject", "reference", "expiration",
                                "param1", "id"]))
    if draw(st.booleans()) and key in data:
        del data[key]
    else:
        data[key] = draw(bad_value)
    return name, data


random_data = st.one_of(
    st.fixed_dictionaries({}, optional={key: bad_value for key in (
        "receiver", "message", "subject", "reference", "expiration", "param1")}),
    st.none(), st.integers(), any_text, st.lists(st.integers(), max_size=3))
random_case = st.tuples(st.one_of(st.sampled_from(COMMANDS), any_text), random_data)
case = st.one_of(valid_case(), mutated_case(), mutated_case(), random_case)


@dataclass(frozen=True)
class Case:
    command: Any
    data: Any
    sql: str
    helper: str


def outcome_of_database_error(exc: psycopg.Error) -> str:
    state = exc.sqlstate or "?"
    constraint = exc.diag.constraint_name if exc.diag else None
    if state == "23514" and constraint:
        return f"refused: {constraint}"
    if state in JSON_INPUT_ERRORS:
        return f"refused by Postgres: {JSON_INPUT_ERRORS[state]} ({state})"
    if exc.sqlstate is None and isinstance(exc, psycopg.DataError) and "NUL" in str(exc):
        # psycopg will not even send a text value holding a NUL byte
        return "refused by Postgres: NUL byte in a text value (psycopg DataError)"
    return f"refused without a name: {type(exc).__name__} ({state})"


def try_sql(conn: psycopg.Connection[Any], command: Any, data: Any) -> str:
    try:
        with conn.transaction():
            conn.execute("INSERT INTO outbox.message (command, data) VALUES (%s, %s)",
                         (command if isinstance(command, str) else str(command),
                          None if data is None else Jsonb(data)))  # None: SQL NULL, as the helper
    except psycopg.Error as exc:
        return outcome_of_database_error(exc)
    except (ValueError, TypeError, UnicodeError) as exc:  # the client could not even send it
        return f"refused without a name: client {type(exc).__name__}"
    return "accepted"


def try_helper(conn: psycopg.Connection[Any], command: Any, data: Any) -> str:
    try:
        with conn.transaction():
            enqueue(conn, command, data)
    except InvalidCommand as exc:
        return f"refused: {exc.rule}"
    except psycopg.Error as exc:
        return outcome_of_database_error(exc)
    except Exception as exc:
        return f"refused without a name: {type(exc).__name__}"
    return "accepted"


def explore(url: str, examples: int) -> list[Case]:
    cases: list[Case] = []
    with psycopg.connect(url, autocommit=True) as conn:

        @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(case)
        def check(drawn: tuple[Any, Any]) -> None:
            command, data = drawn
            cases.append(Case(command, data, try_sql(conn, command, data),
                              try_helper(conn, command, data)))

        check()
    return cases


def _bucket(outcome: str) -> str:
    if outcome.startswith("refused without a name"):
        return "refused_without_a_name"
    if outcome.startswith("refused by Postgres"):
        return "refused_by_postgres_json_input"
    if outcome.startswith("refused:"):
        return "refused_by_rule"
    return "accepted"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def summarise(cases: list[Case]) -> dict[str, Any]:
    counts = {"sql": Counter(_bucket(c.sql) for c in cases),
              "helper": Counter(_bucket(c.helper) for c in cases)}
    rules = Counter(o for c in cases for o in (c.sql, c.helper) if o.startswith("refused"))
    unnamed = [{"path": path, "command": _short(c.command), "data": _short(c.data),
                "outcome": outcome}
               for c in cases for path, outcome in (("sql", c.sql), ("helper", c.helper))
               if outcome.startswith("refused without a name")]
    by_postgres = [{"path": path, "command": _short(c.command), "data": _short(c.data),
                    "outcome": outcome}
                   for c in cases for path, outcome in (("sql", c.sql), ("helper", c.helper))
                   if outcome.startswith("refused by Postgres")]
    disagreements = [{"command": _short(c.command), "data": _short(c.data), "sql": c.sql,
                      "helper": c.helper}
                     for c in cases if c.sql != c.helper]
    # one path accepts what the other refuses: worse than two names for one refusal
    opposite = [d for d in disagreements if "accepted" in (d["sql"], d["helper"])]
    return {
        "counts": {path: dict(counter) for path, counter in counts.items()},
        "outcomes": dict(rules.most_common()),
        "refused_without_a_name": sorted(unnamed, key=lambda e: len(e["data"]))[:10],
        "refused_by_postgres_json_input": [
            example for path in ("helper", "sql")
            for example in sorted((e for e in by_postgres if e["path"] == path),
                                  key=lambda e: len(e["data"]))[:3]],
        "disagreements": len(disagreements),
        "accepted_by_one_path_only": len(opposite),
        "accepted_by_one_path_only_examples": sorted(opposite, key=lambda e: len(e["data"]))[:10],
        "disagreement_examples": sorted(disagreements, key=lambda e: len(e["data"]))[:10],
    }


# -- whole rows: arbitrary column values and arbitrary jsonb, through plain SQL (issue 13) -----

#: SQL literals for the time columns; None leaves the column to its default
TIMES = st.sampled_from([None, None, None, "now()", "now() - interval '1 hour'",
                         "now() + interval '2 seconds'", "'infinity'", "'-infinity'", "NULL",
                         "'9999-12-31 23:00+00'", "'10000-01-01+00'", "'1900-01-01+00'",
                         "now() + interval '1 hour'"])

json_leaf = st.one_of(
    st.none(), st.booleans(), any_text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 1e19, 1e-310, 0.30000000000000004]),
)
any_json = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=12)


@st.composite
def deep_json(draw: st.DrawFn) -> Any:
    value: Any = draw(json_leaf)
    for _ in range(draw(st.integers(min_value=55, max_value=1100))):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


@st.composite
def row_data(draw: st.DrawFn) -> Any:
    """A command's data: valid, mutated, or any JSON at all (deep, huge numbers, spaces)."""
    kind = draw(st.sampled_from(["valid", "mutated", "any", "extra", "deep", "spaced"]))
    if kind == "valid":
        return draw(valid_case())[1]
    if kind == "mutated":
        return draw(mutated_case())[1]
    if kind == "any":
        return draw(any_json)
    _, data = draw(valid_case())
    if kind == "extra":
        data[draw(st.sampled_from(["id", "x", "param1", "nested"]))] = draw(any_json)
    elif kind == "deep":
        data["x"] = draw(deep_json())
    else:
        spaces = st.text(alphabet=st.sampled_from(" \t\n\u00a0\u2003\u3000"), max_size=3)
        data["receiver"] = draw(spaces) + str(data.get("receiver")) + draw(spaces)
    return data


ROUTES = st.one_of(st.none(), st.sampled_from(
    ["default", "sms", "nowhere", "", " ", "+", "default+", " default + sms ", "default+nowhere",
     "++", "@send-sms", "default+default"]), any_text)


#: for each column, values from the odd to the absurd (None: the column's default)
COLUMN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "command": st.one_of(st.sampled_from(COMMANDS), any_text),
    "data": row_data(),
    "route": ROUTES,
    "priority": st.one_of(st.none(), st.integers(min_value=-2, max_value=12),
                          st.sampled_from([32767, -32768])),
    "ordering_key": st.one_of(st.none(), st.sampled_from(["", " ", "k1", "k2"]), any_text),
    "dedup_key": st.one_of(st.none(), st.sampled_from(["", "dup"]), st.uuids().map(str)),
    "state": st.sampled_from([None, "pending", "PENDING", "NULL", "queued", "sent", "failed"]),
    "attempts": st.one_of(st.none(), st.integers(min_value=-1, max_value=20),
                          st.sampled_from([2**31 - 1, 2**31 - 2, 1_000_000, 1_000_001])),
    "available_at": TIMES, "expires_at": TIMES, "created_at": TIMES,
    "sent_at": st.sampled_from([None, "now()", "'infinity'", "NULL"]),
}


@st.composite
def row_case(draw: st.DrawFn) -> dict[str, Any]:
    """Column values for one INSERT: a valid row with a few columns (0 to 4) replaced by
    anything, so that odd rows the door lets through reach the relay often."""
    name, data = draw(valid_case())
    row: dict[str, Any] = dict.fromkeys(COLUMN_VALUES)
    row["command"], row["data"] = name, data
    for column in draw(st.lists(st.sampled_from(sorted(COLUMN_VALUES)), max_size=4,
                                unique=True)):
        row[column] = draw(COLUMN_VALUES[column])
    return row


#: an operator's UPDATE of one column of a row, as a SQL assignment
UPDATES = st.one_of(
    st.sampled_from([
        "state = 'pending', attempts = 0", "state = 'failed'", "state = NULL", "state = 'held'",
        "attempts = -1", "attempts = NULL", "attempts = 2147483647", "priority = NULL",
        "priority = 11", "available_at = 'infinity'", "available_at = now()",
        "available_at = NULL", "expires_at = '-infinity'", "expires_at = now() - interval '1s'",
        "created_at = 'infinity'", "sent_at = 'infinity'", "dedup_key = ''",
        "route = 'nowhere'", "route = ' + '", "ordering_key = 'k1'", "command = 'echo'",
        "command = NULL", "data = NULL", "data = '[]'",
        "data = data || '{\"id\": 18446744073709551616}'",
        "data = jsonb_set(data, '{receiver}', to_jsonb(' ' || (data ->> 'receiver') || ' '))",
        "data = data || jsonb_build_object('message', repeat('x', 70000))",
    ]),
)

_TEXT_COLUMNS = ("command", "route", "ordering_key", "dedup_key", "state")


def insert_row(conn: psycopg.Connection[Any], row: dict[str, Any]) -> tuple[int | None, str]:
    """INSERT one generated row in its own transaction: ``(id, "accepted")`` or
    ``(None, outcome)`` with the outcome named as :func:`outcome_of_database_error` does."""
    columns: list[str] = ["data"]
    values: list[str] = ["%s"]
    params: list[Any] = [Jsonb(row["data"])]
    for column in (*_TEXT_COLUMNS, "priority", "attempts"):
        value = row[column]
        if value is None:
            continue
        columns.append(column)
        if value == "NULL":
            values.append("NULL")
        else:
            values.append("%s")
            params.append(value)
    for column in ("available_at", "expires_at", "created_at", "sent_at"):
        if row[column] is not None:
            columns.append(column)
            values.append(row[column])
    if "command" not in columns:
        columns.append("command")
        values.append("NULL")
    try:
        with conn.transaction():
            found = conn.execute(f"INSERT INTO outbox.message ({', '.join(columns)}) "
                                 f"VALUES ({', '.join(values)}) RETURNING id",
                                 params).fetchone()
    except psycopg.Error as exc:
        return None, outcome_of_database_error(exc)
    except (ValueError, TypeError, UnicodeError, OverflowError) as exc:
        return None, f"refused by the client: {type(exc).__name__}"
    assert found is not None
    return int(found[0]), "accepted"


def update_row(conn: psycopg.Connection[Any], row_id: int, assignment: str) -> str:
    try:
        with conn.transaction():
            conn.execute(f"UPDATE outbox.message SET {assignment} WHERE id = %s", (row_id,))
    except psycopg.Error as exc:
        return outcome_of_database_error(exc)
    return "accepted"


def unfinished(conn: psycopg.Connection[Any], ids: list[int]) -> list[tuple[Any, ...]]:
    """Rows of ``ids`` that are due and still pending (claimed ones included: a lease is a
    promise to finish them), or ended failed/expired without a reason. A row behind an
    earlier pending row of its ordering key waits its turn, as ordering keys promise."""
    return conn.execute(
        "SELECT id, state, attempts, available_at::text, last_error FROM outbox.message AS m "
        "WHERE id = ANY(%s) AND ((state = 'pending' AND (available_at <= now() + interval '5 s' "
        "                                              OR claim IS NOT NULL) "
        "      AND NOT EXISTS (SELECT 1 FROM outbox.message AS e WHERE e.state = 'pending' "
        "                      AND e.ordering_key = m.ordering_key AND e.id < m.id)) "
        "     OR (state IN ('failed', 'expired') AND coalesce(last_error, '') = ''))",
        (ids,)).fetchall()


def explore_rows(url: str, examples: int) -> tuple[list[int], Counter[str]]:
    """Write ``examples`` generated rows (and an operator's UPDATE now and then) through plain
    SQL; return the ids the door let in and how each attempt ended."""
    accepted: list[int] = []
    outcomes: Counter[str] = Counter()
    with psycopg.connect(url, autocommit=True) as conn:

        @settings(max_examples=examples, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(row_case(), st.one_of(st.none(), UPDATES))
        def write(row: dict[str, Any], update: str | None) -> None:
            row_id, outcome = insert_row(conn, row)
            outcomes[outcome] += 1
            if row_id is not None:
                accepted.append(row_id)
                if update is not None:
                    outcomes[f"update {update_row(conn, row_id, update)}"] += 1

        write()
    return accepted, outcomes


def wait_until_ended(url: str, timeout: float, alive: Callable[[], bool]) -> list[tuple[Any, ...]]:
    """Poll until every row is refused, ended with a reason, or scheduled for later; return
    what is still unfinished at the timeout (or when the relay died)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            ids = [row[0] for row in conn.execute("SELECT id FROM outbox.message")]
            left = unfinished(conn, ids)
            if not left or time.monotonic() > deadline or not alive():
                return left
            time.sleep(0.5)
