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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
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

MSISDN_RE = re.compile(r"^\+?[0-9]{3,15}$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
#: Beyond this an "expiration" cannot be Unix seconds (year 5138): it is milliseconds.
MAX_EXPIRATION_SECONDS = 100_000_000_000


class Dialect(StrEnum):
    OTP_PI = "otp-pi"
    README = "readme"


_DEVICE_NAMES: Mapping[str, str] = {SEND_EMAIL: "send-mail", CREATE_OTP: "request-otp"}


def canonical_command(command: object, data: object = None) -> str:
    """The README name of ``command``, resolving device aliases.

    ``send-message`` (the device's catch-all) becomes ``send-email`` when the receiver holds an
    ``@`` and ``send-sms`` otherwise, as the device itself decides.
    """
    if not isinstance(command, str):
        raise InvalidCommand("message_command_known", "command must be a string")
    name = command.strip().lower()
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
    """``data.expiration`` as Unix seconds, or ``None`` when absent. Refuses milliseconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidCommand("message_expiration_number", "expiration must be a number of Unix seconds")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidCommand(
                "message_expiration_number", "expiration must be a number of Unix seconds"
            ) from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidCommand("message_expiration_number", "expiration must be a number of Unix seconds")
    if value >= MAX_EXPIRATION_SECONDS:
        raise InvalidCommand(
            "message_expiration_seconds",
            "expiration must be Unix seconds; the value looks like milliseconds",
        )
    return float(value)


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
    if not isinstance(receiver, str) or not receiver.strip():
        raise InvalidCommand("message_receiver_present", f"{command} needs a non-empty data.receiver")
    receiver = receiver.strip()
    if command == SEND_EMAIL:
        if not EMAIL_RE.match(receiver):
            raise InvalidCommand("message_receiver_email", "send-email receiver is not an e-mail address")
    elif command == CREATE_OTP:
        if not (EMAIL_RE.match(receiver) or MSISDN_RE.match(receiver)):
            raise InvalidCommand(
                "message_receiver_otp",
                "create-otp receiver must be an MSISDN (digits, optional leading +) "
                "or an e-mail address",
            )
    elif not MSISDN_RE.match(receiver):
        raise InvalidCommand(
            "message_receiver_msisdn",
            f"{command} receiver is not an MSISDN (3 to 15 digits with an optional leading +)",
        )
    return receiver


def validate(command: object, data: object, *, now: float | None = None) -> str:
    """Check a command against every rule; return its README name.

    ``now`` (Unix seconds) enables the "expiration already past" rule; the relay passes
    ``None`` because it turns a past expiration into the ``expired`` state instead.
    """
    name = canonical_command(command, data)
    if not isinstance(data, Mapping):
        raise InvalidCommand("message_data_object", "data must be a JSON object")
    _receiver(name, data)
    if name in (SEND_SMS, SEND_EMAIL, CREATE_OTP):
        text = data.get("message")
        if not isinstance(text, str) or not text.strip():
            raise InvalidCommand("message_text_present", f"{name} needs a non-empty data.message")
    if name == CREATE_OTP:
        check_otp_template(data["message"])
        reference = data.get("reference")
        # a JSON string or number, as the database accepts
        if (not isinstance(reference, str | int | float) or isinstance(reference, bool)
                or not str(reference).strip()):
            raise InvalidCommand("message_otp_reference", "create-otp needs a non-empty data.reference")
    expiration = expiration_seconds(data.get("expiration"))
    if expiration is not None and now is not None and expiration <= now:
        raise InvalidCommand("message_expiration_future", "expiration is already in the past")
    return name


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
    "SEND_EMAIL",
    "SEND_SMS",
    "UNBLOCK_MSISDN",
    "BlockMsisdn",
    "Command",
    "CreateOtp",
    "Dialect",
    "SendEmail",
    "SendSms",
    "UnblockMsisdn",
    "canonical_command",
    "check_otp_template",
    "encode",
    "expiration_seconds",
    "validate",
    "wire_name",
    "wire_payload",
]
