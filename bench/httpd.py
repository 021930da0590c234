"""A minimal, fast HTTP server answering like an OTP-Pi device: ``{"response_code":"0000"}``.

    python -m bench.httpd --port N [--out FILE]

One asyncio protocol, keep-alive, bodies read by ``Content-Length`` (as the device does). It
prints ``ready`` when it listens. With ``--out`` it records the id of every message it accepted
(and writes them like :mod:`bench.subscriber` on SIGTERM), so it doubles as a real subscriber.

Poison, for the chaos suite: a body holding ``POISON-EMPTY`` gets ``{}`` (the device did not
understand it), ``POISON-400`` gets HTTP 400 with an empty body. Both are permanent refusals
for the REST transport.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from bench.subscriber import Recorder, id_from_body

OK_BODY = b'{"response_code":"0000"}'
EMPTY_BODY = b"{}"


def _reply(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


OK = _reply("200 OK", OK_BODY)
NOT_UNDERSTOOD = _reply("200 OK", EMPTY_BODY)
BAD_REQUEST = _reply("400 Bad Request", b"")


class Device(asyncio.Protocol):
    def __init__(self, recorder: Recorder | None) -> None:
        self.recorder = recorder
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                    break
            if len(self.buffer) < end + 4 + length:
                break
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            if b"POISON-EMPTY" in body:
                replies.append(NOT_UNDERSTOOD)
            elif b"POISON-400" in body:
                replies.append(BAD_REQUEST)
            else:
                if self.recorder is not None:
                    self.recorder.add(id_from_body(body))
                replies.append(OK)
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))


async def serve(port: int, recorder: Recorder | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await loop.create_server(lambda: Device(recorder), "127.0.0.1", port,
                                      reuse_address=True)
    print("ready", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    recorder = Recorder() if args.out else None
    asyncio.run(serve(args.port, recorder))
    if recorder is not None and args.out is not None:
        recorder.dump(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
