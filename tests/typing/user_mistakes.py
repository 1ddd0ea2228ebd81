"""Mistakes mypy --strict must catch in user code (each line marked E: is one error).

Checked by tests/test_typing_api.py; never imported by the tests.
"""

from __future__ import annotations

import klime
from klime import AsyncKlimeClient


async def wrong(client: AsyncKlimeClient) -> None:
    client.track("x", user_id=1)  # E: user_id must be a str
    ok: int = await client.track_sync("x", user_id="u")  # E: BatchResponse is not int
    flushed: str = await client.flush()  # E: bool is not str
    klime.configure(flush_intervall=5)  # E: no such option
    klime.scope(user=1)  # E: no such argument
    size: str = klime.queue_size()  # E: int is not str
    print(ok, flushed, size)


@klime.flushing()
def handler(n: int) -> int:
    return n


handler("not an int")  # E: the decorator keeps the signature
