"""KlimeClient: argument checks, event building, and the client's lifecycle."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from types import TracebackType
from typing import Any, Callable, List, Mapping, Optional, Set, Type

from ._event import Event, coerce_timestamp, copy_fields, prepare_batch
from ._transport import Sender, Transport, log_rejected
from ._worker import Worker
from .types import BatchResponse, SendError

DEFAULT_ENDPOINT = "https://i.klime.com"
DEFAULT_FLUSH_INTERVAL = 2000
DEFAULT_MAX_BATCH_SIZE = 20
DEFAULT_MAX_QUEUE_SIZE = 1000
DEFAULT_RETRY_MAX_ATTEMPTS = 5
DEFAULT_RETRY_INITIAL_DELAY = 1000
DEFAULT_REQUEST_TIMEOUT = 10000
DEFAULT_SHUTDOWN_TIMEOUT = 10000
MAX_BATCH_SIZE = 100
_MAX_DURATION_MS = threading.TIMEOUT_MAX * 1000

Properties = Optional[Mapping[str, Any]]

# Every client not yet shut down, for the exit hook and the fork hook. Strong
# references on purpose: a client the application let go of may still hold
# queued events, and the exit hook must deliver or report them.
_clients: Set[KlimeClient] = set()


def _shutdown_all_at_exit() -> None:
    for client in list(_clients):
        client._at_exit()


def _reinit_all_after_fork() -> None:
    for client in list(_clients):
        client._after_fork()


atexit.register(_shutdown_all_at_exit)
# After os.fork() (gunicorn, Celery, multiprocessing) every client starts
# afresh at once. Forks made from C skip this hook (uWSGI without
# py-call-osafterfork); the worker's own process-id check covers those.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_all_after_fork)


def _number(name: str, value: Any, default: int, *, integer: bool = True) -> Any:
    """An option that must be a positive number (None means the default)."""
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")
    if not integer and not value <= _MAX_DURATION_MS:
        # Past this (e.g. inf) thread waits and socket timeouts raise OverflowError.
        raise ValueError(f"{name} must be a finite number of milliseconds, at most {_MAX_DURATION_MS:.0f}")
    return value


def _bad_name(event: Any) -> None:
    if not isinstance(event, str):
        raise TypeError(f"event name must be a string, not {type(event).__name__}")
    raise ValueError("event name must be a non-empty string, e.g. 'Report Generated'")


def _check_id(name: str, value: Any, required: bool) -> None:
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a string, not {type(value).__name__}; pass str({value!r}) if it is a number"
        )
    if not value:
        raise ValueError(f"{name} must be a non-empty string")


class KlimeClient:
    """Sends track, identify and group calls to Klime in the background.

    Create one client per process and reuse it. ``track``, ``identify`` and
    ``group`` only queue the event and return at once; one daemon thread
    sends batches. Durations are in milliseconds, as in the Klime docs.

    Args:
        write_key: your write key; defaults to the ``KLIME_WRITE_KEY``
            environment variable.
        endpoint: the API base URL; defaults to ``KLIME_ENDPOINT``, then
            ``https://i.klime.com``.
        flush_interval: ms between sends of a partly filled batch (2000).
        max_batch_size: events per request (20, at most 100).
        max_queue_size: events held in memory; when full the oldest is
            dropped and reported (1000).
        retry_max_attempts: attempts per batch in all, first included (5).
        retry_initial_delay: ms before the first retry; doubles, capped at
            16 s (1000).
        flush_on_shutdown: deliver what is queued when the process exits
            (True). When False, queued events are reported to ``on_error``
            at exit instead.
        logger: where to log (``logging.getLogger("klime")``).
        on_error: ``on_error(error, events)`` for every batch that ends
            undelivered; ``error`` is a :class:`SendError` with a ``reason``.
        on_success: ``on_success(response)`` for every delivered batch.
        request_timeout: ms allowed for connecting and for each read (10000).
        shutdown_timeout: ms that ``shutdown()`` and process exit may take
            before the rest is reported undelivered (10000).
    """

    def __init__(
        self,
        write_key: Optional[str] = None,
        endpoint: Optional[str] = None,
        flush_interval: Optional[int] = None,
        max_batch_size: Optional[int] = None,
        max_queue_size: Optional[int] = None,
        retry_max_attempts: Optional[int] = None,
        retry_initial_delay: Optional[int] = None,
        flush_on_shutdown: Optional[bool] = None,
        logger: Optional[logging.Logger] = None,
        on_error: Optional[Callable[[Exception, List[Event]], None]] = None,
        on_success: Optional[Callable[[BatchResponse], None]] = None,
        *,
        request_timeout: Optional[int] = None,
        shutdown_timeout: Optional[int] = None,
    ) -> None:
        if write_key is None:
            write_key = os.environ.get("KLIME_WRITE_KEY")
        if write_key is None or write_key == "":
            raise ValueError(
                "a write key is required: pass KlimeClient(write_key=...) "
                "or set the KLIME_WRITE_KEY environment variable"
            )
        if not isinstance(write_key, str):
            raise TypeError(f"write_key must be a string, not {type(write_key).__name__}")
        if not (write_key.isascii() and write_key.isprintable()):
            # http.client would refuse the header on every send, quoting the key
            # in its error; the message here must not quote it either.
            raise ValueError(
                "write_key contains a newline, control or non-ASCII character; "
                "strip it (e.g. a trailing newline read from a file)"
            )
        if endpoint is None:
            endpoint = os.environ.get("KLIME_ENDPOINT") or DEFAULT_ENDPOINT
        if not isinstance(endpoint, str):
            raise TypeError(f"endpoint must be a string, not {type(endpoint).__name__}")
        self.endpoint = endpoint.rstrip("/")
        self.flush_interval = _number("flush_interval", flush_interval, DEFAULT_FLUSH_INTERVAL, integer=False)
        self.max_batch_size = min(_number("max_batch_size", max_batch_size, DEFAULT_MAX_BATCH_SIZE), MAX_BATCH_SIZE)
        self.max_queue_size = _number("max_queue_size", max_queue_size, DEFAULT_MAX_QUEUE_SIZE)
        self.retry_max_attempts = _number("retry_max_attempts", retry_max_attempts, DEFAULT_RETRY_MAX_ATTEMPTS)
        self.retry_initial_delay = _number(
            "retry_initial_delay", retry_initial_delay, DEFAULT_RETRY_INITIAL_DELAY, integer=False
        )
        self.request_timeout = _number("request_timeout", request_timeout, DEFAULT_REQUEST_TIMEOUT, integer=False)
        self.shutdown_timeout = _number(
            "shutdown_timeout", shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT, integer=False
        )
        if flush_on_shutdown is not None and not isinstance(flush_on_shutdown, bool):
            raise TypeError(f"flush_on_shutdown must be a bool, not {type(flush_on_shutdown).__name__}")
        self.flush_on_shutdown = True if flush_on_shutdown is None else flush_on_shutdown
        if logger is not None and not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
            raise TypeError(f"logger must be a logging.Logger, not {type(logger).__name__}")
        for name, fn in (("on_error", on_error), ("on_success", on_success)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, not {type(fn).__name__}")
        self._logger: logging.Logger = logger or logging.getLogger("klime")

        transport = self._make_transport(write_key)
        self._sender = Sender(
            transport, self.retry_max_attempts, self.retry_initial_delay / 1000.0, self._logger, secret=write_key
        )
        self._worker = Worker(
            self._sender,
            self.max_batch_size,
            self.max_queue_size,
            self.flush_interval / 1000.0,
            self._logger,
            on_error,
            on_success,
        )
        self._closed = False
        self._closing = threading.Event()  # interrupts *_sync retry waits at shutdown
        self._shutdown_lock = threading.Lock()
        self._ignored = 0
        _clients.add(self)

    def __repr__(self) -> str:
        # Never the write key.
        state = "shut down" if self._closed else "open"
        return f"<KlimeClient endpoint={self.endpoint!r} queued={self.queue_size()} {state}>"

    # --- the analytics calls -------------------------------------------------

    def track(
        self,
        event: str,
        properties: Properties = None,
        user_id: Optional[str] = None,
        group_id: Optional[str] = None,
        *,
        timestamp: Any = None,
        message_id: Optional[str] = None,
    ) -> None:
        """Queue a track event; returns at once.

        Needs ``user_id`` or ``group_id`` (or both). ``properties`` is copied
        at its top level now; nested values are read when the event is
        encoded on the flusher thread, so do not mutate them afterwards.
        """
        if not self._worker.put(self._track_event(event, properties, user_id, group_id, timestamp, message_id)):
            self._after_shutdown()

    def identify(
        self,
        user_id: str,
        traits: Properties = None,
        *,
        timestamp: Any = None,
        message_id: Optional[str] = None,
    ) -> None:
        """Queue an identify event for ``user_id`` with ``traits``; returns at once."""
        if not self._worker.put(self._identify_event(user_id, traits, timestamp, message_id)):
            self._after_shutdown()

    def group(
        self,
        group_id: str,
        traits: Properties = None,
        user_id: Optional[str] = None,
        *,
        timestamp: Any = None,
        message_id: Optional[str] = None,
    ) -> None:
        """Queue a group event: set group traits and/or link ``user_id`` to the group."""
        if not self._worker.put(self._group_event(group_id, traits, user_id, timestamp, message_id)):
            self._after_shutdown()

    # --- synchronous variants -------------------------------------------------

    def track_sync(
        self,
        event: str,
        properties: Properties = None,
        user_id: Optional[str] = None,
        group_id: Optional[str] = None,
        *,
        timestamp: Any = None,
        message_id: Optional[str] = None,
    ) -> BatchResponse:
        """Send one track event now, with the usual retries.

        Returns the :class:`BatchResponse`; raises :class:`SendError` if the
        event was not delivered. Callbacks are not called for sync sends.
        """
        return self._send_now(self._track_event(event, properties, user_id, group_id, timestamp, message_id))

    def identify_sync(
        self,
        user_id: str,
        traits: Properties = None,
        *,
        timestamp: Any = None,
        message_id: Optional[str] = None,
    ) -> BatchResponse:
        """Send one identify event now; returns a BatchResponse or raises SendError."""
        return self._send_now(self._identify_event(user_id, traits, timestamp, message_id))

    def group_sync(
        self,
        group_id: str,
        traits: Properties = None,
        user_id: Optional[str] = None,
        *,
        timestamp: Any = None,
        message_id: Optional[str] = None,
    ) -> BatchResponse:
        """Send one group event now; returns a BatchResponse or raises SendError."""
        return self._send_now(self._group_event(group_id, traits, user_id, timestamp, message_id))

    # --- lifecycle --------------------------------------------------------------

    def queue_size(self) -> int:
        """Number of events waiting to be sent."""
        return self._worker.size()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Send everything queued and wait for it.

        Returns when every event queued before the call has been delivered
        or reported to ``on_error``; True when all were delivered.
        ``timeout`` is in seconds (None: no limit beyond the retry policy);
        events still undelivered at the deadline are reported to
        ``on_error`` with reason ``"flush_deadline"``.
        """
        return self._worker.flush(timeout)

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Deliver what is queued and stop the client.

        ``timeout`` in seconds defaults to ``shutdown_timeout``; what is not
        delivered by then is reported to ``on_error``. Afterwards the async
        calls are ignored and ``*_sync`` raise :class:`SendError`. Calling it
        again does nothing. Returns True when everything was delivered.
        """
        return self._stop(timeout, send=True)

    def _stop(self, timeout: Optional[float], send: bool) -> bool:
        with self._shutdown_lock:
            if self._closed:
                return True
            self._closed = True
        if timeout is None:
            timeout = self.shutdown_timeout / 1000.0
        self._closing.set()
        try:
            return self._worker.shutdown(timeout, send=send)
        finally:
            self._sender.transport.close()
            _clients.discard(self)

    def __enter__(self) -> KlimeClient:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.shutdown()

    # --- internals ---------------------------------------------------------------

    def _make_transport(self, write_key: str) -> Transport:
        """The HTTP layer; ``klime.testing`` overrides it to capture in memory."""
        return Transport(self.endpoint, write_key, self.request_timeout / 1000.0)

    # The checks below run on the caller's thread for every call, so the common
    # case is tested inline and only a failing value goes to the helpers that
    # word the error. Everything else about the event happens on the flusher.

    def _track_event(
        self,
        event: Any,
        properties: Properties,
        user_id: Any,
        group_id: Any,
        timestamp: Any,
        message_id: Optional[str],
    ) -> Event:
        if type(event) is not str or not event:
            _bad_name(event)
        if user_id is None and group_id is None:
            raise ValueError("track needs user_id or group_id (anonymous events are not supported)")
        if user_id is not None and (type(user_id) is not str or not user_id):
            _check_id("user_id", user_id, False)
        if group_id is not None and (type(group_id) is not str or not group_id):
            _check_id("group_id", group_id, False)
        props = copy_fields(properties, "properties")
        if timestamp is None and message_id is None:
            return Event("track", event, user_id, group_id, props, None, time.time())
        return self._override(Event("track", event, user_id, group_id, props, None, time.time()), timestamp, message_id)

    def _identify_event(
        self, user_id: Any, traits: Properties, timestamp: Any, message_id: Optional[str]
    ) -> Event:
        if type(user_id) is not str or not user_id:
            _check_id("user_id", user_id, True)
        tr = copy_fields(traits, "traits")
        if timestamp is None and message_id is None:
            return Event("identify", None, user_id, None, None, tr, time.time())
        return self._override(Event("identify", None, user_id, None, None, tr, time.time()), timestamp, message_id)

    def _group_event(
        self, group_id: Any, traits: Properties, user_id: Any, timestamp: Any, message_id: Optional[str]
    ) -> Event:
        if type(group_id) is not str or not group_id:
            _check_id("group_id", group_id, True)
        if user_id is not None and (type(user_id) is not str or not user_id):
            _check_id("user_id", user_id, False)
        tr = copy_fields(traits, "traits")
        if timestamp is None and message_id is None:
            return Event("group", None, user_id, group_id, None, tr, time.time())
        return self._override(Event("group", None, user_id, group_id, None, tr, time.time()), timestamp, message_id)

    @staticmethod
    def _override(ev: Event, timestamp: Any, message_id: Optional[str]) -> Event:
        """Apply ``timestamp=`` / ``message_id=`` after checking them."""
        if timestamp is not None:
            ev._ts = coerce_timestamp(timestamp)
        if message_id is not None:
            if not isinstance(message_id, str):
                raise TypeError(f"message_id must be a string, not {type(message_id).__name__}")
            if not message_id:
                raise ValueError("message_id must be a non-empty string")
            ev._id = message_id
        return ev

    def _send_now(self, ev: Event) -> BatchResponse:
        if self._closed:
            raise SendError("the client is shut down", [ev], reason="shutdown")
        prep = prepare_batch([ev])
        if prep.rejected:
            rej = prep.rejected[0]
            raise SendError(rej.message, rej.events, reason=rej.reason)
        response = self._sender.deliver(prep.body, prep.events, self._sync_wait)
        log_rejected(self._logger, response, prep.events)
        return response

    def _sync_wait(self, seconds: float) -> bool:
        return not self._closing.wait(seconds)

    def _after_shutdown(self) -> None:
        # Not on_error: user callbacks never run on the caller's thread.
        self._ignored += 1
        if self._ignored == 1 or self._ignored % 1000 == 0:
            self._logger.warning(
                "klime: the client is shut down; %d event(s) ignored so far", self._ignored
            )

    def _at_exit(self) -> None:
        try:
            self._stop(self.shutdown_timeout / 1000.0, send=self.flush_on_shutdown)
        except Exception:  # pragma: no cover - never break interpreter exit
            self._logger.exception("klime: error while shutting down at exit")

    def _after_fork(self) -> None:
        self._worker.after_fork(accepting=not self._closed)
        self._sender.transport.after_fork()
        self._shutdown_lock = threading.Lock()
