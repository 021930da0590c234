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
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from urllib.parse import urlsplit

from outbox.errors import ConfigurationError
from outbox.settings import Settings, mask_url
from outbox.transports.base import (
    Envelope,
    Failures,
    OtpMode,
    Transport,
    TransportOptions,
    split_url,
)

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


def transport_options(url: str, settings: Settings) -> tuple[str, TransportOptions]:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"unknown transport scheme {scheme!r} in {mask_url(url)!r} "
            f"(expected one of: {', '.join(SCHEMES)})"
        )
    timeout = settings.publish_timeout
    if scheme in ("http", "https"):
        # OTP-Pi answers a send-sms once its modem sent it: seconds, at times well over ten.
        # A reply that comes after the timeout is a possible duplicate (the row is retried).
        timeout = max(timeout, DEVICE_TIMEOUT)
    return split_url(url, default_otp=_SCHEMES[scheme][2], timeout=timeout)


def open_transport(name: str, url: str, settings: Settings) -> Transport:
    """Build the transport for ``url`` (no network I/O: connections open on first use)."""
    stripped, options = transport_options(url, settings)
    module_name, class_name, _ = _SCHEMES[urlsplit(url).scheme.lower()]
    module = importlib.import_module(module_name)
    factory = getattr(module, class_name)
    if module_name == "outbox.transports.stdout":
        transport: Transport = factory(name, options)
    else:
        transport = factory(name, stripped, options)
    return transport


def open_transports(settings: Settings) -> dict[str, Transport]:
    opened: dict[str, Transport] = {}
    try:
        for name, url in settings.transports.items():
            opened[name] = open_transport(name, url, settings)
    except BaseException:
        for transport in opened.values():
            transport.close()
        raise
    return opened


def validate_transports(settings: Settings) -> None:
    """Check every transport URL at start-up without connecting anywhere."""
    for url in settings.transports.values():
        transport_options(url, settings)


__all__ = [
    "DEVICE_TIMEOUT",
    "SCHEMES",
    "Envelope",
    "Failures",
    "OtpMode",
    "Transport",
    "TransportOptions",
    "open_transport",
    "open_transports",
    "transport_options",
    "validate_transports",
]
