"""`outbox ws-relay` with users, topic rights and TLS: each refusal against the real server
(the CLI in a subprocess, real websockets clients on loopback)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from outbox.errors import PermanentPublishError
from outbox.transports.base import Envelope
from outbox.wsrelay import Rights, parse_rights
from tests.support.websocket import (
    PATH,
    basic_auth,
    free_port,
    nothing_more,
    open_transport,
    receive,
    relay_url,
)

pytestmark = pytest.mark.integration

OUTBOX = [sys.executable, "-m", "outbox"]
DEVICE_PASSWORD = "device pass: #/?@%"  # every character a URL would need encoded
PUBLISHER_PASSWORD = "relay-Pw-14"


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("OUTBOX_") and key != "DATABASE_URL"}
    env.update(OUTBOX_LOG_FORMAT="json", **extra)
    return env


def outbox(*args: str, stdin: str = "", env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OUTBOX, *args], input=stdin, env=env or clean_env(),
                          capture_output=True, text=True, timeout=60, check=False)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox: error: ") and "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wsrelay") / "users"
    for user, password, rights in (("device", DEVICE_PASSWORD, ["--subscribe", "sms"]),
                                   ("device2", DEVICE_PASSWORD, ["--subscribe", "sms,mail"]),
                                   ("relay", PUBLISHER_PASSWORD, ["--publish", "sms"])):
        added = outbox("ws-relay", "passwd", user, "--users", str(path), *rights,
                       stdin=password + "\n")
        assert added.returncode == 0, added.stderr
        assert password not in added.stdout + added.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text()
    assert DEVICE_PASSWORD not in text and PUBLISHER_PASSWORD not in text
    assert "$argon2id$" in text
    return path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def start_relay(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    process = subprocess.Popen([*OUTBOX, "ws-relay", "--port", str(port), *args],
                               env=env or clean_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if json.loads(line).get("event") == "ws.relay_listening":
            return process, port
    raise AssertionError(f"ws-relay did not start: {process.communicate()[1]}")


def stop_relay(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
    process.communicate()


@pytest.fixture(scope="module")
def running(users_file: Path) -> Iterator[int]:
    process, port = start_relay("--users", str(users_file))
    try:
        yield port
    finally:
        stop_relay(process)


# --- refusals at start ---------------------------------------------------------------------


def test_without_users_it_refuses_to_start(tmp_path: Path) -> None:
    result = outbox("ws-relay", "--port", str(free_port()))
    assert result.returncode == 2
    assert "--insecure-no-auth" in one_error_line(result)


@pytest.mark.parametrize("setup", ["missing", "empty", "bad rights"])
def test_an_unusable_users_file_is_refused(tmp_path: Path, setup: str) -> None:
    path = tmp_path / "users"
    if setup == "empty":
        path.write_text("# nobody yet\n")
    elif setup == "bad rights":
        path.write_text("someone:$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaA:write=sms\n")
    result = outbox("ws-relay", "--port", str(free_port()), "--users", str(path))
    assert result.returncode == 2
    one_error_line(result)


def test_a_password_never_comes_from_the_command_line_or_the_old_variable(
        tmp_path: Path) -> None:
    refused = outbox("ws-relay", "--user", "u", "--password", "p", "--insecure-no-auth")
    assert refused.returncode == 2  # argparse: no such options
    old = outbox("ws-relay", "--insecure-no-auth", "--port", str(free_port()),
                 env=clean_env(OUTBOX_WS_RELAY_PASSWORD="p"))
    assert old.returncode == 2
    assert "users file" in one_error_line(old)
    empty = outbox("ws-relay", "passwd", "someone", "--users", str(tmp_path / "u"),
                   "--publish", "sms", stdin="")
    assert empty.returncode == 2
    assert "no password" in one_error_line(empty)
    no_rights = outbox("ws-relay", "passwd", "someone", "--users", str(tmp_path / "u"),
                       stdin="pw\n")
    assert no_rights.returncode == 2
    assert "--publish" in one_error_line(no_rights)


@pytest.mark.parametrize("files", ["keyfile only", "not a certificate", "missing"])
def test_tls_files_that_cannot_be_used_are_refused(tmp_path: Path, users_file: Path,
                                                   files: str) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    args = {"keyfile only": ["--keyfile", str(junk)],
            "not a certificate": ["--certfile", str(junk)],
            "missing": ["--certfile", str(tmp_path / "nope.pem")]}[files]
    result = outbox("ws-relay", "--port", str(free_port()), "--users", str(users_file), *args)
    assert result.returncode == 2
    one_error_line(result)


# --- refusals by the running server -------------------------------------------------------


def status_of(port: int, topic: str, headers: dict[str, str]) -> int:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{port}{PATH}?topic={topic}", additional_headers=headers,
                open_timeout=10)
    return refused.value.response.status_code


def test_anonymous_and_wrong_credentials_get_401(running: int) -> None:
    assert status_of(running, "sms", {}) == 401
    assert status_of(running, "sms", basic_auth("device", "wrong")) == 401
    assert status_of(running, "sms", basic_auth("nobody", DEVICE_PASSWORD)) == 401


def test_a_topic_without_the_right_gets_403(running: int) -> None:
    publisher = {"X-Outbox-Role": "publisher"}
    assert status_of(running, "mail", basic_auth("device", DEVICE_PASSWORD)) == 403
    assert status_of(running, "sms", {**basic_auth("device", DEVICE_PASSWORD), **publisher}) == 403
    assert status_of(running, "sms", basic_auth("relay", PUBLISHER_PASSWORD)) == 403  # no sub
    assert status_of(running, "mail",
                     {**basic_auth("relay", PUBLISHER_PASSWORD), **publisher}) == 403


def test_a_listener_without_the_publish_right_is_cut_off_and_its_frame_goes_nowhere(
        running: int) -> None:
    url = f"ws://127.0.0.1:{running}{PATH}?topic=sms"
    with connect(url, additional_headers=basic_auth("device2", DEVICE_PASSWORD),
                 open_timeout=10) as other, \
            connect(url, additional_headers=basic_auth("device", DEVICE_PASSWORD),
                    open_timeout=10) as sender:
        sender.send('{"command":"block-msisdn","data":{"receiver":"+6281234567"}}')
        with pytest.raises(ConnectionClosed) as closed:
            sender.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert nothing_more(other, wait=0.3)


def test_the_outbox_transport_publishes_with_its_right(running: int) -> None:
    transport = open_transport(relay_url(running, "sms", user="relay",
                                         password=PUBLISHER_PASSWORD))
    url = f"ws://127.0.0.1:{running}{PATH}?topic=sms"
    try:
        with connect(url, additional_headers=basic_auth("device", DEVICE_PASSWORD),
                     open_timeout=10) as listener:
            deadline = time.monotonic() + 10
            failures = transport.publish([Envelope(1, "send-sms", b'{"command":"send-sms"}')])
            while failures and time.monotonic() < deadline:  # the listener count may lag
                time.sleep(0.1)
                failures = transport.publish([Envelope(1, "send-sms", b'{"command":"send-sms"}')])
            assert failures == {}
            assert receive(listener, 1) == [b'{"command":"send-sms"}']
        refused = open_transport(relay_url(running, "mail", user="relay",
                                           password=PUBLISHER_PASSWORD))
        try:
            with pytest.raises(PermanentPublishError, match="403"):
                refused.publish([Envelope(2, "send-sms", b"{}")])
        finally:
            refused.close()
    finally:
        transport.close()


def test_wss_with_a_certificate(users_file: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    process, port = start_relay("--users", str(users_file), "--certfile", str(cert),
                                "--keyfile", str(key))
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        url = f"wss://127.0.0.1:{port}{PATH}?topic=sms"
        with connect(url, ssl=trusted, additional_headers=basic_auth("device", DEVICE_PASSWORD),
                     open_timeout=10) as client:
            client.ping().wait(10)
        with pytest.raises(ssl.SSLError):  # a client that does not trust it is refused
            connect(url, additional_headers=basic_auth("device", DEVICE_PASSWORD),
                    open_timeout=10)
    finally:
        stop_relay(process)


def test_rights_parse_and_render() -> None:
    rights = parse_rights("pub=sms, mail;sub=*")
    assert rights == Rights(frozenset({"sms", "mail"}), frozenset({"*"}))
    assert rights.may_subscribe("anything") and rights.may_publish("mail")
    assert not rights.may_publish("otp")
    assert parse_rights(rights.render()) == rights
    assert parse_rights(None) == Rights()
