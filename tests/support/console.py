"""The operator's console served for real (uvicorn on a free loopback port, in a thread)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from outbox.passwords import UsersFile, set_user
from outbox.settings import Settings
from outbox.web.console import HealthWatch, create_app

OPERATOR = ("olga", "operator-pass-1")
VIEWER = ("vic", "viewer-pass-1")


def write_users(path: Path) -> Path:
    """A users file with one operator and one viewer."""
    set_user(path, OPERATOR[0], OPERATOR[1], extra="operator")
    set_user(path, VIEWER[0], VIEWER[1], extra="viewer")
    return path


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening (port 0: a free one).

    Created with its protocol named: asyncio sets TCP_NODELAY only on connections accepted
    from a socket whose ``proto`` is IPPROTO_TCP, and ``socket.create_server`` leaves it 0.
    Without it every response waited out the client's delayed ACK: 45 ms a request. (uvicorn
    binding a host and port itself, as ``outbox console`` has it do, names the protocol.)
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
        flags=socket.AI_PASSIVE)[0]
    listening = socket.socket(family, kind, proto)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(address)
        listening.listen(128)
    except OSError:
        listening.close()
        raise
    return listening


@contextmanager
def serve_console(database_url: str, users: Path | None, *, settings: Settings | None = None,
                  refresh_seconds: float = 0.5, health: bool = False) -> Iterator[str]:
    """The console at ``http://127.0.0.1:PORT`` until the block ends."""
    settings = settings or Settings(database_url=database_url)
    listening = listening_socket("127.0.0.1", 0)
    port = listening.getsockname()[1]
    app = create_app(settings, database_url,
                     users=UsersFile(users) if users is not None else None,
                     health=HealthWatch(settings, database_url, interval=0.5) if health else None,
                     refresh_seconds=refresh_seconds)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                           lifespan="on", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the console did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        listening.close()
