"""The queue and the flusher thread: batching, overflow, deadlines, concurrency, accounting.

Everything runs against real loopback servers (see ``servers.py``). A
"hanging" endpoint is either ``"hang"`` (never answers) or :class:`Held`
(answers once the test releases it), which pins the flusher mid-send for
exactly as long as a test needs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Dict, List, Set, Tuple

import pytest

from klime import BatchResponse, Event, SendError

from .conftest import MakeClient, RawServers, Recorder
from .servers import (
    Collector,
    Held,
    RawRequest,
    Reply,
    default_behaviour,
    ids_of,
    raw_events,
    refused_url,
    wait_until,
)

MiB = 1024 * 1024


# --- 1. one long-lived flusher thread -----------------------------------------


def test_one_long_lived_daemon_flusher_thread(collector: Collector, make_client: MakeClient) -> None:
    before = set(threading.enumerate())
    sender_threads: List[threading.Thread] = []
    client = make_client(
        collector.url, max_batch_size=5, on_success=lambda r: sender_threads.append(threading.current_thread())
    )
    for i in range(30):
        client.track("Flushed", {"i": i}, user_id="u1")
        assert client.flush(timeout=5) is True
    # 100 more events fill 20 batches that go out on their own.
    for i in range(100):
        client.track("Batched", {"i": i}, user_id="u1")
    assert client.flush(timeout=10) is True

    assert len(collector.events) == 130
    assert len(sender_threads) == 50
    new = [t for t in threading.enumerate() if t not in before]
    flushers = [t for t in new if t.name == "klime-flusher"]
    assert len(flushers) == 1
    assert flushers[0].daemon
    # Batches go out on a few long-lived sender lanes (more only under a
    # backlog), never a thread per flush or per batch.
    lanes = set(sender_threads)
    assert all(t.name == "klime-sender" and t.daemon for t in lanes)
    assert 1 <= len(lanes) <= client._options.max_in_flight
    assert len(set(sender_threads[:30])) == 1  # one flush at a time: no backlog, one lane


# --- 2. when batches go out, and how big they are ----------------------------------


def test_full_batch_is_sent_without_flush_or_interval(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url, max_batch_size=10, flush_interval=600_000)
    # The first batch may be found by the flusher as it starts; the next ones
    # need the flusher, by then asleep for the ten-minute interval, to be woken.
    for i in range(30):
        client.track("Full", {"i": i}, user_id="u1")
        if i == 9:
            collector.wait_for_events(10, timeout=5)
            time.sleep(0.05)
    events = collector.wait_for_events(30, timeout=5)
    # Full batches may overlap on several lanes: each arrives whole, in any order.
    assert sorted(e["properties"]["i"] for e in events) == list(range(30))
    assert [len(r.events) for r in collector.requests] == [10, 10, 10]

    # One short of a batch waits for the interval.
    for i in range(9):
        client.track("Partial", {"i": i}, user_id="u1")
    time.sleep(0.3)
    assert len(collector.events) == 30
    assert client.queue_size() == 9


def test_partial_batch_is_sent_when_the_interval_passes(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url, max_batch_size=50, flush_interval=100)
    start = time.monotonic()
    for i in range(3):
        client.track("Tick", {"i": i}, user_id="u1")
    events = collector.wait_for_events(3, timeout=5)
    waited = time.monotonic() - start
    assert [e["properties"]["i"] for e in events] == [0, 1, 2]
    assert waited >= 0.05, "a partial batch went out before the flush interval"

    # The interval keeps ticking for later events.
    client.track("Tick", {"i": 3}, user_id="u1")
    client.track("Tick", {"i": 4}, user_id="u1")
    events = collector.wait_for_events(5, timeout=5)
    assert [e["properties"]["i"] for e in events] == [0, 1, 2, 3, 4]
    assert len(collector.requests) == 2
    assert client.queue_size() == 0


@pytest.mark.parametrize(("configured", "effective"), [(7, 7), (500, 100)])
def test_batches_never_exceed_max_batch_size(
    collector: Collector, make_client: MakeClient, configured: int, effective: int
) -> None:
    client = make_client(collector.url, max_batch_size=configured, max_queue_size=1000)
    for i in range(250):
        client.track("Counted", {"i": i}, user_id="u1")
        if i % 137 == 0:
            client.flush(timeout=5)
    assert client.flush(timeout=10) is True
    sizes = [len(r.events) for r in collector.requests]
    assert max(sizes) == effective
    assert sorted(e["properties"]["i"] for e in collector.events) == list(range(250))


def test_request_bodies_stay_under_10_mib(raw_servers: RawServers, make_client: MakeClient) -> None:
    server = raw_servers()
    client = make_client(server.url, max_batch_size=100, request_timeout=10_000)
    blob = "x" * (190 * 1024)  # each event just under the 200 KiB per-event limit
    for i in range(60):
        client.track("Big", {"i": i, "blob": blob}, user_id="u1")
    assert client.flush(timeout=30) is True

    assert len(server.requests) >= 2  # 60 x 190 KiB does not fit in one request
    for req in server.requests:
        assert len(req.body) <= 10 * MiB
    # Delivered once each, in order: the part that did not fit went out next.
    assert [e["properties"]["i"] for e in raw_events(server)] == list(range(60))
    assert client.queue_size() == 0


# --- 3. queue overflow ---------------------------------------------------------------


def test_queue_overflow_drops_oldest_reports_them_and_rate_limits_the_warning(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="klime.test")
    rounds = 5
    held = Held(*range(rounds))
    server = raw_servers(held)
    # One batch in flight at a time, so that what is dropped can be predicted.
    client = make_client(server.url, max_queue_size=10, max_batch_size=5, max_in_flight=1)
    n = 0

    def track(count: int) -> None:
        nonlocal n
        for i in range(n, n + count):
            client.track("Flood", {"i": i}, user_id="u1")
        n += count

    # What a drop-oldest queue of 10 must do, given that the flusher is held
    # on one batch of 5 during each flood and takes the next 5 between floods.
    expected_sent = list(range(5))
    expected_dropped: List[int] = []
    queue: List[int] = []
    track(5)
    assert len(server.wait_for_requests(1)) == 1
    for k in range(rounds):
        everything = queue + list(range(n, n + 100))
        track(100)
        expected_dropped += everything[:-10]
        queue = everything[-10:]
        assert client.queue_size() == 10
        held.release(k)
        assert wait_until(lambda k=k: len(server.requests) >= k + 2)
        expected_sent += queue[:5]
        queue = queue[5:]
    expected_sent += queue
    client.flush(timeout=10)
    records = list(caplog.records)

    overflow = [(e, evs) for e, evs in recorder.errors if getattr(e, "reason", None) == "queue_overflow"]
    assert len(overflow) == len(recorder.errors)
    assert len(overflow) >= rounds
    for error, events in overflow:
        assert isinstance(error, SendError)
        assert ids_of(error.events) == ids_of(events)
    dropped = [ev.properties["i"] for _, evs in overflow for ev in evs]
    assert dropped == expected_dropped
    assert [e["properties"]["i"] for e in raw_events(server)] == expected_sent

    # Hundreds of drops in several reports, but the log is not flooded.
    assert len(dropped) > 400
    assert 1 <= len(records) <= 2, [r.getMessage() for r in records]


# --- 4. the caller never waits ---------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["refused", "hanging"])
def test_track_returns_promptly_and_never_runs_callbacks_on_the_caller(
    endpoint: str, raw_servers: RawServers, make_client: MakeClient
) -> None:
    url = refused_url() if endpoint == "refused" else raw_servers(lambda r: "hang").url
    callback_threads: List[threading.Thread] = []
    client = make_client(
        url,
        max_batch_size=10,
        max_queue_size=100,
        flush_interval=20,
        retry_max_attempts=2,
        request_timeout=300,
        on_error=lambda e, evs: callback_threads.append(threading.current_thread()),
        on_success=lambda r: callback_threads.append(threading.current_thread()),
    )
    worst = 0.0
    for i in range(2000):
        t0 = time.perf_counter()
        if i % 3 == 0:
            client.track("Prompt", {"i": i}, user_id="u1")
        elif i % 3 == 1:
            client.identify("u1", {"i": i})
        else:
            client.group("g1", {"i": i}, user_id="u1")
        worst = max(worst, time.perf_counter() - t0)
        if i % 100 == 99:
            time.sleep(0.02)  # spread the calls over the flusher's failures and retries
    assert worst < 0.2, f"track() blocked for {worst:.3f}s"

    assert wait_until(lambda: len(callback_threads) > 0), "the flusher never reported the failures"
    me = threading.current_thread()
    seen = list(callback_threads)
    assert all(t is not me for t in seen)
    assert {t.name for t in seen} <= {"klime-flusher", "klime-sender"}


# --- 5. bounded flush, deadlines, the return value ------------------------------------------


def test_flush_deadline_with_hanging_endpoint_reports_each_event_once(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    server = raw_servers(lambda r: "hang")
    client = make_client(server.url, max_batch_size=2, request_timeout=30_000)
    mids = [str(uuid.uuid4()) for _ in range(5)]
    for mid in mids:
        client.track("Stuck", user_id="u1", message_id=mid)
    server.wait_for_requests(1)  # two in flight, three queued

    t0 = time.monotonic()
    assert client.flush(timeout=0.5) is False
    took = time.monotonic() - t0
    assert 0.4 <= took < 5
    assert client.queue_size() == 0
    assert sorted(ids_of(recorder.failed_events)) == sorted(mids)
    assert {getattr(e, "reason", None) for e, _ in recorder.errors} == {"flush_deadline"}
    assert not recorder.successes

    # The flusher's own request then fails; it must not report those events again.
    server.close()
    client.track("After", user_id="u1", message_id="after")
    assert client.flush(timeout=10) is False
    reported = ids_of(recorder.failed_events)
    assert sorted(reported) == sorted([*mids, "after"])
    assert [getattr(e, "reason", None) for e, evs in recorder.errors if ids_of(evs) == ["after"]] == [
        "retries_exhausted"
    ]


def test_batch_claimed_at_deadline_is_not_also_reported_as_delivered(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    held = Held(0)
    server = raw_servers(held)
    client = make_client(server.url)
    for i in range(3):
        client.track("Late", {"i": i}, user_id="u1", message_id=f"late-{i}")
    assert client.flush(timeout=0.3) is False
    assert sorted(ids_of(recorder.failed_events)) == ["late-0", "late-1", "late-2"]

    held.release(0)  # the server now accepts the batch that was already reported
    client.track("Next", user_id="u1", message_id="next")
    assert client.flush(timeout=10) is True
    assert len(recorder.successes) == 1
    assert recorder.successes[0].accepted == 1
    assert len(recorder.errors) == 1
    assert [e["messageId"] for e in raw_events(server)] == ["late-0", "late-1", "late-2", "next"]


def test_flush_deadline_cuts_a_retry_wait_short(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    count = [0]

    def first_fails(req: RawRequest) -> Reply:
        count[0] += 1
        return (500, b"oops") if count[0] == 1 else default_behaviour(req)

    server = raw_servers(first_fails)
    client = make_client(server.url, retry_initial_delay=60_000)  # a one-minute backoff
    client.track("Retry", user_id="u1", message_id="r1")
    t0 = time.monotonic()
    assert client.flush(timeout=0.5) is False
    assert time.monotonic() - t0 < 5
    assert [(getattr(e, "reason", None), ids_of(evs)) for e, evs in recorder.errors] == [("flush_deadline", ["r1"])]

    client.track("Retry", user_id="u1", message_id="r2")
    assert client.flush(timeout=10) is True
    # The claimed batch was abandoned, not retried after its deadline, and not reported twice.
    assert [e["messageId"] for e in raw_events(server)] == ["r1", "r2"]
    assert len(recorder.errors) == 1


def test_flush_return_value(collector: Collector, make_client: MakeClient, recorder: Recorder) -> None:
    client = make_client(collector.url)
    client.track("A", user_id="u1")
    client.track("B", user_id="u1")
    assert client.flush(timeout=5) is True

    collector.respond(400, {"error": "bad request"})
    client.track("C", user_id="u1")
    assert client.flush(timeout=5) is False
    assert [getattr(e, "reason", None) for e, _ in recorder.errors] == ["permanent_error"]

    collector.respond(
        200,
        {
            "status": "partial",
            "accepted": 2,
            "failed": 1,
            "errors": [{"index": 1, "message": "bad userId", "code": "invalid"}],
        },
    )
    for name in ("D", "E", "F"):
        client.track(name, user_id="u1")
    assert client.flush(timeout=5) is False
    assert recorder.successes[-1].failed == 1

    # A failure does not stick to later flushes.
    client.track("G", user_id="u1")
    assert client.flush(timeout=5) is True
    assert client.flush(timeout=5) is True  # nothing queued
    assert [e["event"] for e in collector.events] == list("ABCDEFG")


# --- 6. flush waits for sends already in progress ----------------------------------------------


def test_concurrent_flushes_wait_for_the_send_in_progress(
    raw_servers: RawServers, make_client: MakeClient
) -> None:
    held = Held(0)
    server = raw_servers(held)
    client = make_client(server.url, max_batch_size=5)
    for i in range(5):
        client.track("First", {"i": i}, user_id="u1")
    server.wait_for_requests(1)
    assert client.queue_size() == 0  # all five are in flight, none queued

    results: Dict[str, Tuple[bool, int]] = {}

    def flusher(name: str) -> None:
        ok = client.flush(timeout=20)
        # How many events the server had been sent when this flush returned.
        results[name] = (ok, len(raw_events(server)))

    a = threading.Thread(target=flusher, args=("a",))
    a.start()
    time.sleep(0.1)
    for i in range(5, 8):
        client.track("Later", {"i": i}, user_id="u1")
    b = threading.Thread(target=flusher, args=("b",))
    b.start()
    time.sleep(0.3)
    assert a.is_alive() and b.is_alive(), "a flush returned while its events were still in flight"
    assert results == {}

    held.release(0)
    a.join(10)
    b.join(10)
    assert not a.is_alive() and not b.is_alive()
    assert results["a"][0] is True
    assert results["b"] == (True, 8)  # b also waited for the events queued after a started
    assert [e["properties"]["i"] for e in raw_events(server)] == list(range(8))


# --- 9. exceptions in callbacks -----------------------------------------------------------------


def test_exceptions_in_callbacks_are_logged_and_the_client_keeps_working(
    collector: Collector, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    calls: List[str] = []

    def on_error(error: Exception, events: List[Event]) -> None:
        calls.append("error")
        raise RuntimeError("boom in on_error")

    def on_success(response: BatchResponse) -> None:
        calls.append("success")
        raise ValueError("boom in on_success")

    caplog.set_level(logging.ERROR, logger="klime.test")
    client = make_client(collector.url, on_error=on_error, on_success=on_success)
    client.track("One", user_id="u1")
    client.flush(timeout=5)
    collector.respond(400)
    client.track("Two", user_id="u1")
    client.flush(timeout=5)
    client.track("Three", user_id="u1")
    assert client.flush(timeout=5) is True

    assert calls == ["success", "error", "success"]
    assert [e["event"] for e in collector.events] == ["One", "Two", "Three"]
    raised = [r for r in caplog.records if r.exc_info is not None]
    messages = {str(r.exc_info[1]) for r in raised if r.exc_info}
    assert messages == {"boom in on_error", "boom in on_success"}
    assert len(raised) == 3


# --- 10. nothing lost silently (docs/delivery.md) -------------------------------------------------------------


class Mixed:
    """Answers by request number: success, retried 5xx, permanent 400, partial failure, reset, exhaustion."""

    PATTERN = ["ok", "500", "ok", "400", "partial", "reset", "ok", "503", "503", "503", "ok", "429"]

    def __init__(self) -> None:
        self.count = 0
        self.replies: List[str] = []  # parallel to RawServer.requests (one connection at a time)
        self.lock = threading.Lock()

    def __call__(self, req: RawRequest) -> Reply:
        with self.lock:
            kind = self.PATTERN[self.count % len(self.PATTERN)]
            self.count += 1
            self.replies.append(kind)
        n = len(req.json()["batch"])
        if kind == "ok":
            return default_behaviour(req)
        if kind == "reset":
            return "reset"
        if kind == "partial":
            errors = [{"index": i, "message": "rejected", "code": "invalid_event"} for i in range(0, n, 2)]
            body = {"status": "partial", "accepted": n - len(errors), "failed": len(errors), "errors": errors}
            return (200, json.dumps(body).encode())
        return (int(kind), b'{"error":"nope"}')


def test_every_event_is_accounted_for_across_mixed_failures(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="klime.test")
    mixed = Mixed()
    server = raw_servers(mixed)
    client = make_client(server.url, max_batch_size=4, retry_max_attempts=3, retry_initial_delay=5)
    produced = [str(uuid.uuid4()) for _ in range(80)]
    for n, mid in enumerate(produced):
        client.track("Accounted", {"n": n}, user_id="u1", message_id=mid)
        if n % 9 == 8:
            client.flush(timeout=20)
    client.flush(timeout=20)
    assert client.queue_size() == 0

    confirmed: Set[str] = set()
    rejected: Set[str] = set()
    assert len(mixed.replies) == len(server.requests)
    for req, kind in zip(server.requests, mixed.replies):
        batch = [e["messageId"] for e in req.json()["batch"]]
        if kind == "ok":
            confirmed.update(batch)
        elif kind == "partial":
            bad = set(batch[0::2])
            rejected.update(bad)
            confirmed.update(set(batch) - bad)
    reported = ids_of(recorder.failed_events)

    assert set(reported).isdisjoint(confirmed)
    assert len(reported) == len(set(reported)), "an event was reported to on_error twice"
    assert confirmed | rejected | set(reported) == set(produced)
    assert {getattr(e, "reason", None) for e, _ in recorder.errors} == {"permanent_error", "retries_exhausted"}
    # Each event the server rejected in a 2xx is logged with its id.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for mid in rejected:
        assert mid in logged
    assert rejected and confirmed and reported  # the run really mixed all three outcomes
