"""The accounting of one client: where every queued event is, and who waits for it.

No threads, no I/O, no user code: the worker holds its lock around every
call, and whatever must be reported comes back as data for the worker to
hand to the reporter once the lock is released (docs/design.md, "Ledger").

Every queued event gets a sequence number. An event is *unfinished* while it
is queued, waiting to be reported as dropped, or in a batch whose outcome has
not yet been reported. The *watermark* is the lowest unfinished sequence
number (or the next number to be given out when nothing is unfinished), so
"every event queued before this ``flush()`` has finished" is one comparison,
even though batches sent on several lanes finish out of order.

A deadline *claims* unfinished events: it takes them out of the queue, or
marks their batch claimed so that the lane sending it will not report it a
second time, and returns them to be reported by the claimer. Every event is
reported exactly once.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Deque, Dict, List, Optional, Set, Tuple

from ._event import Event

# What a unit of work is: a batch to send, or overflow drops to report.
SEND = "send"
DROPS = "drops"
CLAIM = "claim"  # events a deadline claimed, until the claimer has reported them


class Batch:
    """Events taken off the queue together, and what has become of them.

    ``lo`` is the lowest sequence number in it; ``claimed`` once a deadline
    reported it; ``decided`` once its outcome is known and being reported.
    ``cause`` is the last failure seen while sending it, for the messages of
    a deadline that cuts it short.
    """

    __slots__ = ("kind", "events", "lo", "claimed", "decided", "cause")

    def __init__(self, kind: str, events: List[Event]) -> None:
        self.kind = kind
        self.events = events
        self.lo = events[0]._seq
        self.claimed = False
        self.decided = False
        self.cause: Optional[str] = None

    def __repr__(self) -> str:
        return f"<Batch {self.kind} {len(self.events)} from {self.lo}{' claimed' if self.claimed else ''}>"


class Waiter:
    """One ``flush()``: waits until the watermark reaches ``target``.

    ``ok`` turns False as soon as any event in ``[start, target)`` is known
    to be undelivered.
    """

    __slots__ = ("start", "target", "ok")

    def __init__(self, start: int, target: int) -> None:
        self.start = start
        self.target = target
        self.ok = True


class Ledger:
    """Queue, batches in flight, waiters and counters of one client."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queue: Deque[Event] = deque()
        self.dropped: List[Event] = []
        self.batches: Set[Batch] = set()
        self.waiters: List[Waiter] = []
        # Claims not yet reported, oldest first; the worker completes each one
        # once its claimer has reported it (claim() and take_hold() pair up).
        self.holds: List[Batch] = []
        self.next_seq = 0
        # Undelivered ranges at or above the watermark, for waiters that
        # start after the failure was decided but before it finished.
        self._failed: List[Tuple[int, int]] = []
        # Counters for stats(): events by outcome.
        self.delivered = 0
        self.rejected = 0
        self.filtered = 0
        self.failed: Counter[str] = Counter()
        self.retries = 0
        self.sent_directly = 0  # by the *_sync methods, outside the queue
        self.withdrawn = 0  # added while a shutdown ran on the same thread, then ignored
        self.last_success: Optional[float] = None
        self.last_failure: Optional[float] = None

    # --- the caller's side ----------------------------------------------------

    def add(self, ev: Event) -> bool:
        """Queue ``ev``; True when that pushed the oldest queued event out."""
        q = self.queue
        overflow = len(q) >= self.capacity
        if overflow:
            try:
                self.dropped.append(q.popleft())
            except IndexError:
                # A signal handler on this thread shut the client down just
                # now and took the queue; the worker sees it and answers for
                # what is left (docs/design.md, "Threads and locks").
                overflow = False
        ev._seq = self.next_seq
        self.next_seq += 1
        q.append(ev)
        return overflow

    def withdraw(self, ev: Event) -> bool:
        """Take back ``ev``, just added, if it is still the last queued event; True if taken."""
        q = self.queue
        if not q or q[-1] is not ev:
            return False
        q.pop()
        self.withdrawn += 1
        return True

    def queued(self) -> int:
        """Events waiting in the queue (not those being sent)."""
        return len(self.queue)

    def in_flight(self) -> int:
        """Batches being sent or reported."""
        return sum(1 for b in self.batches if b.kind == SEND and not b.claimed)

    # --- taking work ------------------------------------------------------------

    def take_drops(self) -> Optional[Batch]:
        """Overflow drops waiting to be reported, as one unit (or None)."""
        if not self.dropped:
            return None
        batch = Batch(DROPS, self.dropped)
        self.dropped = []
        self.batches.add(batch)
        self.decide(batch, batch.events)
        return batch

    def take_batch(self, size: int) -> Optional[Batch]:
        """Up to ``size`` events from the head of the queue, now in flight."""
        q = self.queue
        if not q:
            return None
        take = q.popleft
        # One at a time, never more than were there: a signal handler on this
        # thread may queue an event or take the queue between two pops
        # (docs/design.md, "Threads and locks").
        events = [take() for _ in range(min(len(q), size)) if q]
        batch = Batch(SEND, events)
        self.batches.add(batch)
        return batch

    def head(self) -> Optional[int]:
        """Sequence number of the oldest queued event."""
        return self.queue[0]._seq if self.queue else None

    # --- outcomes -------------------------------------------------------------------

    def decide(self, batch: Batch, undelivered: List[Event]) -> bool:
        """Record that ``undelivered`` of ``batch`` did not get through; False if it was claimed.

        Called before the outcome is reported, so that a flush() whose
        deadline passes while on_error runs still returns False.
        """
        if batch.claimed:
            return False
        batch.decided = True
        self.note_failed(undelivered)
        return True

    def note_failed(self, undelivered: List[Event]) -> None:
        """These events will be reported undelivered: every waiter covering them fails."""
        if undelivered:
            lo = min(ev._seq for ev in undelivered)
            hi = max(ev._seq for ev in undelivered) + 1
            self._mark(lo, hi)
            self._failed.append((lo, hi))

    def complete(self, batch: Batch) -> None:
        """The batch's outcome has been reported (or it was claimed): it is finished."""
        self.batches.discard(batch)
        if self._failed:
            mark = self.watermark()
            self._failed = [r for r in self._failed if r[1] > mark]

    def watermark(self) -> int:
        """The lowest unfinished sequence number."""
        low = self.next_seq
        if self.queue:
            low = self.queue[0]._seq
        if self.dropped and self.dropped[0]._seq < low:
            low = self.dropped[0]._seq
        for b in self.batches:
            if not b.claimed and b.lo < low:
                low = b.lo
        return low

    # --- waiters ----------------------------------------------------------------------

    def add_waiter(self) -> Optional[Waiter]:
        """A waiter for everything queued so far; None when all of it has finished."""
        target = self.next_seq
        start = self.watermark()
        if start >= target:
            return None
        waiter = Waiter(start, target)
        for lo, hi in self._failed:
            if lo < target and hi > start:
                waiter.ok = False
        self.waiters.append(waiter)
        return waiter

    def remove_waiter(self, waiter: Waiter) -> None:
        """Forget a waiter (it returned)."""
        self.waiters.remove(waiter)

    def _mark(self, lo: int, hi: int) -> None:
        for w in self.waiters:
            if lo < w.target and hi > w.start:
                w.ok = False

    # --- deadlines ----------------------------------------------------------------------

    def claim(self, target: Optional[int] = None) -> Tuple[List[Batch], List[Event], List[Event]]:
        """Take every unfinished event before ``target`` (default: all) for the claimer to report.

        Returns (batches in flight now claimed, overflow drops, queued
        events). Drops already being reported are not taken: that report is
        under way.
        """
        end = self.next_seq if target is None else target
        claimed: List[Batch] = []
        for b in sorted(self.batches, key=lambda b: b.lo):
            if b.kind == SEND and not b.claimed and not b.decided and b.lo < end:
                b.claimed = True
                claimed.append(b)
        dropped = [ev for ev in self.dropped if ev._seq < end]
        if dropped:
            self.dropped = self.dropped[len(dropped) :]
        queued: List[Event] = []
        q = self.queue
        while q and q[0]._seq < end:
            queued.append(q.popleft())
        held: List[Event] = []
        for group in [*(b.events for b in claimed), dropped, queued]:
            if group:
                lo, hi = group[0]._seq, group[-1]._seq + 1
                self._mark(lo, hi)
                # Failed but not yet reported: a waiter that starts before the
                # claimer has reported them must still see them (as for decide()).
                self._failed.append((lo, hi))
                held.extend(group)
        if held:
            hold = Batch(CLAIM, held)
            hold.lo = min(ev._seq for ev in held)
            hold.decided = True
            self.batches.add(hold)
            self.holds.append(hold)
        return claimed, dropped, queued

    def take_hold(self) -> Optional[Batch]:
        """The hold the last claim() made (None if it claimed nothing); complete() it once reported."""
        return self.holds.pop() if self.holds else None

    # --- counters -------------------------------------------------------------------------

    def count_failed(self, reason: str, n: int, now: float) -> None:
        """``n`` events ended undelivered for ``reason``."""
        if n:
            self.failed[reason] += n
            self.last_failure = now

    def snapshot(self) -> Dict[str, object]:
        """The counters, copied (the lock is held by the caller)."""
        return {
            "enqueued": self.next_seq + self.sent_directly - self.withdrawn,
            "delivered": self.delivered,
            "rejected": self.rejected,
            "filtered": self.filtered,
            "failed": dict(self.failed),
            "retries": self.retries,
            "in_flight": self.in_flight(),
            "queued": len(self.queue) + len(self.dropped),
        }
