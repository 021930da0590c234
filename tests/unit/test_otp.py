"""Managed OTPs without a database: the code, its hash, issuing through the relay, validating."""

from __future__ import annotations

import base64
import json
import random
import re
from collections import Counter
from typing import Any

import pytest

from outbox.commands import Dialect
from outbox.errors import ConfigurationError, PermanentPublishError, TransientPublishError
from outbox.otp import (
    EXPIRED,
    INVALID,
    LOCKED,
    VALID,
    ManagedOtp,
    code_from_words,
    derive_code,
    key_id,
    otp_digest,
    otp_route,
    verify_on_device,
)
from outbox.otpkeys import check_secret, new_secret
from outbox.relay import Relay
from outbox.settings import Settings
from outbox.testing import MemoryStore, MemoryTransport
from outbox.transports import OtpMode
from outbox.transports.base import TransportOptions
from tests.support.log_capture import rendered_logs

SECRET = "385cfdbc00ec32031699460779c15099b2bba3cad0e440fffb08e10df0acb9e1"
OLD_SECRET = "6da0633528deaa0144e7b058315f0b753ec0b945163a72bf96a0d18180f9de0d"
MSISDN = "+6281234567890"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def otp_data(reference: str = "order-1", **extra: Any) -> dict[str, Any]:
    return {"receiver": MSISDN, "reference": reference, "message": "Your code is %s",
            "param1": "pay", "param2": "100", **extra}


class Setup:
    def __init__(self, issuer: ManagedOtp | None = None, *, fail: Any = None,
                 otp_ttl: int = 300) -> None:
        self.clock = Clock()
        self.store = MemoryStore(clock=self.clock)
        self.transport = MemoryTransport(fail=fail)
        self.issuer = issuer or ManagedOtp(SECRET, max_attempts=3)
        self.relay = Relay(self.store, {"default": self.transport}, Settings(otp_ttl=otp_ttl),
                           otp=self.issuer, clock=self.clock, rng=random.Random(1))

    def create(self, reference: str = "order-1", **extra: Any) -> int:
        return self.store.insert("create-otp", otp_data(reference, **extra))

    def sent(self, index: int = -1) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.transport.delivered[index].body)
        return payload

    def code(self, index: int = -1) -> str:
        found = re.findall(r"\d{4,10}", self.sent(index)["data"]["message"])
        assert len(found) == 1
        return str(found[0])

    def validate(self, otp: str, reference: str = "order-1", receiver: str = MSISDN,
                 params: tuple[str, ...] = ("pay", "100")) -> str:
        return self.issuer.validate(self.store, reference, receiver, otp, params).code


# --- the code ---------------------------------------------------------------------------


def test_the_code_is_stable_per_row_and_differs_between_rows_references_and_keys() -> None:
    secret = SECRET.encode()
    code = derive_code(secret, 7, "order-1", 6)
    assert re.fullmatch(r"\d{6}", code)
    assert derive_code(secret, 7, "order-1", 6) == code
    others = {derive_code(secret, 8, "order-1", 6), derive_code(secret, 7, "order-2", 6),
              derive_code(OLD_SECRET.encode(), 7, "order-1", 6)}
    assert code not in others


@pytest.mark.parametrize("digits", [4, 6, 8, 10])
def test_the_code_has_the_configured_digits_with_leading_zeros_kept(digits: int) -> None:
    codes = [derive_code(SECRET.encode(), n, "r", digits) for n in range(300)]
    assert all(len(code) == digits and code.isdigit() for code in codes)
    assert any(code.startswith("0") for code in codes)


def test_words_above_the_last_whole_multiple_are_rejected_not_folded() -> None:
    # 2**64 is not a multiple of 10**6: folding the top 2**64 % 10**6 words onto the low codes
    # would make those codes likelier. Those words are skipped instead.
    limit = (1 << 64) - (1 << 64) % 10**6
    assert code_from_words([limit, limit + 5, (1 << 64) - 1, 42], 6) == "000042"
    assert code_from_words([limit - 1], 6) == f"{(limit - 1) % 10**6:06d}"
    # with 4-bit words and one digit: 0..9 are kept, 10..15 rejected
    assert [code_from_words([w, 3], 1, bits=4) for w in (9, 10, 15)] == ["9", "3", "3"]


def test_codes_are_uniform() -> None:
    secret = SECRET.encode()
    counts = Counter(derive_code(secret, n, "uniform", 4)[0] for n in range(20_000))
    expected = 20_000 / 10
    chi_square = sum((counts[str(d)] - expected) ** 2 / expected for d in range(10))
    assert chi_square < 27.9  # p = 0.001 for 9 degrees of freedom


def test_the_digest_binds_every_field_and_is_unambiguous() -> None:
    secret = SECRET.encode()
    base = otp_digest(secret, "123456", "ref", MSISDN, ["a", "b"])
    assert len(base) == 32
    variants = [
        otp_digest(secret, "123457", "ref", MSISDN, ["a", "b"]),
        otp_digest(secret, "123456", "ref2", MSISDN, ["a", "b"]),
        otp_digest(secret, "123456", "ref", "+6281234567891", ["a", "b"]),
        otp_digest(secret, "123456", "ref", MSISDN, ["a", "c"]),
        otp_digest(secret, "123456", "ref", MSISDN, ["ab", ""]),  # no joining ambiguity
        otp_digest(secret, "123456", "ref", MSISDN, ["a", "b", "x"]),
        otp_digest(OLD_SECRET.encode(), "123456", "ref", MSISDN, ["a", "b"]),
    ]
    assert base not in variants
    assert otp_digest(secret, "123456", "ref", MSISDN, ["a", "b", "", ""]) == base


def test_key_ids_name_secrets_without_revealing_them() -> None:
    assert key_id(SECRET.encode()) == key_id(SECRET.encode())
    assert key_id(SECRET.encode()) != key_id(OLD_SECRET.encode())
    assert SECRET not in key_id(SECRET.encode())


def test_secrets_must_be_set_and_long_enough() -> None:
    with pytest.raises(ConfigurationError, match="OUTBOX_OTP_SECRET"):
        ManagedOtp.from_settings(Settings())
    with pytest.raises(ConfigurationError, match="128"):
        ManagedOtp(SECRET, ["short"])
    issuer = ManagedOtp.from_settings(Settings(otp_secret=SECRET, otp_digits=8, otp_max_attempts=2))
    assert (issuer.digits, issuer.max_attempts) == (8, 2)


# --- issuing through the relay ------------------------------------------------------------


def test_the_relay_publishes_the_finished_text_as_an_sms() -> None:
    setup = Setup()
    message_id = setup.create(expiration=int(setup.clock.now) + 120)
    assert setup.relay.process_batch().sent == 1
    payload = setup.sent()
    assert payload["command"] == "send-sms"
    code = setup.code()
    assert payload["data"] == {"receiver": MSISDN, "message": f"Your code is {code}",
                               "expiration": (int(setup.clock.now) + 120) * 1000,
                               "id": message_id, "date_time": int(setup.clock.now)}
    otp = setup.store.otps["order-1"]
    assert (otp.message_id, otp.key_id, otp.attempts, otp.used_at) == (
        message_id, setup.issuer.current_key_id, 0, None)
    assert otp.expires_at == int(setup.clock.now) + 120
    assert code.encode() not in otp.digest


def test_an_email_receiver_gets_send_email_with_the_subject_and_a_literal_percent() -> None:
    setup = Setup()
    setup.store.insert("create-otp", {"receiver": "a@example.com", "reference": "r",
                                      "subject": "Your code", "message": "%s (100%% yours)"})
    setup.relay.process_batch()
    payload = setup.sent()
    assert payload["command"] == "send-mail"
    assert payload["data"]["subject"] == "Your code"
    assert payload["data"]["message"] == f"{setup.code()} (100% yours)"
    assert "reference" not in payload["data"]


def test_without_an_expiration_the_otp_lives_for_the_otp_ttl() -> None:
    setup = Setup(otp_ttl=90)
    setup.create()
    setup.relay.process_batch()
    assert setup.store.otps["order-1"].expires_at == setup.clock.now + 90
    assert setup.sent()["data"]["expiration"] == int((setup.clock.now + 90) * 1000)


def test_a_retry_of_the_same_row_sends_the_same_code_and_keeps_its_attempts() -> None:
    failures = iter([True, False])
    setup = Setup(fail=lambda envelope: TransientPublishError("down") if next(failures) else None)
    setup.create()
    assert setup.relay.process_batch().retried == 1
    first_text = json.loads(setup.transport.attempts[0].body)["data"]["message"]
    first_code = re.findall(r"\d{6}", first_text)
    assert setup.validate("000000" if first_code != ["000000"] else "111111") == INVALID
    setup.clock.now += 60
    assert setup.relay.process_batch().sent == 1
    assert [setup.code()] == first_code
    assert setup.store.otps["order-1"].attempts == 1
    assert setup.validate(setup.code()) == VALID


def test_a_live_reference_from_another_row_fails_the_row_as_a_duplicate() -> None:
    setup = Setup()
    setup.create()
    setup.relay.process_batch()
    duplicate = setup.create()
    assert setup.relay.process_batch().failed == 1
    row = setup.store.rows[duplicate]
    assert row.state == "failed"
    assert "1201" in (row.last_error or "")
    assert len(setup.transport.delivered) == 1


def test_a_reference_can_be_reused_once_its_otp_is_used_or_expired_or_never_sent() -> None:
    setup = Setup()
    setup.create()
    setup.relay.process_batch()
    assert setup.validate(setup.code()) == VALID
    setup.create()  # used: a new one may go out
    assert setup.relay.process_batch().sent == 1
    setup.clock.now += 301
    setup.create(expiration=int(setup.clock.now) + 100)  # expired: same
    assert setup.relay.process_batch().sent == 1
    assert setup.validate(setup.code()) == VALID


def test_a_reference_whose_message_failed_can_be_issued_again() -> None:
    failing = {"on": True}
    setup = Setup(fail=lambda e: PermanentPublishError("no") if failing["on"] else None)
    first = setup.create()
    assert setup.relay.process_batch().failed == 1
    assert setup.store.rows[first].state == "failed"
    failing["on"] = False
    setup.create()
    assert setup.relay.process_batch().sent == 1
    assert setup.validate(setup.code()) == VALID


# --- validating -----------------------------------------------------------------------------


def test_valid_once_then_invalid() -> None:
    setup = Setup()
    setup.create()
    setup.relay.process_batch()
    code = setup.code()
    assert setup.validate(code) == VALID
    assert setup.validate(code) == INVALID


@pytest.mark.parametrize("change", ["reference", "receiver", "param1", "param2", "param3"])
def test_any_changed_field_is_invalid(change: str) -> None:
    setup = Setup()
    setup.create()
    setup.relay.process_batch()
    code = setup.code()
    kwargs: dict[str, Any] = {"reference": "order-1", "receiver": MSISDN, "params": ("pay", "100")}
    if change == "reference":
        kwargs["reference"] = "order-2"
    elif change == "receiver":
        kwargs["receiver"] = "+6281234567891"
    elif change == "param1":
        kwargs["params"] = ("PAY", "100")
    elif change == "param2":
        kwargs["params"] = ("pay", "1000")
    else:
        kwargs["params"] = ("pay", "100", "x")
    assert setup.validate(code, **kwargs) == INVALID
    assert setup.validate(code) == VALID


def test_expired() -> None:
    setup = Setup()
    setup.create(expiration=int(setup.clock.now) + 60)
    setup.relay.process_batch()
    setup.clock.now += 61
    assert setup.validate(setup.code()) == EXPIRED


def test_locked_after_the_attempt_limit_even_for_the_right_code() -> None:
    setup = Setup(ManagedOtp(SECRET, max_attempts=3))
    setup.create()
    setup.relay.process_batch()
    code = setup.code()
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    results = [setup.issuer.validate(setup.store, "order-1", MSISDN, wrong, ("pay", "100"))
               for _ in range(3)]
    assert [r.code for r in results] == [INVALID] * 3
    assert [r.attempts_left for r in results] == [2, 1, 0]
    assert setup.validate(code) == LOCKED
    assert setup.validate(code) == LOCKED


def test_whitespace_around_fields_is_ignored_as_the_device_does() -> None:
    setup = Setup()
    setup.store.insert("create-otp", otp_data(" order-1 ", receiver=f" {MSISDN} ",
                                              param1=" pay "))
    setup.relay.process_batch()
    assert setup.validate(f" {setup.code()} ", reference="order-1 ") == VALID


def test_rotation_keeps_codes_issued_under_a_previous_secret_valid() -> None:
    old = Setup(ManagedOtp(OLD_SECRET))
    old.create()
    old.relay.process_batch()
    code = old.code()
    rotated = ManagedOtp(SECRET, [OLD_SECRET])
    assert rotated.validate(old.store, "order-1", MSISDN, code, ("pay", "100")).code == VALID

    again = Setup(ManagedOtp(OLD_SECRET))
    again.create()
    again.relay.process_batch()
    forgotten = ManagedOtp(SECRET)  # the old secret dropped: its codes no longer validate
    assert forgotten.validate(again.store, "order-1", MSISDN, again.code(),
                              ("pay", "100")).code == INVALID


def test_a_retry_after_rotation_stays_on_the_key_it_was_issued_under() -> None:
    failures = iter([True, False])
    setup = Setup(ManagedOtp(OLD_SECRET),
                  fail=lambda e: TransientPublishError("down") if next(failures) else None)
    setup.create()
    setup.relay.process_batch()
    first = json.loads(setup.transport.attempts[0].body)["data"]["message"]
    setup.relay.otp = setup.issuer = ManagedOtp(SECRET, [OLD_SECRET])
    setup.clock.now += 60
    setup.relay.process_batch()
    assert setup.sent()["data"]["message"] == first
    assert setup.store.otps["order-1"].key_id == key_id(OLD_SECRET.encode())
    assert setup.validate(setup.code()) == VALID


def test_the_code_is_in_no_log_event(capsys: pytest.CaptureFixture[str]) -> None:
    with rendered_logs() as lines:
        setup = Setup()
        setup.create()
        setup.relay.process_batch()
        code = setup.code()
        setup.validate(code)
        setup.validate(code)
    out = capsys.readouterr()
    assert "otp.validated" in lines.getvalue()
    assert code not in lines.getvalue() + out.out + out.err


# --- choosing the mode ------------------------------------------------------------------------


def test_the_create_otp_route_decides_the_mode() -> None:
    device = "http://u:p@127.0.0.1:8899/api/otp"
    assert otp_route(Settings()).mode is OtpMode.MANAGED  # stdout://
    assert otp_route(Settings(transports={"default": device})).mode is OtpMode.DEVICE
    settings = Settings(transports={"default": "stdout://", "pi": device},
                        routes={"create-otp": "pi"})
    assert otp_route(settings).transport == "pi"
    assert otp_route(settings, route="default").mode is OtpMode.MANAGED
    assert otp_route(Settings(transports={"default": device + "?otp=managed"})).mode is \
        OtpMode.MANAGED


@pytest.mark.parametrize(("transports", "route", "match"), [
    ({"default": "stdout://", "pi": "http://u:p@h/api/otp"}, "default+pi", "mixes"),
    ({"default": "http://u:p@a/api/otp", "pi": "http://u:p@b/api/otp"}, "default+pi", "mixes"),
    ({"default": "amqp://guest:guest@h/?topic=sms&otp=device"}, None, "REST"),
    ({"default": "stdout://"}, "nowhere", "no configured transport"),
])
def test_an_ambiguous_or_impossible_route_is_a_configuration_error(
        transports: dict[str, str], route: str | None, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        otp_route(Settings(transports=transports), route)


def test_device_mode_refuses_a_transport_without_call() -> None:
    transport = MemoryTransport(options=TransportOptions(otp_mode=OtpMode.DEVICE))
    with pytest.raises(ConfigurationError, match="REST"):
        verify_on_device(transport, "r", MSISDN, "123456")


def test_device_mode_sends_verify_otp_in_the_transports_dialect() -> None:

    class Rest(MemoryTransport):
        def __init__(self, dialect: Dialect) -> None:
            super().__init__(options=TransportOptions(dialect=dialect))
            self.calls: list[bytes] = []

        def call(self, body: bytes) -> dict[str, Any]:
            self.calls.append(body)
            return {"response_code": "1203"}

    for dialect, name in ((Dialect.OTP_PI, "verify-otp"), (Dialect.README, "validate-otp")):
        rest = Rest(dialect)
        result = verify_on_device(rest, "r ", MSISDN, "123456", ["a"], now=1_800_000_000)
        assert (result.code, result.valid, result.mode) == ("1203", False, OtpMode.DEVICE)
        assert json.loads(rest.calls[0]) == {"command": name, "data": {
            "reference": "r", "receiver": MSISDN, "otp": "123456", "param1": "a",
            "date_time": 1_800_000_000}}


# --- the secret's strength -----------------------------------------------------------------


@pytest.mark.parametrize("weak", [
    "0000000000000000",                      # 16 characters: hex for 8 bytes, a pattern
    "00000000000000000000000000000000",      # 128 bits of hex, all zero
    "abababababababababababababababab",      # 128 bits, a repeated pattern
    "correct horse battery staple",          # a pass phrase: not hex, not base64
    "c2hvcnQ=",                              # base64 of 5 bytes
    "0123456789abcdef0123456789abcde",       # 31 hex digits
])
def test_a_secret_without_128_random_bits_is_refused_without_quoting_it(weak: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings(otp_secret=weak).validate()
    assert weak not in str(refused.value)
    assert "OUTBOX_OTP_SECRET" in str(refused.value)
    with pytest.raises(ConfigurationError):
        Settings(otp_secret=SECRET, otp_previous_secrets=(weak,)).validate()


def test_the_accepted_forms() -> None:
    raw = bytes(range(100, 132))
    for written in (raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode(),
                    base64.urlsafe_b64encode(raw).decode().rstrip("="),
                    base64.b64encode(raw[:16]).decode().rstrip("=")):
        Settings(otp_secret=written).validate()
        assert ManagedOtp(written).current_key_id == key_id(written.encode())


def test_new_secrets_are_accepted_and_differ() -> None:
    first, second = new_secret(), new_secret()
    assert first != second and len(first) == 64
    assert check_secret(first) == first.encode()


def test_random_secrets_are_never_refused_as_patterns() -> None:
    rng = random.Random(14)
    for _ in range(2000):
        check_secret(rng.randbytes(16).hex())
