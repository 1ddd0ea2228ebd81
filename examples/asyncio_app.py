"""An asyncio service: AsyncKlimeClient, a scope per request, a flushing job.

    python examples/asyncio_app.py

Three "requests" are handled concurrently. Each runs inside
``klime.scope(user_id=...)``, so its ``track`` calls carry the right user
without passing it around, even though the tasks interleave. A signup is
confirmed with ``await client.track_sync(...)``, and a background job
decorated with ``client.flushing()`` delivers its events when it returns.
None of the awaits blocks the event loop: a heartbeat task keeps ticking
throughout. ``async with`` shuts the client down at the end.

Runs offline against a loopback collector unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Dict, List

from _loopback import describe, klime_target

import klime
from klime import AsyncKlimeClient


async def handle_request(client: AsyncKlimeClient, user_id: str, path: str) -> None:
    # Everything tracked in this request (and in tasks it starts) gets the user and the path.
    with klime.scope(user_id=user_id, properties={"path": path}):
        await asyncio.sleep(0.01)  # stand-in for real work; other requests run meanwhile
        client.track("Page Viewed")
        if path == "/signup":
            # Wait for delivery without blocking the loop: a BatchResponse, or SendError raised.
            response = await client.track_sync("Signed Up", {"plan": "trial"})
            print(f"signup confirmed: accepted={response.accepted}")


async def nightly_report(client: AsyncKlimeClient, orgs: List[Dict[str, object]]) -> int:
    @client.flushing(timeout=10)  # flushes when the job ends, also if it raises
    async def job() -> int:
        for org in orgs:
            client.track("Usage Snapshot Recorded", {"seats": org["seats"]}, group_id=str(org["id"]))
        return len(orgs)

    return await job()


async def heartbeat(beats: List[int]) -> None:
    while True:
        await asyncio.sleep(0.005)
        beats.append(1)


async def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with klime_target() as (options, collector):
        beats: List[int] = []
        ticker = asyncio.ensure_future(heartbeat(beats))
        async with AsyncKlimeClient(**options, flush_interval=60_000) as client:
            await asyncio.gather(
                handle_request(client, "user_1", "/pricing"),
                handle_request(client, "user_2", "/signup"),
                handle_request(client, "user_3", "/docs"),
            )
            reported = await nightly_report(client, [{"id": "org_1", "seats": 12}, {"id": "org_2", "seats": 3}])
            print(f"nightly report: {reported} org(s), queued afterwards: {client.queue_size()}")
            delivered = await client.flush(timeout=10)
        ticker.cancel()

        if collector is not None:
            for event in sorted(collector.events, key=lambda e: (e["type"], e.get("event", ""), str(e))):
                print(describe(event))
        print(f"the loop stayed responsive: {'yes' if beats else 'no'}")
        print("all delivered" if delivered else "some events were not delivered (see the log)")
        return 0 if delivered else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
