"""asyncio: ``AsyncKlimeClient`` and the bridge from the sending threads to an event loop.

Nothing here runs a thread per await. A flush registers a watcher with the
worker (``Worker.watch_flush``); the sending thread that finishes the last
event hands the result to the loop with ``call_soon_threadsafe``, which
completes an asyncio future. A deadline is a ``loop.call_later`` timer that
expires the watcher, and a cancelled await only forgets it: the events go
on and end delivered or reported as usual. ``*_sync`` sends go to a sender
lane (``Worker.send_direct``), so fifty at once share the client's bounded
lanes (docs/design.md, "Asyncio").

asyncio is imported on first use, not with ``klime``: it takes tens of
milliseconds to import and most programs never need it here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Type, Union

from ._deadline import Deadline
from ._event import Event
from ._flushing import Flushing
from ._lifecycle import check_fork
from ._worker import REPORT_GRACE, SHUTDOWN_RESERVE
from .client import _OPEN, KlimeClient, Properties, Timestamp, _check_timeout
from .types import BatchResponse, OnError, OnSuccess, Reason, SendError, Stats

if TYPE_CHECKING:
    import asyncio


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    """On the loop: complete ``future`` unless its waiter went away (cancelled)."""
    if not future.done():
        future.set_result(result)


async def watch_flush(client: KlimeClient, deadline: Deadline, reason: Reason = "flush_deadline") -> bool:
    """Wait, without blocking the loop, until everything queued so far is delivered or reported.

    True when all of it was delivered. At ``deadline`` the rest is claimed
    and reported with ``reason`` (on the loop's thread, as a sync flush
    reports on its caller's thread). Cancelling the await stops the
    watching only.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    future: asyncio.Future[bool] = loop.create_future()

    def done(ok: bool) -> None:
        # On the sending thread that finished the last event: only hand the result on.
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, future, ok)

    worker = client._worker
    waiter = worker.watch_flush(done)
    if waiter is None:
        return True
    timer = None
    if deadline.at is not None:
        timer = loop.call_later(deadline.remaining(), worker.expire_watch, waiter, reason)
    try:
        return await future
    except BaseException:
        # Cancelled (or the loop is going away): the events carry on without us.
        worker.forget_watch(waiter)
        raise
    finally:
        if timer is not None:
            timer.cancel()


async def flush_async(client: KlimeClient, timeout: Optional[float] = None) -> bool:
    """``client.flush(timeout)`` for a coroutine: the same result, without blocking the loop."""
    seconds = _check_timeout(timeout)
    check_fork()
    if client._options.disabled:
        return True
    return await watch_flush(client, Deadline.after(seconds))


async def shutdown_async(client: KlimeClient, timeout: Optional[float] = None) -> bool:
    """``client.shutdown(timeout)`` for a coroutine: the same result, without blocking the loop.

    If the await is cancelled, the client stays closing and registered for
    exit, which completes the shutdown (as after an interrupted sync one).
    """
    import asyncio

    seconds = _check_timeout(timeout)
    check_fork()
    if seconds is None:
        seconds = client._options.shutdown_timeout
    deadline = Deadline.after(seconds)
    if not client._begin_close(send=True):
        return True
    # Some of the budget is kept for reporting what is left, as in Worker.finish.
    inner = Deadline(None if deadline.at is None else deadline.at - SHUTDOWN_RESERVE)
    ok = await watch_flush(client, inner, reason="shutdown_deadline")
    worker = client._worker
    worker.stop()
    # Reports already under way are user code the deadline cannot claim
    # back: give them a short grace, polled so that the loop keeps running.
    grace = Deadline.after(REPORT_GRACE)
    while worker.reporting():
        if grace.expired():
            client._logger.warning("an on_error/on_success callback is still running at shutdown")
            break
        await asyncio.sleep(0.01)
    client._reporter.summarise()
    client._end_close()
    return ok


async def send_async(client: KlimeClient, ev: Event) -> BatchResponse:
    """Send one event on a sender lane and await its outcome (``*_sync`` for coroutines)."""
    import asyncio

    check_fork()
    if client._options.disabled:
        return BatchResponse(status="disabled", accepted=1, failed=0)
    if client._state != _OPEN:
        raise SendError(
            "Failed to send 1 event(s): the client is shut down (shutdown() was called)", [ev], reason="shutdown"
        )
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Union[BatchResponse, SendError]] = loop.create_future()
    lock = threading.Lock()
    abandoned = [False]  # the awaiting task went away: a failure goes to on_error instead

    def done(outcome: Union[BatchResponse, SendError]) -> None:
        # On a sender lane.
        with lock:
            orphan = abandoned[0]
        if not orphan:
            try:
                loop.call_soon_threadsafe(_handover, outcome)
                return
            except RuntimeError:
                pass  # the loop is closed
        _orphaned(outcome)

    def _handover(outcome: Union[BatchResponse, SendError]) -> None:
        # On the loop. The waiter may have been cancelled after the lane looked.
        if future.done():
            _orphaned(outcome)
        else:
            future.set_result(outcome)

    def _orphaned(outcome: Union[BatchResponse, SendError]) -> None:
        # Nobody receives this outcome: a failure is reported so no event is lost silently.
        if isinstance(outcome, SendError):
            client._reporter.failed(outcome)

    client._worker.send_direct(ev, done)
    try:
        outcome = await future
    except BaseException:
        with lock:
            abandoned[0] = True
        raise
    if isinstance(outcome, SendError):
        raise outcome
    return outcome


class AsyncKlimeClient:
    """A :class:`KlimeClient` for asyncio programs.

    Takes the same options as :class:`KlimeClient`. ``track``,
    ``identify``, ``group``, ``queue_size`` and ``stats`` are plain methods
    that never block. ``flush``, ``shutdown`` and ``track_sync`` /
    ``identify_sync`` / ``group_sync`` are coroutines with the same results
    and errors as the sync client's; awaiting them never blocks the event
    loop, even while the endpoint hangs, and starts no thread per call.
    Cancelling a task that awaits one cancels only the wait: every event
    is still delivered or reported to ``on_error``.

    ``async with AsyncKlimeClient(...) as client:`` shuts down on exit.
    Process exit and ``os.fork()`` behave as for the sync client.
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
        # The sync client does the work (and is what exit and fork handling see).
        self._client = KlimeClient(
            write_key,
            endpoint,
            flush_interval,
            max_batch_size,
            max_queue_size,
            retry_max_attempts,
            retry_initial_delay,
            flush_on_shutdown,
            logger,
            on_error,
            on_success,
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

    def __repr__(self) -> str:
        return repr(self._client).replace("klime.KlimeClient", "klime.AsyncKlimeClient", 1)

    @property
    def endpoint(self) -> str:
        """The API base URL events are sent to."""
        return self._client.endpoint

    # --- the analytics calls: queue and return ------------------------------------------------

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
        """Queue a track event; returns at once (see :meth:`KlimeClient.track`)."""
        client = self._client
        client._put(client._track_event(event, properties, user_id, group_id, timestamp, message_id, context))

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
        client = self._client
        client._put(client._identify_event(user_id, traits, timestamp, message_id, context))

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
        client = self._client
        client._put(client._group_event(group_id, traits, user_id, timestamp, message_id, context))

    # --- sending one event now: coroutines ---------------------------------------------------

    async def track_sync(
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
        """Send one track event now, with the usual retries, without blocking the loop.

        Returns the :class:`BatchResponse`; raises :class:`SendError` if the
        event was not delivered. Argument errors (``ValueError``/``TypeError``)
        raise when the coroutine is awaited, before anything is sent. If the
        awaiting task is cancelled the event is still sent, and a failure
        goes to ``on_error``.
        """
        client = self._client
        ev = client._track_event(event, properties, user_id, group_id, timestamp, message_id, context)
        return await send_async(client, ev)

    async def identify_sync(
        self,
        user_id: str,
        traits: Properties = None,
        *,
        timestamp: Timestamp = None,
        message_id: Optional[str] = None,
        context: Properties = None,
    ) -> BatchResponse:
        """Send one identify event now; returns a BatchResponse or raises SendError."""
        client = self._client
        return await send_async(client, client._identify_event(user_id, traits, timestamp, message_id, context))

    async def group_sync(
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
        client = self._client
        return await send_async(client, client._group_event(group_id, traits, user_id, timestamp, message_id, context))

    # --- lifecycle ------------------------------------------------------------------------------

    def queue_size(self) -> int:
        """Number of events waiting to be sent."""
        return self._client.queue_size()

    def stats(self) -> Stats:
        """A snapshot of the client's counters (see :class:`klime.Stats`); cheap, no I/O."""
        return self._client.stats()

    async def flush(self, timeout: Optional[float] = None) -> bool:
        """Send everything queued and wait for it without blocking the loop.

        Returns when every event queued before the call has been delivered
        or reported to ``on_error``; True when all were delivered.
        ``timeout`` is in seconds; what is undelivered at the deadline is
        reported with reason ``"flush_deadline"``. Cancelling the await
        leaves the events to be delivered as usual.
        """
        return await flush_async(self._client, timeout)

    async def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Deliver what is queued and stop the client, without blocking the loop.

        ``timeout`` in seconds defaults to ``shutdown_timeout``; what is not
        delivered by then is reported to ``on_error``. Afterwards ``track``
        and friends are ignored and the ``*_sync`` coroutines raise
        :class:`SendError`. Returns True when everything was delivered.
        """
        return await shutdown_async(self._client, timeout)

    def flushing(self, timeout: Optional[float] = None) -> Flushing:
        """Flush when a block or a call ends, also when it raises (see :meth:`KlimeClient.flushing`).

        ``async with client.flushing():`` and decorated ``async def``
        functions wait for the flush without blocking the loop.
        """
        client = self._client
        return Flushing(lambda: client, timeout)

    async def __aenter__(self) -> AsyncKlimeClient:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.shutdown()
