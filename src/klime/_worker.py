"""The bounded queue, the dispatcher thread and the sender lanes of one client.

The caller's side (:meth:`Worker.put`) only appends to the ledger under the
lock. One dispatcher thread decides when a batch is due (full, flush
requested, interval passed), reports overflow drops, and hands batches to
sender lanes. One lane sends at a time while the traffic allows; while a
backlog exists and sending succeeds, more lanes open, up to
``max_in_flight``, each on its own kept-alive connection, so that delivery
keeps up with a distant server (docs/design.md, "Lanes").

Outcomes are decided under the lock and reported after it is released
(docs/design.md, "Threads and locks"); the ledger keeps the accounting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple, Union

from ._deadline import Deadline, monotonic
from ._event import Codec, Event, Prepared
from ._ledger import Batch, Ledger, Waiter
from ._reporter import Reporter, deadline_message
from ._transport import Sender
from .types import BatchResponse, Reason, SendError

if TYPE_CHECKING:
    from ._options import Options

# Of shutdown()'s timeout, this much is kept for reporting what is left.
SHUTDOWN_RESERVE = 0.1
# How long shutdown() waits, past its deadline, for callbacks already running.
REPORT_GRACE = 1.0
# A lane beyond the first that had nothing to send for this long ends.
LANE_IDLE = 10.0
# More lanes open only when a request takes at least this long: then the
# lanes wait on the network and more of them raise throughput. On a nearby
# server a request is mostly CPU, and more threads would only contend for
# the GIL (docs/design.md, "Lanes").
LANE_LATENCY = 0.008


# What a deadline claimed: batches in flight, overflow drops, queued events, and the
# hold that keeps them unfinished until they are reported.
_Claimed = Tuple[List[Batch], List[Event], List[Event], Optional[Batch]]


class _Direct:
    """One event sent on a lane outside the queue, whose outcome goes to ``done`` (async ``*_sync``)."""

    __slots__ = ("event", "done")

    def __init__(self, event: Event, done: Callable[[Union[BatchResponse, SendError]], None]) -> None:
        self.event = event
        self.done = done


class Worker:
    """Owns the queue, the dispatcher and the lanes of one client."""

    def __init__(self, options: Options, codec: Codec, sender: Sender, reporter: Reporter) -> None:
        self._opts = options
        self._codec = codec
        self._sender = sender
        self._reporter = reporter
        self._logger = reporter.logger  # never raises (a raising handler is user code)
        self._warned_flush_in_callback = False
        self._batch_size = options.max_batch_size
        self._interval = options.flush_interval
        self._max_lanes = options.max_in_flight
        # Send without waiting for the interval once this many are queued: a
        # full batch, or a full queue (it would start dropping otherwise).
        self._send_at = min(options.max_batch_size, options.max_queue_size)
        self._reset(accepting=True)

    def _reset(self, accepting: bool) -> None:
        """Fresh state: at construction, and in a forked child (docs/design.md, "Fork")."""
        # Re-entrant: a signal handler that calls the client may interrupt
        # this thread while it holds the lock.
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)  # wakes the dispatcher
        self._idle_lanes = threading.Condition(self._lock)  # wakes lanes
        self._done = threading.Condition(self._lock)  # wakes flush() callers
        self.ledger = Ledger(self._opts.max_queue_size)
        self._ready: Deque[Union[Batch, _Direct]] = deque()
        # flush waits completed by a callback instead of a blocked thread (asyncio)
        self._watchers: List[Tuple[Waiter, Callable[[bool], None]]] = []
        self._accepting = accepting
        self._stopping = False
        self._flush_upto = 0
        self._wake_pending = False
        self._dispatcher: Optional[threading.Thread] = None
        self._starting = False
        self._threadless = False  # no thread could be started: flush() sends itself
        self._lanes = 0
        self._idle = 0
        self._awaiting_lane = False  # direct sends wait for a lane: a lane that frees up says so
        self._next_tick = monotonic() + self._interval  # when a partly filled batch is due
        self._healthy = True  # the last request succeeded: more lanes may open
        # How long the last few successful requests took; the shortest is the
        # network's share (a longer one may have waited for the CPU).
        self._latencies: Deque[float] = deque(maxlen=4)
        # _healthy and _slow_network(), kept up to date as requests end: every
        # put() behind a busy lane reads it.
        self._widen = False
        self._last_cause: Optional[str] = None
        self._threads: Dict[int, str] = {}  # ident -> role, for "called from a callback" checks
        self._signals: Dict[Batch, threading.Event] = {}  # cuts a claimed batch's retry wait short
        self._reporter.flusher_threads = set()

    def after_fork(self) -> None:
        """In a forked child: the parent's queue, lock and threads stay the parent's."""
        self._reset(accepting=self._accepting)

    # --- the caller's side ---------------------------------------------------------

    def put(self, ev: Event) -> bool:
        """Queue one event: no I/O, no callbacks, no logging. False once shut down."""
        with self._lock:
            if not self._accepting:
                return False
            ledger = self.ledger
            overflow = ledger.add(ev)
            if self._accepting:
                # _dispatch_needed(), inlined: this runs on every call behind a busy lane.
                if not self._wake_pending and (
                    overflow
                    or (
                        len(ledger.queue) >= self._send_at
                        and (self._idle or not self._lanes or (self._widen and self._lanes < self._max_lanes))
                    )
                ):
                    self._wake_pending = True
                    self._work.notify()
                if self._dispatcher is not None or self._starting or self._threadless:
                    return True
                self._starting = True
                stranded = None
            else:
                # A signal handler on this thread shut the client down during this
                # call (the lock is re-entrant). This event is ignored like any call
                # after shutdown; an event the overflow had in hand while the
                # shutdown ran is left over, and is reported here.
                ledger.withdraw(ev)
                stranded = self._claim_locked(None) if self._stopping else ([], [], [])
        if stranded is not None:
            self._report_claimed(stranded, "shutdown")
            return False
        self._start_dispatcher()
        return True

    def on_own_thread(self) -> bool:
        """True on one of this worker's sending threads (a callback running there)."""
        return threading.get_ident() in self._threads

    def size(self) -> int:
        """Events waiting to be sent (not counting batches in flight)."""
        return len(self.ledger.queue)

    def start(self) -> None:
        """Start the dispatcher now rather than on the first call (it costs ~0.3 ms)."""
        with self._lock:
            if self._dispatcher is not None or self._starting:
                return
            self._starting = True
        self._start_dispatcher()

    def _start_dispatcher(self) -> None:
        thread = threading.Thread(target=self._dispatch, name="klime-flusher", daemon=True)
        error: Optional[BaseException] = None
        try:
            thread.start()
        except RuntimeError as exc:
            # Python 3.12 refuses new threads at interpreter shutdown (an
            # atexit handler tracking a last event); a process can also run
            # out of threads. Then flush()/shutdown() send on their caller's thread.
            error = exc
        with self._lock:
            self._starting = False
            if error is None:
                self._dispatcher = thread
            else:
                self._threadless = True
        if error is not None:
            self._logger.warning("cannot start the sending thread (%s); events wait for flush()", error)

    # --- flush and shutdown --------------------------------------------------------------

    def flush(self, deadline: Deadline, reason: Reason = "flush_deadline") -> bool:
        """Wait until every event queued before this call is delivered or reported.

        True when all of them were delivered. At the deadline the rest are
        claimed and reported with ``reason``.
        """
        me = threading.get_ident()
        with self._lock:
            waiter = self.ledger.add_waiter()
            if waiter is None:
                return True
            in_callback = me in self._threads
            if in_callback:
                self.ledger.remove_waiter(waiter)
            else:
                if waiter.target > self._flush_upto:
                    self._flush_upto = waiter.target
                    self._work.notify()
                threadless = self._threadless or (self._dispatcher is None and not self._starting)
        if in_callback:
            # Waiting on the thread that must do the sending would deadlock. Said
            # once: a logging handler that flushes on every record would otherwise
            # be called back by this very line, without end.
            if not self._warned_flush_in_callback:
                self._warned_flush_in_callback = True
                self._logger.warning("flush() called from a callback on a sending thread; not waiting")
            return False
        claimed: _Claimed = ([], [], [], None)
        try:
            if threadless:
                self._send_here(waiter.target, deadline, reason)
            with self._lock:
                ledger = self.ledger
                while ledger.watermark() < waiter.target:
                    wait = deadline.timeout()
                    if wait is not None and wait <= 0:
                        break
                    self._done.wait(wait)
                if ledger.watermark() < waiter.target:
                    # The waiter stays registered so that the claim marks it failed.
                    claimed = self._claim_locked(waiter.target)
                ok = waiter.ok
        finally:
            with self._lock:
                if waiter in self.ledger.waiters:
                    self.ledger.remove_waiter(waiter)
        self._report_claimed(claimed, reason)
        return ok

    def close(self, send: bool) -> None:
        """Stop accepting events; with ``send``, ask for everything queued to go out now."""
        with self._lock:
            self._accepting = False
            if send:
                self._flush_upto = self.ledger.next_seq
            self._work.notify()

    def finish(self, deadline: Deadline, send: bool) -> bool:
        """After :meth:`close`: deliver (or report) everything, then stop the threads."""
        if send:
            # Keep a little of the budget for reporting what is left, so the
            # whole shutdown stays within its timeout.
            inner = Deadline(None if deadline.at is None else deadline.at - SHUTDOWN_RESERVE)
            ok = self.flush(inner, reason="shutdown_deadline")
        else:
            with self._lock:
                claimed = self._claim_locked(None)
            self._report_claimed(claimed, "not_flushed_at_exit")
            ok = not any(claimed[:3])
        thread = self.stop()
        # Reports already under way are user code that the deadline cannot
        # claim back; they get a short grace so that exit does not cut them off.
        self._await_reports(REPORT_GRACE)
        self._reporter.summarise()
        if thread is not None and thread.is_alive() and threading.get_ident() not in self._threads:
            thread.join(min(0.5 if ok else 0.05, deadline.remaining()))
        return ok

    def stop(self) -> Optional[threading.Thread]:
        """Tell the dispatcher and lanes to end once nothing is left; returns the dispatcher. Never waits."""
        with self._lock:
            self._stopping = True
            self._work.notify_all()
            self._idle_lanes.notify_all()
            for signal in self._signals.values():
                signal.set()
            return self._dispatcher

    def reporting(self) -> bool:
        """True while an outcome already decided is still being reported (user code running)."""
        with self._lock:
            return any(b.decided for b in self.ledger.batches)

    def _claim_locked(self, target: Optional[int]) -> _Claimed:
        """Claim unfinished events before ``target`` (the lock is held); the caller reports them.

        The claimed events stay unfinished (a decided "hold") until
        :meth:`_report_claimed` has reported them, so that a flush() starting
        meanwhile neither returns True nor returns before they are reported.
        """
        batches, dropped, queued = self.ledger.claim(target)
        hold = self.ledger.take_hold()
        for batch in batches:
            signal = self._signals.get(batch)
            if signal is not None:
                signal.set()
        if hold is not None:
            self._done.notify_all()
        return batches, dropped, queued, hold

    def _report_claimed(self, claimed: _Claimed, reason: Reason) -> None:
        batches, dropped, queued, hold = claimed
        if hold is None:
            return
        me = threading.get_ident()
        with self._lock:
            # While on_error runs here, a flush() it makes must not wait for this very report.
            mine = me not in self._threads
            if mine:
                self._threads[me] = "reporter"
        try:
            self._report_claimed_groups(batches, dropped, queued, reason)
        finally:
            with self._lock:
                if mine:
                    self._threads.pop(me, None)
            self._complete(hold)

    def _report_claimed_groups(
        self, batches: List[Batch], dropped: List[Event], queued: List[Event], reason: Reason
    ) -> None:
        now = time.time()
        if dropped:
            self._count_failed("queue_overflow", len(dropped), now)
            self._reporter.failed(self._drop_error(dropped))
        groups = [(b.events, b.cause) for b in batches]
        if queued:
            groups.append((queued, None))
        for events, cause in groups:
            self._count_failed(reason, len(events), now)
            message = deadline_message(reason, len(events), cause or self._last_cause)
            self._reporter.failed(SendError(message, events, reason=reason))

    def _count_failed(self, reason: Reason, n: int, now: float) -> None:
        with self._lock:
            self.ledger.count_failed(reason, n, now)

    def _drop_error(self, events: List[Event]) -> SendError:
        return SendError(
            f"Failed to send {len(events)} event(s): dropped, the queue was full "
            f"(max_queue_size={self._opts.max_queue_size})",
            events,
            reason="queue_overflow",
        )

    def _await_reports(self, grace: float) -> None:
        """Wait (briefly) until outcomes already decided have reached the callbacks."""
        if threading.get_ident() in self._threads:
            return
        deadline = Deadline.after(grace)
        with self._lock:
            while any(b.decided for b in self.ledger.batches):
                wait = deadline.timeout()
                if wait is None or wait <= 0:
                    break
                self._done.wait(wait)
            else:
                return
        self._logger.warning("an on_error/on_success callback is still running at shutdown")

    # --- the dispatcher -------------------------------------------------------------------

    def _dispatch(self) -> None:
        me = threading.get_ident()
        with self._lock:
            self._threads[me] = "dispatcher"
            self._reporter.flusher_threads.add(me)
        self._next_tick = monotonic() + self._interval
        while True:
            start_lane = False
            drops: Optional[Batch] = None
            with self._lock:
                while True:
                    self._wake_pending = False
                    ledger = self.ledger
                    drops = ledger.take_drops()
                    if drops is not None:
                        break
                    now = monotonic()
                    q = ledger.queue
                    due = bool(q) and (
                        len(q) >= self._send_at
                        or q[0]._seq < self._flush_upto
                        or self._stopping
                        or now >= self._next_tick
                    )
                    pause = self._sender.paused()
                    free = self._idle > len(self._ready)
                    can_open = self._lanes == 0 or (
                        self._lanes < self._max_lanes and self._widen
                    )
                    if due and pause <= 0 and (free or can_open):
                        batch = ledger.take_batch(self._batch_size)
                        assert batch is not None
                        self._ready.append(batch)
                        self._next_tick = now + self._interval
                        if free:
                            self._idle_lanes.notify()
                            continue
                        self._lanes += 1
                        start_lane = True
                        break
                    if len(self._ready) > self._idle and self._lanes < self._max_lanes:
                        # Direct sends waiting for a lane.
                        self._lanes += 1
                        start_lane = True
                        break
                    if self._stopping and not q:
                        self._threads.pop(me, None)
                        return
                    # Busy lanes take due batches themselves when they finish;
                    # only direct sends wait here for a lane to free up.
                    self._awaiting_lane = len(self._ready) > self._idle
                    if due:
                        # A pause, a lane freeing up for a direct send, or (busy
                        # lanes take due batches themselves) new work wakes us.
                        wait: Optional[float] = self._interval
                        if pause > 0:
                            wait = pause
                        elif self._awaiting_lane:
                            wait = None
                    elif q:
                        wait = self._next_tick - now
                    else:
                        wait = self._interval
                    self._work.wait(None if wait is None else min(max(wait, 0.001), 3600.0))
            if drops is not None:
                self._finish_drops(drops)
            if start_lane:
                self._start_lane()

    def _dispatch_needed(self) -> bool:
        """A batch is due: whether the dispatcher must act (lock held).

        A busy lane takes the next due batch itself when it finishes, so the
        dispatcher (and a thread switch) is needed only to wake an idle lane,
        start the first one, or open another (docs/design.md, "Lanes").
        """
        return self._idle > 0 or self._lanes == 0 or (
            self._lanes < self._max_lanes and self._widen
        )

    def _take_due(self) -> Optional[Batch]:
        """A batch that is due (full, asked for, or the interval passed) for a free lane (lock held)."""
        q = self.ledger.queue
        if not q:
            return None
        now = monotonic()
        due = len(q) >= self._send_at or q[0]._seq < self._flush_upto or self._stopping or now >= self._next_tick
        if not due or self._sender.paused() > 0:
            return None
        self._next_tick = now + self._interval
        return self.ledger.take_batch(self._batch_size)

    def _slow_network(self) -> bool:
        """Whether requests wait on the network long enough for more lanes to help (lock held)."""
        # Four in a row: a request can also be slow because its lane waited for
        # the GIL (up to a switch interval, 5 ms, at each hand-over) or because
        # a virtual machine lost its CPU for a moment.
        latencies = self._latencies
        return len(latencies) == latencies.maxlen and min(latencies) >= LANE_LATENCY

    def _finish_drops(self, drops: Batch) -> None:
        try:
            self._count_failed("queue_overflow", len(drops.events), time.time())
            self._reporter.failed(self._drop_error(drops.events))
        finally:
            self._complete(drops)

    def _complete(self, batch: Batch) -> None:
        """``batch`` is reported: wake flush() callers and fire watchers it satisfied."""
        with self._lock:
            self.ledger.complete(batch)
            self._done.notify_all()
            fire = self._satisfied_watchers()
        for waiter, callback in fire:
            self._reporter.call(callback, waiter.ok)

    def _satisfied_watchers(self) -> List[Tuple[Waiter, Callable[[bool], None]]]:
        """Watchers whose events have all finished (the lock is held); removed from the list."""
        if not self._watchers:
            return []
        mark = self.ledger.watermark()
        fire = [(w, cb) for w, cb in self._watchers if mark >= w.target]
        if fire:
            self._watchers = [(w, cb) for w, cb in self._watchers if mark < w.target]
            for w, _ in fire:
                self.ledger.remove_waiter(w)
        return fire

    # --- flush without a blocked thread (asyncio) ----------------------------------------

    def watch_flush(self, callback: Callable[[bool], None]) -> Optional[Waiter]:
        """Like :meth:`flush`, but ``callback(ok)`` is called when done instead of blocking.

        Returns a handle for :meth:`expire_watch` / :meth:`forget_watch`, or
        None when everything has already finished (``callback`` has then
        been called with True). ``callback`` runs on whichever thread
        finished the last event; it must only hand the result on.
        """
        with self._lock:
            waiter = self.ledger.add_waiter()
            if waiter is not None:
                self._watchers.append((waiter, callback))
                if waiter.target > self._flush_upto:
                    self._flush_upto = waiter.target
                    self._work.notify()
                threadless = self._threadless
        if waiter is None:
            callback(True)
            return None
        if threadless:
            self._send_here(waiter.target, Deadline.never(), "flush_deadline")
        return waiter

    def expire_watch(self, waiter: Waiter, reason: Reason = "flush_deadline") -> None:
        """The watched flush's deadline passed: claim and report the rest, then call back."""
        with self._lock:
            entry = next(((w, cb) for w, cb in self._watchers if w is waiter), None)
            if entry is None:
                return
            claimed = self._claim_locked(waiter.target)
            self._watchers.remove(entry)
            self.ledger.remove_waiter(waiter)
        self._report_claimed(claimed, reason)
        self._reporter.call(entry[1], waiter.ok)

    def forget_watch(self, waiter: Waiter) -> None:
        """Stop watching (the awaiting task was cancelled); the events go on as usual."""
        with self._lock:
            for entry in self._watchers:
                if entry[0] is waiter:
                    self._watchers.remove(entry)
                    self.ledger.remove_waiter(waiter)
                    return

    def send_direct(self, ev: Event, done: Callable[[Union[BatchResponse, SendError]], None]) -> None:
        """Send one event on a lane, outside the queue; ``done(outcome)`` gets the result."""
        with self._lock:
            self._ready.append(_Direct(ev, done))
            if self._idle >= len(self._ready):
                self._idle_lanes.notify()
            else:
                self._work.notify()
            start = self._dispatcher is None and not self._starting and not self._threadless
            if start:
                self._starting = True
            threadless = self._threadless
        if start:
            self._start_dispatcher()
        if threadless:
            with self._lock:
                job = self._ready.pop() if self._ready else None
            if isinstance(job, _Direct):
                self._send_direct(job)

    def _send_direct(self, job: _Direct) -> None:
        outcome: Union[BatchResponse, SendError]
        try:
            outcome = self.send_now(job.event, threading.Event())
        except SendError as exc:
            outcome = exc
        except BaseException as exc:  # nothing may end a sending thread
            outcome = SendError(f"Failed to send 1 event(s): {type(exc).__name__}", [job.event])
        self._reporter.call(job.done, outcome)

    def _start_lane(self) -> None:
        thread = threading.Thread(target=self._lane, name="klime-sender", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._lanes -= 1
                alone = self._lanes == 0
                job = self._ready.popleft() if alone and self._ready else None
            # No lane at all: the dispatcher sends this one itself.
            if isinstance(job, _Direct):
                self._send_direct(job)
            elif job is not None:
                self._send(job, Deadline.never())

    # --- the lanes -----------------------------------------------------------------------------

    def _lane(self) -> None:
        me = threading.get_ident()
        with self._lock:
            self._threads[me] = "lane"
            self._reporter.flusher_threads.add(me)
        # The next batch encoded while the previous request waited on the
        # server: a cache, used only if the batch this lane takes next has
        # exactly those events (docs/design.md, "Lanes").
        ahead: List[Prepared] = []
        encode_ahead: Optional[Callable[[], None]] = None
        if not self._codec.runs_user_code:

            def encode_ahead() -> None:
                if ahead:
                    return
                with self._lock:
                    q = self.ledger.queue
                    # With several lanes another one would most likely take it first.
                    if self._ready or len(q) < self._batch_size or self._lanes > 1:
                        return
                    events = list(islice(q, self._batch_size))
                prep = self._codec.prepare_ahead(events)
                if prep is not None:
                    ahead.append(prep)

        try:
            while True:
                job: Union[Batch, _Direct, None] = None
                with self._lock:
                    if not self._ready:
                        job = self._take_due()
                    if job is None and not self._ready:
                        self._idle += 1
                        try:
                            idle_since = monotonic()
                            while not self._ready and not self._stopping:
                                self._idle_lanes.wait(LANE_IDLE)
                                if self._ready:
                                    break
                                job = self._take_due()
                                if job is not None:
                                    break
                                if self._lanes > 1 and monotonic() - idle_since >= LANE_IDLE:
                                    return
                        finally:
                            self._idle -= 1
                        if job is None and not self._ready:
                            return
                    if job is None:
                        job = self._ready.popleft()
                prep = ahead.pop() if ahead else None
                if isinstance(job, _Direct):
                    self._send_direct(job)
                else:
                    if prep is not None and not (_same_events(prep.events, job.events) and prep.adopt()):
                        prep = None
                    self._send(job, Deadline.never(), None, prep, encode_ahead)
                with self._lock:
                    if self._awaiting_lane:
                        self._work.notify()
        finally:
            with self._lock:
                self._lanes -= 1
                self._threads.pop(me, None)
                self._work.notify()

    def _send_here(self, target: int, deadline: Deadline, reason: Reason) -> None:
        """Without any thread: send the events before ``target`` on this thread, within ``deadline``."""
        me = threading.get_ident()
        with self._lock:
            if me in self._threads:
                return
            self._threads[me] = "caller"
        try:
            self._send_here_locked_out(target, deadline, reason)
        finally:
            with self._lock:
                self._threads.pop(me, None)

    def _send_here_locked_out(self, target: int, deadline: Deadline, reason: Reason) -> None:
        while not deadline.expired():
            with self._lock:
                ledger = self.ledger
                drops = ledger.take_drops()
                batch = None
                if drops is None and ledger.queue and ledger.queue[0]._seq < target:
                    batch = ledger.take_batch(self._batch_size)
            if drops is not None:
                self._finish_drops(drops)
            elif batch is not None:
                self._send(batch, deadline, reason)
            else:
                return

    def _send(
        self,
        batch: Batch,
        deadline: Deadline,
        reason: Optional[Reason] = None,
        prepared: Optional[Prepared] = None,
        meanwhile: Optional[Callable[[], None]] = None,
    ) -> None:
        """Encode (unless ``prepared``), deliver and report one batch; never raises.

        ``meanwhile`` is work for while each request waits on the server.
        """
        signal = threading.Event()
        with self._lock:
            self._signals[batch] = signal
        try:
            while True:
                rest = self._send_part(batch, deadline, signal, reason, prepared, meanwhile)
                prepared = None
                if not rest:
                    return
                with self._lock:
                    if batch.claimed:
                        return
                    batch.events = rest
                    batch.lo = rest[0]._seq
                    batch.decided = False
        except BaseException:
            self._logger.exception("unexpected error while sending a batch")
            with self._lock:
                events = [] if batch.claimed else batch.events
                if events:
                    batch.claimed = True
            if events:
                self._count_failed("retries_exhausted", len(events), time.time())
                self._reporter.failed(
                    SendError(f"Failed to send {len(events)} event(s): internal error", events)
                )
        finally:
            with self._lock:
                self._signals.pop(batch, None)
            self._complete(batch)

    def _send_part(
        self,
        batch: Batch,
        deadline: Deadline,
        signal: threading.Event,
        reason: Optional[Reason],
        prepared: Optional[Prepared] = None,
        meanwhile: Optional[Callable[[], None]] = None,
    ) -> List[Event]:
        """Send what fits of ``batch`` in one request; returns the events left for the next."""
        prep = self._codec.prepare(batch.events) if prepared is None else prepared
        opts = self._opts
        rejected_events = [ev for rej in prep.rejected for ev in rej.events]
        with self._lock:
            if batch.claimed:
                return []
            ledger = self.ledger
            if rejected_events or prep.filtered:
                # Reported here and now; a deadline must not claim them again.
                gone = {id(ev) for ev in rejected_events} | {id(ev) for ev in prep.filtered}
                batch.events = [ev for ev in batch.events if id(ev) not in gone]
                ledger.filtered += len(prep.filtered)
                ledger.note_failed(rejected_events)
        now = time.time()
        for rej in prep.rejected:
            self._count_failed(rej.reason, len(rej.events), now)
            self._reporter.failed(SendError(rej.message, rej.events, reason=rej.reason))
        if not prep.events:
            return prep.rest
        if opts.debug:
            self._debug_events(prep)

        def failed_attempt(cause: str, will_retry: bool) -> None:
            batch.cause = cause
            self._last_cause = cause
            with self._lock:
                self._healthy = False
                self._widen = False
                if will_retry:
                    self.ledger.retries += 1

        overlapped = 0.0  # time spent on ``meanwhile``: not the server's latency

        def while_waiting() -> None:
            nonlocal overlapped
            if meanwhile is not None:
                t = monotonic()
                meanwhile()
                overlapped += monotonic() - t

        started = monotonic()
        outcome: Any
        try:
            outcome = self._sender.deliver(
                prep.body, prep.events, deadline, signal, failed_attempt, while_waiting if meanwhile else None
            )
        except SendError as exc:
            outcome = exc
            if reason is not None and deadline.expired():
                # Sending on a flush()'s own thread: its deadline cut this short.
                message = deadline_message(reason, len(prep.events), batch.cause)
                outcome = SendError(message, prep.events, reason=reason, status=exc.status)
        took = monotonic() - started - overlapped
        if opts.debug:
            self._debug_outcome(len(prep.events), outcome, took)
        undelivered: List[Event] = list(prep.events)
        if isinstance(outcome, BatchResponse):
            undelivered = self._rejected(outcome, prep.events)
        with self._lock:
            claimed = not self.ledger.decide(batch, undelivered)
            if isinstance(outcome, BatchResponse):
                self._healthy = True
                self._latencies.append(took)
                self._widen = self._slow_network()
                if len(self.ledger.queue) >= self._send_at and self._dispatch_needed():
                    self._work.notify()  # a backlog behind a slow network: another lane may open
        if claimed:
            if isinstance(outcome, BatchResponse):
                self._logger.info(
                    "%d event(s) reported undelivered at a deadline were delivered afterwards", len(prep.events)
                )
            return []
        now = time.time()
        with self._lock:
            ledger = self.ledger
            if isinstance(outcome, BatchResponse):
                ledger.rejected += len(undelivered)
                ledger.delivered += len(prep.events) - len(undelivered)
                ledger.last_success = now
            else:
                ledger.count_failed(outcome.reason, len(prep.events), now)
        if isinstance(outcome, BatchResponse):
            self._reporter.delivered(outcome, prep.events)
        else:
            self._reporter.failed(outcome)
        return prep.rest

    # --- debug=True (docs/design.md, "Debug") ---------------------------------------------

    def _debug_events(self, prep: Prepared) -> None:
        """Each event's wire JSON, as it goes out; showing it never stops the sending."""
        try:
            parts = prep.parts
        except Exception as exc:
            self._logger.debug("sending %d event(s) (not shown: %s)", len(prep.events), type(exc).__name__)
            return
        for part in parts:
            self._logger.debug("sending event %s", part.decode("utf-8", "replace"))

    def _debug_outcome(self, count: int, outcome: Union[BatchResponse, SendError], took: float) -> None:
        """One request's outcome: its status, how many events, how long it took.

        A SendError's message is already scrubbed of the write key by the Sender.
        """
        if isinstance(outcome, BatchResponse):
            self._logger.debug(
                "request of %d event(s): status=%s accepted=%d failed=%d in %.3fs",
                count, outcome.status, outcome.accepted, outcome.failed, took,
            )
        else:
            self._logger.debug(
                "request of %d event(s) failed: status=%s reason=%s in %.3fs: %s",
                count, outcome.status, outcome.reason, took, outcome.message,
            )

    def _rejected(self, response: BatchResponse, events: List[Event]) -> List[Event]:
        """Events refused inside a 2xx, without logging (the reporter logs them)."""
        if response.failed <= 0:
            return []
        found = [events[e.index] for e in response.errors or [] if 0 <= e.index < len(events)]
        return found or list(events)

    # --- direct sends (*_sync) ---------------------------------------------------------

    def send_now(self, ev: Event, interrupt: threading.Event) -> BatchResponse:
        """Send one event on the caller's thread, with the retry policy; raises SendError."""
        prep = self._codec.prepare([ev])
        now = time.time()
        with self._lock:
            self.ledger.sent_directly += 1
            self.ledger.filtered += len(prep.filtered)
        if prep.rejected:
            rej = prep.rejected[0]
            self._count_failed(rej.reason, 1, now)
            raise SendError(rej.message, rej.events, reason=rej.reason)
        if not prep.events:
            return BatchResponse(status="filtered", accepted=0, failed=0)

        def failed_attempt(cause: str, will_retry: bool) -> None:
            if will_retry:
                with self._lock:
                    self.ledger.retries += 1

        debug = self._opts.debug
        if debug:
            self._debug_events(prep)
        started = monotonic()
        try:
            response = self._sender.deliver(prep.body, prep.events, Deadline.never(), interrupt, failed_attempt)
        except SendError as exc:
            if debug:
                self._debug_outcome(1, exc, monotonic() - started)
            self._count_failed(exc.reason, 1, time.time())
            raise
        if debug:
            self._debug_outcome(1, response, monotonic() - started)
        rejected = self._reporter.rejected_in(response, prep.events)
        with self._lock:
            self.ledger.rejected += len(rejected)
            self.ledger.delivered += 1 - len(rejected)
            self.ledger.last_success = time.time()
        return response

    # --- stats -----------------------------------------------------------------------------

    def snapshot(self) -> Dict[str, Any]:
        """Counters for ``stats()``."""
        with self._lock:
            snap = self.ledger.snapshot()
            snap["last_success"] = self.ledger.last_success
            snap["last_failure"] = self.ledger.last_failure
        return snap


def _same_events(a: List[Event], b: List[Event]) -> bool:
    """Whether two runs taken from the head of the queue hold the same events.

    The queue only loses events at its ends and sequence numbers only grow,
    so the same length and the same first and last events mean the same run.
    """
    return len(a) == len(b) and bool(a) and a[0] is b[0] and a[-1] is b[-1]
