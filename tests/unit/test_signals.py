"""The stop request behind ``outbox run`` and ``outbox ws-relay``."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from outbox.signals import ForcedExit, StopRequest, stop_on_signals
from tests.support.log_capture import rendered_logs


def test_a_signal_sets_the_request_with_its_name_and_logs_nothing() -> None:
    with rendered_logs() as output, stop_on_signals() as stop:
        assert not stop.is_set()
        signal.raise_signal(signal.SIGTERM)
        assert stop.is_set()
        assert stop.signal_name == "SIGTERM"
        assert output.getvalue() == ""  # the waiter logs it, never the handler


def test_the_first_signal_is_the_one_reported() -> None:
    with stop_on_signals() as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
    assert stop.signal_name == "SIGINT"


def test_a_second_sigint_forces_the_exit_and_a_repeated_sigterm_does_not() -> None:
    with stop_on_signals(exit_code_on_second_sigint=1):
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # a supervisor signalling the process group
        with pytest.raises(ForcedExit) as forced:
            signal.raise_signal(signal.SIGINT)
    assert forced.value.code == 1


def test_without_an_exit_code_a_second_sigint_only_stops() -> None:
    with stop_on_signals() as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    assert stop.is_set()


def test_the_previous_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_on_signals():
        assert signal.getsignal(signal.SIGTERM) not in before
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_outside_the_main_thread_no_handler_is_installed() -> None:
    seen: list[StopRequest] = []
    before = signal.getsignal(signal.SIGTERM)

    def body() -> None:
        with stop_on_signals() as stop:
            seen.append(stop)
            assert signal.getsignal(signal.SIGTERM) is before

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(5)
    assert len(seen) == 1 and not seen[0].is_set()


def test_a_signal_landing_inside_a_log_write_does_not_hang_the_process() -> None:
    # The CI failure this guards against: SIGTERM arrived while the main thread was printing
    # a log line under structlog's writer lock; a handler that logged waited for that lock
    # forever. Here the stream itself raises the signal in the middle of the write.
    script = textwrap.dedent("""
        import io, signal, sys
        from outbox import logs
        from outbox.signals import stop_on_signals

        class Stream(io.StringIO):
            fired = False
            def write(self, text):
                if not Stream.fired:
                    Stream.fired = True
                    signal.raise_signal(signal.SIGTERM)
                return super().write(text)

        stream = Stream()
        logs.configure(fmt="json", stream=stream)
        log = logs.get_logger("test")
        with stop_on_signals() as stop:
            log.info("relay.started")
            assert stop.is_set() and stop.signal_name == "SIGTERM"
            log.info("relay.stopping", signal=stop.signal_name)
        assert "relay.stopping" in stream.getvalue()
        print("exited")
    """)
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exited"
