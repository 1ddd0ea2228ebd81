"""Review: several lanes, faults, deadlines and overflow, checked by exact accounting.

Every event must end exactly once: delivered (the server answered 200 for it),
rejected, or reported to on_error with a reason -- never twice, never zero --
and stats() must balance.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections import Counter
from typing import Any, Dict, List, Set, Tuple

import pytest

from klime import KlimeClient

from .conftest import FAST, RawServers
from .servers import RawRequest, Reply, default_behaviour, wait_until


class Faulty:
    """Answers 200 (and records the ids) or, at random, 500 / 429 / a hang / a reset."""

    def __init__(self, seed: int, fault_rate: float = 0.3, delay: float = 0.0) -> None:
        self.rand = random.Random(seed)
        self.rate = fault_rate
        self.delay = delay
        self.ok_ids: List[str] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def __call__(self, req: RawRequest) -> Reply:
        with self.lock:
            roll = self.rand.random()
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            if roll < self.rate:
                kind = int(roll / self.rate * 4)
                if kind == 0:
                    return (500, b"oops")
                if kind == 1:
                    return (429, b"slow down", {"Retry-After": "0"})
                if kind == 2:
                    return "hang"
                return "reset"
            ids = [e["messageId"] for e in req.json()["batch"]]
            with self.lock:
                self.ok_ids.extend(ids)
            return default_behaviour(req)
        finally:
            with self.lock:
                self.active -= 1


def balanced(client: KlimeClient) -> Tuple[bool, Any]:
    st = client.stats()
    # in_flight counts batches: only meaningful once nothing is in flight
    total = st.delivered + st.rejected + st.filtered + sum(st.failed.values()) + st.queued
    return st.enqueued == total and st.in_flight == 0, st


@pytest.fixture
def fast_switching() -> Any:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_review_many_threads_track_and_flush_against_a_faulty_server(
    raw_servers: RawServers, seed: int, fast_switching: Any
) -> None:
    behaviour = Faulty(seed)
    server = raw_servers(behaviour)
    reported: List[Tuple[str, str]] = []
    reported_at: Dict[str, float] = {}
    rep_lock = threading.Lock()

    def on_error(error: Any, events: List[Any]) -> None:
        now = time.monotonic()
        with rep_lock:
            reported.extend((ev.messageId, error.reason) for ev in events)
            for ev in events:
                reported_at.setdefault(ev.messageId, now)

    client = KlimeClient(
        "test-write-key", server.url,
        **{**FAST, "request_timeout": 1500, "retry_initial_delay": 5, "retry_max_attempts": 3},
        max_batch_size=10, max_queue_size=200, max_in_flight=4, on_error=on_error,
    )
    flush_results: List[Tuple[bool, Set[str], float, float, float]] = []
    problems: List[str] = []

    def worker(t: int) -> None:
        rand = random.Random(seed * 100 + t)
        mine: Set[str] = set()
        try:
            for i in range(150):
                mid = f"t{t}-{i}"
                client.track("Stress", {"i": i}, user_id=f"u{t}", message_id=mid)
                mine.add(mid)
                if rand.random() < 0.03:
                    timeout = rand.choice([0.05, 0.3, 2.0])
                    t0 = time.monotonic()
                    ok = client.flush(timeout=timeout)
                    flush_results.append((ok, set(mine), timeout, time.monotonic() - t0, t0))
        except BaseException as exc:  # pragma: no cover - reported below
            problems.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not problems
    assert not any(th.is_alive() for th in threads)
    client.shutdown(timeout=15)
    server.close()
    time.sleep(0.3)  # requests cut short by the close must not be reported a second time

    all_ids = {f"t{t}-{i}" for t in range(6) for i in range(150)}
    rep_counts = Counter(mid for mid, _ in reported)
    dup_reports = [m for m, n in rep_counts.items() if n > 1]
    assert not dup_reports, dup_reports[:10]
    ok_ids = set(behaviour.ok_ids)
    missing = all_ids - ok_ids - set(rep_counts)
    assert not missing, sorted(missing)[:10]
    ok, st = balanced(client)
    assert ok, st
    assert st.queued == 0 and st.in_flight == 0, st
    assert sum(st.failed.values()) == len(reported), (st, len(reported))
    # A flush that returned True: none of the caller's earlier events still pending at the call
    # (not reported before it started) may have been reported undelivered.
    reasons = dict(reported)
    for ok_flush, mine, timeout, took, t0 in flush_results:
        if ok_flush:
            bad = sorted(m for m in mine if m in reported_at and reported_at[m] >= t0)
            assert not bad, [(m, reasons[m], reported_at[m] - t0) for m in bad[:5]]
        assert took < timeout + 2.0, (timeout, took)


def test_review_backlog_opens_lanes_on_separate_connections_and_429_pauses_all(
    raw_servers: RawServers,
) -> None:
    """A 50 ms server and a backlog: several batches in flight on separate kept-alive connections;
    one 429 with Retry-After: 1 pauses every lane (no new request arrives during the pause)."""
    arrivals: List[Tuple[float, int]] = []
    lock = threading.Lock()
    state: Dict[str, Any] = {"n": 0, "t429": None}

    def behaviour(req: RawRequest) -> Reply:
        now = time.monotonic()
        with lock:
            state["n"] += 1
            n = state["n"]
            arrivals.append((now, req.connection))
        time.sleep(0.05)
        if n == 12:
            with lock:
                state["t429"] = time.monotonic()
            return (429, b"slow down", {"Retry-After": "1"})
        return default_behaviour(req)

    server = raw_servers(behaviour)
    client = KlimeClient(
        "test-write-key", server.url, **FAST, max_batch_size=10, max_queue_size=5000, max_in_flight=4
    )
    try:
        for i in range(600):
            client.track("Backlog", {"i": i}, user_id="u1")
        assert client.flush(timeout=30) is True
    finally:
        client.shutdown(timeout=5)
    conns = {c for _, c in arrivals}
    assert len(conns) >= 2, conns
    t429 = state["t429"]
    assert t429 is not None
    during = [t - t429 for t, _ in arrivals if t429 + 0.15 < t < t429 + 0.85]
    assert not during, during
    assert len({m for r in server.requests for m in [e["messageId"] for e in r.json()["batch"]]}) == 600


@pytest.mark.parametrize("how", ["flush", "shutdown"])
def test_review_deadline_with_batches_in_flight_on_several_lanes(
    raw_servers: RawServers, how: str
) -> None:
    """Every request hangs; four lanes each hold a batch. flush()/shutdown() with a 0.5 s timeout
    return in time, False, and every event is reported exactly once with the deadline reason --
    also after the hanging requests fail later."""
    gate = threading.Event()
    active = Counter()
    lock = threading.Lock()

    def hang(req: RawRequest) -> Reply:
        if req.json()["batch"][0]["messageId"].startswith("warm"):
            # A distant server first (lanes open only when requests wait on the network), then a hang.
            time.sleep(0.03)
            return (200, json.dumps({"status": "ok", "accepted": len(req.json()["batch"]), "failed": 0}).encode())
        with lock:
            active[req.connection] += 1
        gate.wait(20)
        return "reset"

    server = raw_servers(hang)
    reported: List[Tuple[str, str]] = []
    rl = threading.Lock()

    def on_error(error: Any, events: List[Any]) -> None:
        with rl:
            reported.extend((ev.messageId, error.reason) for ev in events)

    client = KlimeClient(
        "test-write-key", server.url, **{**FAST, "request_timeout": 10_000},
        max_batch_size=10, max_in_flight=4, on_error=on_error,
    )
    try:
        for i in range(4):
            client.track("Warm", user_id="u1", message_id=f"warm{i}")
            assert client.flush(timeout=5) is True
        for i in range(100):
            client.track("Stuck", user_id="u1", message_id=f"m{i}")
        assert wait_until(lambda: len(active) >= 2, timeout=5), active
        t0 = time.monotonic()
        ok = client.flush(timeout=0.5) if how == "flush" else client.shutdown(timeout=0.5)
        took = time.monotonic() - t0
        assert ok is False
        assert took < 0.5 + 1.5, took
        reason = "flush_deadline" if how == "flush" else "shutdown_deadline"
        assert sorted(m for m, _ in reported) == sorted(f"m{i}" for i in range(100))
        assert {r for _, r in reported} == {reason}
        gate.set()
        time.sleep(0.5)
        assert len(reported) == 100
        ok_bal, st = balanced(client)
        assert ok_bal, st
    finally:
        gate.set()
        client.shutdown(timeout=2)


def test_review_overflow_while_every_lane_waits_between_retries(raw_servers: RawServers) -> None:
    """Every request fails with 500; the lanes then wait 5 s before retrying. Overflow drops
    must be reported within about a second, and the queue stays within max_queue_size."""
    server = raw_servers(lambda req: (500, b"down"))
    drops: List[float] = []
    lock = threading.Lock()

    def on_error(error: Any, events: List[Any]) -> None:
        if error.reason == "queue_overflow":
            with lock:
                drops.extend(time.monotonic() for _ in events)

    client = KlimeClient(
        "test-write-key", server.url, **{**FAST, "retry_initial_delay": 5000},
        max_batch_size=20, max_queue_size=100, max_in_flight=4, on_error=on_error,
    )
    try:
        client.track("First", user_id="u1")
        for _ in range(40):
            client.track("Fill", {"x": "y" * 100}, user_id="u1")
        assert wait_until(lambda: server.requests, timeout=5)
        time.sleep(0.2)  # the lanes are now in their 5 s retry wait
        t0 = time.monotonic()
        n = 20_000
        for i in range(n):
            client.track("Flood", {"i": i, "pad": "x" * 200}, user_id="u1")
        assert wait_until(lambda: len(drops) >= n - 200, timeout=3), len(drops)
        assert max(drops) - t0 < 2.5
        st = client.stats()
        assert st.queued <= 100, st
        assert st.enqueued - sum(st.failed.values()) - st.queued <= st.in_flight * 20, st
    finally:
        client.shutdown(timeout=1)
    ok, st = balanced(client)
    assert ok, st

