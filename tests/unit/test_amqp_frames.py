"""The RabbitMQ transport's hand-marshalled basic.publish frames are pika's, byte for byte."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pika import frame, spec

from outbox.transports.base import Envelope
from outbox.transports.rabbitmq import JSON, TRANSIENT_DELIVERY, _publish_frames


class Connection:
    def __init__(self, body_max: Any = 131_064) -> None:
        self._body_max_length = body_max
        self.is_closed = False

    def _output_marshaled_frames(self, frames: list[bytes]) -> None:  # pragma: no cover
        raise AssertionError("not called here")


class Channel:
    def __init__(self, number: int = 7, is_open: bool = True) -> None:
        self.channel_number = number
        self.is_open = is_open


def pikas_frames(number: int, topic: str, envelope: Envelope, body_max: int) -> bytes:
    body = envelope.body
    parts = [frame.Method(number, spec.Basic.Publish(exchange="", routing_key=topic,
                                                     mandatory=True)).marshal(),
             frame.Header(number, len(body), spec.BasicProperties(
                 content_type=JSON, message_id=str(envelope.id),
                 delivery_mode=TRANSIENT_DELIVERY)).marshal()]
    for chunk in range(math.ceil(len(body) / body_max)):
        parts.append(frame.Body(number, body[chunk * body_max:(chunk + 1) * body_max]).marshal())
    return b"".join(parts)


@pytest.mark.parametrize("body_max", [131_064, 100, 7])
@pytest.mark.parametrize("topic", ["sms", "otp-pi.device-1", "q" * 255])
def test_the_frames_are_pikas_own(body_max: int, topic: str) -> None:
    batch = [Envelope(1, "send-sms", b'{"command":"send-sms","data":{"receiver":"+62812"}}', 1),
             Envelope(2**62, "send-sms", b"x" * 700, 1),
             Envelope(3, "send-sms", b"y" * 100, 1)]  # exactly one frame's worth, at 100
    frames = _publish_frames(Connection(body_max), Channel(), topic, batch)
    assert frames is not None
    assert b"".join(frames) == b"".join(pikas_frames(7, topic, e, body_max) for e in batch)


def test_a_pika_laid_out_differently_falls_back_to_its_own_publish() -> None:
    batch = [Envelope(1, "send-sms", b"{}", 1)]
    assert _publish_frames(Connection(body_max=None), Channel(), "sms", batch) is None
    assert _publish_frames(object(), Channel(), "sms", batch) is None
    assert _publish_frames(Connection(), Channel(), "q" * 256, batch) is None  # pika says why


def test_a_closed_channel_is_refused_like_pikas_publish() -> None:
    import pika.exceptions  # noqa: PLC0415

    with pytest.raises(pika.exceptions.ChannelWrongStateError):
        _publish_frames(Connection(), Channel(is_open=False), "sms",
                        [Envelope(1, "send-sms", b"{}", 1)])
