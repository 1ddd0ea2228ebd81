"""Quick start: identify a user, track an event, link the user to a company.

    python examples/quickstart.py

This runs offline: it starts a small collector on 127.0.0.1 that plays the
Klime API, sends the events to it with a real ``KlimeClient`` and prints what
arrived. To send the demo events to your workspace, set ``KLIME_WRITE_KEY``
(and optionally ``KLIME_ENDPOINT``) and run it with ``--live``.
"""

from __future__ import annotations

from typing import List

from _loopback import describe, klime_target

from klime import BatchResponse, KlimeClient


def main() -> int:
    responses: List[BatchResponse] = []

    with klime_target() as (options, collector):
        where = collector.url if collector else "the endpoint from the environment"
        print(f"sending to {where}")

        client = KlimeClient(**options, on_success=responses.append)

        # Who the user is (at signup or login).
        client.identify("user_123", {"email": "stefan@example.com", "name": "Stefan"})
        # What they did: past-tense Object + Action names.
        client.track("Report Generated", {"report_type": "revenue", "rows": 1280}, user_id="user_123")
        # Which company they belong to, with the company's traits.
        client.group("org_456", {"name": "Acme Inc", "plan": "enterprise"}, user_id="user_123")

        # The three calls above only queued the events. shutdown() delivers
        # them (it would also run at process exit) and stops the client.
        delivered = client.shutdown(timeout=10)

        if collector is not None:
            print(f"the collector received {len(collector.events)} event(s):")
            for event in collector.events:
                print("  " + describe(event))
        for response in responses:
            print(f"BatchResponse: status={response.status!r} accepted={response.accepted} failed={response.failed}")
        print("all delivered" if delivered else "some events were not delivered (see the log)")
        return 0 if delivered else 1


if __name__ == "__main__":
    raise SystemExit(main())
