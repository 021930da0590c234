"""The operator's console in a real Chromium: what a person sees and clicks."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from outbox.producer import enqueue
from tests.support.browser import browser_context
from tests.support.console import OPERATOR, VIEWER, serve_console, write_users

pytestmark = [pytest.mark.integration, pytest.mark.browser]

WAIT_MS = 20_000  # an upper bound for the page to catch up on a loaded machine, not a target


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users(tmp_path_factory.mktemp("console") / "users")


@pytest.fixture
def console(clean_db: str, users_file: Path) -> Iterator[str]:
    with serve_console(clean_db, users_file, refresh_seconds=0.5, health=True) as url:
        yield url


def seed(conn: psycopg.Connection[Any], *, pending: int, failed: int) -> list[int]:
    for n in range(pending):
        enqueue(conn, "send-sms", {"receiver": f"+4917000000{n:02d}", "message": "hello"})
    ids = [enqueue(conn, "send-sms", {"receiver": f"+4917100000{n:02d}", "message": "secret"})
           for n in range(failed)]
    conn.execute("UPDATE outbox.message SET state = 'failed', attempts = 2, "
                 "last_error = 'device answered 1101' WHERE id = ANY(%s)", (ids,))
    return ids


def test_log_in_and_see_the_counts_of_outbox_status(console: str, clean_db: str,
                                                    conn: psycopg.Connection[Any],
                                                    tmp_path: Path) -> None:
    seed(conn, pending=3, failed=2)
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "outbox.cli", "status", "--json"],
        env={"DATABASE_URL": clean_db, "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, check=True).stdout)
    with browser_context(tmp_path / "profile", credentials=OPERATOR) as context:
        page = context.new_page()
        answer = page.goto(console + "/")
        assert answer is not None and answer.status == 200
        expect(page.locator("#who")).to_contain_text(f"{OPERATOR[0]} · operator")
        for state, count in status["counts"].items():
            expect(page.locator(f"#count-{state}")).to_have_attribute("data-count", str(count))
        expect(page.locator("#routes tr[data-route=default]")).to_contain_text("3")
        expect(page.locator("#health")).to_contain_text("database", timeout=WAIT_MS)
        assert "+49170" not in page.content()


def test_a_browser_without_the_right_password_is_refused(console: str,
                                                         tmp_path: Path) -> None:
    with browser_context(tmp_path / "anonymous") as context:
        page = context.new_page()
        # Headless Chromium gives up on a challenge it has no answer to (no prompt to show).
        with pytest.raises(PlaywrightError, match="AUTH"):
            page.goto(console + "/")
    with browser_context(tmp_path / "intruder", credentials=(OPERATOR[0], "guess")) as context:
        page = context.new_page()
        answer = page.goto(console + "/")
        assert answer is not None and answer.status == 401
        assert "log in to the outbox console" in page.content()


def test_the_overview_updates_itself_when_a_row_is_inserted(
        console: str, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    seed(conn, pending=1, failed=0)
    with browser_context(tmp_path / "profile", credentials=VIEWER) as context:
        page = context.new_page()
        page.goto(console + "/")
        expect(page.locator("#count-pending")).to_have_attribute("data-count", "1")
        marker = page.evaluate("() => { window.notReloaded = true; return true; }")
        assert marker
        enqueue(conn, "send-sms", {"receiver": "+491710000099", "message": "new"})
        enqueue(conn, "send-email", {"receiver": "x@example.org", "subject": "s",
                                     "message": "m"})
        expect(page.locator("#count-pending")).to_have_attribute("data-count", "3",
                                                                  timeout=WAIT_MS)
        assert page.evaluate("() => window.notReloaded === true")  # same page, not reloaded


def test_retry_a_failed_row_and_see_it_pending(console: str, conn: psycopg.Connection[Any],
                                               tmp_path: Path) -> None:
    ids = seed(conn, pending=0, failed=3)
    with browser_context(tmp_path / "profile", credentials=OPERATOR) as context:
        page = context.new_page()
        page.goto(console + "/failed")
        expect(page.locator("#failed-total")).to_contain_text("3")
        page.check(f"input[name=ids][value='{ids[1]}']")
        page.click("button[value='retry:selected']")
        expect(page.locator("#confirm h1")).to_have_text("Retry 1 failed row?")
        page.click("#confirm-button")
        expect(page.locator("#done")).to_contain_text("retried 1 row")
        expect(page.locator("#failed-total")).to_contain_text("2")
        page.goto(f"{console}/rows/{ids[1]}")
        expect(page.locator("#row-state")).to_have_text("pending")
        expect(page.locator("#row-attempts")).to_have_text("0")
        page.goto(console + "/audit")
        expect(page.locator("#audit tbody tr").first).to_contain_text(OPERATOR[0])
        expect(page.locator("#audit tbody tr").first).to_contain_text(f"id {ids[1]}")
    states = dict(conn.execute("SELECT id, state FROM outbox.message").fetchall())
    assert states == {ids[0]: "failed", ids[1]: "pending", ids[2]: "failed"}


def test_a_viewer_has_no_buttons_and_is_refused_anyway(
        console: str, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    ids = seed(conn, pending=0, failed=1)
    with browser_context(tmp_path / "profile", credentials=VIEWER) as context:
        page = context.new_page()
        page.goto(console + "/failed")
        expect(page.locator("#viewer-note")).to_be_visible()
        expect(page.locator("#actions")).to_have_count(0)
        page.goto(f"{console}/rows/{ids[0]}")
        expect(page.locator("button[value='retry:selected']")).to_have_count(0)
        # The same request the operator's button sends, from the viewer's own page.
        status = page.evaluate("""async (id) => {
            const body = new URLSearchParams({
                csrf: document.querySelector('meta[name=csrf-token]').content,
                do: 'retry:selected', ids: String(id), confirmed: 'yes'});
            const answer = await fetch('/actions', {method: 'POST', body});
            return answer.status;
        }""", ids[0])
        assert status == 403
    assert conn.execute("SELECT state FROM outbox.message").fetchall() == [("failed",)]


class _Attacker(BaseHTTPRequestHandler):
    """A page on another origin that makes the visitor's browser post to the console."""

    target = ""

    def do_GET(self) -> None:
        body = f"""<!doctype html><html><body>
<form id="forged" method="post" action="{self.target}/actions">
  <input name="do" value="retry:matching"><input name="confirmed" value="yes">
  <input name="csrf" value="{'0' * 64}">
</form>
<script>document.getElementById('forged').submit();</script></body></html>""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_forged_cross_site_post_is_refused(console: str, conn: psycopg.Connection[Any],
                                             tmp_path: Path) -> None:
    seed(conn, pending=0, failed=2)
    handler = type("Attacker", (_Attacker,), {"target": console})
    attacker = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=attacker.serve_forever, daemon=True)
    thread.start()
    try:
        with browser_context(tmp_path / "profile", credentials=OPERATOR) as context:
            page = context.new_page()
            page.goto(console + "/")  # logged in to the console ...
            with page.expect_navigation(url=f"{console}/actions"):
                page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")  # ... then lured
            expect(page.locator("main")).to_contain_text("did not come from a page of this "
                                                         "console")
    finally:
        attacker.shutdown()
        attacker.server_close()
    assert conn.execute("SELECT DISTINCT state FROM outbox.message").fetchall() == [("failed",)]
    assert conn.execute("SELECT count(*) FROM outbox.audit").fetchone() == (0,)
