"""Several batches in flight while a backlog exists (docs/design.md, "Lanes").

The server here answers each request after a pause, as a distant one does.
Bounds are generous: these tests check what happens, not how fast.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

import klime._worker
from klime import Event, KlimeClient
from klime._event import Codec, Prepared

from .conftest import MakeClient, RawServers, Recorder
from .servers import Held, RawRequest, RawServer, Reply, wait_until


class Distant:
    """Answers 200 after ``delay`` seconds; counts requests in flight at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def __call__(self, req: RawRequest) -> Reply:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.delay)
        finally:
            with self.lock:
                self.now -= 1
        n = len(req.json()["batch"])
        return (200, json.dumps({"status": "ok", "accepted": n, "failed": 0}).encode())


def delivered_ids(server: RawServer) -> List[str]:
    return [ev["messageId"] for req in server.requests for ev in req.json()["batch"]]


def test_one_lane_without_a_backlog(raw_servers: RawServers, make_client: MakeClient) -> None:
    distant = Distant(0.02)
    server = raw_servers(distant)
    client = make_client(server.url, max_batch_size=5)
    for i in range(10):
        client.track("Trickle", {"i": i}, user_id="u1")
        assert client.flush(timeout=10) is True
    assert distant.peak == 1
    assert server.connections == 1  # one kept-alive connection carried it all


def test_a_backlog_is_sent_on_several_connections_at_once(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    distant, server, client = send_backlog(raw_servers, make_client, 0.1, "Burst", timeout=30)
    assert recorder.errors == []
    assert 2 <= distant.peak <= client._options.max_in_flight
    assert 2 <= server.connections <= client._options.max_in_flight + 1


def send_backlog(
    raw_servers: RawServers, make_client: MakeClient, delay: float, name: str, timeout: float
) -> Tuple[Distant, RawServer, KlimeClient]:
    """400 events with known ids to a server ``delay`` s away, flushed and checked all delivered."""
    distant = Distant(delay)
    server = raw_servers(distant)
    client = make_client(server.url, max_batch_size=10, max_queue_size=1000)
    for i in range(400):
        client.track(name, {"i": i}, user_id="u1", message_id=f"{name}-{i}")
    assert client.flush(timeout=timeout) is True
    assert sorted(delivered_ids(server)) == sorted(f"{name}-{i}" for i in range(400))
    return distant, server, client


def test_max_in_flight_bounds_the_lanes(raw_servers: RawServers, make_client: MakeClient) -> None:
    distant = Distant(0.05)
    server = raw_servers(distant)
    client = make_client(server.url, max_batch_size=10, max_in_flight=3)
    for i in range(300):
        client.track("Burst", {"i": i}, user_id="u1")
    assert client.flush(timeout=30) is True
    assert len(delivered_ids(server)) == 300
    assert distant.peak <= 3


def test_live_traffic_above_one_lane_ceiling_is_delivered_without_drops(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    """20 events per 50 ms round trip is 400/s on one connection; 600/s must still all arrive."""
    server = raw_servers(Distant(0.05))
    client = make_client(server.url, max_batch_size=20, max_queue_size=1000, flush_interval=2000)
    sent = 0
    start = time.monotonic()
    while sent < 1200:  # two seconds at 600 events/s, paced
        due = int((time.monotonic() - start) * 600)
        while sent < min(due, 1200):
            client.track("Live", {"i": sent}, user_id="u1")
            sent += 1
        time.sleep(0.005)
    assert client.flush(timeout=30) is True
    assert len(set(delivered_ids(server))) == 1200
    assert client.stats().failed == {}
    assert recorder.errors == []


def test_a_429_with_retry_after_pauses_every_lane(raw_servers: RawServers, make_client: MakeClient) -> None:
    lock = threading.Lock()
    times: List[float] = []
    first = threading.Event()

    def behaviour(req: RawRequest) -> Reply:
        with lock:
            times.append(time.monotonic())
            if not first.is_set():
                first.set()
                return (429, b"slow down", {"Retry-After": "1"})
        time.sleep(0.05)
        n = len(req.json()["batch"])
        return (200, json.dumps({"status": "ok", "accepted": n, "failed": 0}).encode())

    server = raw_servers(behaviour)
    client = make_client(server.url, max_batch_size=10)
    for i in range(200):
        client.track("Paused", {"i": i}, user_id="u1")
    assert client.flush(timeout=30) is True
    assert len(set(delivered_ids(server))) == 200
    # Requests already on their way when the 429 was answered may arrive at
    # once; after that, no lane sends anything until Retry-After has passed.
    t429 = times[0]
    offsets = [round(t - t429, 3) for t in times[1:]]
    assert not [x for x in offsets if 0.3 < x < 0.9], offsets
    assert [x for x in offsets if x >= 0.9]


def test_spare_lanes_end_after_the_backlog(
    raw_servers: RawServers, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(klime._worker, "LANE_IDLE", 0.3)
    server = raw_servers(Distant(0.05))
    client = make_client(server.url, max_batch_size=10)
    for i in range(300):
        client.track("Burst", {"i": i}, user_id="u1")
    assert client.flush(timeout=30) is True
    lanes = lambda: [t for t in threading.enumerate() if t.name == "klime-sender"]  # noqa: E731
    assert len(lanes()) >= 1
    worker = client._worker
    # Idle spare lanes leave after a while; at least one stays (bounded generously).
    assert wait_until(lambda: worker._lanes == 1, timeout=30)


# --- encoding the next batch while a request waits ------------------------------------------------


class AheadSpy:
    """Wraps Codec.prepare_ahead (the real one runs) to see what the lane encoded ahead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: List[Prepared] = []
        original = Codec.prepare_ahead

        def spy(codec: Codec, events: Sequence[Event]) -> Optional[Prepared]:
            prep = original(codec, events)
            if prep is not None:
                self.made.append(prep)
            return prep

        monkeypatch.setattr(Codec, "prepare_ahead", spy)

    def indexes(self, k: int) -> List[int]:
        return [ev.properties["i"] for ev in self.made[k].events]  # type: ignore[index]


def sent_requests(server: RawServer) -> List[List[Dict[str, Any]]]:
    return [req.json()["batch"] for req in server.requests]


def encoded_ahead_during_request_1(
    raw_servers: RawServers, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, queue: int
) -> Tuple[AheadSpy, Held, RawServer, KlimeClient]:
    """Events 0-14 in batches of 5, one lane; returns once request 1 (events 5-9)
    is held by the server and the lane has encoded 10-14 meanwhile (had 5-9 been
    queued when request 0 was written, it encoded those during request 0 too)."""
    spy = AheadSpy(monkeypatch)
    held = Held(0, 1)
    server = raw_servers(held)
    client = make_client(server.url, max_batch_size=5, max_queue_size=queue, max_in_flight=1)
    for i in range(5):
        client.track("Ahead", {"i": i}, user_id="u1")
    server.wait_for_requests(1)
    for i in range(5, 15):
        client.track("Ahead", {"i": i}, user_id="u1")
    held.release(0)
    server.wait_for_requests(2)
    assert wait_until(lambda: any(spy.indexes(k) == [10, 11, 12, 13, 14] for k in range(len(spy.made))))
    return spy, held, server, client


def test_the_next_batch_is_encoded_while_a_request_waits_and_goes_out_with_its_events_ids(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy, held, server, client = encoded_ahead_during_request_1(raw_servers, make_client, monkeypatch, 100)
    ahead = spy.made[-1]
    assert [ev.properties["i"] for ev in ahead.events] == [10, 11, 12, 13, 14]  # type: ignore[index]
    assert all(ev._id is None for ev in ahead.events), "events still queued are not changed"
    held.release(1)
    assert client.flush(timeout=10) is True
    batches = sent_requests(server)
    assert [[e["properties"]["i"] for e in b] for b in batches] == [list(range(k, k + 5)) for k in (0, 5, 10)]
    # The body encoded ahead went out, with the ids its events now report.
    assert [e["messageId"] for e in batches[2]] == [ev.messageId for ev in ahead.events]
    assert len({e["messageId"] for b in batches for e in b}) == 15
    assert recorder.errors == []


def test_a_batch_encoded_ahead_whose_events_were_dropped_is_encoded_again(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, held, server, client = encoded_ahead_during_request_1(raw_servers, make_client, monkeypatch, 10)
    # The queue overflows: the oldest queued events, those encoded ahead, are dropped.
    for i in range(15, 25):
        client.track("Ahead", {"i": i}, user_id="u1")
    held.release(1)
    assert client.flush(timeout=10) is False  # the drops make it incomplete
    batches = sent_requests(server)
    sent = [e["properties"]["i"] for b in batches for e in b]
    assert sent == [*range(10), *range(15, 25)]
    dropped = [ev for err, evs in recorder.errors for ev in evs if getattr(err, "reason", None) == "queue_overflow"]
    assert [ev.properties["i"] for ev in dropped] == [10, 11, 12, 13, 14]
    sent_ids = {e["messageId"] for b in batches for e in b}
    assert len(sent_ids) == 20 and not sent_ids & {ev.messageId for ev in dropped}


def test_a_busy_application_still_gets_lanes_against_a_distant_server(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    """An application thread that keeps a core busy must not hide the network's wait.

    (Counting only the time the whole process sat idle as the network's
    share did: against a 50 ms server one lane carried everything and the
    queue dropped most events.)
    """
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        distant, _, _ = send_backlog(raw_servers, make_client, 0.05, "Busy", timeout=60)
    finally:
        stop.set()
        spinner.join(10)
    assert recorder.errors == []
    assert distant.peak >= 2, "several requests in flight"
