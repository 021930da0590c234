"""An OTP-Pi REST stand-in as slow as a real one: one request at a time, seconds per SMS.

    python -m bench.slowdevice --port N --out FILE [--host H] [--seconds S]

Like the device, it answers a request only once its "modem" has sent the SMS (``--seconds``
of sleep, under one lock: requests wait their turn). Every accepted message id is appended
to ``--out`` as it is accepted, one line each, repeats included, so a SIGKILLed or frozen
relay's duplicates are counted exactly. SIGUSR1 makes the modem instant (to drain what is
left after the measured part); SIGTERM stops it. It prints ``ready`` when it listens.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

OK = b'{"command":"send-sms","response_code":"0000","data":{}}'


class _State:
    def __init__(self, seconds: float, out: Path) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.out = out.open("a", buffering=1, encoding="ascii")

    def accept(self, body: bytes) -> None:
        with self.lock:  # the device serves one request at a time
            if self.seconds:
                time.sleep(self.seconds)
            try:
                message_id = int(json.loads(body)["data"]["id"])
            except (ValueError, KeyError, TypeError):
                return
            self.out.write(f"{message_id} {time.time():.3f}\n")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.state.accept(body)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(OK)))
            self.end_headers()
            self.wfile.write(OK)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # a SIGKILLed relay does not wait for the answer

    do_PUT = do_POST  # noqa: N815 - the name http.server looks up


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # a relay that went away is no error here
            super().handle_error(request, client_address)


def read_arrivals(path: Path) -> list[tuple[int, float]]:
    """(message id, arrival time) for every accepted message, repeats included."""
    arrivals = []
    for line in path.read_text(encoding="ascii").splitlines():
        message_id, _, at = line.partition(" ")
        if message_id.isdigit():
            arrivals.append((int(message_id), float(at or 0)))
    return arrivals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    state = _State(args.seconds, args.out)
    handler = type("Handler", (_Handler,), {"state": state})
    server = _Server((args.host, args.port), handler)
    server.daemon_threads = True

    def instant(signum: int, frame: FrameType | None) -> None:
        state.seconds = 0.0

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGUSR1, instant)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    state.out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
