"""The queued event, and everything about turning events into wire bytes.

The caller's thread only builds an :class:`Event` from already-validated
arguments (:func:`new_event`). Message ids, timestamp strings and JSON are
produced later by a :class:`Codec`, on a sender thread (or the caller of a
``*_sync`` method), because they are only needed on the wire
(docs/design.md, Values).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from decimal import Decimal
from enum import Enum
from json.encoder import encode_basestring as _quote
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from uuid import UUID

from ._version import __version__

if TYPE_CHECKING:
    from .types import Reason

LIBRARY_NAME = "python-sdk"
MAX_EVENT_BYTES = 200 * 1024
MAX_BODY_BYTES = 10 * 1024 * 1024

_BODY_HEAD = b'{"batch":['
_BODY_TAIL = b"]}"
_LIBRARY: Dict[str, str] = {"name": LIBRARY_NAME, "version": __version__}
_TYPES = ("track", "identify", "group")


# --- the official value types (issue 12; docs/design.md, Drop-in) -----------


class EventType(str, Enum):
    """The three kinds of event; each member equals its wire string."""

    TRACK = "track"
    IDENTIFY = "identify"
    GROUP = "group"


@dataclass
class LibraryInfo:
    """The library that produced an event (``context.library`` on the wire)."""

    name: str
    version: str


@dataclass
class EventContext:
    """An event's context, as the official SDK models it."""

    library: Optional[LibraryInfo] = None


for _cls in (EventType, LibraryInfo, EventContext):
    _cls.__module__ = "klime.types"  # where users import them from (and pickle finds them)


# --- Event -------------------------------------------------------------------


class Event:
    """One analytics call, as it is (or would be) sent.

    Attributes use the wire names: ``type``, ``event``, ``userId``,
    ``groupId``, ``properties``, ``traits``, ``messageId``, ``timestamp`` and
    ``context``. :meth:`to_dict` gives the event's JSON object.

    ``Event(type=..., messageId=..., timestamp=..., event=..., userId=...,
    groupId=..., properties=..., traits=..., context=EventContext(...))``
    builds one the way the official SDK's ``klime.types.Event`` does (for
    tests and code written against it); ``to_dict()`` then gives the same
    output as there: ``None`` fields left out, ``context.library`` as a dict.

    Events the client queues are made by :func:`new_event`: their
    ``messageId`` and ``timestamp`` are produced lazily, off the caller's
    thread, unless given explicitly; once read they never change, so a
    retried event keeps its id. Their ``context`` is the wire context
    (``{"library": {...}}`` plus the call's own ``context=``), and their
    ``to_dict()`` is the wire form itself, values encoded.
    """

    __slots__ = (
        "type", "event", "userId", "groupId", "properties", "traits", "_id", "_ts", "_seq", "_ctx",
    )

    type: str
    event: Optional[str]
    userId: Optional[str]  # noqa: N815 - wire name, kept for drop-in compatibility
    groupId: Optional[str]  # noqa: N815
    properties: Optional[Dict[str, Any]]
    traits: Optional[Dict[str, Any]]
    _id: Optional[str]
    # The wire timestamp, or until it is first needed the time.time() of the
    # call (one slot for both keeps the caller's part one store shorter).
    _ts: Union[str, float]
    _seq: int
    _ctx: Any

    def __init__(
        self,
        type: Union[EventType, str],
        messageId: Optional[str] = None,  # noqa: N803 - the official keyword names
        timestamp: Optional[str] = None,
        event: Optional[str] = None,
        userId: Optional[str] = None,  # noqa: N803
        groupId: Optional[str] = None,  # noqa: N803
        properties: Optional[Dict[str, Any]] = None,
        traits: Optional[Dict[str, Any]] = None,
        context: Any = None,
    ) -> None:
        self.type = type
        self.event = event
        self.userId = userId
        self.groupId = groupId
        self.properties = properties
        self.traits = traits
        self._id = messageId
        self._ts = time.time() if timestamp is None else timestamp
        self._seq = -1
        self._ctx = context

    @property
    def messageId(self) -> str:  # noqa: N802 - wire name
        """The event's UUID v4 (or the ``message_id=`` given by the caller)."""
        if self._id is None:
            self._id = new_message_ids(1)[0]
        return self._id

    @messageId.setter
    def messageId(self, value: str) -> None:  # noqa: N802
        self._id = value

    @property
    def timestamp(self) -> str:
        """When the call was made: UTC, ISO 8601 with milliseconds and ``Z``."""
        ts = self._ts
        if type(ts) is float:
            ts = self._ts = format_epoch(ts)
        return ts  # type: ignore[return-value]

    @timestamp.setter
    def timestamp(self, value: str) -> None:
        self._ts = value

    @property
    def context(self) -> Any:
        """The ``context`` given to the constructor (an :class:`EventContext` or ``None``)."""
        return self._ctx

    @context.setter
    def context(self, value: Any) -> None:
        self._ctx = value

    def to_dict(self) -> Dict[str, Any]:
        """The event as the official SDK's ``to_dict()`` gives it (values as given)."""
        t = self.type
        result: Dict[str, Any] = {
            "type": t.value if isinstance(t, Enum) else t,
            "messageId": self.messageId,
            "timestamp": self.timestamp,
        }
        if self.event is not None:
            result["event"] = self.event
        if self.userId is not None:
            result["userId"] = self.userId
        if self.groupId is not None:
            result["groupId"] = self.groupId
        if self.properties is not None:
            result["properties"] = self.properties
        if self.traits is not None:
            result["traits"] = self.traits
        ctx = self._ctx
        if isinstance(ctx, Mapping):
            if ctx:
                result["context"] = dict(ctx)
        elif ctx is not None:
            lib = getattr(ctx, "library", None)
            if lib is not None:
                result["context"] = {"library": {"name": lib.name, "version": lib.version}}
        return result

    def __repr__(self) -> str:
        t = self.type
        kind = t.value if isinstance(t, Enum) else t
        return (
            f"klime.Event(type={kind!r}, event={self.event!r}, userId={self.userId!r}, "
            f"groupId={self.groupId!r}, messageId={self._id!r})"
        )


Event.__module__ = "klime"  # klime.Event is klime.types.Event; reprs and pickles name it so


class _Queued(Event):
    """An event built by the client: the fast constructor and the wire view."""

    __slots__ = ()

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
        context: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.type = type
        self.event = event
        self.userId = user_id
        self.groupId = group_id
        self.properties = properties
        self.traits = traits
        self._id = message_id
        self._ts = time_ if timestamp is None else timestamp
        self._seq = -1  # position in the client's queue order, set when queued
        self._ctx = context  # the call's own context= mapping (already copied)

    @property
    def context(self) -> Any:
        """The wire context: ``library`` plus the call's own ``context=`` (a fresh dict)."""
        return _merge_context(None, self._ctx)

    @context.setter
    def context(self, value: Any) -> None:
        self._ctx = value

    def to_dict(self) -> Dict[str, Any]:
        """The event's wire form: a fresh JSON-compatible dict.

        Client-level ``default_properties``/``default_context`` and
        ``before_send`` apply when the event is sent; they are not part of
        this view. Raises ``ValueError``/``TypeError`` if a value cannot be
        encoded (such an event is never sent).
        """
        result: Dict[str, Any] = json.loads(_DEFAULT_CODEC.encode_event(self))
        return result


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
    """The client's event factory: arguments already validated and copied.

    (Documentation only: ``new_event`` is rebound to the class itself below,
    which saves a call frame on the caller's thread.)
    """
    return _Queued(type, event, user_id, group_id, properties, traits, time_, message_id, timestamp, context)


new_event = _Queued  # noqa: F811 - same signature, one frame less


def _merge_context(defaults: Optional[Mapping[str, Any]], own: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``{"library": ..., **defaults, **own}``; ``library`` is always ours (docs/design.md, Values)."""
    ctx: Dict[str, Any] = {"library": dict(_LIBRARY)}
    if defaults:
        ctx.update(defaults)
    if own:
        ctx.update(own)
    ctx["library"] = dict(_LIBRARY)
    return ctx


# --- strings ---------------------------------------------------------------------


def is_text(value: Any) -> bool:
    """A non-empty ``str``, subclasses such as ``StrEnum`` members included."""
    return isinstance(value, str) and len(value) > 0


# --- message ids -----------------------------------------------------------

# Each id's text is laid out in a row of 40 bytes (36 for the id, then 4
# newlines that split() removes). A row of 32 hex digits goes into it as
# these runs: (where in the row, where in the digits, how many).
_UUID_ROW = 40
_UUID_ROW_TEXT = b"-" * 36 + b"\n" * (_UUID_ROW - 36)
_UUID_RUNS = ((0, 0, 8), (9, 8, 4), (14, 12, 4), (20, 17, 3), (24, 20, 12))


def _uuid_plan() -> Tuple[Tuple[str, int, int], ...]:
    """The runs as column copies of the widest unit both ends are aligned to."""
    plan = []
    for dst, src, length in _UUID_RUNS:
        while length:
            for fmt in ("I", "H", "B"):
                size = struct.calcsize(fmt)
                if size <= length and dst % size == 0 and src % size == 0 and _UUID_ROW % size == 0:
                    plan.append((fmt, dst // size, src // size))
                    dst, src, length = dst + size, src + size, length - size
                    break
    return tuple(plan)


_UUID_PLAN = _uuid_plan()
_UUID_UNITS = tuple((fmt, struct.calcsize(fmt)) for fmt in sorted({fmt for fmt, _, _ in _UUID_PLAN}))
# The variant digit (the 17th) takes its top two bits from RFC 4122: 10xx.
_UUID_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")


def new_message_ids(n: int) -> List[str]:
    """``n`` random UUID v4 strings.

    One ``os.urandom`` call for the lot: it is fork-safe (no generator state
    to reseed in a child) and much cheaper than ``uuid.uuid4()`` per event.
    The texts are laid out column by column: each slice assignment places
    four (or two, or one) hex digits of every id, so the work per id is a
    few byte copies (docs/design.md, Values).
    """
    if n <= 0:
        return []
    digits = os.urandom(16 * n).hex().encode("ascii")
    text = bytearray(_UUID_ROW_TEXT * n)
    to, source = memoryview(text), memoryview(digits)
    views = {
        fmt: (to.cast(fmt), source.cast(fmt), _UUID_ROW // size, 32 // size)  # type: ignore[call-overload]
        for fmt, size in _UUID_UNITS
    }
    for fmt, at, k in _UUID_PLAN:
        dst, src, dst_step, src_step = views[fmt]
        dst[at::dst_step] = src[k::src_step]
    text[14::_UUID_ROW] = b"4" * n
    text[19::_UUID_ROW] = digits[16::32].translate(_UUID_VARIANT)
    return text.decode("ascii").split()


def assign_message_ids(events: Sequence[Event]) -> None:
    """Give every event without an id one, in a single batch of randomness."""
    missing = [ev for ev in events if ev._id is None]
    if missing:
        for ev, mid in zip(missing, new_message_ids(len(missing))):
            ev._id = mid


# --- timestamps ------------------------------------------------------------

_second_cache: Tuple[int, str] = (-(2**62), "")


def epoch_ms(t: float) -> int:
    """Seconds since the epoch -> whole milliseconds, truncated after rounding
    to whole microseconds (as datetime does): t * 1000 of ...05.998 can be ...5997.9999."""
    return round(t * 1_000_000) // 1000


def format_ms(ms: int) -> str:
    """Milliseconds since the epoch -> ``YYYY-MM-DDTHH:MM:SS.mmmZ``.

    Events arrive in bursts within the same second, so the part up to the
    second is cached; the cache is a single tuple, so a race only costs a
    recomputation.
    """
    global _second_cache
    sec, ms = divmod(ms, 1000)
    cached_sec, prefix = _second_cache
    if cached_sec != sec:
        g = time.gmtime(sec)
        # Not strftime("%Y"): it drops leading zeros before year 1000 on glibc.
        prefix = (
            f"{g.tm_year:04d}-{g.tm_mon:02d}-{g.tm_mday:02d}T{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d}."
        )
        _second_cache = (sec, prefix)
    return f"{prefix}{ms:03d}Z"


def format_epoch(t: float) -> str:
    """Seconds since the epoch -> ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    return format_ms(epoch_ms(t))


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

    Naive datetimes are taken as UTC; every year has four digits
    (``0999-...``). Raises ``TypeError``/``ValueError`` with a message that
    says what is accepted.
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
    try:
        dt = dt.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise ValueError(f"timestamp {value!r} is outside the years 1 to 9999 in UTC") from None
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}."
        f"{dt.microsecond // 1000:03d}Z"
    )


# --- values (docs/design.md, Values) -------------------------------------------

_UNKNOWN = object()
# No event can hold an integer this long; refuse before int() builds it.
_MAX_DECIMAL_DIGITS = MAX_EVENT_BYTES


def _duration(td: timedelta) -> str:
    """An ISO 8601 duration: ``PT1H30M``, ``P2DT0.5S``, ``PT0S``.

    A day is 24 hours (a ``timedelta`` has no calendar). A negative
    duration gets a leading minus, as XML Schema's ``xs:duration`` writes
    it: ``-PT1H30M``.
    """
    total = (td.days * 86400 + td.seconds) * 1_000_000 + td.microseconds
    sign = "-" if total < 0 else ""
    days, rest = divmod(abs(total), 86_400_000_000)
    hours, rest = divmod(rest, 3_600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    seconds, micros = divmod(rest, 1_000_000)
    clock = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    if micros:
        clock += f"{seconds}.{micros:06d}".rstrip("0") + "S"
    elif seconds:
        clock += f"{seconds}S"
    text = "P" + (f"{days}D" if days else "") + (f"T{clock}" if clock else "")
    return sign + (text if text != "P" else "PT0S")


def _decimal(o: Decimal) -> Union[int, float]:
    if not o.is_finite():
        raise ValueError(f"Decimal {o} is not a finite number and cannot be sent as JSON")
    if o == o.to_integral_value():
        if o.adjusted() >= _MAX_DECIMAL_DIGITS:
            raise ValueError(f"Decimal with {o.adjusted() + 1} digits is too large to send")
        return int(o)  # exact, whatever its size
    return float(o)


def _convert(o: Any) -> Any:
    """A JSON-encodable stand-in for ``o``, or ``_UNKNOWN``.

    Runs on the sending side, only for values the JSON encoder does not
    know. The encoder recurses into what this returns.
    """
    if isinstance(o, datetime):
        if o.tzinfo is None:
            return o.isoformat() + "Z"  # naive means UTC; isoformat writes 4-digit years
        return o.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(o, date):
        return o.isoformat()
    if isinstance(o, Decimal):
        return _decimal(o)
    if isinstance(o, UUID):
        return str(o)
    if isinstance(o, Enum):
        return o.value
    if isinstance(o, (set, frozenset)):
        return list(o)
    if isinstance(o, dt_time):
        return o.isoformat()  # HH:MM:SS[.ffffff], plus the offset when aware
    if isinstance(o, timedelta):
        return _duration(o)
    if is_dataclass(o) and not isinstance(o, type):
        return {f.name: getattr(o, f.name) for f in fields(o)}
    if isinstance(o, Mapping):
        return dict(o)
    for name in ("model_dump", "dict", "tolist", "item"):
        # pydantic v2, pydantic v1, numpy arrays and scalars (never imported).
        method = getattr(o, name, None)
        if callable(method):
            return method()
    return _UNKNOWN


def _safe_repr(o: Any) -> str:
    """``repr(o)`` cut to 80 characters, or a stand-in if the repr itself fails."""
    try:
        return f"{o!r:.80}"
    except BaseException:
        return f"<{type(o).__name__} object with a failing repr>"


def _describe(exc: BaseException) -> str:
    """``"TypeName: message"`` for a log line, never raising."""
    try:
        text = str(exc)
    except BaseException:
        text = ""
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _default(o: Any) -> Any:
    """The encoder's fallback without a user ``json_default``."""
    value = _convert(o)
    if value is _UNKNOWN:
        raise TypeError(f"value of type {type(o).__name__} is not JSON serializable: {_safe_repr(o)}")
    return value


def _chained(user: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def default(o: Any) -> Any:
        value = _convert(o)
        if value is _UNKNOWN:
            return user(o)  # whatever it raises makes this one event unencodable
        return value

    return default


_CHECK_CYCLES = sys.version_info < (3, 12)
_DEFAULT_RECURSION_LIMIT = 1000


def _encoder_factory(default: Callable[[Any], Any]) -> Callable[[], Callable[[Any], str]]:
    """A maker of fast value encoders (compact, UTF-8-ready, strict, cycle-checked).

    ``JSONEncoder.encode`` builds a fresh C encoder on every call, about a
    third of the cost of encoding a small properties dict. The C encoder is
    made once per batch instead (docs/design.md, Values).

    A circular value must fail as this event's error whatever the recursion
    limit. Before Python 3.12 the C encoder recurses on the C stack up to
    the recursion limit: at the default limit (1000) a cycle ends in
    ``RecursionError``, but a raised limit (``sys.setrecursionlimit(100000)``)
    lets it overflow the stack and crash the process. So there, when the
    limit is above the default, the encoder's cycle check is turned on (a
    dict of the containers being encoded; a cycle fails at once with
    ``ValueError``). It costs about 8% of encoding a typical event
    (measured: 2.17 -> 2.35 us for five properties with a list), which is
    why it is not always on; from 3.12 the interpreter bounds C recursion by
    itself. The check's dict must not be shared between threads and an
    error can leave entries behind, so each batch, and each batch after a
    failed event, gets a fresh encoder. On an interpreter without the
    accelerator the plain method is used.
    """
    plain = json.JSONEncoder(
        ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=default, check_circular=True
    )
    try:
        from json.encoder import c_make_encoder  # type: ignore[attr-defined]

        def make() -> Callable[[Any], str]:
            check = _CHECK_CYCLES and sys.getrecursionlimit() > _DEFAULT_RECURSION_LIMIT
            markers: Optional[Dict[int, Any]] = {} if check else None
            enc = c_make_encoder(markers, default, _quote, None, ":", ",", False, False, False)

            def encode_value(obj: Any) -> str:
                return "".join(enc(obj, 0))

            return encode_value

        sample = {"s": "é\n\"", "n": [1, 2.5, None, True], "d": Decimal("1.5"), "t": (1,)}
        if make()(sample) == plain.encode(sample):
            try:
                make()({"x": float("nan")})
            except ValueError:
                return make
    except Exception:  # pragma: no cover - depends on the interpreter
        pass
    return lambda: plain.encode  # pragma: no cover


_make_encoder = _encoder_factory(_default)
_CONTEXT_TAIL = ',"context":' + json.dumps({"library": _LIBRARY}, separators=(",", ":")) + "}"
_CONTEXT_TAIL_BYTES = _CONTEXT_TAIL.encode()
# The start of each event's JSON, by type; an EventType member finds its entry too.
_HEAD = {t: f'{{"type":"{t}","messageId":' for t in _TYPES}


def encode(obj: Any) -> bytes:
    """Strict UTF-8 JSON (no NaN/Infinity) of any value; raises ValueError/TypeError."""
    return _make_encoder()(obj).encode("utf-8")


# --- Codec ---------------------------------------------------------------------


@dataclass
class Rejected:
    """Events that can never be sent, with the reason and what to tell the user."""

    reason: Reason  # "unencodable", "oversize" or "before_send_error"
    message: str
    events: List[Event]


@dataclass
class Prepared:
    """The result of turning a run of events into one request body."""

    events: List[Event]  # to send; index i in the body is events[i]
    body: bytes  # b"" when events is empty
    rejected: List[Rejected] = field(default_factory=list)
    rest: List[Event] = field(default_factory=list)  # did not fit in max_body; send next
    filtered: List[Event] = field(default_factory=list)  # dropped by before_send (not failures)
    # Each sent event's JSON; None when the body was built in one piece.
    texts: Optional[List[bytes]] = field(default=None, repr=False)
    # Encoded ahead (Codec.prepare_ahead): for each event, the id the body
    # gives it if it had none, else None (strings, not pairs: no garbage
    # collector work per event).
    fresh: Optional[List[Optional[str]]] = field(default=None, repr=False)

    def adopt(self) -> bool:
        """Give the events the ids the body uses; False if one has another id by now.

        For a body encoded ahead, by the thread that has since taken its
        events (no other thread assigns their ids any more).
        """
        for ev, mid in zip(self.events, self.fresh or ()):
            if mid is None:
                continue
            if ev._id is None:
                ev._id = mid
            elif ev._id != mid:
                return False
        self.fresh = None
        return True

    @property
    def parts(self) -> List[bytes]:
        """Each sent event's JSON (for debug logging), as it is in the body.

        A body built in one piece holds only events of the plain codec,
        each ending with the same context: the body is cut after each. If
        a property value holding that context's text makes the cut
        ambiguous, each event is encoded again instead, which shows nested
        values as they are now.
        """
        if self.texts is None:
            inner = self.body[len(_BODY_HEAD) : -len(_BODY_TAIL)]
            pieces = inner.split(_CONTEXT_TAIL_BYTES + b",") if inner else []
            # A value that holds the context text can cut an event in two (a
            # piece too many) or hide a real cut (a piece that does not start
            # an event): then each event is encoded again.
            if len(pieces) == len(self.events) and all(p.startswith(b'{"type":"') for p in pieces):
                self.texts = [p + _CONTEXT_TAIL_BYTES for p in pieces[:-1]] + pieces[-1:]
            else:
                enc = _make_encoder()
                self.texts = [_plain_json(ev, enc) for ev in self.events]
        return self.texts


class _HookError(Exception):
    """before_send failed or produced something that is not a valid event."""


def _must_propagate(exc: BaseException) -> bool:
    """Whether an exception met while encoding must reach the caller.

    Everything raised by user values or hooks becomes that event's failure
    (docs/design.md, Values). The one exception: ``KeyboardInterrupt`` and
    ``SystemExit`` on the main thread, where they may be a real Ctrl-C or a
    signal handler's ``sys.exit()`` during a ``*_sync`` call; swallowing
    those would stop the process from stopping.
    """
    return isinstance(exc, (KeyboardInterrupt, SystemExit)) and threading.current_thread() is threading.main_thread()


class Codec:
    """Everything done per event off the caller's thread: ids, JSON, the hooks.

    One per client. ``json_default`` converts types nothing else knows
    (tried before an event is reported unencodable); ``default_properties``
    go under each track event's properties and ``default_context`` under
    each event's own context (the event's keys win; ``library`` is always
    ours); ``before_send`` sees each event's wire dict and returns the dict
    to send, or ``None`` to drop it (docs/design.md, Values and Hooks).
    Without any of them the fast path encodes only properties and traits.
    """

    def __init__(
        self,
        *,
        json_default: Optional[Callable[[Any], Any]] = None,
        default_properties: Optional[Mapping[str, Any]] = None,
        default_context: Optional[Mapping[str, Any]] = None,
        before_send: Optional[Callable[[Dict[str, Any]], Optional[Mapping[str, Any]]]] = None,
    ) -> None:
        for name, fn in (("json_default", json_default), ("before_send", before_send)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable or None, not {type(fn).__name__}")
        self._json_default = json_default
        self._defaults = copy_fields(default_properties, "default_properties") or None
        self._default_ctx = copy_fields(default_context, "default_context") or None
        if self._default_ctx is not None:
            self._default_ctx.pop("library", None)
        self._before_send = before_send
        self._make_encoder = _make_encoder if json_default is None else _encoder_factory(_chained(json_default))
        self._plain = before_send is None and self._defaults is None and self._default_ctx is None
        # The whole batch in one encoder call, re-encoded event by event when
        # that fails: not with the user's json_default, which must see each
        # value once.
        self._batched = self._plain and json_default is None

    def prepare_ahead(self, events: Sequence[Event]) -> Optional[Prepared]:
        """``prepare`` for events still in the queue, or None if that takes more care.

        Only the plain one-piece path, which runs no user code and changes
        no event: the body is a cache the taker of these events adopts
        (:meth:`Prepared.adopt`) or drops (docs/design.md, "Lanes").
        """
        if not self._batched:
            return None
        return _plain_batch(events, self._make_encoder(), MAX_BODY_BYTES, adopt=False)

    @property
    def runs_user_code(self) -> bool:
        """Whether encoding calls the user's hooks (``before_send``, ``json_default``).

        Without them, encoding a batch twice, or one that is then not sent, is
        unobservable; the lanes encode ahead only then (docs/design.md, "Lanes").
        """
        return not self._batched

    # --- one event -------------------------------------------------------------

    def wire_dict(self, ev: Event) -> Dict[str, Any]:
        """The event's wire object before encoding (what ``before_send`` receives).

        A fresh dict, with fresh top-level copies of properties, traits and
        context; values are as given (datetimes, Decimals, ... not yet
        converted).
        """
        if type(ev) is not _Queued:
            return ev.to_dict()
        kind = _type_name(ev.type)
        d: Dict[str, Any] = {"type": kind, "messageId": ev.messageId, "timestamp": ev.timestamp}
        if ev.event is not None:
            d["event"] = ev.event
        if ev.userId is not None:
            d["userId"] = ev.userId
        if ev.groupId is not None:
            d["groupId"] = ev.groupId
        if ev.properties is not None:
            d["properties"] = self._properties(kind, ev.properties)
        if ev.traits is not None:
            d["traits"] = dict(ev.traits)
        d["context"] = _merge_context(self._default_ctx, ev._ctx)
        return d

    def _properties(self, kind: str, props: Dict[str, Any]) -> Dict[str, Any]:
        if self._defaults is not None and kind == "track":
            return {**self._defaults, **props}
        return dict(props)

    def encode_event(self, ev: Event, enc: Optional[Callable[[Any], str]] = None) -> str:
        """One event's wire JSON text (its id is assigned here if missing)."""
        if enc is None:
            enc = self._make_encoder()
        if type(ev) is not _Queued:
            return enc(_validated(ev.to_dict()))
        head = _HEAD.get(ev.type)
        if head is None:
            raise ValueError(f"event type must be one of {', '.join(_TYPES)}, not {_safe_repr(ev.type)}")
        text = _fixed_fields(ev, head)
        props = ev.properties
        if props is not None:
            if self._defaults is not None and head is _HEAD["track"]:
                props = {**self._defaults, **props}
            text = f'{text},"properties":{enc(props)}'
        if ev.traits is not None:
            text = f'{text},"traits":{enc(ev.traits)}'
        if ev._ctx is None and self._default_ctx is None:
            return text + _CONTEXT_TAIL
        return f'{text},"context":{enc(_merge_context(self._default_ctx, ev._ctx))}}}'

    def _hooked(self, ev: Event, enc: Callable[[Any], str]) -> Optional[str]:
        """before_send's version of the event as JSON text, or None if dropped."""
        hook = self._before_send
        assert hook is not None
        wire = self.wire_dict(ev)
        try:
            out = hook(wire)
        except BaseException as exc:
            if _must_propagate(exc):
                raise
            raise _HookError(f"before_send raised {_describe(exc)}") from None
        if out is None:
            return None
        if not isinstance(out, Mapping):
            raise _HookError(f"before_send returned {type(out).__name__}, not a dict or None")
        try:
            checked = _validated(out)
        except ValueError as exc:
            raise _HookError(f"before_send returned an invalid event: {exc}") from None
        return enc(checked)

    # --- a batch ---------------------------------------------------------------

    def prepare(self, events: Sequence[Event], max_body: int = MAX_BODY_BYTES) -> Prepared:
        """Encode ``events`` into one request body, isolating events that cannot go.

        Each event is encoded on its own, so a bad or huge event is rejected
        alone (any exception its values raise, ``BaseException`` included)
        and the body stays under ``max_body``; events that do not fit are
        returned in ``rest`` for the next request (``before_send`` then runs
        on them again next time: the hook sees the original event each time).
        """
        if self._batched:
            fast = _plain_batch(events, self._make_encoder(), max_body)
            if fast is not None:
                return fast
        assign_message_ids(events)
        enc = self._make_encoder()
        hook = self._before_send
        plain = self._plain
        good: List[Event] = []
        parts: List[bytes] = []
        rejected: List[Rejected] = []
        filtered: List[Event] = []
        rest: List[Event] = []
        size = len(_BODY_HEAD) + len(_BODY_TAIL)
        for i, ev in enumerate(events):
            try:
                if plain and type(ev) is _Queued:
                    part = _plain_json(ev, enc)
                elif hook is None:
                    part = self.encode_event(ev, enc).encode("utf-8")
                else:
                    text = self._hooked(ev, enc)
                    if text is None:
                        filtered.append(ev)
                        continue
                    part = text.encode("utf-8")
            except _HookError as exc:
                rejected.append(Rejected("before_send_error", str(exc), [ev]))
                enc = self._make_encoder()
                continue
            except BaseException as exc:
                # Not only ValueError/TypeError/RecursionError/UnicodeEncodeError:
                # a nested dict mutated by another thread raises RuntimeError, a
                # dict subclass or a __repr__ can raise anything, CancelledError
                # included. Escaping from here would lose the whole batch.
                if _must_propagate(exc):
                    raise
                rejected.append(
                    Rejected("unencodable", f"event cannot be encoded as JSON: {_describe(exc)}", [ev])
                )
                enc = self._make_encoder()  # the cycle check may hold stale entries
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
        return Prepared(good, body, rejected, rest, filtered, parts)


# Keeps apart the properties of the events of a batch encoded in one call; a
# random string, so that no value can contain it by chance (and if one did,
# the count of pieces would not match and the batch takes the per-event path).
_MARK = os.urandom(16).hex()
_MARK_SEP = ',"' + _MARK + '",'
_MARK_END = ',"' + _MARK + '"]'
_K_EVENT = ',"event":'
_K_USER = ',"userId":'
_K_GROUP = ',"groupId":'


_K_PROPERTIES = ',"properties":'
_K_TRAITS = ',"traits":'
_EVENT_END = _CONTEXT_TAIL + ","
_BATCH_END = _CONTEXT_TAIL + "]}"
_BATCH_OVERHEAD = len(_BODY_HEAD) + len(_BODY_TAIL)


# The names and ids of recent events as JSON members (``,"userId":"..."``):
# the same few event names and a working set of users recur batch after
# batch. Shared by every client and lane; each holds at most _QUOTED_MAX
# entries (about; lanes may add at once) and is emptied when full
# (docs/design.md, "Values").
_NAMES: Dict[Optional[str], str] = {None: ""}
_USERS: Dict[Optional[str], str] = {None: ""}
_GROUPS: Dict[Optional[str], str] = {None: ""}
_QUOTED_MAX = 4096
_QUOTED_LONGEST = 256  # longer values are quoted each time: the caches stay small


def _quoted(cache: Dict[Optional[str], str], member: str, value: Optional[str]) -> str:
    """``member`` and ``value`` quoted (nothing for None), kept in ``cache``."""
    text = "" if value is None else member + _quote(value)
    if value is None or (type(value) is str and len(value) <= _QUOTED_LONGEST):
        if len(cache) >= _QUOTED_MAX:
            # Another lane may read meanwhile: it finds an entry or comes here.
            cache.clear()
        cache[value] = text
    return text


def _fixed_fields(ev: Event, head: str) -> str:
    """A client-built event's JSON up to its properties/traits.

    These fields are strings checked at call time or made here, so they are
    quoted directly; only free-form values go through the encoder.
    """
    ts = ev._ts
    if type(ts) is float:
        ts = ev._ts = format_epoch(ts)
    name, user, group = ev.event, ev.userId, ev.groupId
    return (
        f'{head}{_quote(ev._id or ev.messageId)},"timestamp":"{ts}"'
        f'{"" if name is None else _K_EVENT + _quote(name)}'
        f'{"" if user is None else _K_USER + _quote(user)}'
        f'{"" if group is None else _K_GROUP + _quote(group)}'
    )


def _plain_batch(
    events: Sequence[Event], enc: Callable[[Any], str], max_body: int, adopt: bool = True
) -> Optional[Prepared]:
    """``Codec.prepare`` for the common case, or None to take the per-event path.

    The common case: client-built events without a ``context=``, a codec
    without defaults or hook, every event encodable, under the size limits.
    The properties/traits of the batch are encoded in one call of the C
    encoder (a call per event costs about a fifth of the encoding), split at
    a marker, and the body is assembled around the pieces as one text and
    encoded to UTF-8 once. Any exception, or anything unusual, means the
    per-event path, which isolates the event at fault (docs/design.md,
    "Values").

    With ``adopt=False`` the events are left untouched: the fresh message
    ids the body uses are kept in ``Prepared.fresh`` for
    :meth:`Prepared.adopt`, so that events another thread may take
    meanwhile can be encoded ahead of time.
    """
    missing = 0
    items: List[Any] = []
    add = items.append
    for ev in events:
        props = ev.properties
        # Exactly one of properties/traits, as the client builds them.
        if type(ev) is not _Queued or ev._ctx is not None or (props is None) is (ev.traits is None):
            return None
        add(ev.traits if props is None else props)
        add(_MARK)
        if ev._id is None:
            missing += 1
    try:
        text = enc(items)
    except BaseException as exc:
        if _must_propagate(exc):
            raise
        return None
    pieces = text[1 : -len(_MARK_END)].split(_MARK_SEP)
    if len(pieces) != len(events) or not text.endswith(_MARK_END):
        return None
    ids = iter(new_message_ids(missing))
    fresh: Optional[List[Optional[str]]] = None if adopt else []
    out = ['{"batch":[']
    add = out.append
    # Events of a burst share their millisecond: its text is made once; names
    # and ids repeat within a batch: each is quoted once.
    last_ms: Optional[int] = None
    last_ts = ""
    names, users, groups = _NAMES, _USERS, _GROUPS
    for ev, piece in zip(events, pieces):
        ts = ev._ts
        if type(ts) is float:
            try:
                ms = round(ts * 1_000_000) // 1000  # epoch_ms(), inlined
                if ms != last_ms:
                    last_ms, last_ts = ms, format_ms(ms)
            except (OverflowError, ValueError):
                return None  # no such time (inf, nan, past year 9999): the per-event path rejects it
            ts = last_ts
            if adopt:
                ev._ts = ts
        mid = ev._id
        if mid is None:
            # A fresh id is hex and hyphens: nothing to escape.
            mid = next(ids)
            if fresh is None:
                ev._id = mid
            else:
                fresh.append(mid)
        else:
            if fresh is not None:
                fresh.append(None)
            mid = _quote(mid)[1:-1]
        name = names.get(ev.event)
        if name is None:
            name = _quoted(names, _K_EVENT, ev.event)
        user = users.get(ev.userId)
        if user is None:
            user = _quoted(users, _K_USER, ev.userId)
        group = groups.get(ev.groupId)
        if group is None:
            group = _quoted(groups, _K_GROUP, ev.groupId)
        add(
            f'{_HEAD[ev.type]}"{mid}","timestamp":"{ts}"{name}{user}{group}'
            f"{_K_TRAITS if ev.properties is None else _K_PROPERTIES}{piece}{_EVENT_END}"
        )
    out[-1] = out[-1][: -len(_EVENT_END)] + _BATCH_END
    try:
        # A lone surrogate fails here: the per-event path reports its event.
        body = "".join(out).encode()
    except UnicodeError:
        return None
    if len(body) > max_body:
        return None
    if len(body) - _BATCH_OVERHEAD > MAX_EVENT_BYTES:
        # Some event may be over the limit: event i is out[i + 1] less its
        # separator (the last one ends the batch instead).
        last = len(out) - 1
        for i in range(1, len(out)):
            tail = len(_BODY_TAIL) if i == last else 1  # ASCII
            if (len(out[i]) - tail) * 4 > MAX_EVENT_BYTES and len(out[i].encode()) - tail > MAX_EVENT_BYTES:
                return None
    return Prepared(list(events), body, fresh=fresh)


def _plain_json(ev: Event, enc: Callable[[Any], str]) -> bytes:
    """``Codec.encode_event`` for a client-built event and a codec without
    defaults or hook: the per-event path nearly every event takes."""
    text = _fixed_fields(ev, _HEAD[ev.type])
    if ev.properties is not None:
        text = f'{text},"properties":{enc(ev.properties)}'
    if ev.traits is not None:
        text = f'{text},"traits":{enc(ev.traits)}'
    if ev._ctx is None:
        # UTF-8 here, per event: a lone surrogate fails this event only.
        return (text + _CONTEXT_TAIL).encode("utf-8")
    return f'{text},"context":{enc(_merge_context(None, ev._ctx))}}}'.encode()


def _type_name(kind: Any) -> str:
    for t in _TYPES:
        if kind == t:
            return t
    raise ValueError(f"event type must be one of {', '.join(_TYPES)}, not {_safe_repr(kind)}")


_NEEDS = {"track": ("event",), "identify": ("userId",), "group": ("groupId",)}


def _validated(wire: Mapping[str, Any]) -> Dict[str, Any]:
    """A wire dict checked like any event, ``None`` values left out.

    Raises ValueError naming the first problem.
    """
    out = {k: v for k, v in wire.items() if v is not None}
    kind = _type_name(out.get("type"))
    out["type"] = kind
    for key in ("messageId", "timestamp", "event", "userId", "groupId"):
        if key in out and not is_text(out[key]):
            raise ValueError(f"{key} must be a non-empty string, not {_safe_repr(out[key])}")
    for key in ("messageId", "timestamp") + _NEEDS[kind]:
        if key not in out:
            raise ValueError(f"a {kind} event needs {key}")
    if kind == "track" and "userId" not in out and "groupId" not in out:
        raise ValueError("a track event needs userId or groupId")
    for key in ("properties", "traits", "context"):
        if key in out and not isinstance(out[key], Mapping):
            raise ValueError(f"{key} must be a mapping, not {type(out[key]).__name__}")
    return out


def event_json(ev: Event) -> bytes:
    """One event's wire JSON, as a client without options sends it."""
    assign_message_ids([ev])
    return _DEFAULT_CODEC.encode_event(ev).encode("utf-8")


def prepare_batch(events: Sequence[Event], max_body: int = MAX_BODY_BYTES) -> Prepared:
    """``Codec().prepare``: for callers that use no codec options."""
    return _DEFAULT_CODEC.prepare(events, max_body)


def copy_fields(value: Optional[Mapping[str, Any]], what: str) -> Dict[str, Any]:
    """Validate properties/traits/context and copy their top level (docs/design.md, Values).

    Keys must be strings (``str`` subclasses such as ``StrEnum`` members
    included). Nested values are not copied.
    """
    if value is None:
        return {}
    if type(value) is not dict and not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict (a mapping with string keys), not {type(value).__name__}")
    copy = dict(value)
    for key in copy:
        if type(key) is not str and not isinstance(key, str):
            raise TypeError(
                f"{what} keys must be strings; got key {_safe_repr(key)} of type {type(key).__name__}"
            )
    return copy


_DEFAULT_CODEC = Codec()
