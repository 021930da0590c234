"""A real subscriber, in its own process: records the id and arrival time of every message.

    python -m bench.subscriber amqp  --url amqp://... --topic Q --out FILE
    python -m bench.subscriber mqtt  --url mqtt://host:port --topic T --out FILE [--client-id ID]
    python -m bench.subscriber redis --url redis://... --topic CHANNEL --out FILE

It prints ``ready`` once subscribed. It survives its broker going away (it reconnects, and
declares the queue again the way the device does). On SIGTERM it keeps reading until the
line has been quiet for ``--settle`` seconds, then writes what it saw and exits.

The arrival time is CLOCK_MONOTONIC, which every process on the host shares, so the
benchmark can subtract the application's commit time from it.
"""

from __future__ import annotations

import argparse
import json
import signal
import struct
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def _clock() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class Recorder:
    def __init__(self) -> None:
        self.ids = array("q")
        self.times = array("d")
        self.seen: set[int] = set()
        self.last = _clock()
        self.unparsed = 0
        self._lock = threading.Lock()

    def add(self, message_id: int | None) -> None:
        arrived = _clock()
        with self._lock:
            self.last = arrived
            if message_id is None:
                self.unparsed += 1
                return
            self.ids.append(message_id)
            self.times.append(arrived)
            self.seen.add(message_id)

    def write_status(self, path: Path) -> None:
        """How many distinct ids so far, for a harness waiting for all of them."""
        with self._lock:
            text = f"{len(self.seen)} {len(self.ids)}\n"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(path)

    def dump(self, path: Path) -> None:
        with self._lock, path.open("wb") as out:
            out.write(struct.pack("<qq", len(self.ids), self.unparsed))
            self.ids.tofile(out)
            self.times.tofile(out)


def read_results(path: Path) -> tuple[array[int], array[float], int]:
    """(ids, arrival times, messages without a readable id) as written by a subscriber."""
    with path.open("rb") as data:
        count, unparsed = struct.unpack("<qq", data.read(16))
        ids: array[int] = array("q")
        ids.fromfile(data, count)
        times: array[float] = array("d")
        times.fromfile(data, count)
    return ids, times, unparsed


def id_from_body(body: bytes) -> int | None:
    try:
        value = json.loads(body)["data"]["id"]
        return int(value)
    except (ValueError, KeyError, TypeError):
        return None


# --- brokers ------------------------------------------------------------------------------


#: a queue that keeps every message on disk across a broker restart (the relay's transport does
#: not declare queues, so it publishes into whichever queue the subscriber made)
DURABLE_QUEUE = {"x-queue-type": "quorum"}


def run_amqp(url: str, topic: str, recorder: Recorder, stop: threading.Event, *,
             durable: bool = False) -> None:
    """Consume ``topic``. Like the device by default: a non-durable queue, auto-ack. With
    ``durable``: a quorum queue and manual acks, so a broker stop drops nothing it confirmed
    and whatever is still missing afterwards was never published."""
    import pika  # noqa: PLC0415
    import pika.exceptions  # noqa: PLC0415

    params = pika.URLParameters(url)
    params.heartbeat = 10
    params.blocked_connection_timeout = 30
    announced = False

    def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
        message_id = properties.message_id
        try:
            parsed = int(message_id) if message_id is not None else id_from_body(body)
        except ValueError:
            parsed = id_from_body(body)
        # a redelivery of what we saw but could not ack before the broker went away is the
        # broker repeating itself, not the relay
        if not (method.redelivered and parsed in recorder.seen):
            recorder.add(parsed)
        if durable:
            channel.basic_ack(method.delivery_tag)

    while not (stop.is_set() and _clock() - recorder.last > SETTLE):
        try:
            connection = pika.BlockingConnection(params)
        except pika.exceptions.AMQPError:
            time.sleep(0.2)
            continue
        try:
            channel = connection.channel()
            if durable:
                channel.queue_declare(topic, durable=True, arguments=DURABLE_QUEUE)
                channel.basic_qos(prefetch_count=1000)
            else:
                # exactly the device's declaration (PROTOCOL.md section 4)
                channel.queue_declare(topic, durable=False, exclusive=False, auto_delete=False)
            channel.basic_consume(topic, on_message, auto_ack=not durable)
            if not announced:
                print("ready", flush=True)
                announced = True
            while not (stop.is_set() and _clock() - recorder.last > SETTLE):
                connection.process_data_events(time_limit=0.2)
            connection.close()
        except pika.exceptions.AMQPError:
            time.sleep(0.2)


def run_mqtt(url: str, topic: str, client_id: str, recorder: Recorder,
             stop: threading.Event) -> None:
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    parts = urlsplit(url)
    subscribed = threading.Event()
    # A persistent session: what is published while we reconnect (or while the broker
    # restarts) waits for us, so a gap in our own connection never counts as a loss.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.reconnect_delay_set(min_delay=1, max_delay=1)

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe(topic, qos=1)

    def on_subscribe(client: Any, userdata: Any, mid: Any, reasons: Any, properties: Any) -> None:
        subscribed.set()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        recorder.add(id_from_body(message.payload))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=10)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit("mqtt subscriber: no SUBACK")
    print("ready", flush=True)
    while not (stop.is_set() and _clock() - recorder.last > SETTLE):
        time.sleep(0.1)
    client.disconnect()
    client.loop_stop()


def run_redis(url: str, topic: str, recorder: Recorder, stop: threading.Event) -> None:
    import redis  # noqa: PLC0415

    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(topic)
    pubsub.get_message(timeout=5)  # the subscribe confirmation
    print("ready", flush=True)
    while not (stop.is_set() and _clock() - recorder.last > SETTLE):
        message = pubsub.get_message(timeout=0.2)
        if message is not None:
            recorder.add(id_from_body(message["data"]))
    pubsub.close()


SETTLE = 1.0


def main(argv: list[str] | None = None) -> int:
    global SETTLE  # noqa: PLW0603 - set once from the command line
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("amqp", "mqtt", "redis"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--client-id", default="outbox-bench-subscriber")
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--durable", action="store_true",
                        help="amqp: a quorum queue with manual acks instead of the device's")
    parser.add_argument("--status", type=Path, help="write '<distinct> <total>' here twice a second")
    args = parser.parse_args(argv)
    SETTLE = args.settle
    recorder = Recorder()
    stop = threading.Event()
    if args.status is not None:
        status: Path = args.status

        def report() -> None:
            while True:
                recorder.write_status(status)
                time.sleep(0.5)

        threading.Thread(target=report, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if args.kind == "amqp":
            run_amqp(args.url, args.topic, recorder, stop, durable=args.durable)
        elif args.kind == "mqtt":
            run_mqtt(args.url, args.topic, args.client_id, recorder, stop)
        else:
            run_redis(args.url, args.topic, recorder, stop)
    finally:
        recorder.dump(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
