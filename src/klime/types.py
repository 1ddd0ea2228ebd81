"""Public types: results, errors, events, stats.

``from klime.types import Event, EventType, EventContext, LibraryInfo,
BatchResponse, ValidationError, SendError`` works as with the official SDK
(docs/design.md, Drop-in).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from types import MappingProxyType
from typing import Any, Callable, FrozenSet, List, Literal, Mapping, Optional, Sequence, Tuple, get_args

from ._event import Event, EventContext, EventType, LibraryInfo

__all__ = [
    "REASONS",
    "BatchResponse",
    "Event",
    "EventContext",
    "EventType",
    "LibraryInfo",
    "OnError",
    "OnSuccess",
    "Reason",
    "SendError",
    "Stats",
    "ValidationError",
]

Reason = Literal[
    "permanent_error",
    "retries_exhausted",
    "queue_overflow",
    "oversize",
    "unencodable",
    "before_send_error",
    "flush_deadline",
    "shutdown_deadline",
    "not_flushed_at_exit",
    "shutdown",
]
"""Why events were not delivered (``SendError.reason``, keys of ``Stats.failed``):

- ``"permanent_error"``: the server refused the batch (4xx other than 408/429).
- ``"retries_exhausted"``: every attempt failed transiently (network, 408, 429, 5xx).
- ``"queue_overflow"``: dropped as the oldest queued event when the queue was full.
- ``"oversize"``: the event's JSON is over 200 KiB.
- ``"unencodable"``: a value cannot be sent as JSON (NaN, an unknown type, a cycle...).
- ``"before_send_error"``: the ``before_send`` hook raised or returned something invalid.
- ``"flush_deadline"``: ``flush(timeout=...)`` ended before the event was delivered.
- ``"shutdown_deadline"``: ``shutdown()`` or process exit ran out of time.
- ``"not_flushed_at_exit"``: the client was closed with ``flush_on_shutdown=False``.
- ``"shutdown"``: a ``*_sync`` call after ``shutdown()``.
"""

REASONS: FrozenSet[str] = frozenset(get_args(Reason))


def _klime_repr(obj: Any) -> str:
    cls = type(obj)
    args = ", ".join(f"{f.name}={getattr(obj, f.name)!r}" for f in fields(obj))
    return f"{cls.__module__}.{cls.__qualname__}({args})"


@dataclass(repr=False)
class ValidationError:
    """One event the server rejected inside an otherwise accepted batch.

    ``index`` is the event's position in the batch that was sent.
    """

    index: int
    message: str
    code: str

    __repr__ = _klime_repr


@dataclass(repr=False)
class BatchResponse:
    """What the ingestion API answered for one delivered batch.

    ``failed > 0`` means a partial success: ``errors`` then lists the rejected
    events by their index in the batch.
    """

    status: str
    accepted: int
    failed: int
    errors: Optional[List[ValidationError]] = None

    __repr__ = _klime_repr


class SendError(Exception):
    """Events could not be delivered.

    Raised by the ``*_sync`` methods, and passed as the ``error`` argument of
    ``on_error``. ``message`` says why, ``events`` holds the events
    concerned, ``reason`` is a :data:`Reason` (a short machine-readable
    cause) and ``status`` the last HTTP status received, if any. It pickles
    and copies with all four (multiprocessing sends it between processes).

    A typed callback::

        def on_error(error: SendError, events: List[Event]) -> None: ...

    matches :data:`OnError`.
    """

    message: str
    events: List[Event]
    reason: Reason
    status: Optional[int]

    def __init__(
        self,
        message: str,
        events: Sequence[Event],
        *,
        reason: Reason = "retries_exhausted",
        status: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.events = list(events)
        self.reason = reason
        self.status = status

    def __reduce__(self) -> Tuple[Any, ...]:
        # Exception's own reduce re-calls __init__ with args == (message,) only.
        return (type(self), (self.message, self.events), dict(self.__dict__))

    def __repr__(self) -> str:
        cls = type(self)
        return (
            f"{cls.__module__}.{cls.__qualname__}({self.message!r}, events=<{len(self.events)}>, "
            f"reason={self.reason!r}, status={self.status!r})"
        )


OnError = Callable[[SendError, List[Event]], None]
"""The type of ``on_error``: called with the error and the events concerned."""

OnSuccess = Callable[[BatchResponse], None]
"""The type of ``on_success``: called with each delivered batch's response."""


@dataclass(frozen=True, repr=False)
class Stats:
    """A snapshot of a client's counters (``client.stats()``); immutable.

    After ``flush()`` returns, ``enqueued == delivered + rejected + filtered
    + sum(failed.values()) + queued``.
    """

    enqueued: int
    """Events accepted by the calls (queued or sent by ``*_sync``)."""
    delivered: int
    """Events the server accepted."""
    rejected: int
    """Events the server refused inside a 2xx answer (partial success)."""
    filtered: int
    """Events ``before_send`` dropped (not failures)."""
    failed: Mapping[str, int]
    """Events reported to ``on_error``, by :data:`Reason` (a read-only mapping)."""
    retries: int
    """Attempts that were retried."""
    in_flight: int
    """Batches being sent now."""
    queued: int
    """Events waiting to be sent."""
    last_success_at: Optional[datetime]
    """When a batch was last delivered (aware UTC), or None."""
    last_failure_at: Optional[datetime]
    """When events were last reported failed (aware UTC), or None."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "failed", MappingProxyType(dict(self.failed)))

    def __reduce__(self) -> Tuple[Any, ...]:
        # A mappingproxy does not pickle: rebuild from a plain dict.
        values = [getattr(self, f.name) for f in fields(self)]
        values[4] = dict(self.failed)
        return (_stats, tuple(values))

    def __repr__(self) -> str:
        args = ", ".join(
            f"{f.name}={dict(self.failed) if f.name == 'failed' else getattr(self, f.name)!r}" for f in fields(self)
        )
        return f"klime.Stats({args})"


def _stats(*values: Any) -> Stats:
    return Stats(*values)


for _cls in (ValidationError, BatchResponse, SendError, Stats):
    # Shown (and pickled) as klime.X; klime/__init__.py exports each of them.
    _cls.__module__ = "klime"
