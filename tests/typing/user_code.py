"""User code calling the asyncio, module-level, scope and flushing APIs; must pass mypy --strict.

Checked by tests/test_typing_api.py; never imported by the tests.
"""

from __future__ import annotations

import asyncio
from typing import Dict, List, Optional

import klime
from klime import AsyncKlimeClient, BatchResponse, Event, KlimeClient, SendError


def on_error(error: SendError, events: List[Event]) -> None:
    print(error.reason, len(events))


async def service(client: AsyncKlimeClient) -> bool:
    client.track("Page Viewed", {"path": "/"}, user_id="u1")
    client.identify("u1", {"plan": "pro"})
    client.group("org1", {"name": "Acme"}, user_id="u1")
    response: BatchResponse = await client.track_sync("Signed Up", user_id="u1")
    await client.identify_sync("u1")
    await client.group_sync("org1", user_id="u1")
    size: int = client.queue_size()
    delivered: bool = await client.flush(timeout=2.5)
    print(response.accepted, size, client.stats().delivered)
    async with client.flushing(timeout=1):
        client.track("In Block", user_id="u1")
    return delivered and await client.shutdown(timeout=5)


async def main() -> None:
    async with AsyncKlimeClient("key", "https://i.klime.com", flush_interval=500, on_error=on_error) as client:
        await service(client)


def module_level() -> Optional[BatchResponse]:
    client: KlimeClient = klime.configure(write_key="key", flush_interval=1000, max_in_flight=4)
    assert klime.get_client() is client
    klime.track("Report Generated", {"rows": 3}, user_id="u1", timestamp="2025-01-01T00:00:00Z")
    klime.identify("u1", {"email": "a@example.com"})
    klime.group("org1", user_id="u1")
    with klime.scope(user_id="u1", group_id="org1", properties={"plan": "pro"}):
        klime.track("Scoped")
        response = klime.track_sync("Scoped Sync")
    klime.identify_sync("u1")
    klime.group_sync("org1")
    pending: int = klime.queue_size()
    ok: bool = klime.flush(timeout=1) and klime.shutdown()
    print(pending, ok)
    return response


@klime.flushing(timeout=5)
def handler(event: Dict[str, str], context: object) -> Dict[str, int]:
    klime.track("Handled", user_id=event["user"])
    return {"status": 200}


def use_handler() -> int:
    result = handler({"user": "u1"}, None)  # the decorator keeps the signature
    return result["status"]


client = KlimeClient("key")


@client.flushing()
async def async_handler(n: int) -> str:
    client.track("Async Handled", user_id="u1")
    return str(n)


async def use_async_handler() -> str:
    text: str = await async_handler(3)
    with client.flushing(timeout=2):
        client.track("Sync Block", user_id="u1")
    return text


if __name__ == "__main__":
    asyncio.run(main())
