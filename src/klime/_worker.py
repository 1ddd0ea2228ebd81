"""The bounded queue and the one flusher thread.

Every queued event gets a sequence number. Events finish strictly in that
order: the batch in flight, then any batch remainder that did not fit in one
request (``carry``), then events dropped on overflow, then the queue. So
"every event before N has finished" is one integer, ``finished``, and
``flush()`` only has to wait for ``finished >= N``.

When a flush or shutdown deadline passes, the waiting thread *claims* every
unfinished event before its target: it takes them out of the queue (or marks
the batch in flight as claimed, so the flusher will not report it again) and
hands them to ``on_error`` itself. Each event is reported exactly once.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Tuple

from ._event import Event, Prepared, prepare_batch
from ._transport import Sender, log_rejected
from .types import BatchResponse, SendError

# Captured once so that a test (or an application) freezing time with
# freezegun does not stall the flusher: freezegun swaps ``time.monotonic``
# but does not recognise this wrapper.
_monotonic = functools.partial(time.monotonic)

OnError = Callable[[Exception, List[Event]], None]
OnSuccess = Callable[[BatchResponse], None]

# Of shutdown()'s timeout, this much is kept for the deadline claim itself.
SHUTDOWN_RESERVE = 0.1
# How long shutdown() waits, past its deadline, for callbacks already running.
REPORT_GRACE = 1.0
# At most one log line per failure reason in this many seconds.
DROP_WARNING_INTERVAL = 10.0


class _Batch:
    """A run of events handed to the sender; ``claimed`` once it has been reported."""

    __slots__ = ("events", "end", "claimed")

    def __init__(self, events: List[Event]) -> None:
        self.events = events
        self.end = events[-1]._seq + 1
        self.claimed = False


class _Waiter:
    """One ``flush()`` call: waits for events [start, target); ``ok`` turns False on any failure."""

    __slots__ = ("start", "target", "ok")

    def __init__(self, start: int, target: int) -> None:
        self.start = start
        self.target = target
        self.ok = True


class Worker:
    """Owns the queue and the flusher thread of one client."""

    def __init__(
        self,
        sender: Sender,
        batch_size: int,
        queue_size: int,
        flush_interval: float,
        logger: logging.Logger,
        on_error: Optional[OnError],
        on_success: Optional[OnSuccess],
    ) -> None:
        self._sender = sender
        self._batch_size = batch_size
        # Send without waiting for the interval once this many are queued: a
        # full batch, or a full queue (it would start dropping otherwise).
        self._send_at = min(batch_size, queue_size)
        self._queue_size = queue_size
        self._interval = flush_interval
        self._logger = logger
        self._on_error = on_error
        self._on_success = on_success
        self._reset()
        # Started now rather than by the first put(): starting a thread takes
        # ~0.3 ms, which would otherwise land on the caller's first track().
        with self._lock:
            self._start()

    def _reset(self) -> None:
        """Fresh state: at construction, and in a forked child."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # wakes the flusher
        self._done = threading.Condition(self._lock)  # wakes flush() callers
        self._queue: Deque[Event] = deque()
        self._dropped: List[Event] = []
        self._carry: List[Event] = []
        self._inflight: Optional[_Batch] = None
        self._waiters: List[_Waiter] = []
        self._enqueued = 0
        self._finished = 0
        self._flush_upto = 0
        self._wake_pending = False
        self._accepting = True
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._threadless = False  # no flusher could be started: flush() sends itself
        self._sending_here = threading.Lock()  # one threadless flush() sends at a time
        self._sending_thread: Optional[threading.Thread] = None  # ... and this is it
        self._interrupt = threading.Event()  # cuts a retry wait short
        # Units the sending thread has taken to report (drops, rejects, a
        # batch's outcome): a deadline cannot claim those, so shutdown gives
        # them a moment to reach on_error before the process may exit.
        self._reporting = 0
        # Seq ranges [lo, hi) decided undelivered whose report is still under
        # way. They are not finished yet, so a flush() starting now covers
        # them, and its deadline can pass them before _finish() marks waiters:
        # a waiter is marked from here when it starts and when they are added.
        self._failing: List[Tuple[int, int]] = []
        self._pid = os.getpid()
        self._log_lock = threading.Lock()
        # reason -> (when last logged, events and batches not logged since)
        self._log_state: Dict[str, Tuple[float, int, int]] = {}

    # --- the caller's side -------------------------------------------------

    def put(self, ev: Event) -> bool:
        """Queue one event: no I/O, no callbacks. False once shut down."""
        if self._pid != os.getpid():
            self._forked()
        with self._lock:
            if not self._accepting:
                return False
            q = self._queue
            if len(q) >= self._queue_size:
                # Reported (on_error, rate-limited log) by the flusher, never here.
                self._dropped.append(q.popleft())
            ev._seq = self._enqueued
            self._enqueued += 1
            q.append(ev)
            if len(q) >= self._send_at and not self._wake_pending:
                self._wake_pending = True
                self._work.notify()
            if self._thread is None:
                self._start()
        return True

    def size(self) -> int:
        """Events waiting to be sent (not counting a batch in flight)."""
        return len(self._queue) + len(self._carry)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="klime-flusher", daemon=True)
        try:
            self._thread.start()
        except RuntimeError as exc:
            # Python 3.12 refuses new threads at interpreter shutdown, e.g. in
            # an atexit handler that tracks a last event; a process can also
            # run out of threads. track() must not raise, and what is queued
            # is then sent by flush()/shutdown() on their caller's thread.
            self._threadless = True
            self._logger.warning("klime: cannot start the flusher thread (%s); events wait for flush()", exc)

    def flush(self, timeout: Optional[float], reason: str = "flush_deadline") -> bool:
        """Wait until every event queued before this call is delivered or reported.

        True when all of them were delivered. At the deadline the rest are
        claimed and reported with ``reason``.
        """
        deadline = None if timeout is None else _monotonic() + max(timeout, 0.0)
        if self._pid != os.getpid():
            self._forked()
        with self._lock:
            target = self._enqueued
            if self._finished >= target:
                return True
            me = threading.current_thread()
            if me is self._thread or me is self._sending_thread:
                # Called from a callback on the thread that sends: waiting would deadlock.
                self._logger.warning("klime: flush() called from a callback; not waiting")
                return False
            waiter = _Waiter(self._finished, target)
            for lo, hi in self._failing:
                if lo < target and hi > waiter.start:
                    waiter.ok = False
            self._waiters.append(waiter)
            if target > self._flush_upto:
                self._flush_upto = target
                self._work.notify()
            threadless = self._threadless
        try:
            if threadless:
                self._send_here(target, deadline, reason)
            with self._lock:
                while self._finished < target:
                    if deadline is None:
                        self._done.wait()
                        continue
                    remaining = deadline - _monotonic()
                    if remaining <= 0:
                        break
                    # A huge timeout (e.g. inf) would make wait() raise OverflowError.
                    self._done.wait(min(remaining, threading.TIMEOUT_MAX))
                done = self._finished >= target
            if not done:
                # The waiter stays registered so that the claim marks it failed.
                self._claim(target, reason)
            return waiter.ok
        finally:
            with self._lock:
                self._waiters.remove(waiter)

    def shutdown(self, timeout: Optional[float], send: bool = True) -> bool:
        """Stop accepting, deliver (or, with ``send=False``, report) what is queued, stop the thread."""
        deadline = None if timeout is None else _monotonic() + max(timeout, 0.0)

        def left(reserve: float = 0.0) -> Optional[float]:
            return None if deadline is None else max(deadline - _monotonic() - reserve, 0.0)

        if self._pid != os.getpid():
            # First call in the child of a fork from C (a uWSGI worker exiting):
            # the state is the parent's, its lock perhaps held for good, and its
            # queue the parent's to send (send=False would report it here too).
            self._forked()
        with self._lock:
            self._accepting = False
            target = self._enqueued
        if send:
            # Keep a little of the budget for reporting what is left, so the
            # whole shutdown stays within its timeout.
            ok = self.flush(left(SHUTDOWN_RESERVE), reason="shutdown_deadline")
        else:
            ok = self._claim(target, "not_flushed_at_exit") == 0
        with self._lock:
            self._stopping = True
            self._work.notify()
            thread = self._thread
        self._interrupt.set()
        self._await_reports(REPORT_GRACE)
        self._log_suppressed()
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            # Everything is accounted for by now; only a request still in
            # flight after a deadline can keep the thread, and it is a daemon.
            rest = left()
            wait = 0.5 if ok else 0.05
            thread.join(wait if rest is None else min(wait, rest))
        return ok

    def _claim(self, target: int, reason: str) -> int:
        """Take every unfinished event before ``target`` and report it as undelivered."""
        groups: List[List[Event]] = []
        with self._lock:
            batch = self._inflight
            if batch is not None and not batch.claimed and batch.events[0]._seq < target:
                batch.claimed = True
                self._interrupt.set()
                groups.append(batch.events)
                target = max(target, batch.end)
            carry = [ev for ev in self._carry if ev._seq < target]
            if carry:
                self._carry = self._carry[len(carry) :]
            dropped = [ev for ev in self._dropped if ev._seq < target]
            if dropped:
                self._dropped = self._dropped[len(dropped) :]
            queued = []
            q = self._queue
            while q and q[0]._seq < target:
                queued.append(q.popleft())
            rest = carry + queued
            if rest:
                groups.append(rest)
            for group in [*groups, dropped]:
                if group:
                    self._mark_failed(group[0]._seq, group[-1]._seq + 1)
            if target > self._finished:
                self._finished = target
                self._done.notify_all()
        count = sum(len(g) for g in groups) + len(dropped)
        if dropped:
            self._report_drops(dropped)
        for group in groups:
            what = {
                "flush_deadline": "flush() timed out",
                "shutdown_deadline": "shutdown timed out",
                "not_flushed_at_exit": "the process exited with flush_on_shutdown=False",
            }.get(reason, reason)
            self._fail(SendError(f"{len(group)} event(s) not delivered: {what}", group, reason=reason))
        return count

    def after_fork(self, accepting: bool) -> None:
        """In a forked child: the parent's queue, lock and thread stay the parent's."""
        self._reset()
        self._accepting = accepting

    def _forked(self) -> None:
        """The process id changed without our fork hook running.

        A server that forks from C (uWSGI without ``py-call-osafterfork``)
        skips ``os.register_at_fork`` hooks; the lock may even have been held
        by the parent's flusher at that moment, so nothing of the old state is
        touched.
        """
        accepting = self._accepting
        self._reset()
        self._accepting = accepting
        self._sender.transport.after_fork()

    def _await_reports(self, grace: float) -> None:
        """Wait (briefly) until the sending thread has reported what it took."""
        me = threading.current_thread()
        if me is self._thread or me is self._sending_thread:
            return
        deadline = _monotonic() + grace
        with self._lock:
            while self._reporting:
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    self._logger.warning("klime: an on_error/on_success callback is still running at shutdown")
                    return
                self._done.wait(remaining)

    def _end_report(self) -> None:
        with self._lock:
            self._reporting -= 1
            self._done.notify_all()

    # --- the flusher thread ------------------------------------------------

    def _run(self) -> None:
        # A partial batch goes out once the interval has passed since the last send.
        next_tick = _monotonic() + self._interval
        while True:
            with self._lock:
                while True:
                    self._wake_pending = False
                    q = self._queue
                    now = _monotonic()
                    due = bool(q) and (
                        len(q) >= self._send_at
                        or q[0]._seq < self._flush_upto
                        or self._stopping
                        or now >= next_tick
                    )
                    job = self._take(due)
                    if job is not None:
                        if job[0] == "queue":
                            next_tick = now + self._interval
                        break
                    if self._stopping:
                        return
                    self._work.wait(next_tick - now if q else self._interval)
            self._do(job, self._wait)

    def _take(self, from_queue: bool) -> Optional[Tuple[str, List[Event], Optional[_Batch]]]:
        """The next job in sequence order (the lock is held), or None.

        A batch remainder comes first, then overflow drops, then, if
        ``from_queue``, one batch from the queue, which becomes the batch in
        flight.
        """
        if self._carry:
            events, self._carry = self._carry, []
            kind = "carry"
        elif self._dropped:
            events, self._dropped = self._dropped, []
            self._reporting += 1
            self._note_failed([ev._seq for ev in events])
            return "drops", events, None
        elif from_queue:
            q = self._queue
            events = [q.popleft() for _ in range(min(len(q), self._batch_size))]
            kind = "queue"
        else:
            return None
        batch = _Batch(events)
        self._inflight = batch
        self._interrupt.clear()
        return kind, events, batch

    def _do(
        self,
        job: Tuple[str, List[Event], Optional[_Batch]],
        wait: Callable[[float], bool],
        time_left: Optional[Callable[[], float]] = None,
    ) -> None:
        _, events, batch = job
        try:
            if batch is None:
                try:
                    self._report_drops(events)
                    self._finish(events[-1]._seq + 1, [events[0]._seq, events[-1]._seq])
                finally:
                    self._end_report()
            else:
                self._send(batch, wait, time_left)
        except Exception:  # pragma: no cover - a bug; keep the thread alive
            self._logger.exception("klime: unexpected error in the flusher thread")
            # Never leave flush() callers waiting on events nobody owns.
            self._finish(events[-1]._seq + 1, [events[0]._seq, events[-1]._seq])

    def _send_here(self, target: int, deadline: Optional[float], reason: str) -> None:
        """Without a flusher thread: send the events before ``target`` on this thread.

        A retry wait that would pass the deadline claims what is left instead,
        as the deadline would from the outside.
        """

        def wait(seconds: float) -> bool:
            if deadline is not None and _monotonic() + seconds >= deadline:
                self._claim(target, reason)
                return False
            time.sleep(seconds)
            return True

        def time_left() -> float:
            # No request may outlast the deadline, since no other thread can
            # cut it short here; once it has passed, the rest is claimed.
            if deadline is None:
                return float("inf")
            left = deadline - _monotonic()
            if left <= 0:
                self._claim(target, reason)
            return left

        budget = -1.0 if deadline is None else min(max(deadline - _monotonic(), 0.0), threading.TIMEOUT_MAX)
        if not self._sending_here.acquire(timeout=budget):
            return
        self._sending_thread = threading.current_thread()
        try:
            while deadline is None or _monotonic() < deadline:
                with self._lock:
                    job = self._take(bool(self._queue) and self._queue[0]._seq < target)
                if job is None:
                    return
                self._do(job, wait, time_left)
        finally:
            self._sending_thread = None
            self._sending_here.release()

    def _send(
        self, batch: _Batch, wait: Callable[[float], bool], time_left: Optional[Callable[[], float]] = None
    ) -> None:
        prep: Prepared = prepare_batch(batch.events)
        failed_seqs = [ev._seq for rej in prep.rejected for ev in rej.events]
        with self._lock:
            if batch.claimed:
                return  # reported at a deadline while it was being encoded
            if prep.rest:
                # Too big for one request: the tail goes first next time.
                self._carry = prep.rest + self._carry
                batch.end = prep.rest[0]._seq
            batch.events = prep.events
            if not prep.events:
                batch.claimed = True
                self._inflight = None
            if prep.rejected:
                self._reporting += 1
                self._note_failed(failed_seqs)
        if prep.rejected:
            try:
                for rej in prep.rejected:
                    self._fail(SendError(rej.message, rej.events, reason=rej.reason))
            finally:
                self._end_report()
        if not prep.events:
            self._finish(batch.end, failed_seqs)
            return
        outcome: object
        try:
            outcome = self._sender.deliver(prep.body, prep.events, wait, time_left)
        except SendError as exc:
            outcome = exc
        # Which events did not get through, known before the callbacks run (see _failing).
        undelivered: List[Event] = list(prep.events)
        if isinstance(outcome, BatchResponse):
            undelivered = log_rejected(self._logger, outcome, prep.events)
        with self._lock:
            claimed = batch.claimed
            batch.claimed = True
            self._inflight = None
            if not claimed:
                self._reporting += 1
                self._note_failed([ev._seq for ev in undelivered])
        if claimed:
            if isinstance(outcome, BatchResponse):
                self._logger.info(
                    "klime: %d event(s) reported undelivered at a deadline were delivered afterwards",
                    len(prep.events),
                )
            self._finish(batch.end, failed_seqs)
            return
        try:
            if isinstance(outcome, SendError):
                self._fail(outcome)
            elif isinstance(outcome, BatchResponse):
                self._safe_call(self._on_success, outcome)
            failed_seqs.extend(ev._seq for ev in undelivered)
            self._finish(batch.end, failed_seqs)
        finally:
            self._end_report()

    def _finish(self, end: int, failed_seqs: Optional[List[int]]) -> None:
        with self._lock:
            if failed_seqs:
                self._mark_failed(min(failed_seqs), max(failed_seqs) + 1)
            if end > self._finished:
                self._finished = end
            if self._failing:
                # A range wholly before ``finished`` can overlap no new waiter.
                self._failing = [r for r in self._failing if r[1] > self._finished]
            self._done.notify_all()

    def _note_failed(self, seqs: List[int]) -> None:
        """The lock is held: these events are undelivered; their report is about to run."""
        if seqs:
            lo, hi = min(seqs), max(seqs) + 1
            self._mark_failed(lo, hi)
            self._failing.append((lo, hi))

    def _mark_failed(self, lo: int, hi: int) -> None:
        for w in self._waiters:
            if lo < w.target and hi > w.start:
                w.ok = False

    def _wait(self, seconds: float) -> bool:
        """Sleep between retries; False if a deadline or shutdown cut it short."""
        return not self._interrupt.wait(seconds)

    # --- reporting ---------------------------------------------------------

    def _report_drops(self, events: List[Event]) -> None:
        self._fail(
            SendError(
                f"{len(events)} event(s) dropped: the queue was full (max_queue_size={self._queue_size})",
                events,
                reason="queue_overflow",
            )
        )

    def _fail(self, error: SendError) -> None:
        """Log (rate-limited) and report one undelivered group of events."""
        self._log_failure(error)
        self._report(error)

    def _log_failure(self, error: SendError) -> None:
        """One line per failure, except that a flood of the same kind is summarised.

        Events that can never be sent (unencodable, oversize) are bugs in the
        caller's data and always get their own line; outages and overflow can
        fail thousands of batches, so those log at most once per interval per
        reason, counting what was not logged.
        """
        reason = error.reason
        if reason in ("unencodable", "oversize"):
            self._logger.error("klime: %s", error.message)
            return
        now = _monotonic()
        with self._log_lock:
            last, events, batches = self._log_state.get(reason, (-DROP_WARNING_INTERVAL, 0, 0))
            if now - last < DROP_WARNING_INTERVAL:
                self._log_state[reason] = (last, events + len(error.events), batches + 1)
                return
            self._log_state[reason] = (now, 0, 0)
        more = f" (and {events} more event(s) in {batches} batch(es) since the last such message)" if events else ""
        level = logging.WARNING if reason == "queue_overflow" else logging.ERROR
        self._logger.log(level, "klime: %s%s", error.message, more)

    def _log_suppressed(self) -> None:
        """At shutdown: say what the rate limit kept out of the log."""
        with self._log_lock:
            pending = [(r, e, b) for r, (_, e, b) in self._log_state.items() if e]
            self._log_state.clear()
        for reason, events, batches in pending:
            self._logger.warning(
                "klime: %d more event(s) in %d batch(es) were undelivered (%s) since the last such message",
                events,
                batches,
                reason,
            )

    def _report(self, error: SendError) -> None:
        for ev in error.events:
            ev.messageId  # noqa: B018 - fix the id before user code sees the event
        self._safe_call(self._on_error, error, error.events)

    def _safe_call(self, fn: Optional[Callable[..., None]], *args: object) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            self._logger.exception("klime: the %s callback raised", getattr(fn, "__name__", "user"))
        except BaseException:
            # sys.exit() in a callback: on the flusher it would end only that
            # thread, and every later event would be stranded. On a caller's
            # thread (a deadline claim, a threadless flush) it is the caller's.
            if threading.current_thread() is not self._thread:
                raise
            self._logger.exception("klime: the %s callback raised", getattr(fn, "__name__", "user"))
