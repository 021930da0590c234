"""Passwords never printed, whatever characters they hold: every transport scheme and
``DATABASE_URL``, through ``outbox config``, ``outbox check -v`` and ``outbox run -v``.

Each password is ``Lk9<c>Qz7`` for every ``c`` of ``# / ? @ : %``, written raw (which the
URL grammar does not allow: refused in one line, or masked), and ``Lk9#/?@:%Qz7``
percent-encoded (accepted and masked). Neither half of it, nor its encoded form, may appear in any output. The
transports point at the real brokers on loopback (which refuse the made-up credentials), at
an HTTP server answering 401 for REST and WebSocket, and the TLS schemes at plain ports.
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

OUTBOX = [sys.executable, "-m", "outbox"]
CHARS = "#/?@:%"
LEFT, RIGHT = "Lk9", "Qz7"
PARALLEL = 3


class _Refuse401(http.server.BaseHTTPRequestHandler):
    def _refuse(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_OPTIONS = _refuse

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def refusing_http() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse401)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def transport_urls(password: str, http_port: int) -> dict[str, str]:
    """One URL per scheme, with ``password`` written into it as given."""
    return {
        "http": f"http://otp:{password}@127.0.0.1:{http_port}/api/otp",
        "https": f"https://otp:{password}@127.0.0.1:{http_port}/api/otp",
        "amqp": f"amqp://relay:{password}@127.0.0.1:5672/%2F?topic=sms",
        "amqps": f"amqps://relay:{password}@127.0.0.1:5672/%2F?topic=sms",
        "redis": f"redis://relay:{password}@127.0.0.1:6379/0?topic=sms",
        "rediss": f"rediss://relay:{password}@127.0.0.1:6379/0?topic=sms",
        "mqtt": f"mqtt://relay:{password}@127.0.0.1:1883?topic=sms",
        "mqtts": f"mqtts://relay:{password}@127.0.0.1:1883?topic=sms",
        "ws": f"ws://relay:{password}@127.0.0.1:{http_port}/ws?topic=sms",
        "wss": f"wss://relay:{password}@127.0.0.1:{http_port}/ws?topic=sms",
    }


def base_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("OUTBOX_") and key != "DATABASE_URL"}
    env.update(OUTBOX_LOG_FORMAT="json", OUTBOX_PUBLISH_TIMEOUT="2", **extra)
    return env


def run_cli(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Exit code and everything printed. A relay that started is stopped with SIGTERM."""
    if args[0] != "run":
        done = subprocess.run([*OUTBOX, *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        return done.returncode, done.stdout + done.stderr
    lines: list[str] = []
    with subprocess.Popen([*OUTBOX, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        hung = threading.Timer(120, process.kill)  # a hang ends as exit -9, failing the test
        hung.start()
        try:
            for line in process.stdout:
                lines.append(line)
                if "relay.started" in line:
                    process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
        finally:
            hung.cancel()
    return code, "".join(lines)


def assert_hidden(password: str, code: int, output: str, what: str) -> None:
    assert code in (0, 1, 2, 3), f"{what}: exit {code}\n{output}"
    for piece in (LEFT, RIGHT, quote(password, safe="")):
        assert piece not in output, f"{what}: printed part of the password\n{output}"
    assert "Traceback" not in output or "-v" in what, f"{what}: a traceback\n{output}"
    errors = [line for line in output.splitlines() if line.startswith("outbox: error:")]
    assert len(errors) <= 1, f"{what}: more than one error line\n{output}"


def cases(http_port: int, database_url: str) -> list[tuple[str, str, dict[str, str]]]:
    """Each character raw, in a password of its own; all six in one password, encoded."""
    found = []
    every = LEFT + CHARS + RIGHT
    written_forms = [(LEFT + char + RIGHT, LEFT + char + RIGHT) for char in CHARS]
    written_forms.append((quote(every, safe=""), every))
    for written, password in written_forms:
        for scheme, url in transport_urls(written, http_port).items():
            found.append((f"{scheme} {written}", password,
                          base_env(DATABASE_URL=database_url, OUTBOX_TRANSPORT=url)))
        base, _, name = database_url.rpartition("/")
        host = base.rpartition("@")[2]
        found.append((f"DATABASE_URL {written}", password, base_env(
            DATABASE_URL=f"postgresql://postgres:{written}@{host}/{name}")))
        found.append((f"DATABASE_URL unreachable {written}", password, base_env(
            DATABASE_URL=f"postgresql://postgres:{written}@127.0.0.1:1/{name}")))
    return found


@pytest.mark.parametrize("command", [["config"], ["check", "-v"], ["run", "-v"]],
                         ids=["config", "check -v", "run -v"])
def test_no_password_in_any_output(command: list[str], refusing_http: int,
                                   clean_db: str) -> None:
    found = cases(refusing_http, clean_db)

    def one(case: tuple[str, str, dict[str, str]]) -> tuple[str, str, int, str]:
        name, password, env = case
        code, output = run_cli(command, env)
        return name, password, code, output

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(one, found))
    for name, password, code, output in results:
        assert_hidden(password, code, output, f"{' '.join(command)} with {name}")


def test_a_raw_reserved_character_is_refused_in_one_line_naming_the_fix() -> None:
    env = base_env(DATABASE_URL="postgresql://postgres@127.0.0.1:1/x",
                   OUTBOX_TRANSPORT=f"amqp://relay:{LEFT}#{RIGHT}@127.0.0.1:5672/%2F?topic=sms")
    code, output = run_cli(["config"], env)
    assert code == 2
    [line] = output.strip().splitlines()
    assert line.startswith("outbox: error: transport 'default': the URL ")
    assert "%23" in line and "percent-encode" in line


def test_a_percent_encoded_password_is_accepted_and_masked() -> None:
    encoded = quote(f"{LEFT}#/?@:%{RIGHT}", safe="")
    env = base_env(DATABASE_URL=f"postgresql://postgres:{encoded}@127.0.0.1:1/x",
                   OUTBOX_TRANSPORT=f"amqp://relay:{encoded}@127.0.0.1:5672/%2F?topic=sms")
    code, output = run_cli(["config"], env)
    assert code == 0, output
    assert "amqp://relay:***@127.0.0.1:5672/%2F?topic=sms" in output
    assert "postgresql://postgres:***@127.0.0.1:1/x" in output
