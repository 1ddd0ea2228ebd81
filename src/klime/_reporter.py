"""Everything the user hears from the client: callbacks and log lines.

The worker decides outcomes under its lock and calls the reporter only after
releasing it, so a callback or a logging handler that calls the client back
(``track``, ``flush``, ``shutdown``) cannot deadlock it (docs/design.md,
"Threads and locks"). The reporter's own lock only guards its rate-limit
counters and is never held while logging or calling user code.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._deadline import monotonic
from ._event import Event
from .types import BatchResponse, SendError

OnError = Callable[[SendError, List[Event]], None]
OnSuccess = Callable[[BatchResponse], None]

class _Reentry(threading.local):
    active = False


_reentry = _Reentry()


# At most one log line per failure reason in this many seconds.
LOG_INTERVAL = 10.0

_WHY = {
    "flush_deadline": "flush() timed out",
    "shutdown_deadline": "shutdown timed out",
    "not_flushed_at_exit": "the process exited with flush_on_shutdown=False",
    "shutdown": "the client is shut down",
}


def scrubber(secret: str) -> Callable[[str], str]:
    """A function that blanks ``secret`` out of text the server or the network produced."""

    def scrub(text: str) -> str:
        if secret and secret in text:
            return text.replace(secret, "<write key>")
        return text

    return scrub


def deadline_message(reason: str, count: int, cause: Optional[str]) -> str:
    """The message of events a deadline cut short, naming the last failure if there was one."""
    text = f"Failed to send {count} event(s): {_WHY.get(reason, reason)}"
    if cause:
        text = f"{text} (last error: {cause})"
    return text


class SafeLogger:
    """The user's logger, minus its exceptions.

    A logging handler is user code: one that raises (a log shipper whose
    endpoint is down) or recurses into the client would otherwise end a
    sending thread or skip the callback that follows the log line
    (docs/design.md, "Threads and locks"). Its failure is swallowed here.
    """

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - mirrors logging.Logger
        return self.logger.isEnabledFor(level)

    def log(self, level: int, msg: str, *args: Any, exc_info: Optional[bool] = None, stacklevel: int = 2) -> None:
        # A log call made while one of ours is being handled on this thread
        # (a handler that calls the client back) is dropped: it would recurse.
        if _reentry.active or not self.logger.isEnabledFor(level):
            return
        _reentry.active = True
        try:
            # stacklevel: the record names the client's line that logged, not this wrapper.
            with contextlib.suppress(Exception):
                self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=stacklevel)
        finally:
            _reentry.active = False

    def debug(self, msg: str, *args: Any) -> None:
        self.log(logging.DEBUG, msg, *args, stacklevel=3)

    def info(self, msg: str, *args: Any) -> None:
        self.log(logging.INFO, msg, *args, stacklevel=3)

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args, stacklevel=3)

    def error(self, msg: str, *args: Any) -> None:
        self.log(logging.ERROR, msg, *args, stacklevel=3)

    def exception(self, msg: str, *args: Any) -> None:
        self.log(logging.ERROR, msg, *args, exc_info=True, stacklevel=3)


class Reporter:
    """Calls ``on_error``/``on_success`` and logs failures, rate-limited per reason."""

    def __init__(
        self,
        logger: logging.Logger,
        on_error: Optional[OnError],
        on_success: Optional[OnSuccess],
        scrub: Callable[[str], str],
    ) -> None:
        self.logger = SafeLogger(logger)
        self._on_error = on_error
        self._on_success = on_success
        self._scrub = scrub
        # RLock: a signal handler on a thread that is inside _count may log too.
        self._lock = threading.RLock()
        # reason -> (when last logged, events and batches not logged since)
        self._state: Dict[str, Tuple[float, int, int]] = {}
        self.flusher_threads: set[int] = set()

    def reset(self) -> None:
        """In a forked child: fresh lock and counters."""
        self._lock = threading.RLock()
        self._state = {}

    # --- outcomes -------------------------------------------------------------

    def failed(self, error: SendError) -> None:
        """Log one undelivered group (rate-limited), then hand it to ``on_error``."""
        self._log_failure(error)
        for ev in error.events:
            ev.messageId  # noqa: B018 - fix the id before user code sees the event
        self.call(self._on_error, error, error.events)

    def delivered(self, response: BatchResponse, events: Sequence[Event]) -> List[Event]:
        """Log the events the server refused inside a 2xx, call ``on_success``; returns those events."""
        rejected = self.rejected_in(response, events)
        self.call(self._on_success, response)
        return rejected

    def rejected_in(self, response: BatchResponse, events: Sequence[Event]) -> List[Event]:
        """One warning per event the server refused in a 2xx; returns those events.

        When the server counts failures without saying which, the whole
        batch is returned, since none of it can be confirmed.
        """
        if response.failed <= 0:
            return []
        rejected: List[Event] = []
        for err in response.errors or []:
            ev = events[err.index] if 0 <= err.index < len(events) else None
            self.logger.warning(
                "klime: event rejected by the server: index=%d code=%s message=%s messageId=%s",
                err.index,
                self._scrub(err.code),
                self._scrub(err.message),
                ev.messageId if ev is not None else "?",
            )
            if ev is not None:
                rejected.append(ev)
        if not rejected:
            self.logger.warning(
                "klime: the server rejected %d of %d event(s) without saying which", response.failed, len(events)
            )
            rejected = list(events)
        return rejected

    # --- logging ------------------------------------------------------------------

    def _log_failure(self, error: SendError) -> None:
        """One line per failure, except that a flood of the same kind is summarised.

        Events that can never be sent (unencodable, oversize) are bugs in the
        caller's data and always get their own line; outages and overflow can
        fail thousands of batches, so those log at most once per interval per
        reason, counting what was not logged.
        """
        reason = error.reason
        message = self._scrub(error.message)
        if reason in ("unencodable", "oversize"):
            self.logger.error("%s", message)
            return
        now = monotonic()
        with self._lock:
            last, events, batches = self._state.get(reason, (-LOG_INTERVAL, 0, 0))
            if now - last < LOG_INTERVAL:
                self._state[reason] = (last, events + len(error.events), batches + 1)
                return
            self._state[reason] = (now, 0, 0)
        more = f" (and {events} more event(s) in {batches} batch(es) since the last such message)" if events else ""
        level = logging.WARNING if reason in ("queue_overflow", "before_send_error") else logging.ERROR
        self.logger.log(level, "%s%s", message, more)

    def summarise(self) -> None:
        """At shutdown: say what the rate limit kept out of the log."""
        with self._lock:
            pending = [(r, e, b) for r, (_, e, b) in self._state.items() if e]
            self._state.clear()
        for reason, events, batches in pending:
            self.logger.warning(
                "%d more event(s) in %d batch(es) were undelivered (%s) since the last such message",
                events,
                batches,
                reason,
            )

    # --- user code ------------------------------------------------------------------

    def call(self, fn: Optional[Callable[..., Any]], *args: Any) -> None:
        """Run user code; an exception it raises is logged, never propagated on a sending thread."""
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            self.logger.exception("the %s callback raised", getattr(fn, "__name__", "user"))
        except BaseException:
            # sys.exit() in a callback: on a sending thread it would end only
            # that thread and strand every later event. On a caller's thread
            # (a deadline claim) it is the caller's to handle.
            if threading.get_ident() not in self.flusher_threads:
                raise
            self.logger.exception("the %s callback raised", getattr(fn, "__name__", "user"))
