"""The REST transport against a local OTP-Pi stand-in: every reply of PROTOCOL.md section 3
classified as the table in outbox/transports/http.py says, the exact headers and bytes."""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from outbox.commands import encode
from outbox.errors import (
    ConfigurationError,
    PermanentPublishError,
    PublishError,
    TransientPublishError,
)
from outbox.relay import Relay
from outbox.settings import Settings
from outbox.testing import MemoryStore
from outbox.transports import open_transport
from outbox.transports.base import Envelope, TransportOptions
from outbox.transports.http import HttpTransport
from tests.support.otp_pi import Fault, OtpPi, free_port

pytest_plugins = ("tests.support.otp_pi_fixtures",)
pytestmark = pytest.mark.integration

MSISDN = "+6281234567890"
EMAIL = "someone@example.com"


@pytest.fixture
def rest(otp_pi: OtpPi) -> Iterator[HttpTransport]:
    transport = _open(otp_pi.url())
    yield transport
    transport.close()


def _open(url: str, **settings: Any) -> HttpTransport:
    transport = open_transport("device", url, Settings(**settings))
    assert isinstance(transport, HttpTransport)
    return transport


def _body(command: str, **data: Any) -> bytes:
    data.setdefault("date_time", int(time.time()))
    return encode({"command": command, "data": data})


def sms(message_id: int = 1, *, attempt: int = 1, **data: Any) -> Envelope:
    data = {"receiver": MSISDN, "message": "Hello", **data}
    return Envelope(message_id, "send-sms", _body("send-sms", **data), attempt=attempt)


def mail(message_id: int = 1) -> Envelope:
    return Envelope(message_id, "send-email", _body(
        "send-mail", receiver=EMAIL, subject="Hi", message="Hello"))


def otp_request(message_id: int = 1, *, attempt: int = 1, reference: str = "ref-1",
                receiver: str = MSISDN, message: str = "Your code is %s") -> Envelope:
    return Envelope(message_id, "create-otp", _body(
        "request-otp", reference=reference, receiver=receiver, message=message,
        expiration=int(time.time()) + 300), attempt=attempt)


def publish_one(transport: HttpTransport, envelope: Envelope) -> PublishError | None:
    return transport.publish([envelope]).get(envelope.id)


# --- every reply, classified ------------------------------------------------------------


def test_0000_is_delivered_and_the_device_sends_the_sms(otp_pi: OtpPi, rest: HttpTransport) -> None:
    assert publish_one(rest, sms(message="Hi there")) is None
    assert otp_pi.inbox[-1].receiver == MSISDN
    assert otp_pi.inbox[-1].text == "Hi there"


def test_0000_for_send_mail_block_and_unblock(otp_pi: OtpPi, rest: HttpTransport) -> None:
    block = Envelope(2, "block-msisdn", _body("block-msisdn", receiver=MSISDN))
    unblock = Envelope(3, "unblock-msisdn", _body("unblock-msisdn", receiver="+62811"))
    otp_pi.blocked.add("+62811")
    assert rest.publish([mail(1), block, unblock]) == {}
    assert otp_pi.inbox[-1].subject == "Hi"
    assert otp_pi.blocked == {MSISDN}


def test_1101_no_modem_is_transient(otp_pi: OtpPi, rest: HttpTransport) -> None:
    otp_pi.modem_connected = False
    error = publish_one(rest, sms())
    assert isinstance(error, TransientPublishError)
    assert "1101" in str(error)


def test_1102_on_send_mail_is_transient(otp_pi: OtpPi, rest: HttpTransport) -> None:
    otp_pi.mail_fails = True
    error = publish_one(rest, mail())
    assert isinstance(error, TransientPublishError)
    assert "1102" in str(error)


def test_1102_on_request_otp_is_permanent_and_the_device_kept_the_otp(
        otp_pi: OtpPi, rest: HttpTransport) -> None:
    otp_pi.modem_connected = False
    error = publish_one(rest, otp_request(reference="kept"))
    assert isinstance(error, PermanentPublishError)
    assert "1102" in str(error)
    assert otp_pi.otp_references() == ["kept"]
    # which is why a retry could never succeed:
    otp_pi.modem_connected = True
    assert "1201" in str(publish_one(rest, otp_request(2, attempt=1, reference="kept")))


def test_1201_on_a_first_attempt_is_permanent(otp_pi: OtpPi, rest: HttpTransport) -> None:
    assert publish_one(rest, otp_request(1, reference="dup")) is None
    error = publish_one(rest, otp_request(2, reference="dup"))
    assert isinstance(error, PermanentPublishError)
    assert "1201" in str(error)
    assert len(otp_pi.inbox) == 1


def test_1201_on_a_retry_means_the_first_attempt_got_through(
        otp_pi: OtpPi, rest: HttpTransport) -> None:
    otp_pi.fail_next(Fault.close_after_processing())
    first = publish_one(rest, otp_request(7, reference="lost-reply"))
    assert isinstance(first, TransientPublishError)
    assert otp_pi.otp_references() == ["lost-reply"]
    assert publish_one(rest, otp_request(7, attempt=2, reference="lost-reply")) is None
    assert len(otp_pi.inbox) == 1  # one SMS, one code


def test_empty_object_for_send_email_is_permanent(otp_pi: OtpPi, rest: HttpTransport) -> None:
    envelope = Envelope(1, "send-email", _body(
        "send-email", receiver=EMAIL, subject="s", message="m"))  # the README name
    error = publish_one(rest, envelope)
    assert isinstance(error, PermanentPublishError)
    assert "{}" in str(error)
    assert otp_pi.inbox == []


def test_empty_object_for_bad_json_is_permanent(rest: HttpTransport) -> None:
    error = publish_one(rest, Envelope(1, "send-sms", b'{"command": "send-sms", "data": '))
    assert isinstance(error, PermanentPublishError)
    assert "did not understand" in str(error)


def test_send_sms_without_response_code_was_dropped_as_expired(
        otp_pi: OtpPi, rest: HttpTransport) -> None:
    # the README's seconds read as milliseconds: long past
    error = publish_one(rest, sms(expiration=int(time.time()) + 600))
    assert isinstance(error, PermanentPublishError)
    assert "expired" in str(error)
    assert otp_pi.inbox == []
    assert publish_one(rest, sms(expiration=int(time.time() * 1000) + 600_000)) is None


def test_401_with_an_empty_body_is_permanent(otp_pi: OtpPi) -> None:
    transport = _open(otp_pi.url(password="wrong"))
    try:
        error = publish_one(transport, sms())
    finally:
        transport.close()
    assert isinstance(error, PermanentPublishError)
    assert "401" in str(error)
    assert otp_pi.inbox == []


def test_missing_credentials_are_refused_too(otp_pi: OtpPi) -> None:
    transport = _open(otp_pi.url(user=""))
    try:
        assert isinstance(publish_one(transport, sms()), PermanentPublishError)
    finally:
        transport.close()
    assert otp_pi.requests[-1].header("Authorization") is None


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_transient(otp_pi: OtpPi, rest: HttpTransport, status: int) -> None:
    otp_pi.fail_next(Fault.http_status(status))
    error = publish_one(rest, sms())
    assert isinstance(error, TransientPublishError)
    assert str(status) in str(error)
    assert publish_one(rest, sms(2)) is None  # the next request is fine again


def test_a_timeout_is_transient(otp_pi: OtpPi) -> None:
    transport = _open(otp_pi.url(timeout="0.3"))
    otp_pi.fail_next(Fault.delay(2.0))
    try:
        started = time.monotonic()
        error = publish_one(transport, sms())
        assert time.monotonic() - started < 1.5
        assert isinstance(error, TransientPublishError)
        assert "timed out" in str(error)
    finally:
        transport.close()


def test_after_a_timeout_the_rest_of_the_batch_is_not_tried(otp_pi: OtpPi) -> None:
    transport = _open(otp_pi.url(timeout="0.3"))
    otp_pi.fault = Fault.delay(2.0)
    try:
        started = time.monotonic()
        failures = transport.publish([sms(1), sms(2), sms(3)])
        assert time.monotonic() - started < 1.5  # one timeout, not three
    finally:
        transport.close()
    assert sorted(failures) == [1, 2, 3]
    assert all(isinstance(error, TransientPublishError) for error in failures.values())
    assert "not tried" in str(failures[3])
    assert len(otp_pi.requests) == 1


@pytest.mark.parametrize("fault", [Fault.close(), Fault.close_after_processing()],
                         ids=["before-processing", "after-processing"])
def test_connection_closed_without_a_reply_is_transient(
        otp_pi: OtpPi, rest: HttpTransport, fault: Fault) -> None:
    otp_pi.fail_next(fault)
    error = publish_one(rest, sms())
    assert isinstance(error, TransientPublishError)
    assert "without a reply" in str(error)
    assert publish_one(rest, sms(2)) is None  # a fresh connection works


def test_a_request_otp_that_makes_the_device_hang_up_is_transient(
        otp_pi: OtpPi, rest: HttpTransport) -> None:
    # the relay's own check refuses such a template; a raw envelope shows what the device does
    error = publish_one(rest, otp_request(reference="bad-format", message="%d is your code"))
    assert isinstance(error, TransientPublishError)
    assert otp_pi.otp_references() == ["bad-format"]  # stored before the format failed
    assert otp_pi.inbox == []


def test_connection_refused_is_transient() -> None:
    transport = _open(f"http://otp:pi@127.0.0.1:{free_port()}/api/sms")
    try:
        error = publish_one(transport, sms())
        assert isinstance(error, TransientPublishError)
        with pytest.raises(TransientPublishError):
            transport.check()
    finally:
        transport.close()


def test_check_passes_when_the_device_answers(rest: HttpTransport, otp_pi: OtpPi) -> None:
    rest.check()
    assert otp_pi.requests[-1].method == "OPTIONS"


def test_check_fails_on_refused_credentials(otp_pi: OtpPi) -> None:
    transport = _open(otp_pi.url(password="wrong"))
    try:
        with pytest.raises(PermanentPublishError, match="401"):
            transport.check()
    finally:
        transport.close()


def test_one_failure_does_not_fail_the_rest_of_the_batch(
        otp_pi: OtpPi, rest: HttpTransport) -> None:
    otp_pi.fail_next(Fault.http_status(503))
    failures = rest.publish([sms(1), sms(2), mail(3)])
    assert list(failures) == [1]
    assert len(otp_pi.inbox) == 2


# --- the bytes on the wire ---------------------------------------------------------------


def test_exact_headers(otp_pi: OtpPi, rest: HttpTransport) -> None:
    envelope = sms(42)
    assert publish_one(rest, envelope) is None
    request = otp_pi.requests[-1]
    assert (request.method, request.path) == ("POST", "/api/otp")
    expected_auth = "Basic " + base64.b64encode(b"otp:pi-secret").decode()
    assert request.header("Authorization") == expected_auth
    assert request.header("Content-Type") == "application/json"
    assert request.header("Content-Length") == str(len(envelope.body))
    assert "transfer-encoding" not in request.header_names()
    assert request.header("Idempotency-Key") == "42"
    assert request.body == envelope.body


def test_an_injected_client_sends_the_same_headers() -> None:
    seen: list[httpx.Request] = []

    def device(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"command": "send-sms", "response_code": "0000"})

    client = httpx.Client(transport=httpx.MockTransport(device))
    transport = HttpTransport("device", "http://otp:pi@device.invalid:8899/api/sms",
                              TransportOptions(), client=client)
    try:
        assert publish_one(transport, sms(5)) is None
    finally:
        transport.close()
    assert seen[0].headers["Content-Type"] == "application/json"
    assert seen[0].headers["Content-Length"] == str(len(sms(5).body))
    assert seen[0].headers["Idempotency-Key"] == "5"
    assert seen[0].headers["Authorization"] == "Basic " + base64.b64encode(b"otp:pi").decode()


def test_credentials_are_percent_decoded(otp_pi_factory: Any) -> None:
    device = otp_pi_factory(user="user@corp", password="p@ss word/é")
    transport = _open(device.url())
    try:
        assert publish_one(transport, sms()) is None
    finally:
        transport.close()
    assert device.requests[-1].header("Authorization") == "Basic " + base64.b64encode(
        "user@corp:p@ss word/é".encode()).decode()


@pytest.mark.parametrize("userinfo", ["otp:pa:ss", "otp:pa%3Ass", "o%3Atp:pass"])
def test_a_colon_in_the_credentials_is_refused_at_construction(userinfo: str) -> None:
    with pytest.raises(ConfigurationError, match="':'"):
        _open(f"http://{userinfo}@127.0.0.1:8899/api/otp")


def test_the_device_answers_a_chunked_body_with_an_empty_object(otp_pi: OtpPi) -> None:
    """What the Content-Length rule protects us from, shown on the stand-in."""
    def chunks() -> Iterator[bytes]:
        yield _body("send-sms", receiver=MSISDN, message="hi")

    with httpx.Client(auth=(otp_pi.user, otp_pi.password)) as client:
        response = client.post(otp_pi.url(user=""), content=chunks())
    assert otp_pi.requests[-1].header("Transfer-Encoding") == "chunked"
    assert response.status_code == 200
    assert response.json() == {}
    assert otp_pi.inbox == []


def test_other_methods_get_405_with_an_empty_body(otp_pi: OtpPi) -> None:
    with httpx.Client(auth=(otp_pi.user, otp_pi.password)) as client:
        response = client.get(otp_pi.url(user=""))
    assert (response.status_code, response.content) == (405, b"")


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _relay_bytes(otp_pi: OtpPi, dialect: str, command: str, data: dict[str, Any]) -> bytes:
    now = time.time() // 1  # a whole second: the device drops what looks expired
    clock = _Clock(now)
    store = MemoryStore(clock=clock)
    store.insert(command, data)
    transport = _open(otp_pi.url(dialect=dialect))
    try:
        report = Relay(store, {"default": transport}, Settings(otp_ttl=300), clock=clock,
                       rng=random.Random(1)).drain()
    finally:
        transport.close()
    assert report.claimed == 1
    return otp_pi.requests[-1].body


@pytest.mark.parametrize(("dialect", "command", "data", "expected"), [
    ("otp-pi", "send-sms", {"receiver": MSISDN, "message": "Halo dunia"},
     '{"command":"send-sms","data":{"receiver":"+6281234567890","message":"Halo dunia",'
     '"id":1,"date_time":NOW}}'),
    ("otp-pi", "send-email", {"receiver": EMAIL, "subject": "Caf\u00e9", "message": "\u20ac 5",
                              "expiration": "EXP"},
     '{"command":"send-mail","data":{"receiver":"someone@example.com","subject":"Caf\\u00e9",'
     '"message":"\\u20ac 5","expiration":EXPMS,"id":1,"date_time":NOW}}'),
    ("otp-pi", "create-otp", {"receiver": MSISDN, "reference": "r-1", "message": "Kode %s",
                              "param1": "order-9"},
     '{"command":"request-otp","data":{"receiver":"+6281234567890","reference":"r-1",'
     '"message":"Kode %s","param1":"order-9","id":1,"date_time":NOW,"expiration":TTL}}'),
    ("readme", "send-email", {"receiver": EMAIL, "subject": "s", "message": "m",
                              "expiration": "EXP"},
     '{"command":"send-email","data":{"receiver":"someone@example.com","subject":"s",'
     '"message":"m","expiration":EXP,"id":1,"date_time":NOW}}'),
    ("readme", "create-otp", {"receiver": EMAIL, "reference": "r-2", "message": "%s",
                              "subject": "Code"},
     '{"command":"create-otp","data":{"receiver":"someone@example.com","reference":"r-2",'
     '"message":"%s","subject":"Code","id":1,"date_time":NOW,"expiration":TTL}}'),
    ("readme", "block-msisdn", {"receiver": MSISDN},
     '{"command":"block-msisdn","data":{"receiver":"+6281234567890","id":1,"date_time":NOW}}'),
], ids=["otp-pi-sms", "otp-pi-mail", "otp-pi-otp", "readme-mail", "readme-otp", "readme-block"])
def test_exact_bytes_in_both_dialects(otp_pi: OtpPi, dialect: str, command: str,
                                      data: dict[str, Any], expected: str) -> None:
    now = int(time.time())
    expiration = now + 600
    if data.get("expiration") == "EXP":
        data = {**data, "expiration": expiration}
    body = _relay_bytes(otp_pi, dialect, command, data)
    assert body == (expected.replace("EXPMS", str(expiration * 1000))
                    .replace("EXP", str(expiration))
                    .replace("TTL", str(_ttl_expiration(body)))
                    .replace("NOW", str(json.loads(body)["data"]["date_time"]))).encode("ascii")
    assert abs(json.loads(body)["data"]["date_time"] - now) <= 1


def _ttl_expiration(body: bytes) -> int:
    data = json.loads(body)["data"]
    return int(data["date_time"]) + 300 if "expiration" in data else 0


def test_call_returns_the_devices_verify_otp_answer(otp_pi: OtpPi, rest: HttpTransport) -> None:
    assert publish_one(rest, otp_request(reference="v-1")) is None
    code = otp_pi.last_sent(MSISDN).code
    wrong = rest.call(_body("verify-otp", reference="v-1", receiver=MSISDN, otp="x"))
    right = rest.call(_body("verify-otp", reference="v-1", receiver=MSISDN, otp=code))
    assert (wrong["response_code"], right["response_code"]) == ("1202", "0000")
    assert otp_pi.requests[-1].header("Idempotency-Key") is None


def test_the_stand_in_had_no_internal_errors(otp_pi: OtpPi, rest: HttpTransport) -> None:
    otp_pi.fail_next(Fault.close(), Fault.http_status(503))
    rest.publish([sms(1), sms(2), sms(3), otp_request(4)])
    assert otp_pi.errors == []
