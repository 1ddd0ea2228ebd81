"""The queued event, and everything about turning events into wire bytes.

The caller's thread only builds an :class:`Event` from already-validated
arguments. Message ids, timestamp strings and JSON are produced later, on the
flusher thread (or the caller of a ``*_sync`` method), because they are only
needed on the wire.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from json.encoder import encode_basestring as _quote
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from uuid import UUID

from ._version import __version__

LIBRARY_NAME = "python-sdk"
MAX_EVENT_BYTES = 200 * 1024
MAX_BODY_BYTES = 10 * 1024 * 1024

_BODY_HEAD = b'{"batch":['
_BODY_TAIL = b"]}"
# Shared by every event's wire dict; never handed to user code (see to_dict).
_CONTEXT: Dict[str, Any] = {"library": {"name": LIBRARY_NAME, "version": __version__}}


class Event:
    """One queued analytics call, as it will be sent.

    Attributes use the wire names: ``type``, ``event``, ``userId``,
    ``groupId``, ``properties``, ``traits``, ``messageId``, ``timestamp`` and
    ``context``. ``messageId`` and ``timestamp`` are produced lazily (off the
    caller's thread) unless given explicitly; once read they never change, so
    a retried event keeps its id. :meth:`to_dict` gives the exact JSON object
    that is (or would be) sent.
    """

    __slots__ = (
        "type", "event", "userId", "groupId", "properties", "traits", "_time", "_id", "_ts", "_seq",
    )

    def __init__(
        self,
        type: str,
        event: Optional[str],
        user_id: Optional[str],
        group_id: Optional[str],
        properties: Optional[Dict[str, Any]],
        traits: Optional[Dict[str, Any]],
        time_: float,
        message_id: Optional[str] = None,
        timestamp: Optional[str] = None,
    ) -> None:
        self.type = type
        self.event = event
        self.userId = user_id
        self.groupId = group_id
        self.properties = properties
        self.traits = traits
        self._time = time_
        self._id = message_id
        self._ts = timestamp
        self._seq = -1  # position in the client's queue order, set when queued

    @property
    def messageId(self) -> str:  # noqa: N802 - wire name, kept for drop-in compatibility
        """The event's UUID v4 (or the ``message_id=`` given by the caller)."""
        if self._id is None:
            self._id = new_message_ids(1)[0]
        return self._id

    @property
    def timestamp(self) -> str:
        """When the call was made: UTC, ISO 8601 with milliseconds and ``Z``."""
        if self._ts is None:
            self._ts = format_epoch(self._time)
        return self._ts

    @property
    def context(self) -> Dict[str, Any]:
        """The library context sent with every event."""
        return {"library": dict(_CONTEXT["library"])}

    def to_dict(self) -> Dict[str, Any]:
        """The event's wire form: a fresh JSON-compatible dict.

        Raises ``ValueError``/``TypeError`` if a property or trait value
        cannot be encoded (such an event is never sent).
        """
        assign_message_ids([self])
        result: Dict[str, Any] = json.loads(event_json(self))
        return result

    def __repr__(self) -> str:
        name = f" {self.event!r}" if self.event is not None else ""
        return f"<Event {self.type}{name} userId={self.userId!r} groupId={self.groupId!r} messageId={self._id!r}>"


# --- message ids -----------------------------------------------------------

_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_message_ids(n: int) -> List[str]:
    """``n`` random UUID v4 strings.

    One ``os.urandom`` call for the lot: it is fork-safe (no generator state
    to reseed in a child) and much cheaper than ``uuid.uuid4()`` per event.
    """
    raw = os.urandom(16 * n).hex()
    out = []
    for i in range(0, 32 * n, 32):
        h = raw[i : i + 32]
        out.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}")
    return out


def assign_message_ids(events: Sequence[Event]) -> None:
    """Give every event without an id one, in a single batch of randomness."""
    missing = [ev for ev in events if ev._id is None]
    if missing:
        for ev, mid in zip(missing, new_message_ids(len(missing))):
            ev._id = mid


# --- timestamps ------------------------------------------------------------

_second_cache: Tuple[int, str] = (-(2**62), "")


def format_epoch(t: float) -> str:
    """Seconds since the epoch -> ``YYYY-MM-DDTHH:MM:SS.mmmZ``.

    Events arrive in bursts within the same second, so the part up to the
    second is cached; the cache is a single tuple, so a race only costs a
    recomputation.
    """
    global _second_cache
    # Truncated to the millisecond it happened in, after rounding to whole
    # microseconds (as datetime does): t * 1000 of ...05.998 can be ...5997.9999.
    sec, us = divmod(round(t * 1_000_000), 1_000_000)
    ms = us // 1000
    cached_sec, prefix = _second_cache
    if cached_sec != sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        _second_cache = (sec, prefix)
    return f"{prefix}{ms:03d}Z"


_ISO8601 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
    r"\s*([Zz]|[+-]\d{2}(?::?\d{2})?)?"
)


def _parse_iso8601(value: str) -> datetime:
    """ISO 8601 (extended format) -> datetime, the same on every Python version.

    ``datetime.fromisoformat`` only learnt ``Z`` and arbitrary fraction
    lengths in 3.11, and backfills written on one version must run on all.
    """
    m = _ISO8601.fullmatch(value.strip())
    if m is None:
        raise ValueError(
            f"timestamp {value!r} is not an ISO 8601 date-time; "
            "pass a datetime or a string like '2026-11-22T10:04:05.123Z'"
        )
    year, month, day, hour, minute, second, frac, zone = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    tz: Optional[timezone] = None
    if zone in ("Z", "z"):
        tz = timezone.utc
    elif zone:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
        tz = timezone(sign * offset)
    try:
        return datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0), micro, tz
        )
    except ValueError as exc:
        raise ValueError(f"timestamp {value!r} is not a valid date-time: {exc}") from None


def coerce_timestamp(value: Any) -> str:
    """A caller's ``timestamp=`` (datetime or ISO 8601 string) -> wire string.

    Naive datetimes are taken as UTC. Raises ``TypeError``/``ValueError``
    with a message that says what is accepted.
    """
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        dt = _parse_iso8601(value)
    else:
        raise TypeError(
            f"timestamp must be a datetime or an ISO 8601 string, not {type(value).__name__}"
        )
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


# --- JSON ------------------------------------------------------------------


def _default(o: Any) -> Any:
    """Encode the non-JSON types SPEC 3.5 allows; anything else is an error."""
    if isinstance(o, datetime):
        if o.tzinfo is None:
            return o.isoformat() + "Z"
        return o.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(o, date):
        return o.isoformat()
    if isinstance(o, Decimal):
        if not o.is_finite():
            raise ValueError(f"Decimal {o} is not a finite number and cannot be sent as JSON")
        if o == o.to_integral_value() and abs(o) < 2**53:
            return int(o)
        return float(o)
    if isinstance(o, UUID):
        return str(o)
    if isinstance(o, Enum):
        return o.value
    if isinstance(o, (set, frozenset)):
        return list(o)
    raise TypeError(f"value of type {type(o).__name__} is not JSON serializable: {o!r:.80}")


# check_circular is off because it costs ~10% per event; a cycle then ends
# in RecursionError, which marks that one event unencodable all the same.
_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_default, check_circular=False
)


def _value_encoder() -> Callable[[Any], str]:
    """A reusable C encoder with ``_encoder``'s settings, else ``_encoder.encode``.

    ``JSONEncoder.encode`` builds a fresh C encoder on every call, about a
    third of the cost of encoding a small properties dict. This builds one,
    with the arguments ``JSONEncoder.iterencode`` passes, and only keeps it
    if it encodes a sample exactly as ``_encoder`` does; on an interpreter
    without the accelerator or with a different signature the plain method
    is used.
    """
    try:
        from json.encoder import c_make_encoder  # type: ignore[attr-defined]

        make = c_make_encoder(None, _default, _quote, None, ":", ",", False, False, False)

        def encode_value(obj: Any) -> str:
            return "".join(make(obj, 0))

        sample = {"s": "é\n\"", "n": [1, 2.5, None, True], "d": Decimal("1.5"), "t": (1,)}
        if encode_value(sample) == _encoder.encode(sample):
            try:
                encode_value({"x": float("nan")})
            except ValueError:
                return encode_value
    except Exception:  # pragma: no cover - depends on the interpreter
        pass
    return _encoder.encode  # pragma: no cover


_encode_value = _value_encoder()
_CONTEXT_TAIL = ',"context":' + _encoder.encode(_CONTEXT) + "}"


def encode(obj: Any) -> bytes:
    """Strict UTF-8 JSON (no NaN/Infinity); raises ValueError/TypeError."""
    return _encoder.encode(obj).encode("utf-8")


@dataclass
class Rejected:
    """Events that can never be sent, with the reason and what to tell the user."""

    reason: str
    message: str
    events: List[Event]


@dataclass
class Prepared:
    """The result of turning a run of events into one request body."""

    events: List[Event]
    body: bytes
    rejected: List[Rejected] = field(default_factory=list)
    rest: List[Event] = field(default_factory=list)


def event_json(ev: Event) -> bytes:
    """One event's wire JSON (its id must be assigned).

    The fixed fields are strings checked at call time or made by us, so they
    are quoted directly and the constant context is appended pre-encoded;
    only properties and traits go through the encoder. That is a third
    cheaper than encoding a dict per event, and a value that cannot be
    encoded fails for this event alone.
    """
    ts = ev._ts
    if ts is None:
        ts = ev._ts = format_epoch(ev._time)
    text = f'{{"type":"{ev.type}","messageId":{_quote(ev._id or ev.messageId)},"timestamp":"{ts}"'
    if ev.event is not None:
        text = f'{text},"event":{_quote(ev.event)}'
    if ev.userId is not None:
        text = f'{text},"userId":{_quote(ev.userId)}'
    if ev.groupId is not None:
        text = f'{text},"groupId":{_quote(ev.groupId)}'
    if ev.properties is not None:
        text = f'{text},"properties":{_encode_value(ev.properties)}'
    if ev.traits is not None:
        text = f'{text},"traits":{_encode_value(ev.traits)}'
    # UTF-8 here, per event: a lone surrogate in a string fails this event only.
    return (text + _CONTEXT_TAIL).encode("utf-8")


def prepare_batch(events: Sequence[Event], max_body: int = MAX_BODY_BYTES) -> Prepared:
    """Encode ``events`` into one request body, isolating events that cannot go.

    Each event is encoded on its own, so a bad or huge event is rejected
    alone and the body stays under ``max_body``; events that do not fit are
    returned in ``rest`` for the next request.
    """
    assign_message_ids(events)
    good: List[Event] = []
    parts: List[bytes] = []
    rejected: List[Rejected] = []
    size = len(_BODY_HEAD) + len(_BODY_TAIL)
    rest: List[Event] = []
    for i, ev in enumerate(events):
        try:
            part = event_json(ev)
        except Exception as exc:
            # Not only ValueError/TypeError/RecursionError/UnicodeEncodeError:
            # a nested dict mutated by another thread while it is encoded
            # raises RuntimeError, and a dict subclass can raise anything.
            # Escaping from here would lose the whole batch; it is this event's fault.
            rejected.append(Rejected("unencodable", f"event cannot be encoded as JSON: {exc}", [ev]))
            continue
        if len(part) > MAX_EVENT_BYTES:
            rejected.append(
                Rejected(
                    "oversize",
                    f"event is {len(part)} bytes of JSON, over the {MAX_EVENT_BYTES}-byte limit",
                    [ev],
                )
            )
            continue
        extra = len(part) + (1 if parts else 0)
        if size + extra > max_body and parts:
            rest = list(events[i:])
            break
        parts.append(part)
        good.append(ev)
        size += extra
    body = _BODY_HEAD + b",".join(parts) + _BODY_TAIL if parts else b""
    return Prepared(good, body, rejected, rest)


def copy_fields(value: Optional[Mapping[str, Any]], what: str) -> Dict[str, Any]:
    """Validate properties/traits and copy their top level (SPEC 3.5, 3.7)."""
    if value is None:
        return {}
    if type(value) is not dict and not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict (a mapping with string keys), not {type(value).__name__}")
    copy = dict(value)
    for key in copy:
        if type(key) is not str and not isinstance(key, str):
            raise TypeError(f"{what} keys must be strings; got key {key!r} of type {type(key).__name__}")
    return copy


# --- TEMPORARY shim until the "values" branch lands -------------------------------------
def new_event(
    type: str,
    event: Optional[str],
    user_id: Optional[str],
    group_id: Optional[str],
    properties: Optional[Dict[str, Any]],
    traits: Optional[Dict[str, Any]],
    time_: float,
    message_id: Optional[str] = None,
    timestamp: Optional[str] = None,
    context: Optional[Dict[str, Any]] = None,
) -> Event:
    return Event(type, event, user_id, group_id, properties, traits, time_, message_id, timestamp)


@dataclass
class Prepared2:
    events: List[Event]
    body: bytes
    parts: List[bytes] = field(default_factory=list)
    rejected: List[Rejected] = field(default_factory=list)
    rest: List[Event] = field(default_factory=list)
    filtered: List[Event] = field(default_factory=list)


class Codec:
    def __init__(self, **kw: Any) -> None:
        pass

    def prepare(self, events: Sequence[Event], max_body: int = MAX_BODY_BYTES) -> Prepared2:
        p = prepare_batch(events, max_body)
        return Prepared2(p.events, p.body, [], p.rejected, p.rest, [])
