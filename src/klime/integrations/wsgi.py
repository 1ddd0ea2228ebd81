"""WSGI middleware: run each request inside a ``klime.scope`` and optionally flush after it.

    from klime.integrations.wsgi import KlimeMiddleware

    app.wsgi_app = KlimeMiddleware(app.wsgi_app, identify=lambda environ: {...}, flush=True)

Standard library only; it works with any WSGI application and server.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, Optional

from ._common import Flushable, IdentifyResult, call_identify, check_timeout, flush_blocking

__all__ = ["KlimeMiddleware"]

Environ = Dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class KlimeMiddleware:
    """Wraps a WSGI application for Klime.

    Args:
        app: the WSGI application.
        client: the client to flush; None means the default client
            (``klime.get_client()``), looked up when a flush is due.
        identify: ``identify(environ)`` returns a mapping with any of
            ``user_id``, ``group_id``, ``properties``; the request (the
            application call and the iteration of its response) runs inside
            ``klime.scope(**that)``, so ``track`` calls made while handling it
            inherit them. If it raises or returns something else, that is
            logged and the request runs without a scope.
        flush: flush the client once the response has been sent, that is
            when the server closes the response iterable (also when the
            application raised). For hosts that freeze the process between
            requests (serverless).
        flush_timeout: seconds that flush may take; what is not delivered by
            then is reported to ``on_error``, as ``flush(timeout)`` does. A
            failing or slow flush never fails the response and never raises
            into the server.
    """

    def __init__(
        self,
        app: WSGIApp,
        client: Optional[Flushable] = None,
        identify: Optional[Callable[[Environ], IdentifyResult]] = None,
        flush: bool = False,
        flush_timeout: float = 2.0,
    ) -> None:
        self.app = app
        self.client = client
        self.identify = identify
        self.flush = bool(flush)
        self.flush_timeout = check_timeout(flush_timeout)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.identify is None and not self.flush:
            return self.app(environ, start_response)
        # A klime scope may be entered again after it exits: the same one
        # covers the call, each step of the iteration and the close.
        scope = call_identify(self.identify, environ, "identify(environ)") if self.identify else None
        try:
            if scope is None:
                result = self.app(environ, start_response)
            else:
                with scope:
                    result = self.app(environ, start_response)
        except BaseException:
            # The server answers 500 (or the exception reaches it): what the
            # view tracked before raising still goes out.
            if self.flush:
                flush_blocking(self.client, self.flush_timeout)
            raise
        return _Response(result, scope, self._after if self.flush else None)

    def _after(self) -> None:
        flush_blocking(self.client, self.flush_timeout)


class _Response:
    """The application's response iterable, iterated and closed inside the scope; flushes on close."""

    def __init__(
        self, result: Iterable[bytes], scope: Optional[ContextManager[Any]], after: Optional[Callable[[], None]]
    ) -> None:
        self._result = result
        self._iter: Optional[Iterator[bytes]] = None
        self._scope = scope
        self._after = after
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._scope is None:
            if self._iter is None:
                self._iter = iter(self._result)
            return next(self._iter)
        with self._scope:
            if self._iter is None:
                self._iter = iter(self._result)
            return next(self._iter)

    def close(self) -> None:
        """Close the application's iterable (inside the scope), then flush if asked to."""
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                if self._scope is None:
                    close()
                else:
                    with self._scope:
                        close()
        finally:
            if self._after is not None:
                self._after()
