"""Direct-publish ceilings: the same client library, the same bytes, no database, no relay.

Each function publishes ``count`` copies of one ~300-byte send-sms body and returns messages
per second, measured until the broker has answered for the last one (a round trip after the
last message for the publishers that get no acknowledgement).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from bench.common import AMQP_URL, REDIS_URL, sample_body

JSON = "application/json"


def amqp_no_confirm(queue: str, count: int, *, chunk: int = 1000) -> float:
    """pika SelectConnection, no confirms, ``chunk`` messages per turn of the I/O loop: the
    fastest this library publishes (the relay's transport is built the same way)."""
    import pika  # noqa: PLC0415

    body = sample_body()
    properties = pika.BasicProperties
    state: dict[str, Any] = {"sent": 0, "started": None, "ended": None, "error": None}

    def on_open(connection: Any) -> None:
        connection.channel(on_open_callback=on_channel)

    def on_channel(channel: Any) -> None:
        state["channel"] = channel
        state["started"] = time.perf_counter()
        publish_chunk()

    def publish_chunk() -> None:
        channel = state["channel"]
        first = state["sent"]
        last = min(first + chunk, count)
        for n in range(first, last):
            channel.basic_publish("", queue, body,
                                  properties(content_type=JSON, message_id=str(n),
                                             delivery_mode=1), mandatory=True)
        state["sent"] = last
        if last < count:
            connection.ioloop.add_callback_threadsafe(publish_chunk)
        else:
            # answered after every publish before it on this channel
            channel.queue_declare(queue, passive=True, callback=finished)

    def finished(_frame: Any) -> None:
        state["ended"] = time.perf_counter()
        state["channel"].queue_purge(queue, callback=lambda _frame: connection.close())

    def on_close(_connection: Any, reason: BaseException) -> None:
        if state["ended"] is None:
            state["error"] = reason
        connection.ioloop.stop()

    connection = pika.SelectConnection(pika.URLParameters(AMQP_URL), on_open_callback=on_open,
                                       on_open_error_callback=on_close,
                                       on_close_callback=on_close)
    connection.ioloop.start()
    if state["ended"] is None:
        raise RuntimeError(f"amqp ceiling: {state['error']!r}")
    return count / (state["ended"] - state["started"])


def amqp_no_confirm_blocking(queue: str, count: int) -> float:
    """pika BlockingConnection, no confirms (it flushes the socket after every message)."""
    import pika  # noqa: PLC0415

    body = sample_body()
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        publish = channel.basic_publish
        properties = pika.BasicProperties
        started = time.perf_counter()
        for n in range(count):
            publish("", queue, body, properties(content_type=JSON, message_id=str(n),
                                                delivery_mode=1), mandatory=True)
        channel.queue_declare(queue, passive=True)
        elapsed = time.perf_counter() - started
        channel.queue_purge(queue)
    finally:
        connection.close()
    return count / elapsed


def amqp_confirm_each(queue: str, count: int) -> float:
    """pika BlockingConnection with confirm_delivery: one round trip per message."""
    import pika  # noqa: PLC0415

    body = sample_body()
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        started = time.perf_counter()
        for n in range(count):
            channel.basic_publish("", queue, body,
                                  pika.BasicProperties(content_type=JSON, message_id=str(n),
                                                       delivery_mode=1), mandatory=True)
        elapsed = time.perf_counter() - started
        channel.queue_purge(queue)
    finally:
        connection.close()
    return count / elapsed


def redis_pipelined(channel: str, count: int, *, depth: int = 100) -> float:
    """redis-py, PUBLISH pipelined ``depth`` at a time (no transaction)."""
    import redis  # noqa: PLC0415

    body = sample_body()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
        started = time.perf_counter()
        for first in range(0, count, depth):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(depth, count - first)):
                pipe.execute_command("PUBLISH", channel, body)
            pipe.execute()
        elapsed = time.perf_counter() - started
    finally:
        client.close()
    return count / elapsed


def redis_one_by_one(channel: str, count: int) -> float:
    import redis  # noqa: PLC0415

    body = sample_body()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
        started = time.perf_counter()
        for _ in range(count):
            client.publish(channel, body)
        elapsed = time.perf_counter() - started
    finally:
        client.close()
    return count / elapsed


def mqtt_qos(host: str, port: int, topic: str, count: int, *, qos: int = 1,
             network_thread: bool = False) -> float:
    """paho-mqtt, a window of 1,000 in flight, until the last PUBACK (QoS 1).

    The ceiling drives paho's loop in the publishing thread (``loop(0)`` every 50 messages):
    with ``network_thread`` (``loop_start``, as most code does) every publish has to wake
    paho's thread through its socket pair, and the rate halves.
    """
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    body = sample_body()
    acked = 0
    done = threading.Event()

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1
        if acked >= count:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, clean_session=True,
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect(host, port, keepalive=60)
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    deadline = time.monotonic() + 10
    if network_thread:
        client.loop_start()
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        while not client.is_connected() and time.monotonic() < deadline:
            client.loop(0.1)
    if not client.is_connected():
        raise RuntimeError("mqtt ceiling: no CONNACK")
    try:
        started = time.perf_counter()
        for n in range(count):
            client.publish(topic, body, qos=qos, retain=False)
            if not network_thread and n % 50 == 0:
                client.loop(0)
        deadline = time.monotonic() + 120
        if qos == 0:
            # no acknowledgement: until paho has written everything
            while client.want_write() and time.monotonic() < deadline:
                if network_thread:
                    time.sleep(0.001)
                else:
                    client.loop(0)
        elif network_thread:
            done.wait(120)
        else:
            while not done.is_set() and time.monotonic() < deadline:
                client.loop(0.01)
        if qos and not done.is_set():
            raise RuntimeError(f"mqtt ceiling: {acked}/{count} acknowledged")
        elapsed = time.perf_counter() - started
    finally:
        client.disconnect()
        if network_thread:
            client.loop_stop()
    return count / elapsed


def http_sequential(url: str, count: int) -> float:
    """httpx, one keep-alive connection, one POST at a time (the device answers one by one)."""
    import httpx  # noqa: PLC0415

    body = sample_body()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    with httpx.Client(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as client:
        client.post(url, content=body, headers=headers)
        started = time.perf_counter()
        for n in range(count):
            response = client.post(url, content=body,
                                   headers={**headers, "Idempotency-Key": str(n)})
            response.json()
        elapsed = time.perf_counter() - started
    return count / elapsed
