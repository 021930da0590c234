from __future__ import annotations

import re
from pathlib import Path

import pytest

from outbox.errors import ConfigurationError
from outbox.settings import Settings, mask_url

OLD_1 = "872737ae8121bc1b984efcbd5f7931d3822326351a30518a018c4c502b95c533"
OLD_2 = "893a3cfd3912a125b2419774d2752a3bb8cc175927cd5b421336e4f028607452"


def test_defaults_are_the_embedded_database_and_stdout() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert dict(settings.transports) == {"default": "stdout://"}


def test_environment_names_transports_and_routes() -> None:
    settings = Settings.from_env({
        "DATABASE_URL": "postgresql://app@db/app",
        "OUTBOX_TRANSPORT": "http://u:p@device:8899/api/otp",
        "OUTBOX_TRANSPORT_SMS": "amqp://guest:guest@rabbit:5672/%2F?topic=sms",
        "OUTBOX_ROUTE_SEND_SMS": "sms",
        "OUTBOX_BATCH_SIZE": "500",
        "OUTBOX_POLL_INTERVAL": "250ms",
        "OUTBOX_SENT_RETENTION": "2d",
        "OUTBOX_BLANK_TERMINAL_TEXTS": "yes",
        "OUTBOX_OTP_PREVIOUS_SECRETS": f"{OLD_1},{OLD_2}",
        "OUTBOX_TEST_AMQP_URL": "ignored: belongs to the test suite",
        "PATH": "/bin",
    })
    assert settings.database_url == "postgresql://app@db/app"
    assert set(settings.transports) == {"default", "sms"}
    assert settings.route_for("send-sms", None) == ("sms",)
    assert settings.route_for("send-email", None) == ("default",)
    assert settings.route_for("send-sms", "default") == ("default",)
    assert settings.batch_size == 500
    assert settings.poll_interval == 0.25
    assert settings.sent_retention == 2 * 86400
    assert settings.blank_terminal_texts is True
    assert settings.otp_previous_secrets == (OLD_1, OLD_2)
    assert Settings.from_env({"OUTBOX_OTP_TTL": "5m"}).otp_ttl == 300


def test_toml_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    path.write_text('batch_size = 50\nworkers = 3\n[transports]\ndefault = "stdout://"\n'
                    'rest = "http://device:8899/api/otp"\n[routes]\n"create-otp" = "rest"\n')
    settings = Settings.from_env({"OUTBOX_CONFIG": str(path), "OUTBOX_WORKERS": "2"})
    assert (settings.batch_size, settings.workers) == (50, 2)
    assert settings.route_for("create-otp", None) == ("rest",)


@pytest.mark.parametrize(("env", "message"), [
    ({"OUTBOX_BATCH_SIZ": "5"}, "unknown setting 'batch_siz'"),
    ({"OUTBOX_BATCH_SIZE": "lots"}, "setting batch_size: 'lots' is not a valid int"),
    ({"OUTBOX_BATCH_SIZE": "0"}, "batch_size must be at least 1"),
    ({"OUTBOX_ROUTE_SEND_SMS": "sms"}, "route send-sms -> 'sms' names no configured transport"),
    ({"OUTBOX_ROUTE_SEND_FAX": "default"}, "route for unknown command 'send-fax'"),
    ({"OUTBOX_TRANSPORT": "not a url"}, "not a URL"),
    ({"OUTBOX_LOG_FORMAT": "xml"}, "log_format must be auto, json or console"),
    ({"OUTBOX_BLANK_TERMINAL_TEXTS": "perhaps"}, "not a valid bool"),
    ({"OUTBOX_CONFIG": "/nonexistent/outbox.toml"}, "does not exist"),
])
def test_every_mistake_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Settings.from_env(env)


def test_a_broken_toml_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("batch_size = = 3")
    with pytest.raises(ConfigurationError, match=r"bad\.toml"):
        Settings.from_env({}, config_file=str(path))


def test_masked_settings_show_no_secret() -> None:
    settings = Settings.from_env({
        "DATABASE_URL": "postgresql://app:db-pass@db/app",
        "OUTBOX_TRANSPORT": "mqtt://relay:mq-pass@broker:1883?topic=sms&password=q-pass",
        "OUTBOX_OTP_SECRET": "cde0fb0dec1400c54a0f7e7eafa73624c53e4da258bbd34b3380a0defeba95c1",
        "OUTBOX_OTP_PREVIOUS_SECRETS": OLD_1,
    })
    shown = repr(settings.masked())
    for secret in ("db-pass", "mq-pass", "q-pass", "cde0fb0dec1400c5", "872737ae8121bc1b"):
        assert secret not in shown
    assert "relay:***@broker:1883" in shown


def test_mask_url_keeps_what_helps() -> None:
    assert mask_url("amqp://guest:guest@localhost:5672/%2F?topic=sms") == \
        "amqp://guest:***@localhost:5672/%2F?topic=sms"
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert mask_url("ws://user@relay/ws?topic=a") == "ws://user@relay/ws?topic=a"


# --- failover pools and fan-out -----------------------------------------------------------

POOL_ENV = {"OUTBOX_TRANSPORT": "stdout://", "OUTBOX_TRANSPORT_A": "stdout://",
            "OUTBOX_TRANSPORT_B": "stdout://", "OUTBOX_TRANSPORT_C": "stdout://"}


@pytest.mark.parametrize(("route", "targets"), [
    ("a", ("a",)),
    ("a+b", ("a", "b")),
    ("a|b", ("a|b",)),
    (" a | b | c ", ("a|b|c",)),
    ("a|b+c", ("a|b", "c")),
    ("c+a|b", ("c", "a|b")),
])
def test_pipe_is_a_pool_and_binds_tighter_than_plus(route: str, targets: tuple[str, ...]) -> None:
    settings = Settings.from_env({**POOL_ENV, "OUTBOX_ROUTE_SEND_SMS": route})
    assert settings.route_for("send-sms", None) == targets


@pytest.mark.parametrize(("route", "message"), [
    ("a|a", "route 'a|a' names 'a' twice"),
    ("a|b+a", "names 'a' twice"),
    ("a|x", "route send-sms -> 'x' names no configured transport"),
    ("|", "empty route"),
])
def test_bad_pools_are_refused_by_name(route: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Settings.from_env({**POOL_ENV, "OUTBOX_ROUTE_SEND_SMS": route})


def test_pool_members_must_agree_on_dialect_and_otp_mode() -> None:
    with pytest.raises(ConfigurationError, match=r"pool 'a\|b': its members differ in dialect"):
        Settings.from_env({**POOL_ENV, "OUTBOX_TRANSPORT_B": "stdout://?dialect=readme",
                           "OUTBOX_ROUTE_SEND_SMS": "a|b"})


def test_a_pool_of_devices_cannot_keep_device_mode_otps() -> None:
    env = {**POOL_ENV, "OUTBOX_TRANSPORT_A": "http://u:p@10.0.0.1:8899/api/otp",
           "OUTBOX_TRANSPORT_B": "http://u:p@10.0.0.2:8899/api/otp"}
    Settings.from_env({**env, "OUTBOX_ROUTE_SEND_SMS": "a|b"})  # SMS: fine
    with pytest.raises(ConfigurationError, match="otp=device"):
        Settings.from_env({**env, "OUTBOX_ROUTE_CREATE_OTP": "a|b"})
    managed = {**env, "OUTBOX_TRANSPORT_A": env["OUTBOX_TRANSPORT_A"] + "?otp=managed",
               "OUTBOX_TRANSPORT_B": env["OUTBOX_TRANSPORT_B"] + "?otp=managed"}
    Settings.from_env({**managed, "OUTBOX_ROUTE_CREATE_OTP": "a|b"})


def test_transport_names_cannot_hold_route_operators(tmp_path: Path) -> None:
    path = tmp_path / "outbox.toml"
    path.write_text('[transports]\ndefault = "stdout://"\n"a|b" = "stdout://"\n')
    with pytest.raises(ConfigurationError, match="must not be empty nor contain"):
        Settings.from_env({"OUTBOX_CONFIG": str(path)})


# --- rate limits and receiver limits ------------------------------------------------------


@pytest.mark.parametrize(("query", "message"), [
    ("rate=fast", "'fast' is not a rate"),
    ("rate=10/m&burst=0", "burst '0' must be a whole number"),
    ("burst=3", "burst needs a rate"),
])
def test_bad_rates_on_a_transport_url_are_refused(query: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Settings.from_env({"OUTBOX_TRANSPORT": f"stdout://?{query}"})


def test_receiver_limits_per_command() -> None:
    settings = Settings.from_env({"OUTBOX_RECEIVER_LIMIT": "3/10m",
                                  "OUTBOX_RECEIVER_LIMIT_SEND_EMAIL": "off",
                                  "OUTBOX_RECEIVER_LIMIT_CREATE_OTP": "5/10m"})
    assert str(settings.receiver_limit_for("send-sms")) == "3/10m"
    assert settings.receiver_limit_for("send-email") is None
    assert str(settings.receiver_limit_for("create-otp")) == "5/10m"
    assert settings.receiver_limit_for("block-msisdn") is None


@pytest.mark.parametrize(("env", "message"), [
    ({"OUTBOX_RECEIVER_LIMIT": "lots"}, "receiver limit for send-sms: 'lots' is not a rate"),
    ({"OUTBOX_RECEIVER_LIMIT_BLOCK_MSISDN": "1/m"}, "block/unblock never are"),
])
def test_bad_receiver_limits_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Settings.from_env(env)


def test_gateway_settings_from_the_environment() -> None:
    settings = Settings.from_env({"OUTBOX_GATEWAY_USERS": "/etc/outbox/users",
                                  "OUTBOX_GATEWAY_POOL_SIZE": "4",
                                  "OUTBOX_GATEWAY_AUTH_CACHE_TTL": "1m",
                                  "OUTBOX_GATEWAY_WORKER": "{}"})  # internal, not a setting
    assert settings.gateway_users == "/etc/outbox/users"
    assert settings.gateway_pool_size == 4
    assert settings.gateway_auth_cache_ttl == 60.0
    assert Settings.from_env({}).gateway_users is None
    with pytest.raises(ConfigurationError, match="gateway_pool_size"):
        Settings.from_env({"OUTBOX_GATEWAY_POOL_SIZE": "0"})
    with pytest.raises(ConfigurationError, match="gateway_auth_cache_ttl"):
        Settings.from_env({"OUTBOX_GATEWAY_AUTH_CACHE_TTL": "-1"})
