"""The events on the wire and the values they may carry (docs/design.md, "Values").

Everything is read back from what a loopback server received, so these tests
check the bytes the SDK really sends, not an internal representation.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import json
import logging
import re
import subprocess
import sys
import threading
import uuid
from collections import namedtuple
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, List, Optional

import pytest
from freezegun import freeze_time

import klime
from klime import Event, KlimeClient, SendError
from klime._event import Codec, Prepared, coerce_timestamp, copy_fields, format_epoch, new_event

from .conftest import MakeClient, Recorder
from .servers import Collector, RawServer

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


# --- values (docs/design.md, Values) ------------------------------------------------------------


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


# --- values, exactly (issue 7: defects 5, 6, 10, 12) -------------------------------

SRC = str(Path(klime.__file__).resolve().parent.parent)


def raw_text(req: Any) -> str:
    return bytes(req.body).decode("utf-8")


def test_integral_decimals_of_any_size_are_exact_integers(make_client: MakeClient) -> None:
    with RawServer() as server:
        client = make_client(server.url)
        client.track(
            "Money",
            {
                "big": Decimal("12345678901234567890"),
                "neg": Decimal("-98765432109876543210987654321"),
                "exp": Decimal("1E+30"),
                "trailing": Decimal("42.000"),
                "small": Decimal("7"),
                "frac": Decimal("12.50"),
            },
            user_id="u",
        )
        assert client.flush(timeout=5) is True
        (req,) = server.wait_for_requests(1)
    text = raw_text(req)
    assert '"big":12345678901234567890,' in text
    assert '"neg":-98765432109876543210987654321,' in text
    assert '"exp":1000000000000000000000000000000,' in text
    assert '"trailing":42,' in text and '"small":7,' in text
    props = strict_json(req.body)["batch"][0]["properties"]
    assert props["big"] == 12345678901234567890
    assert props["neg"] == -98765432109876543210987654321
    assert props["frac"] == 12.5


def test_timestamps_and_datetimes_of_any_year_have_four_digits(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track(
        "Old",
        {"when": datetime(999, 1, 2, 3, 4, 5), "day": date(5, 6, 7), "aware": datetime(50, 1, 1, tzinfo=timezone.utc)},
        user_id="u",
        timestamp=datetime(999, 1, 2, 3, 4, 5, 678000),
    )
    client.identify("u", timestamp="0042-03-04T05:06:07.890Z")
    track, ident = sent(client, collector)
    assert track["timestamp"] == "0999-01-02T03:04:05.678Z"
    assert track["properties"] == {
        "when": "0999-01-02T03:04:05Z",
        "day": "0005-06-07",
        "aware": "0050-01-01T00:00:00Z",
    }
    assert ident["timestamp"] == "0042-03-04T05:06:07.890Z"


def test_coerce_timestamp_and_format_epoch_pad_the_year() -> None:
    assert coerce_timestamp(datetime(1, 1, 1)) == "0001-01-01T00:00:00.000Z"
    assert coerce_timestamp("0999-12-31T23:59:59.999+00:00") == "0999-12-31T23:59:59.999Z"
    when = datetime(999, 5, 6, 7, 8, 9, 250000, tzinfo=timezone.utc)
    assert format_epoch(when.timestamp()) == "0999-05-06T07:08:09.250Z"
    with pytest.raises(ValueError, match="years 1 to 9999"):
        coerce_timestamp(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=2))))


CYCLE_SCRIPT = r"""
import json, sys, threading
sys.setrecursionlimit(100000)
from klime._event import Codec, new_event
from klime import testing  # noqa: F401  (the whole package imports)

def run(results):
    loop_dict = {"name": "a"}
    loop_dict["self"] = loop_dict
    loop_list = [1]
    loop_list.append([loop_list])
    evs = [
        new_event("track", "ok-1", "u", None, {"i": 1}, None, 1.0),
        new_event("track", "dict", "u", None, {"v": loop_dict}, None, 1.0),
        new_event("identify", None, "u", None, None, {"v": loop_list}, 1.0),
        new_event("track", "ok-2", "u", None, {"i": 2}, None, 1.0),
    ]
    prep = Codec().prepare(evs)
    results.append({
        "sent": [e["event"] for e in json.loads(prep.body)["batch"]],
        "rejected": [(r.reason, [ev.event or ev.type for ev in r.events]) for r in prep.rejected],
    })

results = []
run(results)
t = threading.Thread(target=run, args=(results,))
t.start(); t.join()
print(json.dumps(results))
"""


def test_circular_value_is_unencodable_whatever_the_recursion_limit() -> None:
    # In a child process: before the fix this crashed the interpreter (SIGSEGV).
    proc = subprocess.run(
        [sys.executable, "-c", CYCLE_SCRIPT],
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = {"sent": ["ok-1", "ok-2"], "rejected": [["unencodable", ["dict"]], ["unencodable", ["identify"]]]}
    assert json.loads(proc.stdout) == [expected, expected]


def test_circular_value_through_the_client_is_reported_alone(
    collector: Collector, make_client: MakeClient, recorder: Recorder
) -> None:
    loop: Dict[str, Any] = {}
    loop["loop"] = [loop]
    client = make_client(collector.url)
    client.track("Bad", {"v": loop}, user_id="u")
    client.track("Good", user_id="u")
    assert client.flush(timeout=5) is False
    assert [e["event"] for e in collector.events] == ["Good"]
    assert [(err.reason, [ev.event for ev in evs]) for err, evs in recorder.errors] == [  # type: ignore[attr-defined]
        ("unencodable", ["Bad"])
    ]


class Plan(str, enum.Enum):
    PRO = "pro"
    FREE = "free"


def test_str_subclass_keys_are_accepted_and_sent_as_their_text(collector: Collector, make_client: MakeClient) -> None:
    props = copy_fields({Plan.PRO: 1, "n": Plan.FREE}, "properties")
    assert list(props) == ["pro", "n"]
    client = make_client(collector.url)
    client.track("E", {Plan.PRO: True}, user_id="u")
    client.identify("u", {Plan.FREE: "x"})
    track, ident = sent(client, collector)
    assert track["properties"] == {"pro": True}
    assert ident["traits"] == {"free": "x"}


def test_str_subclass_names_and_ids_are_encoded_as_their_text() -> None:
    class Name(str):
        pass

    ev = new_event("track", Plan.PRO, Name("u1"), Plan.FREE, {}, None, 0.0, Name("mid-1"))
    prep = Codec().prepare([ev])
    (wire,) = json.loads(prep.body)["batch"]
    assert (wire["event"], wire["userId"], wire["groupId"], wire["messageId"]) == ("pro", "u1", "free", "mid-1")


class ReprRaises:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __repr__(self) -> str:
        raise self.exc


def test_value_whose_repr_raises_cancelled_error_does_not_stop_the_flusher(
    collector: Collector, make_client: MakeClient, recorder: Recorder
) -> None:
    client = make_client(collector.url)
    client.track("Bad", {"v": ReprRaises(asyncio.CancelledError())}, user_id="u")
    client.track("Good", user_id="u")
    assert client.flush(timeout=5) is False
    client.track("After", user_id="u")
    assert client.flush(timeout=5) is True
    assert [e["event"] for e in collector.events] == ["Good", "After"]
    ((error, events),) = recorder.errors
    assert error.reason == "unencodable"  # type: ignore[attr-defined]
    assert [ev.event for ev in events] == ["Bad"]
    assert "ReprRaises" in error.message  # type: ignore[attr-defined]


class Exploding(dict):  # type: ignore[type-arg]
    """A mapping whose encoding raises a BaseException."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(a=1)
        self.exc = exc

    def items(self) -> Any:
        raise self.exc


@pytest.mark.parametrize(
    "exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(3), GeneratorExit()], ids=type
)
def test_any_base_exception_from_a_value_rejects_that_event_off_the_main_thread(exc: BaseException) -> None:
    class Odd:
        def __init__(self) -> None:
            self.exc = exc

    def bad_default(o: Any) -> Any:
        raise exc

    events = [
        new_event("track", "A", "u", None, {"v": Exploding(exc)}, None, 1.0),
        new_event("track", "B", "u", None, {"v": Odd()}, None, 1.0),
        new_event("track", "C", "u", None, {"v": ReprRaises(exc)}, None, 1.0),
        new_event("track", "D", "u", None, {"i": 1}, None, 1.0),
    ]
    out: List[Prepared] = []
    t = threading.Thread(target=lambda: out.append(Codec(json_default=bad_default).prepare(events)))
    t.start()
    t.join()
    (prep,) = out
    assert [ev.event for ev in prep.events] == ["D"]
    assert [(r.reason, r.events[0].event) for r in prep.rejected] == [
        ("unencodable", "A"),
        ("unencodable", "B"),
        ("unencodable", "C"),
    ]
    assert all(type(exc).__name__ in r.message for r in prep.rejected)


def test_keyboard_interrupt_while_encoding_on_the_main_thread_propagates() -> None:
    # On the main thread (a *_sync call) it may be a real Ctrl-C: never swallowed.
    ev = new_event("track", "A", "u", None, {"v": Exploding(KeyboardInterrupt())}, None, 1.0)
    with pytest.raises(KeyboardInterrupt):
        Codec().prepare([ev])
    prep = Codec().prepare([new_event("track", "A", "u", None, {"v": Exploding(asyncio.CancelledError())}, None, 1.0)])
    assert [r.reason for r in prep.rejected] == ["unencodable"]


# --- more value types (issue 11, item 6) ----------------------------------------------


@dataclass
class Address:
    city: str
    since: date


@dataclass
class Customer:
    name: str
    address: Address
    tags: List[str]


class PydanticV2Like:
    def model_dump(self) -> Dict[str, Any]:
        return {"plan": "pro", "seats": Decimal("5")}


class PydanticV1Like:
    def dict(self) -> Dict[str, Any]:
        return {"plan": "free"}


class NumpyScalarLike:
    """Duck-typed like numpy.int64: .item() gives the Python scalar."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def item(self) -> Any:
        return self.value


class NumpyArrayLike:
    def __init__(self, rows: List[List[float]]) -> None:
        self.rows = rows

    def tolist(self) -> List[List[float]]:
        return self.rows

    def item(self) -> Any:
        raise ValueError("can only convert an array of size 1 to a Python scalar")


Point = namedtuple("Point", "x y")


def test_more_value_types_are_converted_on_the_sending_side(collector: Collector, make_client: MakeClient) -> None:
    values: Dict[str, Any] = {
        "customer": Customer("Ann", Address("Oslo", date(2020, 1, 2)), ["a"]),
        "v2": PydanticV2Like(),
        "v1": PydanticV1Like(),
        "int64": NumpyScalarLike(7),
        "float32": NumpyScalarLike(0.5),
        "matrix": NumpyArrayLike([[1.0, 2.0], [3.0, 4.5]]),
        "point": Point(1, 2),
        "at": dt_time(9, 30),
        "at_us": dt_time(9, 30, 5, 250),
        "view": MappingProxyType({"nested": {"ok": True}}),
    }
    client = make_client(collector.url)
    client.track("Values", values, user_id="u")
    (ev,) = sent(client, collector)
    assert ev["properties"] == {
        "customer": {"name": "Ann", "address": {"city": "Oslo", "since": "2020-01-02"}, "tags": ["a"]},
        "v2": {"plan": "pro", "seats": 5},
        "v1": {"plan": "free"},
        "int64": 7,
        "float32": 0.5,
        "matrix": [[1.0, 2.0], [3.0, 4.5]],
        "point": [1, 2],
        "at": "09:30:00",
        "at_us": "09:30:05.000250",
        "view": {"nested": {"ok": True}},
    }


@pytest.mark.parametrize(
    "delta, text",
    [
        (timedelta(hours=1, minutes=30), "PT1H30M"),
        (timedelta(days=2, seconds=0.5), "P2DT0.5S"),
        (timedelta(days=1), "P1D"),
        (timedelta(0), "PT0S"),
        (timedelta(seconds=59, microseconds=1), "PT59.000001S"),
        (timedelta(days=3, hours=4, minutes=5, seconds=6), "P3DT4H5M6S"),
        (timedelta(minutes=-90), "-PT1H30M"),
        (timedelta(microseconds=-1), "-PT0.000001S"),
        (timedelta.min, "-P999999999D"),
    ],
)
def test_timedelta_is_an_iso_8601_duration(delta: timedelta, text: str) -> None:
    ev = new_event("track", "E", "u", None, {"d": delta}, None, 0.0, "m")
    prep = Codec().prepare([ev])
    assert json.loads(prep.body)["batch"][0]["properties"] == {"d": text}


def test_json_default_is_tried_before_unencodable_and_its_failure_rejects_one_event() -> None:
    class Money:
        def __init__(self, cents: int) -> None:
            self.cents = cents

    class Secret:
        pass

    seen: List[Any] = []

    def fallback(o: Any) -> Any:
        seen.append(type(o).__name__)
        if isinstance(o, Money):
            return {"cents": o.cents}
        raise TypeError(f"no idea how to send {type(o).__name__}")

    codec = Codec(json_default=fallback)
    events = [
        new_event("track", "Paid", "u", None, {"m": Money(250), "day": date(2026, 1, 2)}, None, 0.0),
        new_event("track", "Leak", "u", None, {"s": Secret()}, None, 0.0),
        new_event("identify", None, "u", None, None, {"m": [Money(1)]}, 0.0),
    ]
    prep = codec.prepare(events)
    batch = json.loads(prep.body)["batch"]
    assert [(e["type"], e.get("properties", e.get("traits"))) for e in batch] == [
        ("track", {"m": {"cents": 250}, "day": "2026-01-02"}),
        ("identify", {"m": [{"cents": 1}]}),
    ]
    assert [(r.reason, r.events[0].event) for r in prep.rejected] == [("unencodable", "Leak")]
    assert "no idea how to send Secret" in prep.rejected[0].message
    assert seen == ["Money", "Secret", "Money"]  # never asked about types the SDK knows
    # Without json_default the same value is unencodable.
    (rej,) = Codec().prepare(events[:1]).rejected
    assert rej.reason == "unencodable" and "Money" in rej.message


# --- Codec options (issue 11, items 1 and 2) --------------------------------------------

LIB = {"name": "python-sdk", "version": klime.__version__}


def batch_of(prep: Prepared) -> List[Dict[str, Any]]:
    return list(json.loads(prep.body)["batch"]) if prep.body else []


def test_fast_path_output_is_exact() -> None:
    ev = new_event("track", "Signed Up", "u1", "g1", {"plan": "pro", "n": 2}, None, 0.0, "mid-1")
    prep = Codec().prepare([ev])
    expected = (
        '{"type":"track","messageId":"mid-1","timestamp":"1970-01-01T00:00:00.000Z","event":"Signed Up",'
        '"userId":"u1","groupId":"g1","properties":{"plan":"pro","n":2},"context":{"library":{"name":"python-sdk",'
        f'"version":"{klime.__version__}"}}}}}}'
    )
    assert prep.parts == [expected.encode()]
    assert prep.body == b'{"batch":[' + expected.encode() + b"]}"
    assert (prep.events, prep.rejected, prep.rest, prep.filtered) == ([ev], [], [], [])


def test_default_properties_and_contexts_are_merged_under_the_calls() -> None:
    codec = Codec(
        default_properties={"app": "web", "plan": "free"},
        default_context={"locale": "en-GB", "timezone": "UTC", "library": "ignored"},
    )
    events = [
        new_event("track", "A", "u", None, {"plan": "pro"}, None, 0.0, context={"locale": "de-DE"}),
        new_event("identify", None, "u", None, None, {"plan": "x"}, 0.0),
        new_event("group", None, None, "g", None, {}, 0.0, context={"library": {"name": "evil"}, "ip": "1.2.3.4"}),
    ]
    track, ident, grp = batch_of(codec.prepare(events))
    assert track["properties"] == {"app": "web", "plan": "pro"}
    assert track["context"] == {"library": LIB, "locale": "de-DE", "timezone": "UTC"}
    assert ident["traits"] == {"plan": "x"}  # default_properties apply to track only
    assert ident["context"] == {"library": LIB, "locale": "en-GB", "timezone": "UTC"}
    assert grp["context"] == {"library": LIB, "locale": "en-GB", "timezone": "UTC", "ip": "1.2.3.4"}
    # The event itself is unchanged (the merge happens on the wire only).
    assert events[0].properties == {"plan": "pro"}


def test_the_calls_own_context_goes_beside_library_without_options() -> None:
    ev = new_event("track", "A", "u", None, {}, None, 0.0, context={"userAgent": "Mozilla", "library": "x"})
    (wire,) = batch_of(Codec().prepare([ev]))
    assert wire["context"] == {"library": LIB, "userAgent": "Mozilla"}
    assert ev.context == {"library": LIB, "userAgent": "Mozilla"}
    assert ev.to_dict() == wire


def test_before_send_changes_drops_and_sees_the_wire_dict() -> None:
    seen: List[Dict[str, Any]] = []

    def hook(wire: Dict[str, Any]) -> Any:
        seen.append(copy.deepcopy(wire))
        if wire.get("event") == "Drop":
            return None
        wire.get("properties", {}).pop("email", None)
        wire["properties"] = {**wire.get("properties", {}), "hooked": True} if wire["type"] == "track" else None
        return wire

    codec = Codec(before_send=hook, default_properties={"app": "web"})
    events = [
        new_event("track", "Keep", "u", None, {"email": "a@b.c", "when": date(2026, 1, 2)}, None, 0.0, "m1"),
        new_event("track", "Drop", "u", None, {}, None, 0.0, "m2"),
        new_event("identify", None, "u", None, None, {"email": "a@b.c"}, 0.0, "m3"),
    ]
    prep = codec.prepare(events)
    assert [ev.event or ev.type for ev in prep.events] == ["Keep", "identify"]
    assert [ev.event for ev in prep.filtered] == ["Drop"]
    assert prep.rejected == []
    keep, ident = batch_of(prep)
    assert keep["properties"] == {"app": "web", "when": "2026-01-02", "hooked": True}
    assert "properties" not in ident and ident["traits"] == {"email": "a@b.c"}
    assert seen[0] == {
        "type": "track",
        "messageId": "m1",
        "timestamp": "1970-01-01T00:00:00.000Z",
        "event": "Keep",
        "userId": "u",
        "properties": {"app": "web", "email": "a@b.c", "when": date(2026, 1, 2)},
        "context": {"library": LIB},
    }
    assert events[0].properties == {"email": "a@b.c", "when": date(2026, 1, 2)}  # the hook got copies


@pytest.mark.parametrize(
    "result, reason, words",
    [
        (RuntimeError("boom"), "before_send_error", "before_send raised RuntimeError: boom"),
        (asyncio.CancelledError(), "before_send_error", "before_send raised CancelledError"),
        ("not a dict", "before_send_error", "returned str"),
        ({"type": "track", "event": "E", "userId": 5}, "before_send_error", "userId must be a non-empty string"),
        ({"type": "page", "event": "E", "userId": "u"}, "before_send_error", "event type must be one of"),
        ({"type": "track", "event": "E"}, "before_send_error", "needs userId or groupId"),
        ({"type": "identify", "groupId": "g"}, "before_send_error", "needs userId"),
        ({"type": "track", "event": "E", "userId": "u", "properties": {"x": float("nan")}}, "unencodable", "JSON"),
        ({"type": "track", "event": "E", "userId": "u", "properties": {"x": "y" * 300_000}}, "oversize", "204800"),
    ],
)
def test_before_send_failures_reject_that_event_only(result: Any, reason: str, words: str) -> None:
    def hook(wire: Dict[str, Any]) -> Any:
        if wire.get("event") != "Target":
            return wire
        if isinstance(result, BaseException):
            raise result
        if isinstance(result, dict):
            return {"messageId": wire["messageId"], "timestamp": wire["timestamp"], **result}
        return result

    events = [
        new_event("track", "Before", "u", None, {}, None, 0.0, "m0"),
        new_event("track", "Target", "u", None, {}, None, 0.0, "m1"),
        new_event("track", "After", "u", None, {}, None, 0.0, "m2"),
    ]
    out: List[Prepared] = []
    t = threading.Thread(target=lambda: out.append(Codec(before_send=hook).prepare(events)))
    t.start()
    t.join()
    (prep,) = out
    assert [e["event"] for e in batch_of(prep)] == ["Before", "After"]
    assert [(r.reason, [ev.event for ev in r.events]) for r in prep.rejected] == [(reason, ["Target"])]
    assert words in prep.rejected[0].message
    assert prep.filtered == []


def test_before_send_output_keeps_none_fields_out() -> None:
    def hook(wire: Dict[str, Any]) -> Dict[str, Any]:
        return {**wire, "groupId": None}

    ev = new_event("track", "E", "u", "g", {}, None, 0.0, "m")
    (wire,) = batch_of(Codec(before_send=hook).prepare([ev]))
    assert "groupId" not in wire and wire["userId"] == "u"


def test_codec_rejects_bad_options() -> None:
    with pytest.raises(TypeError, match="before_send must be a callable"):
        Codec(before_send="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="json_default must be a callable"):
        Codec(json_default=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="default_properties keys must be strings"):
        Codec(default_properties={1: "x"})  # type: ignore[dict-item]


def test_rest_holds_what_does_not_fit_in_max_body() -> None:
    events = [new_event("track", "E", "u", None, {"pad": "x" * 1000}, None, 0.0, f"m{i}") for i in range(5)]
    prep = Codec().prepare(events, max_body=2500)
    assert [ev.messageId for ev in prep.events] == ["m0", "m1"]
    assert [ev.messageId for ev in prep.rest] == ["m2", "m3", "m4"]
    assert len(prep.body) <= 2500


# --- a batch built in one piece -------------------------------------------------


def test_new_message_ids_are_distinct_random_uuid4_texts() -> None:
    from klime._event import new_message_ids

    assert new_message_ids(0) == []
    for n in (1, 2, 37, 1000):
        ids = new_message_ids(n)
        assert len(ids) == n and len(set(ids)) == n
        for mid in ids:
            parsed = uuid.UUID(mid)
            assert str(parsed) == mid and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # Every random digit varies from id to id, the variant digit over all four values.
    ids = new_message_ids(1000)
    for column in range(36):
        seen = {mid[column] for mid in ids}
        if column in (8, 13, 18, 23):
            assert seen == {"-"}
        elif column == 14:
            assert seen == {"4"}
        elif column == 19:
            assert seen == set("89ab")
        else:
            assert len(seen) >= 12, (column, seen)


def _mixed_events() -> List[Any]:
    # Times around millisecond and second boundaries, before 1970 and far
    # ahead; text needing escapes and outside ASCII; given and missing ids.
    times = [0.0, 0.0004, 0.0005, 0.0009999, 0.001, 59.9995, 59.9999996, 60.0, -0.0005]
    times += [1.7e9 + 0.123456, 253402300799.999]
    events = []
    for i, t in enumerate(times):
        props = {"i": i, "text": 'quote " back \\ nl \n é 😀', "n": [1.5, None, True], "d": {"k": "v"}}
        mid = None if i % 3 else f'given-{i}-"x"'
        events.append(new_event("track", f"Name {i} é\t", f"user\u2028{i}", None, props, None, t, mid))
        events.append(new_event("identify", None, f"u{i}", None, None, {"plan": "pro", "i": i}, t))
        events.append(new_event("group", None, None if i % 2 else "u", f"g{i}", None, {}, t))
        events.append(new_event("track", "Only Group", None, f"g{i}", {}, None, t))
    return events


def test_a_batch_in_one_piece_is_the_same_as_event_by_event() -> None:
    fast_events, slow_events = _mixed_events(), _mixed_events()
    # Given the same ids, both paths must write the same bytes.
    for a, b in zip(fast_events, slow_events):
        b.messageId = a.messageId
    fast = Codec().prepare(fast_events)
    slow = Codec(json_default=str).prepare(slow_events)  # json_default: the per-event path
    assert fast.texts is None and slow.texts is not None  # the paths compared are the two paths
    assert fast.body == slow.body
    assert fast.parts == slow.parts
    assert (fast.events, fast.rejected, fast.rest, fast.filtered) == (fast_events, [], [], [])
    wire = json.loads(fast.body)["batch"]
    assert [e["messageId"] for e in wire] == [ev.messageId for ev in fast_events]
    assert wire[0]["messageId"] == 'given-0-"x"' and UUID4.match(wire[4]["messageId"])


def test_quoted_names_and_ids_kept_across_batches_stay_bounded_and_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    from klime import _event

    monkeypatch.setattr(_event, "_QUOTED_MAX", 5)
    for cache in (_event._NAMES, _event._USERS, _event._GROUPS):
        cache.clear()  # None's entry too: the first lookup of None adds it back
    for round_ in range(4):
        fast_events = _mixed_events()
        fast_events += [new_event("track", f"E{k % 7}", f"user {k}", None, {"k": k}, None, 1.7e9) for k in range(40)]
        slow_events = list(fast_events)
        fast = Codec().prepare(fast_events)
        assert fast.texts is None
        wire = json.loads(fast.body)["batch"]
        for ev, sent in zip(slow_events, wire):
            assert sent.get("event") == ev.event and sent.get("userId") == ev.userId
            assert sent.get("groupId") == ev.groupId, round_
        for cache in (_event._NAMES, _event._USERS, _event._GROUPS):
            assert len(cache) <= 5


def test_quoted_cache_keeps_only_plain_strings() -> None:
    from klime import _event

    class Loose(str):
        def __eq__(self, other: object) -> bool:
            return isinstance(other, str) and str.lower(self) == str.lower(other)

        __hash__ = str.__hash__

    assert _event._quoted({}, ',"userId":', Loose("AbC")) == ',"userId":"AbC"'
    cache: Dict[Optional[str], str] = {}
    _event._quoted(cache, ',"userId":', Loose("AbC"))
    _event._quoted(cache, ',"userId":', None)
    assert cache == {None: ""}
    # A long id is quoted each time rather than kept: the caches stay small.
    long_id = "u" * (_event._QUOTED_LONGEST + 1)
    assert _event._quoted(cache, ',"userId":', long_id) == ',"userId":"' + long_id + '"'
    assert _event._quoted(cache, ',"userId":', long_id[:-1]) == ',"userId":"' + long_id[:-1] + '"'
    assert set(cache) == {None, long_id[:-1]}


def test_one_piece_timestamps_are_each_events_own_millisecond() -> None:
    # The first time falls in millisecond -1 (the last of 1969), which must not
    # be mistaken for "no millisecond yet".
    times = [-0.0005, -0.0009, 0.0] + [1.7e9 + k * 0.0001 for k in range(50)] + [59.9999996, 60.0004, -0.0005]
    events = [new_event("track", "E", "u", None, {}, None, t) for t in times]
    wire = json.loads(Codec().prepare(events).body)["batch"]
    for t, sent_ev in zip(times, wire):
        micros = round(t * 1_000_000)
        expected = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=micros - micros % 1000)
        assert parse_utc(sent_ev["timestamp"]) == expected, (t, sent_ev["timestamp"])


def test_a_batch_over_the_event_limit_in_total_goes_out_whole() -> None:
    events = [new_event("track", "E", "u", None, {"pad": "é" * 1500}, None, 0.0) for _ in range(100)]
    prep = Codec().prepare(events)
    assert len(prep.body) > 200 * 1024
    assert prep.events == events and prep.rejected == [] and prep.rest == []
    assert [e["properties"]["pad"] for e in json.loads(prep.body)["batch"]] == ["é" * 1500] * 100


@pytest.mark.parametrize("char, extra, over", [("😀", 0, False), ("😀", 1, True), ("x", 1, True)])
def test_an_event_over_the_limit_in_a_batch_is_rejected_alone(char: str, extra: int, over: bool) -> None:
    limit = 200 * 1024
    base = len(Codec().prepare([new_event("track", "Big", "u", None, {"blob": ""}, None, 0.0, "m")]).parts[0])
    count = (limit - base) // len(char.encode()) + extra
    small = [new_event("track", "E", "u", None, {"i": i}, None, 0.0, f"s{i}") for i in range(3)]
    big = new_event("track", "Big", "u", None, {"blob": char * count}, None, 0.0, "m")
    events = [*small[:2], big, *small[2:]]
    prep = Codec().prepare(events)
    if over:
        assert prep.events == small
        assert [(r.reason, r.events) for r in prep.rejected] == [("oversize", [big])]
    else:
        assert prep.events == events and prep.rejected == []
        assert len(prep.parts[2]) > limit - 4


def test_a_lone_surrogate_rejects_its_event_only_in_a_batch() -> None:
    good = [new_event("track", "E", "u", None, {"i": i}, None, 0.0) for i in range(3)]
    bad = new_event("track", "E", "u", None, {"s": "\ud800"}, None, 0.0)
    prep = Codec().prepare([good[0], bad, good[1], good[2]])
    assert prep.events == good
    assert [(r.reason, r.events) for r in prep.rejected] == [("unencodable", [bad])]
    assert [e["properties"]["i"] for e in json.loads(prep.body)["batch"]] == [0, 1, 2]


@pytest.mark.parametrize("when", [float("inf"), float("nan"), 1e20])
def test_a_time_that_cannot_be_written_rejects_its_event_only(when: float) -> None:
    good = [new_event("track", "E", "u", None, {"i": i}, None, 0.0) for i in range(2)]
    bad = new_event("track", "E", "u", None, {"i": 9}, None, when)
    prep = Codec().prepare([good[0], bad, good[1]])
    assert prep.events == good
    assert [(r.reason, r.events) for r in prep.rejected] == [("unencodable", [bad])]


def test_events_with_both_or_neither_properties_and_traits_take_the_per_event_path() -> None:
    both = new_event("track", "E", "u", None, {"p": 1}, {"t": 2}, 0.0, "m1")
    neither = new_event("identify", None, "u", None, None, None, 0.0, "m2")
    fast = Codec().prepare([both, neither])
    slow = Codec(json_default=str).prepare([both, neither])
    assert fast.body == slow.body
    wire = json.loads(fast.body)["batch"]
    assert wire[0]["properties"] == {"p": 1} and wire[0]["traits"] == {"t": 2}
    assert "traits" not in wire[1] and "properties" not in wire[1]


def test_parts_are_cut_from_the_body_even_when_a_value_looks_like_the_context() -> None:
    library = {"name": "python-sdk", "version": klime.__version__}
    events = [
        new_event("track", "E", "u", None, {"a": 1, "context": {"library": library}}, None, 0.0, "m1"),
        new_event("track", "E", "u", None, {"b": 2}, None, 0.0, "m2"),
    ]
    prep = Codec().prepare(events)
    assert [json.loads(p) for p in prep.parts] == json.loads(prep.body)["batch"]
    plain = Codec().prepare([new_event("track", "E", "u", None, {"b": i}, None, 0.0, f"m{i}") for i in range(3)])
    assert b"[" + b",".join(plain.parts) + b"]" == plain.body[len(b'{"batch":') : -1]


def test_a_body_encoded_ahead_changes_no_event_until_adopted() -> None:
    events = [new_event("track", "E", "u", None, {"i": i}, None, 1.7e9, "given" if i == 1 else None) for i in range(3)]
    prep = Codec().prepare_ahead(events)
    assert prep is not None
    assert [ev._id for ev in events] == [None, "given", None]
    assert all(isinstance(ev._ts, float) for ev in events)
    sent = [e["messageId"] for e in json.loads(prep.body)["batch"]]
    assert sent[1] == "given" and all(UUID4.match(m) for m in (sent[0], sent[2]))
    assert prep.adopt() is True
    assert [ev.messageId for ev in events] == sent
    # Encoded again, the same events give the same body.
    assert Codec().prepare(events).body == prep.body


def test_a_body_encoded_ahead_is_refused_if_an_event_got_another_id() -> None:
    events = [new_event("track", "E", "u", None, {"i": i}, None, 1.7e9) for i in range(2)]
    prep = Codec().prepare_ahead(events)
    assert prep is not None
    events[1].messageId = "assigned-meanwhile"
    assert prep.adopt() is False
    assert Codec(before_send=lambda d: d).prepare_ahead(events) is None  # user code: never ahead
