"""Monotonic time and the deadline value passed down to every wait.

A ``Deadline`` is one absolute instant (or none), so a flush deadline handed
to the sender bounds the retry waits and each request alike; nothing
re-derives "time left" from callables (docs/design.md, "Deadlines").
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Optional

# Captured once so that a test (or an application) freezing time with
# freezegun does not stall the flusher: freezegun swaps ``time.monotonic``
# but does not recognise this wrapper.
monotonic = functools.partial(time.monotonic)

# Waits longer than this make threading and socket calls raise OverflowError.
MAX_WAIT = float(threading.TIMEOUT_MAX)


class Deadline:
    """An instant on the monotonic clock, or ``None`` for "no deadline"."""

    __slots__ = ("at",)

    def __init__(self, at: Optional[float]) -> None:
        self.at = at

    @classmethod
    def after(cls, seconds: Optional[float]) -> Deadline:
        """The instant ``seconds`` from now (``None``: never)."""
        if seconds is None:
            return cls(None)
        return cls(monotonic() + max(seconds, 0.0))

    @classmethod
    def never(cls) -> Deadline:
        """No deadline at all."""
        return cls(None)

    def remaining(self) -> float:
        """Seconds left, never negative; ``inf`` without a deadline."""
        if self.at is None:
            return float("inf")
        return max(self.at - monotonic(), 0.0)

    def expired(self) -> bool:
        """True once the instant has passed."""
        return self.at is not None and monotonic() >= self.at

    def timeout(self, cap: Optional[float] = None) -> Optional[float]:
        """A timeout for a blocking call: the time left, capped; None if unbounded."""
        left = self.remaining()
        if cap is not None:
            left = min(left, cap)
        if left == float("inf"):
            return None
        return min(left, MAX_WAIT)

    def earlier(self, other: Deadline) -> Deadline:
        """Whichever of the two comes first."""
        if other.at is None:
            return self
        if self.at is None or other.at < self.at:
            return other
        return self

    def __repr__(self) -> str:
        if self.at is None:
            return "Deadline(never)"
        return f"Deadline(in {self.at - monotonic():.3f}s)"
