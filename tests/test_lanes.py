"""Several batches in flight while a backlog exists (docs/design.md, "Lanes").

The server here answers each request after a pause, as a distant one does.
Bounds are generous: these tests check what happens, not how fast.
"""

from __future__ import annotations

import json
import threading
import time
from typing import List

import pytest

import klime._worker

from .conftest import MakeClient, RawServers, Recorder
from .servers import RawRequest, RawServer, Reply, wait_until


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
    distant = Distant(0.1)
    server = raw_servers(distant)
    client = make_client(server.url, max_batch_size=10, max_queue_size=1000)
    for i in range(400):
        client.track("Burst", {"i": i}, user_id="u1", message_id=f"b-{i}")
    assert client.flush(timeout=30) is True
    assert sorted(delivered_ids(server)) == sorted(f"b-{i}" for i in range(400))
    assert recorder.errors == []
    assert 2 <= distant.peak <= client._options.max_in_flight
    assert 2 <= server.connections <= client._options.max_in_flight + 1


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
