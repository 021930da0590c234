"""``outbox console`` and ``outbox console passwd`` in a subprocess."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.acceptance.test_cli import OUTBOX, env_for, outbox

pytestmark = pytest.mark.acceptance


def test_console_refuses_to_start_without_users(clean_db: str, tmp_path: Path) -> None:
    refused = outbox("console", "--port", "0", env=env_for(clean_db))
    assert refused.returncode == 2
    assert "OUTBOX_CONSOLE_USERS" in refused.stderr and "--insecure-no-auth" in refused.stderr
    empty = tmp_path / "users"
    empty.write_text("# nobody yet\n")
    refused = outbox("console", "--port", "0",
                     env=env_for(clean_db, OUTBOX_CONSOLE_USERS=str(empty)))
    assert refused.returncode == 2 and "has no users" in refused.stderr
    missing = outbox("console", env=env_for(clean_db,
                                            OUTBOX_CONSOLE_USERS=str(tmp_path / "none")))
    assert missing.returncode == 2 and "cannot read users file" in missing.stderr


def test_passwd_reads_stdin_and_the_console_serves_the_roles(clean_db: str,
                                                             tmp_path: Path) -> None:
    users = tmp_path / "users"
    env = env_for(clean_db, OUTBOX_CONSOLE_USERS=str(users), OUTBOX_LOG_FORMAT="json")
    for user, password, role in (("olga", "s3cret pass", "operator"), ("vic", "v1ewer", None)):
        saved = subprocess.run([*OUTBOX, "console", "passwd", user,
                                *(["--role", role] if role else [])],
                               input=password + "\n", env=env, capture_output=True, text=True,
                               timeout=60, check=False)
        assert saved.returncode == 0, saved.stderr
        assert password not in saved.stdout + saved.stderr
    lines = users.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["olga", "vic"]
    assert lines[0].endswith(":operator") and lines[1].endswith(":viewer")
    assert "s3cret" not in users.read_text()
    assert users.stat().st_mode & 0o077 == 0
    no_password = subprocess.run([*OUTBOX, "console", "passwd", "eve"], input="", env=env,
                                 capture_output=True, text=True, timeout=60, check=False)
    assert no_password.returncode == 2 and "no password" in no_password.stderr

    with socket.socket() as probe:  # a free port (uvicorn binds it itself)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    console = subprocess.Popen([*OUTBOX, "console", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert console.stdout is not None
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = console.stdout.readline()
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "console.listening":
                    url = f"http://{event['host']}:{event['port']}"
        assert url, "the console never said where it listens"
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(100):  # the log line comes just before uvicorn listens
                try:
                    http.get("/")
                    break
                except httpx.ConnectError:
                    time.sleep(0.1)
            assert http.get("/").status_code == 401
            assert http.get("/", auth=("olga", "wrong")).status_code == 401
            page = http.get("/", auth=("olga", "s3cret pass"))
            assert page.status_code == 200 and "olga · <span class=\"role role-operator\">" \
                in page.text
            viewer = http.get("/failed", auth=("vic", "v1ewer"))
            assert "You are a viewer" in viewer.text
    finally:
        console.send_signal(signal.SIGTERM)
        _, errors = console.communicate(timeout=30)
    assert console.returncode == 0, errors


def test_failed_retry_and_discard_from_the_cli_are_in_the_audit_trail(
        clean_db: str, conn: psycopg.Connection[Any]) -> None:
    for n in range(3):
        conn.execute("SELECT outbox.enqueue('send-sms', jsonb_build_object("
                     "'receiver', %s::text, 'message', 'm'))", (f"+4915100000{n}",))
    conn.execute("UPDATE outbox.message SET state = 'failed', last_error = 'device said 1101'")
    env = env_for(clean_db)
    dry = outbox("failed", "retry", "--all", "--dry-run", env=env)
    assert dry.returncode == 0 and "3 failed rows would be retried" in dry.stdout
    assert conn.execute("SELECT count(*) FROM outbox.audit").fetchone() == (0,)
    retried = outbox("failed", "retry", "--id", "1,2", env=env)
    discarded = outbox("failed", "discard", "--reason", "1101", env=env)
    assert retried.returncode == discarded.returncode == 0, retried.stderr + discarded.stderr
    trail = conn.execute("SELECT actor, action, rows, filter, source FROM outbox.audit "
                         "ORDER BY id").fetchall()
    assert [(action, rows, record, source) for _, action, rows, record, source in trail] == [
        ("retry", 2, {"ids": [1, 2]}, "cli"), ("discard", 1, {"reason": "1101"}, "cli")]
    assert all(actor for actor, *_ in trail)
