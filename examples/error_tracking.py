"""Wire the client's callbacks to an error tracker.

    python examples/error_tracking.py

``on_error(error, events)`` runs on the client's background thread for every
batch that ends undelivered; ``error`` is a ``klime.SendError`` whose
``reason`` says why (``"permanent_error"``, ``"retries_exhausted"``,
``"queue_overflow"``, ...). ``on_success(response)`` runs for every delivered
batch. Neither ever runs on the thread that called ``track()``.

``ErrorTracker`` below stands in for Sentry, Rollbar, Bugsnag and the like:
with Sentry, ``capture`` would be ``sentry_sdk.capture_exception(error)``
inside a ``sentry_sdk.push_scope()`` that sets the extras.

To show both callbacks, the example sends with a valid write key and then
with a revoked one, which the API answers with 401 (never retried). Runs
offline against a loopback collector unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Dict, List

from _loopback import klime_target

from klime import BatchResponse, Event, KlimeClient, SendError


class ErrorTracker:
    """A stand-in error tracker that keeps what it is sent."""

    def __init__(self) -> None:
        self.captured: List[Dict[str, Any]] = []
        self._lock = threading.Lock()  # callbacks come from the client's thread

    def capture(self, error: BaseException, *, tags: Dict[str, str], extra: Dict[str, Any]) -> None:
        with self._lock:
            self.captured.append({"error": error, "tags": tags, "extra": extra})


tracker = ErrorTracker()
metrics = {"delivered_events": 0, "rejected_events": 0}


def on_error(error: Exception, events: List[Event]) -> None:
    """Report undelivered events, with enough context to act on."""
    reason = getattr(error, "reason", "unknown")
    tracker.capture(
        error,
        tags={"component": "klime", "reason": reason},
        extra={
            "status": getattr(error, "status", None),
            "event_count": len(events),
            # Message ids let you find the events again; the write key is
            # never part of the error or its message.
            "message_ids": [ev.messageId for ev in events[:20]],
            "event_names": sorted({ev.event or ev.type for ev in events}),
        },
    )


def on_success(response: BatchResponse) -> None:
    metrics["delivered_events"] += response.accepted
    # failed > 0 is a partial success: the client already logged each
    # rejected event with its index and code.
    metrics["rejected_events"] += response.failed


def main() -> int:
    logging.basicConfig(level=logging.CRITICAL)  # the client logs failures too; keep the demo quiet
    with klime_target() as (options, _):
        client = KlimeClient(**options, on_error=on_error, on_success=on_success)
        client.track("Invoice Sent", {"amount_cents": 129_00}, user_id="user_123")
        client.flush(timeout=10)
        client.shutdown()

        # A revoked key: the API answers 401, a permanent error.
        revoked = {**options, "write_key": "revoked-" + options.get("write_key", os.environ.get("KLIME_WRITE_KEY", ""))}
        with KlimeClient(**revoked, on_error=on_error, on_success=on_success) as stale:
            stale.track("Invoice Sent", {"amount_cents": 45_00}, user_id="user_987")
            stale.flush(timeout=10)

    print(f"delivered events: {metrics['delivered_events']}")
    for item in tracker.captured:
        error = item["error"]
        assert isinstance(error, SendError)
        print(
            f"captured: reason={item['tags']['reason']} status={item['extra']['status']} "
            f"events={item['extra']['event_count']} names={item['extra']['event_names']}"
        )
    if not tracker.captured:
        print("captured: nothing (the endpoint accepted the revoked key)")
    return 0 if metrics["delivered_events"] >= 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
