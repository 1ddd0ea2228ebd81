"""Review: logging handlers and callbacks that call the client back, or misbehave.

The rules under test: the client never holds a lock while it logs or runs
user code; user code that calls track/flush/shutdown never deadlocks it; and
nothing from outside (a raising logging handler is user code too) ends a
sending thread or leaves an event unaccounted for.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, List

from klime import KlimeClient, _lifecycle

from .conftest import FAST, MakeClient, RawServers, Recorder
from .servers import RawRequest, Reply, default_behaviour, wait_until


def fresh_logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


class Raising(logging.Handler):
    """A handler whose emit raises (a home-made HTTP log shipper whose endpoint is down)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if threading.current_thread().name.startswith("klime"):  # only where nobody can catch it
            raise ConnectionError("log shipper down")


# --- a logging handler that raises ----------------------------------------------------------------


def test_review_raising_log_handler_does_not_end_the_dispatcher(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    """Overflow drops are logged (WARNING) from the dispatcher thread. A handler's exception
    propagates out of ``logger.log`` (logging only guards handlers that catch their own errors),
    out of ``Reporter.failed`` and ``Worker._finish_drops``, and ends the dispatcher: nothing is
    ever sent again and ``flush()`` without a timeout would hang."""
    gate = threading.Event()

    def held(req: RawRequest) -> Reply:
        gate.wait(10)
        return default_behaviour(req)

    server = raw_servers(held)
    handler = Raising()
    client = make_client(
        server.url, max_queue_size=5, max_batch_size=5, max_in_flight=1,
        logger=fresh_logger("klime.review.raising", handler),
    )
    for i in range(30):  # first batch held at the server; the rest overflows
        client.track("Overflow", {"i": i}, user_id="u1")
    assert wait_until(lambda: handler.records, timeout=5)
    gate.set()
    time.sleep(0.2)
    client.track("Later", user_id="u1", message_id="later")
    assert client.flush(timeout=5) is True
    sent = [e["messageId"] for r in server.requests for e in r.json()["batch"]]
    assert "later" in sent


def test_review_raising_log_handler_still_reports_to_on_error(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    """A permanent failure is logged before on_error is called; when the log call raises, the
    lane dies before on_error: the events are counted as failed in stats() but the application
    never hears of them."""
    server = raw_servers(lambda req: (400, b'{"error":"bad"}'))
    handler = Raising()
    client = make_client(server.url, logger=fresh_logger("klime.review.raising2", handler))
    client.track("Rejected", user_id="u1", message_id="rej-1")
    assert client.flush(timeout=5) is False
    assert wait_until(lambda: recorder.failed_events, timeout=3)
    assert [ev.messageId for ev in recorder.failed_events] == ["rej-1"]


# --- logging handlers that call the client -----------------------------------------------------------


class Calling(logging.Handler):
    def __init__(self, action: Callable[[], Any]) -> None:
        super().__init__()
        self.action = action
        self.calls = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.calls += 1
        self.action()


def test_review_log_handler_that_tracks_on_every_client_record(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    """A handler that turns every klime log record into an event (a "log to analytics" bridge):
    failures and overflow warnings are logged on sending threads, the handler calls track()."""
    replies = iter([(500, b"oops")] * 3 + [(400, b"bad")])

    def script(req: RawRequest) -> Reply:
        return next(replies, None) or default_behaviour(req)

    server = raw_servers(script)
    box: List[KlimeClient] = []
    handler = Calling(lambda: box[0].track("Log Record", user_id="logger"))
    client = make_client(
        server.url, retry_max_attempts=2, max_queue_size=10, max_batch_size=5,
        logger=fresh_logger("klime.review.tracking", handler),
    )
    box.append(client)
    for i in range(40):
        client.track("Work", {"i": i}, user_id="u1")
    client.flush(timeout=10)
    assert client.flush(timeout=10) is True  # the handler's own events, delivered
    assert handler.calls > 0
    st = client.stats()
    assert st.enqueued == st.delivered + st.rejected + st.filtered + sum(st.failed.values()) + st.queued + st.in_flight


def test_review_log_handler_that_flushes_on_every_client_record(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    """A handler that calls flush() for every klime record. On a sending thread flush() logs
    "called from a callback ... not waiting" -- which reaches the handler again, which calls
    flush() again: unbounded recursion on the sending thread (RecursionError)."""
    server = raw_servers(lambda req: (400, b'{"error":"bad"}'))
    box: List[KlimeClient] = []
    handler = Calling(lambda: box[0].flush(timeout=1))
    client = make_client(server.url, logger=fresh_logger("klime.review.flushing", handler))
    box.append(client)
    client.track("Rejected", user_id="u1", message_id="rej-2")
    client.flush(timeout=5)
    assert wait_until(lambda: recorder.failed_events, timeout=3)
    assert handler.calls < 50, f"the handler was re-entered {handler.calls} times"
    client.track("Later", user_id="u1")


# --- callbacks that call the client ------------------------------------------------------------------


def test_review_on_error_calling_track_and_flush(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    """on_error tracks a follow-up event and calls flush() (which must not wait on its own thread)."""
    replies = iter([(400, b"bad")])
    server = raw_servers(lambda req: next(replies, None) or default_behaviour(req))
    seen: List[Any] = []
    box: List[KlimeClient] = []

    def on_error(error: Exception, events: List[Any]) -> None:
        seen.extend(events)
        box[0].track("Follow Up", user_id="u1", message_id="follow-up")
        seen.append(box[0].flush(timeout=5))

    client = make_client(server.url, on_error=on_error)
    box.append(client)
    client.track("First", user_id="u1", message_id="first")
    assert client.flush(timeout=5) is False
    assert client.flush(timeout=5) is True
    sent = [e["messageId"] for r in server.requests for e in r.json()["batch"]]
    assert "follow-up" in sent
    assert seen[-1] is False


def test_review_shutdown_from_a_callback_keeps_exit_accountable(
    raw_servers: RawServers, recorder: Recorder
) -> None:
    """on_error calls shutdown() (on a sending thread). shutdown() cannot wait there, so it returns
    at once -- but it still marks the client closed and unregisters it, with events still queued.
    The exit hook then skips the client: what was queued is neither delivered nor reported before
    the process ends (daemon threads die with it)."""
    gate = threading.Event()
    count = [0]
    lock = threading.Lock()

    def script(req: RawRequest) -> Reply:
        with lock:
            count[0] += 1
            n = count[0]
        if n == 1:
            gate.wait(10)
            return (400, b'{"error":"bad"}')
        return "slow:0.1"

    server = raw_servers(script)
    returned: List[bool] = []
    box: List[KlimeClient] = []

    def on_error(error: Exception, events: List[Any]) -> None:
        recorder.on_error(error, events)
        if not returned:
            returned.append(box[0].shutdown(timeout=5))

    client = KlimeClient(
        "test-write-key", server.url, **{**FAST, "max_batch_size": 10, "max_in_flight": 1},
        on_error=on_error, logger=logging.getLogger("klime.review.cbshutdown"),
    )
    box.append(client)
    try:
        for i in range(100):
            client.track("Queued", {"i": i}, user_id="u1")
        gate.set()
        assert wait_until(lambda: returned, timeout=5)
        _lifecycle.exit_all()  # what the interpreter runs at exit
        st = client.stats()
        # By the time exit returns, every event must be delivered or reported.
        assert st.queued + st.in_flight == 0, st
    finally:
        gate.set()
        client.shutdown(timeout=5)
