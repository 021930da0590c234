from __future__ import annotations

import base64

import pytest

from outbox.errors import InvalidCommand
from outbox.store import AcceptedMessage
from outbox.web.gateway import (
    basic_credentials,
    command_label,
    dedup_key,
    idempotency_key,
    parse_body,
    same_command,
)


@pytest.mark.parametrize(("raw", "parsed"), [
    (b'{"command": "send-sms", "data": {}}', {"command": "send-sms", "data": {}}),
    (b'{\n\t"command": "block-msisdn",\n\t"data": {\n\t\t"receiver": "0812",\n\t}\n}',
     {"command": "block-msisdn", "data": {"receiver": "0812"}}),
    (b"{'command': 'send-sms', 'data': {'message': \"it's\",},}",
     {"command": "send-sms", "data": {"message": "it's"}}),
    (b'{"n": 123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
    ('{"text": "Sch\u00f6n"}'.encode(), {"text": "Sch\u00f6n"}),
])
def test_parse_body_is_as_lenient_as_org_json(raw: bytes, parsed: object) -> None:
    assert parse_body(raw) == parsed


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[1]", b'"x"', b"1", b'{"a": NaN}', b'{"a": [Infinity]}',
    b"[" * 1000 + b"]" * 1000, b'{"a": 1', b"\xff\xfe",
])
def test_parse_body_none_where_the_device_answers_empty(raw: bytes) -> None:
    assert parse_body(raw) is None


def test_idempotency_key_header_first_then_id_per_command() -> None:
    assert idempotency_key(" k-1 ", {"id": 5}, "send-sms") == "key:k-1"
    assert idempotency_key(None, {"id": 5}, "send-sms") == "send-sms:5"
    assert idempotency_key("", {"id": " a "}, "send-email") == "send-email:a"
    for data in ({}, {"id": None}, {"id": ""}, {"id": True}, {"id": [1]}):
        assert idempotency_key(None, data, "send-sms") is None
    with pytest.raises(InvalidCommand) as caught:
        idempotency_key("x" * 201, {}, "send-sms")
    assert caught.value.rule == "gateway_idempotency_key_length"
    assert dedup_key("shop", "key:k-1") == "gw:shop:key:k-1"
    assert dedup_key(None, "send-sms:5") == "gw::send-sms:5"


def _stored(command: str, **data: object) -> AcceptedMessage:
    return AcceptedMessage(command, dict(data), 1.0, "shop")


def test_same_command_ignores_times_and_ids_not_content() -> None:
    stored = _stored("send-sms", receiver="+62812", message="hi", date_time=1, id=7,
                     expiration=100)
    assert same_command(stored, "send-sms", {"receiver": " +62812 ", "message": "hi",
                                             "date_time": 2, "expiration": 200})
    assert not same_command(stored, "send-sms", {"receiver": "+62813", "message": "hi"})
    assert not same_command(stored, "send-sms", {"receiver": "+62812", "message": "ho"})
    assert not same_command(stored, "send-email", {"receiver": "+62812", "message": "hi"})
    otp = _stored("create-otp", receiver="+62812", reference=5, message="c %s", param1="a")
    assert same_command(otp, "create-otp", {"receiver": "+62812", "reference": "5",
                                            "message": "c %s", "param1": "a"})
    assert not same_command(otp, "create-otp", {"receiver": "+62812", "reference": "5",
                                                "message": "c %s", "param1": "b"})
    blanked = _stored("send-sms", receiver="+62812")  # the relay blanked the sent text
    assert same_command(blanked, "send-sms", {"receiver": "+62812", "message": "anything"})


def _basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_basic_credentials() -> None:
    assert basic_credentials(_basic("shop:pa:ss")) == ("shop", "pa:ss")
    assert basic_credentials("basic " + base64.b64encode(b"u:").decode()) == ("u", "")
    for header in (None, "", "Basic", "Bearer x", "Basic !!", _basic("nocolon"), _basic(":pw"),
                   "Basic " + base64.b64encode(b"\xff:\xfe").decode()):
        assert basic_credentials(header) is None


def test_command_label_is_a_closed_set() -> None:
    assert command_label(" Send-SMS ") == "send-sms"
    assert command_label("verify-otp") == "verify-otp"
    assert command_label("+628123456789") == "other"
    assert command_label(None) == "none"
    assert command_label(5) == "none"
