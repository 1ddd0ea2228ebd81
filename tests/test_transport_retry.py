"""The retry policy and the Sender (docs/design.md, "Retries").

Sender.deliver runs against real loopback servers through HttpTransport.
Where only the length of a wait matters, ``interrupt`` is a RecordingEvent:
a threading.Event whose wait() notes the timeout and returns at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import traceback
from datetime import datetime, timedelta, timezone
from email.message import Message
from email.utils import format_datetime
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import pytest
from freezegun import freeze_time

from klime import BatchResponse, SendError, ValidationError
from klime._deadline import Deadline
from klime._transport import (
    MAX_BACKOFF,
    MAX_RETRY_AFTER,
    HttpTransport,
    Response,
    RetryPolicy,
    Sender,
    is_transient,
    parse_response,
    parse_retry_after,
)

from .servers import Collector, RawRequest, WireServer, default_behaviour, refused_url, scripted

pytestmark = pytest.mark.usefixtures("no_ambient_proxy")  # loopback only


LOG = logging.getLogger("klime.test")
KEY = "wk_SECRET_0123456789"


class Ev(NamedTuple):
    """Stands in for an Event: the Sender only counts events and hands them back."""

    messageId: str  # noqa: N815 - the wire name


def batch_of(n: int = 1) -> Tuple[bytes, List[Any]]:
    events = [Ev(f"id-{i}") for i in range(n)]
    body = json.dumps(
        {"batch": [{"type": "track", "event": "A", "userId": "u1", "messageId": e.messageId} for e in events]}
    ).encode()
    return body, events


class RecordingEvent(threading.Event):
    """An interrupt whose waits return at once (or report an interruption), remembering their length."""

    def __init__(self, interrupt_after: Optional[int] = None) -> None:
        super().__init__()
        self.delays: List[float] = []
        self.interrupt_after = interrupt_after

    def wait(self, timeout: Optional[float] = None) -> bool:
        assert timeout is not None
        self.delays.append(timeout)
        if self.interrupt_after is not None and len(self.delays) > self.interrupt_after:
            self.set()
        return self.is_set()


def sender(url: str, attempts: int = 3, initial: float = 0.01, timeout: float = 2.0) -> Sender:
    return Sender(HttpTransport(url, KEY, timeout), RetryPolicy(attempts, initial), LOG, KEY)


def deliver(s: Sender, n: int = 1, interrupt: Optional[threading.Event] = None, **kw: Any) -> BatchResponse:
    body, events = batch_of(n)
    return s.deliver(body, events, kw.pop("deadline", Deadline.after(30)), interrupt or RecordingEvent(), **kw)


# --- the policy value -------------------------------------------------------------


def test_backoff_starts_at_the_initial_delay_and_doubles() -> None:
    no_jitter = lambda: 0.0  # noqa: E731
    policy = RetryPolicy(5, 0.5)
    assert [policy.delay(n, no_jitter) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_backoff_is_capped_at_16_seconds() -> None:
    assert MAX_BACKOFF == RetryPolicy(1, 1.0).max_delay == 16.0
    for rand in (lambda: 0.0, lambda: 0.5, lambda: 0.999999):
        assert RetryPolicy(9, 1.0).delay(6, rand) == 16.0
        assert RetryPolicy(9, 1.0).delay(2000, rand) == 16.0  # no OverflowError from 2.0 ** 1999
        assert RetryPolicy(9, 100.0).delay(1, rand) == 16.0
    assert RetryPolicy(9, 1.0, max_delay=3.0).delay(5, lambda: 0.0) == 3.0


def test_backoff_jitter_stays_within_a_quarter_above_the_base() -> None:
    policy = RetryPolicy(9, 1.0)
    assert policy.delay(2, lambda: 0.999999) == pytest.approx(2.5, abs=1e-5)
    assert policy.delay(3, lambda: 0.5) == 4.5
    assert policy.delay(5, lambda: 0.999999) == 16.0, "the cap cuts the jitter off"
    samples = [RetryPolicy(9, 0.1).delay(3) for _ in range(500)]
    assert all(0.4 <= d <= 0.5 for d in samples)
    assert len(set(samples)) > 100, "clients must not retry in lockstep"


def test_policy_is_a_frozen_value() -> None:
    policy = RetryPolicy(3, 0.2)
    assert policy == RetryPolicy(3, 0.2)
    with pytest.raises(AttributeError):
        policy.max_attempts = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (408, True),
        (429, True),
        (500, True),
        (503, True),
        (599, True),
        (400, False),
        (401, False),
        (404, False),
        (413, False),
        (301, False),
        (600, False),
    ],
)
def test_status_classes(status: int, transient: bool) -> None:
    assert is_transient(status) is transient


# --- Retry-After parsing ------------------------------------------------------------

DATE_NOW = datetime(2015, 10, 21, 7, 27, tzinfo=timezone.utc).timestamp()


def test_parse_retry_after_delta_seconds() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 5 ") == 5.0
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after("86400") == MAX_RETRY_AFTER


@pytest.mark.parametrize(
    "value",
    ["Wed, 21 Oct 2015 07:28:00 GMT", "Wednesday, 21-Oct-15 07:28:00 GMT", "Wed Oct 21 07:28:00 2015"],
)
def test_parse_retry_after_http_date_forms(value: str) -> None:
    assert parse_retry_after(value, now=DATE_NOW) == pytest.approx(60.0)


def test_parse_retry_after_http_date_ignores_the_local_timezone(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(time, "tzset"):
        pytest.skip("needs time.tzset")
    monkeypatch.setenv("TZ", "EST+05")
    time.tzset()
    try:
        assert time.localtime(DATE_NOW).tm_hour == 2
        assert parse_retry_after("Wed Oct 21 07:28:00 2015", now=DATE_NOW) == pytest.approx(60.0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_parse_retry_after_uses_the_current_time() -> None:
    with freeze_time("2015-10-21 07:27:30"):
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == pytest.approx(30.0)
    with freeze_time("2015-10-21 07:20:00"):
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == MAX_RETRY_AFTER == 300.0


def test_parse_retry_after_date_in_the_past_means_now() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=DATE_NOW + 3600) == 0.0


@pytest.mark.parametrize(
    "value", [None, "", "   ", "soon", "-5", "nan", "inf", "-inf", "12 seconds", "Fri, 99 Foo 2015 25:00:00 GMT"]
)
def test_parse_retry_after_garbage_is_none(value: Optional[str]) -> None:
    assert parse_retry_after(value, now=DATE_NOW) is None


# --- 2xx bodies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"", b"<html>thanks</html>", b"null", b'["not", "an", "object"]', b"{broken", b"[" * 100_000, b"\xff\xfe"]
)
def test_a_2xx_body_that_is_not_the_documented_json_means_all_accepted(body: bytes) -> None:
    assert parse_response(body, 3) == BatchResponse(status="ok", accepted=3, failed=0, errors=None)


def test_partial_success_is_parsed() -> None:
    body = json.dumps(
        {
            "status": "partial",
            "accepted": 2,
            "failed": 1,
            "errors": [{"index": 1, "message": "too long", "code": "invalid_user_id"}, "junk"],
        }
    ).encode()
    assert parse_response(body, 3) == BatchResponse(
        status="partial",
        accepted=2,
        failed=1,
        errors=[ValidationError(index=1, message="too long", code="invalid_user_id")],
    )


def test_odd_field_types_do_not_break_parsing() -> None:
    body = json.dumps(
        {"accepted": True, "failed": -1, "status": 5, "errors": [{"index": True, "message": {"a": 1}, "code": None}]}
    ).encode()
    resp = parse_response(body, 2)
    assert (resp.status, resp.accepted, resp.failed) == ("ok", 2, 0)
    assert resp.errors == [ValidationError(index=-1, message='{"a": 1}', code="null")]


# --- attempts, and which failures are retried ---------------------------------------------


@pytest.mark.parametrize("attempts", [1, 3, 5])
def test_max_attempts_counts_every_attempt(attempts: int, collector: Collector) -> None:
    for _ in range(attempts + 2):
        collector.respond(500, "down")
    failures: List[Tuple[str, bool]] = []
    with pytest.raises(SendError) as info:
        deliver(sender(collector.url, attempts), on_failed_attempt=lambda c, r: failures.append((c, r)))
    assert len(collector.requests) == attempts
    err = info.value
    assert (err.reason, err.status) == ("retries_exhausted", 500)
    assert err.message == f"Failed to send 1 event(s): HTTP 500: down (after {attempts} attempt(s))"
    assert [e.messageId for e in err.events] == ["id-0"]
    assert failures == [("HTTP 500: down", True)] * (attempts - 1) + [("HTTP 500: down", False)]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 410, 413, 422, 451, 301])
def test_permanent_failure_is_never_retried(status: int, collector: Collector) -> None:
    collector.respond(status, {"error": "no"})
    failures: List[Tuple[str, bool]] = []
    with pytest.raises(SendError) as info:
        deliver(sender(collector.url, 5), 2, on_failed_attempt=lambda c, r: failures.append((c, r)))
    assert len(collector.requests) == 1
    err = info.value
    assert (err.reason, err.status) == ("permanent_error", status)
    assert err.message.startswith(f'Failed to send 2 event(s): HTTP {status}: {{"error": "no"}}')
    assert failures == [(f'HTTP {status}: {{"error": "no"}}', False)]


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_status_is_retried(status: int, collector: Collector) -> None:
    collector.respond(status, "try later")
    resp = deliver(sender(collector.url, 2))
    assert resp.accepted == 1
    assert len(collector.requests) == 2
    assert collector.requests[0].body == collector.requests[1].body, "the same ids again"


@pytest.mark.parametrize("failure", ["reset", "close", "hang"])
def test_transport_failures_are_retried(failure: str, closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(scripted(failure)))
    s = sender(server.url, 2, timeout=0.3)
    closing(s.transport)
    assert deliver(s).accepted == 1
    first, second = server.wait_for_requests(2)[:2]
    assert first.body == second.body
    assert second.connection == 1


def test_refused_connection_exhausts_retries_and_names_the_cause() -> None:
    with pytest.raises(SendError) as info:
        deliver(sender(refused_url(), 3))
    err = info.value
    assert (err.reason, err.status) == ("retries_exhausted", None)
    assert err.message.startswith("Failed to send 1 event(s): ConnectionRefusedError: ")
    assert "refused" in err.message.lower()
    assert err.message.endswith("(after 3 attempt(s))")


def test_a_success_after_failures_returns_the_response(collector: Collector) -> None:
    collector.respond(503)
    collector.respond(500)
    collector.respond(200, {"status": "ok", "accepted": 4, "failed": 0})
    assert deliver(sender(collector.url, 5), 4) == BatchResponse("ok", 4, 0, None)


# --- waits: backoff, Retry-After, the deadline and the interrupt ------------------------------


def test_delays_between_attempts_follow_the_backoff(collector: Collector) -> None:
    for _ in range(4):
        collector.respond(500)
    interrupt = RecordingEvent()
    with pytest.raises(SendError):
        deliver(sender(collector.url, 4, initial=0.2), interrupt=interrupt)
    assert len(interrupt.delays) == 3, "no wait after the last attempt"
    for delay, base in zip(interrupt.delays, (0.2, 0.4, 0.8)):
        assert base <= delay <= base * 1.25


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_replace_the_backoff(status: int, collector: Collector) -> None:
    collector.respond(status, "slow down", {"Retry-After": "7"})
    interrupt = RecordingEvent()
    assert deliver(sender(collector.url), interrupt=interrupt).accepted == 1
    assert interrupt.delays[0] == 7.0


@pytest.mark.parametrize("status", [500, 502, 504, 408])
def test_retry_after_only_counts_on_429_and_503(status: int, collector: Collector) -> None:
    collector.respond(status, "no", {"Retry-After": "7"})
    interrupt = RecordingEvent()
    deliver(sender(collector.url), interrupt=interrupt)
    [delay] = interrupt.delays
    assert 0.01 <= delay <= 0.0125


def test_retry_after_http_date_is_honoured(collector: Collector) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=100)
    collector.respond(429, "", {"Retry-After": format_datetime(when, usegmt=True)})
    interrupt = RecordingEvent()
    deliver(sender(collector.url, 2), interrupt=interrupt, deadline=Deadline.after(1000))
    assert 95.0 <= interrupt.delays[0] <= 100.0


@pytest.mark.parametrize("garbage", ["soon", "", "Fri, 99 Foo 2015 25:00:00 GMT", "-5", "nan", "0x10"])
def test_garbage_retry_after_falls_back_to_the_backoff(garbage: str, collector: Collector) -> None:
    collector.respond(503, "", {"Retry-After": garbage})
    interrupt = RecordingEvent()
    deliver(sender(collector.url, 2), interrupt=interrupt)
    assert 0.01 <= interrupt.delays[0] <= 0.0125


def test_huge_retry_after_is_capped(collector: Collector) -> None:
    collector.respond(429, "", {"Retry-After": "86400"})
    interrupt = RecordingEvent()
    deliver(sender(collector.url, 3), interrupt=interrupt, deadline=Deadline.after(1000))
    assert interrupt.delays[0] == MAX_RETRY_AFTER
    assert 0 < MAX_RETRY_AFTER <= 3600


def test_retry_after_is_really_waited_for(closing: Callable[[Any], Any]) -> None:
    arrivals: List[float] = []

    def behaviour(req: RawRequest) -> Any:
        arrivals.append(time.monotonic())
        return (503, b"", {"Retry-After": "1"}) if len(arrivals) == 1 else default_behaviour(req)

    server = closing(WireServer(behaviour))
    assert deliver(sender(server.url, 3, initial=10.0), interrupt=threading.Event()).accepted == 1
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.9


def test_an_interrupted_wait_stops_retrying_with_the_last_failure(collector: Collector) -> None:
    collector.respond(503, "busy")
    interrupt = RecordingEvent(interrupt_after=0)
    with pytest.raises(SendError) as info:
        deliver(sender(collector.url, 5), 2, interrupt=interrupt)
    assert len(collector.requests) == 1
    err = info.value
    assert (err.reason, err.status) == ("retries_exhausted", 503)
    assert err.message == "Failed to send 2 event(s): HTTP 503: busy (retrying was stopped after 1 attempt(s))"


def test_a_real_interrupt_ends_a_long_wait_at_once(collector: Collector) -> None:
    collector.respond(500)
    interrupt = threading.Event()
    threading.Timer(0.2, interrupt.set).start()
    started = time.monotonic()
    with pytest.raises(SendError, match="retrying was stopped"):
        deliver(sender(collector.url, 3, initial=30.0), interrupt=interrupt)
    assert time.monotonic() - started < 5


def test_the_deadline_bounds_waits_and_ends_delivery(collector: Collector) -> None:
    for _ in range(3):
        collector.respond(500, "oops")
    started = time.monotonic()
    with pytest.raises(SendError) as info:
        deliver(sender(collector.url, 10, initial=30.0), interrupt=threading.Event(), deadline=Deadline.after(0.3))
    assert time.monotonic() - started < 5
    assert len(collector.requests) == 1
    assert info.value.reason == "retries_exhausted"
    assert info.value.message == "Failed to send 1 event(s): HTTP 500: oops (the deadline passed after 1 attempt(s))"


def test_a_deadline_already_past_makes_no_attempt(collector: Collector) -> None:
    with pytest.raises(SendError) as info:
        deliver(sender(collector.url), deadline=Deadline.after(0))
    assert collector.requests == []
    assert info.value.message.startswith("Failed to send 1 event(s): no attempt made before the deadline")


# --- the shared pause (docs/design.md, "Retries") ---------------------------------------------


def test_a_429_pauses_every_lane(collector: Collector) -> None:
    collector.respond(429, "", {"Retry-After": "5"})
    s = sender(collector.url, 3)
    assert s.paused() == 0.0
    first = RecordingEvent()
    deliver(s, interrupt=first)  # a 429, a (recorded, instant) wait, then success
    assert 2.0 < s.paused() <= 5.0
    other = RecordingEvent()
    deliver(s, interrupt=other)  # another lane: waits out what is left of the pause first
    assert len(other.delays) == 1 and 2.0 < other.delays[0] <= 5.0
    assert len(collector.requests) == 3


def test_a_503_without_retry_after_pauses_for_the_backoff(collector: Collector) -> None:
    collector.respond(503)
    s = sender(collector.url, 3, initial=4.0)
    deliver(s, interrupt=RecordingEvent())
    assert 2.0 < s.paused() <= 5.0


def test_lanes_really_wait_for_a_pause_set_by_another(closing: Callable[[Any], Any]) -> None:
    arrivals: List[float] = []

    def behaviour(req: RawRequest) -> Any:
        arrivals.append(time.monotonic())
        return (429, b"", {"Retry-After": "1"}) if len(arrivals) == 1 else default_behaviour(req)

    server = closing(WireServer(behaviour))
    s = sender(server.url, 3)
    closing(s.transport)
    deliver(s, interrupt=RecordingEvent())  # the 429, a recorded wait, the retry at once
    assert len(arrivals) == 2
    deliver(s, interrupt=threading.Event())  # a second lane honours the pause for real
    assert arrivals[2] - arrivals[0] >= 0.9


def test_the_pause_is_bounded_by_the_deadline(collector: Collector) -> None:
    collector.respond(429, "", {"Retry-After": "60"})
    s = sender(collector.url, 3)
    deliver(s, interrupt=RecordingEvent())
    with pytest.raises(SendError, match="the deadline passed after 0 attempt"):
        deliver(s, interrupt=threading.Event(), deadline=Deadline.after(0.2))
    assert len(collector.requests) == 2


# --- nothing but SendError, and never the write key ------------------------------------------


class Raising:
    """A Transport whose post raises what it is given (the network stack misbehaving)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    def post(self, body: bytes, deadline: Deadline) -> Response:
        self.calls += 1
        raise self.exc

    def close(self) -> None:
        pass

    def after_fork(self) -> None:
        pass


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


@pytest.mark.parametrize(
    "exc",
    [asyncio.CancelledError(), ValueError("odd"), UnicodeError("label empty"), RecursionError(), UnprintableError()],
)
def test_anything_raised_inside_becomes_a_send_error(exc: BaseException) -> None:
    t = Raising(exc)
    s = Sender(t, RetryPolicy(2, 0.0), LOG, KEY)
    with pytest.raises(SendError) as info:
        deliver(s)
    assert t.calls == 2
    assert info.value.message.startswith(f"Failed to send 1 event(s): {type(exc).__name__}")
    assert info.value.__context__ is None and info.value.__cause__ is None


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)])
def test_keyboard_interrupt_and_system_exit_propagate(exc: BaseException) -> None:
    s = Sender(Raising(exc), RetryPolicy(3, 0.0), LOG, KEY)
    with pytest.raises(type(exc)):
        deliver(s)


def test_a_raising_failure_hook_does_not_break_delivery(collector: Collector) -> None:
    collector.respond(500)

    def hook(cause: str, will_retry: bool) -> None:
        raise RuntimeError("bug in the hook")

    assert deliver(sender(collector.url), on_failed_attempt=hook).accepted == 1


def test_the_write_key_echoed_by_the_server_is_scrubbed(collector: Collector, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="klime.test")
    collector.respond(503, f"bad key {KEY}!")
    collector.respond(401, {"error": f"Bearer {KEY} is not valid", "pad": "x" * 900})
    causes: List[str] = []
    with pytest.raises(SendError) as info:
        deliver(sender(collector.url), on_failed_attempt=lambda c, r: causes.append(c))
    err = info.value
    assert KEY not in err.message and KEY not in repr(err)
    assert "Bearer <write key> is not valid" in err.message
    assert causes[0] == "HTTP 503: bad key <write key>!"
    assert all(KEY not in c for c in causes)
    assert all(KEY not in r.getMessage() for r in caplog.records)
    assert len(err.message) < 400, "a snippet of the body, not all of it"


def test_the_write_key_in_a_partial_failure_is_scrubbed(collector: Collector) -> None:
    collector.respond(
        200,
        {
            "status": "partial",
            "accepted": 0,
            "failed": 1,
            "errors": [{"index": 0, "message": f"key {KEY} lacks scope", "code": KEY}],
        },
    )
    resp = deliver(sender(collector.url))
    assert resp.errors == [ValidationError(0, "key <write key> lacks scope", "<write key>")]


def test_a_failed_send_error_carries_no_frames_with_the_key(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(lambda req: "reset"))
    s = sender(server.url, 2)
    closing(s.transport)
    with pytest.raises(SendError) as info:
        deliver(s)
    tb = traceback.TracebackException.from_exception(info.value, capture_locals=True)
    tb.stack = traceback.StackSummary.from_list([f for f in tb.stack if f.filename != __file__])
    text = "".join(tb.format())
    assert "deliver" in text
    assert KEY not in text
    assert KEY not in repr(s) and KEY not in repr(s.transport)


def test_response_headers_are_a_message(collector: Collector) -> None:
    collector.respond(200, "{}", {"X-Thing": "1"})
    resp = HttpTransport(collector.url, KEY, 2.0).post(b"{}", Deadline.after(5))
    assert isinstance(resp.headers, Message)
    assert resp.headers.get("x-thing") == "1"
