"""What the framework integrations share: the request scope, the client, the flush.

Nothing here imports a framework. Every failure of the analytics side (an
``identify`` hook that raises, a flush that fails or runs out of time) is
logged and never reaches the application or the server (docs/design.md,
"Integrations").
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import queue
import threading
from typing import Any, Callable, ContextManager, Mapping, Optional, Protocol, Set

logger = logging.getLogger("klime")

IdentifyResult = Optional[Mapping[str, Any]]
_SCOPE_KEYS = ("user_id", "group_id", "properties")


class Flushable(Protocol):
    """A client the integrations can flush: :class:`klime.KlimeClient` or ``klime.AsyncKlimeClient``."""

    def flush(self, timeout: Optional[float] = None) -> object: ...


def check_timeout(value: object) -> float:
    """``flush_timeout`` in seconds: a non-negative number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"flush_timeout must be a number of seconds, not {type(value).__name__}")
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"flush_timeout must be zero or more seconds, not {value!r}")
    return float(value)


def resolve(client: Optional[Flushable]) -> Optional[Flushable]:
    """The client to flush: the one given, else the default client if one was created.

    A default client that does not exist yet has queued nothing, so nothing
    is created (nor a missing write key complained about) just to flush it.
    """
    if client is not None:
        return client
    from .. import _module

    existing: Optional[Flushable] = _module._existing()
    return existing


def scope_for(ids: IdentifyResult, what: str) -> ContextManager[Any]:
    """``klime.scope(**ids)``; a mapping it refuses is logged and the request runs unscoped."""
    if not ids:
        return contextlib.nullcontext()
    try:
        if not isinstance(ids, Mapping):
            raise TypeError(f"must return a mapping, not {type(ids).__name__}")
        unknown = [k for k in ids if k not in _SCOPE_KEYS]
        if unknown:
            raise TypeError(f"returned unknown key(s) {unknown!r}; use user_id, group_id, properties")
        from .._scope import scope

        return scope(**ids)
    except Exception as exc:
        logger.error("klime: %s %s; the request runs without a klime scope", what, exc)
        return contextlib.nullcontext()


def call_identify(identify: Callable[[Any], IdentifyResult], arg: Any, what: str) -> ContextManager[Any]:
    """Run the user's ``identify`` hook; if it raises, log it and run the request unscoped."""
    try:
        ids = identify(arg)
    except Exception:
        logger.exception("klime: %s raised; the request runs without a klime scope", what)
        return contextlib.nullcontext()
    return scope_for(ids, what)


def flush_blocking(client: Optional[Flushable], timeout: float) -> None:
    """Flush on this thread within ``timeout`` seconds; never raises an ``Exception``."""
    try:
        target = resolve(client)
        if target is None:
            return
        if _is_async(target):
            # An AsyncKlimeClient flushes on its loop; from a sync server
            # thread, hand it the wait through the watch below instead.
            _watch_blocking(target, timeout)
            return
        target.flush(timeout=timeout)
    except Exception:
        logger.exception("klime: flushing after the response failed")


async def flush_async(client: Optional[Flushable], timeout: float) -> bool:
    """Flush within ``timeout`` seconds without blocking the event loop; never raises an ``Exception``.

    The sending threads report completion to the loop (``call_soon_threadsafe``):
    no thread is started or occupied per request. At the deadline, what is
    left is claimed and reported like ``flush(timeout)`` does, on the shared
    background thread, so that ``on_error`` never runs on the loop. Returns
    False when the deadline cut the flush short.
    """
    try:
        target = resolve(client)
        if target is None:
            return True
        if _is_async(target):
            await asyncio.wait_for(_as_awaitable(target.flush(timeout=timeout)), timeout + 1.0)
            return True
        worker = getattr(target, "_worker", None)
        if worker is None or not hasattr(worker, "watch_flush"):
            # Not our client: run its blocking flush on the shared thread.
            await _on_background(lambda: target.flush(timeout=timeout))
            return True
        return await _watch(worker, timeout)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("klime: flushing after the response failed")
        return True


async def _as_awaitable(value: Any) -> Any:
    return await value


def _is_async(client: object) -> bool:
    return inspect.iscoroutinefunction(getattr(client, "flush", None))


async def _watch(worker: Any, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()

    def finished(ok: bool) -> None:  # on a sending thread: only hand the result over
        def settle() -> None:
            if not done.done():
                done.set_result(ok)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle)

    waiter = worker.watch_flush(finished)
    if waiter is None:
        return True
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout)
        return True
    except asyncio.TimeoutError:
        background().submit(lambda: worker.expire_watch(waiter))
        return False
    except asyncio.CancelledError:
        worker.forget_watch(waiter)
        raise


def _watch_blocking(client: Any, timeout: float) -> None:
    worker = getattr(client, "_worker", None)
    if worker is None:
        warn_once("sync-flush", "klime: cannot flush %r from a synchronous server; use a KlimeClient", client)
        return
    finished = threading.Event()
    waiter = worker.watch_flush(lambda ok: finished.set())
    if waiter is not None and not finished.wait(timeout):
        worker.expire_watch(waiter)


async def _on_background(job: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            job()
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: None if done.done() else done.set_result(None))

    background().submit(run)
    await done


class Background:
    """One shared daemon thread for the integrations' blocking side jobs.

    Started on first use and again in a forked child; jobs run one after
    another and are short (claiming a timed-out flush, which runs the
    ``on_error`` callbacks off the event loop).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._pid = -1

    def submit(self, job: Callable[[], object]) -> None:
        if self._pid != os.getpid():
            self._start()
        self._jobs.put(job)

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._jobs = queue.SimpleQueue()  # a forked child must not share the parent's
            threading.Thread(target=self._run, args=(self._jobs,), name="klime-integrations", daemon=True).start()
            self._pid = os.getpid()

    @staticmethod
    def _run(jobs: queue.SimpleQueue[Callable[[], object]]) -> None:
        while True:
            job = jobs.get()
            try:
                job()
            except Exception:
                logger.exception("klime: a background flush job failed")


_background = Background()
if hasattr(os, "register_at_fork"):
    # The parent's lock may be held at the fork; the child's thread starts afresh anyway.
    os.register_at_fork(after_in_child=lambda: setattr(_background, "_lock", threading.Lock()))


def background() -> Background:
    """The shared background thread of the integrations."""
    return _background


_warned: Set[str] = set()


def warn_once(key: str, message: str, *args: object) -> None:
    """Log ``message`` at WARNING the first time ``key`` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    logger.warning(message, *args)
