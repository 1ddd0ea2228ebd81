"""ASGI middleware: run each request inside a ``klime.scope`` and optionally flush after it.

    from klime.integrations.asgi import KlimeMiddleware

    app.add_middleware(KlimeMiddleware, identify=lambda scope: {...}, flush=True)   # Starlette/FastAPI
    application = KlimeMiddleware(application, flush=True)                          # any ASGI app

Standard library only. The flush never blocks the event loop: the client's
sending threads hand their result to the loop, no thread is started per request.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Awaitable, Callable, MutableMapping, Optional

from ._common import Flushable, IdentifyResult, call_identify, check_timeout, flush_async, resolve

__all__ = ["KlimeMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class KlimeMiddleware:
    """Wraps an ASGI application for Klime.

    Args:
        app: the ASGI application.
        client: the client to flush (a ``KlimeClient`` or an
            ``AsyncKlimeClient``); None means the default client
            (``klime.get_client()``), looked up when a flush is due.
        identify: ``identify(scope)`` gets the ASGI connection scope and
            returns a mapping with any of ``user_id``, ``group_id``,
            ``properties``; the request runs inside ``klime.scope(**that)``
            (tasks it starts inherit it). If it raises or returns something
            else, that is logged and the request runs without a scope.
        flush: flush the client once the response has been sent (after the
            final body message, when the application returns; also when it
            raised), for hosts that freeze the process between requests. The
            request's task waits for the flush without blocking the loop.
        flush_timeout: seconds that flush may take; what is not delivered by
            then is reported to ``on_error``. A failing or slow flush never
            fails the response and never raises into the server.

    Only ``http`` and ``websocket`` connections are scoped and flushed.
    At ``lifespan`` shutdown (the server stopping) the client is flushed
    within its ``shutdown_timeout`` before the application hears of it:
    uvicorn ends the process with the signal it caught, which skips the
    exit hook. An application that does not speak the lifespan protocol is
    answered for, so that this flush still happens.
    """

    def __init__(
        self,
        app: ASGIApp,
        client: Optional[Flushable] = None,
        identify: Optional[Callable[[Scope], IdentifyResult]] = None,
        flush: bool = False,
        flush_timeout: float = 2.0,
    ) -> None:
        self.app = app
        self.client = client
        self.identify = identify
        self.flush = bool(flush)
        self.flush_timeout = check_timeout(flush_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope.get("type") not in ("http", "websocket") or (self.identify is None and not self.flush):
            await self.app(scope, receive, send)
            return
        context = call_identify(self.identify, scope, "identify(scope)") if self.identify else nullcontext()
        if not self.flush:
            with context:
                await self.app(scope, receive, send)
            return
        flusher = _Flusher(self.client, self.flush_timeout)

        async def send_then_flush(message: Message) -> None:
            await send(message)
            if message.get("type") == "http.response.body" and not message.get("more_body", False):
                await flusher.flush()

        with context:
            try:
                await self.app(scope, receive, send_then_flush)
            finally:
                # Also after the final body: what background tasks tracked
                # after the response went out, within what is left of the time.
                await flusher.flush()


    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def receive_and_flush() -> Message:
            nonlocal started
            message = await receive()
            if message.get("type") == "lifespan.startup":
                started = True
            elif message.get("type") == "lifespan.shutdown":
                await _flush_at_shutdown(self.client)
            return message

        try:
            await self.app(scope, receive_and_flush, send)
        except Exception:
            if started:
                raise
            # The application does not speak lifespan (it raised on the scope).
        if started:
            return
        # Answer the protocol for it, to flush when the server stops.
        if (await receive()).get("type") == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            if (await receive()).get("type") == "lifespan.shutdown":
                await _flush_at_shutdown(self.client)
                await send({"type": "lifespan.shutdown.complete"})


async def _flush_at_shutdown(client: Optional[Flushable]) -> None:
    """Deliver what is queued before the server stops, within the client's shutdown_timeout."""
    target = resolve(client)
    if target is None:
        return
    options = getattr(target, "_options", None)
    timeout = options.shutdown_timeout if options is not None else 10.0
    await flush_async(target, timeout)


class _Flusher:
    """The flushes of one request; after one runs out of time, the others are skipped."""

    __slots__ = ("client", "timeout", "timed_out")

    def __init__(self, client: Optional[Flushable], timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.timed_out = False

    async def flush(self) -> None:
        if self.timed_out:
            return  # the endpoint is slow or down: leave the rest to the client's own schedule
        self.timed_out = not await flush_async(self.client, self.timeout)
