"""klime.testing: capturing events in memory through the real client machinery."""

from __future__ import annotations

import enum
import inspect
import logging
import math
import re
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Iterator, List

import pytest

from klime import BatchResponse, Event, KlimeClient, SendError
from klime._transport import Transport
from klime.testing import CapturingClient, MemoryTransport

from .conftest import Recorder
from .servers import refused_url

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Plan(enum.Enum):
    PRO = "pro"


@pytest.fixture
def client(recorder: Recorder) -> Iterator[CapturingClient]:
    c = CapturingClient(
        on_error=recorder.on_error,
        on_success=recorder.on_success,
        logger=logging.getLogger("klime.test"),
    )
    yield c
    c.shutdown(timeout=1)


def test_is_a_klime_client_that_needs_no_write_key_and_hides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLIME_WRITE_KEY", raising=False)
    with CapturingClient() as c:
        assert isinstance(c, KlimeClient)
        assert "test-key" not in repr(c)
    with CapturingClient("sk_live_secret") as c:
        assert "sk_live_secret" not in repr(c)
        assert "sk_live_secret" not in repr(vars(c))


def test_captures_all_three_calls_in_wire_form(client: CapturingClient, recorder: Recorder) -> None:
    client.identify("user_123", {"email": "jane@example.com", "name": "Jane"})
    client.track("Button Clicked", {"button_name": "Sign up"}, user_id="user_123")
    client.track("Events Received", group_id="org_456")
    client.group("org_456", {"name": "Acme Inc"}, user_id="user_123")
    client.group("org_456")

    events = client.events
    assert [e["type"] for e in events] == ["identify", "track", "track", "group", "group"]
    identify, track, group_track, group, bare_group = events
    assert identify["userId"] == "user_123"
    assert identify["traits"] == {"email": "jane@example.com", "name": "Jane"}
    assert "groupId" not in identify and "event" not in identify and "properties" not in identify
    assert track["event"] == "Button Clicked"
    assert track["properties"] == {"button_name": "Sign up"}
    assert "groupId" not in track
    assert group_track["groupId"] == "org_456" and group_track["properties"] == {}
    assert "userId" not in group_track
    assert group["groupId"] == "org_456" and group["userId"] == "user_123"
    assert bare_group["traits"] == {} and "userId" not in bare_group
    now = datetime.now(timezone.utc)
    for ev in events:
        assert UUID4.match(ev["messageId"])
        stamp = datetime.strptime(ev["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        assert now - timedelta(seconds=30) <= stamp <= now
        assert ev["context"]["library"]["name"] == "python-sdk"
    assert len({ev["messageId"] for ev in events}) == 5
    assert sum(r.accepted for r in recorder.successes) == 5
    assert recorder.errors == []


def test_values_are_encoded_exactly_as_for_the_server(client: CapturingClient) -> None:
    props = {
        "at": datetime(2026, 11, 22, 10, 4, 5, 123000),
        "aware": datetime(2026, 11, 22, 12, 4, 5, tzinfo=timezone(timedelta(hours=2))),
        "day": date(2026, 1, 2),
        "price": Decimal("9.50"),
        "count": Decimal("3"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "plan": Plan.PRO,
        "pair": (1, 2),
        "tags": {"a"},
        "nested": {"ok": [True, None]},
    }
    client.track("Order Placed", props, user_id="u1")
    (ev,) = client.events
    assert ev["properties"] == {
        "at": "2026-11-22T10:04:05.123000Z",
        "aware": "2026-11-22T10:04:05Z",
        "day": "2026-01-02",
        "price": 9.5,
        "count": 3,
        "id": "12345678-1234-5678-1234-567812345678",
        "plan": "pro",
        "pair": [1, 2],
        "tags": ["a"],
        "nested": {"ok": [True, None]},
    }


def test_properties_are_copied_at_call_time(client: CapturingClient) -> None:
    props = {"step": 1}
    client.track("Step Done", props, user_id="u1")
    props["step"] = 2
    props["extra"] = True
    assert client.events[0]["properties"] == {"step": 1}


def test_unencodable_value_goes_to_on_error_and_is_not_captured(
    client: CapturingClient, recorder: Recorder
) -> None:
    client.track("Good Before", user_id="u1")
    client.track("Bad", {"ratio": math.nan}, user_id="u1")
    client.identify("u1", {"obj": object()})
    client.track("Good After", user_id="u1")

    assert [e.get("event") for e in client.events] == ["Good Before", "Good After"]
    assert [err.reason for err, _ in recorder.errors] == ["unencodable", "unencodable"]  # type: ignore[attr-defined]
    bad = [ev for _, evs in recorder.errors for ev in evs]
    assert [ev.type for ev in bad] == ["track", "identify"]
    assert isinstance(bad[0], Event) and bad[0].event == "Bad"


def test_programmer_mistakes_raise_at_the_call_site(client: CapturingClient) -> None:
    with pytest.raises(ValueError, match="user_id or group_id"):
        client.track("Orphan")
    with pytest.raises(ValueError, match="event name"):
        client.track("", user_id="u1")
    with pytest.raises(TypeError, match="properties must be a dict"):
        client.track("Listy", ["a"], user_id="u1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keys must be strings"):
        client.identify("u1", {1: "x"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="user_id"):
        client.identify("")
    with pytest.raises(TypeError, match="group_id"):
        client.group(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ISO 8601"):
        client.track("Late", user_id="u1", timestamp="yesterday")
    client.assert_nothing_sent()


def test_timestamp_and_message_id_options(client: CapturingClient) -> None:
    client.track("Backfilled", user_id="u1", timestamp="2026-01-05T09:00:00+01:00", message_id="m-1")
    client.identify("u1", timestamp=datetime(2026, 1, 5, 8, 30), message_id="m-2")
    track, identify = client.events
    assert (track["timestamp"], track["messageId"]) == ("2026-01-05T08:00:00.000Z", "m-1")
    assert (identify["timestamp"], identify["messageId"]) == ("2026-01-05T08:30:00.000Z", "m-2")


def test_sync_methods_return_a_batch_response_and_capture(client: CapturingClient, recorder: Recorder) -> None:
    r1 = client.track_sync("Critical Action", {"key": "value"}, user_id="u1")
    r2 = client.identify_sync("u1", {"name": "Jane"})
    r3 = client.group_sync("org_1", user_id="u1")
    for r in (r1, r2, r3):
        assert r == BatchResponse(status="ok", accepted=1, failed=0, errors=None)
    assert [e["type"] for e in client.events] == ["track", "identify", "group"]
    assert recorder.successes == []  # callbacks are not called for sync sends


def test_events_flushes_the_queue_first(recorder: Recorder) -> None:
    with CapturingClient(flush_interval=60_000, max_batch_size=2, on_success=recorder.on_success) as c:
        for i in range(5):
            c.track("Tick", {"i": i}, user_id="u1")
        assert [e["properties"]["i"] for e in c.events] == [0, 1, 2, 3, 4]
        assert c.queue_size() == 0
        assert [len(b) for b in c.batches] == [2, 2, 1]


def test_never_touches_the_network() -> None:
    # Nothing listens there: were the real transport used, delivery would fail.
    with CapturingClient(endpoint=refused_url(), retry_max_attempts=1) as c:
        assert c.track_sync("Offline", user_id="u1").accepted == 1
        c.track("Offline Too", user_id="u1")
        assert len(c.events) == 2


def test_filters(client: CapturingClient) -> None:
    client.track("Viewed", user_id="u1")
    client.track("Viewed", user_id="u2", group_id="g1")
    client.track("Clicked", group_id="g1")
    client.identify("u1")
    client.identify("u2")
    client.group("g1", user_id="u1")
    client.group("g2")

    assert len(client.tracked()) == 3
    assert [e["userId"] for e in client.tracked("Viewed")] == ["u1", "u2"]
    assert [e["event"] for e in client.tracked(group_id="g1")] == ["Viewed", "Clicked"]
    assert client.tracked("Viewed", user_id="u2", group_id="g1")[0]["groupId"] == "g1"
    assert client.tracked("Nope") == []
    assert [e["userId"] for e in client.identified()] == ["u1", "u2"]
    assert len(client.identified("u2")) == 1
    assert [e["groupId"] for e in client.grouped()] == ["g1", "g2"]
    assert client.grouped(user_id="u1")[0]["groupId"] == "g1"
    assert client.grouped("g2", user_id="u1") == []


def test_assert_helpers_pass_and_return_the_event(client: CapturingClient) -> None:
    when = datetime(2026, 3, 1, 12, 0)
    client.track("Report Generated", {"report_type": "revenue", "at": when, "rows": 10}, user_id="u1")
    client.identify("u1", {"email": "jane@example.com", "name": "Jane"})
    client.group("org_1", {"plan": "enterprise"}, user_id="u1")

    ev = client.assert_tracked("Report Generated")
    assert ev["properties"]["rows"] == 10
    client.assert_tracked("Report Generated", user_id="u1", properties={"report_type": "revenue"})
    # Expected values are encoded like the real ones, so a datetime compares with its string.
    client.assert_tracked("Report Generated", properties={"at": when, "rows": Decimal(10)})
    assert client.assert_identified("u1", traits={"email": "jane@example.com"})["traits"]["name"] == "Jane"
    client.assert_grouped("org_1")
    client.assert_grouped("org_1", user_id="u1", traits={"plan": "enterprise"})


def test_assert_tracked_failure_shows_what_was_captured_and_how_it_differs(client: CapturingClient) -> None:
    client.track("Report Generated", {"report_type": "revenue"}, user_id="u1")
    client.track("Report Generated", {"report_type": "costs", "rows": 3}, user_id="u2")

    with pytest.raises(AssertionError) as info:
        client.assert_tracked("Report Generated", user_id="u1", properties={"report_type": "costs", "rows": 3})
    message = str(info.value)
    assert message.splitlines()[0] == (
        "no track event 'Report Generated' with userId='u1', "
        "properties including {'report_type': 'costs', 'rows': 3} was sent."
    )
    assert "The 2 track event(s) sent, and how they differ:" in message
    assert "properties['report_type'] is 'revenue', expected 'costs'" in message
    assert "properties['rows'] missing (expected 3)" in message
    assert "userId is 'u2', expected 'u1'" in message

    with pytest.raises(AssertionError, match="event is 'Report Generated', expected 'Report Viewed'"):
        client.assert_tracked("Report Viewed")


def test_assert_failures_when_nothing_or_something_else_was_sent(client: CapturingClient) -> None:
    with pytest.raises(AssertionError, match="Nothing was sent at all"):
        client.assert_identified("u1")
    client.track("Clicked", user_id="u1")
    client.identify("u1", {"name": "Jane"})
    with pytest.raises(AssertionError) as info:
        client.assert_grouped("org_1", user_id="u1")
    message = str(info.value)
    assert "no group event with groupId='org_1', userId='u1' was sent." in message
    assert "No group event was sent; the 2 event(s) sent were:" in message
    assert "- track 'Clicked' userId='u1'" in message
    assert "- identify userId='u1' traits={'name': 'Jane'}" in message
    with pytest.raises(AssertionError, match=r"traits\['name'\] is 'Jane', expected 'Joan'"):
        client.assert_identified("u1", traits={"name": "Joan"})
    with pytest.raises(TypeError, match="expected properties cannot be encoded"):
        client.assert_tracked("Clicked", properties={"x": object()})


def test_assert_nothing_sent(client: CapturingClient) -> None:
    client.assert_nothing_sent()
    client.track("Oops", user_id="u1")  # still queued: the assertion flushes first
    with pytest.raises(AssertionError, match=r"expected no Klime events, but 1 were sent:\n  - track 'Oops'"):
        client.assert_nothing_sent()


def test_clear_and_reset(client: CapturingClient) -> None:
    client.track("First", user_id="u1")
    client.clear()
    client.assert_nothing_sent()
    client.fail_always(400)
    client.reset()
    client.track("Second", user_id="u1")
    assert [e["event"] for e in client.events] == ["Second"]


def test_fail_with_reports_to_on_error_and_captures_nothing(recorder: Recorder) -> None:
    with CapturingClient(fail_with=400, on_error=recorder.on_error, logger=logging.getLogger("klime.test")) as c:
        c.track("Signup Completed", user_id="u1")
        c.identify("u1")
        assert c.flush() is False
        c.assert_nothing_sent()
        ((error, events),) = recorder.errors
        assert isinstance(error, SendError)
        assert (error.reason, error.status) == ("permanent_error", 400)
        assert "simulated HTTP 400" in error.message
        assert [ev.type for ev in events] == ["track", "identify"]
        with pytest.raises(SendError) as info:
            c.track_sync("Sync Fails Too", user_id="u1")
        assert info.value.status == 400

        c.stop_failing()
        c.track("Signup Completed", user_id="u1")
        c.assert_tracked("Signup Completed")


def test_fail_next_with_a_transient_status_is_retried(recorder: Recorder) -> None:
    with CapturingClient(on_error=recorder.on_error, on_success=recorder.on_success) as c:
        c.fail_next(503, times=2)
        c.track("Eventually", user_id="u1")
        assert c.flush() is True
        c.assert_tracked("Eventually")
        assert recorder.errors == []
        assert len(recorder.successes) == 1


def test_fail_next_covering_every_attempt_exhausts_retries(recorder: Recorder) -> None:
    with CapturingClient(retry_max_attempts=3, on_error=recorder.on_error, logger=logging.getLogger("klime.test")) as c:
        c.fail_next(ConnectionResetError("simulated reset"), times=3)
        c.track("Lost", user_id="u1")
        c.flush()
        c.assert_nothing_sent()
        ((error, _),) = recorder.errors
        assert error.reason == "retries_exhausted"  # type: ignore[attr-defined]
        assert "simulated reset" in str(error)
        # The failures were used up; the next send goes through.
        c.track("Found", user_id="u1")
        c.assert_tracked("Found")


def test_fail_next_once_with_the_default_permanent_status(recorder: Recorder) -> None:
    with CapturingClient(on_error=recorder.on_error, logger=logging.getLogger("klime.test")) as c:
        c.fail_next()
        with pytest.raises(SendError, match="HTTP 400"):
            c.identify_sync("u1")
        assert c.identify_sync("u1").accepted == 1
        assert len(c.identified("u1")) == 1


def test_failure_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="300 to 599"):
        CapturingClient(fail_with=200)
    with CapturingClient() as c:
        with pytest.raises(ValueError, match="300 to 599"):
            c.fail_next(204)
        with pytest.raises(TypeError, match="HTTP status"):
            c.fail_always("500")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="times"):
            c.fail_next(500, times=0)


def test_after_shutdown_async_calls_are_ignored_and_captured_events_remain() -> None:
    c = CapturingClient()
    c.track("Before", user_id="u1")
    assert c.shutdown() is True
    c.track("After", user_id="u1")
    assert [e["event"] for e in c.events] == ["Before"]
    with pytest.raises(SendError):
        c.track_sync("After Sync", user_id="u1")


def test_memory_transport_replaces_every_public_transport_member() -> None:
    # A new Transport method the sender starts using must be overridden here
    # too, or tests would silently go through real HTTP code.
    public = {name for name in vars(Transport) if not name.startswith("_")}
    missing = {name for name in public if name not in vars(MemoryTransport)}
    assert missing == set()
    assert MemoryTransport("http://x").proxy is None


def test_constructor_takes_the_klime_client_options() -> None:
    ours = inspect.signature(CapturingClient.__init__).parameters
    theirs = inspect.signature(KlimeClient.__init__).parameters
    assert list(theirs) == [name for name in ours if name != "fail_with"]
    with pytest.raises(ValueError, match="max_batch_size"):
        CapturingClient(max_batch_size=0)


def test_module_docstring_example_runs() -> None:
    import klime.testing

    def signup(client: KlimeClient) -> None:
        client.identify("usr_1", {"email": "jane@example.com"})
        client.track("Signup Completed", {"plan": "pro"}, user_id="usr_1")

    with CapturingClient() as klime_client:
        signup(klime_client)
        event = klime_client.assert_tracked("Signup Completed", user_id="usr_1", properties={"plan": "pro"})
        assert event["timestamp"].endswith("Z")
        klime_client.assert_identified("usr_1", traits={"email": "jane@example.com"})

    errors: List[Exception] = []
    with CapturingClient(on_error=lambda error, events: errors.append(error)) as client:
        client.fail_next(400)
        client.track("Signup Completed", user_id="usr_1")
        client.assert_nothing_sent()
    assert errors[0].reason == "permanent_error"  # type: ignore[attr-defined]
    assert "CapturingClient()" in (klime.testing.__doc__ or "")
