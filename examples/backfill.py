"""Backfill history from your own records, safely re-runnable.

    python examples/backfill.py

Each source row becomes one event with
  * ``timestamp=`` the time the thing actually happened (a datetime or an
    ISO 8601 string), not the time the backfill runs, and
  * ``message_id=`` derived from the row's primary key, so the same row
    always produces the same id. The API keeps one event per message id, so
    running the backfill twice (or resuming after a crash) adds nothing twice.

A backfill produces events much faster than they are delivered. The client's
queue is bounded (``max_queue_size``) and drops the oldest event when full,
so the loop calls ``flush()`` every few hundred rows: that waits for the
queue to drain and keeps memory flat.

Runs offline against a loopback collector unless run with ``--live``, which
sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``; offline,
it runs the backfill twice and shows that the second run produced the same
message ids.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Dict, Iterator, List

from _loopback import klime_target

from klime import Event, KlimeClient

# Any fixed UUID works; keep it forever once you have backfilled with it.
BACKFILL_NAMESPACE = uuid.UUID("6f1c2a8e-1b7e-4c59-9d43-2f0d7f0f5a11")
FLUSH_EVERY = 500


def source_rows(count: int = 1200) -> Iterator[Dict[str, object]]:
    """Stand-in for ``SELECT id, user_id, org_id, kind, created_at FROM exports``."""
    start = datetime(2025, 1, 6, 9, 0, tzinfo=timezone.utc)
    for i in range(count):
        yield {
            "id": 10_000 + i,
            "user_id": f"user_{i % 37}",
            "org_id": f"org_{i % 5}",
            "format": ("csv", "xlsx", "pdf")[i % 3],
            "created_at": start + timedelta(minutes=17 * i),
        }


def stable_message_id(table: str, row_id: object) -> str:
    """The same row always gets the same id (a UUID v5 of table and key)."""
    return str(uuid.uuid5(BACKFILL_NAMESPACE, f"{table}:{row_id}"))


def backfill(client: KlimeClient) -> int:
    sent = 0
    for row in source_rows():
        client.track(
            "Export Completed",
            {"format": row["format"], "source": "backfill"},
            user_id=str(row["user_id"]),
            group_id=str(row["org_id"]),
            timestamp=row["created_at"],
            message_id=stable_message_id("exports", row["id"]),
        )
        sent += 1
        if sent % FLUSH_EVERY == 0 and not client.flush(timeout=60):
            raise SystemExit(f"delivery failed after {sent} rows; fix the cause and re-run (it is safe)")
    if not client.flush(timeout=60):
        raise SystemExit("delivery failed; fix the cause and re-run (it is safe)")
    return sent


def main() -> int:
    failures: List[Event] = []
    with klime_target() as (options, collector):
        runs = 2 if collector is not None else 1
        for run in range(1, runs + 1):
            with KlimeClient(
                **options,
                max_batch_size=100,  # the API's maximum: fewer requests
                max_queue_size=FLUSH_EVERY * 2,  # room for one flush window, never drops
                on_error=lambda error, events: failures.extend(events),
            ) as client:
                count = backfill(client)
            print(f"run {run}: sent {count} events")
        if collector is not None:
            # Batches travel on several connections at once, so pick the earliest by time.
            first = min(collector.events, key=lambda e: e["timestamp"])
            print(f"earliest event: timestamp={first['timestamp']} messageId={first['messageId']}")
            print(
                f"collector: {len(collector.events)} events received, "
                f"{collector.unique_message_ids()} distinct message ids (what Klime stores)"
            )
    print(f"undelivered: {len(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
