"""Test your own Klime instrumentation without a network.

:class:`CapturingClient` is a real :class:`~klime.KlimeClient` (same
constructor, same validation, queue, flusher thread, batching, JSON encoding
and retry policy) whose HTTP layer is replaced by an in-memory one. Every
event that would have reached the server is decoded from the exact request
body the client produced and kept, so what you assert on is the wire form:
camelCase keys, ISO 8601 timestamps, ``properties``/``traits`` after encoding
(a ``datetime`` becomes a string, a tuple a list). An event the real client
would refuse is refused here too: bad arguments raise at the call site, and
an unencodable value (NaN, an arbitrary object) goes to ``on_error`` and is
not captured.

With pytest::

    import pytest
    from klime.testing import CapturingClient

    import myapp.analytics


    @pytest.fixture
    def klime_client(monkeypatch):
        with CapturingClient() as client:
            monkeypatch.setattr(myapp.analytics, "client", client)
            yield client


    def test_signup_is_tracked(klime_client):
        myapp.signup(email="jane@example.com", plan="pro")

        event = klime_client.assert_tracked(
            "Signup Completed", user_id="usr_1", properties={"plan": "pro"}
        )
        assert event["timestamp"].endswith("Z")
        klime_client.assert_identified("usr_1", traits={"email": "jane@example.com"})


    def test_failed_delivery_is_reported():
        errors = []
        with CapturingClient(on_error=lambda error, events: errors.append(error)) as client:
            client.fail_next(400)  # or 503 with times=5, or ConnectionResetError()
            client.track("Signup Completed", user_id="usr_1")
            client.assert_nothing_sent()  # flushes first
        assert errors[0].reason == "permanent_error"

The assertion helpers flush first, so events queued by ``track()`` are
delivered (to memory) before they look. Filters given as ``None`` match
anything. ``properties=``/``traits=`` match a subset of the top-level keys,
compared after encoding, so ``properties={"at": some_datetime}`` works.

No pytest plugin is registered: import what you need.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from email.message import Message
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._deadline import Deadline
from ._event import encode
from ._options import Options
from ._transport import Response, Transport
from .client import KlimeClient
from .types import OnError, OnSuccess

__all__ = ["CapturingClient", "Failure", "MemoryTransport"]

WireEvent = Dict[str, Any]

Failure = Union[int, OSError]
"""A simulated failure: an HTTP status (300-599) or an ``OSError`` such as
``ConnectionRefusedError()`` or ``TimeoutError()``, raised as the network
would raise it."""

DEFAULT_TEST_WRITE_KEY = "test-key"
# Simulated transient failures are retried as for real; a tiny initial delay
# keeps that fast (5 attempts wait about 15 ms in all, not 15 s).
DEFAULT_TEST_RETRY_INITIAL_DELAY = 1
_MAX_LISTED = 20


def _check_failure(failure: Any) -> Failure:
    if isinstance(failure, OSError):
        return failure
    if isinstance(failure, bool) or not isinstance(failure, int):
        raise TypeError(
            f"a simulated failure is an HTTP status (int) or an OSError, not {type(failure).__name__}"
        )
    if not 300 <= failure <= 599:
        raise ValueError(f"a simulated failure needs a non-2xx HTTP status from 300 to 599, got {failure}")
    return failure


def _no_constant(name: str) -> Any:
    raise ValueError(f"the client sent {name}, which is not valid JSON")


class MemoryTransport:
    """Stands in for the HTTP transport: answers every request in memory.

    It implements the client's transport interface (``post``, ``close``,
    ``after_fork``), so no socket is ever opened. A request body is checked
    to be strictly valid JSON, its events are recorded, and the answer is
    200 with every event accepted, unless a failure was scheduled.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self._batches: List[List[WireEvent]] = []
        self._fail_always: Optional[Failure] = None
        self._fail_queue: Deque[Failure] = deque()

    @property
    def proxy(self) -> Optional[Tuple[str, int]]:
        """Never a proxy: nothing goes on the network."""
        return None

    def post(self, body: bytes, deadline: Deadline) -> Response:
        """Record the batch in ``body`` and answer like the ingestion API (the deadline is moot here)."""
        with self._lock:
            failure = self._fail_queue.popleft() if self._fail_queue else self._fail_always
        if isinstance(failure, OSError):
            raise failure
        headers = Message()
        headers["Content-Type"] = "application/json"
        if failure is not None:
            data = {"status": "error", "message": f"simulated HTTP {failure} (klime.testing)"}
            return Response(failure, headers, json.dumps(data).encode())
        batch = json.loads(body.decode("utf-8"), parse_constant=_no_constant)["batch"]
        with self._lock:
            self._batches.append(batch)
        answer = {"status": "ok", "accepted": len(batch), "failed": 0}
        return Response(200, headers, json.dumps(answer).encode())

    def close(self) -> None:
        """Nothing to close."""

    def after_fork(self) -> None:
        """In a forked child: a fresh lock, and only what the child delivers is captured."""
        self._lock = threading.Lock()
        self._batches = []

    def fail(self, failure: Optional[Failure], times: Optional[int] = None) -> None:
        """Answer the next ``times`` requests with ``failure``; every request when ``times`` is None.

        ``fail(None)`` cancels every scheduled failure.
        """
        with self._lock:
            if failure is None:
                self._fail_always = None
                self._fail_queue.clear()
            elif times is None:
                self._fail_always = failure
            else:
                self._fail_queue.extend([failure] * times)

    def captured(self) -> List[WireEvent]:
        """Every event delivered so far, in order."""
        with self._lock:
            return [ev for batch in self._batches for ev in batch]

    def captured_batches(self) -> List[List[WireEvent]]:
        """The delivered events, one list per request."""
        with self._lock:
            return [list(batch) for batch in self._batches]

    def clear(self) -> None:
        """Forget what was delivered."""
        with self._lock:
            self._batches.clear()


def _normalise(value: Mapping[str, Any], what: str) -> Dict[str, Any]:
    """Expected properties/traits in their wire form, so that they compare with captured ones."""
    try:
        result: Dict[str, Any] = json.loads(encode(dict(value)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"expected {what} cannot be encoded as the client would: {exc}") from None
    return result


def _brief(ev: WireEvent) -> str:
    parts = [str(ev.get("type"))]
    if "event" in ev:
        parts.append(repr(ev["event"]))
    for key in ("userId", "groupId"):
        if key in ev:
            parts.append(f"{key}={ev[key]!r}")
    for key in ("properties", "traits"):
        if ev.get(key):
            parts.append(f"{key}={ev[key]!r}")
    return " ".join(parts)


def _differences(ev: WireEvent, want: Dict[str, Any]) -> List[str]:
    """How ``ev`` differs from the criteria in ``want`` (wire keys; mapping values are subsets)."""
    diffs: List[str] = []
    for key, expected in want.items():
        if isinstance(expected, dict):
            actual = ev.get(key)
            actual = actual if isinstance(actual, dict) else {}
            for k, v in expected.items():
                if k not in actual:
                    diffs.append(f"{key}[{k!r}] missing (expected {v!r})")
                elif actual[k] != v:
                    diffs.append(f"{key}[{k!r}] is {actual[k]!r}, expected {v!r}")
        elif key not in ev:
            diffs.append(f"no {key} (expected {expected!r})")
        elif ev[key] != expected:
            diffs.append(f"{key} is {ev[key]!r}, expected {expected!r}")
    return diffs


def _describe_want(kind: str, want: Dict[str, Any]) -> str:
    head = f"{kind} event {want['event']!r}" if "event" in want else f"{kind} event"
    parts = [f"{k}={v!r}" for k, v in want.items() if k != "event" and not isinstance(v, dict)]
    parts.extend(f"{k} including {v!r}" for k, v in want.items() if isinstance(v, dict))
    return f"{head} with {', '.join(parts)}" if parts else head


class CapturingClient(KlimeClient):
    """A :class:`~klime.KlimeClient` that delivers to memory instead of the network.

    Takes the same arguments as ``KlimeClient``; ``write_key`` defaults to
    ``"test-key"`` (no environment variable needed) and
    ``retry_initial_delay`` to 1 ms so that simulated transient failures
    retry quickly, and ``max_in_flight`` to 1 so that events are captured in
    the order they were queued. ``fail_with`` makes every request fail with that HTTP
    status or ``OSError`` until :meth:`stop_failing`; see also
    :meth:`fail_next`.

    Captured events are the exact JSON objects the server would have
    received (dicts with wire keys such as ``userId`` and ``messageId``).
    Events rejected by the client (unencodable, oversize) or whose delivery
    failed are not captured; they go to ``on_error`` as for real.
    """

    _memory: MemoryTransport

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
        fail_with: Optional[Failure] = None,
    ) -> None:
        failure = None if fail_with is None else _check_failure(fail_with)
        super().__init__(
            DEFAULT_TEST_WRITE_KEY if write_key is None else write_key,
            endpoint,
            flush_interval,
            max_batch_size,
            max_queue_size,
            retry_max_attempts,
            DEFAULT_TEST_RETRY_INITIAL_DELAY if retry_initial_delay is None else retry_initial_delay,
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
            # One request at a time: events are captured in the order they were queued.
            max_in_flight=1 if max_in_flight is None else max_in_flight,
        )
        if failure is not None:
            self._memory.fail(failure)

    def __enter__(self) -> CapturingClient:
        # Typed as this class so that ``with CapturingClient() as c: c.assert_tracked(...)`` type-checks.
        return self

    def _make_transport(self, options: Options) -> Transport:
        # Called from KlimeClient.__init__; the key is not kept anywhere.
        self._memory = MemoryTransport(options.endpoint)
        return self._memory

    # --- simulating failures ------------------------------------------------

    def fail_next(self, failure: Failure = 400, *, times: int = 1) -> None:
        """Make the next ``times`` requests fail with ``failure``, then succeed again.

        ``failure`` is an HTTP status (default 400, a permanent error: the
        batch goes to ``on_error`` at once) or an ``OSError``. Each retry is
        a request: a transient status (429, 5xx) or ``OSError`` fails
        delivery only when ``times`` covers every attempt
        (``retry_max_attempts``, 5 by default).
        """
        failure = _check_failure(failure)
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive int, got {times!r}")
        self._memory.fail(failure, times)

    def fail_always(self, failure: Failure) -> None:
        """Make every request fail with ``failure`` until :meth:`stop_failing`."""
        self._memory.fail(_check_failure(failure))

    def stop_failing(self) -> None:
        """Cancel :meth:`fail_always`, ``fail_with`` and pending :meth:`fail_next` failures."""
        self._memory.fail(None)

    # --- what was captured ----------------------------------------------------

    @property
    def events(self) -> List[WireEvent]:
        """Every event delivered so far, in order, after flushing the queue."""
        self.flush()
        return self._memory.captured()

    @property
    def batches(self) -> List[List[WireEvent]]:
        """The delivered events grouped by request, after flushing the queue."""
        self.flush()
        return self._memory.captured_batches()

    def clear(self) -> None:
        """Flush, then forget every captured event (failure settings are kept)."""
        self.flush()
        self._memory.clear()

    def reset(self) -> None:
        """Flush, forget every captured event and cancel simulated failures."""
        self.clear()
        self.stop_failing()

    def tracked(
        self, name: Optional[str] = None, *, user_id: Optional[str] = None, group_id: Optional[str] = None
    ) -> List[WireEvent]:
        """Captured track events, optionally only those matching name and ids."""
        return self._matching(self._want("track", event=name, userId=user_id, groupId=group_id))

    def identified(self, user_id: Optional[str] = None) -> List[WireEvent]:
        """Captured identify events, optionally only for ``user_id``."""
        return self._matching(self._want("identify", userId=user_id))

    def grouped(self, group_id: Optional[str] = None, *, user_id: Optional[str] = None) -> List[WireEvent]:
        """Captured group events, optionally only those matching the ids."""
        return self._matching(self._want("group", groupId=group_id, userId=user_id))

    # --- assertions ---------------------------------------------------------------

    def assert_tracked(
        self,
        name: str,
        *,
        user_id: Optional[str] = None,
        group_id: Optional[str] = None,
        properties: Optional[Mapping[str, Any]] = None,
    ) -> WireEvent:
        """Assert that a matching track event was delivered; returns the first match.

        ``properties`` must be a subset of the event's properties. Raises
        ``AssertionError`` listing what was captured and how it differs.
        """
        want = self._want("track", event=name, userId=user_id, groupId=group_id)
        if properties is not None:
            want["properties"] = _normalise(properties, "properties")
        return self._assert_one(want)

    def assert_identified(self, user_id: str, *, traits: Optional[Mapping[str, Any]] = None) -> WireEvent:
        """Assert that an identify event for ``user_id`` (with at least ``traits``) was delivered."""
        want = self._want("identify", userId=user_id)
        if traits is not None:
            want["traits"] = _normalise(traits, "traits")
        return self._assert_one(want)

    def assert_grouped(
        self,
        group_id: str,
        *,
        user_id: Optional[str] = None,
        traits: Optional[Mapping[str, Any]] = None,
    ) -> WireEvent:
        """Assert that a group event for ``group_id`` (and ``user_id``, ``traits`` if given) was delivered."""
        want = self._want("group", groupId=group_id, userId=user_id)
        if traits is not None:
            want["traits"] = _normalise(traits, "traits")
        return self._assert_one(want)

    def assert_nothing_sent(self) -> None:
        """Assert that no event was delivered (after flushing the queue)."""
        captured = self.events
        if captured:
            raise AssertionError(
                f"expected no Klime events, but {len(captured)} were sent:\n{self._listing(captured)}"
            )

    # --- internals ------------------------------------------------------------------

    @staticmethod
    def _want(kind: str, **criteria: Optional[str]) -> Dict[str, Any]:
        want: Dict[str, Any] = {"type": kind}
        want.update({k: v for k, v in criteria.items() if v is not None})
        return want

    def _matching(self, want: Dict[str, Any]) -> List[WireEvent]:
        return [ev for ev in self.events if not _differences(ev, want)]

    def _assert_one(self, want: Dict[str, Any]) -> WireEvent:
        captured = self.events
        for ev in captured:
            if not _differences(ev, want):
                return ev
        kind = want["type"]
        criteria = {k: v for k, v in want.items() if k != "type"}
        same_kind = [ev for ev in captured if ev.get("type") == kind]
        lines = [f"no {_describe_want(kind, criteria)} was sent."]
        if not captured:
            lines.append("Nothing was sent at all.")
        elif not same_kind:
            lines.append(f"No {kind} event was sent; the {len(captured)} event(s) sent were:")
            lines.append(self._listing(captured))
        else:
            lines.append(f"The {len(same_kind)} {kind} event(s) sent, and how they differ:")
            for ev in same_kind[:_MAX_LISTED]:
                lines.append(f"  - {_brief(ev)}")
                lines.extend(f"      {d}" for d in _differences(ev, criteria))
            if len(same_kind) > _MAX_LISTED:
                lines.append(f"  ... and {len(same_kind) - _MAX_LISTED} more")
        raise AssertionError("\n".join(lines))

    @staticmethod
    def _listing(events: Sequence[WireEvent]) -> str:
        lines = [f"  - {_brief(ev)}" for ev in events[:_MAX_LISTED]]
        if len(events) > _MAX_LISTED:
            lines.append(f"  ... and {len(events) - _MAX_LISTED} more")
        return "\n".join(lines)
