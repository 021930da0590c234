"""Capture log lines exactly as production renders them (JSON, through the masking processor).

``structlog.testing.capture_logs`` keeps events before the processors run, so it cannot show
what masking leaves in the output; this swaps the output stream and restores the previous
configuration afterwards.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from outbox import logs


@contextmanager
def rendered_logs(level: str = "debug") -> Iterator[io.StringIO]:
    saved = structlog.get_config()
    buffer = io.StringIO()
    logs.configure(level=level, fmt="json", stream=buffer)
    try:
        yield buffer
    finally:
        structlog.configure(**saved)


__all__ = ["rendered_logs"]
