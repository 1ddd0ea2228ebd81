"""Result and error types shared by the client, the flusher and the callbacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence

if TYPE_CHECKING:
    from ._event import Event


@dataclass
class ValidationError:
    """One event the server rejected inside an otherwise accepted batch.

    ``index`` is the event's position in the batch that was sent.
    """

    index: int
    message: str
    code: str


@dataclass
class BatchResponse:
    """What the ingestion API answered for one delivered batch.

    ``failed > 0`` means a partial success: ``errors`` then lists the rejected
    events by their index in the batch.
    """

    status: str
    accepted: int
    failed: int
    errors: Optional[List[ValidationError]] = None


class SendError(Exception):
    """Events could not be delivered.

    Raised by the ``*_sync`` methods, and passed as the ``error`` argument of
    ``on_error``. ``message`` says why, ``events`` holds the events concerned.
    ``reason`` is a short machine-readable cause, one of:
    ``"permanent_error"``, ``"retries_exhausted"``, ``"queue_overflow"``,
    ``"oversize"``, ``"unencodable"``, ``"flush_deadline"``,
    ``"shutdown_deadline"``, ``"not_flushed_at_exit"``, ``"shutdown"``.
    ``status`` is the last HTTP status received, if any.
    """

    def __init__(
        self,
        message: str,
        events: Sequence[Event],
        *,
        reason: str = "retries_exhausted",
        status: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.events: List[Event] = list(events)
        self.reason = reason
        self.status = status

    def __repr__(self) -> str:
        return (
            f"SendError({self.message!r}, events=<{len(self.events)}>, "
            f"reason={self.reason!r}, status={self.status!r})"
        )
