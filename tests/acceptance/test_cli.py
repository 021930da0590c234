"""The ``outbox`` command in a subprocess, as an operator runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest

pytestmark = pytest.mark.acceptance

OUTBOX = [sys.executable, "-m", "outbox.cli"]


def env_for(url: str | None, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("OUTBOX_") and key != "DATABASE_URL"}
    if url:
        env["DATABASE_URL"] = url
    env.update(extra)
    return env


def outbox(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OUTBOX, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def read_json_lines(stream: IO[str], want: int, timeout: float) -> list[dict[str, Any]]:
    """Lines that are relayed commands (not log events) from a running relay's stdout."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(found) < want and time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            time.sleep(0.01)
            continue
        record = json.loads(line)
        if "command" in record and "event" not in record:
            found.append(record)
    return found


@pytest.fixture
def relay_env(clean_db: str) -> dict[str, str]:
    return env_for(clean_db, OUTBOX_TRANSPORT="stdout://", OUTBOX_LOG_FORMAT="json",
                   OUTBOX_POLL_INTERVAL="5")


def test_upgrade_insert_run_deliver_and_stop_on_sigterm(relay_env: dict[str, str],
                                                        clean_db: str) -> None:
    upgrade = outbox("db", "upgrade", env=relay_env)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "revision" in upgrade.stdout
    check = outbox("db", "check", env=relay_env)
    assert check.returncode == 0, check.stderr

    process = subprocess.Popen([*OUTBOX, "run"], env=relay_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        started = read_until_event(process.stdout, "relay.started", timeout=30)
        assert started["workers"] == 1
        with psycopg.connect(clean_db) as app:  # an application's own transaction
            app.execute("""INSERT INTO outbox.message (command, data) VALUES ('send-sms',
                jsonb_build_object('receiver', '+6281234567890', 'message', 'Your code is ready'))""")
            app.commit()
        [relayed] = read_json_lines(process.stdout, 1, timeout=10)
        assert relayed["command"] == "send-sms"
        assert relayed["data"]["receiver"] == "+6281234567890"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        rest = process.stdout.read()
        assert '"relay.stopped"' in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        if process.stderr is not None:
            process.stderr.close()
    status = outbox("status", "--json", env=relay_env)
    assert json.loads(status.stdout)["counts"]["sent"] == 1


def read_until_event(stream: IO[str], event: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            time.sleep(0.01)
            continue
        record = json.loads(line)
        if record.get("event") == event:
            return record  # type: ignore[no-any-return]
    raise AssertionError(f"no {event} event within {timeout}s")


def test_two_relay_processes_publish_each_row_exactly_once(relay_env: dict[str, str],
                                                           clean_db: str, tmp_path: Path) -> None:
    total = 3000
    env = {**relay_env, "OUTBOX_BATCH_SIZE": "50"}
    outputs = [tmp_path / "a.out", tmp_path / "b.out"]
    handles = [path.open("w") for path in outputs]
    processes = [subprocess.Popen([*OUTBOX, "run"], env=env, stdout=handle,
                                  stderr=subprocess.DEVNULL) for handle in handles]
    deadline = time.monotonic() + 60
    # both must be running (signal handlers installed) before the rows arrive
    while not all('"relay.started"' in path.read_text() for path in outputs):
        assert time.monotonic() < deadline, "the relays did not start"
        assert all(process.poll() is None for process in processes)
        time.sleep(0.05)
    with psycopg.connect(clean_db) as app:
        app.execute("""INSERT INTO outbox.message (command, data)
            SELECT 'send-sms', jsonb_build_object('receiver', '+62812' || lpad(n::text, 6, '0'),
                                                  'message', 'm' || n)
            FROM generate_series(1, %s) AS n""", (total,))
        app.commit()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with psycopg.connect(clean_db) as check:
                row = check.execute("SELECT count(*) FROM outbox.message "
                                    "WHERE state = 'pending'").fetchone()
            if row == (0,):
                break
            time.sleep(0.2)
        for process in processes:
            process.send_signal(signal.SIGTERM)
        assert [process.wait(timeout=60) for process in processes] == [0, 0]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for handle in handles:
            handle.close()
    ids: list[int] = []
    per_process = []
    for path in outputs:
        relayed = [json.loads(line) for line in path.read_text().splitlines()]
        mine = [record["data"]["id"] for record in relayed if "event" not in record]
        per_process.append(len(mine))
        ids.extend(mine)
    assert sorted(ids) == list(range(1, total + 1))  # all of them, none twice
    assert all(count > 0 for count in per_process), per_process  # both took a share


def test_enqueue_and_status(relay_env: dict[str, str]) -> None:
    first = outbox("enqueue", "send-sms", "--receiver", "+6281234567", "--message", "hi",
                   "--dedup-key", "k1", env=relay_env)
    assert first.returncode == 0, first.stderr
    again = outbox("enqueue", "send-sms", "--receiver", "+6281234567", "--message", "hi",
                   "--dedup-key", "k1", env=relay_env)
    assert again.stdout == first.stdout
    otp = outbox("enqueue", "create-otp", "--receiver", "+6281234567", "--message", "Code %s",
                 "--reference", "ref-1", "--param", "a", "--expires-in", "300", env=relay_env)
    assert otp.returncode == 0, otp.stderr
    status = outbox("status", env=relay_env)
    assert status.returncode == 0
    assert re.search(r"^pending\s+2$", status.stdout, re.MULTILINE), status.stdout


def test_enqueue_takes_a_priority_and_an_ordering_key(relay_env: dict[str, str]) -> None:
    urgent = outbox("enqueue", "send-sms", "--receiver", "+6281234567", "--message", "hi",
                    "--priority", "0", "--ordering-key", "user-7", env=relay_env)
    assert urgent.returncode == 0, urgent.stderr
    status = json.loads(outbox("status", "--json", env=relay_env).stdout)
    assert status["pending_by_priority"] == {"0": 1}
    refused = outbox("enqueue", "send-sms", "--receiver", "+6281234567", "--message", "hi",
                     "--priority", "12", env=relay_env)
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("outbox: error: priority must be a whole number from 0 "
                                      "(most urgent) to 9")


def test_bad_input_is_refused_naming_the_problem(relay_env: dict[str, str]) -> None:
    result = outbox("enqueue", "send-sms", "--receiver", "not-a-number", "--message", "x",
                    env=relay_env)
    assert result.returncode == 1
    assert result.stderr.strip() == ("outbox: error: send-sms receiver is not an MSISDN "
                                     "(3 to 15 digits with an optional leading +)")
    assert "Traceback" not in result.stderr


def test_unreachable_database_exits_3_with_one_line(tmp_path: Path) -> None:
    env = env_for("postgresql://nobody@127.0.0.1:1/none")
    for args in (["status"], ["db", "upgrade"], ["run"]):
        result = outbox(*args, env=env)
        assert result.returncode == 3, (args, result.stderr)
        assert result.stderr.startswith("outbox: error: cannot connect to the database")
        assert len(result.stderr.strip().splitlines()) == 1


def test_bad_configuration_exits_2(clean_db: str) -> None:
    cases = [
        {"OUTBOX_TRANSPORT": "carrier-pigeon://coop"},
        {"OUTBOX_ROUTE_SEND_SMS": "sms"},
        {"OUTBOX_BATCH_SIZE": "many"},
        {"OUTBOX_NO_SUCH_SETTING": "1"},
        {"OUTBOX_TRANSPORT": "http://user:pa:ss@127.0.0.1:8899/api/otp"},
        {"OUTBOX_TRANSPORT": "stdout://?dialect=klingon"},
    ]
    for extra in cases:
        result = outbox("run", env=env_for(clean_db, **extra))
        assert result.returncode == 2, (extra, result.stderr)
        assert result.stderr.startswith("outbox: error: ")
        assert "pa:ss" not in result.stderr


def test_verbose_shows_the_traceback() -> None:
    result = outbox("-v", "status", env=env_for("postgresql://nobody@127.0.0.1:1/none"))
    assert result.returncode == 3
    assert "Traceback" in result.stderr


def test_config_masks_secrets(clean_db: str) -> None:
    env = env_for("postgresql://app:db-secret@127.0.0.1:5432/app",
                  OUTBOX_TRANSPORT="amqp://guest:broker-secret@127.0.0.1:5672/%2F?topic=sms",
                  OUTBOX_OTP_SECRET="99bb88401742848e032fd6f51709415fb6be169a72d2e5d7fc44289255160d3c")
    result = outbox("config", env=env)
    assert result.returncode == 0, result.stderr
    for secret in ("db-secret", "broker-secret", "99bb88401742848e"):
        assert secret not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["transports"]["default"].startswith("amqp://guest:***@127.0.0.1:5672")


def test_no_command_prints_help_and_exits_2() -> None:
    result = outbox(env=env_for(None))
    assert result.returncode == 2
    assert "usage: outbox" in result.stderr


def test_embedded_postgres_when_no_database_url(tmp_path: Path) -> None:
    """`make run` on a bare machine: no DATABASE_URL, the relay brings its own Postgres, and a
    second process enqueues into the same one."""
    env = env_for(None, OUTBOX_EMBEDDED_DIR=str(tmp_path / "pgdata"), OUTBOX_LOG_FORMAT="json")
    process = subprocess.Popen([*OUTBOX, "run"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        read_until_event(process.stdout, "relay.started", timeout=120)
        enqueued = outbox("enqueue", "block-msisdn", "--receiver", "+6281234567", env=env)
        assert enqueued.returncode == 0, enqueued.stderr
        [relayed] = read_json_lines(process.stdout, 1, timeout=10)
        assert relayed["command"] == "block-msisdn"
        assert relayed["data"]["id"] == int(enqueued.stdout)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        stopped = outbox("db", "stop-embedded", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert re.fullmatch(r"embedded Postgres \(pid \d+\) stopped", stopped.stdout.strip())
