"""Limits the relay applies when it claims: a transport's rate, and a receiver's limit.

**Rates** (``rate=10/m`` on a transport URL): a claim takes tokens from the transport's
bucket in ``outbox.rate_bucket`` before it takes rows, and takes no more rows than it got
tokens (see :mod:`outbox.store`, ``TAKE_TOKENS``). :func:`buckets_for` says which buckets
a route target draws from.

**Receiver limits** (``OUTBOX_RECEIVER_LIMIT=3/10m``): the messages that reach a person
(send-sms, send-email, create-otp) are counted per command and receiver in
``outbox.receiver_window``, by a keyed digest (HMAC-SHA-256 of the command and the
receiver's canonical form, cut to 16 bytes; keyed with ``OUTBOX_OTP_SECRET`` when one is
set). A claimed row beyond its receiver's limit ends ``failed`` with the rule
``message_receiver_rate_limited`` and is never published. Why in the relay and not at the
door (the application's INSERT): README, "Receiver limits".
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

from outbox.scheduling import Rate, within_limit
from outbox.settings import PERSONAL_COMMANDS, Settings, is_pool
from outbox.store import Bucket, LimitStoreTransaction, ReceiverClaim
from outbox.transports.base import Transport

RECEIVER_LIMIT_RULE = "message_receiver_rate_limited"

#: the key when no OTP secret is configured: the digest still keeps the receiver out of
#: sight, but a phone number could be found again by trying them all
_UNKEYED = b"outbox receiver limit"


def canonical_receiver(receiver: str) -> str:
    """The receiver as it is counted: trimmed, e-mail addresses in lower case."""
    text = receiver.strip()
    return text.lower() if "@" in text else text


def receiver_digest(key: bytes, command: str, receiver: str) -> bytes:
    message = f"{command}\x00{canonical_receiver(receiver)}".encode()
    return hmac.new(key, message, hashlib.sha256).digest()[:16]


def bucket_of(transport: Transport) -> Bucket | None:
    """The bucket a transport draws from, if it has a rate."""
    rate = transport.options.rate
    if rate is None:
        return None
    return Bucket(transport.name, rate.per_second, transport.options.burst)


def buckets_for(transport: Transport) -> list[Bucket]:
    """The buckets a claim for ``transport`` (a route target) takes tokens from: its own;
    for a pool, the bucket of the member serving now (the pool then sends those rows
    through no other rate-limited member)."""
    serving = getattr(transport, "serving_member", None)
    if is_pool(transport.name) and callable(serving):
        member = serving()
        if member is None:
            return []
        bucket = bucket_of(member)
        return [] if bucket is None else [bucket]
    bucket = bucket_of(transport)
    return [] if bucket is None else [bucket]


class ReceiverLimiter:
    """Decides, in the claim transaction, which claimed rows are within their limits."""

    def __init__(self, settings: Settings) -> None:
        self.key = (settings.otp_secret or "").encode() or _UNKEYED
        self.limits: dict[str, Rate] = {}
        for command in PERSONAL_COMMANDS:
            limit = settings.receiver_limit_for(command)
            if limit is not None:
                self.limits[command] = limit

    @property
    def active(self) -> bool:
        return bool(self.limits)

    def describe(self, command: str) -> str:
        return f"{self.limits[command]} per receiver for {command}"

    def screen(self, tx: LimitStoreTransaction,
               rows: Sequence[tuple[int, str, Any]]) -> dict[int, str]:
        """Rows (id, canonical command, decoded data) beyond their receiver's limit, with the
        reason to fail them; the others take their place in the window."""
        claims: list[ReceiverClaim] = []
        commands: list[str] = []
        for row_id, command, data in rows:
            limit = self.limits.get(command)
            receiver = _receiver(data)
            if limit is None or receiver is None:
                continue
            claims.append(ReceiverClaim(row_id, receiver_digest(self.key, command, receiver),
                                        limit.period))
            commands.append(command)
        if not claims:
            return {}
        taken, held = tx.receiver_places(claims)
        refused: dict[int, str] = {}
        accepted: list[ReceiverClaim] = []
        # One command at a time: each has its own limit (the digests differ by command).
        for command in dict.fromkeys(commands):
            mine = [claim for claim, cmd in zip(claims, commands, strict=True) if cmd == command]
            verdicts = within_limit(self.limits[command].count, taken,
                                    [(claim.digest, claim.id in held) for claim in mine])
            for claim, ok in zip(mine, verdicts, strict=True):
                if ok:
                    if claim.id not in held:
                        accepted.append(claim)
                else:
                    refused[claim.id] = (f"{RECEIVER_LIMIT_RULE}: the receiver already had "
                                         f"{self.describe(command)}")
        tx.take_receiver_places(accepted)
        return refused


def _receiver(data: Any) -> str | None:
    receiver = data.get("receiver") if isinstance(data, dict) else None
    return receiver if isinstance(receiver, str) and receiver.strip() else None


__all__ = [
    "RECEIVER_LIMIT_RULE",
    "ReceiverLimiter",
    "bucket_of",
    "buckets_for",
    "canonical_receiver",
    "receiver_digest",
]
