"""No dedup key and no piece of a receiver in the errors the schema raises or in the reasons
derived from a device's reply: real Postgres, a real HTTP server, the CLI in a subprocess."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb

from outbox import SendSms, enqueue
from outbox.relay import Relay
from outbox.settings import Settings
from outbox.store import PostgresStore
from outbox.transports import open_transport
from tests.support.log_capture import rendered_logs

pytestmark = pytest.mark.integration

RECEIVER = "+6281234567890"
KEY = f"otp-{RECEIVER}-login"


def pieces(value: str, size: int = 4) -> list[str]:
    """Every run of ``size`` characters of ``value``'s digits: a partial echo shows one."""
    digits = "".join(ch for ch in value if ch.isdigit())
    return [digits[i:i + size] for i in range(len(digits) - size + 1)]


def assert_no_trace(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, text
        for piece in pieces(secret):
            assert piece not in text, (piece, text)


def test_a_dedup_clash_does_not_show_the_key(conn: psycopg.Connection[Any]) -> None:
    insert = "INSERT INTO outbox.message (command, data, dedup_key) VALUES ('send-sms', %s, %s)"
    data = Jsonb({"receiver": RECEIVER, "message": "Your order shipped"})
    conn.execute(insert, (data, KEY))
    with pytest.raises(pg_errors.UniqueViolation) as caught:
        conn.execute(insert, (data, KEY))
    error = caught.value
    assert error.diag.constraint_name == "message_dedup_key_unique"
    everything = " ".join(str(part) for part in (
        error, error.diag.message_primary, error.diag.message_detail, error.diag.message_hint,
        error.diag.context))
    assert_no_trace(everything, KEY, "Your order shipped")


def test_a_dedup_key_still_deduplicates_everywhere(conn: psycopg.Connection[Any],
                                                   clean_db: str) -> None:
    data = {"receiver": RECEIVER, "message": "m"}
    first = conn.execute("SELECT outbox.enqueue('send-sms', %s, %s)", (Jsonb(data), KEY))
    again = conn.execute(
        "SELECT outbox.enqueue('send-sms', %s, dedup_key => %s, priority => 1::smallint)",
        (Jsonb(data), KEY))
    row_id = first.fetchone()
    assert row_id == again.fetchone()
    with psycopg.connect(clean_db) as app:
        assert (enqueue(app, SendSms(receiver=RECEIVER, message="m"), dedup_key=KEY),) == row_id
        app.commit()
    other = conn.execute("SELECT outbox.enqueue('send-sms', %s, %s)", (Jsonb(data), KEY + "x"))
    assert other.fetchone() != row_id
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (2,)
    # keys the digest must keep apart: backslashes (a bytea escape) and non-ASCII text
    odd = ["a\\b", "a\\\\b", "\\x41", "A", "ü\\", "ü"]
    first_ids = [conn.execute("SELECT outbox.enqueue('send-sms', %s, %s)",
                              (Jsonb(data), key)).fetchone() for key in odd]
    again_ids = [conn.execute("SELECT outbox.enqueue('send-sms', %s, %s)",
                              (Jsonb(data), key)).fetchone() for key in odd]
    assert first_ids == again_ids and len(set(first_ids)) == len(odd)
    # the index compares digests, and the salt makes them this database's own
    plan = conn.execute("EXPLAIN SELECT id FROM outbox.message WHERE "
                        "outbox.dedup_digest(dedup_key) = outbox.dedup_digest(%s)",
                        (KEY,)).fetchall()
    assert any("message_dedup_key_unique" in line[0] for line in plan), plan


class _EchoingDevice(http.server.BaseHTTPRequestHandler):
    """A device (or a proxy in front of one) whose reply quotes the receiver it was sent."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply = json.dumps({"command": body["command"],
                            "response_code": body["data"]["receiver"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def echoing_device() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoingDevice)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/otp"
    finally:
        server.shutdown()
        server.server_close()


def test_a_reply_echoing_the_receiver_leaves_no_piece_of_it(
        conn: psycopg.Connection[Any], clean_db: str, echoing_device: str) -> None:
    conn.execute("INSERT INTO outbox.message (command, data) VALUES ('send-sms', %s)",
                 (Jsonb({"receiver": RECEIVER, "message": "Hello there"}),))
    settings = Settings(transports={"default": echoing_device})
    transport = open_transport("default", echoing_device, settings)
    relay = Relay(PostgresStore(psycopg.connect(clean_db)), {"default": transport}, settings)
    try:
        with rendered_logs() as logged:
            assert relay.process_batch().failed == 1
    finally:
        relay.store.close()
        transport.close()
    [(state, reason)] = conn.execute("SELECT state, last_error FROM outbox.message").fetchall()
    assert state == "failed"
    assert "response_code that is not a device code (14 characters, not shown)" in reason
    assert_no_trace(reason, RECEIVER)
    assert_no_trace(logged.getvalue(), RECEIVER)
    env = {key: value for key, value in os.environ.items() if not key.startswith("OUTBOX_")}
    env["DATABASE_URL"] = clean_db
    for args in (["failed", "list"], ["failed", "list", "--json"]):
        shown = subprocess.run([sys.executable, "-m", "outbox", *args], env=env,
                               capture_output=True, text=True, timeout=60, check=False)
        assert shown.returncode == 0, shown.stderr
        assert "not a device code" in shown.stdout
        assert_no_trace(shown.stdout + shown.stderr, RECEIVER)
