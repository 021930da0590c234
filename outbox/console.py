"""Terminal output for the CLI: progress that only a person sees, tables, ages and counts."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO


class Progress:
    """A one-line counter on standard error, redrawn at most ten times a second.

    Silent unless standard error is a terminal, so scripts and logs get only the final
    summary the command prints on standard output.
    """

    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None,
                 force: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if force is None else force
        self._drawn = 0.0
        self._shown = False

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn < 0.1 and (self.total is None or done < self.total):
            return
        self._drawn = now
        if self.total:
            text = f"{self.label}: {done:,} of {self.total:,} ({min(done / self.total, 1):.0%})"
        else:
            text = f"{self.label}: {done:,}"
        self.stream.write(f"\r\x1b[2K{text}")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._shown = False


def table(headers: Sequence[str], rows: Sequence[Sequence[object]],
          right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; ``right`` names the right-aligned columns."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def age(seconds: float | None) -> str:
    """``None`` -> ``-``; 75 -> ``1m15s``; 90061 -> ``1d1h``; 604800 -> ``7d``."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m{secs}s" if secs else f"{minutes}m"


def count(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


__all__ = ["Progress", "age", "count", "table"]
