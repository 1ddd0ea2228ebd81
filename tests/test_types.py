"""The public types: the official SDK's klime.types (issue 12), SendError, Reason, Stats (issues 7, 11)."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from datetime import date, datetime, timezone
from typing import Any, Callable, Dict, List, get_args

import pytest

import klime
import klime.types
from klime._event import new_event
from klime.types import (
    REASONS,
    BatchResponse,
    Event,
    EventContext,
    EventType,
    LibraryInfo,
    OnError,
    Reason,
    SendError,
    Stats,
    ValidationError,
)

ALL_REASONS = {
    "permanent_error",
    "retries_exhausted",
    "queue_overflow",
    "oversize",
    "unencodable",
    "before_send_error",
    "flush_deadline",
    "shutdown_deadline",
    "not_flushed_at_exit",
    "shutdown",
}


# --- the official types ------------------------------------------------------------


def test_event_type_is_a_str_enum_of_the_three_types() -> None:
    assert [(m.name, m.value) for m in EventType] == [("TRACK", "track"), ("IDENTIFY", "identify"), ("GROUP", "group")]
    assert EventType.TRACK == "track" and isinstance(EventType.GROUP, str)  # type: ignore[comparison-overlap]
    assert EventType("identify") is EventType.IDENTIFY


def test_library_info_and_event_context_as_in_the_official_sdk() -> None:
    info = LibraryInfo(name="python-sdk", version="9.9.9")
    assert (info.name, info.version) == ("python-sdk", "9.9.9")
    assert LibraryInfo("a", "b") == LibraryInfo(name="a", version="b")
    assert EventContext().library is None
    assert EventContext(library=info).library is info


def test_official_event_to_dict_gives_the_official_output() -> None:
    props = {"button": "signup", "when": date(2026, 1, 2)}
    ev = Event(
        type=EventType.TRACK,
        messageId="test-id",
        timestamp="2025-01-01T00:00:00.000Z",
        event="Button Clicked",
        userId="user_123",
        groupId="org_1",
        properties=props,
        context=EventContext(library=LibraryInfo(name="python-sdk", version="1.0.0")),
    )
    assert ev.to_dict() == {
        "type": "track",
        "messageId": "test-id",
        "timestamp": "2025-01-01T00:00:00.000Z",
        "event": "Button Clicked",
        "userId": "user_123",
        "groupId": "org_1",
        "properties": {"button": "signup", "when": date(2026, 1, 2)},
        "context": {"library": {"name": "python-sdk", "version": "1.0.0"}},
    }
    assert type(ev.to_dict()["type"]) is str
    assert ev.type is EventType.TRACK and ev.messageId == "test-id" and ev.userId == "user_123"
    assert ev.timestamp == "2025-01-01T00:00:00.000Z"
    assert ev.context.library.version == "1.0.0"


def test_official_event_leaves_none_fields_out() -> None:
    ev = Event(type=EventType.IDENTIFY, messageId="m", timestamp="2025-01-01T00:00:00.000Z")
    assert ev.to_dict() == {"type": "identify", "messageId": "m", "timestamp": "2025-01-01T00:00:00.000Z"}
    ev2 = Event(type=EventType.GROUP, messageId="m", timestamp="t", groupId="g", traits={}, context=EventContext())
    assert ev2.to_dict() == {"type": "group", "messageId": "m", "timestamp": "t", "groupId": "g", "traits": {}}
    assert json.loads(json.dumps(ev2.to_dict()))["type"] == "group"


def test_official_event_fields_are_assignable() -> None:
    ev = Event(type="track", messageId="m", timestamp="t", event="E", userId="u")
    ev.messageId = "m2"
    ev.timestamp = "t2"
    ev.userId = "u2"
    assert ev.to_dict() == {"type": "track", "messageId": "m2", "timestamp": "t2", "event": "E", "userId": "u2"}


def test_client_events_and_official_events_share_the_class_and_attributes() -> None:
    assert klime.Event is klime.types.Event is Event
    queued = new_event("track", "E", "u", "g", {"a": 1}, None, 1_700_000_000.25)
    assert isinstance(queued, Event)
    assert queued.type == "track" == EventType.TRACK  # type: ignore[comparison-overlap]
    assert (queued.event, queued.userId, queued.groupId) == ("E", "u", "g")
    assert queued.timestamp == "2023-11-14T22:13:20.250Z"
    mid = queued.messageId
    assert len(mid) == 36 and queued.messageId == mid  # made once, then kept
    assert queued.to_dict() == {
        "type": "track",
        "messageId": mid,
        "timestamp": "2023-11-14T22:13:20.250Z",
        "event": "E",
        "userId": "u",
        "groupId": "g",
        "properties": {"a": 1},
        "context": {"library": {"name": "python-sdk", "version": klime.__version__}},
    }


def test_event_reprs_name_klime_event() -> None:
    ev = new_event("identify", None, "u1", None, None, {}, 0.0, "mid")
    assert repr(ev) == "klime.Event(type='identify', event=None, userId='u1', groupId=None, messageId='mid')"
    official = Event(type=EventType.TRACK, messageId="m", timestamp="t", event="E")
    assert repr(official).startswith("klime.Event(type='track', event='E'")


def test_events_pickle_and_copy() -> None:
    for ev in (
        new_event("track", "E", "u", None, {"a": [1]}, None, 5.0, "m1", context={"locale": "fr"}),
        Event(
            type=EventType.GROUP,
            messageId="m2",
            timestamp="t",
            groupId="g",
            context=EventContext(LibraryInfo("n", "v")),
        ),
    ):
        for clone in (pickle.loads(pickle.dumps(ev)), copy.copy(ev), copy.deepcopy(ev)):
            assert type(clone) is type(ev)
            assert clone.to_dict() == ev.to_dict()


# --- results and errors --------------------------------------------------------------


def test_results_show_klime_names_and_pickle() -> None:
    resp = BatchResponse(status="partial", accepted=1, failed=1, errors=[ValidationError(0, "bad", "invalid")])
    assert repr(resp) == (
        "klime.BatchResponse(status='partial', accepted=1, failed=1, "
        "errors=[klime.ValidationError(index=0, message='bad', code='invalid')])"
    )
    assert pickle.loads(pickle.dumps(resp)) == resp
    assert klime.BatchResponse is BatchResponse and klime.ValidationError is ValidationError
    assert BatchResponse(status="ok", accepted=10, failed=0).errors is None


def test_send_error_pickles_and_copies_with_everything() -> None:
    events = [new_event("track", "E", "u", None, {"n": 1}, None, 2.0, "m1")]
    err = SendError("Failed to send 1 event(s): HTTP 400", events, reason="permanent_error", status=400)
    for clone in (pickle.loads(pickle.dumps(err)), copy.copy(err), copy.deepcopy(err)):
        assert type(clone) is SendError
        assert clone.message == "Failed to send 1 event(s): HTTP 400"
        assert (clone.reason, clone.status) == ("permanent_error", 400)
        assert str(clone) == clone.message and clone.args == ("Failed to send 1 event(s): HTTP 400",)
        assert [ev.to_dict() for ev in clone.events] == [ev.to_dict() for ev in events]
    plain = pickle.loads(pickle.dumps(SendError("x", [])))
    assert (plain.message, plain.events, plain.reason, plain.status) == ("x", [], "retries_exhausted", None)


def test_send_error_repr_and_traceback_name() -> None:
    err = SendError("went wrong", [], reason="oversize")
    assert repr(err) == "klime.SendError('went wrong', events=<0>, reason='oversize', status=None)"
    assert f"{type(err).__module__}.{type(err).__qualname__}" == "klime.SendError"
    assert klime.SendError is SendError


def test_reason_lists_every_failure_reason() -> None:
    assert set(get_args(Reason)) == ALL_REASONS == REASONS


def test_on_error_alias_types_user_callbacks() -> None:
    assert OnError == Callable[[SendError, List[Event]], None]

    def on_error(error: SendError, events: List[Event]) -> None:
        pass

    callback: OnError = on_error
    callback(SendError("x", []), [])


# --- Stats -------------------------------------------------------------------------------


def make_stats(**changes: Any) -> Stats:
    values: Dict[str, Any] = dict(
        enqueued=10,
        delivered=6,
        rejected=1,
        filtered=1,
        failed={"oversize": 1},
        retries=3,
        in_flight=0,
        queued=1,
        last_success_at=datetime(2026, 1, 2, tzinfo=timezone.utc),
        last_failure_at=None,
    )
    values.update(changes)
    return Stats(**values)


def test_stats_is_immutable() -> None:
    stats = make_stats()
    with pytest.raises(AttributeError):
        stats.delivered = 7  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.failed["oversize"] = 2  # type: ignore[index]
    assert stats.failed == {"oversize": 1}
    assert [f.name for f in dataclasses.fields(Stats)] == [
        "enqueued", "delivered", "rejected", "filtered", "failed", "retries", "in_flight", "queued",
        "last_success_at", "last_failure_at",
    ]


def test_stats_keeps_its_own_copy_of_failed() -> None:
    failed = {"queue_overflow": 2}
    stats = make_stats(failed=failed)
    failed["queue_overflow"] = 99
    assert stats.failed == {"queue_overflow": 2}


def test_stats_repr_pickle_copy_and_equality() -> None:
    stats = make_stats()
    assert repr(stats).startswith(
        "klime.Stats(enqueued=10, delivered=6, rejected=1, filtered=1, failed={'oversize': 1}, retries=3,"
    )
    for clone in (pickle.loads(pickle.dumps(stats)), copy.copy(stats), copy.deepcopy(stats)):
        assert clone == stats and clone.failed == {"oversize": 1}
    assert stats == make_stats() and stats != make_stats(queued=0)
