"""The console's screenshots in docs/, taken by the browser tests' own Chromium.

    python -m tests.support.screenshots

Builds a scratch database with an hour of made-up traffic (a burst of failures in the last
quarter of an hour, a failover pool whose backup took over two minutes ago), serves the
console on it and saves the overview at a laptop's and a
phone's width, and the failed rows at a laptop's.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import psycopg

from outbox.settings import Settings
from tests.conftest import empty_database
from tests.support.browser import browser_context
from tests.support.console import OPERATOR, serve_console, write_users

DOCS = Path(__file__).resolve().parents[2] / "docs"

SEED = """
INSERT INTO outbox.message (command, data, route, state, created_at, sent_at, available_at,
                            attempts, served_by)
SELECT 'send-sms', jsonb_build_object('receiver', '+62812' || lpad(n::text, 7, '0'),
                                      'message', 'demo'),
       CASE WHEN n % 3 = 0 THEN 'sms|backup' END, 'sent',
       sent - make_interval(secs => 0.02 + (n % 17) / 40.0), sent, sent, 1,
       CASE WHEN n % 3 = 0 THEN CASE WHEN sent > now() - interval '2 minutes'
                                     THEN 'backup' ELSE 'sms' END END
FROM (SELECT n, now() - make_interval(secs => 3600 * power(random(), 1.15)) AS sent
      FROM generate_series(1, 14000) AS n) AS s;

INSERT INTO outbox.message (command, data, route, state, created_at, available_at, attempts,
                            last_error)
SELECT CASE WHEN n % 4 = 0 THEN 'send-email' ELSE 'send-sms' END,
       CASE WHEN n % 4 = 0
            THEN jsonb_build_object('receiver', 'user' || n || '@example.org',
                                    'subject', 'demo', 'message', 'demo')
            ELSE jsonb_build_object('receiver', '+62813' || lpad(n::text, 7, '0'),
                                    'message', 'demo') END,
       CASE WHEN n % 4 = 0 THEN 'mail' END, 'failed', due - interval '3 minutes', due,
       CASE WHEN n % 5 = 0 THEN 1 ELSE 12 END,
       CASE WHEN n % 4 = 0 THEN 'SMTP 550 mailbox unavailable for user' || n || '@example.org'
            WHEN n % 5 = 0 THEN 'device answered 1203: invalid receiver'
            ELSE 'device answered 1101 (modem busy) after 12 attempts' END
FROM (SELECT n, now() - make_interval(secs => 900 * random()) AS due
      FROM generate_series(1, 57) AS n) AS f;

INSERT INTO outbox.message (command, data, state, created_at, available_at, attempts, last_error)
SELECT 'create-otp', jsonb_build_object('receiver', '+62814' || lpad(n::text, 7, '0'),
                                        'message', 'Code %s', 'reference', 'r' || n),
       'expired', now() - make_interval(secs => 60 * n), now() - make_interval(secs => 50 * n),
       0, 'expired before it could be sent'
FROM generate_series(1, 9) AS n;

INSERT INTO outbox.message (command, data, route, created_at, available_at, attempts)
SELECT 'send-sms', jsonb_build_object('receiver', '+62815' || lpad(n::text, 7, '0'),
                                      'message', 'demo'),
       CASE WHEN n % 2 = 0 THEN 'sms|backup' END, now() - make_interval(secs => n / 10.0),
       now() + CASE WHEN n % 7 = 0 THEN interval '2 minutes' ELSE interval '0' END,
       CASE WHEN n % 7 = 0 THEN 2 ELSE 0 END
FROM generate_series(1, 420) AS n;

INSERT INTO outbox.message (command, data, created_at)
SELECT 'create-otp', jsonb_build_object('receiver', '+62816' || lpad(n::text, 7, '0'),
                                        'message', 'Your code is %s', 'reference', 'o' || n),
       now() - make_interval(secs => n / 4.0)
FROM generate_series(1, 35) AS n;

ANALYZE outbox.message;
"""


def main() -> int:
    from outbox import db  # noqa: PLC0415

    with empty_database() as url, tempfile.TemporaryDirectory() as scratch:
        db.upgrade(url)
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(SEED)
        settings = Settings(database_url=url, transports={
            "default": "stdout://", "sms": "redis://127.0.0.1:6379/0?topic=sms",
            "backup": "stdout://", "mail": "http://otp:secret@127.0.0.1:9/api/otp"},
            routes={"send-email": "mail", "block-msisdn": "sms|backup"})
        users = write_users(Path(scratch) / "users")
        with serve_console(url, users, settings=settings, health=True,
                           refresh_seconds=2.0) as console:
            time.sleep(2)  # the first health probe
            shots = [("console-overview.png", "/", (1280, 900)),
                     ("console-overview-phone.png", "/", (390, 844)),
                     ("console-failed.png", "/failed", (1280, 900))]
            for name, path, viewport in shots:
                with browser_context(Path(scratch) / name, credentials=OPERATOR,
                                     viewport=viewport) as context:
                    page = context.new_page()
                    page.goto(console + path)
                    page.wait_for_timeout(1500)
                    page.screenshot(path=str(DOCS / name), full_page=path == "/")
                    print(f"docs/{name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
