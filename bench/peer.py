"""The peer: procrastinate, with the task a team would write to publish to RabbitMQ.

The worker runs as ``procrastinate --app=bench.peer.app worker`` in its own process; the
database and the queue come from ``OUTBOX_BENCH_PEER_DATABASE_URL`` and
``OUTBOX_BENCH_PEER_QUEUE``. The task publishes the same bytes the relay publishes, with the
same properties, on a pika ``BlockingConnection`` in confirm mode kept open between jobs: a
confirm per message, an error (and procrastinate's failure handling) on a nack or a return.
"""

from __future__ import annotations

import os
from typing import Any

import procrastinate

from bench.common import AMQP_URL

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(
        conninfo=os.environ.get("OUTBOX_BENCH_PEER_DATABASE_URL", "")),
)

_channel: Any = None


def _get_channel() -> Any:
    global _channel  # noqa: PLW0603 - one connection per worker process, opened lazily
    import pika  # noqa: PLC0415

    if _channel is None or _channel.is_closed:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        _channel = connection.channel()
        _channel.confirm_delivery()
    return _channel


@app.task(name="publish_command")
def publish_command(body: str, message_id: int) -> None:
    import pika  # noqa: PLC0415

    _get_channel().basic_publish(
        "", os.environ.get("OUTBOX_BENCH_PEER_QUEUE", "outbox-bench"), body.encode(),
        pika.BasicProperties(content_type="application/json", message_id=str(message_id),
                             delivery_mode=1),
        mandatory=True,
    )
