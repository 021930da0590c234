"""What comparing dedup keys through a salted digest costs an INSERT (migration 0011).

    python -m bench.dedup_index [--rows N] [--rounds R]

Two tables side by side in a scratch schema, one with a unique index on the key itself (as
before 0011), one with the unique index on ``outbox.dedup_digest(key)``; each round inserts
the same number of rows with fresh keys into both, in alternating order, one row per
transaction (the app's case, with ``synchronous_commit`` off so that the disk does not drown
the difference), then one conflicting row with ``ON CONFLICT DO NOTHING``. The
figure is the median of the rounds' ratios digest/plain: on a shared machine only a ratio
within one run means something. Needs ``OUTBOX_BENCH_DATABASE_URL`` (default: the local test
server) with the outbox schema migrated (for ``outbox.dedup_digest``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import psycopg

URL = os.environ.get("OUTBOX_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

SETUP = """
DROP SCHEMA IF EXISTS bench_dedup CASCADE;
CREATE SCHEMA bench_dedup;
CREATE TABLE bench_dedup.plain (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, k text);
CREATE UNIQUE INDEX ON bench_dedup.plain (k) WHERE k IS NOT NULL;
CREATE TABLE bench_dedup.digest (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, k text);
CREATE UNIQUE INDEX ON bench_dedup.digest (outbox.dedup_digest(k)) WHERE k IS NOT NULL;
"""

INSERTS = {
    "plain": "INSERT INTO bench_dedup.plain (k) VALUES (%s) "
             "ON CONFLICT (k) WHERE k IS NOT NULL DO NOTHING",
    "digest": "INSERT INTO bench_dedup.digest (k) VALUES (%s) "
              "ON CONFLICT ((outbox.dedup_digest(k))) WHERE k IS NOT NULL DO NOTHING",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000, help="rows per table per round")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(SETUP)
    spent: dict[str, list[float]] = {name: [] for name in INSERTS}
    with psycopg.connect(URL) as conn:
        # The commit's WAL flush would drown the index's own cost in disk noise.
        conn.execute("SET synchronous_commit = off")
        conn.commit()
        for round_ in range(args.rounds):
            order = list(INSERTS) if round_ % 2 == 0 else list(reversed(INSERTS))
            for name in order:
                keys = [f"otp-+62812{n:07d}-{uuid.uuid4().hex[:8]}" for n in range(args.rows)]
                with conn.cursor() as cur:
                    started = time.perf_counter()
                    for key in keys:
                        cur.execute(INSERTS[name], (key,))
                        conn.commit()
                    cur.execute(INSERTS[name], (keys[0],))  # the clash, answered quietly
                    conn.commit()
                    spent[name].append(time.perf_counter() - started)
    ratios = [d / p for d, p in zip(spent["digest"], spent["plain"], strict=True)]
    for name, times in spent.items():
        print(f"{name}: {statistics.median(times) / (args.rows + 1) * 1e6:.1f} us per INSERT")
    print(f"digest / plain: median {statistics.median(ratios):.3f} "
          f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute("DROP SCHEMA bench_dedup CASCADE")


if __name__ == "__main__":
    main()
