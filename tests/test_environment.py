"""Every constructor option from a ``KLIME_*`` environment variable (issue 11, item 5).

Explicit arguments win over the environment; a bad value raises ValueError
at construction naming the variable and the value. Each option is also
shown to take effect against a loopback server, not only to be stored.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Iterator, List

import pytest

from klime import KlimeClient, SendError
from klime._deadline import Deadline

from .conftest import RawServers, Recorder
from .servers import Collector, Held, wait_until

KEY = "env-write-key"

Make = Callable[..., KlimeClient]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No KLIME_* variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.startswith("KLIME_"):
            monkeypatch.delenv(name)


@pytest.fixture
def make(recorder: Recorder) -> Iterator[Make]:
    """Clients built from the environment (plus what a test passes); shut down afterwards."""
    clients: List[KlimeClient] = []

    def build(*args: Any, **kwargs: Any) -> KlimeClient:
        kwargs.setdefault("on_error", recorder.on_error)
        kwargs.setdefault("on_success", recorder.on_success)
        kwargs.setdefault("logger", logging.getLogger("klime.test.env"))
        client = KlimeClient(*args, **kwargs)
        clients.append(client)
        return client

    yield build
    for c in clients:
        c.shutdown(timeout=1)


@pytest.fixture
def servers(make: Make, raw_servers: RawServers) -> RawServers:
    """conftest's ``raw_servers``, closed before ``make``'s clients are shut down (set up after them)."""
    return raw_servers


# --- each variable sets its option ------------------------------------------------------

NUMERIC = [
    ("KLIME_FLUSH_INTERVAL", "1500", "flush_interval", 1500),
    ("KLIME_FLUSH_INTERVAL", "2.5", "flush_interval", 2.5),
    ("KLIME_MAX_BATCH_SIZE", "7", "max_batch_size", 7),
    ("KLIME_MAX_BATCH_SIZE", " 250 ", "max_batch_size", 100),  # capped as an argument is
    ("KLIME_MAX_QUEUE_SIZE", "33", "max_queue_size", 33),
    ("KLIME_RETRY_MAX_ATTEMPTS", "2", "retry_max_attempts", 2),
    ("KLIME_RETRY_INITIAL_DELAY", "25", "retry_initial_delay", 25),
    ("KLIME_REQUEST_TIMEOUT", "1234", "request_timeout", 1234),
    ("KLIME_SHUTDOWN_TIMEOUT", "4321", "shutdown_timeout", 4321),
]


@pytest.mark.parametrize(("var", "value", "attribute", "expected"), NUMERIC)
def test_numeric_variable_sets_its_option(
    monkeypatch: pytest.MonkeyPatch,
    make: Make,
    collector: Collector,
    var: str,
    value: str,
    attribute: str,
    expected: Any,
) -> None:
    monkeypatch.setenv(var, value)
    client = make(KEY, collector.url)
    assert getattr(client, attribute) == expected


EXPLICIT = {
    "flush_interval": 900,
    "max_batch_size": 9,
    "max_queue_size": 99,
    "retry_max_attempts": 3,
    "retry_initial_delay": 50,
    "request_timeout": 800,
    "shutdown_timeout": 700,
    "flush_on_shutdown": False,
}


@pytest.mark.parametrize("env_value", ["4", "not-a-number"])
def test_explicit_arguments_win_even_over_a_bad_variable(
    monkeypatch: pytest.MonkeyPatch, make: Make, collector: Collector, env_value: str
) -> None:
    for var, *_ in NUMERIC:
        monkeypatch.setenv(var, env_value)
    monkeypatch.setenv("KLIME_FLUSH_ON_SHUTDOWN", "yes" if env_value == "4" else "perhaps")
    monkeypatch.setenv("KLIME_DISABLED", "1" if env_value == "4" else "perhaps")
    monkeypatch.setenv("KLIME_DEBUG", "1" if env_value == "4" else "perhaps")
    monkeypatch.setenv("KLIME_WRITE_KEY", "env-key-not-used")
    monkeypatch.setenv("KLIME_ENDPOINT", "http://127.0.0.1:1")
    client = make(KEY, collector.url, disabled=False, debug=False, **EXPLICIT)
    for name, value in EXPLICIT.items():
        assert getattr(client, name) == value, name
    assert client.endpoint == collector.url
    assert client._options.disabled is False and client._options.debug is False
    client.track_sync("Explicit", user_id="u1")
    [received] = collector.requests
    assert received.headers["Authorization"] == f"Bearer {KEY}", "the explicit key, not KLIME_WRITE_KEY"


def test_write_key_and_endpoint_from_the_environment_reach_the_server(
    monkeypatch: pytest.MonkeyPatch, make: Make, collector: Collector
) -> None:
    monkeypatch.setenv("KLIME_WRITE_KEY", KEY)
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url + "/")
    client = make()
    assert client.endpoint == collector.url
    client.track("From Env", user_id="u1")
    assert client.flush(timeout=10)
    [received] = collector.requests
    assert received.path == "/v1/batch"
    assert received.headers["Authorization"] == f"Bearer {KEY}"
    assert [e["event"] for e in received.events] == ["From Env"]


def test_an_empty_write_key_variable_is_a_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLIME_WRITE_KEY", "")
    with pytest.raises(ValueError, match=r"^write_key is required.*KLIME_WRITE_KEY"):
        KlimeClient()


def test_a_bad_endpoint_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLIME_ENDPOINT", "ftp://i.klime.example")
    with pytest.raises(ValueError, match="KLIME_ENDPOINT") as info:
        KlimeClient(KEY)
    assert "ftp://i.klime.example" in str(info.value)


# --- booleans ----------------------------------------------------------------------------

TRUE = ["1", "true", "yes", "TRUE", "True", "YES", "Yes", "tRuE", " 1 "]
FALSE = ["0", "false", "no", "FALSE", "False", "NO", "No", "fAlSe"]
FLAGS = ["KLIME_FLUSH_ON_SHUTDOWN", "KLIME_DISABLED", "KLIME_DEBUG"]


def _flag(client: KlimeClient, var: str) -> bool:
    return {
        "KLIME_FLUSH_ON_SHUTDOWN": client.flush_on_shutdown,
        "KLIME_DISABLED": client._options.disabled,
        "KLIME_DEBUG": client._options.debug,
    }[var]


@pytest.mark.parametrize("var", FLAGS)
@pytest.mark.parametrize(("spelling", "expected"), [(s, True) for s in TRUE] + [(s, False) for s in FALSE])
def test_boolean_variables_in_any_case(
    monkeypatch: pytest.MonkeyPatch, make: Make, collector: Collector, var: str, spelling: str, expected: bool
) -> None:
    monkeypatch.setenv(var, spelling)
    client = make(KEY, collector.url, logger=logging.getLogger(f"klime.test.env.{var}.{expected}"))
    assert _flag(client, var) is expected


# --- bad values -------------------------------------------------------------------------------

BAD = [
    *[(v, x) for v in ("KLIME_MAX_BATCH_SIZE", "KLIME_MAX_QUEUE_SIZE", "KLIME_RETRY_MAX_ATTEMPTS")
      for x in ("abc", "2.5", "0", "-3", "nan", "inf", "1e3")],
    *[(v, x) for v in ("KLIME_FLUSH_INTERVAL", "KLIME_RETRY_INITIAL_DELAY", "KLIME_REQUEST_TIMEOUT",
                       "KLIME_SHUTDOWN_TIMEOUT")
      for x in ("abc", "0", "-1", "nan", "inf", "-inf", "1e400", "5ms")],
    *[(v, x) for v in FLAGS for x in ("maybe", "2", "enabled", "y", "1 0")],
]


@pytest.mark.parametrize(("var", "value"), BAD)
def test_a_bad_value_raises_naming_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    before = threading.active_count()
    with pytest.raises(ValueError) as info:
        KlimeClient(KEY, "http://127.0.0.1:9")
    assert var in str(info.value)
    assert repr(value) in str(info.value) or value in str(info.value)
    assert threading.active_count() == before, "nothing started for a client that was refused"


def test_a_bad_value_is_refused_even_for_a_disabled_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLIME_DISABLED", "1")
    monkeypatch.setenv("KLIME_MAX_QUEUE_SIZE", "lots")
    with pytest.raises(ValueError, match="KLIME_MAX_QUEUE_SIZE='lots'"):
        KlimeClient()


# --- each variable takes effect ------------------------------------------------------------


def test_max_batch_size_from_the_environment_splits_batches(
    monkeypatch: pytest.MonkeyPatch, make: Make, collector: Collector
) -> None:
    monkeypatch.setenv("KLIME_MAX_BATCH_SIZE", "3")
    client = make(KEY, collector.url, flush_interval=60_000)
    for i in range(7):
        client.track("Split", {"i": i}, user_id="u1")
    assert client.flush(timeout=10)
    assert sorted(len(r.events) for r in collector.requests) == [1, 3, 3]
    assert sorted(e["properties"]["i"] for e in collector.events) == list(range(7))


def test_flush_interval_from_the_environment_sends_without_flush(
    monkeypatch: pytest.MonkeyPatch, make: Make, collector: Collector
) -> None:
    monkeypatch.setenv("KLIME_FLUSH_INTERVAL", "50")
    client = make(KEY, collector.url)
    client.track("Ticked", user_id="u1")
    assert [e["event"] for e in collector.wait_for_events(1, timeout=15)] == ["Ticked"]


def test_max_queue_size_from_the_environment_bounds_the_queue(
    monkeypatch: pytest.MonkeyPatch, make: Make, servers: RawServers, recorder: Recorder
) -> None:
    monkeypatch.setenv("KLIME_MAX_QUEUE_SIZE", "5")
    monkeypatch.setenv("KLIME_MAX_BATCH_SIZE", "5")
    gate = Held(0)
    server = servers(gate)
    client = make(KEY, server.url, flush_interval=60_000, max_in_flight=1)
    for i in range(5):
        client.track("Q", {"i": i}, user_id="u1")
    assert len(server.wait_for_requests(1, timeout=10)) == 1  # the first batch is on the wire, held
    for i in range(5, 12):
        client.track("Q", {"i": i}, user_id="u1")
    assert client.queue_size() <= 5
    gate.release()
    assert not client.flush(timeout=10)
    dropped = [ev.properties["i"] for err, evs in recorder.errors for ev in evs if err.reason == "queue_overflow"]
    assert dropped == [5, 6]
    assert client.stats().failed == {"queue_overflow": 2}


def test_retry_max_attempts_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, make: Make, servers: RawServers
) -> None:
    monkeypatch.setenv("KLIME_RETRY_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("KLIME_RETRY_INITIAL_DELAY", "5")
    server = servers(lambda req: (503, b'{"error":"busy"}'))
    client = make(KEY, server.url)
    with pytest.raises(SendError) as info:
        client.track_sync("Retried", user_id="u1")
    assert info.value.reason == "retries_exhausted"
    assert len(server.requests) == 2
    assert client.stats().retries == 1


def test_request_timeout_from_the_environment_bounds_an_attempt(
    monkeypatch: pytest.MonkeyPatch, make: Make, servers: RawServers
) -> None:
    monkeypatch.setenv("KLIME_REQUEST_TIMEOUT", "200")
    monkeypatch.setenv("KLIME_RETRY_MAX_ATTEMPTS", "1")
    server = servers(lambda req: "hang")
    client = make(KEY, server.url)
    with pytest.raises(SendError, match=r"(?i)timed? ?out"):
        client.track_sync("Hung", user_id="u1")
    assert len(server.requests) == 1


def test_shutdown_timeout_from_the_environment_bounds_shutdown(
    monkeypatch: pytest.MonkeyPatch, make: Make, servers: RawServers, recorder: Recorder
) -> None:
    monkeypatch.setenv("KLIME_SHUTDOWN_TIMEOUT", "300")
    server = servers(lambda req: "hang")
    client = make(KEY, server.url, request_timeout=60_000, flush_interval=60_000)
    client.track("Stuck", user_id="u1")
    assert client.shutdown() is False
    assert [err.reason for err, _ in recorder.errors] == ["shutdown_deadline"]


@pytest.mark.parametrize(("value", "delivered"), [("0", False), ("no", False), ("1", True), ("Yes", True)])
def test_flush_on_shutdown_from_the_environment_decides_what_exit_does(
    monkeypatch: pytest.MonkeyPatch, make: Make, collector: Collector, recorder: Recorder, value: str, delivered: bool
) -> None:
    monkeypatch.setenv("KLIME_FLUSH_ON_SHUTDOWN", value)
    client = make(KEY, collector.url, flush_interval=60_000)
    client.track("At Exit", user_id="u1")
    # What the exit hook does for each open client (klime._lifecycle.exit_all).
    client._begin_exit()
    client._finish_exit(Deadline.after(10))
    if delivered:
        assert [e["event"] for e in collector.events] == ["At Exit"]
        assert recorder.errors == []
    else:
        assert collector.requests == []
        assert [err.reason for err, _ in recorder.errors] == ["not_flushed_at_exit"]


def test_disabled_from_the_environment_needs_no_key_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, make: Make, collector: Collector
) -> None:
    monkeypatch.setenv("KLIME_DISABLED", "1")
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    before = set(threading.enumerate())
    client = make()
    client.track("Off", user_id="u1")
    assert client.track_sync("Off", user_id="u1").status == "disabled"
    assert client.flush(timeout=5)
    assert set(threading.enumerate()) <= before
    assert collector.requests == []
    with pytest.raises(ValueError):
        client.track("", user_id="u1")


def test_debug_from_the_environment_logs_each_event(
    monkeypatch: pytest.MonkeyPatch, make: Make, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KLIME_DEBUG", "1")
    logger = logging.getLogger("klime.test.env.debug")
    logger.setLevel(logging.WARNING)
    try:
        client = make(KEY, collector.url, logger=logger)
        assert logger.level == logging.DEBUG
        client.track("Seen", user_id="u1")
        assert client.flush(timeout=10)
        assert wait_until(lambda: any('"event":"Seen"' in r.getMessage() for r in caplog.records))
        assert all(KEY not in r.getMessage() for r in caplog.records)
    finally:
        logger.setLevel(logging.NOTSET)
