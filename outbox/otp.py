"""One-time passwords: created through the outbox, validated synchronously.

An application creates an OTP by enqueueing a ``create-otp`` row (``reference``, ``receiver``,
``message`` with one ``%s``, optional ``subject``, ``expiration`` and ``param1``..``param4``).
What happens next depends on the *OTP mode* of the transport the row is routed to (the
``otp`` query parameter of its URL; ``device`` is the default for ``http(s)://``, ``managed``
for every other scheme):

* **device**: the relay sends the device's ``request-otp``; the OTP-Pi draws the code, keeps
  its hash and sends the text. Validation sends ``verify-otp`` to the same device and returns
  its answer (:func:`verify_on_device`).
* **managed**: the relay derives the code itself (:class:`ManagedOtp`), keeps only a keyed hash
  in ``outbox.otp`` and publishes the finished text as ``send-sms`` (or ``send-email`` for an
  e-mail receiver). Validation is local (:func:`validate_managed`).

:func:`validate` picks the mode the way the relay routed the row: the transports named by
``route`` (default: ``settings.routes["create-otp"]``, else ``default``). Every transport of
that route must have the same mode; device mode needs exactly one REST transport.

Validation codes (the device's, plus one for managed mode):

======  ==============================================================================
code    meaning
======  ==============================================================================
0000    valid: the OTP is used up, a second validation answers 1202
1202    invalid: wrong code, a param or the receiver differs, unknown or used reference
1203    expired
1204    locked (managed mode): ``otp_max_attempts`` wrong answers were given; every later
        validation of this reference answers 1204 until it expires
======  ==============================================================================

Managed codes are derived, not stored: HMAC-SHA-256 under the OTP secret of the row id and the
reference, turned into ``otp_digits`` digits by rejection sampling (no modulo bias). A retry of
the same row therefore sends the same code, and the database holds only
HMAC-SHA-256(secret, reference, receiver, param1..param4, code) with the id of the key that
made it. ``otp_previous_secrets`` keep validating codes issued under them (key rotation) and
keep a retried row on the key it was first issued under.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from outbox import db
from outbox.commands import (
    CREATE_OTP,
    EMAIL_RE,
    SEND_EMAIL,
    SEND_SMS,
    Dialect,
    canonical_receiver,
    check_otp_template,
    encode,
)
from outbox.errors import ConfigurationError, DuplicateReference, PermanentPublishError
from outbox.logs import get_logger
from outbox.otpkeys import check_secret, key_id
from outbox.settings import Settings
from outbox.store import (
    ClaimedRow,
    IssuedOtp,
    OtpStoreTransaction,
    PostgresStore,
    StoreTransaction,
)
from outbox.transports import OtpMode, open_transport, transport_options

log = get_logger("outbox.otp")

VALID = "0000"
INVALID = "1202"
EXPIRED = "1203"
LOCKED = "1204"

MEANINGS: Mapping[str, str] = {
    VALID: "valid",
    INVALID: "invalid (wrong code, changed receiver or params, unknown or used reference)",
    EXPIRED: "expired",
    LOCKED: "locked after too many wrong attempts",
}

PARAMS = ("param1", "param2", "param3", "param4")


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """The answer to one validation, in the device's codes."""

    code: str
    mode: OtpMode
    #: managed mode: wrong answers still allowed before the reference locks
    attempts_left: int | None = None

    @property
    def valid(self) -> bool:
        return self.code == VALID

    @property
    def meaning(self) -> str:
        return MEANINGS.get(self.code, f"device answered {self.code}")


# --- the code and its hash ---------------------------------------------------------------


def _fields(label: bytes, *parts: str) -> bytes:
    """An unambiguous encoding: every part length-prefixed, after a purpose label."""
    out = bytearray(label)
    for part in parts:
        raw = part.encode("utf-8")
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def code_from_words(words: Iterable[int], digits: int, *, bits: int = 64) -> str:
    """The first of ``words`` (uniform ``bits``-bit integers) below the largest multiple of
    ``10**digits``, reduced to ``digits`` digits: rejection sampling, so every code is exactly
    as likely as every other (a plain modulo would favour the low codes)."""
    modulus = 10 ** digits
    span = 1 << bits
    limit = span - span % modulus
    for word in words:
        if word < limit:
            return f"{word % modulus:0{digits}d}"
    raise ValueError("ran out of words")  # pragma: no cover - derive_code never runs out


def derive_code(secret: bytes, message_id: int, reference: str, digits: int) -> str:
    """The code for one create-otp row: the same for every retry of the row, never stored."""

    def words() -> Iterable[int]:
        for counter in itertools.count():
            block = hmac.new(secret, _fields(b"outbox-otp/code", str(message_id), reference,
                                             str(counter)), hashlib.sha256).digest()
            for offset in range(0, len(block), 8):
                yield int.from_bytes(block[offset:offset + 8], "big")

    return code_from_words(words(), digits)


def otp_digest(secret: bytes, code: str, reference: str, receiver: str,
               params: Sequence[str]) -> bytes:
    """What the database keeps: the code bound to reference, receiver and the four params."""
    padded = [*params, "", "", "", ""][:4]
    return hmac.new(secret, _fields(b"outbox-otp/digest", reference, receiver, *padded, code),
                    hashlib.sha256).digest()


def _receiver(value: object) -> str:
    """A receiver in the one canonical form the row stores (and the device is sent)."""
    return canonical_receiver(value) if isinstance(value, str) else _text(value)


def _text(value: object) -> str:
    """A data field as the device reads it: ``optString(key, "").trim()``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


def _params(params: Sequence[object]) -> tuple[str, ...]:
    if len(params) > 4:
        raise ConfigurationError("an OTP takes at most four params (param1..param4)")
    return tuple(_text(value) for value in [*params, "", "", "", ""][:4])


# --- managed mode --------------------------------------------------------------------------


class ManagedOtp:
    """Issues managed OTPs for the relay (:class:`outbox.relay.OtpIssuer`) and validates them."""

    def __init__(self, secret: str | bytes, previous_secrets: Sequence[str | bytes] = (), *,
                 digits: int = 6, max_attempts: int = 5) -> None:
        keys = [_key(secret), *(_key(old) for old in previous_secrets)]
        self._current = key_id(keys[0])
        self._keys = {key_id(key): key for key in reversed(keys)}
        self._keys[self._current] = keys[0]
        self.digits = digits
        self.max_attempts = max_attempts

    @classmethod
    def from_settings(cls, settings: Settings) -> ManagedOtp:
        if not settings.otp_secret:
            raise ConfigurationError(
                "managed OTPs need a secret: set OUTBOX_OTP_SECRET (`outbox otp new-secret` "
                "prints one)")
        return cls(settings.otp_secret, settings.otp_previous_secrets,
                   digits=settings.otp_digits, max_attempts=settings.otp_max_attempts)

    @property
    def current_key_id(self) -> str:
        return self._current

    # -- issuing (inside the relay's batch transaction) -----------------------------------

    def issue(self, tx: StoreTransaction, row: ClaimedRow,
              expires_at: float) -> tuple[str, dict[str, Any]]:
        """Keep the hash of this row's code and return the finished send-sms / send-email.

        Raises ``DuplicateReference`` when another row's OTP for the reference is still live.
        """
        if not isinstance(tx, OtpStoreTransaction):
            raise TypeError(f"{type(tx).__name__} cannot keep managed OTPs")
        data: Mapping[str, Any] = row.data
        reference, receiver = _text(data.get("reference")), _receiver(data.get("receiver"))
        template = str(data.get("message", ""))
        check_otp_template(template)
        # A retry stays on the key the row was first issued under, even after a rotation.
        issued_under = tx.find_otp_key(reference, row.id)
        kid = issued_under if issued_under in self._keys else self._current
        secret = self._keys[kid]
        code = derive_code(secret, row.id, reference, self.digits)
        digest = otp_digest(secret, code, reference, receiver,
                            [_text(data.get(name)) for name in PARAMS])
        if not tx.issue_otp(IssuedOtp(reference, kid, digest, row.id, expires_at)):
            raise DuplicateReference("reference already has a live OTP (1201)")
        out: dict[str, Any] = {"receiver": receiver, "message": template % code}
        for passed in ("id", "expiration"):
            if data.get(passed) is not None:
                out[passed] = data[passed]
        if EMAIL_RE.match(receiver):
            if data.get("subject") is not None:
                out["subject"] = data["subject"]
            return SEND_EMAIL, out
        return SEND_SMS, out

    # -- validating --------------------------------------------------------------------------

    def validate(self, store: Any, reference: str, receiver: str, otp: str,
                 params: Sequence[object] = ()) -> ValidationResult:
        """Check ``otp`` in one transaction of ``store`` (``PostgresStore`` or ``MemoryStore``).

        The row is locked for the check, so of two concurrent right answers exactly one wins.
        """
        reference, receiver, otp = _text(reference), _receiver(receiver), _text(otp)
        bound = _params(params)
        with store.transaction() as tx:
            stored = tx.lock_otp(reference)
            secret = self._keys.get(stored.key_id) if stored is not None else None
            # Hash even when there is nothing to compare with: the same work either way.
            given = otp_digest(secret or self._keys[self._current], otp, reference, receiver,
                               bound)
            if stored is None or stored.used:
                result = ValidationResult(INVALID, OtpMode.MANAGED)
            elif stored.expired:
                result = ValidationResult(EXPIRED, OtpMode.MANAGED)
            elif stored.attempts >= self.max_attempts:
                result = ValidationResult(LOCKED, OtpMode.MANAGED, attempts_left=0)
            elif secret is not None and hmac.compare_digest(given, stored.digest):
                # The row lock already makes this the only winner; the guarded UPDATE says so
                # again should the store ever lose its lock.
                won = tx.mark_otp_used(reference)
                result = ValidationResult(VALID if won else INVALID, OtpMode.MANAGED)
            else:
                attempts = tx.count_otp_failure(reference)
                result = ValidationResult(INVALID, OtpMode.MANAGED,
                                          attempts_left=max(0, self.max_attempts - attempts))
                if attempts == self.max_attempts:
                    log.warning("otp.locked", reference=reference, attempts=attempts)
        log.debug("otp.validated", mode="managed", reference=reference, result=result.code)
        return result


def _key(secret: str | bytes) -> bytes:
    return check_secret(secret, "an OTP secret")


def validate_managed(connection: psycopg.Connection[Any], reference: str, receiver: str,
                     otp: str, params: Sequence[object] = (), *,
                     settings: Settings) -> ValidationResult:
    """Validate a managed OTP through ``connection``.

    The check commits on its own when the connection is idle or in autocommit; inside an open
    transaction it becomes part of it (a savepoint), so a rollback would also forget a wrong
    attempt: validate outside your own transaction.
    """
    issuer = ManagedOtp.from_settings(settings)
    return issuer.validate(PostgresStore(connection), reference, receiver, otp, params)


# --- device mode ---------------------------------------------------------------------------


def verify_on_device(transport: Any, reference: str, receiver: str, otp: str,
                     params: Sequence[object] = (), *,
                     now: float | None = None) -> ValidationResult:
    """Send ``verify-otp`` through a REST transport and return the device's answer.

    Raises ``PublishError`` when no answer comes (unreachable, timeout, 401, ``{}``).
    """
    call = getattr(transport, "call", None)
    if call is None:
        raise ConfigurationError(
            f"transport {transport.name!r} cannot validate device OTPs: "
            "device mode needs the REST transport (http:// or https://)")
    data: dict[str, Any] = {"reference": _text(reference), "receiver": _receiver(receiver),
                            "otp": _text(otp)}
    for name, value in zip(PARAMS, _params(params), strict=True):
        if value:
            data[name] = value
    data["date_time"] = int(time.time() if now is None else now)
    command = "verify-otp" if transport.options.dialect is Dialect.OTP_PI else "validate-otp"
    reply = call(encode({"command": command, "data": data}))
    code = reply.get("response_code") if isinstance(reply, dict) else None
    if not reply or code is None:
        # The keys only: the values may echo the receiver or the code.
        keys = ", ".join(sorted(map(str, reply))) if isinstance(reply, dict) else ""
        raise PermanentPublishError(f"device did not understand {command} (reply with "
                                    f"{'fields ' + keys if keys else 'no fields'})")
    if not str(code).isdigit() or len(str(code)) != 4:
        raise PermanentPublishError(f"device answered {command} with a response_code "
                                    "that is not a device code (not shown)")
    result = ValidationResult(str(code), OtpMode.DEVICE)
    log.debug("otp.validated", mode="device", reference=data["reference"], result=result.code)
    return result


# --- choosing the mode ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OtpRoute:
    """Where the create-otp rows of a route went, and so how to validate them."""

    mode: OtpMode
    #: the REST transport to ask (device mode)
    transport: str | None = None


def otp_route(settings: Settings, route: str | None = None) -> OtpRoute:
    """How OTPs created through ``route`` (default: the create-otp route) are validated."""
    names = settings.route_for(CREATE_OTP, route)
    modes: dict[str, OtpMode] = {}
    for name in names:
        url = settings.transports.get(name)
        if url is None:
            raise ConfigurationError(f"route {name!r} names no configured transport "
                                     f"(configured: {', '.join(sorted(settings.transports))})")
        modes[name] = transport_options(url, settings)[1].otp_mode
    if set(modes.values()) == {OtpMode.MANAGED}:
        return OtpRoute(OtpMode.MANAGED)
    device = [name for name, mode in modes.items() if mode is OtpMode.DEVICE]
    if len(device) != 1 or len(modes) != 1:
        raise ConfigurationError(
            f"create-otp route {'+'.join(names)!r} mixes OTP modes or devices; "
            "name the one transport the OTP went through with route=")
    scheme = settings.transports[device[0]].split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ConfigurationError(
            f"transport {device[0]!r} is in device OTP mode but only the REST transport can "
            "validate on the device: use otp=managed for it")
    return OtpRoute(OtpMode.DEVICE, device[0])


def validate(reference: str, receiver: str, otp: str, params: Sequence[object] = (), *,
             settings: Settings | None = None, route: str | None = None,
             connection: psycopg.Connection[Any] | None = None) -> ValidationResult:
    """Validate an OTP in whichever mode it was created (see :func:`otp_route`).

    ``settings`` default to :meth:`Settings.from_env`. Managed mode uses ``connection`` or
    opens one to the configured database; device mode calls the route's REST transport.
    """
    if settings is None:
        settings = Settings.from_env()
    chosen = otp_route(settings, route)
    if chosen.mode is OtpMode.DEVICE:
        assert chosen.transport is not None
        transport = open_transport(chosen.transport, settings.transports[chosen.transport],
                                   settings)
        try:
            return verify_on_device(transport, reference, receiver, otp, params)
        finally:
            transport.close()
    if connection is not None:
        return validate_managed(connection, reference, receiver, otp, params, settings=settings)
    with db.connect(db.resolve_database_url(settings)) as own:
        return validate_managed(own, reference, receiver, otp, params, settings=settings)


__all__ = [
    "EXPIRED",
    "INVALID",
    "LOCKED",
    "MEANINGS",
    "VALID",
    "ManagedOtp",
    "OtpRoute",
    "ValidationResult",
    "code_from_words",
    "derive_code",
    "key_id",
    "otp_digest",
    "otp_route",
    "validate",
    "validate_managed",
    "verify_on_device",
]
