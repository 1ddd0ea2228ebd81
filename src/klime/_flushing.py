"""``client.flushing()`` and ``klime.flushing()``: flush when a block or a call ends.

For short-lived work (a Lambda handler, a cron job, a task body) that must
deliver before the process is frozen or ends. One object is a context
manager (``with`` and ``async with``) and a decorator for plain and
``async def`` functions. The asynchronous forms await the flush through the
loop bridge in ``_async``, so the loop keeps running (docs/design.md,
"Short-lived work").
"""

from __future__ import annotations

import functools
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Optional, Type, TypeVar, cast

if TYPE_CHECKING:
    from .client import KlimeClient

F = TypeVar("F", bound=Callable[..., Any])


class Flushing:
    """Flushes a client when the block or decorated call ends, even when it raises.

    Made by :meth:`KlimeClient.flushing`, :meth:`AsyncKlimeClient.flushing`
    and :func:`klime.flushing`. The flush's result is not returned; events
    it could not deliver in time are reported to ``on_error`` as usual. An
    exception from the block or call propagates unchanged, and a problem
    with the flush itself is logged, never raised into the caller.
    """

    __slots__ = ("_source", "_timeout")

    def __init__(self, source: Callable[[], Optional[KlimeClient]], timeout: Optional[float] = None) -> None:
        from .client import _check_timeout

        # Checked now: a bad timeout shows where it is written, not after the work.
        self._timeout = _check_timeout(timeout)
        # Which client to flush, looked up when the block ends (for the
        # default client: the one configured by then; None: nothing to flush).
        self._source = source

    def __repr__(self) -> str:
        return f"<klime.Flushing timeout={self._timeout!r}>"

    def _flush(self) -> None:
        client = self._source()
        if client is None:
            return
        try:
            client.flush(self._timeout)
        except Exception:
            client._logger.exception("flush at the end of a flushing() block failed")

    async def _flush_async(self) -> None:
        from ._async import flush_async

        client = self._source()
        if client is None:
            return
        try:
            await flush_async(client, self._timeout)
        except Exception:
            client._logger.exception("flush at the end of a flushing() block failed")

    def __enter__(self) -> Flushing:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self._flush()

    async def __aenter__(self) -> Flushing:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self._flush_async()

    def __call__(self, fn: F) -> F:
        """Decorate ``fn`` (a plain or ``async def`` function) to flush after every call."""
        import inspect

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                finally:
                    await self._flush_async()

            return cast(F, run_async)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                self._flush()

        return cast(F, run)
