"""A new user's first minutes, the CLI in a subprocess: every mistake answers in one line
with the documented exit code (0 ok, 1 failure, 2 usage or configuration, 3 unreachable)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest

from tests.conftest import empty_database

pytestmark = pytest.mark.acceptance

OUTBOX = [sys.executable, "-m", "outbox"]
SECRET = "3f8a7c2e9b14d6f05a1e8c3b7d9f2a4c6e8b0d1f3a5c7e9b2d4f6a8c0e1b3d5f"


def clean_env(url: str | None = None, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("OUTBOX_") and key != "DATABASE_URL"}
    if url:
        env["DATABASE_URL"] = url
    env.update(extra)
    return env


def outbox(*args: str, env: dict[str, str], cwd: Path | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OUTBOX, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_python_dash_m_outbox_is_the_command() -> None:
    result = outbox("--version", env=clean_env())
    assert result.returncode == 0
    assert result.stdout.startswith("outbox ")


def test_an_unmigrated_database_answers_in_one_line() -> None:
    with empty_database() as url:
        env = clean_env(url)
        for command in (["status"], ["failed", "list"], ["purge"], ["run"],
                        ["enqueue", "send-sms", "--receiver", "+6281234567890", "--message", "hi"]):
            result = outbox(*command, env=env)
            assert result.returncode == 1, (command, result.stderr)
            assert "outbox db upgrade" in one_error_line(result), command
        check = outbox("check", env=env)
        assert check.returncode == 1


def test_outside_the_project_folder_without_database_url(tmp_path: Path) -> None:
    for command in (["status"], ["enqueue", "block-msisdn", "--receiver", "+6281234567"],
                    ["db", "url"], ["check"]):
        result = outbox(*command, env=clean_env(), cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        assert "DATABASE_URL" in one_error_line(result)
    assert list(tmp_path.iterdir()) == []  # no second embedded Postgres left behind


def test_global_options_go_before_or_after_the_command(tmp_path: Path) -> None:
    config = tmp_path / "outbox.toml"
    config.write_text("batch_size = 42\n")
    env = clean_env("postgresql://app@127.0.0.1:1/app")
    for args in (["--config", str(config), "config"], ["config", "--config", str(config)]):
        result = outbox(*args, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["batch_size"] == 42
    after = outbox("status", "-v", "--config", str(tmp_path / "missing.toml"), env=env)
    assert after.returncode == 2
    assert "Traceback" in after.stderr  # -v after the command counts too
    before = outbox("-v", "status", env=env)  # and is not undone by the command's default
    assert before.returncode == 3 and "Traceback" in before.stderr


@pytest.mark.parametrize(("env", "fragment"), [
    ({"OUTBOX_POLL_INTERVAL": "5m", "OUTBOX_OTP_TTL": "5m"}, None),
    ({"OUTBOX_OTP_TTL": "1.5s"}, "otp_ttl"),
    ({"OUTBOX_POLL_INTERVAL": "inf"}, "poll_interval"),
    ({"OUTBOX_BACKOFF_MAX": "99999999999999999d"}, "backoff_max"),
    ({"OUTBOX_TRANSPORT_A": "stdout://", "OUTBOX_ROUTE_SEND_SMS": "a+a"}, "twice"),
    ({"OUTBOX_OTP_SECRET": "0000000000000000"}, "OUTBOX_OTP_SECRET"),
    ({"OUTBOX_OTP_SECRET": "correct horse battery staple"}, "OUTBOX_OTP_SECRET"),
])
def test_settings_accepted_or_refused_in_one_line(env: dict[str, str],
                                                  fragment: str | None) -> None:
    result = outbox("config", env=clean_env("postgresql://app@127.0.0.1:1/app", **env))
    if fragment is None:
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)
        assert (shown["poll_interval"], shown["otp_ttl"]) == (300.0, 300)
        return
    assert result.returncode == 2
    line = one_error_line(result)
    assert fragment in line
    if "OUTBOX_OTP_SECRET" in env:
        assert env["OUTBOX_OTP_SECRET"] not in line  # a secret is never quoted


@pytest.mark.parametrize("args", [
    ["failed", "list", "--older-than", "99999999999999999d"],
    ["failed", "retry", "--newer-than", "inf"],
    ["enqueue", "send-sms", "--receiver", "+6281234567890", "--message", "x",
     "--expires-in", "inf"],
    ["enqueue", "send-sms", "--receiver", "+6281234567890", "--message", "x",
     "--expiration", "nan"],
    ["enqueue", "send-sms", "--receiver", "+6281234567890", "--message", "x",
     "--expiration", "1e300"],
])
def test_overflowing_values_are_refused_in_one_line(args: list[str]) -> None:
    result = outbox(*args, env=clean_env("postgresql://app@127.0.0.1:1/app"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("outbox")


def test_otp_new_secret_prints_an_accepted_secret() -> None:
    first = outbox("otp", "new-secret", env=clean_env())
    second = outbox("otp", "new-secret", env=clean_env())
    assert first.returncode == second.returncode == 0
    secret = first.stdout.strip()
    assert len(secret) == 64 and secret != second.stdout.strip()
    accepted = outbox("config", env=clean_env("postgresql://app@127.0.0.1:1/app",
                                              OUTBOX_OTP_SECRET=secret))
    assert accepted.returncode == 0, accepted.stderr
    assert secret not in accepted.stdout


# --- outbox run at start -------------------------------------------------------------------


def read_events(stream: IO[str], until: str, timeout: float) -> list[dict[str, Any]]:
    """JSON log events until one named ``until`` (AssertionError after ``timeout``)."""
    events: list[dict[str, Any]] = []
    timer = threading.Timer(timeout, lambda: None)
    deadline = time.monotonic() + timeout
    timer.start()
    try:
        while time.monotonic() < deadline:
            line = stream.readline()
            if not line:
                raise AssertionError(f"no {until} before the output ended: {events}")
            try:
                record = json.loads(line)
            except ValueError:
                continue
            events.append(record)
            if record.get("event") == until:
                return events
    finally:
        timer.cancel()
    raise AssertionError(f"no {until} within {timeout}s: {events}")


def test_run_exits_2_at_start_when_a_transport_refuses_the_credentials(clean_db: str) -> None:
    env = clean_env(clean_db, OUTBOX_TRANSPORT=(
        "amqp://outbox-nobody:wrong-Pw-14@127.0.0.1:5672/%2F?topic=sms"))
    result = outbox("run", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_error_line(result)
    assert "refused" in line and "credentials" in line
    assert "wrong-Pw-14" not in result.stdout + result.stderr


def test_run_exits_2_at_start_when_a_transport_is_misconfigured(clean_db: str) -> None:
    result = outbox("run", env=clean_env(clean_db, OUTBOX_TRANSPORT="amqp://127.0.0.1:5672/"))
    assert result.returncode == 2
    assert "topic" in one_error_line(result)


def test_run_starts_with_one_warning_when_a_broker_is_unreachable(clean_db: str) -> None:
    env = clean_env(clean_db, OUTBOX_TRANSPORT="redis://127.0.0.1:1/0?topic=sms",
                    OUTBOX_LOG_FORMAT="json", OUTBOX_PUBLISH_TIMEOUT="1")
    with subprocess.Popen([*OUTBOX, "run"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        try:
            events = read_events(process.stdout, "relay.started", timeout=60)
            warnings = [e for e in events if e.get("level") == "warning"]
            assert [e["event"] for e in warnings] == ["transport.unreachable_at_start"]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()


# --- make run, on the embedded Postgres ----------------------------------------------------


@pytest.mark.slow
def test_embedded_create_otp_out_of_the_box_and_stop_embedded_really_stops(
        tmp_path: Path) -> None:
    """`make run` with nothing configured: a development OTP secret is made and said, a
    create-otp goes out as an SMS with its code; a relay killed without cleaning up does not
    keep `db stop-embedded` from stopping the server."""
    env = clean_env(OUTBOX_LOG_FORMAT="json")
    with subprocess.Popen([*OUTBOX, "run"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        try:
            events = read_events(process.stdout, "relay.started", timeout=180)
            said = [e for e in events if e.get("event") == "otp.development_secret"]
            assert len(said) == 1
            secret_file = tmp_path / ".outbox" / "otp-secret"
            assert said[0]["path"] == str(secret_file)
            assert secret_file.stat().st_mode & 0o777 == 0o600
            enqueued = outbox("enqueue", "create-otp", "--receiver", "+6281234567890",
                              "--reference", "login-1", "--message", "Your code is %s",
                              env=env, cwd=tmp_path)
            assert enqueued.returncode == 0, enqueued.stderr
            relayed = None
            while relayed is None:
                line = process.stdout.readline()
                assert line, "the relay stopped"
                record = json.loads(line)
                assert record.get("event") != "message.failed", record
                if record.get("command") == "send-sms":
                    relayed = record
            code = relayed["data"]["message"].removeprefix("Your code is ")
            assert code.isdigit()
            valid = outbox("otp", "validate", "--reference", "login-1", "--receiver",
                           "+6281234567890", "--otp", code, env=env, cwd=tmp_path)
            assert valid.returncode == 0, valid.stdout + valid.stderr
        finally:
            process.kill()  # no cleanup: its pgserver handle stays behind
            process.wait()
    pid = int((tmp_path / ".outbox" / "pgdata" / "postmaster.pid").read_text().split()[0])
    stopped = outbox("db", "stop-embedded", env=env, cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"embedded Postgres (pid {pid}) stopped"
    assert not running(pid)
    again = outbox("db", "stop-embedded", env=env, cwd=tmp_path)
    assert again.stdout.strip() == "no embedded Postgres was running here"
    assert (again.returncode, tmp_path.joinpath(".outbox", "pgdata").is_dir()) == (0, True)


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has stopped: only its parent's wait is missing, and in
    a container nobody may ever wait for it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_row_routed_to_one_transport_twice_is_refused_not_sent_twice(clean_db: str) -> None:
    env = clean_env(clean_db, OUTBOX_TRANSPORT="stdout://", OUTBOX_LOG_FORMAT="json")
    with psycopg.connect(clean_db, autocommit=True) as connection:
        connection.execute("""INSERT INTO outbox.message (command, data, route) VALUES
            ('block-msisdn', '{"receiver": "+6281234567"}', 'default+default')""")
    with subprocess.Popen([*OUTBOX, "run"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        try:
            seen = read_events(process.stdout, "relay.started", timeout=60)
            deadline = time.monotonic() + 30
            with psycopg.connect(clean_db, autocommit=True) as connection:
                while time.monotonic() < deadline:
                    state = connection.execute("SELECT state FROM outbox.message").fetchone()
                    if state and state[0] != "pending":
                        break
                    time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            out, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    records = seen + [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    copies = [r for r in records if r.get("command") == "block-msisdn" and "event" not in r]
    assert state == ("failed",)
    assert copies == []
    with psycopg.connect(clean_db, autocommit=True) as connection:
        [(reason,)] = connection.execute("SELECT last_error FROM outbox.message").fetchall()
    assert "is not a route" in reason
