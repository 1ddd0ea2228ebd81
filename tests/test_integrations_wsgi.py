"""klime.integrations.wsgi through Flask's own test client, and a bare WSGI app.

The scope tests (``track`` without ids taking them from the request) need
``klime.scope`` from the async branch; the flush tests do not.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List

import pytest

from klime import KlimeClient
from klime.integrations.wsgi import KlimeMiddleware

from .conftest import MakeClient, RawServers, Recorder
from .servers import Collector, Held, refused_url

flask = pytest.importorskip("flask")

SLOW = dict(flush_interval=60_000)  # nothing goes out unless something flushes


def flask_app(client: KlimeClient) -> Any:
    app = flask.Flask(__name__)

    @app.get("/report")
    def report() -> Any:
        client.track("Report Generated", {"format": "pdf"})
        return {"ok": True}

    @app.get("/explicit")
    def explicit() -> Any:
        client.track("Exported", user_id="someone-else")
        return {"ok": True}

    @app.get("/boom")
    def boom() -> Any:
        client.track("Before Crash", user_id="u1")
        raise RuntimeError("view failed")

    @app.get("/stream")
    def stream() -> Any:
        def chunks() -> Iterator[str]:
            for i in range(3):
                client.track("Chunk Sent", {"i": i})
                yield f"{i}\n"

        return app.response_class(chunks(), mimetype="text/plain")

    return app


def from_header(environ: Dict[str, Any]) -> Dict[str, Any]:
    return {"user_id": environ.get("HTTP_X_USER"), "group_id": "org_1", "properties": {"via": "wsgi"}}


def test_track_in_a_view_takes_ids_and_properties_from_identify(
    collector: Collector, make_client: MakeClient
) -> None:
    client = make_client(collector.url, **SLOW)
    app = flask_app(client)
    app.wsgi_app = KlimeMiddleware(app.wsgi_app, client, identify=from_header)  # type: ignore[method-assign]
    web = app.test_client()
    assert web.get("/report", headers={"X-User": "u42"}).status_code == 200
    assert web.get("/explicit", headers={"X-User": "u42"}).status_code == 200
    assert client.flush(timeout=5)
    first, second = sorted(collector.events, key=lambda e: e["event"], reverse=True)
    assert first["userId"] == "u42" and first["groupId"] == "org_1"
    assert first["properties"] == {"via": "wsgi", "format": "pdf"}
    assert second["userId"] == "someone-else"  # the call's own id wins
    # Outside a request, no scope is left behind.
    with pytest.raises(ValueError):
        client.track("Outside")


def test_a_streamed_body_is_produced_inside_the_scope(
    collector: Collector, make_client: MakeClient
) -> None:
    client = make_client(collector.url, **SLOW)
    app = flask_app(client)
    app.wsgi_app = KlimeMiddleware(app.wsgi_app, client, identify=from_header)  # type: ignore[method-assign]
    response = app.test_client().get("/stream", headers={"X-User": "u7"})
    assert response.data == b"0\n1\n2\n"
    assert client.flush(timeout=5)
    assert [e["userId"] for e in collector.events] == ["u7"] * 3


def test_flush_true_delivers_before_the_request_is_over(
    collector: Collector, make_client: MakeClient
) -> None:
    client = make_client(collector.url, **SLOW)
    app = flask_app(client)
    app.wsgi_app = KlimeMiddleware(app.wsgi_app, client, flush=True)  # type: ignore[method-assign]
    response = app.test_client().get("/explicit")
    response.close()
    assert response.status_code == 200
    assert [e["event"] for e in collector.events] == ["Exported"]  # no waiting: the flush already ran
    assert client.queue_size() == 0


def test_flush_runs_when_the_iterable_is_closed_not_before() -> None:
    flushed: List[str] = []

    class Client:
        def flush(self, timeout: Any = None) -> bool:
            flushed.append(f"flush {timeout}")
            return True

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])

        class Body:
            def __iter__(self) -> Iterator[bytes]:
                flushed.append("body")
                yield b"ok"

            def close(self) -> None:
                flushed.append("close")

        return Body()

    wrapped = KlimeMiddleware(app, Client(), flush=True, flush_timeout=1.5)  # type: ignore[arg-type]
    result = wrapped({"REQUEST_METHOD": "GET"}, lambda *a: None)
    assert flushed == []
    assert list(result) == [b"ok"]
    assert flushed == ["body"]
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    assert flushed == ["body", "close", "flush 1.5"]


def test_a_view_raising_still_flushes(
    collector: Collector, make_client: MakeClient
) -> None:
    client = make_client(collector.url, **SLOW)
    app = flask_app(client)
    app.wsgi_app = KlimeMiddleware(app.wsgi_app, client, flush=True)  # type: ignore[method-assign]
    response = app.test_client().get("/boom")  # Flask answers 500
    response.close()
    assert response.status_code == 500
    assert [e["event"] for e in collector.events] == ["Before Crash"]

    def raw(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        client.track("Raw Before Crash", user_id="u1")
        raise RuntimeError("app failed")

    with pytest.raises(RuntimeError, match="app failed"):
        KlimeMiddleware(raw, client, flush=True)({}, lambda *a: None)
    assert [e["event"] for e in collector.events] == ["Before Crash", "Raw Before Crash"]


def test_endpoint_down_never_fails_the_response(
    make_client: MakeClient, recorder: Recorder
) -> None:
    client = make_client(refused_url(), **SLOW, retry_max_attempts=50, retry_initial_delay=50)
    app = flask_app(client)
    app.wsgi_app = KlimeMiddleware(app.wsgi_app, client, flush=True, flush_timeout=0.5)  # type: ignore[method-assign]
    started = time.monotonic()
    response = app.test_client().get("/explicit")
    response.close()
    assert response.status_code == 200 and response.json == {"ok": True}
    assert time.monotonic() - started < 30  # bounded by flush_timeout, never by the retries
    assert [e.reason for e, _ in recorder.errors] == ["flush_deadline"]  # type: ignore[attr-defined]


def test_a_hanging_endpoint_is_cut_at_flush_timeout(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    server = raw_servers(Held(0))
    client = make_client(server.url, **SLOW, request_timeout=30_000)
    app = flask_app(client)
    app.wsgi_app = KlimeMiddleware(app.wsgi_app, client, flush=True, flush_timeout=0.3)  # type: ignore[method-assign]
    response = app.test_client().get("/explicit")
    response.close()
    assert response.status_code == 200
    assert [e.reason for e, _ in recorder.errors] == ["flush_deadline"]  # type: ignore[attr-defined]


def test_a_flush_that_raises_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def flush(self, timeout: Any = None) -> bool:
            raise RuntimeError("flush exploded")

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b"fine"]

    result = KlimeMiddleware(app, Broken(), flush=True)({}, lambda *a: None)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="klime"):
        assert list(result) == [b"fine"]
        result.close()  # type: ignore[attr-defined]
    assert "flush exploded" in caplog.text


def test_identify_that_raises_or_returns_junk_leaves_the_request_alone(
    collector: Collector, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(collector.url, **SLOW)
    app = flask_app(client)

    def broken(environ: Dict[str, Any]) -> Dict[str, Any]:
        raise KeyError("no session")

    for identify in (broken, lambda environ: ["not", "a", "mapping"], lambda environ: {"user": "u1"}):
        app.wsgi_app = KlimeMiddleware(flask_app(client).wsgi_app, client, identify=identify)  # type: ignore
        with caplog.at_level(logging.ERROR, logger="klime"):
            assert app.test_client().get("/explicit").status_code == 200
    assert "no session" in caplog.text and "mapping" in caplog.text and "unknown key" in caplog.text
    assert client.flush(timeout=5)
    assert len(collector.events) == 3


def test_no_identify_and_no_flush_passes_the_app_through() -> None:
    sentinel = [b"x"]

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return sentinel

    assert KlimeMiddleware(app)({}, lambda *a: None) is sentinel


def test_default_client_is_flushed_when_client_is_none(collector: Collector) -> None:
    import klime

    client = klime.configure(write_key="k", endpoint=collector.url, flush_interval=60_000)
    try:
        def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            klime.track("Default Client Event", user_id="u1")
            start_response("200 OK", [])
            return [b"ok"]

        result = KlimeMiddleware(app, flush=True)({}, lambda *a: None)
        list(result)
        result.close()  # type: ignore[attr-defined]
        assert [e["event"] for e in collector.events] == ["Default Client Event"]
    finally:
        client.shutdown(timeout=1)


def test_threads_handle_requests_in_separate_scopes(
    collector: Collector, make_client: MakeClient
) -> None:
    client = make_client(collector.url, **SLOW)
    barrier = threading.Barrier(4)

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        barrier.wait(5)
        client.track("Concurrent", {"n": environ["n"]})
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = KlimeMiddleware(app, client, identify=lambda env: {"user_id": f"u{env['n']}"})

    def one(n: int) -> None:
        result = wrapped({"n": n}, lambda *a: None)
        list(result)
        result.close()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert client.flush(timeout=5)
    assert sorted((e["userId"], e["properties"]["n"]) for e in collector.events) == [(f"u{n}", n) for n in range(4)]
