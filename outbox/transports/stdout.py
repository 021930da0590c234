"""``stdout://``: one JSON line per message on standard output (the embedded default)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import TextIO

from outbox.errors import TransientPublishError
from outbox.transports.base import Envelope, Failures, TransportOptions


class StdoutTransport:
    def __init__(self, name: str, options: TransportOptions, stream: TextIO | None = None) -> None:
        self.name = name
        self.options = options
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def publish(self, batch: Sequence[Envelope]) -> Failures:
        stream = self.stream
        try:
            stream.write("".join(envelope.body.decode("ascii") + "\n" for envelope in batch))
            stream.flush()
        except (OSError, ValueError) as exc:  # a closed pipe or file
            raise TransientPublishError(f"cannot write to standard output: {exc}") from exc
        return {}

    def check(self) -> None:
        if self.stream.closed:
            raise TransientPublishError("standard output is closed")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()
