"""``outbox console``: the operator's console, in a browser.

A Starlette application. Pages are rendered on the server from Jinja2 templates; one small
script (``static/console.js``, no build step) refreshes the overview in place every few
seconds and toggles check boxes. Everything it shows comes from :mod:`outbox.admin` and
:mod:`outbox.dashboard`, the functions behind ``outbox status`` and ``outbox failed``.

Paths: ``/`` the overview, ``/failed`` failed rows with filters and actions, ``/rows/ID`` one
row, ``/audit`` the actions taken; ``/api/overview``, ``/api/failed``, ``/api/rows/ID`` and
``/api/audit`` the same data as JSON; ``POST /actions`` retries or discards.

Safety:
- HTTP Basic against the users file ``console_users`` (``outbox console passwd``); the third
  field of a user's line is the role, ``viewer`` (the default: sees everything) or
  ``operator`` (may also retry and discard).
- ``POST /actions`` needs a same-origin request (``Origin``, else ``Referer``, and
  ``Sec-Fetch-Site`` when the browser sends it) and the user's form token: a page on another
  site cannot make a logged-in browser act. An action is counted and confirmed first.
- Receivers are masked and reasons scrubbed everywhere, texts and OTPs never read; every
  response carries ``Cache-Control: no-store`` and a Content-Security-Policy that allows no
  inline script.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import importlib.resources
import json
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
import psycopg
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbox import admin, dashboard, db
from outbox.admin import FailedFilter
from outbox.commands import COMMANDS
from outbox.dashboard import Check, MinuteOutcomes
from outbox.errors import ConfigurationError
from outbox.logs import get_logger
from outbox.passwords import UsersFile
from outbox.settings import Settings, parse_duration

log = get_logger("outbox.console")

VIEWER, OPERATOR = "viewer", "operator"
ROLES = (VIEWER, OPERATOR)
#: how often the overview refreshes itself in the browser
REFRESH_SECONDS = 2.0
#: how often the transports are probed (the /readyz checks) for the overview
HEALTH_INTERVAL_SECONDS = 5.0
#: failed rows shown per page
FAILED_PAGE_ROWS = 100
#: database connections the console keeps (a few operators, a page each)
POOL_SIZE = 4
REALM = "outbox console"

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-store"),
    (b"pragma", b"no-cache"),
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
     b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


# --- who is asking -------------------------------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    """The person behind a request: their name and role."""

    name: str
    role: str

    @property
    def may_act(self) -> bool:
        return self.role == OPERATOR


def role_of(extra: str | None) -> str:
    """The role in a users-file line's third field; none or anything else: viewer."""
    value = (extra or "").strip()
    return value if value in ROLES else VIEWER


def parse_basic(header: str) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` header, None if not one."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon and user else None


class Authenticator:
    """HTTP Basic against a users file; ``None`` users: everyone is an operator (only with
    ``--insecure-no-auth``)."""

    def __init__(self, users: UsersFile | None) -> None:
        self.users = users

    def identify(self, authorization: str | None) -> Viewer | None:
        if self.users is None:
            return Viewer("anonymous", OPERATOR)
        credentials = parse_basic(authorization or "")
        if credentials is None:
            return None
        user = self.users.authenticate(*credentials)
        return None if user is None else Viewer(user.name, role_of(user.extra))


def same_origin(headers: Mapping[str, str], scheme: str, host: str) -> bool:
    """Whether a request comes from a page of this console, by what the browser says.

    ``Sec-Fetch-Site`` (when sent) must be ``same-origin``; ``Origin`` must name this
    scheme and host; a request without ``Origin`` is judged by its ``Referer``; one with
    neither is refused (every current browser sends one of them on a POST).
    """
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    expected = f"{scheme}://{host}".lower()
    origin = headers.get("origin")
    if origin is not None:
        return origin.lower() == expected
    referer = headers.get("referer")
    if not referer:
        return False
    parts = urlsplit(referer)
    return f"{parts.scheme}://{parts.netloc}".lower() == expected


class CsrfTokens:
    """A form token per user: an HMAC of the name under a key drawn when the console
    starts, so it is never stored and changes with every start."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def token(self, user: str) -> str:
        return hmac.new(self._key, user.encode("utf-8"), hashlib.sha256).hexdigest()

    def valid(self, user: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.token(user), token or "")


# --- the chart -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    #: (kind, y, height) from the bottom up: sent, failed, expired
    segments: tuple[tuple[str, float, float], ...]
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    peak: int
    bars: tuple[Bar, ...]
    totals: dict[str, int]
    first: str
    last: str


def chart(minutes: Sequence[MinuteOutcomes], *, width: int = 600, height: int = 120) -> Chart:
    """Stacked bars, one per minute, scaled to the busiest minute (at least 1)."""
    peak = max((minute.total for minute in minutes), default=0)
    scale = height / max(peak, 1)
    slot = width / max(len(minutes), 1)
    gap = min(1.0, slot / 4)
    bars = []
    for index, minute in enumerate(minutes):
        bottom = float(height)
        segments = []
        for kind in ("sent", "failed", "expired"):
            value = getattr(minute, kind)
            if value:
                tall = max(value * scale, 1.0)
                bottom -= tall
                segments.append((kind, round(bottom, 2), round(tall, 2)))
        bars.append(Bar(round(index * slot + gap / 2, 2), round(slot - gap, 2), tuple(segments),
                        f"{minute.minute:%H:%M}: {minute.sent} sent, {minute.failed} failed, "
                        f"{minute.expired} expired"))
    totals = {kind: sum(getattr(minute, kind) for minute in minutes)
              for kind in ("sent", "failed", "expired")}
    return Chart(width, height, peak, tuple(bars), totals,
                 f"{minutes[0].minute:%H:%M}" if minutes else "",
                 f"{minutes[-1].minute:%H:%M}" if minutes else "")


# --- filters from a form -------------------------------------------------------------------


class BadRequest(Exception):
    """Input the console cannot use; the message names the field."""


FILTER_FIELDS = ("command", "route", "older_than", "newer_than", "reason")


def parse_filter(values: Mapping[str, str]) -> FailedFilter:
    """The failed-row filter of a query string or form; empty fields are no condition."""
    fields = {name: (values.get(name) or "").strip() for name in FILTER_FIELDS}
    if fields["command"] and fields["command"] not in COMMANDS:
        raise BadRequest(f"command {fields['command']!r} is not one of {', '.join(COMMANDS)}")
    ages: dict[str, float | None] = {}
    for name in ("older_than", "newer_than"):
        try:
            ages[name] = parse_duration(fields[name]) if fields[name] else None
        except ValueError as exc:
            raise BadRequest(f"{name.replace('_', ' ')}: {exc}") from None
    for name in ("route", "reason"):
        if len(fields[name]) > 200:
            raise BadRequest(f"{name} is longer than 200 characters")
    return FailedFilter(command=fields["command"] or None, route=fields["route"] or None,
                        older_than=ages["older_than"], newer_than=ages["newer_than"],
                        reason=fields["reason"] or None)


def parse_ids(values: Sequence[str]) -> tuple[int, ...]:
    try:
        return admin.parse_ids(values)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def filter_query(values: Mapping[str, str]) -> str:
    """The filter fields that are set, as a query string."""
    return urlencode([(name, values[name]) for name in FILTER_FIELDS if values.get(name)])


# --- the transports' health ----------------------------------------------------------------


class HealthWatch:
    """The /readyz checks, run in a thread of their own every ``interval`` seconds, so a
    transport that takes its time to answer never holds up a page."""

    def __init__(self, settings: Settings, database_url: str, *,
                 interval: float = HEALTH_INTERVAL_SECONDS) -> None:
        self.settings = settings
        self.database_url = database_url
        self.interval = interval
        self._latest: tuple[Check, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def latest(self) -> tuple[Check, ...]:
        return self._latest

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-console-health",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from outbox.health import Readiness  # noqa: PLC0415 - opens transports: only when served

        readiness = Readiness(self.settings, self.database_url, cache_seconds=0.0)
        try:
            while not self._stop.is_set():
                self._latest = self._probe(readiness)
                self._stop.wait(self.interval)
        finally:
            readiness.close()

    @staticmethod
    def _probe(readiness: Any) -> tuple[Check, ...]:
        try:
            return tuple(Check(result.name, result.ok, result.detail)
                         for result in readiness.results())
        except Exception as exc:  # a transport that cannot even be opened
            log.warning("console.health_failed", error=type(exc).__name__)
            return (Check("transports", False, f"cannot open the transports: {exc}"),)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


# --- the application -----------------------------------------------------------------------


def _templates() -> Jinja2Templates:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("outbox.web", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters["age"] = format_age
    environment.filters["count"] = format_count
    environment.filters["when"] = format_when
    environment.filters["seconds"] = format_seconds
    return Jinja2Templates(env=environment)


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(float(seconds), 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            whole, rest = divmod(int(seconds), size)
            smaller = {"d": 3600, "h": 60, "m": 1}[unit]
            tail = rest // smaller
            return f"{whole}{unit} {tail}{ {'d': 'h', 'h': 'm', 'm': 's'}[unit]}" if tail \
                else f"{whole}{unit}"
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def format_count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def format_when(value: datetime | None) -> str:
    return "—" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


class Console:
    """The routes, bound to one database and one users file."""

    def __init__(self, settings: Settings, database_url: str, *,
                 authenticator: Authenticator, health: HealthWatch | None = None,
                 refresh_seconds: float = REFRESH_SECONDS,
                 tokens: CsrfTokens | None = None) -> None:
        self.settings = settings
        self.database_url = database_url
        self.authenticator = authenticator
        self.health = health
        self.refresh_seconds = refresh_seconds
        self.tokens = tokens or CsrfTokens()
        self.templates = _templates()
        self.pool = ConnectionPool(
            db.libpq_url(database_url), min_size=1, max_size=POOL_SIZE, open=False,
            kwargs={"autocommit": True, "connect_timeout": 5, "application_name":
                    "outbox-console"}, name="outbox-console", timeout=10.0,
            # a connection the server dropped (a restart) is replaced, not handed out
            check=ConnectionPool.check_connection)

    # -- plumbing --

    async def run(self, work: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """``work(connection)`` in a worker thread (psycopg blocks), on a pooled connection:
        a fresh one per request spent more on connecting and on warming the server's catalog
        caches than the overview's statements take (120 ms against 180 on 10 million rows)."""
        def call() -> Any:
            with self.pool.connection() as connection:
                return work(connection)

        return await run_in_threadpool(call)

    def page(self, request: Request, template: str, context: dict[str, Any],
             status_code: int = 200) -> HTMLResponse:
        viewer: Viewer = request.scope["outbox.viewer"]
        base = {"viewer": viewer, "csrf": self.tokens.token(viewer.name),
                "refresh_ms": int(self.refresh_seconds * 1000), "path": request.url.path}
        response = self.templates.TemplateResponse(request, template, {**base, **context},
                                                   status_code=status_code)
        assert isinstance(response, HTMLResponse)
        return response

    def problem(self, request: Request, message: str, status_code: int) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": message}, status_code=status_code)
        return self.page(request, "problem.html", {"message": message}, status_code)

    # -- the overview --

    def _overview(self, connection: psycopg.Connection[Any]) -> dashboard.Overview:
        health = self.health.latest if self.health is not None else ()
        return dashboard.read_overview(connection, self.settings, health=health)

    def _overview_context(self, overview: dashboard.Overview) -> dict[str, Any]:
        status = overview.status
        routes = sorted({*(route.route for route in status.routes), *overview.failed_by_route,
                         *overview.expired_by_route})
        backlog = {route.route: route for route in status.routes}
        return {"overview": overview, "status": status, "chart": chart(overview.per_minute),
                "routes": [(name, backlog.get(name), overview.failed_by_route.get(name, 0),
                            overview.expired_by_route.get(name, 0)) for name in routes],
                "dead_share": status.table.dead_rows
                / max(status.table.live_rows + status.table.dead_rows, 1)}

    async def overview_page(self, request: Request) -> Response:
        overview = await self.run(self._overview)
        return self.page(request, "overview.html", self._overview_context(overview))

    async def overview_fragment(self, request: Request) -> Response:
        overview = await self.run(self._overview)
        return self.page(request, "_overview.html", self._overview_context(overview))

    async def overview_json(self, request: Request) -> Response:
        overview = await self.run(self._overview)
        return JSONResponse(overview.as_json())

    # -- failed rows --

    def _failed(self, where: FailedFilter, limit: int) -> Callable[[psycopg.Connection[Any]],
                                                                   dict[str, Any]]:
        def work(connection: psycopg.Connection[Any]) -> dict[str, Any]:
            return {
                "rows": admin.list_failed(connection, where, settings=self.settings,
                                          limit=limit),
                "total": admin.count_failed(connection, where, settings=self.settings),
            }
        return work

    async def failed_page(self, request: Request) -> Response:
        values = dict(request.query_params)
        try:
            where = parse_filter(values)
            done = int(values["done"]) if values.get("done", "").isdigit() else None
        except BadRequest as exc:
            return self.problem(request, str(exc), 400)

        def work(connection: psycopg.Connection[Any]) -> dict[str, Any]:
            found = self._failed(where, FAILED_PAGE_ROWS)(connection)
            found["reasons"] = dashboard.common_failure_reasons(connection)
            found["done"] = None if done is None else dashboard.find_action(connection, done)
            found["actions"] = dashboard.recent_actions(connection, 5)
            return found

        found = await self.run(work)
        routes = sorted({admin.effective_route(self.settings, command, None)
                         for command in COMMANDS} | set(self.settings.transports))
        return self.page(request, "failed.html", {
            **found, "values": {name: values.get(name, "") for name in FILTER_FIELDS},
            "filtered": not where.is_everything, "commands": COMMANDS, "route_names": routes,
            "now": time.time(), "query": filter_query(values)})

    async def failed_json(self, request: Request) -> Response:
        try:
            where = parse_filter(dict(request.query_params))
            limit = int(request.query_params.get("limit", FAILED_PAGE_ROWS))
        except (BadRequest, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        found = await self.run(self._failed(where, max(0, min(limit, 1000))))
        return JSONResponse({"total": found["total"],
                             "rows": [row.as_json() for row in found["rows"]]})

    # -- one row --

    async def row_page(self, request: Request) -> Response:
        row_id = int(request.path_params["row_id"])
        row = await self.run(lambda connection: dashboard.read_row(connection, self.settings,
                                                                   row_id))
        if row is None:
            return self.problem(request, f"there is no row {row_id}", 404)
        return self.page(request, "row.html", {"row": row})

    async def row_json(self, request: Request) -> Response:
        row_id = int(request.path_params["row_id"])
        row = await self.run(lambda connection: dashboard.read_row(connection, self.settings,
                                                                   row_id))
        if row is None:
            return JSONResponse({"error": f"there is no row {row_id}"}, status_code=404)
        return JSONResponse(row.as_json())

    # -- the audit trail --

    async def audit_page(self, request: Request) -> Response:
        entries = await self.run(lambda connection: dashboard.recent_actions(connection, 200))
        return self.page(request, "audit.html", {"entries": entries})

    async def audit_json(self, request: Request) -> Response:
        entries = await self.run(lambda connection: dashboard.recent_actions(connection, 200))
        return JSONResponse({"actions": [entry.as_json() for entry in entries]})

    # -- actions --

    async def action(self, request: Request) -> Response:
        viewer: Viewer = request.scope["outbox.viewer"]
        host = request.headers.get("host", "")
        if not same_origin(request.headers, request.url.scheme, host):
            log.warning("console.cross_site_refused", actor=viewer.name)
            return self.problem(request, "refused: this request did not come from a page of "
                                "this console", 403)
        form = await request.form()
        if not self.tokens.valid(viewer.name, _field(form, "csrf")):
            log.warning("console.token_refused", actor=viewer.name)
            return self.problem(request, "refused: the form token is missing or stale "
                                "(reload the page and try again)", 403)
        if not viewer.may_act:
            return self.problem(request, f"{viewer.name} is a viewer: only operators may "
                                "retry or discard", 403)
        try:
            verb, where, values, scope = self._parse_action(form)
        except BadRequest as exc:
            return self.problem(request, str(exc), 400)
        if _field(form, "confirmed") != "yes":
            total = await self.run(lambda connection: admin.count_failed(
                connection, where, settings=self.settings))
            return self.page(request, "confirm.html", {
                "verb": verb, "total": total, "scope": scope,
                "ids": list(where.ids), "values": values,
                "description": dashboard.describe_filter(dashboard.filter_record(where)),
                "back": "/failed" + (f"?{filter_query(values)}" if filter_query(values) else "")})
        entry = await self.run(lambda connection: dashboard.act(
            connection, self.settings, actor=viewer.name, action=verb, where=where))
        query = filter_query(values)
        return RedirectResponse(f"/failed?{query + '&' if query else ''}done={entry.id}",
                                status_code=303)

    @staticmethod
    def _parse_action(form: FormData) -> tuple[dashboard.Action, FailedFilter,
                                               dict[str, str], str]:
        verb, _, scope = (_field(form, "do") or "").partition(":")
        if verb not in dashboard.ACTIONS or scope not in ("selected", "matching"):
            raise BadRequest("say what to do: retry or discard, the selected rows or all "
                             "matching ones")
        values = {name: _field(form, name) or "" for name in FILTER_FIELDS}
        if scope == "selected":
            ids = parse_ids([str(value) for value in form.getlist("ids")])
            if not ids:
                raise BadRequest("no row selected: tick the rows to "
                                 f"{'retry' if verb == 'retry' else 'discard'} first")
            return verb, FailedFilter(ids=ids), values, scope
        return verb, parse_filter(values), values, scope

    # -- the ASGI application --

    def app(self) -> Starlette:
        static = importlib.resources.files("outbox.web") / "static"
        routes = [
            Route("/", self.overview_page),
            Route("/fragments/overview", self.overview_fragment),
            Route("/api/overview", self.overview_json),
            Route("/failed", self.failed_page),
            Route("/api/failed", self.failed_json),
            Route("/rows/{row_id:int}", self.row_page),
            Route("/api/rows/{row_id:int}", self.row_json),
            Route("/audit", self.audit_page),
            Route("/api/audit", self.audit_json),
            Route("/actions", self.action, methods=["POST"]),
            Mount("/static", StaticFiles(directory=str(static)), name="static"),
        ]

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            # Not waiting for the first connection: a database that is down shows as such
            # on the page (and in the health list) instead of keeping the console from
            # starting.
            self.pool.open(wait=False)
            if self.health is not None:
                self.health.start()
            try:
                yield
            finally:
                if self.health is not None:
                    await run_in_threadpool(self.health.stop)
                await run_in_threadpool(self.pool.close, 5.0)

        application = Starlette(routes=routes, lifespan=lifespan,
                                exception_handlers={Exception: self._crashed})
        return application

    async def _crashed(self, request: Request, exc: Exception) -> Response:
        log.error("console.request_failed", path=request.url.path, error=type(exc).__name__)
        return PlainProblem("the console could not answer: see its log", 500)


def PlainProblem(message: str, status_code: int) -> Response:  # noqa: N802 - reads as a class
    return Response(message + "\n", status_code=status_code, media_type="text/plain")


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


# --- middleware ----------------------------------------------------------------------------


class Guard:
    """Every response: no caching, security headers. Every request: an authenticated user
    (401 with a Basic challenge otherwise)."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in SECURITY_HEADERS}
                headers = [(name, value) for name, value in message.get("headers", [])
                           if name.lower() not in names]
                message = {**message, "headers": [*headers, *SECURITY_HEADERS]}
            await send(message)

        authorization = next((value.decode("latin-1") for name, value in scope["headers"]
                              if name == b"authorization"), None)
        viewer = await run_in_threadpool(self.authenticator.identify, authorization)
        if viewer is None:
            response = Response("log in to the outbox console\n", status_code=401,
                                media_type="text/plain", headers={
                                    "WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
            await response(scope, receive, send_guarded)
            return
        scope["outbox.viewer"] = viewer
        await self.app(scope, receive, send_guarded)


ASGICallable = Callable[[Scope, Receive, Send], Awaitable[None]]


def create_app(settings: Settings, database_url: str, *, users: UsersFile | None,
               health: HealthWatch | None = None, refresh_seconds: float = REFRESH_SECONDS,
               ) -> ASGICallable:
    """The console as an ASGI application. ``users`` None: no authentication at all."""
    authenticator = Authenticator(users)
    console = Console(settings, database_url, authenticator=authenticator, health=health,
                      refresh_seconds=refresh_seconds)
    return Guard(console.app(), authenticator)


#: the options ``outbox console`` hands to the process serving it (see outbox.web.server)
WORKER_ENV = "OUTBOX_CONSOLE_WORKER"


def app_from_env() -> ASGICallable:
    """The console for the uvicorn process that ``outbox console`` starts."""
    from outbox import logs  # noqa: PLC0415

    options = json.loads(os.environ.get(WORKER_ENV) or "{}")
    settings = Settings.from_env(config_file=options.get("config"))
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    users = open_users(settings, insecure_no_auth=bool(options.get("insecure_no_auth")))
    if users is None:
        log.warning("console.no_auth",
                    detail="--insecure-no-auth: anyone who reaches the port is an operator")
    url = db.resolve_database_url(settings)
    return create_app(settings, url, users=users, health=HealthWatch(settings, url))


def open_users(settings: Settings, *, insecure_no_auth: bool) -> UsersFile | None:
    """The users file the console checks logins against; refuses to go without one unless
    asked to in so many words."""
    if insecure_no_auth:
        return None
    if not settings.console_users:
        raise ConfigurationError(
            "the console needs users: set OUTBOX_CONSOLE_USERS to a users file and add one "
            "with `outbox console passwd USER --role operator` (or start it with "
            "--insecure-no-auth on a trusted machine)")
    users = UsersFile(settings.console_users)
    if not users.users:
        raise ConfigurationError(f"users file {settings.console_users} has no users (add one "
                                 "with `outbox console passwd USER`)")
    return users


__all__ = [
    "OPERATOR",
    "ROLES",
    "VIEWER",
    "WORKER_ENV",
    "Authenticator",
    "BadRequest",
    "Chart",
    "Console",
    "CsrfTokens",
    "Guard",
    "HealthWatch",
    "Viewer",
    "app_from_env",
    "chart",
    "create_app",
    "open_users",
    "parse_basic",
    "parse_filter",
    "role_of",
    "same_origin",
]
