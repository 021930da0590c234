"""``outbox gateway``: OTP-Pi's REST API in front of the outbox (PROTOCOL.md sections 3, 8, 9).

Applications written for the device (the PHP OTP-Publisher library, curl scripts) point
their URL here instead and get the outbox's guarantees unchanged:

* ``POST``/``PUT`` on ``/api/otp``, ``/api/sms``, ``/api/email``, ``/api/message``,
  ``/api/block``, ``/api/unblock``: every path takes every command, as on the device. The
  body is read whatever its ``Content-Type`` (the PHP client sends none) and parsed as
  leniently as the device's org.json (trailing commas, single quotes: JSON5).
* A send/block/create command is committed to ``outbox.message`` through
  :func:`outbox.producer.enqueue`, like ``outbox enqueue``; the reply's ``0000`` means
  *durably accepted*, not delivered. The row records the gateway user in ``enqueued_by``.
* ``validate-otp``/``verify-otp`` answer at once with :func:`outbox.otp.validate`, like
  ``outbox otp validate``.
* Replies as the device gives them: ``{}`` for what it would not understand, 401 with an
  empty body for bad credentials, 405 empty for other methods, 404 empty for other paths;
  400 (409 for a reused idempotency key, 413 for a huge body) with ``{"command", "rule",
  "error"}`` naming the rule for a body the outbox refuses; 503 with a rule when the
  database (or, for device OTPs, the device) cannot answer.
* Idempotency: the ``Idempotency-Key`` header, else ``data.id``, becomes the row's dedup key
  ``gw:<user>:<key>``; a retry gets the first answer again and makes no second row.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import orjson
import psycopg
import pyjson5
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from outbox import db, otp
from outbox.commands import (
    ALIASES,
    COMMANDS,
    CREATE_OTP,
    SYNCHRONOUS,
    canonical_command,
    validate,
)
from outbox.errors import ConfigurationError, InvalidCommand, OutboxError, PublishError
from outbox.logs import get_logger, scrub_text
from outbox.passwords import UsersFile
from outbox.producer import enqueue
from outbox.settings import Settings
from outbox.store import (
    AcceptedMessage,
    find_message_by_dedup_key,
    lock_otp_reference,
    otp_reference_is_live,
    read_accepted_many,
)
from outbox.transports import OtpMode
from outbox.web.batching import GroupCommit

log = get_logger("outbox.gateway")

PATHS: tuple[str, ...] = ("/api/otp", "/api/sms", "/api/email", "/api/message", "/api/block",
                          "/api/unblock")
#: every command name a client may send (README's and device's)
KNOWN_COMMANDS: frozenset[str] = frozenset(
    {*COMMANDS, *ALIASES, "send-message", *SYNCHRONOUS})
#: the device's codes (PROTOCOL.md section 3) and managed mode's 1204: a closed label set
DEVICE_CODES: frozenset[str] = frozenset(
    {"0000", "1000", "1100", "1101", "1102", "1201", "1202", "1203", "1204"})
DUPLICATE = "1201"
ACCEPTED = "0000"

#: far above any command (an e-mail with a long text is a few KiB); refused above it
MAX_BODY_BYTES = 256 * 1024
#: an idempotency key longer than this is refused (it becomes part of a unique index)
MAX_KEY_LENGTH = 200
#: argon2 verifications running at once: each takes 64 MiB and a core for tens of ms
PASSWORD_CHECKS_AT_ONCE = 2
#: commands committed in one transaction at most (group commit)
MAX_BATCH = 100
#: org.json nests as deep as the stack allows; nobody's command needs more than this
MAX_NESTING = 32

#: set by ``outbox gateway`` for the worker processes it starts (not a user setting)
WORKER_ENV = "OUTBOX_GATEWAY_WORKER"


# --- pure helpers (unit-tested) -------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any] | None:
    """The request object, or None where the device would answer ``{}``.

    JSON5 is a superset of JSON with what org.json also takes from hand-written bodies
    (trailing commas, single-quoted strings). NaN and Infinity parse in JSON5 but jsonb cannot
    hold them, so a body with them is not understood either.
    """
    try:
        parsed = pyjson5.decode(raw.decode("utf-8", errors="replace"), maxdepth=MAX_NESTING)
    except (pyjson5.Json5Exception, ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict) or not _finite(parsed):
        return None
    return parsed


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    if isinstance(value, list):
        return all(_finite(item) for item in value)
    return True


def idempotency_key(header: str | None, data: Mapping[str, Any], command: str) -> str | None:
    """The request's idempotency key: the ``Idempotency-Key`` header, else ``data.id`` of
    this (README-named) command, else None.

    A ``data.id`` counts per command: the README's own examples give an SMS and an e-mail
    the same id, and the PHP library's samples use ``time()``, so ids of different commands
    are not the same request. A header names one request whatever it carries.
    """
    if header is not None and header.strip():
        kind, text = "key", header.strip()
    else:
        value = data.get("id")
        if value is None or isinstance(value, bool | dict | list):
            return None
        kind, text = command, str(value).strip()
        if not text:
            return None
    if len(text) > MAX_KEY_LENGTH:
        raise InvalidCommand("gateway_idempotency_key_length",
                             f"the idempotency key is longer than {MAX_KEY_LENGTH} characters")
    return f"{kind}:{text}"


def dedup_key(user: str | None, key: str) -> str:
    """The row's dedup key: scoped by gateway user, so two clients' keys never collide."""
    return f"gw:{user or ''}:{key}"


#: what makes two commands the same command for a replay (times and ids may differ)
_IDENTITY_FIELDS = ("receiver", "message", "subject", "reference", "param1", "param2",
                    "param3", "param4")


def same_command(stored: AcceptedMessage, command: str, data: Mapping[str, Any]) -> bool:
    """Whether a retry carrying an idempotency key asks for what the stored row holds.

    ``date_time``, ``expiration`` and ``id`` are left out: a client rebuilds them on a retry.
    A text the relay blanked after sending (``blank_terminal_texts``) cannot be compared and
    is taken as equal.
    """
    if stored.command != command:
        return False
    for name in _IDENTITY_FIELDS:
        if name in ("message", "subject") and name not in stored.data:
            continue
        if _text(stored.data.get(name)) != _text(data.get(name)):
            return False
    return True


def _text(value: object) -> str:
    """A field as the device reads it (``optString(key, "").trim()``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """User and password of an ``Authorization: Basic`` header, or None when malformed."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        return None
    return user, password


def command_label(command: object) -> str:
    """The ``command`` metric label: a known name, ``other`` or ``none`` (a closed set)."""
    if not isinstance(command, str):
        return "none"
    name = command.strip().lower()
    return name if name in KNOWN_COMMANDS else "other"


# --- metrics ----------------------------------------------------------------------------------

# As the relay's metrics: the per-series *_created timestamps double every scrape for nothing.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter(
    "outbox_gateway_requests",
    "Requests answered by the gateway, by path, command and code (a device code such as "
    "0000 or 1201, not_understood for {}, or refused, unauthorized, method_not_allowed, "
    "not_found, unavailable, error).",
    ["path", "command", "code"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "outbox_gateway_request_duration_seconds",
    "Time from the request's arrival to its answer, by command.",
    ["command"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)


def metrics_exposition() -> bytes:
    """This process's metrics, or every worker's when ``outbox gateway --workers N`` set up
    prometheus_client's multiprocess directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess  # noqa: PLC0415

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


# --- replies ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    code: str
    headers: Mapping[str, str] | None = None



def _empty(status: int, code: str, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, b"", code, headers)


NOT_UNDERSTOOD = Reply(200, b"{}", "not_understood")
UNAUTHORIZED = _empty(401, "unauthorized", {"WWW-Authenticate": 'Basic realm="outbox gateway"'})
METHOD_NOT_ALLOWED = _empty(405, "method_not_allowed", {"Allow": "POST, PUT"})
NOT_FOUND = _empty(404, "not_found")


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        # A lone surrogate a client sent (validate-otp echoes its fields): escaped, not lost.
        return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _answer(command: str, code: str, date_time: float, receiver: object,
            reference: object) -> Reply:
    data: dict[str, Any] = {"date_time": int(date_time), "receiver": _text(receiver)}
    if reference is not None:
        data["reference"] = _text(reference)
    return Reply(200, _json_bytes({"command": command, "response_code": code, "data": data}),
                 code if code in DEVICE_CODES else "other")


def _refusal(status: int, command: object, rule: str, message: str,
             code: str = "refused") -> Reply:
    body = {"command": command if isinstance(command, str) else None, "rule": rule,
            "error": scrub_text(message)}
    return Reply(status, _json_bytes(body), code)


def _database_refusal(command: str, exc: Exception) -> Reply:
    """The answer for an error the database raised while enqueueing."""
    if isinstance(exc, psycopg.DataError):
        return _refusal(400, command, "message_data_storable",
                        "data holds a value PostgreSQL cannot store")
    if isinstance(exc, psycopg.IntegrityError):
        # The database's own rules (the INSERT trigger) name the rule as the constraint.
        rule = getattr(exc.diag, "constraint_name", None) or "message_rules"
        return _refusal(400, command, rule, f"the database refused the command ({rule})")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError | TimeoutError):
        log.warning("gateway.database_unavailable", error=type(exc).__name__,
                    detail=scrub_text(str(exc).splitlines()[0] if str(exc) else ""))
        return _refusal(503, command, "database_unavailable",
                        "the outbox database cannot be reached; retry with the same "
                        "idempotency key", code="unavailable")
    raise exc


@dataclass(frozen=True, slots=True)
class Pending:
    """A command on its way into a group-commit batch."""

    command: str
    canonical: str
    data: dict[str, Any]
    user: str | None
    dedup: str | None


def _accepted_answer(pending: Pending, accepted: AcceptedMessage) -> Reply:
    """``0000`` with the row's own time, receiver and reference (the first request's, for a
    retry), or 409 when the key names a row holding another command."""
    if pending.dedup is not None and not same_command(accepted, pending.canonical, pending.data):
        return _refusal(409, pending.command, "gateway_idempotency_key_reused",
                        "this idempotency key (Idempotency-Key or data.id) was used for "
                        "another command")
    return _answer(pending.command, ACCEPTED, accepted.created_at, accepted.data.get("receiver"),
                   accepted.data.get("reference"))


def _storable(text: str) -> bool:
    """Whether Postgres can hold ``text`` (no NUL, no lone surrogate)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- the gateway ------------------------------------------------------------------------------


def _jsonb_dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: the standard library can
        return json.dumps(value).encode("utf-8")


def _configure_connection(connection: psycopg.Connection[Any]) -> None:
    # orjson for the jsonb of every row and every answer read back: several times faster.
    set_json_dumps(_jsonb_dumps, context=connection)
    set_json_loads(orjson.loads, context=connection)


class Gateway:
    """The API endpoint: one ASGI callable for every API path and method."""

    def __init__(self, settings: Settings, *, database_url: str,
                 users: UsersFile | None) -> None:
        self.settings = settings
        self.users = users
        self.pool = ConnectionPool(
            database_url, min_size=1, max_size=settings.gateway_pool_size, open=False,
            kwargs={"autocommit": True, "connect_timeout": 5}, name="outbox-gateway",
            timeout=10.0, configure=_configure_connection)
        # Half the connections commit batches of commands, half serve OTP validations.
        share = max(1, settings.gateway_pool_size // 2)
        self.committer: GroupCommit[Pending, Reply] = GroupCommit(
            self._accept_batch, threads=share, max_batch=MAX_BATCH, name="gateway-commit")
        self._database_work = anyio.CapacityLimiter(share)
        self._password_checks = anyio.CapacityLimiter(PASSWORD_CHECKS_AT_ONCE)

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request = Request(scope, receive)
        command: object = None
        user: str | None = None
        try:
            reply, command, user = await self._handle(request)
        except Exception as exc:  # an answer, never a dropped connection or a traceback page
            log.error("gateway.error", error=type(exc).__name__, detail=scrub_text(str(exc)))
            reply = _refusal(500, command, "gateway_internal", "internal error", code="error")
        label = command_label(command)
        REQUESTS.labels(scope["path"], label, reply.code).inc()
        elapsed = time.perf_counter() - started
        LATENCY.labels(label).observe(elapsed)
        log.info("gateway.request", method=scope["method"], path=scope["path"],
                 status=reply.status, command=label, answer=reply.code, user=user,
                 duration_ms=round(elapsed * 1000, 2))
        # Straight to ASGI: a Starlette Response per request was a tenth of the CPU.
        headers = [(b"content-length", str(len(reply.body)).encode("ascii"))]
        if reply.body:
            headers.append((b"content-type", b"application/json"))
        headers.extend((name.lower().encode("latin-1"), value.encode("latin-1"))
                       for name, value in (reply.headers or {}).items())
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _handle(self, request: Request) -> tuple[Reply, object, str | None]:
        authorized, user = await self._authenticate(request)
        if not authorized:
            return UNAUTHORIZED, None, None
        if request.method not in ("POST", "PUT"):
            return METHOD_NOT_ALLOWED, None, user
        raw = await self._read_body(request)
        if raw is None:
            return self._too_large(), None, user
        body = parse_body(raw)
        if body is None:
            return NOT_UNDERSTOOD, None, user
        command, data = body.get("command"), body.get("data")
        if not isinstance(command, str) or not isinstance(data, dict):
            return NOT_UNDERSTOOD, command, user
        return await self._dispatch(request, command, data, user), command, user

    async def _authenticate(self, request: Request) -> tuple[bool, str | None]:
        """Whether the request may go on, and as which user (None without a users file)."""
        if self.users is None:
            return True, None
        credentials = basic_credentials(request.headers.get("authorization"))
        if credentials is None:
            return False, None
        account = self.users.cached(*credentials)
        if account is None:
            async with self._password_checks:
                account = await anyio.to_thread.run_sync(self.users.authenticate, *credentials)
        return (False, None) if account is None else (True, account.name)

    @staticmethod
    async def _read_body(request: Request) -> bytes | None:
        """The whole body, chunked or not; None when it exceeds :data:`MAX_BODY_BYTES`."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _dispatch(self, request: Request, command: str, data: dict[str, Any],
                        user: str | None) -> Reply:
        name = command.strip().lower()
        if name in SYNCHRONOUS:
            return await self._in_thread(self._validate_otp, command, data)
        try:
            canonical = canonical_command(name, data)
        except InvalidCommand:
            return NOT_UNDERSTOOD  # echo, request-ussd, anything else: not for the outbox
        try:
            key = idempotency_key(request.headers.get("idempotency-key"), data, canonical)
        except InvalidCommand as exc:
            return _refusal(400, command, exc.rule, exc.message)
        try:
            # Refused before it joins a batch: the rules need no database.
            validate(canonical, data, now=time.time())
        except InvalidCommand as exc:
            return _refusal(400, command, exc.rule, exc.message)
        pending = Pending(command, canonical, data, user,
                          None if key is None else dedup_key(user, key))
        return await self.committer.submit(pending)

    @staticmethod
    def _too_large() -> Reply:
        return _refusal(413, None, "gateway_body_too_large",
                        f"the body is larger than {MAX_BODY_BYTES} bytes")

    async def _in_thread(self, function: Any, *args: Any) -> Reply:
        async with self._database_work:
            reply: Reply = await anyio.to_thread.run_sync(function, *args)
        return reply

    # -- enqueueing (worker threads) -----------------------------------------------------------

    def _accept_batch(self, batch: Sequence[Pending]) -> list[Reply]:
        """Commit a batch of commands in one transaction (group commit): one answer each.

        A refusal in Python (``InvalidCommand``) touches no row and leaves the transaction
        usable; a refusal by the database aborts it, so the batch is then done again one
        command per transaction, and only the command at fault is refused.
        """
        try:
            return self._commit_batch(batch)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if len(batch) == 1 or isinstance(exc, psycopg.OperationalError | OSError |
                                             TimeoutError | psycopg.InterfaceError):
                return [_database_refusal(pending.command, exc) for pending in batch]
            return [self._accept_batch([pending])[0] for pending in batch]

    def _commit_batch(self, batch: Sequence[Pending]) -> list[Reply]:
        outcomes: list[Reply | int] = []
        with self.pool.connection() as connection, connection.transaction(), \
                connection.cursor() as cursor:
            for pending in batch:
                try:
                    if pending.canonical == CREATE_OTP:
                        duplicate = self._duplicate_otp(cursor, pending)
                        if duplicate is not None:
                            outcomes.append(duplicate)
                            continue
                    outcomes.append(enqueue(cursor, pending.canonical, pending.data,
                                            dedup_key=pending.dedup, enqueued_by=pending.user))
                except InvalidCommand as exc:
                    outcomes.append(_refusal(400, pending.command, exc.rule, exc.message))
            accepted = read_accepted_many(
                cursor, [outcome for outcome in outcomes if isinstance(outcome, int)])
        return [outcome if isinstance(outcome, Reply) else _accepted_answer(pending, accepted[outcome])
                for pending, outcome in zip(batch, outcomes, strict=True)]

    def _duplicate_otp(self, cursor: Any, pending: Pending) -> Reply | None:
        """The device's 1201 when the reference still has a live OTP; None to go on.

        A retry of the row that took the reference is not a duplicate: it gets the first
        answer again (enqueue finds the row by its dedup key).
        """
        reference = _text(pending.data.get("reference"))
        if not reference:
            return None  # enqueue refuses it, naming message_otp_reference
        lock_otp_reference(cursor, reference)
        if pending.dedup is not None and find_message_by_dedup_key(cursor, pending.dedup):
            return None
        if otp_reference_is_live(cursor, reference):
            return _answer(pending.command, DUPLICATE, time.time(), pending.data.get("receiver"),
                           reference)
        return None

    # -- validating OTPs -------------------------------------------------------------------------

    def _validate_otp(self, command: str, data: Mapping[str, Any]) -> Reply:
        reference, receiver = _text(data.get("reference")), _text(data.get("receiver"))
        params = [_text(data.get(f"param{index}")) for index in range(1, 5)]
        code = _text(data.get("otp"))
        if not all(map(_storable, (reference, receiver, code, *params))):
            # No OTP was ever created with such a field (create-otp refuses them): unknown.
            return _answer(command, otp.INVALID, time.time(), receiver, reference)
        try:
            route = otp.otp_route(self.settings)
            if route.mode is OtpMode.DEVICE:
                result = otp.validate(reference, receiver, code, params,
                                      settings=self.settings)
            else:
                with self.pool.connection() as connection:
                    result = otp.validate(reference, receiver, code, params,
                                          settings=self.settings, connection=connection)
        except ConfigurationError as exc:
            return _refusal(503, command, "gateway_configuration", str(exc), code="unavailable")
        except PublishError as exc:
            return _refusal(503, command, "otp_device_unreachable",
                            f"the device did not answer: {exc}", code="unavailable")
        except (psycopg.OperationalError, OSError, TimeoutError, OutboxError):
            return _refusal(503, command, "database_unavailable",
                            "the outbox database cannot be reached", code="unavailable")
        return _answer(command, result.code, time.time(), receiver, reference)

    # -- health ------------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        problems: list[str] = []
        try:
            with self.pool.connection(timeout=3) as connection:
                connection.execute("SELECT 1")
        except Exception as exc:  # any failure means "not ready"; the detail says which
            problems.append(f"database: {type(exc).__name__}")
        if self.users is not None:
            try:
                self.users.users  # noqa: B018 - reloads a changed file, raises when unreadable
            except ConfigurationError as exc:
                problems.append(str(exc))
        return (not problems, "; ".join(problems) or "ok")


# --- the application ----------------------------------------------------------------------------


def create_app(settings: Settings, *, database_url: str | None = None,
               insecure_no_auth: bool = False) -> ASGIApp:
    """The gateway as an ASGI application.

    Without ``settings.gateway_users`` it refuses to exist unless ``insecure_no_auth`` says
    so explicitly: every network service outbox ships refuses anonymous use by default.
    """
    users: UsersFile | None = None
    if settings.gateway_users:
        users = UsersFile(settings.gateway_users, ttl=settings.gateway_auth_cache_ttl)
    elif not insecure_no_auth:
        raise ConfigurationError(
            "outbox gateway needs a users file: set OUTBOX_GATEWAY_USERS (create it with "
            "`outbox gateway passwd USER`), or pass --insecure-no-auth to accept anyone")
    url = database_url or db.resolve_database_url(settings)
    gateway = Gateway(settings, database_url=url, users=users)

    async def livez(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        ok, detail = await anyio.to_thread.run_sync(gateway.ready)
        return PlainTextResponse(detail + "\n", status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(metrics_exposition(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway.pool.open(wait=False)
        gateway.committer.start()
        log.info("gateway.started", auth="users file" if users is not None else "none",
                 pid=os.getpid())
        try:
            yield
        finally:
            gateway.committer.stop(timeout=30)
            gateway.pool.close(timeout=5)
            log.info("gateway.stopped", pid=os.getpid())

    routes = [
        Route("/livez", livez),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/openapi.json", openapi),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway

    async def not_found(request: Request, exc: Exception) -> Response:
        REQUESTS.labels("other", "none", "not_found").inc()
        return Response(b"", status_code=404)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return Response(b"", status_code=405, headers={"Allow": "GET"})

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, method_not_allowed)
    return _Front(gateway, app)


class _Front:
    """The API paths go straight to the gateway; the rest (health, metrics, the document,
    404s, the lifespan) through Starlette. Starlette's router and middleware stack were a
    sixth of the CPU of a request that needs none of them."""

    def __init__(self, gateway: Gateway, app: Starlette) -> None:
        self.gateway = gateway
        self.app = app
        self._paths = frozenset(PATHS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self._paths:
            await self.gateway(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def app_from_env() -> ASGIApp:
    """The application for a uvicorn worker process that ``outbox gateway`` started."""
    options = json.loads(os.environ.get(WORKER_ENV) or "{}")
    settings = Settings.from_env(config_file=options.get("config"))
    from outbox import logs  # noqa: PLC0415

    logs.configure(level=settings.log_level, fmt=settings.log_format)
    return create_app(settings, insecure_no_auth=bool(options.get("insecure_no_auth")))


# --- the OpenAPI document -------------------------------------------------------------------------


def openapi_document() -> dict[str, Any]:
    """What the gateway accepts and answers, for clients and for schemathesis."""
    from outbox.web.openapi import document  # noqa: PLC0415

    return document(PATHS)


__all__ = [
    "PATHS",
    "Gateway",
    "app_from_env",
    "basic_credentials",
    "create_app",
    "dedup_key",
    "idempotency_key",
    "openapi_document",
    "parse_body",
    "same_command",
]
