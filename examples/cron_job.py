"""A scheduled job that reports company-level activity (no user involved).

    python examples/cron_job.py            # e.g. from cron: 0 * * * *

Events about an organisation as a whole (usage snapshots, webhook volumes,
billing syncs) are tracked with ``group_id`` alone. A short-lived job must
deliver before it exits: it calls ``flush()`` with a timeout and turns the
result into its exit status, so the scheduler sees a failed delivery.

The same body works as a Celery task; in a prefork worker, create the client
at module level (it is fork-safe) and call ``client.flush(timeout=...)`` at
the end of the task only if the task must confirm delivery.

Runs offline against a loopback collector unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Dict, List

from _loopback import describe, klime_target

from klime import KlimeClient


def load_usage() -> List[Dict[str, object]]:
    """Stand-in for the job's real query: one row per customer organisation."""
    return [
        {"org_id": "org_456", "name": "Acme Inc", "seats_used": 42, "seats_paid": 50, "api_calls": 18_230},
        {"org_id": "org_789", "name": "Globex", "seats_used": 7, "seats_paid": 25, "api_calls": 310},
        {"org_id": "org_901", "name": "Initech", "seats_used": 0, "seats_paid": 10, "api_calls": 0},
    ]


def report_usage(client: KlimeClient, rows: List[Dict[str, object]]) -> None:
    run_at = datetime.now(timezone.utc)
    for row in rows:
        org_id = str(row["org_id"])
        # Group-level event: group_id only, no user_id.
        client.track(
            "Usage Snapshot Recorded",
            {
                "seats_used": row["seats_used"],
                "seats_paid": row["seats_paid"],
                "api_calls_last_hour": row["api_calls"],
                "run_at": run_at,  # datetimes are sent as ISO 8601
            },
            group_id=org_id,
        )
        # Keep the company's traits current; no user_id, so no one is linked.
        client.group(org_id, {"name": row["name"], "seats_paid": row["seats_paid"]})


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with klime_target() as (options, collector):
        # The job sends a few events and exits: no reason to wait 2 s per batch.
        client = KlimeClient(**options, flush_interval=500)
        report_usage(client, load_usage())
        # Wait at most 15 s; anything still undelivered is logged and
        # reported to on_error, and flush() returns False.
        delivered = client.flush(timeout=15)
        client.shutdown(timeout=5)

        if collector is not None:
            for event in collector.events:
                print(describe(event))
        print(f"usage job: {'delivered' if delivered else 'NOT delivered'}")
        return 0 if delivered else 1


if __name__ == "__main__":
    raise SystemExit(main())
