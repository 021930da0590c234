"""The clear code never reaches the database or a log: OTPs are created in both modes,
validated right and wrong (Python API and CLI), then a dump of the whole database and every
captured log line are searched for each code that was issued."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox import cli, enqueue
from outbox.commands import CreateOtp
from outbox.errors import TransientPublishError
from outbox.otp import ManagedOtp, validate
from outbox.relay import Relay
from outbox.settings import Settings
from outbox.store import PostgresStore
from outbox.testing import MemoryTransport
from outbox.transports import open_transport
from tests.support.log_capture import rendered_logs
from tests.support.otp_pi import Fault, OtpPi

pytest_plugins = ("tests.support.otp_pi_fixtures",)
pytestmark = pytest.mark.integration

SECRET = "5240bac47786b45d8d7421b910d5b59285b7bdb3861ed5230eb5b0b125c2d4a4"
MSISDN = "+6281234567890"
#: ten digits: a six-digit code could turn up by chance in a timestamp's microseconds
DIGITS = 10


def dump_database(url: str) -> str:
    """``pg_dump`` of the whole database, or every row of every table as text without it."""
    pg_dump = shutil.which("pg_dump")
    if pg_dump is not None:
        done = subprocess.run([pg_dump, "--no-owner", "--dbname", url], capture_output=True,
                              text=True, timeout=120, check=False)
        if done.returncode == 0:
            assert "outbox.otp" in done.stdout
            return done.stdout
        assert "version mismatch" in done.stderr, done.stderr
    parts = []
    with psycopg.connect(url) as connection:
        tables = connection.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') "
            "AND table_type = 'BASE TABLE'").fetchall()
        assert ("outbox", "otp") in tables
        for schema, table in tables:
            query = sql.SQL("SELECT t::text FROM {}.{} AS t").format(
                sql.Identifier(schema), sql.Identifier(table))
            parts.extend(row[0] for row in connection.execute(query))
    return "\n".join(parts)


def test_no_issued_code_in_a_database_dump_or_the_logs(
        clean_db: str, otp_pi_factory: Callable[..., OtpPi], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    device = otp_pi_factory(otp_length=DIGITS)
    settings = Settings(database_url=clean_db,
                        transports={"default": "memory://", "pi": device.url()},
                        otp_secret=SECRET, otp_digits=DIGITS, otp_max_attempts=3,
                        backoff_base=0.01, backoff_max=0.01)
    first_try = {"fail": True}

    def flaky(envelope: Any) -> TransientPublishError | None:
        if first_try["fail"]:
            first_try["fail"] = False
            return TransientPublishError("broker away")  # a retry re-derives the same code
        return None

    memory = MemoryTransport(fail=flaky)
    pi = open_transport("pi", device.url(), settings)
    issued: set[str] = set()

    def create(reference: str, route: str | None = None, **extra: Any) -> int:
        command = CreateOtp(receiver=extra.pop("receiver", MSISDN), reference=reference,
                            message="Your code: %s", expiration=time.time() + 300,
                            params=("p1", "p2"), **extra)
        with psycopg.connect(clean_db) as connection:
            return enqueue(connection, command, route=route)

    def relay_until_done() -> None:
        with psycopg.connect(clean_db) as connection:
            relay = Relay(PostgresStore(connection), {"default": memory, "pi": pi}, settings,
                          otp=ManagedOtp.from_settings(settings))
            for _ in range(50):
                relay.drain()
                pending = connection.execute(
                    "SELECT count(*) FROM outbox.message WHERE state = 'pending'").fetchone()
                connection.commit()
                if pending == (0,):
                    return
                time.sleep(0.02)
        raise AssertionError("rows still pending")

    try:
        with rendered_logs() as lines:
            for n in range(4):
                create(f"managed-{n}")
            create("managed-mail", receiver="someone@example.com", subject="Code")
            create("managed-0")  # a duplicate: fails, its reason is stored and logged
            for n in range(3):
                create(f"device-{n}", route="pi")
            device.fail_next(Fault.close_after_processing())
            relay_until_done()

            for envelope in memory.delivered:
                text = json.loads(envelope.body)["data"]["message"]
                issued.update(re.findall(rf"\d{{{DIGITS}}}", text))
            issued.update(sent.code for sent in device.inbox)
            assert len(issued) == 8

            managed_settings = settings.with_overrides(routes={"create-otp": "default"})
            device_settings = settings.with_overrides(routes={"create-otp": "pi"})
            to_phone = [e for e in memory.delivered
                        if json.loads(e.body)["data"]["receiver"] == MSISDN]
            assert len(to_phone) == 4
            for envelope in to_phone[:3]:
                data = json.loads(envelope.body)["data"]
                code = re.findall(rf"\d{{{DIGITS}}}", data["message"])[0]
                reference = _reference(clean_db, envelope.id)
                near_miss = code[:-1] + str((int(code[-1]) + 1) % 10)
                assert validate(reference, MSISDN, near_miss, ("p1", "p2"),
                                settings=managed_settings).code == "1202"
                assert validate(reference, MSISDN, code, ("p1", "p2"),
                                settings=managed_settings).valid
            for n, sent in enumerate(device.inbox[:2]):
                assert validate(f"device-{n}", MSISDN, sent.code, ("p1", "p2"),
                                settings=device_settings).valid

            last = to_phone[3]
            monkeypatch.setenv("DATABASE_URL", clean_db)
            monkeypatch.setenv("OUTBOX_TRANSPORT", "memory://")
            monkeypatch.setenv("OUTBOX_OTP_SECRET", SECRET)
            monkeypatch.setenv("OUTBOX_OTP_DIGITS", str(DIGITS))
            code = re.findall(rf"\d{{{DIGITS}}}", json.loads(last.body)["data"]["message"])[0]
            status = cli.main(["-vv", "otp", "validate", "--reference",
                               _reference(clean_db, last.id), "--receiver", MSISDN,
                               "--param", "p1", "--param", "p2", "--otp", code])
            assert status == 0
    finally:
        pi.close()

    dump = dump_database(clean_db)
    captured = capsys.readouterr()
    logged = lines.getvalue() + captured.out + captured.err + caplog.text
    # the searches below look at real material
    assert "managed-mail" in dump and "device-2" in dump
    with psycopg.connect(clean_db) as connection:
        digests = [bytes(row[0]) for row in connection.execute("SELECT digest FROM outbox.otp")]
    assert len(digests) == 5
    assert all(digest.hex() in dump for digest in digests)
    assert "message.sent" in logged and "otp.validated" in logged
    assert "message.failed" in logged and "1201" in logged

    for code in issued:
        pattern = re.compile(rf"(?<!\d){code}(?!\d)")
        assert not pattern.search(dump), "an issued code is in the database"
        assert not pattern.search(logged), "an issued code is in the logs"


def _reference(url: str, message_id: int) -> str:
    with psycopg.connect(url) as connection:
        found = connection.execute("SELECT reference FROM outbox.otp WHERE message_id = %s",
                                   (message_id,)).fetchone()
    assert found is not None
    return str(found[0])
