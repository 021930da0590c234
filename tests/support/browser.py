"""Real Chromium (Debian's package) driven by Playwright, with a fresh profile every time.

Playwright's own browser download is never used (``playwright install`` needs the network):
``scripts/ensure-browser`` installs Debian's ``chromium``, which ``make test`` runs first.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("OUTBOX_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if not found:
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}: `make test` installs it "
                    "(scripts/ensure-browser), or set OUTBOX_TEST_CHROMIUM")
    return found


@contextmanager
def browser_context(profile: Path, *, credentials: tuple[str, str] | None = None,
                    viewport: tuple[int, int] = (1280, 800),
                    device_scale_factor: float = 1.0) -> Iterator[Any]:
    """A Chromium context on a profile directory of its own, logged in as ``credentials``."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only for browser tests

    profile.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
            http_credentials=None if credentials is None else
            {"username": credentials[0], "password": credentials[1]},
            viewport={"width": viewport[0], "height": viewport[1]},
            device_scale_factor=device_scale_factor)
        try:
            yield context
        finally:
            context.close()
