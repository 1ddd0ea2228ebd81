"""The module-level API: ``klime.track(...)`` and friends on a default client.

The default client is created on first use from the environment
(``KLIME_WRITE_KEY``, ``KLIME_ENDPOINT`` and the other ``KLIME_*``
options), or by :func:`configure`. Creating it takes a lock only to publish
it: the client itself is built and shut down with no lock held, so a
logging handler or callback that calls ``klime.track`` cannot deadlock
(docs/design.md, "Module-level API").
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Mapping, Optional

from ._flushing import Flushing
from .client import KlimeClient, Properties, Timestamp
from .types import BatchResponse, OnError, OnSuccess

_lock = threading.Lock()
_default: Optional[KlimeClient] = None


def get_client() -> KlimeClient:
    """The default client, created from the environment on first use.

    Raises ``ValueError`` when no write key is configured (set
    ``KLIME_WRITE_KEY`` or call :func:`configure`).
    """
    client = _default
    if client is not None:
        return client
    return _install(KlimeClient(), replace=False)


def _install(client: KlimeClient, replace: bool) -> KlimeClient:
    """Publish ``client`` as the default; returns the default in force afterwards."""
    global _default
    with _lock:
        old = _default
        if old is None or replace:
            _default = client
    if old is not None and not replace:
        # Another thread published one first: this one was never used.
        client.shutdown(timeout=0)
        return old
    if old is not None and old is not client:
        # Replaced: deliver what the old one queued (bounded by its shutdown_timeout).
        old.shutdown()
    return client


def _existing() -> Optional[KlimeClient]:
    """The default client if one was created (for flush and friends, which need not create one)."""
    return _default


def configure(
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
) -> KlimeClient:
    """Create the default client with these options (as for :class:`KlimeClient`) and return it.

    Options not given come from the ``KLIME_*`` environment variables. If a
    default client already exists it is replaced and shut down, so what it
    queued is delivered (within its ``shutdown_timeout``); calls made from
    here on go to the new one. Invalid options raise before anything
    changes.
    """
    client = KlimeClient(
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
    return _install(client, replace=True)


def track(
    event: str,
    properties: Properties = None,
    user_id: Optional[str] = None,
    group_id: Optional[str] = None,
    *,
    timestamp: Timestamp = None,
    message_id: Optional[str] = None,
    context: Properties = None,
) -> None:
    """``track`` on the default client: queue the event and return at once."""
    (_default or get_client()).track(
        event, properties, user_id, group_id, timestamp=timestamp, message_id=message_id, context=context
    )


def identify(
    user_id: str,
    traits: Properties = None,
    *,
    timestamp: Timestamp = None,
    message_id: Optional[str] = None,
    context: Properties = None,
) -> None:
    """``identify`` on the default client: queue the event and return at once."""
    (_default or get_client()).identify(user_id, traits, timestamp=timestamp, message_id=message_id, context=context)


def group(
    group_id: str,
    traits: Properties = None,
    user_id: Optional[str] = None,
    *,
    timestamp: Timestamp = None,
    message_id: Optional[str] = None,
    context: Properties = None,
) -> None:
    """``group`` on the default client: queue the event and return at once."""
    (_default or get_client()).group(
        group_id, traits, user_id, timestamp=timestamp, message_id=message_id, context=context
    )


def track_sync(
    event: str,
    properties: Properties = None,
    user_id: Optional[str] = None,
    group_id: Optional[str] = None,
    *,
    timestamp: Timestamp = None,
    message_id: Optional[str] = None,
    context: Properties = None,
) -> BatchResponse:
    """``track_sync`` on the default client: send now; a BatchResponse, or SendError raised."""
    return (_default or get_client()).track_sync(
        event, properties, user_id, group_id, timestamp=timestamp, message_id=message_id, context=context
    )


def identify_sync(
    user_id: str,
    traits: Properties = None,
    *,
    timestamp: Timestamp = None,
    message_id: Optional[str] = None,
    context: Properties = None,
) -> BatchResponse:
    """``identify_sync`` on the default client: send now; a BatchResponse, or SendError raised."""
    return (_default or get_client()).identify_sync(
        user_id, traits, timestamp=timestamp, message_id=message_id, context=context
    )


def group_sync(
    group_id: str,
    traits: Properties = None,
    user_id: Optional[str] = None,
    *,
    timestamp: Timestamp = None,
    message_id: Optional[str] = None,
    context: Properties = None,
) -> BatchResponse:
    """``group_sync`` on the default client: send now; a BatchResponse, or SendError raised."""
    return (_default or get_client()).group_sync(
        group_id, traits, user_id, timestamp=timestamp, message_id=message_id, context=context
    )


def flush(timeout: Optional[float] = None) -> bool:
    """``flush`` on the default client; True at once if none was created yet (nothing is queued)."""
    client = _default
    if client is None:
        from .client import _check_timeout

        _check_timeout(timeout)
        return True
    return client.flush(timeout)


def shutdown(timeout: Optional[float] = None) -> bool:
    """``shutdown`` on the default client (it stays the default, shut down, until :func:`configure`).

    True at once if no default client was created.
    """
    client = _default
    if client is None:
        from .client import _check_timeout

        _check_timeout(timeout)
        return True
    return client.shutdown(timeout)


def queue_size() -> int:
    """Events the default client has queued (0 if none was created yet)."""
    client = _default
    return 0 if client is None else client.queue_size()


def flushing(timeout: Optional[float] = None) -> Flushing:
    """Flush the default client when a block or call ends (see :meth:`KlimeClient.flushing`).

    The default client is looked up when the block ends, so one created or
    configured inside the block is the one flushed.
    """
    return Flushing(_existing, timeout)

