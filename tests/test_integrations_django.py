"""klime.integrations.django with Django's own RequestFactory and test Client.

Needs ``klime.scope``/``klime.configure`` (async branch) for the scope and
settings tests.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, Iterator

import pytest

from .servers import Collector, refused_url

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="test-only",
        ALLOWED_HOSTS=["testserver"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["klime.integrations.django.KlimeMiddleware"],
        INSTALLED_APPS=[],
        DATABASES={},
    )
    django.setup()

from asgiref.sync import iscoroutinefunction  # noqa: E402
from django.http import HttpResponse, StreamingHttpResponse  # noqa: E402
from django.test import Client, RequestFactory, override_settings  # noqa: E402
from django.urls import path  # noqa: E402

import klime  # noqa: E402
from klime.integrations.django import KlimeMiddleware  # noqa: E402


def report(request: Any) -> HttpResponse:
    klime.track("Report Generated", {"format": "pdf"})
    return HttpResponse("ok")


def anonymous(request: Any) -> HttpResponse:
    klime.track("Anonymous Ping", group_id="org_1")
    return HttpResponse("ok")


def boom(request: Any) -> HttpResponse:
    klime.track("Before Crash", user_id="u1")
    raise RuntimeError("view failed")


def stream(request: Any) -> StreamingHttpResponse:
    def chunks() -> Iterator[str]:
        for i in range(2):
            klime.track("Chunk", {"i": i})
            yield str(i)

    return StreamingHttpResponse(chunks())


urlpatterns = [path("report", report), path("anonymous", anonymous), path("boom", boom), path("stream", stream)]


class User:
    is_authenticated = True

    def __init__(self, pk: int) -> None:
        self.pk = pk


class Anonymous:
    is_authenticated = False
    pk = None


@pytest.fixture
def klime_settings(collector: Collector) -> Iterator[Callable[..., Dict[str, Any]]]:
    def make(**extra: Any) -> Dict[str, Any]:
        return {"WRITE_KEY": "k", "ENDPOINT": collector.url, "FLUSH_INTERVAL": 60_000, **extra}

    yield make
    klime.shutdown(timeout=1)


def test_authenticated_user_id_is_in_scope(collector: Collector, klime_settings: Callable[..., Dict[str, Any]]) -> None:
    with override_settings(KLIME=klime_settings()):
        middleware = KlimeMiddleware(report)
        request = RequestFactory().get("/report")
        request.user = User(42)
        assert middleware(request).status_code == 200
        request = RequestFactory().get("/anonymous")
        request.user = Anonymous()
        KlimeMiddleware(anonymous)(request)
        assert klime.flush(timeout=5)
    events = {e["event"]: e for e in collector.events}
    assert events["Report Generated"]["userId"] == "42"
    assert events["Report Generated"]["properties"] == {"format": "pdf"}
    assert "userId" not in events["Anonymous Ping"]


def test_settings_configure_the_default_client_once(klime_settings: Callable[..., Dict[str, Any]]) -> None:
    with override_settings(KLIME=klime_settings(FLUSH_INTERVAL=1234, MAX_BATCH_SIZE=7)):
        KlimeMiddleware(report)
        first = klime.get_client()
        KlimeMiddleware(report)  # a second handler (another test Client) reuses it
        assert klime.get_client() is first
        assert first.flush_interval == 1234 and first.max_batch_size == 7


def test_bad_settings_are_improperly_configured() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with override_settings(KLIME={"WRITE_KEY": "k", "NOT_AN_OPTION": 1}), pytest.raises(ImproperlyConfigured):
        KlimeMiddleware(report)
    with override_settings(KLIME={"write_key": "k"}), pytest.raises(ImproperlyConfigured, match="upper-case"):
        KlimeMiddleware(report)
    with override_settings(KLIME={"WRITE_KEY": "k", "FLUSH_TIMEOUT": -1}), pytest.raises(ImproperlyConfigured):
        KlimeMiddleware(report)


def test_flush_after_the_response_through_the_test_client(
    collector: Collector, klime_settings: Callable[..., Dict[str, Any]]
) -> None:
    with override_settings(KLIME=klime_settings(FLUSH=True, FLUSH_TIMEOUT=5)):
        response = Client().get("/anonymous")
        assert response.status_code == 200
        # The test client closes the response: the flush has run.
        assert [e["event"] for e in collector.events] == ["Anonymous Ping"]


def test_a_view_raising_still_flushes(collector: Collector, klime_settings: Callable[..., Dict[str, Any]]) -> None:
    with override_settings(KLIME=klime_settings(FLUSH=True)):
        response = Client(raise_request_exception=False).get("/boom")
        assert response.status_code == 500
        assert [e["event"] for e in collector.events] == ["Before Crash"]


def test_endpoint_down_never_fails_the_response() -> None:
    conf = {"WRITE_KEY": "k", "ENDPOINT": refused_url(), "FLUSH_INTERVAL": 60_000, "RETRY_INITIAL_DELAY": 50,
            "RETRY_MAX_ATTEMPTS": 50, "FLUSH": True, "FLUSH_TIMEOUT": 0.3}
    errors: list = []
    try:
        with override_settings(KLIME={**conf, "ON_ERROR": lambda e, evs: errors.append(e.reason)}):
            response = Client().get("/anonymous")
            assert response.status_code == 200 and response.content == b"ok"
            assert errors == ["flush_deadline"]
    finally:
        klime.shutdown(timeout=0.5)


def test_streaming_body_is_produced_inside_the_scope(
    collector: Collector, klime_settings: Callable[..., Dict[str, Any]]
) -> None:
    with override_settings(KLIME=klime_settings()):
        request = RequestFactory().get("/stream")
        request.user = User(5)
        response = KlimeMiddleware(stream)(request)
        assert b"".join(response) == b"01"
        assert klime.flush(timeout=5)
    assert [e["userId"] for e in collector.events] == ["5", "5"]


def test_async_mode(collector: Collector, klime_settings: Callable[..., Dict[str, Any]]) -> None:
    async def view(request: Any) -> HttpResponse:
        klime.track("Async View")
        return HttpResponse("ok")

    class AsyncRequest:
        def __init__(self) -> None:
            self.scope = {"type": "http"}  # marks an ASGI request

        async def auser(self) -> User:
            return User(7)

    async def main() -> None:
        middleware = KlimeMiddleware(view)
        assert iscoroutinefunction(middleware)  # Django sees it as async
        response = await middleware(AsyncRequest())
        assert response.status_code == 200
        response.close()  # as Django's ASGI handler does once the body is sent

    with override_settings(KLIME=klime_settings(FLUSH=True)):
        asyncio.run(main())
        events = collector.wait_for_events(1)
    assert [(e["event"], e["userId"]) for e in events] == [("Async View", "7")]
