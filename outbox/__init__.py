"""outbox: a transactional outbox relay for OTP-Pi commands.

Applications put commands in ``outbox.message`` inside their own transactions::

    from outbox import SendSms, enqueue

    with session.begin():
        session.add(order)
        enqueue(session, SendSms(receiver="+628123456789", message="Your order is on its way"))

and ``outbox run`` publishes them to the configured transport once the transaction committed.
"""

from __future__ import annotations

__version__ = "0.1.0"

from outbox.commands import (
    BlockMsisdn,
    Command,
    CreateOtp,
    Dialect,
    SendEmail,
    SendSms,
    UnblockMsisdn,
)
from outbox.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DuplicateReference,
    InvalidCommand,
    NotTried,
    OutboxError,
    PermanentPublishError,
    PublishError,
    TransientPublishError,
    TransportDown,
    Unreachable,
)
from outbox.producer import enqueue
from outbox.settings import Settings

__all__ = [
    "BlockMsisdn",
    "Command",
    "ConfigurationError",
    "CreateOtp",
    "DatabaseUnavailable",
    "Dialect",
    "DuplicateReference",
    "InvalidCommand",
    "NotTried",
    "OutboxError",
    "PermanentPublishError",
    "PublishError",
    "SendEmail",
    "SendSms",
    "Settings",
    "TransientPublishError",
    "TransportDown",
    "UnblockMsisdn",
    "Unreachable",
    "__version__",
    "enqueue",
]
