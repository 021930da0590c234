"""Small pieces of the operator tooling: terminal output, scrubbing and redaction of free
text, route labels, settings validation, liveness and the readiness cache."""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request
from typing import Any

import pytest

from outbox import console, health, housekeeping, logs
from outbox.admin import commands_routed_to, effective_route
from outbox.errors import ConfigurationError, PermanentPublishError, TransientPublishError
from outbox.settings import Settings, mask_url, parse_duration
from outbox.testing import MemoryTransport

SECRET_1 = "872737ae8121bc1b984efcbd5f7931d3822326351a30518a018c4c502b95c533"
SECRET_2 = "893a3cfd3912a125b2419774d2752a3bb8cc175927cd5b421336e4f028607452"


# --- console -------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "shown"), [
    (None, "-"), (-3, "0.0s"), (4.25, "4.2s"), (60, "1m"), (75, "1m15s"), (3600, "1h"),
    (5400, "1h30m"), (86400 * 7, "7d"), (90061, "1d1h")])
def test_ages_read_like_a_person_writes_them(seconds: float | None, shown: str) -> None:
    assert console.age(seconds) == shown


def test_tables_pad_columns_and_align_numbers_right() -> None:
    assert console.table(["route", "pending"], [["default", "7"], ["sms", "1,234"]],
                         right=[1]).splitlines() == ["route    pending",
                                                     "default        7",
                                                     "sms        1,234"]


def test_progress_is_silent_off_a_terminal_and_redrawn_on_one() -> None:
    quiet = io.StringIO()
    progress = console.Progress("purging", stream=quiet)  # StringIO is no terminal
    progress(10)
    progress.finish()
    assert quiet.getvalue() == ""

    shown = io.StringIO()
    progress = console.Progress("retrying", 200, stream=shown, force=True)
    progress(50)
    progress(60)  # within a tenth of a second: not redrawn
    progress(200)  # the last one always is
    progress.finish()
    assert shown.getvalue() == ("\r\x1b[2Kretrying: 50 of 200 (25%)"
                                "\r\x1b[2Kretrying: 200 of 200 (100%)\r\x1b[2K")


# --- logs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "scrubbed"), [
    ("device refused +6281234567890: blocked", "device refused ***90: blocked"),
    ("no mailbox ann.smith@example.co.id here", "no mailbox ***id here"),
    ("receiver 081234567.", "receiver ***67."),
    ("at 2026-11-27T05:55:35.356214Z from 127.0.0.1:36898", None),
    ("HTTP 503 after 10.5s, v1.2.3, port 8899", None),
])
def test_free_text_loses_receivers_but_keeps_times_addresses_and_numbers(
        text: str, scrubbed: str | None) -> None:
    assert logs.scrub_text(text) == (text if scrubbed is None else scrubbed)


def test_redact_removes_the_rows_own_texts_and_codes_from_a_reason() -> None:
    wire = json.dumps({"command": "send-sms", "data": {
        "receiver": "+6281234567890", "message": "Your code is 4711 0815"}}).encode()
    reason = ("device refused 'Your code is 4711 0815' for +6281234567890; partial quote: "
              "code 4711, attempt 3")
    redacted = logs.redact(reason, {"receiver": "+6281234567890", "message": "Your code %s"},
                           wire)
    assert redacted == ("device refused '***' for ***90; partial quote: code ***, attempt 3")
    assert logs.redact("nothing to hide", None, b"not json") == "nothing to hide"


def test_a_traceback_is_scrubbed_too() -> None:
    stream = io.StringIO()
    logs.configure(level="debug", fmt="json", stream=stream)
    try:
        try:
            raise RuntimeError("cannot deliver to +6281234567890")
        except RuntimeError:
            logs.get_logger("test").exception("transport.unexpected_error")
    finally:
        logs.configure(level="debug", fmt="json")
    line = json.loads(stream.getvalue())
    assert "Traceback" in line["exception"]
    assert "6281234567890" not in stream.getvalue()
    assert "***90" in line["exception"]


# --- routes and labels ---------------------------------------------------------------------

SETTINGS = Settings(transports={"default": "memory://", "sms": "memory://"},
                    routes={"send-sms": "sms", "block-msisdn": "sms+default"})


def test_effective_routes_resolve_a_missing_route_to_the_commands_one() -> None:
    assert effective_route(SETTINGS, "send-sms", None) == "sms"
    assert effective_route(SETTINGS, "send-sms", "default") == "default"
    assert effective_route(SETTINGS, "send-email", None) == "default"
    assert effective_route(SETTINGS, "block-msisdn", None) == "sms+default"
    assert effective_route(SETTINGS, "send-sms", "+") == "+"  # nonsense, shown as it is
    assert commands_routed_to(SETTINGS, "default") == ["send-email", "unblock-msisdn",
                                                       "create-otp"]


def test_metric_route_labels_come_from_a_closed_set() -> None:
    assert housekeeping.route_labels(SETTINGS) == {"sms", "default", "sms+default",
                                                   "unroutable"}
    assert housekeeping.route_label(SETTINGS, "sms") == "sms"
    assert housekeeping.route_label(SETTINGS, "default+sms") == "default+sms"
    assert housekeeping.route_label(SETTINGS, "+6281234567890") == "unroutable"
    assert housekeeping.route_label(SETTINGS, "+") == "unroutable"


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "message"), [
    ({"OUTBOX_BACKOF_MAX": "5"}, "unknown setting 'backof_max' (from OUTBOX_BACKOF_MAX; did "
                                 "you mean OUTBOX_BACKOFF_MAX?)"),
    ({"OUTBOX_FROBNICATE": "1"}, "unknown setting 'frobnicate' (from OUTBOX_FROBNICATE)"),
    ({"DATABASE_URL": "mysql://root:pw@db/app"},
     "DATABASE_URL is a mysql:// URL, not a PostgreSQL one"),
    ({"DATABASE_URL": "db.example.com"}, "DATABASE_URL: not a URL"),
    ({"OUTBOX_TRANSPORT": "stdout://?dialect=klingon"}, "unknown dialect 'klingon'"),
    ({"OUTBOX_TRANSPORT": "stdout://?otp=maybe"}, "unknown otp mode 'maybe'"),
    ({"OUTBOX_TRANSPORT": "fax://office"}, "unknown scheme 'fax'"),
    ({"OUTBOX_TRANSPORT_SMS": "stdout://"}, "send-email, block-msisdn, unblock-msisdn, "
                                            "create-otp go to the 'default' transport"),
    ({"OUTBOX_METRICS_PORT": "-1"}, "metrics_port -1 is not a TCP port"),
    ({"OUTBOX_METRICS_HOST": ""}, "metrics_host must name an address"),
    ({"OUTBOX_FAILED_RETENTION": "0s"}, "failed_retention must be a positive duration"),
    ({"OUTBOX_PURGE_INTERVAL": "-1"}, "purge_interval must be a duration, or 0"),
    ({"OUTBOX_LOG_LEVEL": "chatty"}, "log_level must be debug, info, warning, error or"),
])
def test_each_mistake_has_its_own_message(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Settings.from_env(env)


def test_unknown_keys_in_the_file_name_the_file(tmp_path: Any) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("purge-interval = '5m'\nmetric_port = 9100\n")
    with pytest.raises(ConfigurationError, match=re.escape(
            f"unknown setting 'metric_port' (in {path}; did you mean metrics_port?)")):
        Settings.from_env({}, config_file=str(path))


def test_operations_settings_parse_and_a_zero_purge_interval_is_allowed() -> None:
    settings = Settings.from_env({"OUTBOX_PURGE_INTERVAL": "0", "OUTBOX_METRICS_PORT": "0",
                                  "OUTBOX_FAILED_RETENTION": "90d"})
    assert (settings.purge_interval, settings.metrics_port) == (0.0, 0)
    assert settings.failed_retention == 90 * 86400


def test_durations_on_the_command_line() -> None:
    assert parse_duration("90") == 90 and parse_duration("2h") == 7200
    for bad in ("soon", "-5m", "nan", "inf"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)


def test_every_secret_looking_thing_is_masked() -> None:
    assert mask_url("stdout://") == "stdout://"
    assert mask_url("amqp://u:p@h/%2F?topic=sms&api_key=k&sslpassword=s") == \
        "amqp://u:***@h/%2F?topic=sms&api_key=***&sslpassword=***"
    shown = Settings(otp_secret="cde0fb0dec1400c54a0f7e7eafa73624c53e4da258bbd34b3380a0defeba95c1",
                     otp_previous_secrets=(SECRET_1, SECRET_2)).masked()
    assert shown["otp_secret"] == "********"
    assert shown["otp_previous_secrets"] == ["********", "********"]


# --- health --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_liveness_follows_the_last_turn() -> None:
    clock = Clock()
    last = {"turn": 990.0}
    liveness = health.Liveness(lambda: last["turn"], window=30.0, clock=clock)
    assert liveness.result().ok
    clock.now = 1021.0
    assert not liveness.result().ok
    assert liveness.result().detail == "last turn 31.0s ago (limit 30s)"
    assert health.liveness_window(Settings(poll_interval=1.0, publish_timeout=10.0)) == 30.0


class CountingTransport(MemoryTransport):
    def __init__(self, name: str, error: Exception | None = None) -> None:
        super().__init__(name)
        self.error = error
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        if self.error is not None:
            raise self.error


def test_readiness_is_cached_and_names_each_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    good = CountingTransport("default")
    bad = CountingTransport("device", TransientPublishError("device: cannot reach "
                                                           "+6281234567890"))
    readiness = health.Readiness(Settings(), "postgresql://unused/db",
                                 transports_factory=lambda s: {"default": good, "device": bad},
                                 cache_seconds=2.0, clock=clock)
    monkeypatch.setattr(readiness, "_database",
                        lambda: health.CheckResult("database", True, "reachable"))
    first = readiness.results()
    assert [(r.name, r.ok) for r in first] == [("database", True), ("transport default", True),
                                               ("transport device", False)]
    assert first[2].detail == "device: cannot reach ***90"
    assert first[2].exit_code == 3
    readiness.results()
    assert good.checks == 1  # cached
    clock.now += 2.5
    readiness.results()
    assert good.checks == 2
    readiness.close()
    assert good.closed and bad.closed


def test_a_refused_credential_is_a_configuration_problem() -> None:
    result = health.check_transport(CountingTransport("pi", PermanentPublishError("401")))
    assert (result.ok, result.exit_code) == (False, 2)


def test_the_http_server_answers_on_its_three_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    readiness = health.Readiness(Settings(), "postgresql://unused/db",
                                 transports_factory=lambda s: {})
    monkeypatch.setattr(readiness, "_database", lambda: health.CheckResult(
        "database", False, "cannot connect", 3))
    server = health.HealthServer("127.0.0.1", 0, readiness=readiness,
                                 liveness=health.Liveness(lambda: 0.0, 1e12))
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            assert b"outbox_build_info" in response.read()
            assert response.headers["Content-Type"].startswith("text/plain")
        with urllib.request.urlopen(f"{base}/livez", timeout=5) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
        with refused.value as error:
            assert error.code == 503
            assert error.read() == b"[-]database failed: cannot connect\nnot ok\n"
    finally:
        server.stop()
