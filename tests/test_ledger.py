"""The ledger on its own: plain calls and asserts, no threads, no network.

The worker holds its lock around every ledger call; these tests play the
worker's part by hand, including batches that finish out of order and a
signal handler that re-enters between two steps (docs/design.md, "Ledger").
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, List, Optional

from klime._event import Event, new_event
from klime._ledger import CLAIM, DROPS, SEND, Batch, Ledger


def _events(n: int) -> List[Event]:
    return [new_event("track", f"E{i}", "u", None, {"i": i}, None, 1.7e9) for i in range(n)]


def _filled(n: int, capacity: int = 1000) -> Ledger:
    ledger = Ledger(capacity)
    for ev in _events(n):
        full = len(ledger.queue) >= capacity
        assert ledger.add(ev) is full  # True: the oldest was pushed out
    return ledger


def _seqs(events: List[Event]) -> List[int]:
    return [ev._seq for ev in events]


def test_events_are_numbered_in_order_and_the_watermark_follows_the_queue() -> None:
    ledger = _filled(5)
    assert _seqs(list(ledger.queue)) == [0, 1, 2, 3, 4]
    assert ledger.next_seq == 5 and ledger.watermark() == 0 and ledger.head() == 0
    batch = ledger.take_batch(3)
    assert batch is not None and batch.kind == SEND and _seqs(batch.events) == [0, 1, 2] and batch.lo == 0
    assert ledger.head() == 3
    assert ledger.watermark() == 0  # in flight is unfinished
    assert ledger.in_flight() == 1
    assert ledger.decide(batch, []) is True
    ledger.complete(batch)
    assert ledger.watermark() == 3 and ledger.in_flight() == 0


def test_batches_finishing_out_of_order_hold_the_watermark_at_the_oldest() -> None:
    ledger = _filled(6)
    first, second, third = ledger.take_batch(2), ledger.take_batch(2), ledger.take_batch(2)
    assert first is not None and second is not None and third is not None
    assert ledger.take_batch(2) is None
    waiter = ledger.add_waiter()
    assert waiter is not None and (waiter.start, waiter.target) == (0, 6)

    ledger.decide(third, [])
    ledger.complete(third)
    ledger.decide(second, [])
    ledger.complete(second)
    assert ledger.watermark() == 0  # the first batch is still out
    ledger.decide(first, [])
    ledger.complete(first)
    assert ledger.watermark() == 6 == ledger.next_seq
    assert waiter.ok is True
    ledger.remove_waiter(waiter)
    assert ledger.add_waiter() is None  # nothing unfinished


def test_a_waiter_fails_only_for_undelivered_events_in_its_range() -> None:
    ledger = _filled(4)
    early = ledger.take_batch(2)
    assert early is not None
    covers_all = ledger.add_waiter()
    assert covers_all is not None
    late_events = _events(2)
    for ev in late_events:
        ledger.add(ev)
    later = ledger.take_batch(10)
    assert later is not None and _seqs(later.events) == [2, 3, 4, 5]
    ledger.decide(later, [later.events[-1]])  # seq 5: after covers_all's target (4)
    assert covers_all.ok is True
    ledger.decide(early, [early.events[0]])  # seq 0: inside it
    assert covers_all.ok is False


def test_a_waiter_that_starts_after_a_failure_is_decided_but_before_it_finishes_sees_it() -> None:
    ledger = _filled(3)
    batch = ledger.take_batch(3)
    assert batch is not None
    ledger.decide(batch, [batch.events[1]])  # being reported now
    waiter = ledger.add_waiter()
    assert waiter is not None and waiter.ok is False
    ledger.complete(batch)
    assert ledger.add_waiter() is None


def test_overflow_drops_the_oldest_and_reports_them_as_one_unit() -> None:
    ledger = _filled(3, capacity=3)
    extra = _events(2)
    assert ledger.add(extra[0]) is True and ledger.add(extra[1]) is True
    assert _seqs(ledger.dropped) == [0, 1] and _seqs(list(ledger.queue)) == [2, 3, 4]
    assert ledger.watermark() == 0  # drops are unfinished until reported
    waiter = ledger.add_waiter()
    assert waiter is not None and waiter.ok is True
    drops = ledger.take_drops()
    assert drops is not None and drops.kind == DROPS and _seqs(drops.events) == [0, 1]
    assert drops.decided and waiter.ok is False  # dropped events are undelivered
    assert ledger.take_drops() is None
    ledger.complete(drops)
    assert ledger.watermark() == 2
    assert ledger.snapshot()["queued"] == 3


def test_a_claim_takes_each_unfinished_event_once() -> None:
    ledger = _filled(8, capacity=6)  # seqs 0 and 1 overflowed
    assert _seqs(ledger.dropped) == [0, 1]
    sending = ledger.take_batch(2)  # 2, 3
    decided = ledger.take_batch(2)  # 4, 5: its outcome is being reported
    assert sending is not None and decided is not None
    ledger.decide(decided, [])
    claimed, dropped, queued = ledger.claim()
    assert claimed == [sending] and sending.claimed and not decided.claimed
    assert _seqs(dropped) == [0, 1] and _seqs(queued) == [6, 7]
    assert not ledger.queue and not ledger.dropped
    # The lane that was sending it learns the batch was claimed: it reports nothing.
    assert ledger.decide(sending, []) is False
    hold = ledger.take_hold()
    assert hold is not None and hold.kind == CLAIM and hold.decided
    assert sorted(_seqs(hold.events)) == [0, 1, 2, 3, 6, 7]
    assert ledger.watermark() == 0  # held until the claimer has reported
    ledger.complete(hold)
    ledger.complete(sending)
    assert ledger.watermark() == 4  # the decided batch is still being reported
    ledger.complete(decided)
    assert ledger.watermark() == 8
    assert ledger.claim() == ([], [], []) and ledger.take_hold() is None


def test_a_claim_up_to_a_target_leaves_later_events_queued() -> None:
    ledger = _filled(5)
    claimed, dropped, queued = ledger.claim(3)
    assert (claimed, dropped) == ([], []) and _seqs(queued) == [0, 1, 2]
    assert _seqs(list(ledger.queue)) == [3, 4]
    hold = ledger.take_hold()
    assert hold is not None
    ledger.complete(hold)
    assert ledger.watermark() == 3


def test_withdraw_takes_back_only_the_last_event_and_counts_it() -> None:
    ledger = _filled(2)
    first, last = list(ledger.queue)
    assert ledger.withdraw(first) is False
    assert ledger.withdraw(last) is True and list(ledger.queue) == [first]
    assert ledger.snapshot()["enqueued"] == 1


def test_counters_snapshot() -> None:
    ledger = _filled(4)
    batch = ledger.take_batch(4)
    assert batch is not None
    ledger.delivered += 3
    ledger.rejected += 1
    ledger.count_failed("retries_exhausted", 0, 1.0)
    assert ledger.last_failure is None  # nothing failed
    ledger.count_failed("queue_overflow", 2, 5.0)
    assert ledger.last_failure == 5.0
    snap = ledger.snapshot()
    assert snap["enqueued"] == 4 and snap["delivered"] == 3 and snap["rejected"] == 1
    assert snap["failed"] == {"queue_overflow": 2} and snap["in_flight"] == 1 and snap["queued"] == 0


class _Interrupted(deque):  # type: ignore[type-arg]
    """A queue whose first popleft() is followed by ``handler``: a signal handler
    running on the same thread between two pops (the worker's lock is re-entrant)."""

    def __init__(self, items: Any, handler: Callable[[], None]) -> None:
        super().__init__(items)
        self.handler: Optional[Callable[[], None]] = handler

    def popleft(self) -> Any:
        ev = super().popleft()
        handler, self.handler = self.handler, None
        if handler is not None:
            handler()
        return ev


def test_an_event_queued_by_a_handler_while_a_batch_is_taken_stays_queued() -> None:
    ledger = _filled(3)
    late = _events(1)[0]
    ledger.queue = _Interrupted(ledger.queue, lambda: ledger.add(late))
    batch = ledger.take_batch(100)
    assert batch is not None and _seqs(batch.events) == [0, 1, 2]
    assert list(ledger.queue) == [late] and late._seq == 3


def test_a_claim_by_a_handler_while_a_batch_is_taken_splits_the_events_without_overlap() -> None:
    ledger = _filled(5)
    got: List[Any] = []
    ledger.queue = _Interrupted(ledger.queue, lambda: got.append(ledger.claim()))
    batch = ledger.take_batch(4)  # no IndexError when the queue empties under it
    assert batch is not None and _seqs(batch.events) == [0]
    [(claimed, dropped, queued)] = got
    assert (claimed, dropped) == ([], []) and _seqs(queued) == [1, 2, 3, 4]
    assert not ledger.queue
    # The batch taken is still accounted: the lane that took it sends and reports it.
    assert batch in ledger.batches and ledger.watermark() == 0


def test_batch_repr_and_lo() -> None:
    events = _events(2)
    for i, ev in enumerate(events):
        ev._seq = 10 + i
    batch = Batch(SEND, events)
    assert batch.lo == 10 and repr(batch) == "<Batch send 2 from 10>"
    batch.claimed = True
    assert repr(batch) == "<Batch send 2 from 10 claimed>"
