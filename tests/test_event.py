"""The events on the wire (SPEC 1) and the values they may carry (SPEC 3.5).

Everything is read back from what a loopback server received, so these tests
check the bytes the SDK really sends, not an internal representation.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Callable, Dict, List

import pytest
from freezegun import freeze_time

import klime
from klime import Event, KlimeClient, SendError

from .conftest import Recorder
from .servers import Collector, RawServer

MakeClient = Callable[..., KlimeClient]

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
LIBRARY = {"library": {"name": "python-sdk", "version": klime.__version__}}
BASE_KEYS = {"type", "messageId", "timestamp", "context"}


def sent(client: KlimeClient, collector: Collector) -> List[Dict[str, Any]]:
    assert client.flush(timeout=5) is True
    return collector.events


def parse_utc(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text[:-1] + "+00:00")


def strict_json(raw: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"body contains {name}, which is not valid JSON")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


# --- the request --------------------------------------------------------------


def test_request_path_headers_and_body_shape(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track("Report Generated", user_id="u1")
    client.identify("u1")
    sent(client, collector)

    assert len(collector.requests) == 1
    req = collector.requests[0]
    assert req.path == "/v1/batch"
    headers = {k.lower(): v for k, v in req.headers.items()}
    assert headers["content-type"].split(";")[0].strip() == "application/json"
    assert headers["authorization"] == "Bearer test-write-key"
    ua = headers["user-agent"]
    assert "klime" in ua.lower() and klime.__version__ in ua
    assert list(req.body) == ["batch"]
    assert [e["type"] for e in req.body["batch"]] == ["track", "identify"]


def test_endpoint_with_trailing_slash_posts_to_v1_batch(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url + "/")
    client.track_sync("Report Generated", user_id="u1")
    assert [r.path for r in collector.requests] == ["/v1/batch"]


@pytest.mark.parametrize("suffix", ["/ingest", "/ingest/"])
def test_endpoint_path_prefix_is_kept(make_client: MakeClient, suffix: str) -> None:
    with RawServer() as server:
        client = make_client(server.url + suffix)
        client.track_sync("Report Generated", user_id="u1")
        client.track("Report Generated", user_id="u1")
        assert client.flush(timeout=5) is True
        reqs = server.wait_for_requests(2)
        assert [(r.method, r.path) for r in reqs] == [("POST", "/ingest/v1/batch")] * 2


def test_body_is_strict_utf8_json(make_client: MakeClient) -> None:
    with RawServer() as server:
        client = make_client(server.url)
        client.track("Café ✓", {"emoji": "😀", "text": "naïve"}, user_id="ü")
        assert client.flush(timeout=5) is True
        (req,) = server.wait_for_requests(1)
        ev = strict_json(req.body)["batch"][0]
        assert ev["event"] == "Café ✓"
        assert ev["properties"] == {"emoji": "😀", "text": "naïve"}
        assert ev["userId"] == "ü"


# --- each event type ------------------------------------------------------------


def test_track_with_user_id(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track("Button Clicked", {"button_name": "Sign up", "plan": "pro"}, user_id="user_123")
    (ev,) = sent(client, collector)
    assert set(ev) == BASE_KEYS | {"event", "userId", "properties"}
    assert ev["type"] == "track"
    assert ev["event"] == "Button Clicked"
    assert ev["userId"] == "user_123"
    assert ev["properties"] == {"button_name": "Sign up", "plan": "pro"}
    assert ev["context"] == LIBRARY


def test_track_with_group_id_only_has_no_user_id(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track("Events Received", {"count": 100, "source": "webhook"}, group_id="org_456")
    (ev,) = sent(client, collector)
    assert set(ev) == BASE_KEYS | {"event", "groupId", "properties"}
    assert ev["groupId"] == "org_456"
    assert ev["properties"] == {"count": 100, "source": "webhook"}


def test_track_with_user_and_group(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track("Report Generated", user_id="u1", group_id="g1")
    (ev,) = sent(client, collector)
    assert set(ev) == BASE_KEYS | {"event", "userId", "groupId", "properties"}
    assert (ev["userId"], ev["groupId"]) == ("u1", "g1")


def test_identify(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.identify("user_123", {"email": "stefan@example.com", "name": "Stefan"})
    (ev,) = sent(client, collector)
    assert set(ev) == BASE_KEYS | {"userId", "traits"}
    assert ev["type"] == "identify"
    assert ev["userId"] == "user_123"
    assert ev["traits"] == {"email": "stefan@example.com", "name": "Stefan"}
    assert ev["context"] == LIBRARY


def test_group_with_user(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.group("org_456", {"name": "Acme Inc", "plan": "enterprise"}, user_id="user_123")
    (ev,) = sent(client, collector)
    assert set(ev) == BASE_KEYS | {"groupId", "userId", "traits"}
    assert ev["type"] == "group"
    assert (ev["groupId"], ev["userId"]) == ("org_456", "user_123")
    assert ev["traits"] == {"name": "Acme Inc", "plan": "enterprise"}


def test_group_without_user_has_no_user_id(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.group("org_456", {"plan": "enterprise", "employee_count": 50})
    (ev,) = sent(client, collector)
    assert set(ev) == BASE_KEYS | {"groupId", "traits"}
    assert ev["traits"] == {"plan": "enterprise", "employee_count": 50}


def test_properties_and_traits_default_to_empty_objects(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track("A", user_id="u")
    client.track("B", None, user_id="u")
    client.identify("u")
    client.group("g")
    client.group("g", user_id="u")
    client.track_sync("C", group_id="g")
    client.identify_sync("u", None)
    client.group_sync("g", user_id="u")
    events = sent(client, collector)
    assert len(events) == 8
    for ev in events:
        if ev["type"] == "track":
            assert ev["properties"] == {} and "traits" not in ev
        else:
            assert ev["traits"] == {} and "properties" not in ev


def test_sync_events_have_the_same_wire_form(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track_sync("T", {"a": 1}, user_id="u", group_id="g")
    client.identify_sync("u", {"b": 2})
    client.group_sync("g", {"c": 3})
    t, i, g = collector.events
    assert set(t) == BASE_KEYS | {"event", "userId", "groupId", "properties"}
    assert set(i) == BASE_KEYS | {"userId", "traits"}
    assert set(g) == BASE_KEYS | {"groupId", "traits"}
    for ev in (t, i, g):
        assert ev["context"] == LIBRARY
        assert UUID4.match(ev["messageId"])
        assert TIMESTAMP.match(ev["timestamp"])


# --- messageId -----------------------------------------------------------------


def test_message_ids_are_lowercase_uuid4_and_unique(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url, max_batch_size=100)
    n = 600
    for i in range(n):
        if i % 3 == 0:
            client.track("E", user_id=f"u{i}")
        elif i % 3 == 1:
            client.identify(f"u{i}")
        else:
            client.group(f"g{i}")
    client.track_sync("Sync", user_id="u")
    events = sent(client, collector)
    assert len(events) == n + 1
    ids = [ev["messageId"] for ev in events]
    assert len(set(ids)) == len(ids)
    for mid in ids:
        assert UUID4.match(mid), mid
        parsed = uuid.UUID(mid)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == mid


# --- timestamp -----------------------------------------------------------------


def test_timestamp_is_utc_milliseconds_of_the_call(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    before = datetime.now(timezone.utc)
    client.track("E", user_id="u")
    client.identify("u")
    client.group("g")
    after = datetime.now(timezone.utc)
    for ev in sent(client, collector):
        assert TIMESTAMP.match(ev["timestamp"]), ev["timestamp"]
        when = parse_utc(ev["timestamp"])
        assert before - timedelta(milliseconds=1) <= when <= after


@pytest.mark.parametrize(
    "frozen, expected",
    [
        ("2026-11-22 10:04:05.123", "2026-11-22T10:04:05.123Z"),
        ("2026-11-22 10:04:05.998", "2026-11-22T10:04:05.998Z"),
        ("2026-11-22 10:04:05.000", "2026-11-22T10:04:05.000Z"),
        ("2026-12-31 23:59:59.999", "2026-12-31T23:59:59.999Z"),
        ("2026-11-22 12:04:05.250+02:00", "2026-11-22T10:04:05.250Z"),
    ],
)
def test_timestamp_under_freezegun_is_the_frozen_time(
    collector: Collector, make_client: MakeClient, frozen: str, expected: str
) -> None:
    client = make_client(collector.url)
    client.track("warm-up", user_id="u")  # the flusher thread starts outside the frozen time
    with freeze_time(frozen):
        client.track("E", user_id="u")
        client.identify("u")
        client.group("g", user_id="u")
    events = sent(client, collector)
    assert [ev["timestamp"] for ev in events[1:]] == [expected] * 3


# --- SPEC 3.5 values ------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Mode(str, enum.Enum):
    FAST = "fast"


def test_extended_values_are_encoded(collector: Collector, make_client: MakeClient) -> None:
    uid = uuid.UUID("12345678-1234-4678-9234-567812345678")
    plus2 = timezone(timedelta(hours=2))
    values: Dict[str, Any] = {
        "naive": datetime(2026, 1, 2, 3, 4, 5, 678000),
        "aware": datetime(2026, 1, 2, 5, 4, 5, tzinfo=plus2),
        "day": date(2026, 1, 2),
        "price": Decimal("12.5"),
        "count": Decimal("3"),
        "id": uid,
        "color": Color.RED,
        "level": Level.HIGH,
        "mode": Mode.FAST,
        "pair": (1, "two"),
        "tags": {"only"},
        "frozen": frozenset([7]),
        "nested": {"when": datetime(2026, 1, 2, 3, 4, 5), "list": [Color.RED, (Decimal("0.25"),)]},
        "plain": [None, True, 1.5, "s"],
    }
    client = make_client(collector.url)
    client.track("Values", values, user_id="u")
    client.identify("u", {"signed_up": date(2025, 6, 1), "plan": Color.RED})
    client.group("g", {"since": datetime(2025, 6, 1, tzinfo=timezone.utc)})
    track, ident, grp = sent(client, collector)

    p = track["properties"]
    assert parse_utc(p["naive"]) == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
    assert parse_utc(p["aware"]) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert p["day"] == "2026-01-02"
    assert p["price"] == 12.5
    assert p["count"] == 3
    assert p["id"] == "12345678-1234-4678-9234-567812345678"
    assert p["color"] == "red"
    assert p["level"] == 3
    assert p["mode"] == "fast"
    assert p["pair"] == [1, "two"]
    assert p["tags"] == ["only"]
    assert p["frozen"] == [7]
    assert parse_utc(p["nested"]["when"]) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert p["nested"]["list"] == ["red", [0.25]]
    assert p["plain"] == [None, True, 1.5, "s"]
    assert ident["traits"] == {"signed_up": "2025-06-01", "plan": "red"}
    assert parse_utc(grp["traits"]["since"]) == datetime(2025, 6, 1, tzinfo=timezone.utc)


def test_mapping_types_other_than_dict_are_accepted(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track("E", MappingProxyType({"a": 1}), user_id="u")
    client.identify("u", MappingProxyType({"b": 2}))
    events = sent(client, collector)
    assert events[0]["properties"] == {"a": 1}
    assert events[1]["traits"] == {"b": 2}


BAD_VALUES = {
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "decimal-nan": Decimal("NaN"),
    "object": object(),
    "nested-nan": {"deep": [float("nan")]},
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_unencodable_event_is_reported_alone(
    make_client: MakeClient, recorder: Recorder, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    caplog.set_level(logging.WARNING, logger="klime")
    with RawServer() as server:
        client = make_client(server.url)
        client.track("Before", user_id="u")
        client.track("Bad", {"value": BAD_VALUES[name]}, user_id="u")
        client.identify("u", {"ok": True})
        assert client.flush(timeout=5) is False

        reqs = server.wait_for_requests(1)
        delivered = [ev for r in reqs for ev in strict_json(r.body)["batch"]]
    assert [(e["type"], e.get("event")) for e in delivered] == [("track", "Before"), ("identify", None)]

    assert len(recorder.errors) == 1
    error, events = recorder.errors[0]
    assert isinstance(error, SendError) and error.reason == "unencodable"
    assert [ev.event for ev in events] == ["Bad"] == [ev.event for ev in error.events]
    assert recorder.successes and recorder.successes[0].accepted == 2
    assert any(r.levelno >= logging.WARNING and "encode" in r.getMessage() for r in caplog.records)


def test_unencodable_values_in_traits_are_reported_too(
    collector: Collector, make_client: MakeClient, recorder: Recorder
) -> None:
    client = make_client(collector.url)
    client.identify("u", {"bad": float("inf")})
    client.group("g", {"bad": {1, object()}})
    client.group("g", {"fine": 1})
    assert client.flush(timeout=5) is False
    assert [(e["type"], e["traits"]) for e in collector.events] == [("group", {"fine": 1})]
    reasons = [(err.reason, [ev.type for ev in evs]) for err, evs in recorder.errors]  # type: ignore[attr-defined]
    assert sorted(reasons) == [("unencodable", ["group"]), ("unencodable", ["identify"])]


def _event_bytes(properties: Dict[str, Any]) -> int:
    """The size of a ``track`` event's JSON with these properties, as the SDK sends it."""
    wire = {
        "type": "track",
        "messageId": str(uuid.uuid4()),
        "timestamp": "2026-11-22T10:04:05.123Z",
        "event": "Big",
        "userId": "u",
        "properties": properties,
        "context": LIBRARY,
    }
    return len(json.dumps(wire, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def test_event_over_200_kib_is_reported_alone(
    collector: Collector, make_client: MakeClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="klime")
    limit = 200 * 1024
    pad = limit - _event_bytes({"blob": ""})
    client = make_client(collector.url)
    client.track("Small", user_id="u")
    client.track("Big", {"blob": "x" * pad}, user_id="u")  # exactly at the limit: allowed
    client.track("Big", {"blob": "x" * (pad + 1)}, user_id="u")  # one byte over
    client.track("Big", {"blob": "é" * (pad // 2 + 1)}, user_id="u")  # over in UTF-8 bytes, not in characters
    client.identify("u")
    assert client.flush(timeout=5) is False

    delivered = collector.events
    assert [e.get("event", e["type"]) for e in delivered] == ["Small", "Big", "identify"]
    assert len(delivered[1]["properties"]["blob"]) == pad
    assert [err.reason for err, _ in recorder.errors] == ["oversize", "oversize"]  # type: ignore[attr-defined]
    assert [len(evs) for _, evs in recorder.errors] == [1, 1]
    assert any("204800" in r.getMessage() for r in caplog.records)


def test_sync_send_of_bad_event_raises_without_sending(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    with pytest.raises(SendError) as info:
        client.track_sync("Bad", {"v": float("nan")}, user_id="u")
    assert info.value.reason == "unencodable"  # type: ignore[attr-defined]
    assert [ev.event for ev in info.value.events] == ["Bad"]
    with pytest.raises(SendError) as info:
        client.identify_sync("u", {"blob": "x" * (200 * 1024)})
    assert info.value.reason == "oversize"  # type: ignore[attr-defined]
    assert collector.requests == []


# --- the top-level copy ----------------------------------------------------------


def test_properties_changed_after_the_call_are_not_sent(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    props: Dict[str, Any] = {"step": 0, "kind": "a"}
    for step in range(3):
        props["step"] = step
        client.track("Step", props, user_id="u")
    props["kind"] = "changed"
    props["added"] = True
    traits: Dict[str, Any] = {"name": "Jane"}
    client.identify("u", traits)
    client.group("g", traits)
    traits.clear()
    events = sent(client, collector)
    assert [e["properties"] for e in events[:3]] == [{"step": i, "kind": "a"} for i in range(3)]
    assert events[3]["traits"] == {"name": "Jane"}
    assert events[4]["traits"] == {"name": "Jane"}


# --- Event -----------------------------------------------------------------------


def test_event_to_dict_is_the_wire_form(collector: Collector, make_client: MakeClient, recorder: Recorder) -> None:
    collector.respond(400, {"error": "bad request"})
    client = make_client(collector.url)
    client.track("Report Generated", {"when": date(2026, 1, 2), "n": 1}, user_id="u1", group_id="g1")
    assert client.flush(timeout=5) is False
    (received,) = collector.events
    ((_, (ev,)),) = recorder.errors
    assert isinstance(ev, Event)
    assert ev.to_dict() == received
    assert ev.type == "track" and ev.event == "Report Generated"
    assert ev.userId == "u1" and ev.groupId == "g1"
    assert ev.messageId == received["messageId"]
    assert ev.timestamp == received["timestamp"]
    assert ev.context == LIBRARY
    assert ev.properties == {"when": date(2026, 1, 2), "n": 1}

    # to_dict() hands out a copy: changing it changes nothing that is sent later.
    d = ev.to_dict()
    d["context"]["library"]["name"] = "tampered"
    d["properties"]["n"] = 99
    ev.context["library"]["version"] = "tampered"
    assert ev.to_dict() == received
    client.identify("u1")
    assert client.flush(timeout=5) is True
    assert collector.events[-1]["context"] == LIBRARY


def test_sync_error_events_to_dict(collector: Collector, make_client: MakeClient) -> None:
    collector.respond(422, {"error": "nope"})
    client = make_client(collector.url)
    with pytest.raises(SendError) as info:
        client.group_sync("g1", {"plan": "pro"}, user_id="u1")
    (ev,) = info.value.events
    assert ev.to_dict() == collector.events[0]
    assert set(ev.to_dict()) == BASE_KEYS | {"groupId", "userId", "traits"}
