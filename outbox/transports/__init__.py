"""Transports, chosen by URL scheme.

======================  ==============================  ==================
scheme                  module                          OTP mode default
======================  ==============================  ==================
``stdout``              :mod:`.stdout`                  managed
``http``, ``https``     :mod:`.http` (OTP-Pi REST)      device
``amqp``, ``amqps``     :mod:`.rabbitmq`                managed
``redis``, ``rediss``   :mod:`.redis_pubsub`            managed
``mqtt``, ``mqtts``     :mod:`.mqtt`                    managed
``ws``, ``wss``         :mod:`.websocket`               managed
``memory``              :mod:`outbox.testing`           managed
======================  ==============================  ==================

Modules are imported on first use, so a deployment that only speaks REST never imports pika.

A route target ``a|b`` is a failover pool (:mod:`.pool`): one transport made of fresh
instances of its members, so the relay sees one transport per route target.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Protocol

from outbox.commands import CREATE_OTP
from outbox.errors import ConfigurationError
from outbox.routes import is_pool, pool_members, route_names
from outbox.scheduling import ProbePolicy
from outbox.transports.base import (
    Envelope,
    Failures,
    OtpMode,
    Transport,
    TransportOptions,
    split_url,
)
from outbox.urls import check_url

_SCHEMES: Mapping[str, tuple[str, str, OtpMode]] = {
    "stdout": ("outbox.transports.stdout", "StdoutTransport", OtpMode.MANAGED),
    "http": ("outbox.transports.http", "HttpTransport", OtpMode.DEVICE),
    "https": ("outbox.transports.http", "HttpTransport", OtpMode.DEVICE),
    "amqp": ("outbox.transports.rabbitmq", "RabbitMqTransport", OtpMode.MANAGED),
    "amqps": ("outbox.transports.rabbitmq", "RabbitMqTransport", OtpMode.MANAGED),
    "redis": ("outbox.transports.redis_pubsub", "RedisTransport", OtpMode.MANAGED),
    "rediss": ("outbox.transports.redis_pubsub", "RedisTransport", OtpMode.MANAGED),
    "mqtt": ("outbox.transports.mqtt", "MqttTransport", OtpMode.MANAGED),
    "mqtts": ("outbox.transports.mqtt", "MqttTransport", OtpMode.MANAGED),
    "ws": ("outbox.transports.websocket", "WebSocketTransport", OtpMode.MANAGED),
    "wss": ("outbox.transports.websocket", "WebSocketTransport", OtpMode.MANAGED),
    "memory": ("outbox.testing", "MemoryTransport", OtpMode.MANAGED),
}

SCHEMES = tuple(_SCHEMES)

#: seconds a REST device may take to answer unless the URL says ``timeout=``
DEVICE_TIMEOUT = 60.0


class TransportSettings(Protocol):
    """What opening transports reads of the settings (``outbox.settings.Settings`` has it:
    the settings import this package, never the other way round)."""

    @property
    def transports(self) -> Mapping[str, str]: ...

    @property
    def routes(self) -> Mapping[str, str]: ...

    @property
    def publish_timeout(self) -> float: ...

    @property
    def pool_probe_interval(self) -> float: ...


def _scheme(name: str, url: str) -> str:
    scheme = check_url(url, f"transport {name!r}").scheme
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"transport {name!r}: unknown scheme {scheme!r} (expected one of: {', '.join(SCHEMES)})"
        )
    return scheme


def transport_options(url: str, settings: TransportSettings, *,
                      name: str = "?") -> tuple[str, TransportOptions]:
    """The URL handed to the library and outbox's own options, without connecting."""
    scheme = _scheme(name, url)
    timeout = settings.publish_timeout
    if scheme in ("http", "https"):
        # OTP-Pi answers a send-sms once its modem sent it: seconds, at times well over ten.
        # A reply that comes after the timeout is a possible duplicate (the row is retried).
        timeout = max(timeout, DEVICE_TIMEOUT)
    return split_url(url, default_otp=_SCHEMES[scheme][2], timeout=timeout)


def open_transport(name: str, url: str, settings: TransportSettings) -> Transport:
    """Build the transport for ``url`` (no network I/O: connections open on first use)."""
    stripped, options = transport_options(url, settings, name=name)
    module_name, class_name, _ = _SCHEMES[_scheme(name, url)]
    module = importlib.import_module(module_name)
    factory = getattr(module, class_name)
    if module_name == "outbox.transports.stdout":
        transport: Transport = factory(name, options)
    else:
        transport = factory(name, stripped, options)
    return transport


def probe_policy(settings: TransportSettings) -> ProbePolicy:
    """A pool probes down members every ``pool_probe_interval``; a member that keeps
    flapping, at doubling intervals up to twelve times that (a minute by default)."""
    return ProbePolicy(settings.pool_probe_interval, 12 * settings.pool_probe_interval)


def open_target(target: str, settings: TransportSettings) -> Transport:
    """The transport of one route target: a configured name, or a pool ``a|b`` built of
    fresh instances of its members (its own connections and its own prober)."""
    if not is_pool(target):
        return open_transport(target, settings.transports[target], settings)
    from outbox.transports.pool import PoolTransport  # noqa: PLC0415 - only pools need it

    members: list[Transport] = []
    try:
        for name in pool_members(target):
            members.append(open_transport(name, settings.transports[name], settings))
        return PoolTransport(target, members, policy=probe_policy(settings))
    except BaseException:
        for member in members:
            member.close()
        raise


def configured_pools(settings: TransportSettings) -> list[str]:
    """The pools the configured routes name, each once."""
    pools: dict[str, None] = {}
    for route in settings.routes.values():
        for target in route_names(route):
            if is_pool(target):
                pools[target] = None
    return list(pools)


def open_transports(settings: TransportSettings) -> dict[str, Transport]:
    """Every configured transport, and every pool the configured routes name."""
    opened: dict[str, Transport] = {}
    try:
        for name, url in settings.transports.items():
            opened[name] = open_transport(name, url, settings)
        for pool in configured_pools(settings):
            opened[pool] = open_target(pool, settings)
    except BaseException:
        for transport in opened.values():
            transport.close()
        raise
    return opened


def validate_transports(settings: TransportSettings) -> None:
    """Check every transport URL at start-up without connecting anywhere, and that every
    pool's members can publish the same envelopes."""
    options = {name: transport_options(url, settings, name=name)[1]
               for name, url in settings.transports.items()}
    for command, route in settings.routes.items():
        for target in route_names(route):
            if is_pool(target):
                validate_pool(target, {name: options[name] for name in pool_members(target)},
                              serves_otps=command == CREATE_OTP)


def validate_pool(target: str, members: Mapping[str, TransportOptions], *,
                  serves_otps: bool) -> None:
    """Refuse a pool whose members would need different envelopes, or that would keep
    device-mode OTPs (the code lives on the one device that drew it)."""
    for what, field in (("dialect", "dialect"), ("otp mode", "otp_mode")):
        seen = {name: str(getattr(option, field).value) for name, option in members.items()}
        if len(set(seen.values())) > 1:
            shown = ", ".join(f"{name}: {value}" for name, value in seen.items())
            raise ConfigurationError(
                f"pool {target!r}: its members differ in {what} ({shown}); a row is encoded "
                "once, before the member is chosen, so they must agree")
    if serves_otps and any(option.otp_mode is OtpMode.DEVICE for option in members.values()):
        raise ConfigurationError(
            f"pool {target!r} carries create-otp with otp=device: the code would live on "
            "whichever device served and validation could not know which; set otp=managed "
            "on its members (needs OUTBOX_OTP_SECRET) or route create-otp to one device")


__all__ = [
    "DEVICE_TIMEOUT",
    "SCHEMES",
    "Envelope",
    "Failures",
    "OtpMode",
    "Transport",
    "TransportOptions",
    "TransportSettings",
    "configured_pools",
    "open_target",
    "open_transport",
    "open_transports",
    "probe_policy",
    "transport_options",
    "validate_pool",
    "validate_transports",
]
