"""A local stand-in for an OTP-Pi device's REST API (PROTOCOL.md sections 3 and 8).

It answers the way the device's Java code does, down to the bytes where they matter:

* Basic auth is checked first: bad or missing credentials get ``401`` with an empty body, sent
  as the device's HTTP server sends an empty body (``Transfer-encoding: chunked`` and a single
  zero-length chunk). Methods other than POST and PUT get ``405`` the same way.
* The body is read by ``Content-Length``; a chunked body is recorded but processed as empty,
  which the device answers with ``{}``.
* Replies are ``200`` with a pretty-printed JSON object (the device uses ``toString(4)``).
* ``send-sms``: ``0000``, ``1101`` when ``modem_connected`` is off; with ``drop_expired`` on
  (the shipped sample), an ``expiration`` in milliseconds that has passed, or with no
  ``expiration`` a ``date_time`` (seconds) older than ``expiration_offset``, makes the device
  drop it and reply without a ``response_code``.
* ``send-mail``: ``0000``, or ``1102`` when ``mail_fails``. ``send-email`` is not a device
  command: ``{}``.
* ``request-otp``: draws a code of ``otp_length`` digits, keeps only SHA-512 of
  ``reference:otp:receiver:param1:param2:param3:param4:salt`` with the expiry (absolute Unix
  seconds; absent means already expired), formats ``message`` with the code and "sends" it into
  :attr:`OtpPi.inbox`. ``1201`` while the reference has a live record (the device's garbage
  collector drops expired records; here that happens when the reference is requested again).
  ``1102`` when the send fails (the record is kept). A ``message`` with any ``%`` conversion
  other than one ``%s`` (``%%`` is a literal percent) makes the device close the connection
  without a reply, after storing the record.
* ``verify-otp``: ``0000`` and the record deleted on a match, ``1202`` on a wrong code, changed
  params or an unknown reference (no attempt limit), ``1203`` when expired.

Switches a test can flip: :attr:`OtpPi.fault` (every request) or :meth:`OtpPi.fail_next`
(the next requests, in order) with a :class:`Fault`: an HTTP status with an empty body, a
delay before answering (to trigger client timeouts), closing the connection without a reply
before processing, or after processing. Every request is recorded in :attr:`OtpPi.requests`.

Fixtures: ``otp_pi`` (a running device, user ``otp``, password ``pi-secret``) and
``otp_pi_factory`` live in :mod:`tests.support.otp_pi_fixtures`; a test module names that
module in its ``pytest_plugins``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, urlencode

PATHS = frozenset({"/api/otp", "/api/sms", "/api/email", "/api/message", "/api/block",
                   "/api/unblock"})

SUCCESS, NO_DEVICE_CONNECTED, FAILED = "0000", "1101", "1102"
DUPLICATED, INVALID_OTP, EXPIRED = "1201", "1202", "1203"


@dataclass(frozen=True)
class Fault:
    """Something going wrong with one request (see :meth:`OtpPi.fail_next`)."""

    kind: str
    status: int = 0
    seconds: float = 0.0

    @classmethod
    def http_status(cls, status: int) -> Fault:
        """Answer ``status`` with an empty body, without processing the command."""
        return cls("status", status=status)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait before processing and answering (the answer comes, late)."""
        return cls("delay", seconds=seconds)

    @classmethod
    def close(cls) -> Fault:
        """Read the request, then close the connection: nothing processed, no reply."""
        return cls("close")

    @classmethod
    def close_after_processing(cls) -> Fault:
        """Process the command (an SMS goes out, an OTP is stored), then close without reply."""
        return cls("close_after_processing")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    #: header names as sent, in order
    headers: tuple[tuple[str, str], ...]
    #: the raw body bytes (for a chunked body: the chunk payloads joined)
    body: bytes
    #: when the request arrived (Unix seconds)
    at: float = field(default_factory=time.time)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> list[str]:
        return [key.lower() for key, _ in self.headers]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Sent:
    """A message the device sent: an SMS (``subject`` None) or an e-mail."""

    receiver: str
    text: str
    subject: str | None = None

    @property
    def code(self) -> str:
        """The only run of 4 to 10 digits in the text (the OTP, for OTP messages)."""
        found = re.findall(r"(?<!\d)\d{4,10}(?!\d)", self.text)
        assert len(found) == 1, f"expected one code in {self.text!r}"
        return str(found[0])


@dataclass
class _OtpRecord:
    hash: str
    expires_ms: int


@dataclass
class OtpPi:
    """The device's state and switches; :meth:`start` serves it on a loopback port."""

    user: str = "otp"
    password: str = "pi-secret"
    otp_length: int = 6
    salt: str = field(default_factory=lambda: secrets.token_hex(8))
    modem_connected: bool = True
    mail_fails: bool = False
    drop_expired: bool = True
    #: how long after ``date_time`` an SMS without ``expiration`` is still sent
    expiration_offset: float = 30.0
    #: every request gets this fault (unless a queued one applies)
    fault: Fault | None = None
    #: seconds the modem takes per send-sms (the device answers once the SMS is out, and
    #: serves one request at a time)
    sms_seconds: float = 0.0
    #: share of requests answered 503 without processing (a flaky device), drawn from ``rng``
    transient_ratio: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    #: the device's clock, Unix seconds; tests may shift it to expire OTPs
    clock: Callable[[], float] = time.time

    requests: list[Request] = field(default_factory=list)
    inbox: list[Sent] = field(default_factory=list)
    blocked: set[str] = field(default_factory=set)
    #: unexpected exceptions inside the handler (a test can assert it stays empty)
    errors: list[BaseException] = field(default_factory=list)

    _otps: dict[str, _OtpRecord] = field(default_factory=dict)
    _faults: deque[Fault] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None
    _last_port: int = 0
    _thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> OtpPi:
        """Serve on a free loopback port; after a :meth:`stop`, on the same port again (a
        device switched off and on)."""
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._last_port), _Handler)
        self._last_port = int(server.server_address[1])
        server.device = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="otp-pi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            # Open keep-alive connections go too: a device switched off answers nothing.
            for connection in list(self._server.connections):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> OtpPi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port it serves on (or served on, while stopped)."""
        assert self._last_port, "start() the device first"
        return self._last_port

    def url(self, path: str = "/api/otp", *, user: str | None = None,
            password: str | None = None, **query: str) -> str:
        """A transport URL for this device, credentials included (percent-encoded)."""
        user = self.user if user is None else user
        password = self.password if password is None else password
        userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user else ""
        tail = f"?{urlencode(query)}" if query else ""
        return f"http://{userinfo}127.0.0.1:{self.port}{path}{tail}"

    # -- switches and inspection ---------------------------------------------------------

    def fail_next(self, *faults: Fault) -> None:
        """The next requests meet these faults, one each, in order."""
        with self._lock:
            self._faults.extend(faults)

    def otp_references(self) -> list[str]:
        with self._lock:
            return sorted(self._otps)

    def stored_hashes(self) -> list[str]:
        with self._lock:
            return [record.hash for record in self._otps.values()]

    def last_sent(self, receiver: str) -> Sent:
        for sent in reversed(self.inbox):
            if sent.receiver == receiver:
                return sent
        raise AssertionError(f"nothing was sent to {receiver!r}")

    def take_fault(self) -> Fault | None:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            if self.transient_ratio and self.rng.random() < self.transient_ratio:
                return Fault.http_status(503)
            return self.fault

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(header[len("Basic "):], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
        # The device splits at the first colon: a password holding ':' can never match.
        user, _, password = decoded.partition(":")
        return user == self.user and password == self.password

    def sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    # -- the device's MessageAPI -----------------------------------------------------------

    def process(self, body: bytes) -> tuple[dict[str, Any], bool]:
        """The reply object, and whether the device closes the connection without sending it."""
        with self._lock:  # the device answers one request at a time
            try:
                request = json.loads(body.decode("utf-8", errors="replace"))
            except ValueError:
                return {}, False
            if not isinstance(request, dict):
                return {}, False
            command = request.get("command")
            data = request.get("data")
            if not isinstance(command, str) or not isinstance(data, dict):
                return {}, False
            handler = {
                "send-sms": self._send_sms,
                "send-mail": self._send_mail,
                "send-message": self._send_message,
                "block-msisdn": self._block,
                "unblock-msisdn": self._unblock,
                "request-otp": self._request_otp,
                "verify-otp": self._verify_otp,
            }.get(command)
            if handler is None:
                return {}, False
            if command == "send-sms" and self.sms_seconds:
                self.sleep(self.sms_seconds)
            return handler(command, data)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _dropped_as_expired(self, data: dict[str, Any]) -> bool:
        if not self.drop_expired:
            return False
        if "expiration" in data:
            return _opt_long(data, "expiration") < self._now_ms()
        deadline = _opt_long(data, "date_time") * 1000 + int(self.expiration_offset * 1000)
        return deadline < self._now_ms()

    def _send_sms(self, command: str, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        reply: dict[str, Any] = {"command": command, "data": {}}
        if self._dropped_as_expired(data):
            return reply, False
        if not self.modem_connected:
            return {**reply, "response_code": NO_DEVICE_CONNECTED,
                    "error": "No modem connected"}, False
        self.inbox.append(Sent(_opt_string(data, "receiver"), _opt_string(data, "message")))
        return {**reply, "response_code": SUCCESS}, False

    def _send_mail(self, command: str, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        reply: dict[str, Any] = {"command": command}
        if self._dropped_as_expired(data):
            return reply, False
        if self.mail_fails:
            return {**reply, "response_code": FAILED,
                    "message": "Could not connect to SMTP host"}, False
        self.inbox.append(Sent(_opt_string(data, "receiver"), _opt_string(data, "message"),
                               _opt_string(data, "subject")))
        return {**reply, "response_code": SUCCESS,
                "message": "The message was sent successfuly"}, False

    def _send_message(self, command: str, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        if "@" in _opt_string(data, "receiver"):
            self._send_mail(command, data)
        else:
            self._send_sms(command, data)
        return {"command": command, "data": {}, "response_code": SUCCESS}, False

    def _block(self, command: str, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        self.blocked.add(_opt_string(data, "receiver"))
        return {"command": command, "response_code": SUCCESS}, False

    def _unblock(self, command: str, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        self.blocked.discard(_opt_string(data, "receiver"))
        return {"command": command, "response_code": SUCCESS}, False

    def _hash(self, reference: str, otp: str, receiver: str, params: list[str]) -> str:
        text = ":".join([reference, otp, receiver, *params, self.salt])
        return hashlib.sha512(text.encode("utf-8")).hexdigest()

    def _request_otp(self, command: str, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        reference = _opt_string(data, "reference").strip()
        receiver = _opt_string(data, "receiver").strip()
        subject = _opt_string(data, "subject").strip()
        params = [_opt_string(data, f"param{n}").strip() for n in range(1, 5)]
        template = _opt_string(data, "message").strip()
        expires_ms = _opt_long(data, "expiration") * 1000
        reply_data: dict[str, Any] = {}
        existing = self._otps.get(reference)
        if existing is not None and existing.expires_ms >= self._now_ms():
            code = DUPLICATED
        else:
            otp = f"{secrets.randbelow(10 ** self.otp_length):0{self.otp_length}d}"
            self._otps[reference] = _OtpRecord(self._hash(reference, otp, receiver, params),
                                               expires_ms)
            text = _java_format(template, otp)
            if text is None:
                return {}, True  # IllegalFormatException: the device drops the connection
            code = SUCCESS
            if "@" in receiver:
                if self.mail_fails:
                    code = FAILED
                else:
                    self.inbox.append(Sent(receiver, text, subject))
            elif self.modem_connected:
                self.inbox.append(Sent(receiver, text))
            else:
                code = FAILED
            if code == SUCCESS:
                reply_data = {"reference": reference, "receiver": receiver,
                              "date_time": _opt_string(data, "date_time")}
        return {"command": command, "data": reply_data, "response_code": code}, False

    def _verify_otp(self, command: str, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        reference = _opt_string(data, "reference").strip()
        receiver = _opt_string(data, "receiver").strip()
        params = [_opt_string(data, f"param{n}").strip() for n in range(1, 5)]
        otp = _opt_string(data, "otp")
        record = self._otps.get(reference)
        if record is None:
            code = INVALID_OTP
        elif record.expires_ms < self._now_ms():
            code = EXPIRED
        elif record.hash == self._hash(reference, otp, receiver, params):
            del self._otps[reference]
            code = SUCCESS
        else:
            code = INVALID_OTP
        return {"command": command, "response_code": code,
                "data": {"reference": reference, "receiver": receiver,
                         "date_time": _opt_string(data, "date_time")}}, False


def _opt_string(data: dict[str, Any], key: str) -> str:
    """org.json's ``optString(key, "")``."""
    value = data.get(key)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _opt_long(data: dict[str, Any], key: str) -> int:
    """org.json's ``optLong(key, 0)``: numbers and numeric strings, else 0."""
    value = data.get(key)
    if isinstance(value, bool):
        return 0
    try:
        return int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _java_format(template: str, otp: str) -> str | None:
    """``String.format(template, otp)``, or None where Java would throw."""
    rest = template.replace("%%", "")
    if "%" not in rest:
        return template.replace("%%", "%")
    if rest.count("%s") != 1 or "%" in rest.replace("%s", ""):
        return None
    return template % otp


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    device: OtpPi

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys  # noqa: PLC0415

        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError | OSError):
            return  # the client went away (a timed-out publisher): nothing to report
        if error is not None:
            self.device.errors.append(error)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    #: an idle keep-alive connection is dropped after this long
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (TimeoutError, ConnectionError):
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        self._serve()
        try:
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _serve(self) -> None:
        device = self.server.device
        body = self._read_body()
        headers = tuple((key, value) for key, value in self.headers.items())
        device.requests.append(Request(self.command, self.path, headers, body))
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if chunked:
            body = b""  # the device reads no chunked body
            self.close_connection = True
        if self.path.split("?", 1)[0] not in PATHS:
            self._empty(404)
            return
        if not device.authorized(self.headers.get("Authorization")):
            self._empty(401)
            return
        if self.command not in ("POST", "PUT"):
            self._empty(405)
            return
        fault = device.take_fault()
        if fault is not None and fault.kind == "delay":
            device.sleep(fault.seconds)
        elif fault is not None and fault.kind == "status":
            self._empty(fault.status)
            return
        elif fault is not None and fault.kind == "close":
            self.close_connection = True
            return
        reply, hang_up = device.process(body)
        if hang_up or (fault is not None and fault.kind == "close_after_processing"):
            self.close_connection = True
            return
        self._json(reply)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        reason = self.responses.get(status, ("",))[0]
        lines = [f"HTTP/1.1 {status} {reason}", f"Date: {formatdate(usegmt=True)}", *[
            f"{key}: {value}" for key, value in headers]]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def _empty(self, status: int) -> None:
        # com.sun.net.httpserver with sendResponseHeaders(status, 0): a chunked, empty body
        self.wfile.write(self._head(status, [("Transfer-encoding", "chunked")]) + b"0\r\n\r\n")

    def _json(self, reply: dict[str, Any]) -> None:
        body = json.dumps(reply, indent=4).encode("utf-8")
        self.wfile.write(self._head(200, [("Content-type", "application/json"),
                                          ("Content-length", str(len(body)))]) + body)


def free_port() -> int:
    """A loopback port nobody listens on (for "connection refused")."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


__all__ = ["Fault", "OtpPi", "Request", "Sent", "free_port"]
