"""SIGTERM and SIGINT for the long-running commands (``outbox run``, ``outbox ws-relay``).

The handlers only record the signal and set an event; they never log. A Python signal handler
runs in the main thread between two bytecodes, possibly while that thread is inside a log call
holding structlog's (non-reentrant) writer lock: a handler that logged would then wait for the
lock its own thread holds, and the process would hang instead of stopping. Whoever waits on the
event logs the request once it has seen it (see :attr:`StopRequest.signal_name`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT)


class ForcedExit(SystemExit):
    """A second SIGINT (Ctrl-C twice): leave now; the server rolls the open batch back."""


class StopRequest(threading.Event):
    """An event set by SIGTERM or SIGINT, or by code that wants the service to stop."""

    def __init__(self) -> None:
        super().__init__()
        #: the name of the first signal received (``"SIGTERM"``), ``None`` when set by code
        self.signal_name: str | None = None


@contextmanager
def stop_on_signals(*, exit_code_on_second_sigint: int | None = None) -> Iterator[StopRequest]:
    """SIGTERM and SIGINT set the returned :class:`StopRequest`; the old handlers come back.

    With ``exit_code_on_second_sigint``, a SIGINT after the first signal raises
    :class:`ForcedExit` with that code. A repeated SIGTERM (a supervisor signalling the whole
    process group) changes nothing. Outside the main thread (where Python delivers no
    signals) the event is returned without handlers.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        already = stop.is_set()
        if stop.signal_name is None:
            stop.signal_name = signal.Signals(signum).name
        stop.set()
        if already and signum == signal.SIGINT and exit_code_on_second_sigint is not None:
            raise ForcedExit(exit_code_on_second_sigint)

    previous = {sig: signal.signal(sig, handle) for sig in HANDLED}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["ForcedExit", "StopRequest", "stop_on_signals"]
