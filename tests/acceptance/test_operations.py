"""The operator's commands in a subprocess against the real Postgres: status, failed rows,
purge, check and config, with their exit codes and their output on a terminal or not."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.acceptance.test_cli import OUTBOX, env_for, outbox
from tests.conftest import empty_database, rows_by_state

SECRET_1 = "74de07c4e919534b1b460e3465bb216ce0cc2bd458e42abaf0f22448da08d063"
OLD_1 = "872737ae8121bc1b984efcbd5f7931d3822326351a30518a018c4c502b95c533"
OLD_2 = "893a3cfd3912a125b2419774d2752a3bb8cc175927cd5b421336e4f028607452"

pytestmark = pytest.mark.acceptance

PHONE = "+6281234567890"


@pytest.fixture
def env(clean_db: str) -> dict[str, str]:
    return env_for(clean_db, OUTBOX_TRANSPORT="stdout://", OUTBOX_TRANSPORT_SMS="stdout://",
                   OUTBOX_ROUTE_SEND_SMS="sms", OUTBOX_LOG_FORMAT="json")


def insert(connection: psycopg.Connection[Any], count: int, *, state: str = "pending",
           age: str = "0 seconds", command: str = "send-sms", error: str | None = None,
           ) -> list[int]:
    data = ({"receiver": PHONE, "message": "Your parcel is on its way"}
            if command == "send-sms" else
            {"receiver": "ann@example.com", "subject": "Hi", "message": "Hello Ann"})
    ids = [row[0] for row in connection.execute(
        """INSERT INTO outbox.message (command, data, created_at)
           SELECT %s, %s, now() - %s::interval FROM generate_series(1, %s) RETURNING id""",
        (command, Jsonb(data), age, count)).fetchall()]
    if state != "pending":
        connection.execute(
            "UPDATE outbox.message SET state = %s, attempts = 4, last_error = %s, "
            "sent_at = CASE WHEN %s = 'sent' THEN now() END WHERE id = ANY(%s)",
            (state, error, state, ids))
    return ids


def with_tty_stderr(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``outbox`` with standard error on a pseudo-terminal, as an operator at a shell."""
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([*OUTBOX, *args], env=env, stdout=subprocess.PIPE,
                              stderr=follower, text=True, timeout=60, check=False)
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    return done.returncode, done.stdout, b"".join(chunks).decode(errors="replace")


# --- status --------------------------------------------------------------------------------


def test_status_shows_states_routes_and_rate(env: dict[str, str],
                                             conn: psycopg.Connection[Any]) -> None:
    insert(conn, 3, age="5 minutes")
    insert(conn, 2, command="send-email")
    insert(conn, 4, state="sent")
    insert(conn, 1, state="failed")

    text = outbox("status", env=env)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["state", "rows"]
    assert lines[1].split() == ["pending", "5"]
    assert lines[2].split() == ["failed", "1"]
    assert lines[3].split() == ["sent", "4"]
    routes = {line.split()[0]: line.split() for line in lines if line.startswith(("sms",
                                                                                    "default"))}
    assert routes["sms"][1:4] == ["3", "3", "0"] and routes["sms"][4].startswith("5m")
    assert routes["default"][1] == "2"
    assert "sent in the last 5m: 4 (0.0/s)" in text.stdout
    assert text.stderr == ""

    shown = json.loads(outbox("status", "--json", env=env).stdout)
    assert shown["counts"] == {"pending": 5, "failed": 1, "sent": 4, "expired": 0}
    assert shown["estimated"] == []
    assert shown["routes"]["sms"]["pending"] == 3
    assert 290 < shown["oldest_pending_age_seconds"] < 400
    assert shown["rate"]["sent"] == 4


def test_status_of_an_empty_outbox(env: dict[str, str]) -> None:
    result = outbox("status", env=env)
    assert result.returncode == 0, result.stderr
    assert "no pending rows" in result.stdout


# --- failed rows ---------------------------------------------------------------------------


def test_failed_list_masks_receivers(env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    insert(conn, 2, state="failed", error=f"device refused {PHONE}")
    insert(conn, 1, state="failed", command="send-email", age="2 days")

    listing = outbox("failed", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert PHONE[1:] not in listing.stdout and "ann@" not in listing.stdout
    assert listing.stdout.splitlines()[0].split() == ["id", "age", "command", "route",
                                                      "receiver", "attempts", "error"]
    assert "***90" in listing.stdout and "***om" in listing.stdout
    assert "device refused ***90" in listing.stdout

    shown = json.loads(outbox("failed", "list", "--json", "--older-than", "1d",
                              env=env).stdout)
    assert shown["total"] == 1
    assert [row["command"] for row in shown["rows"]] == ["send-email"]
    assert shown["rows"][0]["receiver"] == "***om" and shown["rows"][0]["route"] == "default"

    limited = outbox("failed", "list", "--limit", "1", env=env)
    assert "(1 newest of 3; --limit shows more)" in limited.stdout


def test_failed_retry_keeps_the_id_and_resets_attempts(env: dict[str, str],
                                                       conn: psycopg.Connection[Any]) -> None:
    first, second = insert(conn, 2, state="failed", error="boom")
    insert(conn, 3, state="failed", command="send-email")

    refused = outbox("failed", "retry", env=env)
    assert refused.returncode == 2
    assert "needs a filter" in refused.stderr and "--all" in refused.stderr

    one = outbox("failed", "retry", "--id", str(first), env=env)
    assert one.returncode == 0, one.stderr
    assert one.stdout == "1 failed row retried\n"
    assert conn.execute("SELECT state, attempts, last_error FROM outbox.message WHERE id = %s",
                        (first,)).fetchone() == ("pending", 0, None)

    dry = outbox("failed", "retry", "--all", "--dry-run", env=env)
    assert dry.stdout == "4 failed rows would be retried\n"
    assert rows_by_state(conn) == {"pending": 1, "failed": 4}

    by_route = outbox("failed", "retry", "--route", "sms", "--json", env=env)
    assert json.loads(by_route.stdout) == {"retried": 1, "dry_run": False}
    assert rows_by_state(conn) == {"pending": 2, "failed": 3}
    assert conn.execute("SELECT state FROM outbox.message WHERE id = %s",
                        (second,)).fetchone() == ("pending",)


def test_bulk_retry_is_quiet_in_scripts_and_shows_progress_on_a_terminal(
        env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    insert(conn, 2500, state="failed")
    quiet = outbox("failed", "retry", "--all", env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "2,500 failed rows retried\n"
    assert quiet.stderr.count("\n") <= 1  # at most the one audit log line, no progress
    assert "retrying" not in quiet.stderr

    conn.execute("UPDATE outbox.message SET state = 'failed'")
    code, stdout, terminal = with_tty_stderr(["failed", "retry", "--all"], env)
    assert code == 0
    assert stdout == "2,500 failed rows retried\n"
    assert "retrying failed rows: 1,000 of 2,500 (40%)" in terminal


def test_failed_discard_by_age(env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    insert(conn, 3, state="failed", age="40 days")
    keep = insert(conn, 1, state="failed")
    insert(conn, 2)
    result = outbox("failed", "discard", "--older-than", "30d", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "3 failed rows discarded\n"
    assert rows_by_state(conn) == {"failed": 1, "pending": 2}
    assert conn.execute("SELECT id FROM outbox.message WHERE state = 'failed'"
                        ).fetchone() == (keep[0],)
    bad = outbox("failed", "discard", "--older-than", "a while", env=env)
    assert bad.returncode == 2
    assert "'a while' is not a duration" in bad.stderr


# --- purge -----------------------------------------------------------------------------------


def test_purge_removes_old_terminal_rows_and_never_pending_ones(
        env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    insert(conn, 1500, state="sent", age="8 days")
    insert(conn, 2, state="expired", age="8 days")
    insert(conn, 3, state="failed", age="31 days")
    insert(conn, 4, state="failed", age="8 days")
    insert(conn, 5, state="sent")
    insert(conn, 6, age="90 days")

    dry = outbox("purge", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == ("would purge 1,500 sent and 2 expired rows older than 7d, "
                          "3 failed rows older than 30d\n")
    assert sum(rows_by_state(conn).values()) == 1520

    done = outbox("purge", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"sent": 1500, "expired": 2, "failed": 3, "otps": 0,
                                       "dry_run": False}
    assert rows_by_state(conn) == {"failed": 4, "sent": 5, "pending": 6}
    assert "purging" not in done.stderr

    shorter = outbox("purge", env={**env, "OUTBOX_FAILED_RETENTION": "1d"})
    assert shorter.stdout.startswith("purged 0 sent and 0 expired rows older than 7d, "
                                     "4 failed rows older than 1d")
    assert rows_by_state(conn) == {"sent": 5, "pending": 6}


def test_purge_shows_progress_on_a_terminal(env: dict[str, str],
                                            conn: psycopg.Connection[Any]) -> None:
    insert(conn, 2500, state="sent", age="30 days")
    code, stdout, terminal = with_tty_stderr(["purge", "--batch-size", "500"], env)
    assert code == 0, terminal
    assert stdout.startswith("purged 2,500 sent")
    assert "purging: 500" in terminal


def test_purge_waits_for_no_one(env: dict[str, str], conn: psycopg.Connection[Any],
                                clean_db: str) -> None:
    insert(conn, 3, state="sent", age="30 days")
    with psycopg.connect(clean_db, autocommit=True) as relay:
        relay.execute("SELECT pg_advisory_lock(hashtextextended('outbox.retention', 0))")
        busy = outbox("purge", env=env)
    assert busy.returncode == 1
    assert "another process is purging" in busy.stderr
    assert rows_by_state(conn) == {"sent": 3}


# --- check -----------------------------------------------------------------------------------


@pytest.fixture
def unmigrated_url() -> Iterator[str]:
    with empty_database() as url:
        yield url


def test_check_probes_the_database_and_every_transport(env: dict[str, str],
                                                       unmigrated_url: str) -> None:
    ok = outbox("check", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[0].startswith("[+]database ok: postgresql://")
    assert "[+]transport default ok: stdout://" in ok.stdout
    assert "[+]transport sms ok" in ok.stdout

    down = outbox("check", "--json",
                  env={**env, "OUTBOX_TRANSPORT_SMS": "http://u:device-pass@127.0.0.1:1/api"})
    assert down.returncode == 3
    report = json.loads(down.stdout)
    assert report["ok"] is False and report["exit_code"] == 3
    assert [check["ok"] for check in report["checks"]] == [True, True, False]
    assert "device-pass" not in down.stdout

    no_database = outbox("check", env=env_for("postgresql://nobody@127.0.0.1:1/none",
                                              OUTBOX_TRANSPORT="stdout://"))
    assert no_database.returncode == 3
    assert "[-]database failed: cannot connect to the database" in no_database.stdout

    behind = outbox("check", env=env_for(unmigrated_url, OUTBOX_TRANSPORT="stdout://"))
    assert behind.returncode == 1
    assert "run `outbox db upgrade`" in behind.stdout


# --- logs ------------------------------------------------------------------------------------


def test_the_relay_logs_readable_lines_on_a_terminal(clean_db: str) -> None:
    env = env_for(clean_db, OUTBOX_TRANSPORT="memory://", OUTBOX_LOG_FORMAT="auto")
    leader, follower = pty.openpty()
    process = subprocess.Popen([*OUTBOX, "run"], env=env, stdout=follower,
                               stderr=subprocess.DEVNULL)
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"relay.started" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                seen += os.read(leader, 65536)
        process.send_signal(signal.SIGTERM)
        # Keep reading, as a terminal does: a full pty would block the relay's next log line.
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(leader, 65536)
                except OSError:  # EIO: the relay closed its end
                    break
        assert process.wait(timeout=5) == 0, seen.decode(errors="replace")[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    text = seen.decode(errors="replace")
    assert "relay.started" in text
    assert '"event"' not in text  # not JSON: the console renderer


# --- configuration ---------------------------------------------------------------------------


def test_config_shows_the_effective_settings_with_every_secret_masked(
        tmp_path: Path, clean_db: str) -> None:
    path = tmp_path / "outbox.toml"
    path.write_text('batch_size = 50\nsent_retention = "2d"\nmetrics_port = 9108\n'
                    '[transports]\ndefault = "http://pi:file-pass@device:8899/api/otp"\n'
                    'sms = "redis://:redis-pass@cache:6379/0?topic=sms&token=query-token"\n'
                    '[routes]\n"send-sms" = "sms"\n')
    env = env_for("postgresql://app:db-pass@127.0.0.1:5432/app", OUTBOX_CONFIG=str(path),
                  OUTBOX_BATCH_SIZE="75", OUTBOX_OTP_SECRET=SECRET_1,
                  OUTBOX_OTP_PREVIOUS_SECRETS=f"{OLD_1},{OLD_2}")
    result = outbox("config", env=env)
    assert result.returncode == 0, result.stderr
    for secret in ("file-pass", "redis-pass", "query-token", "db-pass", "74de07c4e919534b",
                   "872737ae8121bc1b", "893a3cfd3912a125"):
        assert secret not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["batch_size"] == 75  # the environment wins over the file
    assert shown["sent_retention"] == 2 * 86400
    assert shown["metrics_port"] == 9108
    assert shown["database_url"] == "postgresql://app:***@127.0.0.1:5432/app"
    assert shown["transports"] == {
        "default": "http://pi:***@device:8899/api/otp",
        "sms": "redis://:***@cache:6379/0?topic=sms&token=***"}
    assert shown["otp_secret"] == "********"
    assert shown["otp_previous_secrets"] == ["********", "********"]
    assert shown["routes"] == {"send-sms": "sms"}


@pytest.mark.parametrize(("extra", "file_text", "message"), [
    ({"OUTBOX_PURGE_INTERVALL": "1m"}, None,
     "unknown setting 'purge_intervall' (from OUTBOX_PURGE_INTERVALL; did you mean "
     "OUTBOX_PURGE_INTERVAL?)"),
    ({}, "sent_retension = '3d'\n", "unknown setting 'sent_retension' (in "),
    ({"DATABASE_URL": "mysql://app:db-pass@db/app"}, None,
     "DATABASE_URL is a mysql:// URL, not a PostgreSQL one"),
    ({"OUTBOX_TRANSPORT": "stdout://?dialect=klingon"}, None, "unknown dialect 'klingon'"),
    ({"OUTBOX_TRANSPORT": "pigeon://coop"}, None, "unknown scheme 'pigeon'"),
    ({"OUTBOX_ROUTE_SEND_SMS": "sms"}, None,
     "route send-sms -> 'sms' names no configured transport"),
    ({"OUTBOX_TRANSPORT": "", "OUTBOX_TRANSPORT_SMS": "stdout://"}, None, "which is not "
     "configured (set OUTBOX_TRANSPORT"),
    ({"OUTBOX_METRICS_PORT": "70000"}, None, "metrics_port 70000 is not a TCP port"),
    ({"OUTBOX_SENT_RETENTION": "0"}, None, "sent_retention must be a positive duration"),
])
def test_each_configuration_mistake_is_named_and_exits_2(
        clean_db: str, tmp_path: Path, extra: dict[str, str], file_text: str | None,
        message: str) -> None:
    env = env_for(clean_db, **{"OUTBOX_TRANSPORT": "stdout://", **extra})
    if not env.get("OUTBOX_TRANSPORT"):
        del env["OUTBOX_TRANSPORT"]
    if file_text is not None:
        path = tmp_path / "outbox.toml"
        path.write_text(file_text)
        env["OUTBOX_CONFIG"] = str(path)
    result = outbox("config", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("outbox: error: "), result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "db-pass" not in result.stderr


def test_every_command_validates_the_configuration_first(clean_db: str) -> None:
    env = env_for(clean_db, OUTBOX_TRANSPORT="stdout://?dialect=klingon")
    for command in (["run"], ["status"], ["check"], ["purge"], ["failed", "list"]):
        result = outbox(*command, env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr == "outbox: error: unknown dialect 'klingon' (expected otp-pi " \
                                "or readme)\n"
