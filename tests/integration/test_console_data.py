"""The console's data endpoints and actions over real HTTP against the real Postgres."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from outbox import dashboard
from outbox.admin import read_status
from outbox.producer import enqueue
from outbox.settings import Settings
from tests.support.console import OPERATOR, VIEWER, serve_console, write_users

pytestmark = pytest.mark.integration

SECRET_TEXT = "Your secret code is 482913"


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users(tmp_path_factory.mktemp("console") / "users")


@pytest.fixture
def console(clean_db: str, users_file: Path) -> Iterator[str]:
    with serve_console(clean_db, users_file) as url:
        yield url


def client(base: str, who: tuple[str, str] | None = OPERATOR) -> httpx.Client:
    return httpx.Client(base_url=base, auth=who, timeout=30, follow_redirects=False)


def fetch(base: str, path: str, who: tuple[str, str] | None = OPERATOR) -> httpx.Response:
    with client(base, who) as http:
        return http.get(path)


def seed_failed(conn: psycopg.Connection[Any], count: int, *, command: str = "send-sms",
                reason: str = "device answered 1101", route: str | None = None,
                age: str = "0 seconds") -> list[int]:
    ids = []
    for n in range(count):
        data: dict[str, Any] = {"receiver": f"+4915100000{n:03d}", "message": SECRET_TEXT}
        if command == "send-email":
            data.update(receiver=f"someone{n}@example.org", subject="Secret subject")
        ids.append(enqueue(conn, command, data, route=route))
    conn.execute("UPDATE outbox.message SET state = 'failed', attempts = 3, last_error = %s, "
                 "created_at = now() - %s::interval WHERE id = ANY(%s)", (reason, age, ids))
    return ids


def test_every_page_needs_a_login(console: str) -> None:
    for path in ("/", "/api/overview", "/failed", "/api/failed", "/audit", "/rows/1",
                 "/static/console.css"):
        for who in (None, (OPERATOR[0], "wrong"), ("nobody", "x")):
            answer = fetch(console, path, who)
            assert answer.status_code == 401, (path, who)
            assert answer.headers["www-authenticate"].startswith("Basic ")
            assert answer.headers["cache-control"] == "no-store"


def test_every_response_carries_no_store_and_a_policy_without_inline_script(
        console: str) -> None:
    with client(console) as http:
        for path in ("/", "/fragments/overview", "/api/overview", "/failed", "/audit",
                     "/api/audit", "/static/console.js", "/rows/999"):
            answer = http.get(path)
            assert answer.headers["cache-control"] == "no-store", path
            policy = answer.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "unsafe-inline" not in policy
            assert answer.headers["x-frame-options"] == "DENY"
        assert http.get("/rows/999").status_code == 404


def test_overview_counts_are_those_of_outbox_status(console: str, clean_db: str,
                                                    conn: psycopg.Connection[Any]) -> None:
    for n in range(4):
        enqueue(conn, "send-sms", {"receiver": f"+49151000001{n}", "message": "hi"})
    seed_failed(conn, 3)
    enqueue(conn, "send-email", {"receiver": "a@example.org", "subject": "s", "message": "m"})
    conn.execute("UPDATE outbox.message SET state = 'sent', sent_at = now(), "
                 "created_at = now() - interval '2 seconds' WHERE command = 'send-email'")
    shown = fetch(console, "/api/overview").json()
    cli = subprocess.run([sys.executable, "-m", "outbox.cli", "status", "--json"],
                         env={"DATABASE_URL": clean_db, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True)
    expected = json.loads(cli.stdout)
    assert shown["status"]["counts"] == expected["counts"] == {
        "pending": 4, "failed": 3, "sent": 1, "expired": 0}
    assert shown["status"]["routes"].keys() == expected["routes"].keys()
    assert shown["failed_by_route"] == {"default": 3} and shown["expired_by_route"] == {}
    assert len(shown["per_minute"]) == dashboard.CHART_MINUTES
    assert sum(minute["sent"] for minute in shown["per_minute"]) == 1
    assert sum(minute["failed"] for minute in shown["per_minute"]) == 3
    assert shown["lag"]["sample"] == 1 and 1.5 < shown["lag"]["p50_seconds"] < 60


def test_receivers_are_masked_and_texts_never_shown(console: str,
                                                    conn: psycopg.Connection[Any]) -> None:
    sms = seed_failed(conn, 2, reason="refused +49151000000 as unknown")
    mail = seed_failed(conn, 1, command="send-email")
    with client(console) as http:
        pages = [http.get(path).text for path in (
            "/failed", "/api/failed", f"/rows/{sms[0]}", f"/api/rows/{sms[0]}",
            f"/rows/{mail[0]}", f"/api/rows/{mail[0]}", "/", "/api/overview")]
    everything = "\n".join(pages)
    for secret in ("+49151000000", "+49151000001", "someone0@example.org", SECRET_TEXT,
                   "482913", "Secret subject"):
        assert secret not in everything
    detail = fetch(console, f"/api/rows/{sms[0]}").json()
    assert detail["receiver"] == "***00" and detail["state"] == "failed"
    assert detail["fields"] == ["message", "receiver"]
    assert "***00" in detail["last_error"]


def test_failed_rows_filter_by_command_route_age_and_reason(
        clean_db: str, users_file: Path, conn: psycopg.Connection[Any]) -> None:
    settings = Settings(database_url=clean_db,
                        transports={"default": "stdout://", "mail": "stdout://"},
                        routes={"send-email": "mail"})
    sms = seed_failed(conn, 2, reason="device answered 1101")
    old = seed_failed(conn, 1, reason="device answered 1101", age="3 hours")
    mail = seed_failed(conn, 2, command="send-email", reason="SMTP 550 mailbox full")
    with serve_console(clean_db, users_file, settings=settings) as url, client(url) as http:
        def ids(**query: str) -> set[int]:
            found = http.get("/api/failed", params=query).json()
            assert found["total"] == len(found["rows"])
            return {row["id"] for row in found["rows"]}

        assert ids() == {*sms, *old, *mail}
        assert ids(command="send-email") == set(mail)
        assert ids(route="mail") == set(mail)
        assert ids(route="default") == {*sms, *old}
        assert ids(older_than="1h") == set(old)
        assert ids(newer_than="1h") == {*sms, *mail}
        assert ids(reason="MAILBOX") == set(mail)
        assert ids(reason="1101", older_than="2h") == set(old)
        bad = http.get("/api/failed", params={"older_than": "soon"})
        assert bad.status_code == 400 and "older than" in bad.json()["error"]
        assert http.get("/api/failed", params={"command": "fly"}).status_code == 400
        page = http.get("/failed", params={"route": "mail"}).text
        assert "2</b> failed rows match" in page


def form(http: httpx.Client, base: str, **fields: Any) -> dict[str, Any]:
    token = http.get("/failed").text.split('name="csrf-token" content="', 1)[1].split('"')[0]
    return {"csrf": token, **fields}


def test_a_forged_or_foreign_post_is_refused(console: str,
                                             conn: psycopg.Connection[Any]) -> None:
    ids = seed_failed(conn, 2)
    with client(console) as http:
        fields = form(http, console, do="retry:matching", confirmed="yes")
        refusals = [
            http.post("/actions", data=fields),  # neither Origin nor Referer
            http.post("/actions", data=fields, headers={"Origin": "http://evil.example"}),
            http.post("/actions", data=fields, headers={"Referer": "http://evil.example/x"}),
            http.post("/actions", data=fields, headers={"Origin": console,
                                                        "Sec-Fetch-Site": "cross-site"}),
            http.post("/actions", data={**fields, "csrf": "0" * 64},
                      headers={"Origin": console}),
            http.post("/actions", data={k: v for k, v in fields.items() if k != "csrf"},
                      headers={"Origin": console}),
        ]
    assert [answer.status_code for answer in refusals] == [403] * 6
    assert "did not come from a page of this console" in refusals[1].text
    assert "form token" in refusals[4].text
    states = conn.execute("SELECT DISTINCT state FROM outbox.message WHERE id = ANY(%s)",
                          (ids,)).fetchall()
    assert states == [("failed",)]
    assert conn.execute("SELECT count(*) FROM outbox.audit").fetchone() == (0,)


def test_a_viewer_cannot_act(console: str, conn: psycopg.Connection[Any]) -> None:
    seed_failed(conn, 1)
    with client(console, VIEWER) as http:
        page = http.get("/failed").text
        assert "Retry selected" not in page and "You are a viewer" in page
        refused = http.post("/actions", data=form(http, console, do="retry:matching",
                                                  confirmed="yes"),
                            headers={"Origin": console})
    assert refused.status_code == 403 and "viewer" in refused.text
    assert conn.execute("SELECT state FROM outbox.message").fetchall() == [("failed",)]


def test_retry_is_counted_confirmed_done_and_audited(console: str,
                                                     conn: psycopg.Connection[Any]) -> None:
    chosen = seed_failed(conn, 3, reason="device answered 1101")
    others = seed_failed(conn, 2, reason="SMTP 550", command="send-email")
    with client(console) as http:
        fields = form(http, console, do="retry:matching", reason="1101")
        confirm = http.post("/actions", data=fields, headers={"Origin": console})
        assert confirm.status_code == 200 and "Retry 3 failed rows?" in confirm.text
        assert conn.execute("SELECT count(*) FROM outbox.message WHERE state = 'failed'"
                            ).fetchone() == (5,)
        done = http.post("/actions", data={**fields, "confirmed": "yes"},
                         headers={"Origin": console})
        assert done.status_code == 303
        assert done.headers["location"].startswith("/failed?reason=1101&done=")
        flash = http.get(done.headers["location"]).text
        assert "retried <b>3</b> rows" in flash
    states = dict(conn.execute("SELECT id, state FROM outbox.message").fetchall())
    assert all(states[row] == "pending" for row in chosen)
    assert all(states[row] == "failed" for row in others)
    (audit,) = dashboard.recent_actions(conn)
    assert (audit.actor, audit.action, audit.rows, audit.filter) == (
        OPERATOR[0], "retry", 3, {"reason": "1101"})
    assert fetch(console, "/api/audit").json()["actions"][0]["rows"] == 3


def test_discard_of_selected_rows(console: str, conn: psycopg.Connection[Any]) -> None:
    ids = seed_failed(conn, 4)
    with client(console) as http:
        fields = {**form(http, console, do="discard:selected"), "ids": [str(ids[0]), str(ids[2])]}
        confirm = http.post("/actions", data=fields, headers={"Origin": console})
        assert "Discard 2 failed rows?" in confirm.text
        nothing = http.post("/actions", data={**form(http, console, do="discard:selected")},
                            headers={"Origin": console})
        assert nothing.status_code == 400 and "no row selected" in nothing.text
        done = http.post("/actions", data={**fields, "confirmed": "yes"},
                         headers={"Referer": f"{console}/failed"})
        assert done.status_code == 303
    left = [row for (row,) in conn.execute("SELECT id FROM outbox.message ORDER BY id")]
    assert left == [ids[1], ids[3]]
    assert conn.execute("SELECT action, rows, filter FROM outbox.audit").fetchall() == [
        ("discard", 2, {"ids": [ids[0], ids[2]]})]


def test_overview_stays_correct_against_read_status(clean_db: str,
                                                    conn: psycopg.Connection[Any]) -> None:
    seed_failed(conn, 2)
    overview = dashboard.read_overview(conn, Settings(database_url=clean_db))
    assert overview.status.counts == read_status(conn, Settings(database_url=clean_db)).counts
    assert overview.status.priorities == {}  # failed rows are not pending


def test_the_overview_names_the_member_serving_each_pool(
        clean_db: str, users_file: Path, conn: psycopg.Connection[Any]) -> None:
    settings = Settings(database_url=clean_db, transports={
        "default": "stdout://", "a": "stdout://", "b": "stdout://"},
        routes={"send-sms": "a|b"})
    ids = [enqueue(conn, "send-sms", {"receiver": f"+4915100009{n}", "message": "m"})
           for n in range(3)]
    conn.execute("UPDATE outbox.message SET state = 'sent', served_by = 'a', "
                 "sent_at = now() - interval '20 seconds' WHERE id = ANY(%s)", (ids[:2],))
    conn.execute("UPDATE outbox.message SET state = 'sent', served_by = 'b', "
                 "sent_at = now() - interval '2 seconds' WHERE id = %s", (ids[2],))
    with serve_console(clean_db, users_file, settings=settings) as url, client(url) as http:
        (pool,) = http.get("/api/overview").json()["pools"]
        page = http.get("/").text
    assert (pool["pool"], pool["serving"], pool["recent"]) == ("a|b", "b", {"a": 2, "b": 1})
    assert 'served by <b class="serving">b</b>' in page
