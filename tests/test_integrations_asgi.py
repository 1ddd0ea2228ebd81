"""klime.integrations.asgi through Starlette's own TestClient, and a bare ASGI app on a real loop.

The scope tests need ``klime.scope`` (async branch); the AsyncKlimeClient
test needs ``klime.AsyncKlimeClient`` (async branch).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Dict, List

import pytest

from klime import KlimeClient
from klime.integrations.asgi import KlimeMiddleware

from .conftest import MakeClient, RawServers, Recorder
from .servers import Collector, Held, refused_url, wait_until

starlette = pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.applications import Starlette  # noqa: E402
from starlette.background import BackgroundTask  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

SLOW = dict(flush_interval=60_000)


def identify(scope: Dict[str, Any]) -> Dict[str, Any]:
    headers = dict(scope["headers"])
    return {"user_id": headers.get(b"x-user", b"anon").decode(), "properties": {"via": "asgi"}}


def starlette_app(client: KlimeClient, **middleware: Any) -> Starlette:
    async def report(request: Request) -> JSONResponse:
        client.track("Report Generated", {"format": "csv"})

        async def later() -> None:
            client.track("Background Done")

        return JSONResponse({"ok": True}, background=BackgroundTask(later))

    async def boom(request: Request) -> JSONResponse:
        client.track("Before Crash", user_id="u1")
        raise RuntimeError("view failed")

    async def explicit(request: Request) -> JSONResponse:
        client.track("Exported", user_id="u1")
        return JSONResponse({"ok": True})

    routes = [Route("/report", report), Route("/boom", boom), Route("/explicit", explicit)]
    return Starlette(routes=routes, middleware=[Middleware(KlimeMiddleware, client=client, **middleware)])


def test_scope_and_flush_through_starlette(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url, **SLOW)
    with TestClient(starlette_app(client, identify=identify, flush=True)) as web:
        assert web.get("/report", headers={"X-User": "u9"}).json() == {"ok": True}
        # Flushed before the request was over: also what the background task tracked.
        events = {e["event"]: e for e in collector.events}
    assert set(events) == {"Report Generated", "Background Done"}
    assert events["Report Generated"]["userId"] == "u9"
    assert events["Report Generated"]["properties"] == {"via": "asgi", "format": "csv"}
    assert events["Background Done"]["userId"] == "u9"


def test_a_view_raising_still_flushes(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url, **SLOW)
    with TestClient(starlette_app(client, flush=True), raise_server_exceptions=False) as web:
        assert web.get("/boom").status_code == 500
    assert [e["event"] for e in collector.events] == ["Before Crash"]


def test_endpoint_down_never_fails_the_response(
    make_client: MakeClient, recorder: Recorder
) -> None:
    client = make_client(refused_url(), **SLOW, retry_max_attempts=50, retry_initial_delay=50)
    with TestClient(starlette_app(client, flush=True, flush_timeout=0.5)) as web:
        response = web.get("/explicit")
    assert response.status_code == 200 and response.json() == {"ok": True}
    assert wait_until(lambda: [e.reason for e, _ in recorder.errors] == ["flush_deadline"])  # type: ignore[attr-defined]


async def _raw_app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def _drive(app: Any, n: int) -> List[Dict[str, Any]]:
    sent: List[Dict[str, Any]] = []

    async def receive() -> Dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.gather(*(app({"type": "http", "headers": []}, receive, send) for _ in range(n)))
    return sent


def test_a_hanging_endpoint_never_blocks_the_loop_nor_starts_threads(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    server = raw_servers(Held(0))
    client = make_client(server.url, **SLOW, request_timeout=30_000)

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        client.track("Hung", user_id="u1")
        await _raw_app(scope, receive, send)

    wrapped = KlimeMiddleware(app, client, flush=True, flush_timeout=0.5)

    async def main() -> float:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(ticker())
        before = set(threading.enumerate())
        sent = await _drive(wrapped, 20)
        new = set(threading.enumerate()) - before
        stop.set()
        await task
        assert len([m for m in sent if m["type"] == "http.response.body"]) == 20
        # The client's own sending lanes and one shared helper thread; never one per request.
        # (The loopback server's connection threads aside.)
        assert all(t.name.startswith("klime-") or t.name.startswith("test-server") for t in new), new
        new = {t for t in new if t.name.startswith("klime-")}
        assert len([t for t in new if t.name == "klime-integrations"]) <= 1
        assert len(new) <= client._options.max_in_flight + 1
        return ticks

    started = time.monotonic()
    ticks = asyncio.run(main())
    assert time.monotonic() - started < 20
    assert ticks >= 5  # the loop kept running while 20 flushes waited on a hanging endpoint
    assert wait_until(lambda: sum(len(evs) for _, evs in recorder.errors) == 20)


def test_a_flush_that_raises_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def flush(self, timeout: Any = None) -> bool:
            raise RuntimeError("flush exploded")

    wrapped = KlimeMiddleware(_raw_app, Broken(), flush=True)  # type: ignore[arg-type]
    sent = asyncio.run(_drive(wrapped, 1))
    assert sent[-1]["body"] == b"ok"
    assert wait_until(lambda: "flush exploded" in caplog.text)


async def _lifespan(wrapped: Any) -> List[str]:
    """Drive one lifespan: startup, then shutdown; returns what the middleware answered."""
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    answered: List[str] = []

    async def receive() -> Dict[str, Any]:
        return incoming.pop(0)

    async def send(message: Dict[str, Any]) -> None:
        answered.append(message["type"])

    await wrapped({"type": "lifespan"}, receive, send)
    return answered


def test_lifespan_shutdown_flushes_even_for_an_app_without_lifespan(
    collector: Collector, make_client: MakeClient
) -> None:
    """uvicorn ends the process with the signal it caught: the flush must happen at lifespan shutdown."""
    client = make_client(collector.url, **SLOW)
    seen: List[str] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])  # returns at once: no lifespan support

    def identify(scope: Dict[str, Any]) -> Dict[str, Any]:
        raise AssertionError("not for lifespan")

    client.track("Queued Before Shutdown", user_id="u1")
    wrapped = KlimeMiddleware(app, client, identify=identify, flush=True)
    assert asyncio.run(_lifespan(wrapped)) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert seen == ["lifespan"]
    assert [e["event"] for e in collector.events] == ["Queued Before Shutdown"]


def test_lifespan_of_an_app_that_speaks_it_is_passed_through(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url, **SLOW)
    order: List[str] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            order.append(message["type"])
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                order.append(f"delivered before the app heard: {len(collector.events)}")
                await send({"type": "lifespan.shutdown.complete"})
                return

    client.track("Queued Before Shutdown", user_id="u1")
    answered = asyncio.run(_lifespan(KlimeMiddleware(app, client)))
    assert answered == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert order == ["lifespan.startup", "lifespan.shutdown", "delivered before the app heard: 1"]


def test_tasks_get_their_own_scope(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url, **SLOW)

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.sleep(0.01)  # interleave the requests
        client.track("Concurrent")
        await _raw_app(scope, receive, send)

    counter = iter(range(10))
    wrapped = KlimeMiddleware(app, client, identify=lambda scope: {"user_id": f"u{next(counter)}"})
    asyncio.run(_drive(wrapped, 10))
    assert client.flush(timeout=5)
    assert sorted(e["userId"] for e in collector.events) == sorted(f"u{n}" for n in range(10))


def test_async_client_is_flushed_on_its_loop(collector: Collector) -> None:
    import klime

    async def main() -> None:
        async with klime.AsyncKlimeClient("k", collector.url, flush_interval=60_000) as client:

            async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
                client.track("From Async Client", user_id="u1")
                await _raw_app(scope, receive, send)

            await _drive(KlimeMiddleware(app, client, flush=True), 1)
            assert [e["event"] for e in collector.events] == ["From Async Client"]

    asyncio.run(main())
