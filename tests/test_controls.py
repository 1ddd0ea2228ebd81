"""The controls users ask for (issue 11): before_send, context= and defaults,
stats(), disabled and debug, each against a real loopback server, failure
paths included.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

import pytest

import klime
from klime import BatchResponse, KlimeClient, SendError, Stats

from .conftest import MakeClient, RawServers, Recorder
from .servers import Collector, Held, RawRequest, Reply, wait_until

KEY = "test-write-key"  # what make_client uses


def records(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.NOTSET) -> List[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage() and r.levelno >= level]


# =============================================================================================
# before_send
# =============================================================================================


def test_before_send_sees_the_wire_dict_on_a_sending_thread(make_client: MakeClient, collector: Collector) -> None:
    seen: List[Dict[str, Any]] = []
    threads: List[int] = []

    def hook(event: Dict[str, Any]) -> Dict[str, Any]:
        threads.append(threading.get_ident())
        seen.append(dict(event))
        return event

    client = make_client(collector.url, before_send=hook)
    client.track("Clicked", {"plan": "pro"}, user_id="u1")
    client.identify("u1", {"name": "Ada"})
    client.group("g1", {"seats": 3}, user_id="u1")
    assert seen == [], "nothing runs on the caller's thread at call time"
    assert client.flush(timeout=10)
    assert threading.get_ident() not in threads
    assert len(seen) == 3
    by_type = {e["type"]: e for e in seen}
    track = by_type["track"]
    assert uuid.UUID(track["messageId"]).version == 4
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", track["timestamp"])
    assert (track["event"], track["userId"], track["properties"]) == ("Clicked", "u1", {"plan": "pro"})
    assert track["context"]["library"] == {"name": "python-sdk", "version": klime.__version__}
    assert by_type["identify"]["traits"] == {"name": "Ada"}
    assert (by_type["group"]["groupId"], by_type["group"]["userId"]) == ("g1", "u1")
    sent = {e["type"]: e for e in collector.events}
    assert sent["track"]["messageId"] == track["messageId"]


def test_before_send_changes_are_what_is_sent(make_client: MakeClient, collector: Collector) -> None:
    def scrub(event: Dict[str, Any]) -> Dict[str, Any]:
        props = event.get("properties")
        if props is not None:
            props.pop("email", None)
            props["scrubbed"] = True
        return event

    client = make_client(collector.url, before_send=scrub)
    mine = {"email": "ada@example.com", "plan": "pro"}
    client.track("Signed Up", mine, user_id="u1")
    assert client.flush(timeout=10)
    [sent] = collector.events
    assert sent["properties"] == {"plan": "pro", "scrubbed": True}
    assert mine == {"email": "ada@example.com", "plan": "pro"}, "the caller's dict is not the hook's"


def test_before_send_returning_a_new_mapping(make_client: MakeClient, collector: Collector) -> None:
    from types import MappingProxyType

    def rebuild(event: Dict[str, Any]) -> Any:
        return MappingProxyType({**event, "userId": "pseudonym-1"})

    client = make_client(collector.url, before_send=rebuild)
    client.track("A", user_id="real-user")
    assert client.flush(timeout=10)
    assert [e["userId"] for e in collector.events] == ["pseudonym-1"]


def test_before_send_none_drops_the_event_as_filtered_not_failed(
    make_client: MakeClient, collector: Collector, recorder: Recorder
) -> None:
    def hook(event: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return None if event.get("event") == "Drop" else event

    client = make_client(collector.url, before_send=hook)
    for i in range(6):
        client.track("Drop" if i % 3 == 0 else "Keep", {"i": i}, user_id="u1")
    assert client.flush(timeout=10) is True, "a filtered event is not a failure"
    assert sorted(e["properties"]["i"] for e in collector.events) == [1, 2, 4, 5]
    assert recorder.errors == []
    stats = client.stats()
    assert (stats.filtered, stats.delivered, dict(stats.failed)) == (2, 4, {})
    # Every event of a batch filtered: no request at all.
    before = len(collector.requests)
    client.track("Drop", user_id="u1")
    assert client.flush(timeout=10) is True
    response = client.track_sync("Drop", user_id="u1")
    assert isinstance(response, BatchResponse) and response.accepted == 0
    assert len(collector.requests) == before
    stats = client.stats()
    assert (stats.filtered, stats.enqueued) == (4, 8)
    assert balanced(stats)
    assert recorder.errors == []


class HookError(RuntimeError):
    pass


@pytest.mark.parametrize(
    "outcome",
    [HookError("no PII allowed"), ["not", "a", "mapping"], "text", 42, True],
    ids=["raises", "list", "str", "int", "bool"],
)
def test_a_failing_hook_means_not_sent_and_before_send_error(
    make_client: MakeClient, collector: Collector, recorder: Recorder, outcome: Any
) -> None:
    def hook(event: Dict[str, Any]) -> Any:
        if event["properties"].get("secret"):
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return event

    client = make_client(collector.url, before_send=hook, max_batch_size=10)
    for i in range(10):
        client.track("E", {"i": i, "secret": i % 2 == 0}, user_id="u1")
    assert client.flush(timeout=10) is False
    assert sorted(e["properties"]["i"] for e in collector.events) == [1, 3, 5, 7, 9], "only the clean ones went"
    assert {err.reason for err, _ in recorder.errors} == {"before_send_error"}
    assert sorted(ev.properties["i"] for ev in recorder.failed_events) == [0, 2, 4, 6, 8]
    assert all(isinstance(err, SendError) for err, _ in recorder.errors)
    assert all("before_send" in err.message for err, _ in recorder.errors)
    stats = client.stats()
    assert stats.failed == {"before_send_error": 5}
    assert stats.filtered == 0


def test_a_failing_hook_is_logged_once_per_burst(
    make_client: MakeClient, collector: Collector, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(event: Dict[str, Any]) -> Dict[str, Any]:
        raise HookError("broken hook")

    client = make_client(collector.url, before_send=hook, max_batch_size=7)
    with caplog.at_level(logging.DEBUG):
        for i in range(40):
            client.track("E", {"i": i}, user_id="u1")
        assert client.flush(timeout=10) is False
        assert len(recorder.failed_events) == 40, "every event still reaches on_error"
        lines = records(caplog, "broken hook", logging.WARNING)
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert "HookError" in lines[0].getMessage()
    assert collector.requests == []


def test_a_failing_hook_on_a_sync_call_raises_and_sends_nothing(
    make_client: MakeClient, collector: Collector, recorder: Recorder
) -> None:
    def hook(event: Dict[str, Any]) -> Dict[str, Any]:
        raise HookError("nope")

    client = make_client(collector.url, before_send=hook)
    with pytest.raises(SendError) as info:
        client.identify_sync("u1", {"email": "ada@example.com"})
    assert info.value.reason == "before_send_error"
    assert collector.requests == []
    assert client.stats().failed == {"before_send_error": 1}


def _set(key: str, value: Any) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    def change(event: Dict[str, Any]) -> Dict[str, Any]:
        event[key] = value
        return event

    return change


def _drop(key: str) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    def change(event: Dict[str, Any]) -> Dict[str, Any]:
        event.pop(key, None)
        return event

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_set("userId", ""), "before_send_error"),
        (_set("userId", 123), "before_send_error"),
        (_set("messageId", None), "before_send_error"),
        (_drop("messageId"), "before_send_error"),
        (_drop("timestamp"), "before_send_error"),
        (_drop("event"), "before_send_error"),
        (_set("type", "page"), "before_send_error"),
        (_set("properties", ["a", "list"]), "before_send_error"),
        (_set("context", "web"), "before_send_error"),
        (_set("properties", {"blob": "x" * 300_000}), "oversize"),
        (_set("properties", {"thing": object()}), "unencodable"),
        (_set("properties", {"ratio": float("nan")}), "unencodable"),
    ],
    ids=[
        "empty-id", "int-id", "none-message-id", "no-message-id", "no-timestamp", "no-event-name",
        "bad-type", "list-properties", "str-context", "oversize", "unknown-type", "nan",
    ],
)
def test_hook_output_is_validated_like_any_event(
    make_client: MakeClient, collector: Collector, recorder: Recorder, change: Any, reason: str
) -> None:
    def hook(event: Dict[str, Any]) -> Dict[str, Any]:
        return change(event) if event.get("event") == "Bad" else event

    client = make_client(collector.url, before_send=hook)
    client.track("Good", user_id="u1")
    client.track("Bad", user_id="u1")
    client.track("Good", user_id="u2")
    assert client.flush(timeout=10) is False
    assert [(e["event"], e["userId"]) for e in collector.events] == [("Good", "u1"), ("Good", "u2")]
    [(error, events)] = recorder.errors
    assert error.reason == reason
    assert [ev.event for ev in events] == ["Bad"]


def test_hook_may_remove_a_user_id_when_a_group_id_remains(make_client: MakeClient, collector: Collector) -> None:
    client = make_client(collector.url, before_send=_drop("userId"))
    client.track("Anon In Group", user_id="u1", group_id="g1")
    assert client.flush(timeout=10)
    [sent] = collector.events
    assert "userId" not in sent and sent["groupId"] == "g1"


# =============================================================================================
# context=, default_properties=, default_context=
# =============================================================================================

LIBRARY = {"name": "python-sdk", "version": klime.__version__}
WEB = {"userAgent": "Mozilla/5.0", "locale": "de-AT", "timezone": "Europe/Vienna"}


def test_context_on_all_six_calls(make_client: MakeClient, collector: Collector) -> None:
    client = make_client(collector.url, max_batch_size=3)
    client.track("T", user_id="u1", context={**WEB, "n": 1})
    client.identify("u1", context={**WEB, "n": 2})
    client.group("g1", user_id="u1", context={**WEB, "n": 3})
    client.track_sync("T", user_id="u1", context={**WEB, "n": 4})
    client.identify_sync("u1", context={**WEB, "n": 5})
    client.group_sync("g1", context={**WEB, "n": 6})
    assert client.flush(timeout=10)
    contexts = sorted((e["context"] for e in collector.events), key=lambda c: c["n"])
    assert [c["n"] for c in contexts] == [1, 2, 3, 4, 5, 6]
    for ctx in contexts:
        assert ctx == {"library": LIBRARY, **WEB, "n": ctx["n"]}


def test_library_cannot_be_overridden(make_client: MakeClient, collector: Collector) -> None:
    client = make_client(
        collector.url, default_context={"library": {"name": "evil"}, "app": "shop"}, max_batch_size=2
    )
    client.track("T", user_id="u1", context={"library": "mine"})
    client.identify_sync("u1", context={"library": {"name": "x", "version": "0"}, "locale": "fr"})
    assert client.flush(timeout=10)
    for ev in collector.events:
        assert ev["context"]["library"] == LIBRARY
        assert ev["context"]["app"] == "shop"


def test_defaults_merge_under_the_calls_own_values(make_client: MakeClient, collector: Collector) -> None:
    client = make_client(
        collector.url,
        default_properties={"env": "prod", "plan": "free"},
        default_context={"locale": "en-US", "app": "shop"},
        max_batch_size=4,
    )
    client.track("T", {"plan": "pro"}, user_id="u1", context={"locale": "de-AT"})
    client.track("Bare", user_id="u1")
    client.identify("u1", {"name": "Ada"})
    client.group("g1", {"seats": 2})
    assert client.flush(timeout=10)
    by_name = {e.get("event", e["type"]): e for e in collector.events}
    assert by_name["T"]["properties"] == {"env": "prod", "plan": "pro"}, "the call's keys win"
    assert by_name["T"]["context"] == {"library": LIBRARY, "locale": "de-AT", "app": "shop"}
    assert by_name["Bare"]["properties"] == {"env": "prod", "plan": "free"}
    assert by_name["Bare"]["context"] == {"library": LIBRARY, "locale": "en-US", "app": "shop"}
    # default_properties apply to track only; default_context to every call.
    assert by_name["identify"]["traits"] == {"name": "Ada"}
    assert by_name["group"]["traits"] == {"seats": 2}
    assert "properties" not in by_name["identify"] and "properties" not in by_name["group"]
    assert by_name["identify"]["context"] == {"library": LIBRARY, "locale": "en-US", "app": "shop"}


def test_before_send_sees_the_merged_event(make_client: MakeClient, collector: Collector) -> None:
    seen: List[Dict[str, Any]] = []

    def hook(event: Dict[str, Any]) -> Dict[str, Any]:
        seen.append(event)
        return event

    client = make_client(
        collector.url, default_properties={"env": "prod"}, default_context={"app": "shop"}, before_send=hook
    )
    client.track("T", {"a": 1}, user_id="u1", context={"locale": "fr"})
    assert client.flush(timeout=10)
    [event] = seen
    assert event["properties"] == {"env": "prod", "a": 1}
    assert event["context"] == {"library": LIBRARY, "app": "shop", "locale": "fr"}


def test_copy_rule_for_context_and_defaults(make_client: MakeClient, collector: Collector) -> None:
    defaults = {"env": "prod"}
    default_ctx = {"app": "shop"}
    client = make_client(collector.url, default_properties=defaults, default_context=default_ctx)
    defaults["env"] = "changed"
    default_ctx["app"] = "changed"
    ctx = {"locale": "fr", "nested": {"k": 1}}
    client.track("T", user_id="u1", context=ctx)
    ctx["locale"] = "changed after the call"
    ctx["added"] = True
    assert client.flush(timeout=10)
    [sent] = collector.events
    assert sent["properties"] == {"env": "prod"}
    assert sent["context"]["app"] == "shop"
    assert sent["context"]["locale"] == "fr"
    assert "added" not in sent["context"]


@pytest.mark.parametrize(
    ("bad", "error"),
    [("web", TypeError), (["a"], TypeError), ({1: "x"}, TypeError)],
)
def test_a_bad_context_raises_at_the_call(
    make_client: MakeClient, collector: Collector, bad: Any, error: type
) -> None:
    client = make_client(collector.url)
    for call in (
        lambda: client.track("T", user_id="u1", context=bad),
        lambda: client.identify("u1", context=bad),
        lambda: client.group("g1", context=bad),
        lambda: client.track_sync("T", user_id="u1", context=bad),
        lambda: client.identify_sync("u1", context=bad),
        lambda: client.group_sync("g1", context=bad),
    ):
        with pytest.raises(error, match="context"):
            call()
    assert client.queue_size() == 0 and collector.requests == []


@pytest.mark.parametrize("option", ["default_properties", "default_context"])
def test_bad_defaults_raise_at_construction(collector: Collector, option: str) -> None:
    with pytest.raises(TypeError, match=option):
        KlimeClient(KEY, collector.url, **{option: ["not", "a", "mapping"]})
    with pytest.raises(TypeError, match=option):
        KlimeClient(KEY, collector.url, **{option: {1: "int key"}})


# =============================================================================================
# stats()
# =============================================================================================

FIELDS = [
    "enqueued", "delivered", "rejected", "filtered", "failed", "retries", "in_flight", "queued",
    "last_success_at", "last_failure_at",
]


def balanced(s: Stats) -> bool:
    return s.enqueued == s.delivered + s.rejected + s.filtered + sum(s.failed.values()) + s.queued


def test_stats_is_an_immutable_typed_snapshot(make_client: MakeClient, collector: Collector) -> None:
    client = make_client(collector.url)
    s = client.stats()
    assert isinstance(s, klime.Stats)
    assert [f.name for f in dataclasses.fields(s)] == FIELDS
    assert (s.enqueued, s.delivered, s.rejected, s.filtered, dict(s.failed), s.retries, s.in_flight, s.queued) == (
        0, 0, 0, 0, {}, 0, 0, 0,
    )
    assert s.last_success_at is None and s.last_failure_at is None
    for name in FIELDS:
        with pytest.raises(AttributeError):
            setattr(s, name, 1)
    with pytest.raises(TypeError):
        s.failed["x"] = 1  # type: ignore[index]
    client.track("T", user_id="u1")
    assert s.enqueued == 0, "a snapshot, not a live view"
    assert client.stats().enqueued == 1


def test_stats_equation_across_every_outcome(
    make_client: MakeClient, collector: Collector, recorder: Recorder
) -> None:
    def hook(event: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return None if event.get("event") == "Filtered" else event

    client = make_client(collector.url, before_send=hook, max_batch_size=10, retry_max_attempts=3)

    # 1. all delivered
    t0 = datetime.now(timezone.utc)
    for _ in range(3):
        client.track("Ok", user_id="u1")
    assert client.flush(timeout=10)
    t1 = datetime.now(timezone.utc)
    s = client.stats()
    assert (s.enqueued, s.delivered, s.queued, s.in_flight) == (3, 3, 0, 0)
    assert s.last_success_at is not None and s.last_success_at.tzinfo is not None
    assert s.last_success_at.utcoffset() == timezone.utc.utcoffset(None)
    assert t0 <= s.last_success_at <= t1
    assert s.last_failure_at is None
    assert balanced(s)

    # 2. a 2xx that rejects one of three events (partial success)
    collector.respond(
        200,
        {"status": "partial", "accepted": 2, "failed": 1, "errors": [{"index": 1, "message": "bad", "code": "x"}]},
    )
    for _ in range(3):
        client.track("Partly", user_id="u1")
    assert client.flush(timeout=10) is False
    s = client.stats()
    assert (s.enqueued, s.delivered, s.rejected) == (6, 5, 1)
    assert balanced(s)

    # 3. a transient failure, then success: a retry, nothing lost
    collector.respond(503, {"error": "busy"})
    client.track("Retried", user_id="u1")
    assert client.flush(timeout=10)
    s = client.stats()
    assert (s.enqueued, s.delivered, s.retries) == (7, 6, 1)
    assert balanced(s)

    # 4. a permanent failure
    t2 = datetime.now(timezone.utc)
    collector.respond(400, {"error": "bad request"})
    client.track("Refused", user_id="u1")
    client.track("Refused", user_id="u1")
    assert client.flush(timeout=10) is False
    t3 = datetime.now(timezone.utc)
    s = client.stats()
    assert s.failed == {"permanent_error": 2}
    assert s.last_failure_at is not None and t2 <= s.last_failure_at <= t3
    assert s.last_failure_at.utcoffset() == timezone.utc.utcoffset(None)
    assert balanced(s)

    # 5. filtered and unencodable, and the sync calls
    client.track("Filtered", user_id="u1")
    client.track("Broken", {"x": object()}, user_id="u1")
    client.identify_sync("u1")
    collector.respond(500, {"error": "down"})
    collector.respond(500, {"error": "down"})
    collector.respond(500, {"error": "down"})
    with pytest.raises(SendError):
        client.track_sync("Sync Failed", user_id="u1")
    assert client.flush(timeout=10) is False
    s = client.stats()
    assert s.enqueued == 13
    assert s.filtered == 1
    assert s.failed == {"permanent_error": 2, "unencodable": 1, "retries_exhausted": 1}
    assert s.delivered == 7
    assert s.retries == 1 + 2
    assert (s.queued, s.in_flight) == (0, 0)
    assert balanced(s)


def test_stats_retries_and_failures_on_a_refused_connection(
    make_client: MakeClient, recorder: Recorder
) -> None:
    from .servers import refused_url

    client = make_client(refused_url(), retry_max_attempts=3, max_batch_size=2)
    t0 = datetime.now(timezone.utc)
    for _ in range(4):
        client.track("Lost", user_id="u1")
    assert client.flush(timeout=30) is False
    s = client.stats()
    assert s.failed == {"retries_exhausted": 4}
    assert s.retries == 2 * 2, "two batches, two retries each"
    assert s.delivered == 0 and s.last_success_at is None
    assert s.last_failure_at is not None and t0 <= s.last_failure_at <= datetime.now(timezone.utc)
    assert balanced(s)


def test_stats_in_flight_and_queued_while_a_batch_is_held(make_client: MakeClient, raw_servers: RawServers) -> None:
    gate = Held(0)
    server = raw_servers(gate)
    client = make_client(server.url, max_batch_size=2, max_in_flight=1)
    client.track("A", user_id="u1")
    client.track("B", user_id="u1")
    server.wait_for_requests(1, timeout=10)
    client.track("C", user_id="u1")
    s = client.stats()
    assert (s.enqueued, s.in_flight, s.queued, s.delivered) == (3, 1, 1, 0)
    gate.release()
    assert client.flush(timeout=10)
    s = client.stats()
    assert (s.enqueued, s.in_flight, s.queued, s.delivered) == (3, 0, 0, 3)
    assert balanced(s)


def test_stats_counts_queue_overflow(
    make_client: MakeClient, raw_servers: RawServers, recorder: Recorder
) -> None:
    gate = Held(0)
    server = raw_servers(gate)
    client = make_client(server.url, max_batch_size=2, max_queue_size=2, max_in_flight=1)
    client.track("A", user_id="u1")
    client.track("B", user_id="u1")
    server.wait_for_requests(1, timeout=10)
    for _ in range(5):
        client.track("C", user_id="u1")
    gate.release()
    assert client.flush(timeout=10) is False
    s = client.stats()
    assert s.failed == {"queue_overflow": 3}
    assert (s.enqueued, s.delivered) == (7, 4)
    assert balanced(s)


def test_stats_after_a_flush_deadline(make_client: MakeClient, raw_servers: RawServers, recorder: Recorder) -> None:
    gate = Held(0)
    server = raw_servers(gate)
    client = make_client(server.url, max_batch_size=2, max_in_flight=1, request_timeout=30_000)
    for _ in range(3):
        client.track("Slow", user_id="u1")
    server.wait_for_requests(1, timeout=10)
    assert client.flush(timeout=0.2) is False
    s = client.stats()
    assert s.failed == {"flush_deadline": 3}, "the held batch and the queued event, claimed at the deadline"
    assert (s.queued, s.in_flight, s.delivered) == (0, 0, 0)
    assert balanced(s)
    gate.release()
    client.track("After", user_id="u1")
    assert client.flush(timeout=10)
    s = client.stats()
    assert s.delivered == 1, "a batch reported at a deadline is not counted again when it lands"
    assert s.last_success_at is not None and s.last_failure_at is not None
    assert s.last_failure_at <= s.last_success_at
    assert balanced(s)


# =============================================================================================
# disabled
# =============================================================================================


@pytest.fixture
def no_klime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KLIME_WRITE_KEY", "KLIME_ENDPOINT", "KLIME_DISABLED", "KLIME_DEBUG"):
        monkeypatch.delenv(name, raising=False)


def _exercise_disabled(client: KlimeClient) -> None:
    # Validation exactly as usual.
    with pytest.raises(ValueError):
        client.track("", user_id="u1")
    with pytest.raises(ValueError):
        client.track("No Ids")
    with pytest.raises(TypeError):
        client.identify(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        client.group("")
    with pytest.raises(TypeError):
        client.track("T", ["not a mapping"], user_id="u1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        client.track_sync("T", user_id="u1", context="web")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        client.identify_sync("")
    with pytest.raises(ValueError):
        client.track("T", user_id="u1", timestamp="yesterday")
    # Nothing queued; the sync calls answer "disabled".
    for _ in range(50):
        client.track("T", {"a": 1}, user_id="u1")
        client.identify("u1", {"b": 2})
        client.group("g1", user_id="u1")
    assert client.queue_size() == 0
    expected = BatchResponse(status="disabled", accepted=1, failed=0)
    assert client.track_sync("T", user_id="u1") == expected
    assert client.identify_sync("u1") == expected
    assert client.group_sync("g1", {"n": 1}, user_id="u1") == expected
    assert client.flush(timeout=5) is True
    assert client.stats().enqueued == 0
    assert client.shutdown(timeout=5) is True


def test_disabled_client_validates_but_sends_nothing(
    no_klime_env: None, raw_servers: RawServers, recorder: Recorder
) -> None:
    server = raw_servers()
    hook_calls: List[Any] = []
    before = set(threading.enumerate())
    client = KlimeClient(
        endpoint=server.url,
        disabled=True,
        on_error=recorder.on_error,
        on_success=recorder.on_success,
        before_send=lambda e: hook_calls.append(e) or e,
    )
    assert set(threading.enumerate()) == before, "no thread started"
    _exercise_disabled(client)
    assert set(threading.enumerate()) == before
    assert server.connections == 0 and server.requests == [], "no connection opened"
    assert hook_calls == [] and recorder.errors == [] and recorder.successes == []
    assert "disabled" in repr(client)


def test_klime_disabled_environment_variable(
    no_klime_env: None, monkeypatch: pytest.MonkeyPatch, raw_servers: RawServers
) -> None:
    server = raw_servers()
    monkeypatch.setenv("KLIME_DISABLED", "1")
    monkeypatch.setenv("KLIME_ENDPOINT", server.url)
    before = set(threading.enumerate())
    client = KlimeClient()  # no write key needed
    _exercise_disabled(client)
    assert set(threading.enumerate()) == before
    assert server.connections == 0


def test_disabled_false_still_needs_a_key(no_klime_env: None) -> None:
    with pytest.raises(ValueError, match=r"^write_key is required"):
        KlimeClient(disabled=False)


# =============================================================================================
# debug
# =============================================================================================


@pytest.fixture
def quiet_logger(request: pytest.FixtureRequest) -> logging.Logger:
    """A logger whose records would print nowhere: no handlers and no parent.

    Not from logging.getLogger: pytest attaches its capture handlers to
    every registered logger that does not propagate.
    """
    logger = logging.Logger(f"klime.test.quiet.{request.node.name}", logging.WARNING)
    logger.parent = None
    return logger


def test_debug_makes_events_and_outcomes_visible_on_stderr(
    make_client: MakeClient, collector: Collector, quiet_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    client = make_client(collector.url, logger=quiet_logger, debug=True)
    assert quiet_logger.level == logging.DEBUG
    assert len(quiet_logger.handlers) == 1, "a stderr handler, since nothing would print"
    client.track("Visible", {"n": 1}, user_id="u1")
    client.identify("u2", {"email": "ada@example.com"})
    assert client.flush(timeout=10)
    err = capsys.readouterr().err
    sent = collector.events
    for event in sent:
        assert event["messageId"] in err, "each event's wire JSON"
    assert '"event":"Visible"' in err
    assert re.search(r"2 event\(s\).*status=ok.*\d+\.\d+s", err), err
    assert KEY not in err


def test_debug_logs_each_request_outcome_failures_included(
    make_client: MakeClient, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("klime.test.debug.outcomes")
    try:
        client = make_client(collector.url, logger=logger, debug=True, retry_max_attempts=1, max_batch_size=3)
        assert logger.handlers == [], "caplog's handler would print: nothing added"
        collector.respond(400, {"error": f"bad key {KEY}"})
        for _ in range(3):
            client.track("Refused", user_id="u1")
        assert client.flush(timeout=10) is False
        client.track("Fine", user_id="u1")
        assert client.flush(timeout=10)
        debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.name == logger.name]
        text = "\n".join(debug)
        assert sum('"event":"Refused"' in line for line in debug) == 3
        assert sum('"event":"Fine"' in line for line in debug) == 1
        assert re.search(r"3 event\(s\).*400.*\d+\.\d+s|3 event\(s\).*\d+\.\d+s.*400", text), text
        assert re.search(r"1 event\(s\).*status=ok", text), text
        assert all(KEY not in r.getMessage() for r in caplog.records)
    finally:
        logger.setLevel(logging.NOTSET)


class OneShot:
    """A duck-typed array whose values can be read once (a consumed stream)."""

    def __init__(self, values: List[int]) -> None:
        self.values: Optional[List[int]] = values

    def tolist(self) -> List[int]:
        values, self.values = self.values, None
        if values is None:
            raise RuntimeError("already read")
        return values


def test_debug_shows_each_event_as_sent_and_never_fails_the_batch(
    make_client: MakeClient, collector: Collector, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """The logged JSON is cut from the body that went out: no value is read a second time."""
    logger = logging.getLogger("klime.test.debug.parts")
    try:
        client = make_client(collector.url, logger=logger, debug=True, max_batch_size=5)
        for i in range(5):
            client.track("Shown", {"i": i, "once": OneShot([i, i])}, user_id="u1")
        assert client.flush(timeout=10) is True
        assert recorder.errors == []
        assert [e["properties"] for e in collector.events] == [{"i": i, "once": [i, i]} for i in range(5)]
        shown = [r.getMessage() for r in caplog.records if r.name == logger.name and "sending event" in r.getMessage()]
        assert len(shown) == 5
        for line, event in zip(shown, collector.events):
            assert json.loads(line.split("sending event ", 1)[1]) == event
    finally:
        logger.setLevel(logging.NOTSET)


def test_debug_covers_sync_calls(
    make_client: MakeClient, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("klime.test.debug.sync")
    try:
        client = make_client(collector.url, logger=logger, debug=True)
        client.track_sync("Now", user_id="u1")
        debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.name == logger.name]
        text = "\n".join(debug)
        assert '"event":"Now"' in text
        assert re.search(r"1 event\(s\).*status=ok.*\d+\.\d+s", text), text
    finally:
        logger.setLevel(logging.NOTSET)


def test_debug_with_a_logger_adapter(
    make_client: MakeClient, collector: Collector, quiet_logger: logging.Logger
) -> None:
    stream = io.StringIO()
    quiet_logger.addHandler(logging.StreamHandler(stream))  # level NOTSET: prints DEBUG
    adapter = logging.LoggerAdapter(quiet_logger, {"app": "shop"})
    client = make_client(collector.url, logger=adapter, debug=True)  # type: ignore[arg-type]
    assert quiet_logger.level == logging.DEBUG
    assert len(quiet_logger.handlers) == 1, "its handler already prints DEBUG"
    client.track("Adapted", user_id="u1")
    assert client.flush(timeout=10)
    assert '"event":"Adapted"' in stream.getvalue()


def test_debug_does_not_add_a_second_handler(
    make_client: MakeClient, collector: Collector, quiet_logger: logging.Logger
) -> None:
    make_client(collector.url, logger=quiet_logger, debug=True)
    make_client(collector.url, logger=quiet_logger, debug=True)
    assert len(quiet_logger.handlers) == 1


def test_without_debug_no_event_json_is_logged(
    make_client: MakeClient, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(collector.url)
    client.track("Hidden", user_id="u1")
    assert client.flush(timeout=10)
    assert not any('"event":"Hidden"' in r.getMessage() for r in caplog.records)


def test_klime_debug_environment_variable(
    monkeypatch: pytest.MonkeyPatch, collector: Collector, quiet_logger: logging.Logger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KLIME_DEBUG", "1")
    client = KlimeClient("env-debug-key", collector.url, logger=quiet_logger, flush_interval=60_000)
    try:
        client.track("Env Debug", user_id="u1")
        assert client.flush(timeout=10)
    finally:
        client.shutdown(timeout=5)
    err = capsys.readouterr().err
    assert '"event":"Env Debug"' in err
    assert "env-debug-key" not in err


def test_debug_outcome_waits_for_a_slow_answer(
    make_client: MakeClient, raw_servers: RawServers, caplog: pytest.LogCaptureFixture
) -> None:
    def slow(req: RawRequest) -> Reply:
        time.sleep(0.05)
        return (200, b'{"status":"ok","accepted":1,"failed":0}')

    server = raw_servers(slow)
    logger = logging.getLogger("klime.test.debug.slow")
    try:
        client = make_client(server.url, logger=logger, debug=True)
        client.track("Slow", user_id="u1")
        assert client.flush(timeout=10)
        assert wait_until(lambda: any("status=ok" in r.getMessage() for r in caplog.records))
        [line] = [r.getMessage() for r in caplog.records if "status=ok" in r.getMessage()]
        took = float(re.search(r"(\d+\.\d+)s", line).group(1))  # type: ignore[union-attr]
        assert took > 0
    finally:
        logger.setLevel(logging.NOTSET)


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()], ids=lambda e: type(e).__name__)
def test_a_hook_raising_a_base_exception_on_a_sending_thread_is_contained(
    make_client: MakeClient, collector: Collector, recorder: Recorder, exc: BaseException
) -> None:
    def hook(event: Dict[str, Any]) -> Dict[str, Any]:
        if event.get("event") == "Bad":
            raise exc
        return event

    client = make_client(collector.url, before_send=hook)
    client.track("Bad", user_id="u1")
    client.track("Good", user_id="u1")
    assert client.flush(timeout=10) is False
    assert [e["event"] for e in collector.events] == ["Good"]
    assert [err.reason for err, _ in recorder.errors] == ["before_send_error"]
    client.track("Later", user_id="u1")
    assert client.flush(timeout=10), "the sending side still works"
