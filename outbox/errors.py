"""The exception tree of outbox.

::

    OutboxError
    ├── ConfigurationError            bad settings, unknown transport, route to nowhere
    ├── DatabaseUnavailable           cannot reach Postgres
    ├── InvalidCommand                a command that can never be delivered (bad input)
    │   └── DuplicateReference        create-otp for a reference that still has a live OTP
    └── PublishError                  a transport could not deliver a message
        ├── TransientPublishError     worth retrying later (connection lost, timeout, 5xx, 1101)
        │   └── Unreachable           the peer did not answer (refused, timed out)
        │       └── NotTried          never offered to the peer (it stopped answering first)
        │           └── TransportDown not offered: every member of a pool is known to be down
        └── PermanentPublishError     retrying cannot help (401, ``{}``, unroutable payload)

Transports convert their library's exceptions into ``PublishError`` subclasses and
``raise ... from exc`` so the original cause stays in the traceback.
"""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of every error raised by outbox."""


class ConfigurationError(OutboxError):
    """Settings are missing, malformed or contradict each other."""


class DatabaseUnavailable(OutboxError):
    """Postgres cannot be reached (refused, timed out, authentication failed)."""


class InvalidCommand(OutboxError, ValueError):
    """A command that can never be delivered as it stands.

    ``rule`` is the stable name of the broken rule; it is the same name the database uses
    for the constraint that refuses such a row (for example ``message_receiver_msisdn``).
    """

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


class DuplicateReference(InvalidCommand):
    """A create-otp names a reference that already has a live OTP (device code 1201)."""

    def __init__(self, message: str = "reference already has a live OTP") -> None:
        super().__init__("otp_reference_duplicate", message)


class PublishError(OutboxError):
    """A transport could not deliver a message."""

    #: whether a later attempt may succeed
    transient: bool = True


class TransientPublishError(PublishError):
    """Delivery failed for a reason that may go away: retry later."""

    transient = True


class Unreachable(TransientPublishError):
    """The peer could not be reached or did not answer: the transport, not the message, is
    the problem."""


class NotTried(Unreachable):
    """The message was never offered to the peer: an earlier one of its batch found the peer
    unreachable. The relay hands such a row back with its place and attempts untouched."""


class TransportDown(NotTried):
    """Not offered: every member of a failover pool is known to be down (or the member that
    is up has a rate and the claim took another's tokens). Handed back like any row not
    tried, attempts untouched, so an outage alone never makes a row ``failed``; the lane
    looks again after ``retry_after`` seconds, when the pool next probes a member."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentPublishError(PublishError):
    """Delivery can never succeed as the message or the configuration stands."""

    transient = False


__all__ = [
    "ConfigurationError",
    "DatabaseUnavailable",
    "DuplicateReference",
    "InvalidCommand",
    "NotTried",
    "OutboxError",
    "PermanentPublishError",
    "PublishError",
    "TransientPublishError",
    "TransportDown",
    "Unreachable",
]
