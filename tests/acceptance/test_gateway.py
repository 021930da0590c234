"""``outbox gateway`` in a subprocess against the real Postgres, spoken to as the PHP
OTP-Publisher library and curl speak to an OTP-Pi device; rows relayed by a real ``outbox
run`` to a real Redis subscriber (managed OTPs) or to the OTP-Pi stand-in (device OTPs)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from outbox.passwords import set_user
from tests.support.brokers import (
    REDIS_URL,
    CuttableLink,
    RedisDevice,
    redis_device,
    unique_topic,
    wait_until,
    with_query,
)
from tests.support.gateway import OUTBOX, RunningGateway, basic, env_for, gateway, relay
from tests.support.otp_pi import OtpPi

pytestmark = [pytest.mark.acceptance, pytest.mark.integration, pytest.mark.slow]

pytest_plugins = ("tests.support.otp_pi_fixtures",)

SHOP = basic("shop", "shop: a secret with a colon")
OTHER = basic("other", "other-secret")
OTP_SECRET = "8f3b1c6e2a9d4f7b0c5e8a1d3f6b9c2e4a7d0f3b6c9e2a5d8f1b4c7e0a3d6f9b"
PATHS = ("/api/otp", "/api/sms", "/api/email", "/api/message", "/api/block", "/api/unblock")

# The OTP-Publisher README's request bodies, byte for byte (tabs, and the trailing commas of
# the block and unblock examples).
README_CREATE_OTP = (
    '{\n\t"command": "create-otp",\n\t"data": {\n\t\t"date_time": 1629685778,\n'
    '\t\t"expiration": 1629685838,\n\t\t"receiver": "08126666666",\n'
    '\t\t"message": "Your OTP is %s",\n\t\t"reference": "12345678901234567890",\n'
    '\t\t"param1": "100000",\n\t\t"param2": "1234567890",\n\t\t"param3": "987654",\n'
    '\t\t"param4": "674527846556468254"\n\t}\n}')
README_VALIDATE_OTP = (
    '{\n\t"command": "validate-otp",\n\t"data": {\n\t\t"date_time": 1629685778,\n'
    '\t\t"receiver": "08126666666",\n\t\t"otp": "123456",\n'
    '\t\t"reference": "12345678901234567890",\n\t\t"param1": "100000",\n'
    '\t\t"param2": "1234567890",\n\t\t"param3": "987654",\n'
    '\t\t"param4": "674527846556468254"\n\t}\n}')
README_SEND_SMS = (
    '{\n\t"command": "send-sms",\n\t"data": {\n\t\t"date_time": 1629685778,\n'
    '\t\t"expiration": 1629685838,\n\t\t"id": 123456,\n\t\t"receiver": "08126666666",\n'
    '\t\t"message": "Your OTP is 1234"\n\t}\n}')
README_SEND_EMAIL = (
    '{\n\t"command": "send-email",\n\t"data": {\n\t\t"date_time": 1629685778,\n'
    '\t\t"expiration": 1629685838,\n\t\t"id": 123456,\n'
    '\t\t"receiver": "someone@domain.tld",\n\t\t"subject": "Your OTP Code",\n'
    '\t\t"message": "Your OTP is 1234"\n\t}\n}')
README_BLOCK = (
    '{\n\t"command": "block-msisdn",\n\t"data": {\n\t\t"date_time": 1629685778,\n'
    '\t\t"receiver": "08126666666",\n\t}\n}')
README_UNBLOCK = (
    '{\n\t"command": "unblock-msisdn",\n\t"data": {\n\t\t"date_time": 1629685778,\n'
    '\t\t"receiver": "08126666666",\n\t}\n}')
README_TIMES = ("1629685778", "1629685838")


def fresh(body: str, lifetime: int = 300) -> str:
    """A README body with its two timestamps moved to now (everything else as it was)."""
    now = int(time.time())
    return body.replace(README_TIMES[0], str(now)).replace(README_TIMES[1], str(now + lifetime))


def post(client: httpx.Client, path: str, body: str | bytes, auth: str | None = SHOP,
         **headers: str) -> httpx.Response:
    """POST as the PHP client does: an explicit Content-Length and no Content-Type."""
    sent = {"Authorization": auth} if auth else {}
    sent.update(headers)
    return client.post(path, content=body.encode() if isinstance(body, str) else body,
                       headers=sent)


def rows(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT command, data, dedup_key, enqueued_by FROM outbox.message "
                        "ORDER BY id").fetchall()


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gateway") / "users"
    set_user(path, "shop", "shop: a secret with a colon")
    set_user(path, "other", "other-secret", extra="anything")
    return path


@pytest.fixture(scope="module")
def topic() -> str:
    return unique_topic("outbox-gateway")


@pytest.fixture(scope="module")
def managed_env(database_url: str, users_file: Path, topic: str) -> dict[str, str]:
    return env_for(database_url, OUTBOX_GATEWAY_USERS=str(users_file),
                   OUTBOX_TRANSPORT=with_query(REDIS_URL, topic=topic),
                   OUTBOX_OTP_SECRET=OTP_SECRET, OUTBOX_OTP_MAX_ATTEMPTS="2",
                   OUTBOX_POLL_INTERVAL="100ms")


@pytest.fixture(scope="module")
def running(managed_env: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with gateway(managed_env, tmp_path_factory.mktemp("logs")) as started:
        yield started


@pytest.fixture
def client(running: RunningGateway, clean_db: str) -> Iterator[httpx.Client]:
    with running.client() as http:
        yield http


@pytest.fixture
def subscriber(topic: str) -> Iterator[RedisDevice]:
    with redis_device(topic) as device:
        yield device


@pytest.fixture
def relayed(managed_env: dict[str, str], clean_db: str, subscriber: RedisDevice,
            tmp_path: Path) -> Iterator[RedisDevice]:
    """A relay delivering to the Redis subscriber for the duration of the test."""
    with relay(managed_env, tmp_path):
        yield subscriber


# --- what clients send ------------------------------------------------------------------------


def test_readme_bodies_verbatim_on_every_path(client: httpx.Client,
                                              conn: psycopg.Connection[Any]) -> None:
    for path in PATHS:
        # Parsed (trailing commas and all); the README's 2021 expirations are past, which
        # the outbox refuses by name rather than sending an SMS the device would drop.
        for body in (README_SEND_SMS, README_SEND_EMAIL, README_CREATE_OTP):
            reply = post(client, path, body)
            assert reply.status_code == 400, reply.text
            assert reply.json()["rule"] == "message_expiration_future"
        for body, command in ((README_BLOCK, "block-msisdn"), (README_UNBLOCK, "unblock-msisdn")):
            reply = post(client, path, body)
            assert reply.status_code == 200
            answer = reply.json()
            assert answer["command"] == command
            assert answer["response_code"] == "0000"
            assert answer["data"]["receiver"] == "08126666666"
            assert abs(answer["data"]["date_time"] - time.time()) < 120
        validate = post(client, path, README_VALIDATE_OTP)
        assert validate.status_code == 200
        assert validate.json()["response_code"] == "1202"  # no such OTP
        assert validate.json()["data"]["reference"] == "12345678901234567890"
    stored = rows(conn)
    assert [row[0] for row in stored] == ["block-msisdn", "unblock-msisdn"] * len(PATHS)
    assert all(row[3] == "shop" for row in stored)
    assert stored[0][1] == {"date_time": 1629685778, "receiver": "08126666666"}


def test_readme_bodies_with_current_times_are_accepted_on_every_path(
        client: httpx.Client, conn: psycopg.Connection[Any]) -> None:
    for index, path in enumerate(PATHS):
        sms = fresh(README_SEND_SMS)
        email = fresh(README_SEND_EMAIL)
        otp = fresh(README_CREATE_OTP).replace("12345678901234567890", f"ref-{index}")
        for body, command in ((sms, "send-sms"), (email, "send-email"), (otp, "create-otp")):
            reply = post(client, path, body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["command"] == command
            assert reply.json()["response_code"] == "0000"
    stored = rows(conn)
    # the SMS and the e-mail carry data.id 123456: one row each, the other paths' are retries
    assert [row[0] for row in stored].count("send-sms") == 1
    assert [row[0] for row in stored].count("send-email") == 1
    assert [row[0] for row in stored].count("create-otp") == len(PATHS)
    sms_row = next(row for row in stored if row[0] == "send-sms")
    assert sms_row[2] == "gw:shop:send-sms:123456"
    assert sms_row[1]["message"] == "Your OTP is 1234"


def test_body_read_whatever_the_content_type(client: httpx.Client,
                                             conn: psycopg.Connection[Any]) -> None:
    body = "{'command': 'send-message', 'data': {'receiver': '+628123456789', 'message': 'hi',},}"
    for content_type in (None, "application/x-www-form-urlencoded", "text/plain",
                         "application/json"):
        headers = {"Content-Type": content_type} if content_type else {}
        reply = post(client, "/api/message", body, **headers)
        assert reply.json()["response_code"] == "0000", reply.text
    email = '{"command": "send-message", "data": {"receiver": "a@b.example", "subject": "s", "message": "m"}}'
    assert post(client, "/api/message", email).json()["response_code"] == "0000"
    assert [row[0] for row in rows(conn)] == ["send-sms"] * 4 + ["send-email"]
    # device names are stored under the README names
    for device_body, stored in (
        ('{"command":"send-mail","data":{"receiver":"a@b.example","subject":"s","message":"m"}}',
         "send-email"),
        ('{"command":"request-otp","data":{"receiver":"+628123456789","reference":"r-1",'
         '"message":"code %s"}}', "create-otp"),
    ):
        assert post(client, "/api/otp", device_body).json()["response_code"] == "0000"
        assert rows(conn)[-1][0] == stored


def test_a_chunked_body_is_read_too(client: httpx.Client, conn: psycopg.Connection[Any]) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"command":"block-msisdn",'
        yield b'"data":{"receiver":"+628123456789"}}'

    reply = client.post("/api/block", content=chunks(), headers={"Authorization": SHOP})
    assert reply.json()["response_code"] == "0000"


# --- answers like the device --------------------------------------------------------------------


@pytest.mark.parametrize("auth", [
    basic("shop", "wrong"), basic("nobody", "shop: a secret with a colon"), basic("shop", ""),
    "Basic !!!not-base64", "Bearer abc", None,
])
def test_bad_credentials_get_401_with_an_empty_body(client: httpx.Client,
                                                    conn: psycopg.Connection[Any],
                                                    auth: str | None) -> None:
    reply = post(client, "/api/sms", fresh(README_SEND_SMS), auth=auth)
    assert reply.status_code == 401
    assert reply.content == b""
    get = client.get("/api/sms", headers={"Authorization": auth} if auth else {})
    assert get.status_code == 401  # credentials first, as the device checks them
    assert rows(conn) == []


def test_other_methods_405_other_paths_404_both_empty(client: httpx.Client) -> None:
    for method in ("GET", "DELETE", "PATCH"):
        reply = client.request(method, "/api/otp", headers={"Authorization": SHOP})
        assert (reply.status_code, reply.content) == (405, b"")
    reply = post(client, "/api/other", README_BLOCK)
    assert (reply.status_code, reply.content) == (404, b"")


@pytest.mark.parametrize("body", [
    "", "not json", "[]", '"text"', '{"command": "send-sms"}', '{"data": {}}',
    '{"command": "send-sms", "data": "x"}', '{"command": "echo", "data": {}}',
    '{"command": 7, "data": {}}', '{"command": "send-sms", "data": {"receiver": NaN}}',
    "[" * 100 + "]" * 100,
])
def test_what_the_device_would_not_understand_gets_empty_object(
        client: httpx.Client, conn: psycopg.Connection[Any], body: str) -> None:
    reply = post(client, "/api/sms", body)
    assert (reply.status_code, reply.content) == (200, b"{}")
    assert rows(conn) == []


@pytest.mark.parametrize(("data", "rule"), [
    ({"receiver": "nobody", "message": "m"}, "message_receiver_msisdn"),
    ({"receiver": "+628123456789"}, "message_text_present"),
    ({"receiver": "+628123456789", "message": "m", "expiration": int(time.time() * 1000) + 60_000},
     "message_expiration_seconds"),
    ({"receiver": "+628123456789", "message": "m", "expiration": "soon"},
     "message_expiration_number"),
    ({"receiver": "+628123456789", "message": "nul \u0000"}, "message_data_storable"),
])
def test_refusals_name_the_rule_and_never_echo_the_receiver(
        client: httpx.Client, conn: psycopg.Connection[Any], data: dict[str, Any],
        rule: str) -> None:
    reply = post(client, "/api/sms", json.dumps({"command": "send-sms", "data": data}))
    assert reply.status_code == 400
    assert reply.json()["rule"] == rule
    assert reply.json()["command"] == "send-sms"
    assert "628123456789" not in reply.text
    assert rows(conn) == []


def test_create_otp_template_rule(client: httpx.Client) -> None:
    body = {"command": "create-otp", "data": {"receiver": "+628123456789", "reference": "r",
                                              "message": "no placeholder"}}
    reply = post(client, "/api/otp", json.dumps(body))
    assert (reply.status_code, reply.json()["rule"]) == (400, "message_otp_template")


# --- idempotency ------------------------------------------------------------------------------------


def test_a_replay_with_the_same_key_answers_like_the_first_time(
        client: httpx.Client, conn: psycopg.Connection[Any]) -> None:
    body = json.dumps({"command": "send-sms", "data": {"receiver": "+628123456789",
                                                       "message": "Your order shipped"}})
    first = post(client, "/api/sms", body, **{"Idempotency-Key": "order-42"})
    time.sleep(1.1)  # a second later: the answer still carries the first acceptance's time
    again = post(client, "/api/sms", body, **{"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 200
    assert first.content == again.content
    assert len(rows(conn)) == 1
    assert rows(conn)[0][2] == "gw:shop:key:order-42"
    # another user's key of the same name is another request
    other = post(client, "/api/sms", body, auth=OTHER, **{"Idempotency-Key": "order-42"})
    assert other.json()["response_code"] == "0000"
    assert [row[3] for row in rows(conn)] == ["shop", "other"]
    # the same key for a different command is refused by name, nothing is dropped silently
    changed = json.dumps({"command": "send-sms", "data": {"receiver": "+628123456780",
                                                          "message": "Your order shipped"}})
    conflict = post(client, "/api/sms", changed, **{"Idempotency-Key": "order-42"})
    assert conflict.status_code == 409
    assert conflict.json()["rule"] == "gateway_idempotency_key_reused"
    assert len(rows(conn)) == 2


def test_data_id_is_the_key_when_no_header_is_sent(client: httpx.Client,
                                                   conn: psycopg.Connection[Any]) -> None:
    first = post(client, "/api/sms", fresh(README_SEND_SMS))
    # a retry built again by the client: new date_time, same id, same SMS
    again = post(client, "/api/sms", fresh(README_SEND_SMS, lifetime=200))
    assert first.content == again.content
    assert len(rows(conn)) == 1


def test_a_create_otp_retry_is_not_a_duplicate(client: httpx.Client,
                                               conn: psycopg.Connection[Any]) -> None:
    body = fresh(README_CREATE_OTP).replace('"reference"', '"id": "otp-1",\n\t\t"reference"')
    first = post(client, "/api/otp", body)
    again = post(client, "/api/otp", body)
    assert first.json()["response_code"] == again.json()["response_code"] == "0000"
    assert first.content == again.content
    other = post(client, "/api/otp", fresh(README_CREATE_OTP))  # no id: a new request
    assert other.json()["response_code"] == "1201"
    assert len(rows(conn)) == 1


# --- OTPs, relayed --------------------------------------------------------------------------------


def _create_otp(client: httpx.Client, reference: str, receiver: str = "+628123456789",
                expires_in: int = 300) -> httpx.Response:
    body = {"command": "request-otp", "data": {
        "date_time": int(time.time()), "expiration": int(time.time()) + expires_in,
        "receiver": receiver, "message": "Your code is %s", "reference": reference,
        "id": reference, "param1": "transfer", "param2": "150000", "param3": "",
        "param4": ""}}
    return post(client, "/api/otp", json.dumps(body))


def _validate(client: httpx.Client, reference: str, code: str,
              receiver: str = "+628123456789", command: str = "verify-otp") -> str:
    body = {"command": command, "data": {
        "date_time": int(time.time()), "receiver": receiver, "otp": code,
        "reference": reference, "param1": "transfer", "param2": "150000", "param3": "",
        "param4": ""}}
    reply = post(client, "/api/otp", json.dumps(body))
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["command"] == command
    assert answer["data"]["reference"] == reference
    return str(answer["response_code"])


def _code_for(device: RedisDevice, receiver: str) -> str:
    def sent() -> list[dict[str, Any]]:
        return [payload for payload in map(json.loads, list(device.received))
                if payload["data"].get("receiver") == receiver]

    assert wait_until(lambda: bool(sent())), "the relay published nothing for the receiver"
    [payload] = sent()
    assert payload["command"] == "send-sms"
    match = re.fullmatch(r"Your code is (\d{6})", payload["data"]["message"])
    assert match is not None
    return match.group(1)


def test_managed_otp_created_through_the_gateway_then_validated(
        client: httpx.Client, relayed: RedisDevice) -> None:
    assert _create_otp(client, "transfer-1").json()["response_code"] == "0000"
    assert _create_otp(client, "transfer-1x", receiver="+628111111111").json()[
        "response_code"] == "0000"
    code = _code_for(relayed, "+628123456789")
    assert _validate(client, "transfer-1", code, command="validate-otp") == "0000"
    assert _validate(client, "transfer-1", code) == "1202"  # used up
    other = _code_for(relayed, "+628111111111")
    wrong = f"{(int(other) + 1) % 1_000_000:06d}"
    assert _validate(client, "transfer-1x", wrong, receiver="+628111111111") == "1202"
    assert _validate(client, "transfer-1x", other, receiver="+628111111111") == "0000"


def test_managed_otp_duplicate_expired_and_locked(client: httpx.Client,
                                                  relayed: RedisDevice) -> None:
    assert _create_otp(client, "live").json()["response_code"] == "0000"
    duplicate = post(client, "/api/otp", json.dumps({"command": "create-otp", "data": {
        "receiver": "+628123456789", "reference": "live", "message": "again %s"}}))
    assert duplicate.json()["response_code"] == "1201"
    code = _code_for(relayed, "+628123456789")
    assert _validate(client, "live", "000000" if code != "000000" else "111111") == "1202"
    assert _validate(client, "live", "000000" if code != "000000" else "111111") == "1202"
    assert _validate(client, "live", code) == "1204"  # OUTBOX_OTP_MAX_ATTEMPTS=2

    created = time.time()
    assert _create_otp(client, "brief", receiver="+628222222222",
                       expires_in=3).json()["response_code"] == "0000"
    brief = _code_for(relayed, "+628222222222")
    time.sleep(max(0.0, created + 4.1 - time.time()))
    assert _validate(client, "brief", brief, receiver="+628222222222") == "1203"


def test_a_gateway_row_reaches_a_broker_subscriber(client: httpx.Client, relayed: RedisDevice,
                                                   conn: psycopg.Connection[Any]) -> None:
    reply = post(client, "/api/sms", fresh(README_SEND_SMS))
    assert reply.json()["response_code"] == "0000"
    assert wait_until(lambda: len(relayed.received) == 1)
    payload = json.loads(relayed.received[0])
    assert payload["command"] == "send-sms"
    assert payload["data"]["receiver"] == "08126666666"
    assert payload["data"]["message"] == "Your OTP is 1234"
    assert payload["data"]["id"] == 123456
    assert wait_until(lambda: conn.execute(
        "SELECT state FROM outbox.message").fetchone() == ("sent",))


# --- device mode ------------------------------------------------------------------------------------


def test_device_otp_through_the_gateway(database_url: str, clean_db: str, users_file: Path,
                                        otp_pi: OtpPi, tmp_path: Path) -> None:
    env = env_for(database_url, OUTBOX_GATEWAY_USERS=str(users_file),
                  OUTBOX_TRANSPORT=otp_pi.url("/api/otp"), OUTBOX_POLL_INTERVAL="100ms")
    with gateway(env, tmp_path) as started, started.client() as client, relay(env, tmp_path):
        assert _create_otp(client, "dev-1").json()["response_code"] == "0000"
        assert wait_until(lambda: len(otp_pi.inbox) == 1)
        code = re.findall(r"\d{6}", otp_pi.inbox[0].text)[0]
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        assert _validate(client, "dev-1", wrong) == "1202"
        assert _validate(client, "dev-1", code) == "0000"
        assert _validate(client, "dev-1", code) == "1202"
        commands = [r.json()["command"] for r in otp_pi.requests if r.body]
        assert (commands.count("request-otp"), commands.count("verify-otp")) == (1, 3)

        created = time.time()
        assert _create_otp(client, "dev-2", expires_in=3).json()["response_code"] == "0000"
        assert wait_until(lambda: len(otp_pi.inbox) == 2)
        late = re.findall(r"\d{6}", otp_pi.inbox[1].text)[0]
        time.sleep(max(0.0, created + 4.1 - time.time()))
        assert _validate(client, "dev-2", late) == "1203"

        otp_pi.stop()  # the device goes away: the gateway says so by name
        reply = post(client, "/api/otp", json.dumps({"command": "verify-otp", "data": {
            "reference": "dev-3", "receiver": "+628123456789", "otp": "123456"}}))
        assert reply.status_code == 503
        assert reply.json()["rule"] == "otp_device_unreachable"


# --- operations ---------------------------------------------------------------------------------------


def test_metrics_count_requests_by_path_command_and_code(client: httpx.Client,
                                                         running: RunningGateway) -> None:
    post(client, "/api/block", README_BLOCK)
    post(client, "/api/block", README_BLOCK, auth=basic("shop", "wrong"))
    text = client.get("/metrics").text
    assert re.search(r'outbox_gateway_requests_total\{code="0000",command="block-msisdn",'
                     r'path="/api/block"\} [1-9]', text)
    assert 'code="unauthorized"' in text
    assert "outbox_gateway_request_duration_seconds_bucket" in text
    assert client.get("/readyz").status_code == 200
    assert client.get("/openapi.json").json()["openapi"].startswith("3.")


def test_logs_are_masked(client: httpx.Client, running: RunningGateway) -> None:
    post(client, "/api/sms", json.dumps({"command": "send-sms", "data": {
        "receiver": "+628199999999", "message": "secret text 4711"}}))
    post(client, "/api/sms", json.dumps({"command": "send-sms", "data": {
        "receiver": "+628199999999", "message": ""}}))
    assert wait_until(lambda: running.log_text().count('"gateway.request"') >= 2)
    log = running.log_text()
    assert "628199999999" not in log
    assert "secret text" not in log
    assert "shop: a secret" not in log


def test_refuses_to_start_without_users_unless_told(clean_db: str, tmp_path: Path) -> None:
    env = env_for(clean_db)
    refused = subprocess.run([*OUTBOX, "gateway", "--port", "0"], env=env, capture_output=True,
                             text=True, timeout=60, check=False)
    assert refused.returncode == 2
    assert "OUTBOX_GATEWAY_USERS" in refused.stderr
    missing = subprocess.run([*OUTBOX, "gateway", "--port", "0"],
                             env={**env, "OUTBOX_GATEWAY_USERS": str(tmp_path / "absent")},
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2
    assert "cannot read users file" in missing.stderr
    with gateway(env, tmp_path, "--insecure-no-auth") as started, started.client() as client:
        reply = post(client, "/api/block", README_BLOCK, auth=None)
        assert reply.json()["response_code"] == "0000"


def test_passwd_reads_the_password_from_stdin(clean_db: str, tmp_path: Path) -> None:
    users = tmp_path / "users"
    env = env_for(clean_db, OUTBOX_GATEWAY_USERS=str(users))
    done = subprocess.run([*OUTBOX, "gateway", "passwd", "app"], env=env, input="pw with spaces\n",
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "pw with spaces" not in users.read_text() + done.stdout + done.stderr
    assert (users.stat().st_mode & 0o777) == 0o600
    with gateway(env, tmp_path) as started, started.client() as client:
        assert post(client, "/api/block", README_BLOCK,
                    auth=basic("app", "pw with spaces")).json()["response_code"] == "0000"
        # a password change is picked up without a restart
        subprocess.run([*OUTBOX, "gateway", "passwd", "app"], env=env, input="new\n",
                       capture_output=True, text=True, timeout=60, check=True)
        assert post(client, "/api/block", README_BLOCK,
                    auth=basic("app", "pw with spaces")).status_code == 401
        assert post(client, "/api/block", README_BLOCK,
                    auth=basic("app", "new")).json()["response_code"] == "0000"


def test_several_workers_share_the_port_and_the_metrics(clean_db: str, users_file: Path,
                                                        tmp_path: Path) -> None:
    env = env_for(clean_db, OUTBOX_GATEWAY_USERS=str(users_file))
    with gateway(env, tmp_path, "--workers", "2") as started, started.client() as client:
        for _ in range(20):
            assert post(client, "/api/block", README_BLOCK).json()["response_code"] == "0000"
        with httpx.Client(base_url=started.url) as fresh_client:  # new connections
            for _ in range(10):
                assert post(fresh_client, "/api/unblock", README_UNBLOCK).status_code == 200
        text = client.get("/metrics").text
        counted = re.findall(r'outbox_gateway_requests_total\{code="0000",command="(\w+-msisdn)",'
                             r'path="/api/\w+"\} ([0-9.]+)', text)
        assert sum(float(value) for _, value in counted) == 30


def test_concurrent_requests_and_their_retries_share_batches(
        running: RunningGateway, conn: psycopg.Connection[Any]) -> None:
    def send(n: int) -> bytes:
        with running.client() as http:
            body = json.dumps({"command": "send-sms", "data": {
                "receiver": "+628123456789", "message": f"order {n // 2}", "id": n // 2}})
            reply = post(http, "/api/sms", body)
            assert reply.status_code == 200, reply.text
            return reply.content

    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(send, range(80)))
    assert all(json.loads(reply)["response_code"] == "0000" for reply in replies)
    assert all(replies[n] == replies[n + 1] for n in range(0, 80, 2))  # a retry: the same
    stored = rows(conn)
    assert len(stored) == 40
    assert sorted(row[1]["message"] for row in stored) == sorted(f"order {n}" for n in range(40))


def test_tls_by_the_server(clean_db: str, users_file: Path, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   capture_output=True, check=True, timeout=60)
    env = env_for(clean_db, OUTBOX_GATEWAY_USERS=str(users_file))
    with gateway(env, tmp_path, "--certfile", str(cert), "--keyfile", str(key)) as started, \
            started.client() as client:
        assert started.url.startswith("https://")
        assert post(client, "/api/block", README_BLOCK).json()["response_code"] == "0000"
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets nowhere
            httpx.post(f"http://127.0.0.1:{started.port}/api/block", content=README_BLOCK,
                       headers={"Authorization": SHOP}, timeout=5)
    half = subprocess.run([*OUTBOX, "gateway", "--port", "0", "--certfile", str(cert)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert half.returncode == 2
    assert "--keyfile" in half.stderr


def test_database_gone_is_503_naming_the_rule(database_url: str, clean_db: str,
                                              users_file: Path, tmp_path: Path) -> None:
    parts = urlsplit(database_url)
    link = CuttableLink(parts.hostname or "127.0.0.1", parts.port or 5432)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    linked = urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{link.port}"))
    env = env_for(linked, OUTBOX_GATEWAY_USERS=str(users_file))
    try:
        with gateway(env, tmp_path) as started, started.client() as client:
            assert post(client, "/api/block", README_BLOCK).json()["response_code"] == "0000"
            link.close()  # connections cut, new ones refused
            body = fresh(README_SEND_SMS)
            reply = post(client, "/api/sms", body)
            assert reply.status_code == 503
            assert reply.json()["rule"] == "database_unavailable"
            assert client.get("/readyz").status_code == 503
            assert client.get("/livez").status_code == 200
    finally:
        link.close()


def test_sigterm_finishes_what_is_in_flight_and_every_0000_is_a_row(
        clean_db: str, users_file: Path, tmp_path: Path, conn: psycopg.Connection[Any]) -> None:
    env = env_for(clean_db, OUTBOX_GATEWAY_USERS=str(users_file))
    accepted: list[str] = []
    stop = time.monotonic() + 30

    def client_loop(lane: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for n in range(10_000):
                key = f"{lane}-{n}"
                try:
                    reply = post(http, "/api/sms", json.dumps({"command": "send-sms", "data": {
                        "receiver": "+628123456789", "message": "m", "id": key}}))
                except httpx.HTTPError:
                    return  # the gateway closed: no answer, no promise
                if reply.status_code == 200 and reply.json().get("response_code") == "0000":
                    accepted.append(key)
                if time.monotonic() > stop:
                    return

    with gateway(env, tmp_path) as started, ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(client_loop, lane, started.url) for lane in range(8)]
        assert wait_until(lambda: len(accepted) >= 100, timeout=30)
        started.process.send_signal(signal.SIGTERM)
        assert started.process.wait(timeout=60) == 0
        for future in futures:
            future.result()
    stored = {row[0] for row in conn.execute("SELECT data->>'id' FROM outbox.message")}
    assert set(accepted) <= stored
