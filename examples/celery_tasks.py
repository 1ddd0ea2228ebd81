"""Celery tasks that track events: nothing is lost when a prefork child ends.

    pip install celery
    python examples/celery_tasks.py            # runs the task eagerly, offline
    celery -A celery_tasks worker              # a real worker (set KLIME_WRITE_KEY and a broker)

``install()`` connects Celery's signals: each worker process shuts its
clients down (delivering what they queued) before Celery ends it with
``os._exit``, which skips atexit. ``flush_after_task=True`` also delivers
after every task, for tasks whose events must be out before the next one.
Offline against a loopback collector unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

import os
import sys

try:
    from celery import Celery
except ImportError:
    print("this example needs Celery: pip install celery")
    raise SystemExit(0) from None

from _loopback import describe, klime_target

from klime import KlimeClient
from klime.integrations.celery import install

app = Celery("celery_tasks", broker=os.environ.get("CELERY_BROKER_URL", "memory://"))
client: KlimeClient  # created at import in a real project: KlimeClient() reads KLIME_WRITE_KEY


@app.task
def send_invoices(org_id: str, count: int) -> int:
    client.track("Invoices Sent", {"count": count}, group_id=org_id)
    return count


def main() -> int:
    global client
    with klime_target() as (options, collector):
        client = KlimeClient(**options, flush_interval=60_000)
        install(client, flush_after_task=True)
        app.conf.task_always_eager = True  # the demo runs tasks in this process
        client.identify("user_123", {"name": "Stefan"})
        client.group("org_456", {"name": "Acme Inc"}, user_id="user_123")
        send_invoices.delay("org_456", 12).get()
        left = client.queue_size()
        if collector is not None:
            for event in collector.events:
                print(describe(event))
        print(f"queued after the task: {left}")
        client.shutdown(timeout=5)
        return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
