"""structlog set-up: one event name per thing that happens, personal data masked.

JSON lines when standard output is not a terminal, readable lines on a terminal. Every event
passes through :func:`mask_sensitive`, which masks receivers (only the last two characters
stay, enough to tell two apart while debugging), message texts, subjects, OTP codes and
secrets, at any depth of the event.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

#: keys whose values are never logged at all
SECRET_KEYS = frozenset({
    "message", "text", "subject", "otp", "code", "body", "password", "secret", "token",
    "otp_secret", "authorization", "param1", "param2", "param3", "param4",
})
#: keys whose values are personal data: masked but for their last two characters
PERSONAL_KEYS = frozenset({"receiver", "msisdn", "email", "phone", "to"})
MASK = "***"


def mask_value(key: str, value: Any) -> Any:
    lowered = key.lower()
    if lowered in SECRET_KEYS:
        return MASK if value not in (None, "") else value
    if lowered in PERSONAL_KEYS:
        return mask_receiver(value)
    if isinstance(value, Mapping):
        return {k: mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(key, item) for item in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


# Personal data inside free text: a transport's error message or a traceback that quotes a
# receiver. Phone numbers are runs of 7 to 15 digits not glued to other digits, letters or
# separators (so no timestamp, IP address, port or version number matches).
_EMAIL_RE = re.compile(r"[^\s@\"'<>()\[\],;:]+@[^\s@\"'<>()\[\],;:]+\.[A-Za-z]{2,}")
_MSISDN_RE = re.compile(r"(?<![\w+])(?<!\d[.:/-])\+?\d{7,15}(?!\w|[.:/-]\d)")


def scrub_text(text: str) -> str:
    """``text`` with every e-mail address and phone number in it masked like a receiver."""
    if "@" in text:
        text = _EMAIL_RE.sub(lambda match: str(mask_receiver(match.group())), text)
    return _MSISDN_RE.sub(lambda match: str(mask_receiver(match.group())), text)


def mask_receiver(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        return value
    return MASK + value[-2:] if len(value) > 4 else MASK


def redact(text: str, *sources: Any) -> str:
    """``text`` without the sensitive values of ``sources``: mappings (a row's ``data``) or the
    JSON bytes of a payload as sent.

    For a transport error that quotes what it refused ("message 'Your code 4711' too long"):
    such a reason is stored in ``last_error`` and logged, and pattern scrubbing cannot tell a
    text from any other words. Digit runs inside a text (an OTP code) go too, so a partial
    quote does not reveal the code either.
    """
    for value, secret in sorted(_sensitive_values(sources), key=lambda item: -len(item[0])):
        if value in text:
            text = text.replace(value, MASK if secret else str(mask_receiver(value)))
    return text


def _sensitive_values(sources: tuple[Any, ...]) -> set[tuple[str, bool]]:
    found: set[tuple[str, bool]] = set()

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k).lower())
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, key)
        elif isinstance(value, str) and len(value) >= 4 and key in SECRET_KEYS | PERSONAL_KEYS:
            found.add((value, key in SECRET_KEYS))
            if key in SECRET_KEYS:
                found.update((digits, True) for digits in re.findall(r"\d{4,}", value))

    for source in sources:
        if isinstance(source, bytes | str):
            try:
                walk(json.loads(source), "")
            except ValueError:
                continue
        else:
            walk(source, "")
    return found


def mask_sensitive(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask personal data and secrets anywhere in the event."""
    for key in list(event_dict):
        if key != "event":
            event_dict[key] = mask_value(key, event_dict[key])
    return event_dict


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog once for the process (the CLI calls this; libraries never do)."""
    out = stream or sys.stdout
    renderer: Any
    if fmt == "console" or (fmt == "auto" and out.isatty()):
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    # Client libraries report through stdlib logging what our transports already turn into
    # errors and events of our own (pika logs every lost connection at ERROR, with the
    # broker address); keep only their critical messages.
    for noisy in ("pika", "paho", "websockets", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Before masking: a rendered traceback is text that may quote a receiver.
            structlog.processors.format_exc_info,
            mask_sensitive,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def debug_enabled() -> bool:
    """Whether debug events are rendered; lets hot loops skip building per-message events."""
    wrapper = structlog.get_config().get("wrapper_class")
    check = getattr(wrapper, "is_enabled_for", None)
    return True if check is None else bool(check(wrapper, logging.DEBUG))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


__all__ = [
    "MASK",
    "configure",
    "debug_enabled",
    "get_logger",
    "mask_receiver",
    "mask_sensitive",
    "mask_value",
    "redact",
    "scrub_text",
]
