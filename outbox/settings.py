"""Settings, read once into a frozen object.

Sources, later ones winning: built-in defaults, an optional TOML file (``OUTBOX_CONFIG`` or
``--config``), then the environment (``DATABASE_URL``, ``OUTBOX_*``). Nothing reads the
environment at import time.

Transports are named URLs. ``OUTBOX_TRANSPORT`` is the one named ``default``;
``OUTBOX_TRANSPORT_<NAME>`` adds more. ``OUTBOX_ROUTE_<COMMAND>`` (for example
``OUTBOX_ROUTE_SEND_SMS=sms``) sends a command to a named transport; commands without a route
go to ``default``. In TOML: a ``[transports]`` table of ``name = "url"`` and a ``[routes]``
table of ``"send-sms" = "sms"``.

A route is a fan-out (``+``) of targets, each a transport name or a failover pool of names
(``|``): ``a|b+c`` sends one copy through the pool ``a|b`` and one through ``c``.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from outbox.commands import COMMANDS, CREATE_OTP, SEND_EMAIL, SEND_SMS
from outbox.errors import ConfigurationError
from outbox.otpkeys import check_secret
from outbox.routes import FAN_OUT, POOL, is_pool, pool_members, route_names
from outbox.routes import ROUTE_OPERATORS as _ROUTE_OPERATORS
from outbox.scheduling import Rate, parse_rate
from outbox.transports import validate_transports
from outbox.urls import check_url, is_secret_name, mask_url

DEFAULT_TRANSPORT = "default"

#: what the schema applies to a row inserted without a priority (migration 0007)
DEFAULT_PRIORITIES: Mapping[str, int] = {
    "create-otp": 0,
    "block-msisdn": 2,
    "unblock-msisdn": 2,
    "send-sms": 5,
    "send-email": 5,
}
#: the commands that reach a person, and so fall under ``OUTBOX_RECEIVER_LIMIT``
PERSONAL_COMMANDS: tuple[str, ...] = (SEND_SMS, SEND_EMAIL, CREATE_OTP)
#: a per-command receiver limit that switches the limit off for that command
NO_LIMIT = frozenset({"off", "none", "0"})


@dataclass(frozen=True, kw_only=True)
class Settings:
    #: None: run on the embedded Postgres kept in ``embedded_dir``.
    database_url: str | None = None
    embedded_dir: str = ".outbox/pgdata"
    transports: Mapping[str, str] = field(default_factory=lambda: {DEFAULT_TRANSPORT: "stdout://"})
    routes: Mapping[str, str] = field(default_factory=dict)

    #: ``3/10m``: at most 3 messages per receiver in any 10 minutes, per command that reaches
    #: a person (send-sms, send-email, create-otp); None: no limit
    receiver_limit: str | None = None
    #: per-command overrides of ``receiver_limit`` (``off`` lifts it for that command)
    receiver_limits: Mapping[str, str] = field(default_factory=dict)
    #: how often a failover pool checks a member that is down (and an idle one that is up)
    pool_probe_interval: float = 5.0

    batch_size: int = 200
    workers: int = 1
    poll_interval: float = 1.0
    publish_timeout: float = 10.0
    #: how long a claimed row stays leased to a relay that stops extending it
    claim_timeout: float = 30.0

    #: default priority per command (0 most urgent .. 9), applied to rows inserted without one
    priorities: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PRIORITIES))
    #: seconds of waiting worth one priority level (aging)
    priority_aging: float = 60.0
    #: rows this urgent or more (create-otp: 0) have a worker of their own in every lane;
    #: -1: no express workers
    express_priority: int = 1

    max_attempts: int = 12
    backoff_base: float = 1.0
    backoff_max: float = 600.0

    otp_ttl: int = 300
    otp_secret: str | None = None
    otp_previous_secrets: tuple[str, ...] = ()
    otp_max_attempts: int = 5
    otp_digits: int = 6

    sent_retention: float = 7 * 86400.0
    failed_retention: float = 30 * 86400.0
    purge_interval: float = 60.0
    blank_terminal_texts: bool = False

    #: users file of ``outbox gateway`` (``user:argon2-hash`` lines)
    gateway_users: str | None = None
    #: database connections each gateway worker keeps
    gateway_pool_size: int = 8
    #: how long the gateway remembers a successful password check
    gateway_auth_cache_ttl: float = 300.0

    #: the users file of ``outbox console`` (``outbox console passwd USER`` writes it)
    console_users: str | None = None

    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_format: str = "auto"
    log_level: str = "info"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, config_file: str | None = None
    ) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = config_file or env.get("OUTBOX_CONFIG")
        if path:
            values.update(_read_toml(path))
        values.update(_read_env(env))
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                raise ConfigurationError(f"unknown setting {key!r}")
            kwargs[key] = _coerce(key, raw, cls.__dataclass_fields__[key].type)
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def with_overrides(self, **changes: Any) -> Settings:
        settings = replace(self, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.transports:
            raise ConfigurationError("no transport configured (set OUTBOX_TRANSPORT)")
        for name, url in self.transports.items():
            check_url(url, f"transport {name!r}")
            if not name or any(char in name for char in _ROUTE_OPERATORS):
                raise ConfigurationError(
                    f"transport name {name!r}: a name must not be empty nor contain "
                    f"{' or '.join(map(repr, _ROUTE_OPERATORS))} (they build routes)")
        self._validate_routes()
        self._validate_secrets()
        self._validate_receiver_limits()
        if self.pool_probe_interval <= 0:
            raise ConfigurationError("pool_probe_interval must be a positive duration (e.g. 5s)")
        for name in ("batch_size", "workers", "max_attempts", "otp_ttl", "otp_max_attempts",
                     "gateway_pool_size"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1")
        if not 4 <= self.otp_digits <= 10:
            raise ConfigurationError("otp_digits must be between 4 and 10")
        if self.poll_interval <= 0 or self.publish_timeout <= 0:
            raise ConfigurationError("poll_interval and publish_timeout must be positive")
        self._validate_claims()
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigurationError("log_format must be auto, json or console")
        self._validate_operations()

    def _validate_claims(self) -> None:
        if not 1.0 <= self.claim_timeout <= 86400.0:
            raise ConfigurationError("claim_timeout must be a duration from 1s to 1d (e.g. 30s)")
        if not -1 <= self.express_priority <= 9:
            raise ConfigurationError("express_priority must be from 0 to 9, or -1 for none")
        if not 0 <= self.priority_aging <= 365 * 86400.0:
            raise ConfigurationError("priority_aging must be a duration (e.g. 60s; 0: no aging)")
        for command, priority in self.priorities.items():
            if command not in COMMANDS:
                raise ConfigurationError(
                    f"priority for unknown command {command!r} (expected one of: {', '.join(COMMANDS)})")
            if not 0 <= priority <= 9:
                raise ConfigurationError(f"priority for {command} must be from 0 (most urgent) to 9")

    def _validate_operations(self) -> None:
        if self.database_url is not None:
            scheme = check_url(self.database_url, "DATABASE_URL").scheme
            if scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
                raise ConfigurationError(
                    f"DATABASE_URL is a {scheme}:// URL, not a PostgreSQL one "
                    "(expected postgresql://user:password@host:5432/database)")
        unrouted = [command for command in COMMANDS
                    if DEFAULT_TRANSPORT in self.route_for(command, None)]
        if unrouted and DEFAULT_TRANSPORT not in self.transports:
            raise ConfigurationError(
                f"{', '.join(unrouted)} go to the {DEFAULT_TRANSPORT!r} transport, which is not "
                "configured (set OUTBOX_TRANSPORT, or route them with OUTBOX_ROUTE_<COMMAND>)")
        # Scheme, dialect, OTP mode and timeout of every transport URL, without connecting.
        validate_transports(self)
        for name in ("sent_retention", "failed_retention"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be a positive duration (e.g. 7d)")
        if self.purge_interval < 0:
            raise ConfigurationError("purge_interval must be a duration, or 0 to leave "
                                     "retention to `outbox purge`")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigurationError(f"metrics_port {self.metrics_port} is not a TCP port "
                                     "(0 to 65535; 0 picks a free one)")
        if self.gateway_auth_cache_ttl < 0:
            raise ConfigurationError("gateway_auth_cache_ttl must be a duration, or 0 to check "
                                     "every request's password in full")
        if not self.metrics_host:
            raise ConfigurationError("metrics_host must name an address to listen on")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigurationError("log_level must be debug, info, warning, error or critical")

    def _validate_routes(self) -> None:
        for command, route in self.routes.items():
            if command not in COMMANDS:
                raise ConfigurationError(
                    f"route for unknown command {command!r} (expected one of: {', '.join(COMMANDS)})"
                )
            for target in route_names(route):
                for name in pool_members(target):
                    if name not in self.transports:
                        raise ConfigurationError(
                            f"route {command} -> {name!r} names no configured transport "
                            f"(configured: {', '.join(sorted(self.transports))})"
                        )

    def _validate_secrets(self) -> None:
        if self.otp_secret:
            check_secret(self.otp_secret)
        for number, previous in enumerate(self.otp_previous_secrets, start=1):
            check_secret(previous, f"OUTBOX_OTP_PREVIOUS_SECRETS (secret {number})")

    def _validate_receiver_limits(self) -> None:
        for command in self.receiver_limits:
            if command not in PERSONAL_COMMANDS:
                raise ConfigurationError(
                    f"receiver limit for {command!r}: only commands that reach a person are "
                    f"limited ({', '.join(PERSONAL_COMMANDS)}); block/unblock never are")
        for command in PERSONAL_COMMANDS:
            self.receiver_limit_for(command)

    def receiver_limit_for(self, command: str) -> Rate | None:
        """The receiver limit of ``command``: its own, else ``receiver_limit``; None: none."""
        if command not in PERSONAL_COMMANDS:
            return None
        text = self.receiver_limits.get(command, self.receiver_limit)
        if text is None or text.strip().lower() in NO_LIMIT or not text.strip():
            return None
        try:
            return parse_rate(text)
        except ValueError as exc:
            raise ConfigurationError(f"receiver limit for {command}: {exc}") from None

    def route_for(self, command: str, row_route: str | None) -> tuple[str, ...]:
        """The targets a row goes to (transport names, or pools like ``a|b``): its own
        ``route``, else the command's, else default."""
        route = row_route or self.routes.get(command) or DEFAULT_TRANSPORT
        return route_names(route)

    def masked(self) -> dict[str, Any]:
        """The effective settings with every secret masked, for ``outbox config``."""
        shown: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "database_url" and value:
                value = mask_url(value)
            elif f.name == "transports":
                value = {name: mask_url(url) for name, url in value.items()}
            elif _is_secret(f.name) and isinstance(value, str) and value:
                value = "********"
            elif _is_secret(f.name) and isinstance(value, tuple):
                value = ["********" for _ in value]
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            shown[f.name] = value
        return shown


_is_secret = is_secret_name


_ENV_PREFIX = "OUTBOX_"
_NOT_SETTINGS = frozenset({"OUTBOX_CONFIG", "OUTBOX_WS_RELAY_PASSWORD", "OUTBOX_WS_RELAY_USERS",
                           # options `outbox gateway` and `outbox console` hand to the
                           # process serving them
                           "OUTBOX_GATEWAY_WORKER", "OUTBOX_CONSOLE_WORKER"})
#: variables with these prefixes belong to tools around outbox (tests, benchmarks)
_NOT_SETTINGS_PREFIXES = ("OUTBOX_TEST_", "OUTBOX_BENCH_")


_SETTING_NAMES = tuple(f.name for f in fields(Settings))


def _check_known(name: str, origin: str, spelled: Any = str) -> None:
    """Refuse a setting that does not exist, suggesting the closest one."""
    if name in _SETTING_NAMES:
        return
    close = difflib.get_close_matches(name, _SETTING_NAMES, n=1)
    hint = f"; did you mean {spelled(close[0])}?" if close else ""
    raise ConfigurationError(f"unknown setting {name!r} ({origin}{hint})")


#: ``OUTBOX_<PREFIX>_<COMMAND>`` variables, read into the mapping setting of that name
_PER_COMMAND = (("route_", "routes"), ("priority_", "priorities"),
                ("receiver_limit_", "receiver_limits"))


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    transports: dict[str, str] = {}
    per_command: dict[str, dict[str, str]] = {setting: {} for _, setting in _PER_COMMAND}
    if env.get("DATABASE_URL"):
        values["database_url"] = env["DATABASE_URL"]
    for key, raw in env.items():
        if (not key.startswith(_ENV_PREFIX) or key in _NOT_SETTINGS
                or key.startswith(_NOT_SETTINGS_PREFIXES)):
            continue
        name = key[len(_ENV_PREFIX):].lower()
        if name == "transport":
            transports[DEFAULT_TRANSPORT] = raw
        elif name.startswith("transport_"):
            transports[name[len("transport_"):]] = raw
        elif (found := _per_command(name)) is not None:
            setting, command = found
            per_command[setting][command] = raw
        else:
            _check_known(name, f"from {key}", lambda known: f"{_ENV_PREFIX}{known.upper()}")
            values[name] = raw
    if transports:
        values["transports"] = transports
    values.update({setting: given for setting, given in per_command.items() if given})
    return values


def _per_command(name: str) -> tuple[str, str] | None:
    """(setting, command) for ``route_send_sms`` and the like; None for other names."""
    if name in _SETTING_NAMES:  # priority_aging, pool_probe_interval, receiver_limit ...
        return None
    for prefix, setting in _PER_COMMAND:
        if name.startswith(prefix):
            return setting, name[len(prefix):].replace("_", "-")
    return None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigurationError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"configuration file {path}: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        _check_known(name, f"in {path}")
        values[name] = value
    return values


def _coerce(key: str, raw: Any, annotation: Any) -> Any:  # noqa: PLR0911, PLR0912 - one branch per type
    kind = str(annotation)
    try:
        if key in ("transports", "routes", "receiver_limits"):
            if not isinstance(raw, Mapping):
                raise TypeError
            return {str(k): str(v) for k, v in raw.items()}
        if key == "priorities":
            if not isinstance(raw, Mapping):
                raise TypeError
            given = {str(k): _whole_number(v) for k, v in raw.items()}
            return {**DEFAULT_PRIORITIES, **given}
        if key == "otp_previous_secrets":
            if isinstance(raw, str):
                return tuple(part for part in raw.split(",") if part)
            return tuple(str(part) for part in raw)
        if raw is None or (isinstance(raw, str) and raw == "" and "None" in kind):
            return None
        if kind.startswith("bool"):
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if key in _WHOLE_SECONDS:
            seconds = _duration(raw)
            if seconds != int(seconds):
                raise ValueError
            return int(seconds)
        if kind.startswith("int"):
            if isinstance(raw, bool):
                raise TypeError
            return int(raw)
        if kind.startswith("float"):
            return _duration(raw)
        return str(raw)
    except (TypeError, ValueError, OverflowError) as exc:
        if str(exc) == _TOO_LONG:
            raise ConfigurationError(f"setting {key}: {raw!r} is {_TOO_LONG}") from None
        what = "duration (examples: 90, 30s, 5m, 2h, 7d)" if key in _DURATIONS else \
            kind.replace(" | None", "")
        shown = "***" if _is_secret(key) else repr(raw)
        raise ConfigurationError(f"setting {key}: {shown} is not a valid {what}") from None


#: settings in seconds that also take a unit; ``otp_ttl`` is a whole number of seconds
_WHOLE_SECONDS = frozenset({"otp_ttl"})
_DURATIONS = frozenset({"poll_interval", "publish_timeout", "backoff_base", "backoff_max",
                        "sent_retention", "failed_retention", "purge_interval",
                        "pool_probe_interval", "claim_timeout", "priority_aging",
                        "gateway_auth_cache_ttl"}) | _WHOLE_SECONDS
#: beyond this no duration means anything (100 years): a larger one is a typo, and would
#: overflow a date
MAX_DURATION = 100 * 365 * 86400.0


def _whole_number(raw: Any) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError
    return int(raw)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``250ms``, ``30s``, ``5m``, ``2h`` or ``7d``; ValueError if not."""
    try:
        seconds = _duration(text)
    except ValueError as exc:
        if str(exc) == _TOO_LONG:
            raise ValueError(f"{text!r} is longer than 100 years") from None
        raise ValueError(f"{text!r} is not a duration (examples: 90, 30s, 5m, 2h, 7d)") from None
    if seconds < 0:
        raise ValueError(f"{text!r} is not a duration (examples: 90, 30s, 5m, 2h, 7d)")
    return seconds


def _duration(raw: Any) -> float:
    """A number of seconds, or a string with a unit: ``250ms``, ``30s``, ``5m``, ``7d``.
    ValueError for anything else, and for infinities, NaN or more than ``MAX_DURATION``."""
    if isinstance(raw, bool):
        raise ValueError("not a duration")
    if isinstance(raw, int | float):
        seconds = float(raw)
    else:
        text = str(raw).strip().lower()
        unit = next((unit for unit in ("ms", "s", "m", "h", "d") if text.endswith(unit)
                     and text[: -len(unit)].strip().replace(".", "", 1).isdigit()), None)
        seconds = float(text) if unit is None else float(text[: -len(unit)]) * _UNITS[unit]
    if not math.isfinite(seconds):
        raise ValueError("not a duration")
    if abs(seconds) > MAX_DURATION:
        raise ValueError(_TOO_LONG)
    return seconds


_TOO_LONG = "longer than 100 years"


__all__ = [
    "DEFAULT_PRIORITIES",
    "DEFAULT_TRANSPORT",
    "FAN_OUT",
    "MAX_DURATION",
    "PERSONAL_COMMANDS",
    "POOL",
    "Settings",
    "is_pool",
    "mask_url",
    "parse_duration",
    "pool_members",
    "route_names",
]
