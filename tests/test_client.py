"""KlimeClient's public surface: the docs' examples, the constructor, call-site
errors, the conveniences (docs/api.md), the ``*_sync`` calls and the exports.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import textwrap
import types
import urllib.parse
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

import klime
from klime import BatchResponse, Event, KlimeClient, SendError, ValidationError

from .conftest import FAST, MakeClient, Recorder
from .servers import Collector, refused_url

DOCUMENTED_OPTIONS = [
    "write_key",
    "endpoint",
    "flush_interval",
    "max_batch_size",
    "max_queue_size",
    "retry_max_attempts",
    "retry_initial_delay",
    "flush_on_shutdown",
    "logger",
    "on_error",
    "on_success",
]


@pytest.fixture
def own_clients() -> Iterator[List[KlimeClient]]:
    """Clients a test builds itself (not through make_client); shut down afterwards."""
    clients: List[KlimeClient] = []
    yield clients
    for c in clients:
        c.shutdown(timeout=1)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, collector: Collector) -> Collector:
    """KLIME_WRITE_KEY / KLIME_ENDPOINT pointing at the loopback collector."""
    monkeypatch.setenv("KLIME_WRITE_KEY", "docs-write-key")
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    return collector


# --- every code example of the reference docs, verbatim --------------------------
#
# The only edit: the docs' scraped "[email protected]" placeholders are real addresses.

DOCS_QUICK_START = """
from klime import KlimeClient

client = KlimeClient(
    write_key='your-write-key'
)

# Identify a user
client.identify('user_123', {
    'email': 'stefan@example.com',
    'name': 'Stefan'
})

# Track an event
client.track('Button Clicked', {
    'button_name': 'Sign up',
    'plan': 'pro'
}, user_id='user_123')

# Associate user with a group and set group traits
client.group('org_456', {
    'name': 'Acme Inc',
    'plan': 'enterprise'
}, user_id='user_123')

# Or just link the user to a group (if traits are already set)
client.group('org_456', user_id='user_123')

# Shutdown gracefully
client.shutdown()
"""

DOCS_INSTALLATION_PROMPT = """
import os
from klime import KlimeClient

client = KlimeClient(write_key=os.environ['KLIME_WRITE_KEY'])

# Identify users at signup/login:
client.identify('usr_abc123', {'email': 'jane@example.com', 'name': 'Jane Smith'})

# Track key activities:
client.track('Report Generated', {'report_type': 'revenue'}, user_id='usr_abc123')
client.track('Feature Used', {'feature': 'export', 'format': 'csv'}, user_id='usr_abc123')
client.track('Teammate Invited', {'role': 'member'}, user_id='usr_abc123')

# If Companies & Teams mode: link user to their company and set company traits
client.group('org_456', {'name': 'Acme Inc', 'plan': 'enterprise'}, user_id='usr_abc123')
"""

DOCS_TRACK = """
# User event (most common)
client.track('Button Clicked', {
    'button_name': 'Sign up',
    'plan': 'pro'
}, user_id='user_123')

# Group event (for webhooks, cron jobs, system events)
client.track('Events Received', {
    'count': 100,
    'source': 'webhook'
}, group_id='org_456')
"""

DOCS_IDENTIFY = """
client.identify('user_123', {
    'email': 'stefan@example.com',
    'name': 'Stefan'
})
"""

DOCS_GROUP = """
# Associate user with a group and set group traits (most common)
client.group('org_456', {
    'name': 'Acme Inc',
    'plan': 'enterprise'
}, user_id='user_123')

# Just link a user to a group (traits already set or not needed)
client.group('org_456', user_id='user_123')

# Just update group traits (e.g., from a webhook or background job)
client.group('org_456', {
    'plan': 'enterprise',
    'employee_count': 50
})
"""

DOCS_FLUSH = """
client.flush()
"""

DOCS_SHUTDOWN = """
client.shutdown()
"""

DOCS_QUEUE_SIZE = """
pending = client.queue_size()
print(f"{pending} events waiting to be sent")
"""

DOCS_TRACK_SYNC = """
from klime import SendError

try:
    response = client.track_sync('Critical Action', {'key': 'value'}, user_id='user_123')
    print(f"Sent! Accepted: {response.accepted}")
except SendError as e:
    print(f"Failed to send: {e.message}")
"""

DOCS_PERFORMANCE = """
# This returns immediately - no HTTP request is made here
client.track('Button Clicked', {'button': 'signup'}, user_id='user_123')

# Your code continues without waiting
return {'success': True}
"""

DOCS_LOGGING = """
import logging

# Enable debug logging
logging.getLogger("klime").setLevel(logging.DEBUG)

# Or provide a custom logger
client = KlimeClient(
    write_key='your-write-key',
    logger=logging.getLogger("myapp.klime")
)
"""

DOCS_CALLBACKS = """
def handle_error(error, events):
    # Report to your error tracking service
    sentry_sdk.capture_exception(error)
    print(f"Failed to send {len(events)} events: {error}")

def handle_success(response):
    print(f"Sent {response.accepted} events")

client = KlimeClient(
    write_key='your-write-key',
    on_error=handle_error,
    on_success=handle_success
)
"""

DOCS_ERROR_HANDLING = """
from klime import KlimeClient, SendError

try:
    response = client.track_sync('Event', user_id='user_123')
except SendError as e:
    print(f"Failed: {e.message}, events: {len(e.events)}")
"""


@pytest.fixture
def run_docs(env: Collector) -> Iterator[Callable[..., Dict[str, Any]]]:
    """exec() a docs snippet with KLIME_ENDPOINT at the collector; shut down every client it made."""
    made: List[KlimeClient] = []

    def run(code: str, **namespace: Any) -> Dict[str, Any]:
        ns: Dict[str, Any] = {"KlimeClient": KlimeClient, **namespace}
        exec(compile(textwrap.dedent(code), "<docs>", "exec"), ns)
        if isinstance(ns.get("client"), KlimeClient):
            made.append(ns["client"])
        return ns

    yield run
    for c in made:
        c.shutdown(timeout=1)


def docs_client(**options: Any) -> KlimeClient:
    """The ``client`` the docs' method examples assume, built from the environment."""
    return KlimeClient(write_key="docs-write-key", **{"flush_interval": 60_000, **options})


def test_docs_quick_start(run_docs: Callable[..., Dict[str, Any]], env: Collector) -> None:
    ns = run_docs(DOCS_QUICK_START)
    # shutdown() at the end of the example has delivered everything.
    events = env.events
    assert [(e["type"], e.get("event"), e.get("userId"), e.get("groupId")) for e in events] == [
        ("identify", None, "user_123", None),
        ("track", "Button Clicked", "user_123", None),
        ("group", None, "user_123", "org_456"),
        ("group", None, "user_123", "org_456"),
    ]
    assert events[0]["traits"] == {"email": "stefan@example.com", "name": "Stefan"}
    assert events[1]["properties"] == {"button_name": "Sign up", "plan": "pro"}
    assert events[2]["traits"] == {"name": "Acme Inc", "plan": "enterprise"}
    assert events[3]["traits"] == {}
    assert env.requests[0].headers["Authorization"] == "Bearer your-write-key"
    with pytest.raises(SendError):
        ns["client"].track_sync("After", user_id="user_123")


def test_docs_installation_prompt(run_docs: Callable[..., Dict[str, Any]], env: Collector) -> None:
    ns = run_docs(DOCS_INSTALLATION_PROMPT)
    ns["client"].flush()
    events = env.wait_for_events(5)
    assert [(e["type"], e.get("event")) for e in events] == [
        ("identify", None),
        ("track", "Report Generated"),
        ("track", "Feature Used"),
        ("track", "Teammate Invited"),
        ("group", None),
    ]
    assert {e["userId"] for e in events} == {"usr_abc123"}
    assert events[2]["properties"] == {"feature": "export", "format": "csv"}
    assert env.requests[0].headers["Authorization"] == "Bearer docs-write-key"


def test_docs_method_examples(run_docs: Callable[..., Dict[str, Any]], env: Collector) -> None:
    client = docs_client()
    run_docs(DOCS_TRACK, client=client)
    run_docs(DOCS_IDENTIFY, client=client)
    run_docs(DOCS_GROUP, client=client)
    assert env.requests == []  # all queued, nothing sent on the caller's thread
    assert client.queue_size() == 6
    run_docs(DOCS_FLUSH, client=client)
    assert client.queue_size() == 0
    events = env.events
    assert [(e["type"], e.get("userId"), e.get("groupId")) for e in events] == [
        ("track", "user_123", None),
        ("track", None, "org_456"),
        ("identify", "user_123", None),
        ("group", "user_123", "org_456"),
        ("group", "user_123", "org_456"),
        ("group", None, "org_456"),
    ]
    assert events[1]["properties"] == {"count": 100, "source": "webhook"}
    assert events[5]["traits"] == {"plan": "enterprise", "employee_count": 50}
    client.track("Last", user_id="user_123")
    run_docs(DOCS_SHUTDOWN, client=client)
    assert env.events[-1]["event"] == "Last"


def test_docs_queue_size(run_docs: Callable[..., Dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    client = docs_client()
    for _ in range(3):
        client.track("Queued", user_id="user_123")
    ns = run_docs(DOCS_QUEUE_SIZE, client=client)
    assert ns["pending"] == 3
    assert capsys.readouterr().out == "3 events waiting to be sent\n"


def test_docs_track_sync(
    run_docs: Callable[..., Dict[str, Any]], env: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    client = docs_client()
    run_docs(DOCS_TRACK_SYNC, client=client)
    assert capsys.readouterr().out == "Sent! Accepted: 1\n"
    assert env.events[0]["event"] == "Critical Action"
    assert env.events[0]["properties"] == {"key": "value"}

    env.respond(400, {"error": "invalid event"})
    run_docs(DOCS_TRACK_SYNC, client=client)
    out = capsys.readouterr().out
    assert out.startswith("Failed to send: ") and "400" in out


def test_docs_performance_example(run_docs: Callable[..., Dict[str, Any]], env: Collector) -> None:
    client = docs_client()
    handler = run_docs("def handler():\n" + textwrap.indent(DOCS_PERFORMANCE, "    "), client=client)["handler"]
    assert handler() == {"success": True}
    assert env.requests == [] and client.queue_size() == 1
    client.flush()
    assert env.events[0]["properties"] == {"button": "signup"}


def test_docs_logging(run_docs: Callable[..., Dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    klime_logger = logging.getLogger("klime")
    saved = klime_logger.level
    try:
        ns = run_docs(DOCS_LOGGING)
        assert klime_logger.level == logging.DEBUG
    finally:
        klime_logger.setLevel(saved)
    client = ns["client"]
    client.shutdown()
    with caplog.at_level(logging.WARNING):
        client.track("Ignored", user_id="user_123")
    assert [r.name for r in caplog.records] == ["myapp.klime"]


def test_docs_callbacks(
    run_docs: Callable[..., Dict[str, Any]], env: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    captured: List[BaseException] = []
    sentry_sdk = types.SimpleNamespace(capture_exception=captured.append)
    ns = run_docs(DOCS_CALLBACKS, sentry_sdk=sentry_sdk)
    client = ns["client"]
    client.track("One", user_id="user_123")
    client.track("Two", user_id="user_123")
    client.flush()
    assert capsys.readouterr().out == "Sent 2 events\n"

    env.respond(401, {"error": "bad key"})
    client.track("Three", user_id="user_123")
    client.flush()
    out = capsys.readouterr().out
    assert out.startswith("Failed to send 1 events: ")
    assert len(captured) == 1 and isinstance(captured[0], SendError)


def test_docs_error_handling(
    run_docs: Callable[..., Dict[str, Any]], env: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    client = docs_client()
    ns = run_docs(DOCS_ERROR_HANDLING, client=client)
    assert ns["response"].accepted == 1
    assert capsys.readouterr().out == ""
    env.respond(401, {"error": "unauthorized"})
    run_docs(DOCS_ERROR_HANDLING, client=client)
    out = capsys.readouterr().out
    assert out.startswith("Failed: ") and out.endswith(", events: 1\n") and "401" in out


# --- the constructor --------------------------------------------------------------


def test_signature_matches_the_docs() -> None:
    params = inspect.signature(KlimeClient).parameters
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert positional == DOCUMENTED_OPTIONS
    assert all(params[n].default is None for n in DOCUMENTED_OPTIONS)
    for extra in ("request_timeout", "shutdown_timeout"):
        assert params[extra].kind is inspect.Parameter.KEYWORD_ONLY


def test_defaults(monkeypatch: pytest.MonkeyPatch, own_clients: List[KlimeClient]) -> None:
    monkeypatch.delenv("KLIME_ENDPOINT", raising=False)
    client = KlimeClient(write_key="k")
    own_clients.append(client)
    assert client.endpoint == "https://i.klime.com"
    assert client.flush_interval == 2000
    assert client.max_batch_size == 20
    assert client.max_queue_size == 1000
    assert client.retry_max_attempts == 5
    assert client.retry_initial_delay == 1000
    assert client.flush_on_shutdown is True
    assert client.request_timeout == 10000
    assert client.shutdown_timeout == 10000
    assert client.queue_size() == 0


def test_default_logger_is_klime(collector: Collector, caplog: pytest.LogCaptureFixture) -> None:
    client = KlimeClient("k", collector.url)
    client.shutdown()
    with caplog.at_level(logging.WARNING, logger="klime"):
        client.track("Ignored", user_id="u")
    assert [r.name for r in caplog.records] == ["klime"]


def test_all_options_given(collector: Collector, own_clients: List[KlimeClient]) -> None:
    rec = Recorder()
    logger = logging.getLogger("klime.custom")
    client = KlimeClient(
        "k",
        collector.url,
        500,
        50,
        10,
        2,
        5,
        False,
        logger,
        rec.on_error,
        rec.on_success,
        request_timeout=1234,
        shutdown_timeout=2345,
    )
    own_clients.append(client)
    assert (client.endpoint, client.flush_interval, client.max_batch_size, client.max_queue_size) == (
        collector.url,
        500,
        50,
        10,
    )
    assert (client.retry_max_attempts, client.retry_initial_delay, client.flush_on_shutdown) == (2, 5, False)
    assert (client.request_timeout, client.shutdown_timeout) == (1234, 2345)

    collector.respond(500)
    collector.respond(500)
    client.track("Fails", user_id="u")
    client.track("Fails too", user_id="u")
    assert client.flush(timeout=5) is False
    # retry_max_attempts=2: two attempts at the one batch, then on_error
    assert [len(r.events) for r in collector.requests] == [2, 2]
    assert [(e.reason, len(evs)) for e, evs in rec.errors] == [("retries_exhausted", 2)]  # type: ignore[attr-defined]
    assert rec.successes == []
    client.track("Works", user_id="u")
    assert client.flush(timeout=5) is True
    assert [r.accepted for r in rec.successes] == [1]


def test_request_and_shutdown_timeouts_are_keyword_only(collector: Collector) -> None:
    with pytest.raises(TypeError):
        KlimeClient("k", collector.url, None, None, None, None, None, None, None, None, None, 1000)  # type: ignore[misc]


@pytest.mark.parametrize("given, expected", [(1, 1), (100, 100), (101, 100), (500, 100), (10**9, 100)])
def test_max_batch_size_capped_at_100(make_client: MakeClient, collector: Collector, given: int, expected: int) -> None:
    assert make_client(collector.url, max_batch_size=given).max_batch_size == expected


def test_batches_never_exceed_100_events(make_client: MakeClient, collector: Collector) -> None:
    client = make_client(collector.url, max_batch_size=1000)
    for i in range(250):
        client.track("E", user_id=f"u{i}")
    assert client.flush(timeout=5) is True
    # Batches may go out on several lanes at once, so in any order.
    assert sorted(len(r.events) for r in collector.requests) == [50, 100, 100]


INT_OPTIONS = ["max_batch_size", "max_queue_size", "retry_max_attempts"]
DURATION_OPTIONS = ["flush_interval", "retry_initial_delay", "request_timeout", "shutdown_timeout"]


@pytest.mark.parametrize("option", INT_OPTIONS + DURATION_OPTIONS)
@pytest.mark.parametrize("value", [0, -1, -0.5, float("nan"), float("inf")])
def test_out_of_range_options_raise_value_error(collector: Collector, option: str, value: float) -> None:
    if option in INT_OPTIONS and isinstance(value, float):
        exc: type = (TypeError, ValueError)
    else:
        exc = ValueError
    with pytest.raises(exc, match=option):
        KlimeClient("k", collector.url, **{option: value})


@pytest.mark.parametrize("option", INT_OPTIONS + DURATION_OPTIONS)
@pytest.mark.parametrize("value", ["10", True, False, [5], b"5"])
def test_wrongly_typed_options_raise_type_error(collector: Collector, option: str, value: Any) -> None:
    with pytest.raises(TypeError, match=option):
        KlimeClient("k", collector.url, **{option: value})


@pytest.mark.parametrize("option", INT_OPTIONS)
def test_int_options_refuse_floats(collector: Collector, option: str) -> None:
    with pytest.raises(TypeError, match=option):
        KlimeClient("k", collector.url, **{option: 10.5})


@pytest.mark.parametrize(
    "options",
    [
        {"flush_on_shutdown": "yes"},
        {"flush_on_shutdown": 1},
        {"logger": "klime"},
        {"on_error": "print"},
        {"on_success": 42},
        {"endpoint": 8080},
        {"write_key": 1234},
    ],
)
def test_other_wrong_types_raise_type_error(collector: Collector, options: Dict[str, Any]) -> None:
    kwargs = {"write_key": "k", "endpoint": collector.url, **options}
    with pytest.raises(TypeError, match=next(iter(options))):
        KlimeClient(**kwargs)


@pytest.mark.parametrize(
    "endpoint", ["ftp://i.klime.com", "i.klime.com", "http://", "https:///v1", "file:///tmp/x", "//i.klime.com"]
)
def test_bad_endpoint_raises_value_error(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        KlimeClient("k", endpoint)


@pytest.mark.parametrize("key", ["sk_SECRET\n", "sk_SECRET\r\nX-Injected: 1", "sk_SE\x00CRET", "sk_SECRÉT"])
def test_write_key_that_cannot_be_a_header_raises_without_quoting_it(key: str) -> None:
    with pytest.raises(ValueError, match="write_key") as info:
        KlimeClient(key, "http://127.0.0.1:9")
    assert key.strip() not in str(info.value)


def test_float_durations_are_accepted(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url, flush_interval=50.5, retry_initial_delay=0.5)
    assert (client.flush_interval, client.retry_initial_delay) == (50.5, 0.5)


# --- programmer mistakes raise at the call site (docs/delivery.md) ------------------------------

CALL_ERRORS: List[Tuple[str, Tuple[Any, ...], Dict[str, Any], type, str]] = [
    ("track", ("",), {"user_id": "u"}, ValueError, "event name"),
    ("track", (None,), {"user_id": "u"}, TypeError, "event name"),
    ("track", (42,), {"user_id": "u"}, TypeError, "event name"),
    ("track", (b"Clicked",), {"user_id": "u"}, TypeError, "event name"),
    ("track", ("E",), {}, ValueError, "user_id or group_id"),
    ("track", ("E", {"a": 1}), {}, ValueError, "user_id or group_id"),
    ("track", ("E",), {"user_id": None, "group_id": None}, ValueError, "user_id or group_id"),
    ("track", ("E",), {"user_id": ""}, ValueError, "user_id"),
    ("track", ("E",), {"group_id": ""}, ValueError, "group_id"),
    ("track", ("E",), {"user_id": 123}, TypeError, "user_id"),
    ("track", ("E",), {"group_id": 456}, TypeError, "group_id"),
    ("track", ("E",), {"user_id": "u", "group_id": 1}, TypeError, "group_id"),
    ("track", ("E", ["a"]), {"user_id": "u"}, TypeError, "properties"),
    ("track", ("E", "a=1"), {"user_id": "u"}, TypeError, "properties"),
    ("track", ("E", 1), {"user_id": "u"}, TypeError, "properties"),
    ("track", ("E", {1: "x"}), {"user_id": "u"}, TypeError, "properties keys must be strings"),
    ("track", ("E", {"ok": 1, None: 2}), {"user_id": "u"}, TypeError, "properties keys must be strings"),
    ("identify", ("",), {}, ValueError, "user_id"),
    ("identify", (None,), {}, ValueError, "user_id"),
    ("identify", (42,), {}, TypeError, "user_id"),
    ("identify", ("u", "traits"), {}, TypeError, "traits"),
    ("identify", ("u", [("a", 1)]), {}, TypeError, "traits"),
    ("identify", ("u", {("a",): 1}), {}, TypeError, "traits keys must be strings"),
    ("group", ("",), {}, ValueError, "group_id"),
    ("group", (None,), {}, ValueError, "group_id"),
    ("group", (7,), {}, TypeError, "group_id"),
    ("group", ("g",), {"user_id": ""}, ValueError, "user_id"),
    ("group", ("g",), {"user_id": 3}, TypeError, "user_id"),
    ("group", ("g", ["plan"]), {}, TypeError, "traits"),
    ("group", ("g", {2: "x"}), {}, TypeError, "traits keys must be strings"),
]


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize(
    "method, args, kwargs, exc, match", CALL_ERRORS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALL_ERRORS)]
)
def test_programmer_mistakes_raise_at_call_site(
    collector: Collector,
    make_client: MakeClient,
    recorder: Recorder,
    sync: bool,
    method: str,
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    exc: type,
    match: str,
) -> None:
    client = make_client(collector.url)
    call = getattr(client, method + ("_sync" if sync else ""))
    with pytest.raises(exc, match=match) as info:
        call(*args, **kwargs)
    assert not isinstance(info.value, SendError)
    assert client.queue_size() == 0
    assert client.flush(timeout=5) is True
    assert collector.requests == [] and recorder.errors == []


def test_error_messages_say_what_to_do(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    with pytest.raises(ValueError) as info:
        client.track("E")
    assert "user_id" in str(info.value) and "group_id" in str(info.value)
    with pytest.raises(TypeError) as info2:
        client.identify(12345)  # type: ignore[arg-type]
    assert "str" in str(info2.value)
    with pytest.raises(TypeError) as info3:
        client.track("E", [1, 2], user_id="u")  # type: ignore[arg-type]
    assert "list" in str(info3.value)


def test_runtime_conditions_never_raise_from_async_calls(recorder: Recorder, make_client: MakeClient) -> None:
    client = make_client(refused_url(), max_queue_size=2, retry_max_attempts=1)
    for i in range(5):
        client.track("E", {"bad": float("nan"), "big": "x" * 300_000}, user_id=f"u{i}")
        client.identify(f"u{i}", {"obj": object()})
    assert client.flush(timeout=5) is False
    assert len(recorder.failed_events) == 10


# --- conveniences (docs/configuration.md) ----------------------------------------------------------------


def test_write_key_and_endpoint_from_environment(env: Collector, own_clients: List[KlimeClient]) -> None:
    client = KlimeClient(flush_interval=60_000)
    own_clients.append(client)
    assert client.endpoint == env.url
    client.track_sync("E", user_id="u")
    assert env.requests[0].headers["Authorization"] == "Bearer docs-write-key"


def test_arguments_override_the_environment(
    env: Collector, monkeypatch: pytest.MonkeyPatch, own_clients: List[KlimeClient]
) -> None:
    monkeypatch.setenv("KLIME_ENDPOINT", refused_url())
    client = KlimeClient("explicit-key", env.url)
    own_clients.append(client)
    client.identify_sync("u")
    assert env.requests[0].headers["Authorization"] == "Bearer explicit-key"


@pytest.mark.parametrize("value", [None, ""])
def test_missing_write_key_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch, value: Any) -> None:
    if value is None:
        monkeypatch.delenv("KLIME_WRITE_KEY", raising=False)
    else:
        monkeypatch.setenv("KLIME_WRITE_KEY", value)
    with pytest.raises(ValueError, match="KLIME_WRITE_KEY"):
        KlimeClient()
    with pytest.raises(ValueError, match="KLIME_WRITE_KEY"):
        KlimeClient(write_key="", endpoint="http://127.0.0.1:9")


def test_context_manager_shuts_down_on_exit(collector: Collector, recorder: Recorder) -> None:
    with KlimeClient("k", collector.url, **FAST, on_error=recorder.on_error) as client:
        assert isinstance(client, KlimeClient)
        client.track("Inside", user_id="u")
        client.identify("u")
    assert [e["type"] for e in collector.events] == ["track", "identify"]
    with pytest.raises(SendError) as info:
        client.track_sync("After", user_id="u")
    assert info.value.reason == "shutdown"  # type: ignore[attr-defined]
    client.track("Ignored", user_id="u")
    assert client.queue_size() == 0
    assert len(collector.events) == 2 and recorder.errors == []


def test_context_manager_shuts_down_when_the_block_raises(collector: Collector) -> None:
    with pytest.raises(RuntimeError, match="boom"), KlimeClient("k", collector.url, **FAST) as client:
        client.track("Before", user_id="u")
        raise RuntimeError("boom")
    assert [e["event"] for e in collector.events] == ["Before"]
    with pytest.raises(SendError):
        client.identify_sync("u")


def _six_calls(client: KlimeClient) -> List[Callable[..., Any]]:
    """Each of the six calls with valid arguments, taking only the extra keywords."""
    return [
        lambda **kw: client.track("T", user_id="u", **kw),
        lambda **kw: client.identify("u", **kw),
        lambda **kw: client.group("g", user_id="u", **kw),
        lambda **kw: client.track_sync("T", group_id="g", **kw),
        lambda **kw: client.identify_sync("u", {"a": 1}, **kw),
        lambda **kw: client.group_sync("g", **kw),
    ]


SIX = ["track", "identify", "group", "track_sync", "identify_sync", "group_sync"]


@pytest.mark.parametrize(
    "given, expected",
    [
        (datetime(2025, 3, 4, 5, 6, 7, 891234, tzinfo=timezone.utc), "2025-03-04T05:06:07.891Z"),
        (datetime(2025, 3, 4, 5, 6, 7, 891234), "2025-03-04T05:06:07.891Z"),  # naive means UTC
        (datetime(2025, 3, 4, 7, 6, 7, tzinfo=timezone(timedelta(hours=2))), "2025-03-04T05:06:07.000Z"),
        ("2025-03-04T05:06:07.891Z", "2025-03-04T05:06:07.891Z"),
        ("2025-03-04T05:06:07Z", "2025-03-04T05:06:07.000Z"),
        ("2025-03-04T00:06:07.500-05:00", "2025-03-04T05:06:07.500Z"),
        ("2025-03-04T05:06:07.123456+00:00", "2025-03-04T05:06:07.123Z"),
        ("2025-03-04T05:06:07", "2025-03-04T05:06:07.000Z"),
    ],
)
def test_timestamp_override_on_all_six_calls(
    collector: Collector, make_client: MakeClient, given: Any, expected: str
) -> None:
    client = make_client(collector.url)
    for call in _six_calls(client):
        call(timestamp=given)
    assert client.flush(timeout=5) is True
    events = collector.events
    assert len(events) == 6
    assert [e["timestamp"] for e in events] == [expected] * 6


@pytest.mark.parametrize(
    "bad, exc",
    [
        ("yesterday", ValueError),
        ("", ValueError),
        ("2025-13-01T00:00:00Z", ValueError),
        ("2025-03-04T25:00:00Z", ValueError),
        (1741064767, TypeError),
        (1741064767.5, TypeError),
        (b"2025-03-04T05:06:07Z", TypeError),
    ],
)
@pytest.mark.parametrize("which", range(6), ids=SIX)
def test_invalid_timestamp_raises_on_all_six_calls(
    collector: Collector, make_client: MakeClient, bad: Any, exc: type, which: int
) -> None:
    client = make_client(collector.url)
    with pytest.raises(exc, match="timestamp"):
        _six_calls(client)[which](timestamp=bad)
    assert client.queue_size() == 0
    assert collector.requests == []


def test_message_id_used_as_given_on_all_six_calls(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    ids = [f"resend-{name}" for name in SIX]
    for call, mid in zip(_six_calls(client), ids):
        call(message_id=mid)
    # with both overrides at once, too
    client.track("Both", user_id="u", message_id="both-1", timestamp="2025-01-01T00:00:00Z")
    assert client.flush(timeout=5) is True
    sent = {e["messageId"]: e for e in collector.events}
    assert set(sent) == {*ids, "both-1"}
    assert sent["both-1"]["timestamp"] == "2025-01-01T00:00:00.000Z"
    for name in SIX:
        ev = sent[f"resend-{name}"]
        assert ev["type"] == name.replace("_sync", "")


def test_message_id_alone_stamps_the_time_of_the_call(collector: Collector, make_client: MakeClient) -> None:
    """message_id= without timestamp= must not change the time (it once sent 1970-01-01)."""
    client = make_client(collector.url)
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)
    ids = [f"clock-{name}" for name in SIX]
    for call, mid in zip(_six_calls(client), ids):
        call(message_id=mid)
    after = datetime.now(timezone.utc)
    assert client.flush(timeout=5) is True
    sent = {e["messageId"]: e for e in collector.events}
    for mid in ids:
        stamp = datetime.strptime(sent[mid]["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        assert before <= stamp <= after, (mid, sent[mid]["timestamp"])


@pytest.mark.parametrize("bad, exc", [("", ValueError), (123, TypeError)])
@pytest.mark.parametrize("which", range(6), ids=SIX)
def test_invalid_message_id_raises(
    collector: Collector, make_client: MakeClient, bad: Any, exc: type, which: int
) -> None:
    client = make_client(collector.url)
    with pytest.raises(exc, match="message_id"):
        _six_calls(client)[which](message_id=bad)
    assert client.queue_size() == 0 and collector.requests == []


SECRET = "sk_live_TOPSECRET_0123456789"


def test_write_key_never_in_logs_errors_or_repr(
    collector: Collector, caplog: pytest.LogCaptureFixture, own_clients: List[KlimeClient]
) -> None:
    caplog.set_level(logging.DEBUG)
    rec = Recorder()
    client = KlimeClient(
        SECRET,
        collector.url,
        retry_max_attempts=2,
        on_error=rec.on_error,
        on_success=rec.on_success,
        **FAST,
    )
    own_clients.append(client)
    raised: List[SendError] = []

    # a retry, then success
    collector.respond(503, "overloaded", {"Retry-After": "0"})
    client.track_sync("Retried", user_id="u")
    # a partial success
    collector.respond(
        200, {"status": "partial", "accepted": 0, "failed": 1, "errors": [{"index": 0, "message": "bad", "code": "E"}]}
    )
    client.identify_sync("u")
    # permanent errors, one from a server that echoes the key back
    collector.respond(401, {"error": "unauthorized"})
    collector.respond(403, f"write key {SECRET} is not allowed here")
    collector.respond(400, {"error": f"Bearer {SECRET}"})
    for _ in range(3):
        try:
            client.group_sync("g")
        except SendError as exc:
            raised.append(exc)
    # retries exhausted, in the background
    collector.respond(500, f"echo {SECRET}")
    collector.respond(500, f"echo {SECRET}")
    client.track("Background", user_id="u")
    assert client.flush(timeout=5) is False
    # the endpoint down
    down = KlimeClient(SECRET, refused_url(), retry_max_attempts=2, on_error=rec.on_error, **FAST)
    own_clients.append(down)
    try:
        down.track_sync("Down", user_id="u")
    except SendError as exc:
        raised.append(exc)
    down.track("Down", user_id="u")
    down.flush(timeout=5)
    down.shutdown(timeout=1)
    try:
        down.identify_sync("u")
    except SendError as exc:
        raised.append(exc)

    assert len(raised) == 5 and len(rec.errors) == 2
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # the retries were logged
    texts = [caplog.text]
    texts += [r.getMessage() for r in caplog.records]
    for exc in raised + [e for e, _ in rec.errors]:
        texts += [str(exc), repr(exc), exc.message]  # type: ignore[attr-defined]
        texts += [repr(ev) for ev in exc.events]  # type: ignore[attr-defined]
    texts += [repr(client), str(client), repr(down)]
    leaks = [t for t in texts if SECRET in t]
    assert leaks == []
    # The echoed bodies still tell the user something useful.
    assert any("403" in str(e) for e in raised)


# --- *_sync ---------------------------------------------------------------------------------


def test_sync_returns_batch_response(collector: Collector, make_client: MakeClient, recorder: Recorder) -> None:
    client = make_client(collector.url)
    for response in (
        client.track_sync("E", {"a": 1}, "u", "g"),
        client.identify_sync("u", {"b": 2}),
        client.group_sync("g", {"c": 3}, "u"),
    ):
        assert isinstance(response, BatchResponse)
        assert (response.status, response.accepted, response.failed) == ("ok", 1, 0)
        assert not response.errors
    assert len(collector.requests) == 3
    assert all(len(r.events) == 1 for r in collector.requests)


def test_sync_sends_only_its_own_event(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track("Queued", user_id="u")
    client.identify_sync("u")
    assert [r.events[0]["type"] for r in collector.requests] == ["identify"]
    assert client.queue_size() == 1


def test_sync_partial_failure_parses_validation_errors(
    collector: Collector, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="klime")
    collector.respond(
        200,
        {
            "status": "partial",
            "accepted": 0,
            "failed": 1,
            "errors": [{"index": 0, "message": "userId too long", "code": "INVALID_USER_ID"}],
        },
    )
    client = make_client(collector.url)
    response = client.track_sync("E", user_id="u")
    assert response == BatchResponse(
        status="partial",
        accepted=0,
        failed=1,
        errors=[ValidationError(index=0, message="userId too long", code="INVALID_USER_ID")],
    )
    assert isinstance(response.errors[0], ValidationError)  # type: ignore[index]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("INVALID_USER_ID" in m and "0" in m for m in warnings)


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (200, {"status": "ok", "accepted": 1, "failed": 0}, ("ok", 1, 0, None)),
        (200, {"status": "ok", "accepted": 1, "failed": 0, "errors": []}, ("ok", 1, 0, [])),
        (202, "", ("ok", 1, 0, None)),
        (200, "accepted", ("ok", 1, 0, None)),
        (204, None, ("ok", 1, 0, None)),
        (201, ["not", "an", "object"], ("ok", 1, 0, None)),
    ],
)
def test_sync_success_bodies(
    collector: Collector, make_client: MakeClient, status: int, body: Any, expected: Tuple[Any, ...]
) -> None:
    collector.respond(status, body)
    response = make_client(collector.url).identify_sync("u")
    assert (response.status, response.accepted, response.failed, response.errors) == expected


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_sync_permanent_error_raises_send_error(collector: Collector, make_client: MakeClient, status: int) -> None:
    collector.respond(status, {"error": "nope"})
    client = make_client(collector.url)
    with pytest.raises(SendError) as info:
        client.track_sync("Critical Action", {"k": "v"}, user_id="u")
    err = info.value
    assert isinstance(err.message, str) and str(status) in err.message
    assert str(err) == err.message
    assert len(err.events) == 1 and isinstance(err.events[0], Event)
    assert err.events[0].event == "Critical Action"
    assert err.events[0].messageId == collector.events[0]["messageId"]
    assert err.status == status and err.reason == "permanent_error"  # type: ignore[attr-defined]
    assert len(collector.requests) == 1  # never retried


def test_sync_retries_transient_errors_then_succeeds(collector: Collector, make_client: MakeClient) -> None:
    collector.respond(503)
    collector.respond(429, "", {"Retry-After": "0"})
    collector.respond(408)
    client = make_client(collector.url)
    response = client.group_sync("g", user_id="u")
    assert response.accepted == 1
    ids = {e["messageId"] for e in collector.events}
    assert len(collector.requests) == 4 and len(ids) == 1  # the same event each time


def test_sync_retries_exhausted(collector: Collector, make_client: MakeClient) -> None:
    for _ in range(3):
        collector.respond(500)
    client = make_client(collector.url, retry_max_attempts=3)
    with pytest.raises(SendError) as info:
        client.identify_sync("u")
    assert info.value.reason == "retries_exhausted"  # type: ignore[attr-defined]
    assert info.value.events[0].userId == "u"
    assert len(collector.requests) == 3


def test_sync_connection_refused_raises_send_error(make_client: MakeClient) -> None:
    client = make_client(refused_url(), retry_max_attempts=2)
    with pytest.raises(SendError) as info:
        client.track_sync("E", user_id="u")
    assert info.value.message and len(info.value.events) == 1


def test_after_shutdown(collector: Collector, make_client: MakeClient, recorder: Recorder) -> None:
    client = make_client(collector.url)
    client.track("Before", user_id="u")
    assert client.shutdown(timeout=5) is True
    assert [e["event"] for e in collector.events] == ["Before"]

    for call in (
        lambda: client.track_sync("E", user_id="u"),
        lambda: client.identify_sync("u"),
        lambda: client.group_sync("g"),
    ):
        with pytest.raises(SendError) as info:
            call()
        assert info.value.reason == "shutdown"  # type: ignore[attr-defined]
        assert "shut down" in info.value.message
        assert len(info.value.events) == 1

    assert client.track("E", user_id="u") is None
    assert client.identify("u") is None
    assert client.group("g", user_id="u") is None
    assert client.queue_size() == 0
    assert client.flush(timeout=1) is True
    assert client.shutdown() is True  # a second shutdown does nothing
    assert len(collector.requests) == 1 and recorder.errors == []
    assert "shut down" in repr(client)


def test_flush_and_shutdown_accept_an_infinite_timeout(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track("One", user_id="u")
    assert client.flush(timeout=float("inf")) is True
    client.track("Two", user_id="u")
    assert client.shutdown(timeout=float("inf")) is True
    assert [e["event"] for e in collector.events] == ["One", "Two"]


# --- exports ------------------------------------------------------------------------------


def test_exported_names() -> None:
    expected = {"KlimeClient", "BatchResponse", "ValidationError", "SendError", "Event", "__version__"}
    expected |= {"Stats", "Reason", "OnError", "OnSuccess"}  # typing helpers and stats()
    expected |= {"AsyncKlimeClient", "scope", "flushing", "configure", "get_client", "queue_size"}
    expected |= {"track", "identify", "group", "track_sync", "identify_sync", "group_sync", "flush", "shutdown"}
    expected |= {"install_signal_handlers"}
    assert set(klime.__all__) == expected
    ns: Dict[str, Any] = {}
    exec("from klime import *", ns)
    assert {k for k in ns if k != "__builtins__"} == set(klime.__all__)
    assert issubclass(SendError, Exception)
    assert klime.KlimeClient is KlimeClient and klime.Event is Event


def _installed_from_here() -> bool:
    """Whether the installed ``klime`` distribution is the package imported here.

    Not so when the suite runs with ``PYTHONPATH`` pointing at another checkout
    (a worktree): the installed metadata then describes a different source tree.
    """
    dist = importlib.metadata.distribution("klime")
    imported = Path(klime.__file__).resolve().parent
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        root = Path(urllib.parse.urlparse(json.loads(direct)["url"]).path).resolve()
        return root in imported.parents
    return Path(str(dist.locate_file("klime"))).resolve() == imported


def test_version() -> None:
    assert klime.__version__ == "2.0.0"  # the successor of the official 1.x line, API-compatible
    if not _installed_from_here():
        pytest.skip(f"klime is imported from {Path(klime.__file__).parent}, not from the installed distribution")
    # Fails after a version change until the environment is reinstalled (pip install -e .).
    assert importlib.metadata.version("klime") == klime.__version__


def test_server_sees_the_version(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track_sync("Report Generated", user_id="u1")
    (request,) = collector.requests
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["user-agent"].startswith("klime-python/2.0.0 (Python ")
    (event,) = request.events
    assert event["context"]["library"] == {"name": "python-sdk", "version": "2.0.0"}


def test_result_types() -> None:
    err = ValidationError(index=2, message="bad", code="E_BAD")
    assert (err.index, err.message, err.code) == (2, "bad", "E_BAD")
    resp = BatchResponse(status="ok", accepted=3, failed=0)
    assert (resp.status, resp.accepted, resp.failed, resp.errors) == ("ok", 3, 0, None)
    exc = SendError("went wrong", [])
    assert exc.message == "went wrong" and exc.events == [] and str(exc) == "went wrong"
