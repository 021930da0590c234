"""Every log line a full relay run emits, at debug level and through the real processor chain,
is searched for the receivers, texts and OTP codes it handled: none may appear in clear.

The run covers every path that logs: sends, a retry and a permanent failure whose transport
errors quote the receiver, a transport that crashes with the receiver in its exception (so a
traceback is rendered), an expired row, a row the relay itself refuses, managed OTPs, the
housekeeping thread (metrics sampling and retention) and the operator's retry and discard.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox import admin
from outbox.admin import FailedFilter
from outbox.errors import PermanentPublishError, PublishError, TransientPublishError
from outbox.housekeeping import Housekeeper
from outbox.otp import ManagedOtp
from outbox.relay import RelayService
from outbox.retention import purge
from outbox.settings import Settings
from outbox.testing import MemoryTransport
from outbox.transports.base import Envelope
from tests.support.log_capture import rendered_logs

SECRET_1 = "6ba6788a4856383b477596762137262836492b50cb0230284c5d917dac21949d"

pytestmark = pytest.mark.integration

PHONE = "+6281234567890"
OTHER_PHONE = "081299887766"
EMAIL = "ann.smith@example.com"
TEXTS = ("Your parcel 4711 is on its way", "Invoice for Ann Smith", "Quarterly statement")
DIGITS = 10  # long enough that a code cannot turn up by chance in a timestamp
#: what may never appear in a log line, digits of the phone numbers alone included
CLEAR = (PHONE, PHONE[1:], OTHER_PHONE, EMAIL, "ann.smith", *TEXTS, "Your code")


class CrashOnce:
    """A transport whose library blows up once with the receiver in the exception."""

    name = "crashy"

    def __init__(self) -> None:
        self.inner = MemoryTransport("crashy")
        self.options = self.inner.options
        self.crashed = False

    def publish(self, batch: Any) -> Any:
        if not self.crashed:
            self.crashed = True
            raise RuntimeError(f"library bug while sending to {OTHER_PHONE}")
        return self.inner.publish(batch)

    def check(self) -> None:
        return None

    def close(self) -> None:
        return None


def test_no_receiver_text_or_code_in_any_log_line_of_a_full_run(
        conn: psycopg.Connection[Any], clean_db: str) -> None:
    refused_once: set[int] = set()

    def fail(envelope: Envelope) -> PublishError | None:
        body = json.loads(envelope.body)
        text = body["data"].get("message", "")
        if text == TEXTS[1] and envelope.id not in refused_once:
            refused_once.add(envelope.id)
            return TransientPublishError(f"device busy for {body['data']['receiver']}")
        if text == TEXTS[2]:
            return PermanentPublishError(f"mailbox {body['data']['receiver']} does not exist, "
                                         f"message {text!r} refused")
        return None

    default = MemoryTransport(fail=fail)
    crashy = CrashOnce()
    settings = Settings(database_url=clean_db,
                        transports={"default": "memory://", "crashy": "memory://"},
                        routes={"block-msisdn": "crashy"}, otp_secret=SECRET_1,
                        otp_digits=DIGITS, backoff_base=0.05, backoff_max=0.05,
                        poll_interval=0.05, purge_interval=0.1, sent_retention=0.5,
                        failed_retention=3600.0, workers=2)
    rows = [
        ("send-sms", {"receiver": PHONE, "message": TEXTS[0]}),
        ("send-email", {"receiver": EMAIL, "subject": "Invoice", "message": TEXTS[1]}),
        ("send-email", {"receiver": EMAIL, "subject": "Statement", "message": TEXTS[2]}),
        ("send-sms", {"receiver": PHONE, "message": "late", "expiration": time.time() + 0.2}),
        ("block-msisdn", {"receiver": OTHER_PHONE}),
        ("create-otp", {"receiver": PHONE, "reference": "login-1", "message": "Your code %s",
                        "param1": "ann", "expiration": time.time() + 300}),
        ("create-otp", {"receiver": EMAIL, "reference": "login-2", "message": "Your code %s",
                        "subject": "Your code", "expiration": time.time() + 300}),
    ]

    with rendered_logs("debug") as output:
        for command, data in rows:
            conn.execute("INSERT INTO outbox.message (command, data) VALUES (%s, %s)",
                         (command, Jsonb(data)))
        # A row the database would refuse, slipped in around the rules: the relay fails it.
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO outbox.message (command, data, priority) VALUES ('send-sms', %s, 5)",
                     (Jsonb({"receiver": f"call {PHONE}", "message": TEXTS[0]}),))
        conn.execute("SET session_replication_role = DEFAULT")
        time.sleep(0.3)  # the fourth row expires before the relay starts

        service = RelayService(settings, clean_db,
                               transports_factory=lambda s: {"default": default,
                                                             "crashy": crashy},
                               otp=ManagedOtp.from_settings(settings))
        stop = threading.Event()
        housekeeper = Housekeeper(settings, clean_db, sample_metrics=True)
        chores = housekeeper.start(stop)
        runner = threading.Thread(target=service.run, args=(stop,))
        runner.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                pending = conn.execute("SELECT count(*) FROM outbox.message "
                                       "WHERE state = 'pending'").fetchone()
                if pending == (0,) and crashy.inner.delivered:
                    break
                time.sleep(0.05)
            admin.retry_failed(conn, FailedFilter(command="send-email"), settings=settings)
            admin.list_failed(conn, settings=settings)
            time.sleep(0.5)
            admin.discard_failed(conn, FailedFilter(command="send-email"), settings=settings)
        finally:
            stop.set()
            runner.join(10)
            chores.join(10)
        with psycopg.connect(clean_db, autocommit=True) as connection:
            purge(connection, settings)

    lines = output.getvalue().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    names = {event["event"] for event in events}
    # the run went through every path this test is about
    assert {"relay.started", "message.sent", "message.retry_scheduled", "message.failed",
            "message.expired", "transport.unexpected_error", "failed.retried",
            "failed.discarded", "retention.purged", "relay.stopped"} <= names, names
    assert any("Traceback" in event.get("exception", "") for event in events)

    codes = {code for envelope in default.delivered
             for code in re.findall(rf"Your code (\d{{{DIGITS}}})",
                                    json.loads(envelope.body)["data"].get("message", ""))}
    assert len(codes) == 2  # both OTPs were issued and sent
    text = output.getvalue()
    for secret in (*CLEAR, *codes):
        assert secret not in text, f"{secret!r} appears in the logs"
    assert "***66" in text and "***om" in text  # masked, receivers still tell rows apart
