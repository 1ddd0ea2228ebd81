"""AsyncKlimeClient on a real event loop (asyncio.run) against real loopback servers.

What matters here: awaiting never blocks the loop (a ticker task keeps
ticking while the endpoint hangs), no thread per await, cancellation only
cancels the wait, and every event stays accounted for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, List, TypeVar

import pytest

import klime
from klime import AsyncKlimeClient, BatchResponse, SendError

from .conftest import FAST, SRC, Recorder
from .servers import Collector, Held, RawServer, refused_url, wait_until

T = TypeVar("T")


@pytest.fixture
def make_async(recorder: Recorder) -> Iterator[Callable[..., AsyncKlimeClient]]:
    """Build AsyncKlimeClients wired to ``recorder``; their sync core is shut down after the test."""
    made: List[AsyncKlimeClient] = []

    def make(endpoint: str, **options: Any) -> AsyncKlimeClient:
        opts = {**FAST, "on_error": recorder.on_error, "on_success": recorder.on_success, **options}
        opts.setdefault("logger", logging.getLogger("klime.test"))
        client = AsyncKlimeClient("test-write-key", endpoint, **opts)
        made.append(client)
        return client

    yield make
    for c in made:
        c._client.shutdown(timeout=1)


class Ticker:
    """A task that counts loop turns of ``interval`` seconds: it stalls if the loop is blocked."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.ticks = 0
        self.longest_gap = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


# --- the plain methods and the coroutines ------------------------------------------------------


def test_track_identify_group_then_flush(collector: Collector, make_async: Callable[..., AsyncKlimeClient]) -> None:
    client = make_async(collector.url)

    async def main() -> bool:
        client.identify("u1", {"plan": "pro"})
        client.group("org1", {"name": "Acme"}, user_id="u1")
        client.track("Report Generated", {"n": 1}, user_id="u1")
        assert client.queue_size() == 3
        return await client.flush(timeout=10)

    assert run(main()) is True
    assert sorted(e["type"] for e in collector.events) == ["group", "identify", "track"]
    assert client.queue_size() == 0
    assert client.stats().delivered == 3


def test_sync_variants_return_a_batch_response(
    collector: Collector, make_async: Callable[..., AsyncKlimeClient]
) -> None:
    client = make_async(collector.url)

    async def main() -> List[BatchResponse]:
        return [
            await client.track_sync("Signed Up", user_id="u1"),
            await client.identify_sync("u1", {"email": "a@example.com"}),
            await client.group_sync("org1", {"name": "Acme"}, user_id="u1"),
        ]

    responses = run(main())
    assert [r.accepted for r in responses] == [1, 1, 1]
    assert [len(r.events) for r in collector.requests] == [1, 1, 1]
    assert [r.events[0]["type"] for r in collector.requests] == ["track", "identify", "group"]


def test_argument_errors_are_the_sync_clients(make_async: Callable[..., AsyncKlimeClient]) -> None:
    client = make_async(refused_url())
    with pytest.raises(ValueError, match="user_id or group_id"):
        client.track("x")
    with pytest.raises(TypeError, match="user_id must be a string"):
        client.identify(42)  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(ValueError, match="event name"):
            await client.track_sync("", user_id="u")
        with pytest.raises(ValueError, match="group_id"):
            await client.group_sync("")
        with pytest.raises(TypeError, match="timeout"):
            await client.flush(timeout="1")  # type: ignore[arg-type]

    run(main())


def test_track_sync_with_the_endpoint_down_raises_send_error(
    make_async: Callable[..., AsyncKlimeClient], recorder: Recorder
) -> None:
    client = make_async(refused_url(), retry_max_attempts=2)

    async def main() -> SendError:
        with pytest.raises(SendError) as info:
            await client.track_sync("Down", user_id="u1")
        return info.value

    err = run(main())
    assert err.reason == "retries_exhausted"
    assert "Failed to send 1 event(s)" in err.message and "Connection" in err.message
    assert [ev.event for ev in err.events] == ["Down"]
    assert recorder.errors == []  # the caller got it; callbacks are not called for sync sends


def test_flush_with_the_endpoint_down_reports_and_returns_false(
    make_async: Callable[..., AsyncKlimeClient], recorder: Recorder
) -> None:
    client = make_async(refused_url(), retry_max_attempts=2)

    async def main() -> bool:
        client.track("A", user_id="u")
        client.track("B", user_id="u")
        return await client.flush(timeout=10)

    assert run(main()) is False
    assert sorted(ev.event or "" for ev in recorder.failed_events) == ["A", "B"]
    assert {e.reason for e, _ in recorder.errors} == {"retries_exhausted"}


def test_flush_with_nothing_queued_is_true(collector: Collector, make_async: Callable[..., AsyncKlimeClient]) -> None:
    client = make_async(collector.url)
    assert run(client.flush()) is True
    assert collector.requests == []


# --- the loop never blocks ------------------------------------------------------------------------


def test_flush_timing_out_on_a_hanging_endpoint_keeps_the_loop_running(
    make_async: Callable[..., AsyncKlimeClient], recorder: Recorder
) -> None:
    server = RawServer(lambda r: "hang")
    try:
        client = make_async(server.url, request_timeout=30_000)

        async def main() -> tuple[bool, Ticker, float]:
            client.track("Stuck", user_id="u")
            with Ticker() as ticker:
                t0 = time.monotonic()
                ok = await client.flush(timeout=0.6)
                took = time.monotonic() - t0
            return ok, ticker, took

        ok, ticker, took = run(main())
        assert ok is False
        assert took < 10
        # A blocked loop would tick zero times; generous bounds for a busy machine.
        assert ticker.ticks >= 5, ticker.ticks
        assert [(e.reason, [ev.event for ev in evs]) for e, evs in recorder.errors] == [("flush_deadline", ["Stuck"])]
    finally:
        server.close()


def test_track_sync_on_a_hanging_endpoint_does_not_block_the_loop(
    make_async: Callable[..., AsyncKlimeClient],
) -> None:
    held = Held(0)
    server = RawServer(held)
    try:
        client = make_async(server.url, request_timeout=30_000)

        async def main() -> tuple[BatchResponse, int]:
            with Ticker() as ticker:
                task = asyncio.ensure_future(client.track_sync("Slow", user_id="u"))
                # The loop runs while the request hangs; then the server answers.
                while ticker.ticks < 10:
                    await asyncio.sleep(0.01)
                assert not task.done()
                held.release()
                response = await task
            return response, ticker.ticks

        response, ticks = run(main())
        assert response.accepted == 1 and ticks >= 10
    finally:
        held.release()
        server.close()


def test_fifty_concurrent_track_sync_share_the_bounded_lanes(
    make_async: Callable[..., AsyncKlimeClient],
) -> None:
    server = RawServer(lambda r: "slow:0.05")
    try:
        client = make_async(server.url, max_in_flight=4)
        before = threading.active_count()
        peak = [before]

        async def main() -> List[BatchResponse]:
            async def sample() -> None:
                while True:
                    peak[0] = max(peak[0], threading.active_count())
                    await asyncio.sleep(0.005)

            sampler = asyncio.ensure_future(sample())
            try:
                return await asyncio.gather(*(client.track_sync("Burst", {"i": i}, user_id="u") for i in range(50)))
            finally:
                sampler.cancel()

        responses = run(main())
        assert len(responses) == 50 and all(r.accepted == 1 for r in responses)
        assert sorted(r.json()["batch"][0]["properties"]["i"] for r in server.requests) == list(range(50))
        # At most max_in_flight sender lanes (plus the server's per-connection threads,
        # one per lane connection); fifty threads would be far above this.
        assert peak[0] - before <= 2 * 4 + 2, (before, peak[0])
    finally:
        server.close()


# --- cancellation -----------------------------------------------------------------------------------


def test_cancelling_a_flush_cancels_only_the_wait(
    make_async: Callable[..., AsyncKlimeClient], recorder: Recorder
) -> None:
    held = Held(0)
    server = RawServer(held)
    try:
        client = make_async(server.url, request_timeout=30_000)

        async def main() -> bool:
            client.track("Kept", user_id="u")
            task = asyncio.ensure_future(client.flush())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert client._client._worker._watchers == []  # the watcher was forgotten
            held.release()
            # The event went on and is delivered; a new flush sees it through.
            return await client.flush(timeout=10)

        assert run(main()) is True
        assert [r.json()["batch"][0]["event"] for r in server.requests] == ["Kept"]
        assert recorder.errors == [] and len(recorder.successes) == 1
    finally:
        held.release()
        server.close()


def test_cancelled_track_sync_still_sends_and_a_failure_goes_to_on_error(
    make_async: Callable[..., AsyncKlimeClient], recorder: Recorder
) -> None:
    held = Held(0)
    server = RawServer(lambda r: held(r) and (500, b"{}"))  # held, then a permanent-looking failure
    try:
        client = make_async(server.url, request_timeout=30_000, retry_max_attempts=1)

        async def main() -> None:
            task = asyncio.ensure_future(client.track_sync("Orphan", user_id="u"))
            assert await asyncio.to_thread(server.wait_for_requests, 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            held.release()

        run(main())
        assert wait_until(lambda: recorder.errors)
        [(error, events)] = recorder.errors
        assert isinstance(error, SendError) and [ev.event for ev in events] == ["Orphan"]
        assert error.reason == "retries_exhausted"
    finally:
        held.release()
        server.close()


def test_cancelled_track_sync_that_succeeds_is_delivered(
    make_async: Callable[..., AsyncKlimeClient], recorder: Recorder
) -> None:
    held = Held(0)
    server = RawServer(held)
    try:
        client = make_async(server.url, request_timeout=30_000)

        async def main() -> None:
            task = asyncio.ensure_future(client.track_sync("Gone", user_id="u"))
            assert await asyncio.to_thread(server.wait_for_requests, 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            held.release()

        run(main())
        assert wait_until(lambda: client.stats().delivered == 1)
        assert recorder.errors == []
    finally:
        held.release()
        server.close()


# --- shutdown ---------------------------------------------------------------------------------------


def test_async_with_shuts_down_and_delivers(collector: Collector, recorder: Recorder) -> None:
    async def main() -> AsyncKlimeClient:
        async with AsyncKlimeClient("k", collector.url, **FAST, on_error=recorder.on_error) as client:
            client.track("Inside", user_id="u")
        return client

    client = run(main())
    assert [e["event"] for e in collector.events] == ["Inside"]
    assert "shut down" in repr(client) and "AsyncKlimeClient" in repr(client)
    assert client._client not in klime._lifecycle.clients()
    client.track("After", user_id="u")  # ignored, no exception

    async def after() -> None:
        with pytest.raises(SendError) as info:
            await client.track_sync("After", user_id="u")
        assert info.value.reason == "shutdown"
        assert await client.shutdown() is True  # a second shutdown does nothing

    run(after())
    assert recorder.errors == []


def test_shutdown_on_a_hanging_endpoint_is_bounded_and_keeps_the_loop_running(
    make_async: Callable[..., AsyncKlimeClient], recorder: Recorder
) -> None:
    server = RawServer(lambda r: "hang")
    try:
        client = make_async(server.url, request_timeout=30_000)

        async def main() -> tuple[bool, int, float]:
            for i in range(3):
                client.track("Stuck", {"i": i}, user_id="u")
            with Ticker() as ticker:
                t0 = time.monotonic()
                ok = await client.shutdown(timeout=0.8)
                took = time.monotonic() - t0
            return ok, ticker.ticks, took

        ok, ticks, took = run(main())
        assert ok is False and took < 10 and ticks >= 5
        assert sorted(ev.properties["i"] for ev in recorder.failed_events) == [0, 1, 2]
        assert {e.reason for e, _ in recorder.errors} == {"shutdown_deadline"}
        assert "shut down" in repr(client)
    finally:
        server.close()


def test_cancelled_shutdown_is_completed_by_exit(
    make_async: Callable[..., AsyncKlimeClient], recorder: Recorder
) -> None:
    held = Held(0)
    server = RawServer(held)
    try:
        client = make_async(server.url, request_timeout=30_000)

        async def main() -> None:
            client.track("Late", user_id="u")
            task = asyncio.ensure_future(client.shutdown())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run(main())
        # Still registered: exit (or a later shutdown) finishes the job.
        assert client._client in klime._lifecycle.clients()
        client.track("Ignored", user_id="u")
        held.release()
        assert client._client.shutdown(timeout=10) is True
        assert [r.json()["batch"][0]["event"] for r in server.requests] == ["Late"]
        assert recorder.errors == []
    finally:
        held.release()
        server.close()


def test_disabled_client_needs_no_key_and_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLIME_WRITE_KEY", raising=False)

    async def main() -> None:
        async with AsyncKlimeClient(disabled=True) as client:
            client.track("x", user_id="u")
            assert (await client.track_sync("x", user_id="u")).status == "disabled"
            assert await client.flush() is True
            assert client.queue_size() == 0

    run(main())


def test_missing_write_key_is_the_same_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLIME_WRITE_KEY", raising=False)
    with pytest.raises(ValueError, match="KLIME_WRITE_KEY"):
        AsyncKlimeClient()


def test_repr_never_shows_the_write_key() -> None:
    client = AsyncKlimeClient("secret-write-key-123", refused_url(), disabled=True)
    assert "secret-write-key-123" not in repr(client)
    assert client.endpoint.startswith("http://127.0.0.1:")


def test_a_flush_completing_after_the_loop_closed_is_harmless(
    make_async: Callable[..., AsyncKlimeClient], recorder: Recorder
) -> None:
    held = Held(0)
    server = RawServer(held)
    try:
        client = make_async(server.url, request_timeout=30_000)
        pending: List[Any] = []

        async def main() -> None:
            client.track("Later", user_id="u")
            # A flush still waiting when asyncio.run() ends is cancelled with the loop.
            pending.append(asyncio.ensure_future(client.flush()))
            await asyncio.sleep(0.1)

        run(main())
        held.release()
        assert client._client.flush(timeout=10) is True
        assert recorder.errors == []
    finally:
        held.release()
        server.close()


# --- exit and fork ------------------------------------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import klime

    async def main():
        client = klime.AsyncKlimeClient("k", sys.argv[1], flush_interval=60_000, shutdown_timeout=5_000)
        for i in range(3):
            client.track("At Exit", {"i": i}, user_id="u")
        print("QUEUED", flush=True)

    asyncio.run(main())
    # No shutdown: the exit hook delivers.
    """
)


def test_process_exit_delivers_what_an_async_client_queued(tmp_path: Path, collector: Collector) -> None:
    script = tmp_path / "exit_async.py"
    script.write_text(EXIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run(
        [sys.executable, str(script), collector.url], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "QUEUED"
    assert sorted(e["properties"]["i"] for e in collector.events) == [0, 1, 2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is not available")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Python 3.12+ warns about forking with threads
def test_forked_child_runs_its_own_loop_and_sends_only_its_own_events(
    collector: Collector, make_async: Callable[..., AsyncKlimeClient]
) -> None:
    client = make_async(collector.url)
    client.track("Parent", user_id="u")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:

            async def child() -> Any:
                client.track("Child", user_id="u")
                ok = await client.flush(timeout=10)
                response = await client.track_sync("Child Sync", user_id="u")
                return {"ok": ok, "accepted": response.accepted, "queued": client.queue_size()}

            os.write(write_end, json.dumps(asyncio.run(child())).encode())
        except BaseException as exc:
            os.write(write_end, json.dumps({"exception": repr(exc)}).encode())
            code = 3
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    data = os.read(read_end, 65536)
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0, data
    assert json.loads(data) == {"ok": True, "accepted": 1, "queued": 0}
    assert run(client.flush(timeout=10)) is True
    assert sorted(e["event"] for e in collector.events) == ["Child", "Child Sync", "Parent"]
