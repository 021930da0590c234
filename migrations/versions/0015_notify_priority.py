"""The NOTIFY of a new row says how urgent it is.

Every INSERT notifies ``outbox_message``; the payload was empty, so a relay woke every idle
worker of every lane for every new row, and an OTP's express worker raced the idle bulk workers
of its lane for the CPU and the interpreter (each of them then ran a claim that found nothing).
The payload is now the row's priority (``'0'`` .. ``'9'``): a relay wakes only its express
workers for a row they serve, and every worker for the others. Postgres still folds identical
notifications of a transaction into one: a transaction sends at most ten.

A relay from before this migration ignores the payload; a relay after it treats an empty
payload (a database not yet migrated) as "anything": nothing waits longer than before.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_0013 = importlib.import_module("outbox.migrations.versions.0013_bad_input_at_the_door")

EMPTY = "pg_notify('outbox_message', '')"
PRIORITY = "pg_notify('outbox_message', NEW.priority::text)"


def _check_function(old: str, new: str) -> str:
    text = _0013.CHECK_FUNCTION
    assert text.count(old) == 2, "the fast path and the full path each notify once"
    return text.replace(old, new)


def upgrade() -> None:
    op.execute(_check_function(EMPTY, PRIORITY))


def downgrade() -> None:
    op.execute(_0013.CHECK_FUNCTION)
