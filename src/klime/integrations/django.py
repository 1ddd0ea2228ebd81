"""Django middleware: the signed-in user's id on every ``track``, an optional flush per request.

In ``settings.py``::

    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "klime.integrations.django.KlimeMiddleware",   # after the auth middleware
        ...,
    ]
    KLIME = {"WRITE_KEY": "...", "FLUSH_INTERVAL": 2000, "FLUSH": False, "FLUSH_TIMEOUT": 2.0}

Works under WSGI and ASGI (it is both sync- and async-capable). Django is
imported only by this module.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    Iterator,
    Mapping,
    Optional,
    Tuple,
    Union,
)

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async  # type: ignore[import-not-found,unused-ignore]
from django.conf import settings  # type: ignore[import-not-found,import-untyped,unused-ignore]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-not-found,import-untyped,unused-ignore]

from .. import _lifecycle
from ._common import IdentifyResult, background, check_timeout, flush_blocking, logger, scope_for

__all__ = ["KlimeMiddleware"]

# Keys of settings.KLIME that are the middleware's own; the others are client options.
_OWN = ("FLUSH", "FLUSH_TIMEOUT")

_configure_lock = threading.Lock()
_configured: Optional[Tuple[Dict[str, Any], Any]] = None  # (options, the client they made)


def _settings() -> Mapping[str, Any]:
    conf = getattr(settings, "KLIME", None)
    if conf is None:
        return {}
    if not isinstance(conf, Mapping):
        raise ImproperlyConfigured(f"settings.KLIME must be a dict, not {type(conf).__name__}")
    return conf


def _client_options(conf: Mapping[str, Any]) -> Dict[str, Any]:
    options: Dict[str, Any] = {}
    for key, value in conf.items():
        if not isinstance(key, str) or key != key.upper():
            raise ImproperlyConfigured(f"settings.KLIME keys are upper-case option names, e.g. WRITE_KEY; got {key!r}")
        if key not in _OWN:
            options[key.lower()] = value
    return options


def _configure(options: Dict[str, Any]) -> None:
    """Make the default client match ``options``, once: later middleware instances reuse it."""
    global _configured
    from .._module import configure, get_client

    with _configure_lock:
        if _configured is not None and _configured[0] == options and _configured[1] in _lifecycle.clients():
            try:
                if get_client() is _configured[1]:
                    return  # still the default, still open
            except Exception:
                pass
        try:
            client = configure(**options)
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"settings.KLIME: {exc}") from exc
        _configured = (dict(options), client)


class KlimeMiddleware:
    """Django middleware for Klime.

    Configures the default client (``klime.get_client()``) from
    ``settings.KLIME``: a dict whose upper-case keys are the client's
    constructor options (``WRITE_KEY``, ``ENDPOINT``, ``FLUSH_INTERVAL``,
    ...), plus ``FLUSH`` (flush after each response, default False) and
    ``FLUSH_TIMEOUT`` (seconds, default 2.0). Without ``settings.KLIME`` the
    default client reads the ``KLIME_*`` environment variables.

    Each request runs inside ``klime.scope(...)``: when ``request.user`` is
    authenticated (put this middleware after ``AuthenticationMiddleware``)
    the scope has ``user_id=str(request.user.pk)``, so ``klime.track(...)``
    and any client's ``track`` in views need no ``user_id``. Override
    :meth:`identify` to add ``group_id`` or ``properties``.

    With ``FLUSH``, the client is flushed when Django closes the response,
    after it has been sent; under WSGI the server's thread waits for it
    (at most ``FLUSH_TIMEOUT``), under ASGI the flush runs on a shared
    background thread and holds nothing up. A failing or slow flush never
    fails the response.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        conf = _settings()
        self.flush = bool(conf.get("FLUSH", False))
        try:
            self.flush_timeout = check_timeout(conf.get("FLUSH_TIMEOUT", 2.0))
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"settings.KLIME['FLUSH_TIMEOUT']: {exc}") from exc
        options = _client_options(conf)
        if options:
            _configure(options)

    def identify(self, request: Any, user: Optional[Any]) -> IdentifyResult:
        """The request's scope: ``user_id`` of the authenticated ``user`` (None when anonymous).

        Override to add ``group_id`` or ``properties``; return a mapping with
        any of ``user_id``, ``group_id``, ``properties``, or None.
        """
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        return {"user_id": str(user.pk)}

    def __call__(self, request: Any) -> Union[Any, Awaitable[Any]]:
        if self.async_mode:
            return self.__acall__(request)
        user = getattr(request, "user", None)
        scope = self._scope(request, user)
        with scope:
            response = self.get_response(request)
        self._after(request, response, scope)
        return response

    async def __acall__(self, request: Any) -> Any:
        user = await _auser(request)
        scope = self._scope(request, user)
        with scope:
            response = await self.get_response(request)
        self._after(request, response, scope)
        return response

    def _scope(self, request: Any, user: Optional[Any]) -> Any:
        try:
            ids = self.identify(request, user)
        except Exception:
            logger.exception("klime: KlimeMiddleware.identify raised; the request runs without a klime scope")
            ids = None
        return scope_for(ids, "KlimeMiddleware.identify")

    def _after(self, request: Any, response: Any, scope: Any) -> None:
        if getattr(response, "streaming", False) and not isinstance(scope, nullcontext):
            # A streaming body is produced after this returns: re-enter the scope per chunk.
            if getattr(response, "is_async", False):
                response.streaming_content = _achunks(response.streaming_content, scope)
            else:
                response.streaming_content = _chunks(response.streaming_content, scope)
        if not self.flush:
            return
        timeout = self.flush_timeout
        closers = getattr(response, "_resource_closers", None)
        asgi = hasattr(request, "scope")  # django.core.handlers.asgi.ASGIRequest
        if asgi:
            job: Callable[[], None] = lambda: background().submit(lambda: flush_blocking(None, timeout))  # noqa: E731
        else:
            job = lambda: flush_blocking(None, timeout)  # noqa: E731
        if isinstance(closers, list):
            # Django calls these from response.close(), once the response is sent.
            closers.append(job)
        else:
            job()


def _chunks(content: Iterable[Any], scope: ContextManager[Any]) -> Iterator[Any]:
    it = iter(content)
    while True:
        with scope:
            try:
                chunk = next(it)
            except StopIteration:
                return
        yield chunk


async def _achunks(content: AsyncIterable[Any], scope: ContextManager[Any]) -> AsyncIterator[Any]:
    it = content.__aiter__()
    while True:
        with scope:
            try:
                chunk = await it.__anext__()
            except StopAsyncIteration:
                return
        yield chunk


async def _auser(request: Any) -> Optional[Any]:
    """``request.user`` resolved without blocking the loop (Django 5: ``request.auser()``)."""
    auser = getattr(request, "auser", None)
    if auser is not None:
        try:
            return await auser()
        except Exception:
            logger.exception("klime: request.auser() raised; the request runs without a user id")
            return None
    if not hasattr(request, "user"):
        return None

    def resolve() -> Any:
        user = request.user
        _ = user.is_authenticated  # evaluates the lazy user in a sync thread
        return user

    try:
        return await sync_to_async(resolve)()
    except Exception:
        logger.exception("klime: request.user raised; the request runs without a user id")
        return None
