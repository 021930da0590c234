"""The ``outbox`` command. Thin: parse, call the library, own the exit codes.

Exit codes: 0 ok, 1 failure, 2 usage or configuration error, 3 cannot reach the database or
a broker. Errors print one line (``outbox: error: ...``); ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from outbox import __version__, console, db, logs
from outbox.errors import ConfigurationError, DatabaseUnavailable, OutboxError, PublishError
from outbox.settings import Settings
from outbox.signals import ForcedExit, stop_on_signals

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

Handler = Callable[[argparse.Namespace, Settings], int]


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - one return per exit code
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler: Handler = args.handler
    try:
        if getattr(args, "settings_free", False):  # works whatever the settings say
            return handler(args, Settings())
        settings = Settings.from_env(config_file=args.config)
        settings = _with_development_otp_secret(settings, create=args.handler is cmd_run)
        overrides = {key: value for key, value in (
            ("workers", getattr(args, "workers", None)),
            ("batch_size", getattr(args, "batch_size", None)),
        ) if value is not None}
        if overrides:
            settings = settings.with_overrides(**overrides)
        # Services log to stdout; one-shot commands keep stdout for their own output.
        service = handler in (cmd_run, cmd_ws_relay, cmd_gateway, cmd_console)
        logs.configure(level="debug" if args.verbose > 1 else settings.log_level,
                       fmt=settings.log_format, stream=sys.stdout if service else sys.stderr)
        return handler(args, settings)
    except ConfigurationError as exc:
        return _fail(args, exc, EXIT_USAGE)
    except (DatabaseUnavailable, PublishError) as exc:
        return _fail(args, exc, EXIT_UNREACHABLE)
    except OutboxError as exc:
        return _fail(args, exc, EXIT_FAILURE)
    except psycopg.Error as exc:
        return _fail(args, exc, EXIT_FAILURE, database_error(exc))
    except KeyboardInterrupt:
        return EXIT_FAILURE


#: SQLSTATEs meaning the outbox schema is not there (or not all of it): undefined table,
#: function, column, schema
_SCHEMA_MISSING = frozenset({"42P01", "42883", "42703", "3F000"})


def database_error(exc: psycopg.Error) -> str:
    """One line for an error the database raised. Only the primary message and the
    constraint: Postgres' DETAIL may quote the values of the row."""
    diag = exc.diag
    if exc.sqlstate in _SCHEMA_MISSING:
        return ("the database has no outbox schema, or an older one (run `outbox db "
                "upgrade`)")
    primary = (diag.message_primary or type(exc).__name__).strip().splitlines()[0]
    constraint = f" ({diag.constraint_name})" if diag.constraint_name else ""
    state = f" [SQLSTATE {exc.sqlstate}]" if exc.sqlstate else ""
    return f"database refused: {primary}{constraint}{state}"


def _fail(args: argparse.Namespace, exc: BaseException, code: int,
          line: str | None = None) -> int:
    if args.verbose and not isinstance(exc, psycopg.Error):
        traceback.print_exception(exc, file=sys.stderr)
    elif args.verbose:
        # A database error's own text carries Postgres' DETAIL (the row's values): only
        # where it was raised.
        traceback.print_tb(exc.__traceback__, file=sys.stderr)
    print(f"outbox: error: {line or exc}", file=sys.stderr)
    return code


def _with_development_otp_secret(settings: Settings, *, create: bool) -> Settings:
    """On the embedded database with no OTP secret, the development secret kept in
    ``.outbox/`` (``outbox run`` creates it): ``make run`` answers create-otp at once."""
    path = db.development_otp_secret(settings, create=create)
    if path is None:
        return settings
    return settings.with_overrides(otp_secret=path.read_text().strip())


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--config`` and ``-v`` before the command or after it: on a subcommand they default
    to "not given", so they never undo what was given before the command."""
    hidden: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--config", help="TOML settings file (default: $OUTBOX_CONFIG)",
                        **({"default": None} if top else hidden))
    parser.add_argument("-v", "--verbose", action="count",
                        help="tracebacks on errors; twice: debug logs",
                        **({"default": 0} if top else hidden))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox", description="Transactional outbox relay for OTP-Pi commands.")
    parser.add_argument("--version", action="version", version=f"outbox {__version__}")
    _global_options(parser, top=True)
    commands = _Subcommands(parser.add_subparsers(title="commands", metavar="COMMAND"))
    for add in (_add_run, _add_db, _add_enqueue, _add_status, _add_failed, _add_purge,
                _add_check, _add_config, _add_ws_relay, _add_otp, _add_gateway,
                _add_console):
        add(commands)
    return parser


Subparsers = Any  # argparse's _SubParsersAction is private


class _Subcommands:
    """``add_subparsers()`` whose every command (and every command's actions) also takes
    the global options."""

    def __init__(self, action: Any) -> None:
        self._action = action

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._action.add_parser(name, **kwargs)
        _global_options(parser, top=False)
        add_subparsers = parser.add_subparsers

        def nested(**options: Any) -> _Subcommands:
            return _Subcommands(add_subparsers(**options))

        parser.add_subparsers = nested  # type: ignore[method-assign, assignment]
        return parser


def _add_run(commands: Subparsers) -> None:
    run = commands.add_parser("run", help="run the relay until SIGTERM/SIGINT")
    run.add_argument("--workers", type=int, help="worker threads (default: $OUTBOX_WORKERS or 1)")
    run.add_argument("--batch-size", type=int, help="rows claimed per transaction")
    run.add_argument("--migrate", action="store_true", help="run `db upgrade` first")
    run.set_defaults(handler=cmd_run)


def _add_db(commands: Subparsers) -> None:
    database = commands.add_parser("db", help="migrations")
    db_commands = database.add_subparsers(title="db commands", metavar="ACTION", required=True)
    for name, help_text, handler in (
        ("upgrade", "migrate to the newest schema", cmd_db_upgrade),
        ("current", "print the schema revision", cmd_db_current),
        ("check", "exit 1 unless the schema is current", cmd_db_check),
        ("url", "print the database URL (the embedded one too)", cmd_db_url),
        ("stop-embedded", "stop the embedded Postgres (no DATABASE_URL)", cmd_db_stop_embedded),
    ):
        db_commands.add_parser(name, help=help_text).set_defaults(handler=handler)


def _add_enqueue(commands: Subparsers) -> None:
    enqueue = commands.add_parser("enqueue", help="put one command in the outbox")
    enqueue.add_argument(
        "command", help="send-sms, send-email, block-msisdn, unblock-msisdn, create-otp")
    enqueue.add_argument("--receiver")
    enqueue.add_argument("--message")
    enqueue.add_argument("--subject")
    enqueue.add_argument("--reference")
    enqueue.add_argument("--expiration", type=_unix_seconds, help="Unix seconds")
    enqueue.add_argument("--expires-in", type=_seconds_from_now, metavar="SECONDS",
                         help="seconds from now (or a duration: 30s, 5m, 2h)")
    enqueue.add_argument("--param", action="append", default=[], help="param1..param4, in order")
    enqueue.add_argument("--data", help="the whole data object as JSON (other options add to it)")
    enqueue.add_argument("--dedup-key")
    enqueue.add_argument("--route")
    enqueue.add_argument("--priority", type=int,
                         help="0 (most urgent) to 9; default: the command's (create-otp 0, "
                              "block/unblock 2, send-sms/send-email 5)")
    enqueue.add_argument("--ordering-key",
                         help="rows with the same key are published one after another")
    enqueue.set_defaults(handler=cmd_enqueue)


#: the last second an expiration can name (9999-12-31, what Postgres and Python both hold)
_LAST_UNIX_SECOND = 253402300799


def _unix_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of Unix seconds") from None
    if not math.isfinite(value) or not 0 <= value <= _LAST_UNIX_SECOND:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Unix time in seconds (0 to {_LAST_UNIX_SECOND})")
    return value


def _seconds_from_now(text: str) -> float:
    from outbox.settings import parse_duration  # noqa: PLC0415

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_status(commands: Subparsers) -> None:
    status = commands.add_parser(
        "status", help="rows per state, pending rows per route, the send rate (cheap)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)


def _add_failed(commands: Subparsers) -> None:
    failed = commands.add_parser("failed", help="inspect, retry or discard failed rows")
    actions = failed.add_subparsers(title="failed commands", metavar="ACTION", required=True)
    for name, help_text, handler in (
        ("list", "the newest failed rows, receivers masked", cmd_failed_list),
        ("retry", "make failed rows pending again (same id, attempts reset)", cmd_failed_retry),
        ("discard", "delete failed rows", cmd_failed_discard),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--id", action="append", default=[], metavar="ID",
                            help="a row id; repeat or separate with commas")
        action.add_argument("--command", help="send-sms, send-email, ...")
        action.add_argument("--route", help="the effective route (a transport name, or a+b)")
        action.add_argument("--older-than", metavar="AGE", help="created before: 30m, 2h, 7d")
        action.add_argument("--newer-than", metavar="AGE", help="created within: 30m, 2h, 7d")
        action.add_argument("--reason", metavar="TEXT",
                            help="the last error contains TEXT (any case)")
        action.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "list":
            action.add_argument("--limit", type=int, default=50, help="rows shown (default 50)")
        else:
            action.add_argument("--all", action="store_true",
                                help="every failed row (needed when no filter is given)")
            action.add_argument("--dry-run", action="store_true",
                                help="only count the rows it would touch")
        action.set_defaults(handler=handler, action=name)


def _add_purge(commands: Subparsers) -> None:
    purge = commands.add_parser(
        "purge", help="delete sent/expired rows past sent_retention, failed past failed_retention")
    purge.add_argument("--dry-run", action="store_true", help="only count what would go")
    purge.add_argument("--batch-size", type=int, default=1000, dest="purge_batch_size",
                       help="rows deleted per transaction (default 1000)")
    purge.add_argument("--json", action="store_true", help="machine-readable output")
    purge.set_defaults(handler=cmd_purge)


def _add_check(commands: Subparsers) -> None:
    check = commands.add_parser(
        "check", help="probe the database, its schema and every transport once; "
                      "exit 0 ok, 1 schema not current, 2 configuration, 3 unreachable")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=cmd_check)


def _add_config(commands: Subparsers) -> None:
    config = commands.add_parser("config", help="show the effective settings, secrets masked")
    config.set_defaults(handler=cmd_config)


def _add_ws_relay(commands: Subparsers) -> None:
    ws_relay = commands.add_parser(
        "ws-relay", help="run a WebSocket topic relay for OTP-Pi (users and topic rights from "
                         "a users file)")
    ws_relay.add_argument("--host", default="127.0.0.1")
    ws_relay.add_argument("--port", type=int, default=8765)
    ws_relay.add_argument("--users", metavar="FILE",
                          help="users file with hashed passwords and topic rights "
                               "(default: $OUTBOX_WS_RELAY_USERS)")
    ws_relay.add_argument("--insecure-no-auth", action="store_true",
                          help="accept every client, with every right (tests, a closed LAN)")
    ws_relay.add_argument("--certfile", help="PEM certificate (chain): serve wss://")
    ws_relay.add_argument("--keyfile", help="PEM private key (default: inside --certfile)")
    ws_relay.set_defaults(handler=cmd_ws_relay)
    actions = ws_relay.add_subparsers(title="ws-relay commands", metavar="ACTION")
    passwd = actions.add_parser(
        "passwd", help="add a user or set its password (read from standard input) and rights")
    passwd.add_argument("user")
    passwd.add_argument("--users", metavar="FILE",
                        help="the users file (default: $OUTBOX_WS_RELAY_USERS)")
    passwd.add_argument("--publish", metavar="TOPICS",
                        help="topics the user may publish to, comma-separated (* for all)")
    passwd.add_argument("--subscribe", metavar="TOPICS",
                        help="topics the user may subscribe to, comma-separated (* for all)")
    passwd.set_defaults(handler=cmd_ws_relay_passwd, settings_free=True)


def _add_otp(commands: Subparsers) -> None:
    otp = commands.add_parser("otp", help="one-time passwords")
    otp_commands = otp.add_subparsers(title="otp commands", metavar="ACTION", required=True)
    otp_validate = otp_commands.add_parser(
        "validate", help="check an OTP: prints the code (0000 valid), exit 0 valid, 1 not")
    otp_validate.add_argument("--reference", required=True)
    otp_validate.add_argument("--receiver", required=True)
    otp_validate.add_argument("--otp", required=True,
                              help="the code the user typed; '-' reads it from standard input")
    otp_validate.add_argument("--param", action="append", default=[],
                              help="param1..param4, in order, as given to create-otp")
    otp_validate.add_argument("--route", help="the transport(s) the OTP went through "
                              "(default: the create-otp route)")
    otp_validate.add_argument("--json", action="store_true", help="machine-readable output")
    otp_validate.set_defaults(handler=cmd_otp_validate)
    otp_commands.add_parser(
        "new-secret", help="print a fresh OUTBOX_OTP_SECRET (32 random bytes, hex)",
    ).set_defaults(handler=cmd_otp_new_secret, settings_free=True)


def _add_gateway(commands: Subparsers) -> None:
    gateway = commands.add_parser(
        "gateway", help="serve OTP-Pi's REST API in front of the outbox (until SIGTERM)")
    gateway.add_argument("--host", default="127.0.0.1", help="address to listen on")
    gateway.add_argument("--port", type=int, default=8899, help="default 8899, as the device")
    gateway.add_argument("--workers", type=int, default=1, dest="gateway_workers",
                         help="processes serving requests (default 1)")
    gateway.add_argument("--certfile", help="TLS certificate (PEM); needs --keyfile")
    gateway.add_argument("--keyfile", help="TLS private key (PEM)")
    gateway.add_argument("--insecure-no-auth", action="store_true",
                         help="accept requests without credentials (no OUTBOX_GATEWAY_USERS)")
    gateway.set_defaults(handler=cmd_gateway)
    actions = gateway.add_subparsers(title="gateway commands", metavar="ACTION")
    passwd = actions.add_parser(
        "passwd", help="add a user to the users file or replace its password (read from "
                       "standard input)")
    passwd.add_argument("user")
    passwd.add_argument("--file", help="users file (default: $OUTBOX_GATEWAY_USERS)")
    passwd.set_defaults(handler=cmd_gateway_passwd)


def _add_console(commands: Subparsers) -> None:
    console_parser = commands.add_parser(
        "console", help="serve the operator's console (a web page) until SIGTERM/SIGINT")
    console_parser.add_argument("--host", default="127.0.0.1",
                                help="address to listen on (default 127.0.0.1)")
    console_parser.add_argument("--port", type=int, default=8080,
                                help="port to listen on (default 8080)")
    console_parser.add_argument("--certfile", help="TLS certificate (PEM); needs --keyfile")
    console_parser.add_argument("--keyfile", help="TLS private key (PEM)")
    console_parser.add_argument("--insecure-no-auth", action="store_true",
                                help="serve without logins (everyone is an operator): only "
                                     "on a machine nobody else reaches")
    console_parser.set_defaults(handler=cmd_console)
    actions = console_parser.add_subparsers(title="console commands", metavar="ACTION")
    passwd = actions.add_parser(
        "passwd", help="add a user to $OUTBOX_CONSOLE_USERS or change their password and "
                       "role; the password is read from standard input")
    passwd.add_argument("user")
    passwd.add_argument("--role", choices=("viewer", "operator"), default="viewer",
                        help="viewer (sees everything, default) or operator (also retries "
                             "and discards)")
    passwd.set_defaults(handler=cmd_console_passwd)


# --- commands ------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.housekeeping import Housekeeper  # noqa: PLC0415 - keeps `outbox --help` fast
    from outbox.relay import RelayService  # noqa: PLC0415

    url = db.resolve_database_url(settings, create=True)
    if args.migrate or not settings.database_url:
        db.upgrade(url)
    problems = db.check(url)
    if problems:
        raise OutboxError("; ".join(problems))  # exit 1, as `outbox check` and `db check`
    _apply_priorities(settings, url)
    if settings.database_url is None and settings.otp_secret and \
            db.development_otp_secret_path(settings).exists():
        logs.get_logger("outbox.cli").warning(
            "otp.development_secret", path=str(db.development_otp_secret_path(settings)),
            note="managed OTPs use the development secret kept next to the embedded "
                 "database; set OUTBOX_OTP_SECRET for anything real")
    _check_transports_at_start(settings)
    service = RelayService(settings, url, otp=_otp_issuer(settings))
    server = _health_server(settings, url, service)
    housekeeper = Housekeeper(settings, url, sample_metrics=server is not None)
    try:
        with stop_on_signals(exit_code_on_second_sigint=EXIT_FAILURE) as stop:
            chores = housekeeper.start(stop)
            service.run(stop)
            chores.join(5)
    except ForcedExit:
        logs.get_logger("outbox.cli").warning("relay.forced_exit", signal="SIGINT")
        raise
    finally:
        if server is not None:
            server.stop()
    return EXIT_FAILURE if service.errors else EXIT_OK


def _apply_priorities(settings: Settings, url: str) -> None:
    """Rows inserted without a priority take the defaults of these settings."""
    from outbox.store import apply_default_priorities  # noqa: PLC0415

    with db.connect(url) as connection:
        if apply_default_priorities(connection, dict(settings.priorities)):
            logs.get_logger("outbox.cli").info("priorities.applied",
                                               priorities=dict(settings.priorities))


def _check_transports_at_start(settings: Settings) -> None:
    """Open and check every transport once, so that a refusal stops ``run`` now (exit 2)
    rather than failing every row: credentials or configuration refused is permanent; a peer
    that cannot be reached may come back, so the relay starts and retries (one warning)."""
    from outbox.health import check_transport  # noqa: PLC0415
    from outbox.transports import open_transports  # noqa: PLC0415

    log = logs.get_logger("outbox.cli")
    for transport in open_transports(settings).values():
        try:
            result = check_transport(transport)
        finally:
            transport.close()
        if result.ok:
            continue
        if result.exit_code == EXIT_UNREACHABLE:
            log.warning("transport.unreachable_at_start", route=transport.name,
                        error=result.detail, action="starting anyway; rows retry until it is back")
            continue
        raise ConfigurationError(f"{result.name} refused: {result.detail}")


def _health_server(settings: Settings, url: str, service: Any) -> Any:
    """/metrics, /livez and /readyz on ``metrics_port``, when one is configured."""
    if settings.metrics_port is None:
        return None
    from outbox import health  # noqa: PLC0415

    return health.serve(settings, url, lambda: service.last_turn)


def _otp_issuer(settings: Settings) -> Any:
    """The managed-OTP issuer when an OTP secret is configured."""
    if not settings.otp_secret:
        return None
    from outbox.otp import ManagedOtp  # noqa: PLC0415

    return ManagedOtp.from_settings(settings)


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    url = db.resolve_database_url(settings, create=True)
    db.upgrade(url)
    print(f"outbox schema at revision {db.current_revision(url)}")
    return EXIT_OK


def cmd_db_current(args: argparse.Namespace, settings: Settings) -> int:
    print(db.current_revision(db.resolve_database_url(settings)) or "none")
    return EXIT_OK


def cmd_db_check(args: argparse.Namespace, settings: Settings) -> int:
    problems = db.check(db.resolve_database_url(settings))
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"outbox schema is current ({db.head_revision()})")
    return EXIT_FAILURE if problems else EXIT_OK


def cmd_db_url(args: argparse.Namespace, settings: Settings) -> int:
    print(db.resolve_database_url(settings))
    return EXIT_OK


def cmd_db_stop_embedded(args: argparse.Namespace, settings: Settings) -> int:
    if settings.database_url:
        raise ConfigurationError("DATABASE_URL is set: there is no embedded Postgres to stop")
    stopped = db.stop_embedded(settings.embedded_dir)
    print(f"embedded Postgres (pid {stopped}) stopped" if stopped is not None else
          "no embedded Postgres was running here")
    return EXIT_OK


def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.producer import enqueue  # noqa: PLC0415

    data: dict[str, Any] = {}
    if args.data:
        try:
            parsed = json.loads(args.data)
        except ValueError as exc:
            raise ConfigurationError(f"--data is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ConfigurationError("--data must be a JSON object")
        data.update(parsed)
    for key in ("receiver", "message", "subject", "reference"):
        value = getattr(args, key)
        if value is not None:
            data[key] = value
    if args.expires_in is not None:
        data["expiration"] = int(time.time() + args.expires_in)
    if args.expiration is not None:
        data["expiration"] = int(args.expiration)
    if len(args.param) > 4:
        raise ConfigurationError("at most four --param values (param1..param4)")
    for index, value in enumerate(args.param, start=1):
        data[f"param{index}"] = value
    url = db.resolve_database_url(settings)
    with db.connect(url) as connection:
        message_id = enqueue(connection, args.command, data, dedup_key=args.dedup_key,
                             route=args.route, priority=args.priority,
                             ordering_key=args.ordering_key)
    print(message_id)
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.admin import read_status  # noqa: PLC0415

    with db.connect(db.resolve_database_url(settings), autocommit=True) as connection:
        status = read_status(connection, settings)
    if args.json:
        print(json.dumps(status.as_json()))
        return EXIT_OK
    print(console.table(
        ["state", "rows", ""],
        [[state, console.count(count), "estimated" if state in status.estimated else ""]
         for state, count in status.counts.items()], right=[1]))
    print()
    if status.routes:
        print(console.table(
            ["route", "pending", "due", "retrying", "oldest"],
            [[r.route, f"{r.pending:,}", f"{r.due:,}", f"{r.retrying:,}",
              console.age(r.oldest_pending_age_seconds)] for r in status.routes],
            right=[1, 2, 3, 4]))
    else:
        print("no pending rows")
    if status.priorities:
        print("pending by priority (0 most urgent): " + ", ".join(
            f"{priority}: {count:,}" for priority, count in status.priorities.items()))
    if status.claims:
        print()
        print(console.table(
            ["relay", "claimed", "lease ran out"],
            [[c.relay, f"{c.rows:,}",
              f"{c.expired:,} ({console.age(c.expired_for_seconds)} ago)" if c.expired else "0"]
             for c in status.claims], right=[1, 2]))
    if status.held_keys.keys:
        print(f"ordering keys held back by a retry: {status.held_keys.keys:,} "
              f"({status.held_keys.rows_behind:,} rows behind them)")
    rate = status.rate
    print(f"\nsent in the last {console.age(rate.window_seconds)}: {rate.sent:,} "
          f"({rate.per_second:,.1f}/s)")
    if rate.by_pool_member:
        print("  through failover pools: " + ", ".join(
            f"{member} {count:,}" for member, count in rate.by_pool_member.items()))
    table = status.table
    dead = table.dead_rows / max(table.live_rows + table.dead_rows, 1)
    vacuumed = "never" if table.vacuumed_seconds_ago is None else \
        f"{console.age(table.vacuumed_seconds_ago)} ago"
    print(f"table: {table.total_bytes / 2**20:,.0f} MB with indexes, {dead:.1%} dead rows, "
          f"last vacuum {vacuumed}"
          + ("" if table.autovacuum else " (autovacuum is off: the purging relay vacuums)"))
    return EXIT_OK


def _failed_filter(args: argparse.Namespace) -> Any:
    from outbox.admin import FailedFilter, parse_ids  # noqa: PLC0415
    from outbox.settings import parse_duration  # noqa: PLC0415

    try:
        ids = parse_ids(args.id)
        older = None if args.older_than is None else parse_duration(args.older_than)
        newer = None if args.newer_than is None else parse_duration(args.newer_than)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    where = FailedFilter(ids=ids, command=args.command, route=args.route, older_than=older,
                         newer_than=newer, reason=args.reason)
    if where.is_everything and not getattr(args, "all", True):
        raise ConfigurationError(f"`outbox failed {args.action}` needs a filter "
                                 "(--id, --command, --route, --older-than, --newer-than, "
                                 "--reason) or --all")
    return where


def cmd_failed_list(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.admin import count_failed, list_failed  # noqa: PLC0415

    where = _failed_filter(args)
    with db.connect(db.resolve_database_url(settings), autocommit=True) as connection:
        rows = list_failed(connection, where, settings=settings, limit=max(args.limit, 0))
        total = count_failed(connection, where, settings=settings)
    if args.json:
        print(json.dumps({"total": total, "rows": [row.as_json() for row in rows]}))
        return EXIT_OK
    if not rows:
        print("no failed rows match")
        return EXIT_OK
    now = time.time()
    print(console.table(
        ["id", "age", "command", "route", "receiver", "attempts", "error"],
        [[row.id, console.age(now - row.created_at.timestamp()), row.command, row.route,
          row.receiver or "-", row.attempts, _shorten(row.last_error or "", 70)]
         for row in rows], right=[0, 1, 5]))
    if total > len(rows):
        print(f"({len(rows)} newest of {total:,}; --limit shows more)")
    return EXIT_OK


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_failed_retry(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.admin import retry_failed  # noqa: PLC0415

    return _failed_bulk(args, settings, retry_failed, "retried", "retrying")


def cmd_failed_discard(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.admin import discard_failed  # noqa: PLC0415

    return _failed_bulk(args, settings, discard_failed, "discarded", "discarding")


def _failed_bulk(args: argparse.Namespace, settings: Settings, operation: Callable[..., int],
                 done: str, doing: str) -> int:
    from outbox.admin import count_failed  # noqa: PLC0415

    where = _failed_filter(args)
    with db.connect(db.resolve_database_url(settings), autocommit=True) as connection:
        total = count_failed(connection, where, settings=settings)
        if args.dry_run:
            rows = total
        else:
            progress = console.Progress(f"{doing} failed rows", total)
            try:
                rows = operation(connection, where, settings=settings, progress=progress)
            finally:
                progress.finish()
            from outbox.dashboard import record_action  # noqa: PLC0415

            record_action(connection, actor=_operator_name(), action=args.action, where=where,
                          rows=rows, source="cli")
    verb = f"would be {done}" if args.dry_run else done
    if args.json:
        print(json.dumps({done: rows, "dry_run": args.dry_run}))
    else:
        print(f"{rows:,} failed row{'' if rows == 1 else 's'} {verb}")
    return EXIT_OK


def _operator_name() -> str:
    """Who runs the command, for the audit trail: the login name, else the uid."""
    import getpass  # noqa: PLC0415
    import os  # noqa: PLC0415

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid {os.getuid()}"


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.retention import count_purgeable, purge  # noqa: PLC0415

    if args.purge_batch_size < 1:
        raise ConfigurationError("--batch-size must be at least 1")
    with db.connect(db.resolve_database_url(settings), autocommit=True) as connection:
        if args.dry_run:
            report = count_purgeable(connection, settings)
        else:
            progress = console.Progress("purging")
            try:
                found = purge(connection, settings, batch_size=args.purge_batch_size,
                              on_batch=lambda so_far: progress(so_far.total))
            finally:
                progress.finish()
            if found is None:
                print("outbox: another process is purging right now (the retention lock is "
                      "taken); nothing done", file=sys.stderr)
                return EXIT_FAILURE
            report = found
    verb = "would purge" if args.dry_run else "purged"
    if args.json:
        print(json.dumps({"sent": report.sent, "expired": report.expired,
                          "failed": report.failed, "otps": report.otps,
                          "dry_run": report.dry_run}))
    else:
        print(f"{verb} {report.sent:,} sent and {report.expired:,} expired rows older than "
              f"{console.age(settings.sent_retention)}, {report.failed:,} failed rows older "
              f"than {console.age(settings.failed_retention)}"
              + ("" if args.dry_run else f", {report.otps:,} long-expired OTP records"))
    return EXIT_OK


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from outbox import health  # noqa: PLC0415

    results = health.probe(settings, db.resolve_database_url(settings))
    failures = [result for result in results if not result.ok]
    code = failures[0].exit_code if failures else EXIT_OK
    if args.json:
        print(json.dumps({"ok": not failures, "exit_code": code, "checks": [
            {"name": r.name, "ok": r.ok, "detail": r.detail} for r in results]}))
    else:
        for result in results:
            print(result.line())
    return code


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.masked(), indent=2, sort_keys=True))
    return EXIT_OK


def _users_file(args: argparse.Namespace) -> str | None:
    import os  # noqa: PLC0415

    if os.environ.get("OUTBOX_WS_RELAY_PASSWORD"):
        raise ConfigurationError(
            "OUTBOX_WS_RELAY_PASSWORD is no longer read: ws-relay users live in a users file "
            "(`outbox ws-relay passwd USER --users FILE`)")
    found: str | None = args.users or os.environ.get("OUTBOX_WS_RELAY_USERS") or None
    return found


def cmd_ws_relay(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.wsrelay import main_ws_relay  # noqa: PLC0415

    return main_ws_relay(args.host, args.port, users_file=_users_file(args),
                         insecure_no_auth=args.insecure_no_auth, certfile=args.certfile,
                         keyfile=args.keyfile)


def cmd_ws_relay_passwd(args: argparse.Namespace, settings: Settings) -> int:
    import getpass  # noqa: PLC0415

    from outbox.passwords import load_users, read_password, set_user  # noqa: PLC0415
    from outbox.wsrelay import Rights, parse_rights  # noqa: PLC0415

    path = _users_file(args)
    if path is None:
        raise ConfigurationError("ws-relay passwd needs --users FILE (or OUTBOX_WS_RELAY_USERS)")
    try:
        existing = load_users(path).get(args.user)
    except ConfigurationError:
        existing = None  # a new file; set_user refuses one it cannot read back
    if args.publish is None and args.subscribe is None:
        if existing is None:
            raise ConfigurationError(f"new user {args.user!r} needs --publish and/or --subscribe "
                                     "(topics, comma-separated; * for all)")
        rights = parse_rights(existing.extra, args.user)
    else:
        def topics(text: str | None) -> frozenset[str]:
            return frozenset(t.strip() for t in (text or "").split(",") if t.strip())

        rights = Rights(topics(args.publish), topics(args.subscribe))
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
        if not password:
            raise ConfigurationError("no password given")
    else:
        password = read_password(sys.stdin)
    set_user(path, args.user, password, rights.render() or None)
    print(f"{'updated' if existing else 'added'} {args.user} in {path} "
          f"({rights.render() or 'no rights'})")
    return EXIT_OK


def cmd_console(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.web import console, server  # noqa: PLC0415 - keeps `outbox --help` fast

    url = db.resolve_database_url(settings)
    problems = db.check(url)
    if problems:
        raise ConfigurationError("; ".join(problems))
    # One process: the form tokens are keyed per process, and one serves many operators.
    return server.serve(
        "outbox.web.console:app_from_env", host=args.host, port=args.port, workers=1,
        certfile=args.certfile, keyfile=args.keyfile,
        worker_options={"config": args.config, "insecure_no_auth": args.insecure_no_auth},
        options_env=console.WORKER_ENV, name="console")


def cmd_console_passwd(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.passwords import read_password, set_user  # noqa: PLC0415

    if not settings.console_users:
        raise ConfigurationError("set OUTBOX_CONSOLE_USERS to the users file to write")
    set_user(settings.console_users, args.user, read_password(sys.stdin), extra=args.role)
    print(f"{args.user} ({args.role}) saved in {settings.console_users}")
    return EXIT_OK


def cmd_otp_validate(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.otp import validate  # noqa: PLC0415

    if len(args.param) > 4:
        raise ConfigurationError("at most four --param values (param1..param4)")
    code = sys.stdin.readline().strip() if args.otp == "-" else args.otp
    result = validate(args.reference, args.receiver, code, args.param, settings=settings,
                      route=args.route)
    if args.json:
        print(json.dumps({"code": result.code, "valid": result.valid, "mode": result.mode.value,
                          "meaning": result.meaning}))
    else:
        print(f"{result.code} {result.meaning}")
    return EXIT_OK if result.valid else EXIT_FAILURE


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.web import gateway, server  # noqa: PLC0415 - keeps `outbox --help` fast

    url = db.resolve_database_url(settings)
    problems = db.check(url)
    if problems:
        raise ConfigurationError("; ".join(problems))
    return server.serve(
        "outbox.web.gateway:app_from_env", host=args.host, port=args.port,
        workers=args.gateway_workers, certfile=args.certfile, keyfile=args.keyfile,
        worker_options={"config": args.config, "insecure_no_auth": args.insecure_no_auth},
        options_env=gateway.WORKER_ENV, name="gateway")


def cmd_gateway_passwd(args: argparse.Namespace, settings: Settings) -> int:
    import getpass  # noqa: PLC0415

    from outbox.passwords import read_password, set_user  # noqa: PLC0415

    path = args.file or settings.gateway_users
    if not path:
        raise ConfigurationError("no users file: set OUTBOX_GATEWAY_USERS or pass --file")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
        if not password:
            raise ConfigurationError("empty password")
    else:
        password = read_password(sys.stdin)
    set_user(path, args.user, password)
    print(f"user {args.user} written to {path}", file=sys.stderr)
    return EXIT_OK


def cmd_otp_new_secret(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.otpkeys import new_secret  # noqa: PLC0415

    print(new_secret())
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
