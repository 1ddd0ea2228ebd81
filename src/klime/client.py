"""KlimeClient: the public methods, argument checks and event building.

Everything here runs on the caller's thread, so it is kept to checks and an
append under a lock; encoding, ids and timestamps happen on the sending side
(docs/design.md, "Data flow").
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Callable, Dict, Mapping, Optional, Type, Union

from . import _lifecycle, _scope
from ._deadline import Deadline
from ._event import Codec, Event, coerce_timestamp, copy_fields, new_event
from ._flushing import Flushing
from ._lifecycle import check_fork
from ._options import Options
from ._reporter import Reporter, scrubber
from ._signals import check_uwsgi
from ._transport import HttpTransport, RetryPolicy, Sender, Transport
from ._worker import Worker
from .types import BatchResponse, OnError, OnSuccess, SendError, Stats

Properties = Optional[Mapping[str, Any]]
Timestamp = Union[datetime, str, None]

_DEBUG = logging.DEBUG
_fork_mark = _lifecycle.mark
_now = time.time

# Client states: open; closing (shutdown under way, perhaps interrupted); closed.
_OPEN, _CLOSING, _CLOSED = 0, 1, 2


def _plain(value: Any) -> str:
    """A ``str`` subclass (StrEnum member) as the plain string it holds."""
    return "".join((value,))


def _check_name(event: Any) -> str:
    if isinstance(event, str):
        if event:
            return _plain(event)
        raise ValueError("event name must be a non-empty string, e.g. 'Report Generated'")
    raise TypeError(f"event name must be a string, not {type(event).__name__}")


def _check_id(name: str, value: Any, required: bool) -> Optional[str]:
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a string, not {type(value).__name__}; pass str({value!r}) if it is a number"
        )
    if not value:
        raise ValueError(f"{name} must be a non-empty string")
    return _plain(value)


def _check_message_id(message_id: Any) -> str:
    if not isinstance(message_id, str):
        raise TypeError(f"message_id must be a string, not {type(message_id).__name__}")
    if not message_id:
        raise ValueError("message_id must be a non-empty string")
    return _plain(message_id)


def _check_timeout(timeout: Any) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds, not NaN")
    return max(float(timeout), 0.0)


class KlimeClient:
    """Sends track, identify and group calls to Klime in the background.

    Create one client per process and reuse it. ``track``, ``identify`` and
    ``group`` only queue the event and return at once; background threads
    send batches. Durations are in milliseconds, as in the Klime docs.

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
        request_timeout: ms one attempt may take in all: connecting,
            sending and reading the whole response (10000).
        shutdown_timeout: ms that ``shutdown()`` and process exit may take
            before the rest is reported undelivered (10000).
        before_send: ``before_send(event_dict)`` returns the dict to send,
            or None to drop the event; runs on the sending side.
        default_properties: merged under every track call's properties.
        default_context: merged under every call's ``context``.
        json_default: converts values of other types to JSON-compatible ones.
        disabled: validate calls but queue and send nothing (no write key
            needed); ``KLIME_DISABLED=1``.
        debug: log each event and request at DEBUG and make that visible;
            ``KLIME_DEBUG=1``.
    """

    # Whether the constructor starts the sending thread (the CLI's one-shot
    # client sends on its caller's thread only).
    _background_threads = True

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
        on_error: Optional[OnError] = None,
        on_success: Optional[OnSuccess] = None,
        *,
        request_timeout: Optional[int] = None,
        shutdown_timeout: Optional[int] = None,
        before_send: Optional[Callable[[Dict[str, Any]], Optional[Mapping[str, Any]]]] = None,
        default_properties: Optional[Mapping[str, Any]] = None,
        default_context: Optional[Mapping[str, Any]] = None,
        json_default: Optional[Callable[[Any], Any]] = None,
        disabled: Optional[bool] = None,
        debug: Optional[bool] = None,
        max_in_flight: Optional[int] = None,
    ) -> None:
        # In the child of a C fork, reset the clients inherited from the parent
        # before this one exists, so that the reset never touches it.
        check_fork()
        opts = Options.build(
            write_key=write_key,
            endpoint=endpoint,
            flush_interval=flush_interval,
            max_batch_size=max_batch_size,
            max_queue_size=max_queue_size,
            retry_max_attempts=retry_max_attempts,
            retry_initial_delay=retry_initial_delay,
            flush_on_shutdown=flush_on_shutdown,
            logger=logger,
            on_error=on_error,
            on_success=on_success,
            request_timeout=request_timeout,
            shutdown_timeout=shutdown_timeout,
            before_send=before_send,
            default_properties=default_properties,
            default_context=default_context,
            json_default=json_default,
            disabled=disabled,
            debug=debug,
            max_in_flight=max_in_flight,
        )
        self._options = opts
        self._logger: logging.Logger = opts.logger
        if opts.debug:
            _make_debug_visible(self._logger)
        scrub = scrubber(opts.write_key)
        self._reporter = Reporter(opts.logger, opts.on_error, opts.on_success, scrub)
        self._sender = Sender(
            self._make_transport(opts),
            RetryPolicy(opts.retry_max_attempts, opts.retry_initial_delay),
            self._reporter.logger,
            opts.write_key,
        )
        self._codec = Codec(
            json_default=opts.json_default,
            default_properties=opts.default_properties,
            default_context=opts.default_context,
            before_send=opts.before_send,
        )
        self._worker = Worker(opts, self._codec, self._sender, self._reporter)
        self._state = _OPEN
        self._state_lock = threading.RLock()
        self._closing = threading.Event()  # interrupts *_sync retry waits at shutdown
        self._ignored = 0
        self._owner_pid = 0
        _lifecycle.created(self)
        if opts.disabled:
            # Calls are still checked; nothing is queued, no thread started.
            self._state = _CLOSED
            self._worker.close(send=False)
            return
        # Started now rather than by the first call: starting a thread takes
        # ~0.3 ms, which would otherwise land on the caller's first track().
        if self._background_threads:
            self._worker.start()
        _lifecycle.register(self)
        if "uwsgi" in sys.modules:  # threads disabled there would stall the flusher
            check_uwsgi()
        # The objects made above (threads, locks, options) would be traversed
        # by the next young-generation collection, which the first calls
        # trigger: collected now, on the constructor's time (a fraction of a
        # millisecond), they do not become the slowest track() of a burst.
        gc.collect(0)

    def __repr__(self) -> str:
        # Never the write key.
        state = "disabled" if self._options.disabled else ("open", "shutting down", "shut down")[self._state]
        return f"<klime.KlimeClient endpoint={self.endpoint!r} queued={self.queue_size()} {state}>"

    # --- read-only settings -----------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The API base URL events are sent to."""
        return self._options.endpoint

    @property
    def flush_interval(self) -> float:
        """Milliseconds between sends of a partly filled batch."""
        return self._options.flush_interval_ms

    @property
    def max_batch_size(self) -> int:
        """Events per request."""
        return self._options.max_batch_size

    @property
    def max_queue_size(self) -> int:
        """Events held in memory before the oldest are dropped."""
        return self._options.max_queue_size

    @property
    def retry_max_attempts(self) -> int:
        """Attempts per batch in all."""
        return self._options.retry_max_attempts

    @property
    def retry_initial_delay(self) -> float:
        """Milliseconds before the first retry."""
        return self._options.retry_initial_delay_ms

    @property
    def request_timeout(self) -> float:
        """Milliseconds one attempt may take in all."""
        return self._options.request_timeout_ms

    @property
    def shutdown_timeout(self) -> float:
        """Milliseconds shutdown() and exit may take."""
        return self._options.shutdown_timeout_ms

    @property
    def flush_on_shutdown(self) -> bool:
        """Whether exit delivers what is queued (else it reports it)."""
        return self._options.flush_on_shutdown

    # --- the analytics calls -------------------------------------------------

    def track(
        self,
        event: str,
        properties: Properties = None,
        user_id: Optional[str] = None,
        group_id: Optional[str] = None,
        *,
        timestamp: Timestamp = None,
        message_id: Optional[str] = None,
        context: Properties = None,
    ) -> None:
        """Queue a track event; returns at once.

        Needs ``user_id`` or ``group_id`` (or both). ``properties`` is copied
        at its top level now; nested values are read when the event is
        encoded on the sending side, so do not mutate them afterwards.
        """
        # The most common call, checked and queued inline: two calls fewer
        # on every track(). Anything else takes the general path below.
        if (
            type(event) is str
            and event
            and type(user_id) is str
            and user_id
            and group_id is None
            and (properties is None or type(properties) is dict)
            and timestamp is None
            and message_id is None
            and context is None
            and not _scope.used
        ):
            props = {} if properties is None else properties.copy()
            for key in props:
                if type(key) is not str:
                    break
            else:
                self._put(new_event("track", event, user_id, None, props, None, _now()))
                return
        self._put(self._track_event(event, properties, user_id, group_id, timestamp, message_id, context))

    def identify(
        self,
        user_id: str,
        traits: Properties = None,
        *,
        timestamp: Timestamp = None,
        message_id: Optional[str] = None,
        context: Properties = None,
    ) -> None:
        """Queue an identify event for ``user_id`` with ``traits``; returns at once."""
        self._put(self._identify_event(user_id, traits, timestamp, message_id, context))

    def group(
        self,
        group_id: str,
        traits: Properties = None,
        user_id: Optional[str] = None,
        *,
        timestamp: Timestamp = None,
        message_id: Optional[str] = None,
        context: Properties = None,
    ) -> None:
        """Queue a group event: set group traits and/or link ``user_id`` to the group."""
        self._put(self._group_event(group_id, traits, user_id, timestamp, message_id, context))

    # --- synchronous variants -------------------------------------------------

    def track_sync(
        self,
        event: str,
        properties: Properties = None,
        user_id: Optional[str] = None,
        group_id: Optional[str] = None,
        *,
        timestamp: Timestamp = None,
        message_id: Optional[str] = None,
        context: Properties = None,
    ) -> BatchResponse:
        """Send one track event now, with the usual retries.

        Returns the :class:`BatchResponse`; raises :class:`SendError` if the
        event was not delivered. Callbacks are not called for sync sends.
        """
        return self._send_now(self._track_event(event, properties, user_id, group_id, timestamp, message_id, context))

    def identify_sync(
        self,
        user_id: str,
        traits: Properties = None,
        *,
        timestamp: Timestamp = None,
        message_id: Optional[str] = None,
        context: Properties = None,
    ) -> BatchResponse:
        """Send one identify event now; returns a BatchResponse or raises SendError."""
        return self._send_now(self._identify_event(user_id, traits, timestamp, message_id, context))

    def group_sync(
        self,
        group_id: str,
        traits: Properties = None,
        user_id: Optional[str] = None,
        *,
        timestamp: Timestamp = None,
        message_id: Optional[str] = None,
        context: Properties = None,
    ) -> BatchResponse:
        """Send one group event now; returns a BatchResponse or raises SendError."""
        return self._send_now(self._group_event(group_id, traits, user_id, timestamp, message_id, context))

    # --- lifecycle --------------------------------------------------------------

    def queue_size(self) -> int:
        """Number of events waiting to be sent."""
        check_fork()
        return self._worker.size()

    def stats(self) -> Stats:
        """A snapshot of the client's counters (see :class:`klime.Stats`); cheap, no I/O."""
        check_fork()
        snap = self._worker.snapshot()
        return Stats(
            enqueued=snap["enqueued"],
            delivered=snap["delivered"],
            rejected=snap["rejected"],
            filtered=snap["filtered"],
            failed=snap["failed"],
            retries=snap["retries"],
            in_flight=snap["in_flight"],
            queued=snap["queued"],
            last_success_at=_utc(snap["last_success"]),
            last_failure_at=_utc(snap["last_failure"]),
        )

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Send everything queued and wait for it.

        Returns when every event queued before the call has been delivered
        or reported to ``on_error``; True when all were delivered.
        ``timeout`` is in seconds (None: no limit beyond the retry policy);
        events still undelivered at the deadline are reported to
        ``on_error`` with reason ``"flush_deadline"``.
        """
        seconds = _check_timeout(timeout)
        check_fork()
        if self._options.disabled:
            return True
        return self._worker.flush(Deadline.after(seconds))

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Deliver what is queued and stop the client.

        ``timeout`` in seconds defaults to ``shutdown_timeout``; what is not
        delivered by then is reported to ``on_error``. Afterwards the async
        calls are ignored and ``*_sync`` raise :class:`SendError`. Calling it
        again does nothing. Returns True when everything was delivered.
        """
        seconds = _check_timeout(timeout)
        check_fork()
        if seconds is None:
            seconds = self._options.shutdown_timeout
        deadline = Deadline.after(seconds)
        if self._worker.on_own_thread():
            # From a callback on a sending thread, which cannot wait for itself:
            # stop accepting and let the queue go out, but stay registered (and
            # "shutting down") so that exit, or a shutdown() from another
            # thread, still waits for what is queued within its budget.
            self._begin_close(send=True)
            return False
        if not self._begin_close(send=True):
            return True
        return self._finish_close(deadline, send=True)

    def _begin_close(self, send: bool) -> bool:
        """Stop accepting; False if the client was already shut down."""
        with self._state_lock:
            if self._state == _CLOSED:
                return False
            self._state = _CLOSING
        self._closing.set()
        self._worker.close(send)
        return True

    def _finish_close(self, deadline: Deadline, send: bool) -> bool:
        # Until this returns, the client stays registered: a shutdown cut
        # short (Ctrl-C) is completed by the exit hook, so nothing is lost.
        ok = self._worker.finish(deadline, send)
        self._end_close()
        return ok

    def _end_close(self) -> None:
        """The worker has finished: closed, connections closed, nothing left for exit to do."""
        with self._state_lock:
            self._state = _CLOSED
        self._sender.transport.close()
        _lifecycle.unregister(self)

    def _begin_exit(self) -> None:
        self._begin_close(send=self._options.flush_on_shutdown)

    def _finish_exit(self, deadline: Deadline) -> None:
        try:
            self._finish_close(deadline, send=self._options.flush_on_shutdown)
        except Exception:  # pragma: no cover - never break interpreter exit
            self._reporter.logger.exception("error while shutting down at exit")

    def flushing(self, timeout: Optional[float] = None) -> Flushing:
        """Flush when a block or a function call ends, also when it raises.

        A context manager (``with client.flushing(timeout=5): ...``) and a
        decorator for plain and ``async def`` functions; ``async with`` and
        coroutine functions wait for the flush without blocking the event
        loop. ``timeout`` is in seconds, as for :meth:`flush`; the flush's
        result is not returned and an exception from the block propagates
        unchanged. For Lambda handlers, cron jobs and task bodies.
        """
        return Flushing(lambda: self, timeout)

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

    def _make_transport(self, options: Options) -> Transport:
        """The HTTP layer; ``klime.testing`` overrides it to deliver in memory."""
        return HttpTransport(options.endpoint, options.write_key, options.request_timeout)

    def _put(self, ev: Event) -> None:
        if not _fork_mark[0]:  # check_fork(), inlined: this is every call's path
            check_fork()
        if not self._worker.put(ev):
            self._after_shutdown()
            return
        if self._logger.isEnabledFor(_DEBUG):
            self._reporter.logger.debug("Enqueued %s event, queue size: %d", ev.type, self._worker.size())

    # The checks below run on the caller's thread for every call, so the common
    # case is tested inline and only an unusual value goes to the helpers that
    # accept it (a str subclass) or word the error.

    def _track_event(
        self,
        event: Any,
        properties: Properties,
        user_id: Any,
        group_id: Any,
        timestamp: Any,
        message_id: Any,
        context: Any,
    ) -> Event:
        if type(event) is not str or not event:
            event = _check_name(event)
        if _scope.used:
            # Only once klime.scope() was ever entered (docs/design.md, "Request scope").
            user_id, group_id, properties = _scope.fill(user_id, group_id, properties)
        if user_id is None and group_id is None:
            raise ValueError("track needs user_id or group_id (anonymous events are not supported)")
        if user_id is not None and (type(user_id) is not str or not user_id):
            user_id = _check_id("user_id", user_id, False)
        if group_id is not None and (type(group_id) is not str or not group_id):
            group_id = _check_id("group_id", group_id, False)
        props = copy_fields(properties, "properties")
        if timestamp is None and message_id is None and context is None:
            return new_event("track", event, user_id, group_id, props, None, time.time())
        return self._extras("track", event, user_id, group_id, props, None, timestamp, message_id, context)

    def _identify_event(
        self, user_id: Any, traits: Properties, timestamp: Any, message_id: Any, context: Any
    ) -> Event:
        if type(user_id) is not str or not user_id:
            user_id = _check_id("user_id", user_id, True)
        tr = copy_fields(traits, "traits")
        if timestamp is None and message_id is None and context is None:
            return new_event("identify", None, user_id, None, None, tr, time.time())
        return self._extras("identify", None, user_id, None, None, tr, timestamp, message_id, context)

    def _group_event(
        self, group_id: Any, traits: Properties, user_id: Any, timestamp: Any, message_id: Any, context: Any
    ) -> Event:
        if type(group_id) is not str or not group_id:
            group_id = _check_id("group_id", group_id, True)
        if user_id is not None and (type(user_id) is not str or not user_id):
            user_id = _check_id("user_id", user_id, False)
        tr = copy_fields(traits, "traits")
        if timestamp is None and message_id is None and context is None:
            return new_event("group", None, user_id, group_id, None, tr, time.time())
        return self._extras("group", None, user_id, group_id, None, tr, timestamp, message_id, context)

    @staticmethod
    def _extras(
        kind: str,
        event: Optional[str],
        user_id: Optional[str],
        group_id: Optional[str],
        props: Optional[Dict[str, Any]],
        traits: Optional[Dict[str, Any]],
        timestamp: Any,
        message_id: Any,
        context: Any,
    ) -> Event:
        """An event with ``timestamp=``, ``message_id=`` or ``context=``, each checked on its own."""
        now = time.time()  # the time of the call, whatever else is given
        stamp = None if timestamp is None else coerce_timestamp(timestamp)
        mid = None if message_id is None else _check_message_id(message_id)
        ctx = None if context is None else copy_fields(context, "context")
        return new_event(kind, event, user_id, group_id, props, traits, now, mid, stamp, ctx)

    def _send_now(self, ev: Event) -> BatchResponse:
        check_fork()
        if self._options.disabled:
            return BatchResponse(status="disabled", accepted=1, failed=0)
        if self._state != _OPEN:
            raise SendError(
                "Failed to send 1 event(s): the client is shut down (shutdown() was called)", [ev], reason="shutdown"
            )
        return self._worker.send_now(ev, self._closing)

    def _after_shutdown(self) -> None:
        if self._options.disabled:
            return
        # Not on_error: user callbacks never run on the caller's thread.
        self._ignored += 1
        if self._ignored == 1 or self._ignored % 1000 == 0:
            self._reporter.logger.warning("the client is shut down; %d event(s) ignored so far", self._ignored)

    def _after_fork(self) -> None:
        """In a forked child (called once, by the lifecycle's fork entry)."""
        self._state_lock = threading.RLock()
        self._closing = threading.Event()
        if self._state != _OPEN:
            self._closing.set()
        self._reporter.reset()
        self._worker.after_fork()
        self._sender.transport.after_fork()


def _utc(when: Optional[float]) -> Optional[datetime]:
    return None if when is None else datetime.fromtimestamp(when, timezone.utc)


def _make_debug_visible(given: Any) -> None:
    """debug=True: DEBUG records on ``given`` (a Logger or LoggerAdapter) reach a handler (stderr if none would).

    A ``LoggerAdapter`` has no handlers of its own: the logger it wraps is
    the one made visible (docs/design.md, "Debug").
    """
    logger: Any = given
    while isinstance(logger, logging.LoggerAdapter):
        logger = logger.logger
    if not isinstance(logger, logging.Logger):
        return
    logger.setLevel(logging.DEBUG)
    probe: Optional[logging.Logger] = logger
    while probe is not None:
        if any(h.level <= logging.DEBUG for h in probe.handlers):
            return
        if not probe.propagate:
            break
        probe = probe.parent
    handler = logging.StreamHandler()
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
