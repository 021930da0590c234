"""Device mode end to end: a create-otp row in Postgres, the relay, the OTP-Pi stand-in drawing
and sending the code, then validation through verify-otp (Python API and CLI)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbox import cli, enqueue
from outbox.commands import CreateOtp
from outbox.otp import validate
from outbox.relay import BatchReport, Relay
from outbox.settings import Settings
from outbox.store import PostgresStore
from outbox.transports import OtpMode, open_transport
from outbox.transports.base import Transport
from tests.support.log_capture import rendered_logs
from tests.support.otp_pi import Fault, OtpPi

pytest_plugins = ("tests.support.otp_pi_fixtures",)
pytestmark = pytest.mark.integration

MSISDN = "+6281234567890"
PARAMS = ("transfer", "150000", "acct-9")


@pytest.fixture
def settings(clean_db: str, otp_pi: OtpPi) -> Settings:
    return Settings(database_url=clean_db, transports={"default": otp_pi.url()},
                    backoff_base=0.01, backoff_max=0.01)


@pytest.fixture
def device(settings: Settings) -> Iterator[Transport]:
    transport = open_transport("default", settings.transports["default"], settings)
    assert transport.options.otp_mode is OtpMode.DEVICE
    yield transport
    transport.close()


def create(url: str, reference: str, *, receiver: str = MSISDN,
           params: tuple[str, ...] = PARAMS, expires_in: float = 300, **extra: Any) -> int:
    command = CreateOtp(receiver=receiver, reference=reference, message="Your code is %s",
                        expiration=time.time() + expires_in, params=params, **extra)
    with psycopg.connect(url) as connection:  # commits on leaving
        return enqueue(connection, command)


def relay_once(settings: Settings, transport: Transport) -> BatchReport:
    assert settings.database_url is not None
    with psycopg.connect(settings.database_url) as connection:
        relay = Relay(PostgresStore(connection), {"default": transport}, settings)
        return relay.drain()


def relay_turn(settings: Settings, transport: Transport) -> BatchReport:
    """One claim-publish-record turn (``relay_once`` drains: a retry due in milliseconds
    would be sent again within it)."""
    assert settings.database_url is not None
    with psycopg.connect(settings.database_url) as connection:
        return Relay(PostgresStore(connection), {"default": transport}, settings).process_batch()


def row(url: str, message_id: int) -> tuple[str, str | None]:
    with psycopg.connect(url) as connection:
        found = connection.execute("SELECT state, last_error FROM outbox.message WHERE id = %s",
                                   (message_id,)).fetchone()
    assert found is not None
    return found[0], found[1]


def test_create_then_validate_once(settings: Settings, device: Transport, otp_pi: OtpPi) -> None:
    assert settings.database_url
    message_id = create(settings.database_url, "pay-1")
    assert relay_once(settings, device).sent == 1
    assert row(settings.database_url, message_id) == ("sent", None)

    request = otp_pi.requests[-1].json()
    assert request["command"] == "request-otp"
    assert request["data"]["expiration"] < 10**11  # Unix seconds, as the device reads it
    sent = otp_pi.last_sent(MSISDN)
    assert sent.text == f"Your code is {sent.code}"

    first = validate("pay-1", MSISDN, sent.code, PARAMS, settings=settings)
    assert (first.code, first.valid, first.mode) == ("0000", True, OtpMode.DEVICE)
    second = validate("pay-1", MSISDN, sent.code, PARAMS, settings=settings)
    assert (second.code, second.valid) == ("1202", False)
    assert otp_pi.requests[-1].json()["command"] == "verify-otp"


@pytest.mark.parametrize("change", ["param1", "param2", "param3", "receiver", "code"])
def test_a_changed_param_receiver_or_code_is_invalid(
        settings: Settings, device: Transport, otp_pi: OtpPi, change: str) -> None:
    assert settings.database_url
    create(settings.database_url, "pay-2")
    relay_once(settings, device)
    code = otp_pi.last_sent(MSISDN).code
    params, receiver, given = list(PARAMS), MSISDN, code
    if change.startswith("param"):
        params[int(change[-1]) - 1] += "x"
    elif change == "receiver":
        receiver = "+6281234567891"
    else:
        given = f"{(int(code) + 1) % 10**6:06d}"
    assert validate("pay-2", receiver, given, params, settings=settings).code == "1202"
    assert validate("pay-2", MSISDN, code, PARAMS, settings=settings).code == "0000"


def test_an_expired_otp(settings: Settings, device: Transport, otp_pi: OtpPi) -> None:
    assert settings.database_url
    create(settings.database_url, "pay-3", expires_in=60)
    relay_once(settings, device)
    code = otp_pi.last_sent(MSISDN).code
    otp_pi.clock = lambda: time.time() + 120  # the device's clock moves past the expiry
    assert validate("pay-3", MSISDN, code, PARAMS, settings=settings).code == "1203"


def test_a_duplicate_reference_fails_the_second_row(settings: Settings, device: Transport,
                                                    otp_pi: OtpPi) -> None:
    assert settings.database_url
    create(settings.database_url, "pay-4")
    duplicate = create(settings.database_url, "pay-4")
    report = relay_once(settings, device)
    assert (report.sent, report.failed) == (1, 1)
    state, reason = row(settings.database_url, duplicate)
    assert state == "failed"
    assert "1201" in (reason or "")
    assert len(otp_pi.inbox) == 1


def test_a_lost_reply_is_retried_and_the_code_sent_the_first_time_validates(
        settings: Settings, device: Transport, otp_pi: OtpPi) -> None:
    assert settings.database_url
    message_id = create(settings.database_url, "pay-5")
    otp_pi.fail_next(Fault.close_after_processing())
    assert relay_turn(settings, device).retried == 1
    with psycopg.connect(settings.database_url, autocommit=True) as connection:  # due now
        connection.execute("UPDATE outbox.message SET available_at = now() WHERE id = %s",
                           (message_id,))
    assert relay_once(settings, device).sent == 1  # 1201 on a retry: it got there
    assert row(settings.database_url, message_id) == ("sent", None)
    assert len(otp_pi.inbox) == 1
    assert validate("pay-5", MSISDN, otp_pi.inbox[0].code, PARAMS,
                    settings=settings).code == "0000"


def test_an_email_receiver_gets_the_subject(settings: Settings, device: Transport,
                                            otp_pi: OtpPi) -> None:
    assert settings.database_url
    create(settings.database_url, "mail-1", receiver="someone@example.com", params=(),
           subject="Your code")
    relay_once(settings, device)
    sent = otp_pi.last_sent("someone@example.com")
    assert sent.subject == "Your code"
    assert validate("mail-1", "someone@example.com", sent.code,
                    settings=settings).valid


def test_the_cli_validates_on_the_device(settings: Settings, device: Transport, otp_pi: OtpPi,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert settings.database_url
    create(settings.database_url, "cli-1")
    relay_once(settings, device)
    code = otp_pi.last_sent(MSISDN).code
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("OUTBOX_TRANSPORT", settings.transports["default"])
    params = [arg for value in PARAMS for arg in ("--param", value)]
    base = ["otp", "validate", "--reference", "cli-1", "--receiver", MSISDN, *params]
    with rendered_logs():
        wrong = cli.main([*base, "--otp", "000000" if code != "000000" else "111111"])
        monkeypatch.setattr("sys.stdin", io.StringIO(f"{code}\n"))
        right = cli.main([*base, "--otp", "-", "--json"])
        again = cli.main([*base, "--otp", code])
    out = [line for line in capsys.readouterr().out.splitlines() if '"event"' not in line]
    assert (wrong, right, again) == (1, 0, 1)
    assert out[0].startswith("1202 ")
    assert json.loads(out[1]) == {"code": "0000", "valid": True, "mode": "device",
                                  "meaning": "valid"}
    assert out[2].startswith("1202 ")


def test_the_cli_exits_3_when_the_device_cannot_be_reached(
        settings: Settings, otp_pi: OtpPi, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert settings.database_url
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("OUTBOX_TRANSPORT", otp_pi.url(password="wrong"))
    with rendered_logs():
        status = cli.main(["otp", "validate", "--reference", "r", "--receiver", MSISDN,
                           "--otp", "123456"])
    assert status == 3
    assert "401" in capsys.readouterr().err
