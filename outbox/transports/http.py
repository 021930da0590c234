"""``http://`` / ``https://``: OTP-Pi's REST API (PROTOCOL.md section 3).

Every reply is classified deliberately:

=====================================  ==========================================
reply                                  outcome
=====================================  ==========================================
200, ``response_code`` ``0000``        delivered
``1101`` (no modem connected)          transient: the modem may come back
``1102`` on ``send-mail``              transient: the mail server may come back
``1102`` on ``request-otp``            permanent: the device stored the OTP but
                                       could not send it; a retry would only hit
                                       ``1201``
``1201`` on a first attempt            permanent: the reference already has a
                                       live OTP
``1201`` on a retry                    delivered: our earlier attempt reached the
                                       device (its reply was lost) and it stored
                                       the OTP then
``{}``                                 permanent: the device did not understand
                                       the command
``send-sms`` reply, no response_code   permanent: the device dropped it as
                                       expired (clock skew or wrong dialect)
other codes                            permanent, the code in the reason when it
                                       is four digits (anything else may echo a
                                       receiver: only its length is told)
401 (empty body)                       permanent: credentials refused
408, 429, 5xx                          transient
other 4xx, non-JSON reply              permanent
timeout, refused, closed, no reply     transient; after a timeout or a refused
                                       connection the rest of the batch is not
                                       tried (transient too)
=====================================  ==========================================
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from outbox.commands import CREATE_OTP, SEND_EMAIL, SEND_SMS
from outbox.errors import (
    ConfigurationError,
    NotTried,
    PermanentPublishError,
    PublishError,
    TransientPublishError,
    Unreachable,
)
from outbox.transports.base import Envelope, Failures, TransportOptions

SUCCESS = "0000"
NO_DEVICE_CONNECTED = "1101"
FAILED = "1102"
DUPLICATE = "1201"


class HttpTransport:
    def __init__(self, name: str, url: str, options: TransportOptions,
                 *, client: httpx.Client | None = None) -> None:
        self.name = name
        self.options = options
        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigurationError(f"transport {name!r}: the URL has no host")
        auth: httpx.BasicAuth | None = None
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
            if ":" in user or ":" in password:
                # The device splits "user:password" at the first colon: such credentials can
                # never match, so refuse them here rather than fail every message with 401.
                raise ConfigurationError(
                    f"transport {name!r}: OTP-Pi cannot accept a user or password containing ':'"
                )
            auth = httpx.BasicAuth(user, password)
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in (parts.hostname or "") and not netloc.startswith("["):
            netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        self.url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        self._client = client or httpx.Client(
            auth=auth,
            timeout=httpx.Timeout(options.timeout),
            headers={"User-Agent": "outbox-relay"},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        if client is not None and auth is not None:
            self._client.auth = auth

    # -- Transport ------------------------------------------------------------------------

    def publish(self, batch: Sequence[Envelope]) -> Failures:
        failures: Failures = {}
        unreachable: NotTried | None = None
        for envelope in batch:  # the device answers one request at a time
            if unreachable is not None:
                # Do not wait out one timeout per row while the batch holds its row locks.
                failures[envelope.id] = unreachable
                continue
            try:
                reply = self._post(envelope.body, idempotency_key=str(envelope.id))
                classify(envelope, reply)
            except _UnreachableError as exc:
                unreachable = NotTried(f"not tried: {exc}")
                failures[envelope.id] = exc
            except PublishError as exc:
                failures[envelope.id] = exc
        return failures

    def check(self) -> None:
        """Reachable and the credentials accepted (the device checks them before the method)."""
        try:
            response = self._client.request("OPTIONS", self.url)
        except httpx.HTTPError as exc:
            raise TransientPublishError(
                f"{self.name}: cannot reach {self._where()}: {_reason(exc)}") from exc
        if response.status_code == 401:
            raise PermanentPublishError(f"{self.name}: device refused the credentials (HTTP 401)")

    def close(self) -> None:
        self._client.close()

    # -- synchronous calls (verify-otp) --------------------------------------------------

    def call(self, body: bytes, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST one command and return the device's JSON reply (for verify-otp)."""
        return self._post(body, idempotency_key=idempotency_key)

    def _post(self, body: bytes, *, idempotency_key: str | None) -> dict[str, Any]:
        # Per request, not on the client: an injected client must send them too. ``content``
        # as bytes makes httpx send a Content-Length (the device reads no chunked body).
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        try:
            response = self._client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise _UnreachableError(f"{self._where()} timed out: {_reason(exc)}") from exc
        except httpx.RemoteProtocolError as exc:
            raise TransientPublishError(
                f"{self._where()} closed the connection without a reply"
            ) from exc
        except httpx.ConnectError as exc:
            raise _UnreachableError(f"cannot reach {self._where()}: {_reason(exc)}") from exc
        except httpx.HTTPError as exc:
            raise TransientPublishError(f"cannot reach {self._where()}: {_reason(exc)}") from exc
        return parse_reply(response)

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"


class _UnreachableError(Unreachable):
    """A timeout or a refused connection: the rest of the batch is not tried."""


def parse_reply(response: httpx.Response) -> dict[str, Any]:
    status = response.status_code
    if status == 401:
        raise PermanentPublishError("device refused the credentials (HTTP 401)")
    if status in (408, 425, 429) or status >= 500:
        raise TransientPublishError(f"device answered HTTP {status}")
    if not 200 <= status < 300:
        raise PermanentPublishError(f"device answered HTTP {status}")
    try:
        reply = json.loads(response.content) if response.content.strip() else None
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise PermanentPublishError(f"device answered HTTP {status} without a JSON object")
    return reply


def classify(envelope: Envelope, reply: dict[str, Any]) -> None:
    """Raise unless ``reply`` means the device took the command."""
    if not reply:
        raise PermanentPublishError("device did not understand the command (reply {})")
    code = reply.get("response_code")
    if code is None:
        if envelope.command == SEND_SMS:
            raise PermanentPublishError(
                "device dropped the SMS as expired (check the clocks and the dialect)"
            )
        raise PermanentPublishError("device reply has no response_code")
    code = str(code)
    if code == SUCCESS:
        return
    if code == NO_DEVICE_CONNECTED:
        raise TransientPublishError("device has no modem connected (1101)")
    if code == FAILED:
        if envelope.command == CREATE_OTP:
            raise PermanentPublishError(
                "device stored the OTP but could not send it (1102); a retry would be refused "
                "as a duplicate: create a new OTP with a new reference"
            )
        what = "e-mail" if envelope.command == SEND_EMAIL else "message"
        raise TransientPublishError(f"device failed to send the {what} (1102)")
    if code == DUPLICATE and envelope.command == CREATE_OTP:
        if envelope.attempt > 1:
            return  # our earlier attempt reached the device; its reply was lost
        raise PermanentPublishError("reference already has a live OTP on the device (1201)")
    raise PermanentPublishError(f"device answered response_code {reply_code(code)}")


def reply_code(code: object) -> str:
    """A device's response_code as it may be shown (in ``last_error``, logs, ``outbox failed
    list``): the device's codes are four digits; anything else may be an echo of what was
    sent (a receiver, a text), so only its length is told."""
    text = str(code)
    if len(text) == 4 and text.isascii() and text.isdigit():
        return text
    return f"that is not a device code ({len(text)} characters, not shown)"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["HttpTransport", "classify", "parse_reply", "reply_code"]
