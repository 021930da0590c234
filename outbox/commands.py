"""Commands: their names, the rules they must follow, and how they look on the wire.

The rules here are the same rules the database enforces at ``INSERT`` time (see the first
migration); each rule has one stable name, used both as the database constraint name and as
``InvalidCommand.rule``. The relay re-checks every row with :func:`validate` before publishing,
so a row that slipped past the database (inserted before a migration, edited by hand) fails
with a reason instead of reaching a device.

Wire dialects (PROTOCOL.md):

* ``otp-pi`` (default): what the real device accepts: ``send-mail`` and ``request-otp`` as
  command names, ``expiration`` in milliseconds for ``send-*`` and in seconds for
  ``request-otp``, a fresh ``date_time`` in seconds.
* ``readme``: exactly the OTP-Publisher README: README names, every time in seconds.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar

import orjson

from outbox.errors import InvalidCommand

SEND_SMS = "send-sms"
SEND_EMAIL = "send-email"
BLOCK_MSISDN = "block-msisdn"
UNBLOCK_MSISDN = "unblock-msisdn"
CREATE_OTP = "create-otp"

#: The commands an application can put in the outbox, by their README names.
COMMANDS: tuple[str, ...] = (SEND_SMS, SEND_EMAIL, BLOCK_MSISDN, UNBLOCK_MSISDN, CREATE_OTP)

#: Device names accepted on the way in and stored under the README name.
ALIASES: Mapping[str, str] = {"send-mail": SEND_EMAIL, "request-otp": CREATE_OTP}

#: Commands that need an answer at once and therefore never go through the outbox.
SYNCHRONOUS: frozenset[str] = frozenset({"validate-otp", "verify-otp"})

#: What is trimmed from both ends of a receiver, a text or a reference, by this module and by
#: the database alike (``outbox.canonical_receiver()``): exactly the characters for which
#: ``str.isspace()`` is true (ASCII whitespace, the information separators U+001C..U+001F,
#: NEL, no-break spaces, the Unicode spaces). Spelled out rather than ``str.strip()`` so the
#: two sides cannot drift apart with a Python or Unicode version. Migration 0013 holds the
#: same list.
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
              "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_NOT_IN_ADDRESS = "@" + WHITESPACE
#: ASCII digits only: ``\d`` would take Arabic-Indic and other Unicode digits, which no
#: modem dials and the database refuses.
MSISDN_RE = re.compile(r"\+?[0-9]{3,15}")
EMAIL_RE = re.compile(f"[^{_NOT_IN_ADDRESS}]+@[^{_NOT_IN_ADDRESS}]+\\.[^{_NOT_IN_ADDRESS}]+")
#: Beyond this an "expiration" cannot be Unix seconds (year 5138): it is milliseconds.
MAX_EXPIRATION_SECONDS = 100_000_000_000
#: A number written as text (``"1767225600"``): what both sides read as a number.
_NUMBER_TEXT_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?")

#: ``data`` as JSON text (what ``data::text`` gives) may hold this many bytes by default:
#: forty concatenated SMS or a long plain-text e-mail, with room to spare. The database's
#: ``outbox.message_data_size()`` is the configured limit (``outbox.set_message_data_size()``).
DEFAULT_DATA_SIZE = 65_536
#: The configured limit is never below this, so data this small needs no look-up.
MIN_DATA_SIZE = 1024
#: Containers nested deeper than this are refused: no command needs more than two, and JSON
#: decoders give up somewhere beyond a few hundred.
MAX_DATA_DEPTH = 64
#: Integers must fit a signed 64-bit integer (Java's long, Postgres' bigint): beyond that
#: decoders, the relay's included, turn them into floats.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Non-zero numbers smaller than this are refused: a double cannot hold them (or barely).
_TINY = Decimal("1e-300")


class Dialect(StrEnum):
    OTP_PI = "otp-pi"
    README = "readme"


_DEVICE_NAMES: Mapping[str, str] = {SEND_EMAIL: "send-mail", CREATE_OTP: "request-otp"}
#: what the database's btrim() takes off a command name
_ASCII_SPACE = " "


def canonical_receiver(receiver: str) -> str:
    """The one form of a receiver: what is stored, published, blocked and unblocked.

    Whitespace (:data:`WHITESPACE`) is trimmed from both ends; nothing else changes: a leading
    ``+`` or ``0`` stays as written (only the device knows its country code; it removes the
    ``+`` and replaces a leading ``0`` itself when it blocks, PROTOCOL.md section 10), and
    an e-mail address keeps its case. The database's ``outbox.canonical_receiver(text)`` is
    the same function.
    """
    return receiver.strip(WHITESPACE)


def _blank(text: str) -> bool:
    return not text.strip(WHITESPACE)


def canonical_command(command: object, data: object = None) -> str:
    """The README name of ``command``, resolving device aliases.

    ``send-message`` (the device's catch-all) becomes ``send-email`` when the receiver holds an
    ``@`` and ``send-sms`` otherwise, as the device itself decides.
    """
    if command is None:
        raise InvalidCommand("message_command_not_null", "command must not be NULL")
    if not isinstance(command, str):
        raise InvalidCommand("message_command_known", "command must be a string")
    name = command.strip(_ASCII_SPACE).lower()
    if name in COMMANDS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    if name == "send-message":
        receiver = data.get("receiver") if isinstance(data, Mapping) else None
        return SEND_EMAIL if isinstance(receiver, str) and "@" in receiver else SEND_SMS
    if name in SYNCHRONOUS:
        raise InvalidCommand(
            "message_command_synchronous",
            f'command "{name}" is synchronous and cannot go through the outbox: '
            "use outbox.otp.validate() or `outbox otp validate`",
        )
    raise InvalidCommand(
        "message_command_known",
        f'unknown command "{name[:40]}" (expected one of: {", ".join(COMMANDS)})',
    )


def expiration_seconds(value: object) -> float | None:
    """``data.expiration`` as Unix seconds, or ``None`` when absent. Refuses milliseconds.

    A JSON number, or a string holding one in plain decimal notation (as the database reads
    it: no hexadecimal, no ``inf``, no Unicode digits)."""
    if value is None:
        return None
    number: Decimal
    if isinstance(value, bool):
        raise InvalidCommand("message_expiration_number", "expiration must be a number of Unix seconds")
    if isinstance(value, str):
        text = value.strip(WHITESPACE)
        if not _NUMBER_TEXT_RE.fullmatch(text):
            raise InvalidCommand("message_expiration_number",
                                 "expiration must be a number of Unix seconds")
        number = Decimal(text)
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float) and math.isfinite(value):
        number = Decimal(repr(value))
    else:
        raise InvalidCommand("message_expiration_number", "expiration must be a number of Unix seconds")
    if number >= MAX_EXPIRATION_SECONDS:
        raise InvalidCommand(
            "message_expiration_seconds",
            "expiration must be Unix seconds; the value looks like milliseconds",
        )
    return float(number)


def check_otp_template(message: str) -> None:
    """A create-otp text must hold exactly one ``%s``; a literal percent is written ``%%``."""
    rest = message.replace("%%", "")
    if rest.count("%s") != 1 or rest.replace("%s", "").count("%") != 0:
        raise InvalidCommand(
            "message_otp_template",
            'create-otp message must contain exactly one "%s" for the code '
            '(write a literal percent sign as "%%")',
        )


def _receiver(command: str, data: Mapping[str, Any]) -> str:
    receiver = data.get("receiver")
    if isinstance(receiver, str):
        receiver = canonical_receiver(receiver)
    if not isinstance(receiver, str) or not receiver:
        raise InvalidCommand("message_receiver_present", f"{command} needs a non-empty data.receiver")
    if command == SEND_EMAIL:
        if not EMAIL_RE.fullmatch(receiver):
            raise InvalidCommand("message_receiver_email", "send-email receiver is not an e-mail address")
    elif command == CREATE_OTP:
        if not (EMAIL_RE.fullmatch(receiver) or MSISDN_RE.fullmatch(receiver)):
            raise InvalidCommand(
                "message_receiver_otp",
                "create-otp receiver must be an MSISDN (digits, optional leading +) "
                "or an e-mail address",
            )
    elif not MSISDN_RE.fullmatch(receiver):
        raise InvalidCommand(
            "message_receiver_msisdn",
            f"{command} receiver is not an MSISDN (3 to 15 digits with an optional leading +)",
        )
    return receiver


def validate(command: object, data: object, *, now: float | None = None) -> str:
    """Check a command against every rule; return its README name.

    ``now`` (Unix seconds) enables the "expiration already past" rule; the relay passes
    ``None`` because it turns a past expiration into the ``expired`` state instead.
    The rules on ``data`` as a whole (size, depth, numbers) are :func:`check_data`'s.
    """
    name = canonical_command(command, data)
    if data is None:
        raise InvalidCommand("message_data_not_null", "data must not be NULL")
    if type(data) is not dict and not isinstance(data, Mapping):  # a dict: what JSON decodes to
        raise InvalidCommand("message_data_object", "data must be a JSON object")
    _receiver(name, data)
    _rest(name, data, now)
    return name


def _rest(name: str, data: Mapping[str, Any], now: float | None) -> None:
    if name in (SEND_SMS, SEND_EMAIL, CREATE_OTP):
        text = data.get("message")
        if not isinstance(text, str) or _blank(text):
            raise InvalidCommand("message_text_present", f"{name} needs a non-empty data.message")
    if name == CREATE_OTP:
        check_otp_template(data["message"])
        reference = data.get("reference")
        # a JSON string or number, as the database accepts
        if (not isinstance(reference, str | int | float) or isinstance(reference, bool)
                or (isinstance(reference, str) and _blank(reference))):
            raise InvalidCommand("message_otp_reference", "create-otp needs a non-empty data.reference")
    expiration = expiration_seconds(data.get("expiration"))
    if expiration is not None and now is not None and expiration <= now:
        raise InvalidCommand("message_expiration_future", "expiration is already in the past")


def validate_new(command: object, data: object, *, now: float,
                 data_size: Callable[[], int] | None = None) -> tuple[str, dict[str, Any], str]:
    """Every rule the database applies to a new row, in the database's order.

    Returns the README name, the data to store (the receiver in its canonical form) and that
    data as JSON text, ready to send. ``data_size`` gives the configured size limit; it is
    called only for data over :data:`MIN_DATA_SIZE`, the least the limit can be.
    """
    name = canonical_command(command, data)
    if data is None:
        raise InvalidCommand("message_data_not_null", "data must not be NULL")
    if not isinstance(data, Mapping):
        raise InvalidCommand("message_data_object", "data must be a JSON object")
    text = check_data(data, data_size)
    receiver = _receiver(name, data)
    _rest(name, data, now)
    if data["receiver"] != receiver:
        data = {**data, "receiver": receiver}
        text = json.dumps(data, ensure_ascii=False)
    return name, dict(data), text


def check_data(data: Mapping[str, Any], data_size: Callable[[], int] | None = None) -> str:
    """The rules on ``data`` as a whole; returns it as JSON text.

    ``message_data_storable``: text jsonb cannot hold (NUL, a lone surrogate) or a value JSON
    has no form for; ``message_data_size``: longer, as ``data::text`` in bytes, than the
    limit; ``message_data_depth``: nested :data:`MAX_DATA_DEPTH` levels deep or more;
    ``message_data_number``: a number that would not come back the same from JSON (beyond a
    signed 64-bit integer, not finite, more digits than a double holds, or tiny).
    """
    checker = _DataWalk()
    checker.walk(data, 0)
    limit: int | None = None
    if checker.chars > MIN_DATA_SIZE:  # a lower bound: refuse 200 MB before encoding it
        limit = data_size() if data_size is not None else DEFAULT_DATA_SIZE
        if checker.chars > limit:
            raise InvalidCommand("message_data_size", f"data is over {limit:,} bytes as JSON, "
                                 "the most a message may hold")
    text = json.dumps(data, ensure_ascii=False)
    size = (len(text) if text.isascii() else len(text.encode("utf-8"))) + checker.widening
    if size > MIN_DATA_SIZE:
        if limit is None:
            limit = data_size() if data_size is not None else DEFAULT_DATA_SIZE
        if size > limit:
            raise InvalidCommand("message_data_size", f"data is {size:,} bytes as JSON, more than "
                                 f"the {limit:,} bytes a message may hold")
    if checker.number is not None:
        raise InvalidCommand("message_data_number", checker.number)
    return text


class _DataWalk:
    """One pass over ``data``: what the database would refuse, and by how much jsonb's text
    of the numbers is longer than Python's (``1e+16`` is ``10000000000000000`` there)."""

    def __init__(self) -> None:
        self.widening = 0
        #: characters of the strings and keys: never more than their bytes in data::text
        self.chars = 0
        self.number: str | None = None

    def walk(self, value: Any, level: int) -> None:
        if level >= MAX_DATA_DEPTH:
            raise InvalidCommand("message_data_depth",
                                 f"data nests containers {MAX_DATA_DEPTH} levels deep or more")
        if isinstance(value, str):
            _check_text(value)
            self.chars += len(value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidCommand("message_data_storable",
                                         "data has a key that is not a string")
                _check_text(key)
                self.chars += len(key)
                self.walk(item, level + 1)
        elif isinstance(value, list | tuple):
            for item in value:
                self.walk(item, level + 1)
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int | float):
            if self.number is None:
                self.number = _number_problem(value)
            if isinstance(value, float) and self.number is None:
                self.widening += len(_jsonb_number(value)) - len(repr(value))
        else:
            raise InvalidCommand("message_data_storable",
                                 f"data holds a {type(value).__name__}, which JSON has no form for")


def _check_text(value: str) -> None:
    if "\x00" in value:
        raise InvalidCommand("message_data_storable", "data holds a NUL character, which "
                             "PostgreSQL's jsonb cannot store")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidCommand("message_data_storable", "data holds text that is not valid "
                                 "Unicode (a lone surrogate)") from None


def _jsonb_number(value: float) -> str:
    """How jsonb writes ``value`` back: plain notation, no negative zero."""
    number = Decimal(repr(value))
    if number == 0:
        number = abs(number)
    return format(number, "f")


def _number_problem(value: int | float) -> str | None:
    """Why ``value`` would not come back the same through jsonb and JSON, or ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "data holds a number that is not finite (NaN or infinity has no JSON form)"
    exact = Decimal(value) if isinstance(value, int) else Decimal(_jsonb_number(value))
    if not INT64_MIN <= exact <= INT64_MAX:
        return "data holds a number beyond a signed 64-bit integer (decoders turn it into a float)"
    if exact != 0 and abs(exact) < _TINY:
        return "data holds a number too close to zero for a double"
    if exact != exact.to_integral_value() and Decimal(repr(float(exact))) != exact:
        return "data holds a number with more digits than a double keeps"
    return None


def check_times(*, available_at: datetime | None = None) -> None:
    """The database's range for its time columns: finite, from 1970 to the year 9999."""
    if available_at is None:
        return
    moment = available_at if available_at.tzinfo is not None else available_at.replace(tzinfo=UTC)
    if moment < EPOCH:
        raise InvalidCommand("message_available_at_range",
                             "available_at must be a time from 1970 to the year 9999")


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- typed commands for the Python helper ------------------------------------------------

Expiration = int | float | datetime | None


def _epoch(value: Expiration) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidCommand("message_expiration_number", "expiration datetime must be timezone-aware")
        return int(value.timestamp())
    return int(value)


@dataclass(frozen=True, kw_only=True)
class Command:
    """Base of the typed commands; ``to_data()`` gives the README's ``data`` object."""

    command: ClassVar[str]

    def to_data(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class SendSms(Command):
    command: ClassVar[str] = SEND_SMS
    receiver: str
    message: str
    expiration: Expiration = None

    def to_data(self) -> dict[str, Any]:
        return _compact({"receiver": self.receiver, "message": self.message,
                         "expiration": _epoch(self.expiration)})


@dataclass(frozen=True, kw_only=True)
class SendEmail(Command):
    command: ClassVar[str] = SEND_EMAIL
    receiver: str
    subject: str
    message: str
    expiration: Expiration = None

    def to_data(self) -> dict[str, Any]:
        return _compact({"receiver": self.receiver, "subject": self.subject,
                         "message": self.message, "expiration": _epoch(self.expiration)})


@dataclass(frozen=True, kw_only=True)
class BlockMsisdn(Command):
    command: ClassVar[str] = BLOCK_MSISDN
    receiver: str

    def to_data(self) -> dict[str, Any]:
        return {"receiver": self.receiver}


@dataclass(frozen=True, kw_only=True)
class UnblockMsisdn(Command):
    command: ClassVar[str] = UNBLOCK_MSISDN
    receiver: str

    def to_data(self) -> dict[str, Any]:
        return {"receiver": self.receiver}


@dataclass(frozen=True, kw_only=True)
class CreateOtp(Command):
    """Ask for an OTP to be drawn and sent to ``receiver`` with ``message % code``.

    ``params`` (up to four strings, the README's param1..param4) bind the OTP to the
    transaction: validation must present the same values.
    """

    command: ClassVar[str] = CREATE_OTP
    receiver: str
    reference: str
    message: str
    subject: str | None = None
    expiration: Expiration = None
    params: tuple[str, ...] = field(default_factory=tuple)

    def to_data(self) -> dict[str, Any]:
        if len(self.params) > 4:
            raise InvalidCommand("message_otp_params", "create-otp takes at most four params")
        data: dict[str, Any] = {"receiver": self.receiver, "reference": self.reference,
                                "message": self.message, "subject": self.subject,
                                "expiration": _epoch(self.expiration)}
        for index, value in enumerate(self.params, start=1):
            data[f"param{index}"] = value
        return _compact(data)


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}


# --- the wire --------------------------------------------------------------------------


def wire_name(command: str, dialect: Dialect) -> str:
    """The command name as the consumer expects it in ``dialect``."""
    if dialect is Dialect.OTP_PI:
        return _DEVICE_NAMES.get(command, command)
    return command


def wire_payload(
    command: str,
    data: Mapping[str, Any],
    *,
    message_id: int,
    dialect: Dialect,
    now: float,
    expires_at: float | None,
) -> dict[str, Any]:
    """The JSON object published for one command.

    ``expires_at`` (Unix seconds, from the row) is authoritative for ``expiration``.
    ``date_time`` is always the moment of publishing, in seconds: the device measures its
    default expiry from it, so an old ``date_time`` from the row would get a delayed SMS
    dropped as expired.
    """
    body = dict(data)
    receiver = body.get("receiver")
    if isinstance(receiver, str):  # the row's is canonical already, unless it predates 0013
        canonical = receiver.strip(WHITESPACE)
        if canonical != receiver:
            body["receiver"] = canonical
    if body.get("id") in (None, ""):
        body["id"] = message_id
    body["date_time"] = int(now)
    if expires_at is None:
        body.pop("expiration", None)
    elif dialect is Dialect.OTP_PI and command != CREATE_OTP:
        body["expiration"] = int(expires_at * 1000)
    else:
        body["expiration"] = int(expires_at)
    return {"command": wire_name(command, dialect), "data": body}


#: the exact encoder: ``json.dumps`` with options would build a new one per call
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact, ASCII-escaped JSON: the device decodes bodies with its default charset.

    orjson writes the same compact form ~15x faster but cannot escape non-ASCII text, so its
    output is used only when it is pure ASCII (the usual SMS); anything else (an accented
    name, an emoji, an integer beyond 64 bits) goes through the standard library encoder.
    """
    try:
        body = orjson.dumps(payload)
    except orjson.JSONEncodeError:
        body = b"\x80"  # not ASCII: take the exact path below
    # DEL is ASCII, but the standard library escapes it (\u007f) and orjson does not
    if body.isascii() and b"\x7f" not in body:
        return body
    return _ENCODER.encode(payload).encode("ascii")


__all__ = [
    "ALIASES",
    "BLOCK_MSISDN",
    "COMMANDS",
    "CREATE_OTP",
    "DEFAULT_DATA_SIZE",
    "MAX_DATA_DEPTH",
    "MIN_DATA_SIZE",
    "SEND_EMAIL",
    "SEND_SMS",
    "UNBLOCK_MSISDN",
    "WHITESPACE",
    "BlockMsisdn",
    "Command",
    "CreateOtp",
    "Dialect",
    "SendEmail",
    "SendSms",
    "UnblockMsisdn",
    "canonical_command",
    "canonical_receiver",
    "check_data",
    "check_otp_template",
    "check_times",
    "encode",
    "expiration_seconds",
    "validate",
    "validate_new",
    "wire_name",
    "wire_payload",
]
