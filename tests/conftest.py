"""Shared fixtures: a recording collector and clients that are always shut down."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, List, Tuple

import pytest
from pytest_httpserver import HTTPServer

from klime import Event, KlimeClient

from .servers import Collector, Held, RawRequest, RawServer, Reply, default_behaviour

# Quick but realistic settings for tests; each test overrides what it checks.
FAST = dict(flush_interval=60_000, retry_initial_delay=10, request_timeout=2_000, shutdown_timeout=5_000)


@pytest.fixture
def collector(httpserver: HTTPServer) -> Collector:
    return Collector(httpserver)


class Recorder:
    """on_error / on_success callbacks that remember what they were given."""

    def __init__(self) -> None:
        self.errors: List[Tuple[Exception, List[Event]]] = []
        self.successes: List[Any] = []

    def on_error(self, error: Exception, events: List[Event]) -> None:
        self.errors.append((error, list(events)))

    def on_success(self, response: Any) -> None:
        self.successes.append(response)

    @property
    def failed_events(self) -> List[Event]:
        return [ev for _, evs in self.errors for ev in evs]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_client(recorder: Recorder) -> Iterator[Callable[..., KlimeClient]]:
    """Build a client (wired to ``recorder`` unless told otherwise); shut down after the test."""
    clients: List[KlimeClient] = []

    def make(endpoint: str, **options: Any) -> KlimeClient:
        opts = {**FAST, "on_error": recorder.on_error, "on_success": recorder.on_success, **options}
        opts.setdefault("logger", logging.getLogger("klime.test"))
        client = KlimeClient("test-write-key", endpoint, **opts)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.shutdown(timeout=1)


@pytest.fixture
def raw_servers(make_client: Callable[..., KlimeClient]) -> Iterator[Callable[..., RawServer]]:
    """Start RawServers; closed (and Held gates released) before ``make_client`` shuts clients down.

    Depending on ``make_client`` makes this fixture tear down first, so a
    client stuck on a hanging server sees its connection close instead of
    waiting out its shutdown timeout.
    """
    servers: List[RawServer] = []

    def start(behaviour: Callable[[RawRequest], Reply] = default_behaviour) -> RawServer:
        server = RawServer(behaviour)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if isinstance(server.behaviour, Held):
            server.behaviour.release()
        server.close()
