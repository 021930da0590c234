from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.commands import (
    BlockMsisdn,
    CreateOtp,
    Dialect,
    SendEmail,
    SendSms,
    UnblockMsisdn,
    canonical_command,
    encode,
    validate,
    wire_payload,
)
from outbox.errors import InvalidCommand

NOW = 1_800_000_000.0
SMS = {"receiver": "+6281234567890", "message": "Hello"}

# (command, data, broken rule): the same table runs against the database in
# tests/integration/test_schema.py, so Python and SQL refuse exactly the same input.
BAD_INPUT = [
    ("send-fax", SMS, "message_command_known"),
    ("validate-otp", SMS, "message_command_synchronous"),
    ("send-sms", ["not", "an", "object"], "message_data_object"),
    ("send-sms", "text", "message_data_object"),
    ("send-sms", {"message": "hi"}, "message_receiver_present"),
    ("send-sms", {"receiver": "  ", "message": "hi"}, "message_receiver_present"),
    ("send-sms", {"receiver": 6281234, "message": "hi"}, "message_receiver_present"),
    ("send-email", {"receiver": "not-an-address", "message": "hi"}, "message_receiver_email"),
    ("send-sms", {"receiver": "someone@example.com", "message": "hi"}, "message_receiver_msisdn"),
    ("send-sms", {"receiver": "0812-3456", "message": "hi"}, "message_receiver_msisdn"),
    ("block-msisdn", {"receiver": "abc"}, "message_receiver_msisdn"),
    ("unblock-msisdn", {"receiver": "++62812"}, "message_receiver_msisdn"),
    ("send-sms", {"receiver": "+62812345"}, "message_text_present"),
    ("create-otp", {"receiver": "x y", "reference": "r", "message": "%s"}, "message_receiver_otp"),
    ("create-otp", {"receiver": "0812345", "reference": "r", "message": "no code"},
     "message_otp_template"),
    ("create-otp", {"receiver": "0812345", "reference": "r", "message": "%s and %s"},
     "message_otp_template"),
    ("create-otp", {"receiver": "0812345", "reference": "r", "message": "%s is 100%"},
     "message_otp_template"),
    ("create-otp", {"receiver": "0812345", "reference": "r", "message": "%d"},
     "message_otp_template"),
    ("create-otp", {"receiver": "0812345", "message": "code %s"}, "message_otp_reference"),
    ("create-otp", {"receiver": "0812345", "reference": " ", "message": "code %s"},
     "message_otp_reference"),
    ("create-otp", {"receiver": "0812345", "reference": True, "message": "code %s"},
     "message_otp_reference"),
    ("create-otp", {"receiver": "0812345", "reference": ["r"], "message": "code %s"},
     "message_otp_reference"),
    ("send-sms", {**SMS, "expiration": "soon"}, "message_expiration_number"),
    ("send-sms", {**SMS, "expiration": True}, "message_expiration_number"),
    ("send-sms", {**SMS, "expiration": (NOW + 60) * 1000}, "message_expiration_seconds"),
    ("send-sms", {**SMS, "expiration": NOW - 1}, "message_expiration_future"),
]


@pytest.mark.parametrize(("command", "data", "rule"), BAD_INPUT,
                         ids=[f"{case[2]}-{i}" for i, case in enumerate(BAD_INPUT)])
def test_bad_input_is_refused_with_the_rule_named(command: str, data: object, rule: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        validate(command, data, now=NOW)
    assert caught.value.rule == rule
    # the error names the problem but never echoes the receiver or the text
    assert "6281234567890" not in str(caught.value)


GOOD_INPUT = [
    ("send-sms", SMS, "send-sms"),
    ("SEND-SMS", {"receiver": "08123456789", "message": "x"}, "send-sms"),
    ("send-mail", {"receiver": "a@example.com", "subject": "s", "message": "m"}, "send-email"),
    ("send-message", {"receiver": "a@example.com", "message": "m"}, "send-email"),
    ("send-message", {"receiver": "0812345", "message": "m"}, "send-sms"),
    ("request-otp", {"receiver": "0812345", "reference": "r", "message": "Code %s (100%%)"},
     "create-otp"),
    ("create-otp", {"receiver": "a@example.com", "reference": 12, "message": "%s"}, "create-otp"),
    ("create-otp", {"receiver": "a@example.com", "reference": 1.5, "message": "%s"}, "create-otp"),
    ("block-msisdn", {"receiver": "+62812345"}, "block-msisdn"),
    ("unblock-msisdn", {"receiver": "62812345"}, "unblock-msisdn"),
    ("send-sms", {**SMS, "expiration": NOW + 60}, "send-sms"),
    ("send-sms", {**SMS, "expiration": str(int(NOW + 60))}, "send-sms"),
]


@pytest.mark.parametrize(("command", "data", "canonical"), GOOD_INPUT)
def test_good_input_gets_its_readme_name(command: str, data: object, canonical: str) -> None:
    assert validate(command, data, now=NOW) == canonical


def test_past_expiration_is_only_checked_when_asked() -> None:
    assert validate("send-sms", {**SMS, "expiration": NOW - 1}) == "send-sms"


def test_unknown_command_name_is_truncated_in_the_error() -> None:
    with pytest.raises(InvalidCommand) as caught:
        canonical_command("x" * 500)
    assert len(str(caught.value)) < 200


def test_typed_commands_build_the_readme_data() -> None:
    when = datetime(2027, 1, 1, tzinfo=UTC)
    assert SendSms(receiver="0812345", message="hi", expiration=when).to_data() == {
        "receiver": "0812345", "message": "hi", "expiration": int(when.timestamp())}
    assert SendEmail(receiver="a@b.co", subject="s", message="m").to_data() == {
        "receiver": "a@b.co", "subject": "s", "message": "m"}
    assert BlockMsisdn(receiver="0812345").to_data() == {"receiver": "0812345"}
    assert UnblockMsisdn(receiver="0812345").to_data() == {"receiver": "0812345"}
    assert CreateOtp(receiver="0812345", reference="r1", message="Code %s",
                     params=("a", "b")).to_data() == {
        "receiver": "0812345", "reference": "r1", "message": "Code %s",
        "param1": "a", "param2": "b"}
    with pytest.raises(InvalidCommand):
        CreateOtp(receiver="0812345", reference="r", message="%s", params=("1",) * 5).to_data()
    with pytest.raises(InvalidCommand):
        SendSms(receiver="0812345", message="hi", expiration=datetime(2027, 1, 1)).to_data()


# --- dialects ---------------------------------------------------------------------------


def _wire(command: str, data: dict[str, object], dialect: Dialect,
          expires_at: float | None = None) -> dict[str, object]:
    return wire_payload(command, data, message_id=42, dialect=dialect, now=NOW,
                        expires_at=expires_at)


def test_otp_pi_dialect_renames_and_uses_milliseconds_for_send_commands() -> None:
    payload = _wire("send-email", {"receiver": "a@b.co", "subject": "s", "message": "m",
                                   "expiration": NOW + 60}, Dialect.OTP_PI, expires_at=NOW + 60)
    assert payload == {"command": "send-mail", "data": {
        "receiver": "a@b.co", "subject": "s", "message": "m",
        "expiration": int((NOW + 60) * 1000), "id": 42, "date_time": int(NOW)}}


def test_otp_pi_dialect_sends_request_otp_with_expiration_in_seconds() -> None:
    data = {"receiver": "0812345", "reference": "r", "message": "Code %s", "param1": "p"}
    payload = _wire("create-otp", data, Dialect.OTP_PI, expires_at=NOW + 300)
    assert payload["command"] == "request-otp"
    assert payload["data"] == {**data, "expiration": int(NOW + 300), "id": 42,
                               "date_time": int(NOW)}


def test_readme_dialect_keeps_names_and_seconds() -> None:
    payload = _wire("send-sms", {"receiver": "0812345", "message": "m"}, Dialect.README,
                    expires_at=NOW + 60)
    assert payload == {"command": "send-sms", "data": {
        "receiver": "0812345", "message": "m", "expiration": int(NOW + 60), "id": 42,
        "date_time": int(NOW)}}
    assert _wire("send-email", {"receiver": "a@b.co", "message": "m"},
                 Dialect.README)["command"] == "send-email"
    assert _wire("create-otp", {"receiver": "0812345", "reference": "r", "message": "%s"},
                 Dialect.README, expires_at=NOW + 5)["command"] == "create-otp"


def test_without_expiration_a_fresh_date_time_is_sent_and_no_expiration() -> None:
    payload = _wire("send-sms", {"receiver": "0812345", "message": "m", "date_time": 1},
                    Dialect.OTP_PI)
    assert payload["data"] == {"receiver": "0812345", "message": "m", "date_time": int(NOW),
                               "id": 42}


def test_an_app_supplied_id_is_kept() -> None:
    payload = _wire("block-msisdn", {"receiver": "0812345", "id": "app-7"}, Dialect.OTP_PI)
    assert payload["data"]["id"] == "app-7"


def test_encoding_is_compact_ascii_json() -> None:
    body = encode({"command": "send-sms", "data": {"message": "Halo, kode Anda: 12 ✓"}})
    assert body == b'{"command":"send-sms","data":{"message":"Halo, kode Anda: 12 \\u2713"}}'
    assert json.loads(body)["data"]["message"].endswith("✓")


def test_time_now_is_sane() -> None:
    assert validate("send-sms", {**SMS, "expiration": time.time() + 5}, now=time.time())


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6))
def test_encoding_is_byte_for_byte_the_standard_compact_ascii_form(data: dict[str, object]) -> None:
    payload = {"command": "send-sms", "data": data}
    reference = json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    assert encode(payload) == reference


def test_non_ascii_text_and_huge_integers_take_the_exact_path() -> None:
    assert encode({"m": "é"}) == b'{"m":"\\u00e9"}'
    assert encode({"n": 2**80}) == b'{"n":1208925819614629174706176}'


# -- one receiver rule, data as a whole (the database side: tests/integration/test_bad_input.py)


def test_whitespace_is_every_character_python_calls_space_and_the_migration_agrees() -> None:
    import importlib  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from outbox.commands import WHITESPACE  # noqa: PLC0415

    spaces = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
    assert spaces == WHITESPACE
    migration = importlib.import_module("outbox.migrations.versions.0013_bad_input_at_the_door")
    assert migration.WHITESPACE == WHITESPACE


@pytest.mark.parametrize(("raw", "canonical"), [
    (" +6281234567890 ", "+6281234567890"), ("\t081234\u00a0", "081234"),
    ("\u3000ann@example.com\n", "ann@example.com"), ("Ann@Example.COM", "Ann@Example.COM"),
    ("\u200b0812", "\u200b0812"),  # a zero-width space is no whitespace: refused, not trimmed
])
def test_canonical_receiver_trims_whitespace_and_keeps_the_rest(raw: str, canonical: str) -> None:
    from outbox.commands import canonical_receiver  # noqa: PLC0415

    assert canonical_receiver(raw) == canonical


@pytest.mark.parametrize(("value", "rule"), [
    (2**63, "message_data_number"), (-(2**63) - 1, "message_data_number"),
    (1e19, "message_data_number"), (float("nan"), "message_data_number"),
    (1e-301, "message_data_number"), (2**63 - 1, None), (1e18, None), (0.1, None),
    (-0.0, None), (1.5e-300, None), (True, None),
])
def test_numbers_that_do_not_survive_json_are_refused_by_name(value: object,
                                                              rule: str | None) -> None:
    from outbox.commands import validate_new  # noqa: PLC0415

    data = {**SMS, "x": [{"y": value}]}
    if rule is None:
        validate_new("send-sms", data, now=NOW)
    else:
        with pytest.raises(InvalidCommand) as caught:
            validate_new("send-sms", data, now=NOW)
        assert caught.value.rule == rule


def test_validate_new_stores_the_canonical_receiver_and_encodes_it() -> None:
    from outbox.commands import validate_new  # noqa: PLC0415

    name, data, text = validate_new("Send-SMS", {"receiver": " 0812345 ", "message": "m"},
                                    now=NOW)
    assert (name, data["receiver"]) == ("send-sms", "0812345")
    assert json.loads(text) == data


def test_the_size_limit_is_asked_only_for_data_over_a_kibibyte() -> None:
    from outbox.commands import validate_new  # noqa: PLC0415

    asked: list[int] = []

    def limit() -> int:
        asked.append(1)
        return 2048

    validate_new("send-sms", {**SMS, "message": "m" * 900}, now=NOW, data_size=limit)
    assert asked == []
    validate_new("send-sms", {**SMS, "message": "m" * 1500}, now=NOW, data_size=limit)
    assert asked == [1]
    with pytest.raises(InvalidCommand, match="2,048"):
        validate_new("send-sms", {**SMS, "message": "m" * 2100}, now=NOW, data_size=limit)


def test_the_wire_carries_the_canonical_receiver() -> None:
    payload = wire_payload("block-msisdn", {"receiver": "\t+6281234567890 "}, message_id=1,
                           dialect=Dialect.OTP_PI, now=NOW, expires_at=None)
    assert payload["data"]["receiver"] == "+6281234567890"
