"""flushing(): flush when a block or a call ends, as a context manager and a decorator."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from typing import Any, Iterator, List

import pytest

import klime
from klime import AsyncKlimeClient, _module

from .conftest import FAST, MakeClient, Recorder
from .servers import Collector, RawServer, refused_url


class BoomError(Exception):
    pass


def names(collector: Collector) -> List[str]:
    return [e["event"] for e in collector.events]


# --- sync -------------------------------------------------------------------------------------------


def test_with_block_flushes_at_the_end(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)  # flush_interval is a minute: only the flush sends
    with client.flushing(timeout=10) as block:
        client.track("Job Done", user_id="u")
        assert collector.requests == []
    assert names(collector) == ["Job Done"]
    assert "flushing" in repr(block).lower()


def test_with_block_flushes_when_it_raises_and_the_exception_propagates(
    collector: Collector, make_client: MakeClient
) -> None:
    client = make_client(collector.url)
    error = BoomError("job failed")
    with pytest.raises(BoomError) as info, client.flushing():
        client.track("Job Failed", user_id="u")
        raise error
    assert info.value is error
    assert names(collector) == ["Job Failed"]


def test_decorator_on_a_plain_function(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)

    @client.flushing(timeout=10)
    def handler(event: dict, context: object = None) -> dict:  # type: ignore[type-arg]
        """A Lambda-style handler."""
        client.track("Handled", {"id": event["id"]}, user_id="u")
        return {"status": 200}

    assert handler.__name__ == "handler" and handler.__doc__ == "A Lambda-style handler."
    assert handler({"id": 1}) == {"status": 200}
    assert names(collector) == ["Handled"]
    assert handler({"id": 2}) == {"status": 200}  # every call flushes
    assert len(collector.requests) == 2


def test_decorated_function_that_raises_still_flushes(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)

    @client.flushing()
    def task() -> None:
        client.track("Before Crash", user_id="u")
        raise BoomError("x")

    with pytest.raises(BoomError):
        task()
    assert names(collector) == ["Before Crash"]


def test_undelivered_events_go_to_on_error_and_never_raise_into_the_block(
    make_client: MakeClient, recorder: Recorder
) -> None:
    client = make_client(refused_url(), retry_max_attempts=2)

    @client.flushing(timeout=10)
    def job() -> str:
        client.track("Lost", user_id="u")
        return "done"

    assert job() == "done"
    assert [(e.reason, [ev.event for ev in evs]) for e, evs in recorder.errors] == [("retries_exhausted", ["Lost"])]


def test_timeout_bounds_the_flush_at_the_end(make_client: MakeClient, recorder: Recorder) -> None:
    with RawServer(lambda r: "hang") as server:
        client = make_client(server.url, request_timeout=30_000)
        t0 = time.monotonic()
        with client.flushing(timeout=0.5):
            client.track("Stuck", user_id="u")
        assert time.monotonic() - t0 < 10
        assert [e.reason for e, _ in recorder.errors] == ["flush_deadline"]


def test_bad_timeout_raises_where_it_is_written(make_client: MakeClient) -> None:
    client = make_client(refused_url())
    with pytest.raises(TypeError, match="timeout"):
        client.flushing(timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        klime.flushing(timeout=float("nan"))


def test_a_flush_that_fails_is_logged_not_raised(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(refused_url())

    def broken(timeout: Any = None) -> bool:
        raise RuntimeError("flush broke")

    monkeypatch.setattr(client, "flush", broken)
    with caplog.at_level(logging.ERROR, logger="klime.test"), client.flushing():
        pass
    assert "flushing() block failed" in caplog.text


# --- async ------------------------------------------------------------------------------------------


def test_decorator_on_a_coroutine_function_does_not_block_the_loop(
    make_client: MakeClient, recorder: Recorder
) -> None:
    with RawServer(lambda r: "hang") as server:
        client = make_client(server.url, request_timeout=30_000)

        @client.flushing(timeout=0.6)
        async def handler(n: int) -> int:
            client.track("Async Handled", user_id="u")
            return n * 2

        assert inspect.iscoroutinefunction(handler)

        async def main() -> tuple[int, int]:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.ensure_future(tick())
            result = await handler(21)
            ticker.cancel()
            return result, ticks

        result, ticks = asyncio.run(main())
        assert result == 42
        assert ticks >= 5, ticks  # the loop ran while the flush waited on the hanging endpoint
        assert [e.reason for e, _ in recorder.errors] == ["flush_deadline"]


def test_coroutine_that_raises_still_flushes(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)

    @client.flushing()
    async def handler() -> None:
        client.track("Async Crash", user_id="u")
        raise BoomError("x")

    with pytest.raises(BoomError):
        asyncio.run(handler())
    assert names(collector) == ["Async Crash"]


def test_async_with_on_the_async_client(collector: Collector, recorder: Recorder) -> None:
    async def main() -> None:
        async with AsyncKlimeClient("k", collector.url, **FAST) as client:
            async with client.flushing(timeout=10):
                client.track("In Block", user_id="u")
                assert collector.requests == []
            assert names(collector) == ["In Block"]
            with pytest.raises(BoomError):
                async with client.flushing():
                    client.track("Raised", user_id="u")
                    raise BoomError()
            assert names(collector) == ["In Block", "Raised"]

            @client.flushing()
            async def handler() -> str:
                client.track("Decorated", user_id="u")
                return "ok"

            assert await handler() == "ok"
            assert names(collector)[-1] == "Decorated"

    asyncio.run(main())


def test_async_with_on_the_sync_client_does_not_block_the_loop(make_client: MakeClient, recorder: Recorder) -> None:
    with RawServer(lambda r: "hang") as server:
        client = make_client(server.url, request_timeout=30_000)

        async def main() -> int:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.ensure_future(tick())
            async with client.flushing(timeout=0.5):
                client.track("Stuck", user_id="u")
            ticker.cancel()
            return ticks

        assert asyncio.run(main()) >= 5
        assert [e.reason for e, _ in recorder.errors] == ["flush_deadline"]


# --- the default client -------------------------------------------------------------------------------


@pytest.fixture
def no_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in [v for v in os.environ if v.startswith("KLIME_")]:
        monkeypatch.delenv(var)
    monkeypatch.setattr(_module, "_default", None)
    yield
    if _module._default is not None:
        _module._default.shutdown(timeout=1)


def test_module_flushing_flushes_the_default_client(collector: Collector, no_default: None) -> None:
    @klime.flushing(timeout=10)
    def handler() -> None:
        # Configured inside the call: the client in force when the call ends is flushed.
        klime.configure("k", collector.url, **FAST)
        klime.track("Default", user_id="u")

    handler()
    assert names(collector) == ["Default"]
    with klime.flushing():
        klime.track("Block", user_id="u")
    assert names(collector) == ["Default", "Block"]

    @klime.flushing()
    async def async_handler() -> None:
        klime.track("Async Default", user_id="u")

    asyncio.run(async_handler())
    assert names(collector) == ["Default", "Block", "Async Default"]


def test_module_flushing_without_any_client_is_a_no_op(no_default: None) -> None:
    with klime.flushing():
        pass

    async def main() -> None:
        async with klime.flushing():
            pass

    asyncio.run(main())
    assert _module._default is None
