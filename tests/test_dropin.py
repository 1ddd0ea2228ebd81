"""Drop-in down to users' tests (issue 12), through the public client.

Users' suites written for the official SDK patch ``urllib.request.urlopen``,
import the official types from ``klime.types`` and match its messages. These
are this package's own regression tests for each of those habits; the
official suite itself is run by ``.ci/run``. Patching the standard library's
``urlopen`` is what users do and what is under test; our HTTP layer is never
replaced.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional
from unittest.mock import MagicMock, patch

import pytest

from klime import KlimeClient
from klime.types import (
    BatchResponse,
    Event,
    EventContext,
    EventType,
    LibraryInfo,
    SendError,
    ValidationError,
)

from .conftest import RawServers, Recorder
from .servers import wait_until

KEY = "wk_dropin_key"
ENDPOINT = "https://i.klime.example"  # never reached: every test patches urlopen or uses a loopback server


@pytest.fixture(autouse=True)
def no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KLIME_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def clients(recorder: Recorder) -> Iterator[Callable[..., KlimeClient]]:
    made: List[KlimeClient] = []

    def make(endpoint: str = ENDPOINT, **options: Any) -> KlimeClient:
        opts: Dict[str, Any] = dict(
            flush_interval=60_000,
            retry_initial_delay=1,
            on_error=recorder.on_error,
            on_success=recorder.on_success,
            logger=logging.getLogger("klime.test.dropin"),
        )
        opts.update(options)
        client = KlimeClient(KEY, endpoint, **opts)
        made.append(client)
        return client

    yield make
    for c in made:
        c.shutdown(timeout=1)


def answer(body: Optional[Dict[str, Any]] = None, status: int = 200, headers: Any = None) -> MagicMock:
    """What a user's test returns from its urlopen double: a context manager with status/headers/read()."""
    resp = MagicMock()
    resp.status = status
    resp.headers = {} if headers is None else headers
    payload = body if body is not None else {"status": "ok", "accepted": 1, "failed": 0}
    resp.read.return_value = json.dumps(payload).encode()
    resp.__enter__.return_value = resp
    resp.__exit__.return_value = False
    return resp


def accept_all(request: urllib.request.Request, timeout: Optional[float] = None) -> MagicMock:
    n = len(json.loads(request.data)["batch"])  # type: ignore[arg-type]
    return answer({"status": "ok", "accepted": n, "failed": 0})


def http_error(code: int, headers: Optional[Dict[str, str]] = None) -> urllib.error.HTTPError:
    return urllib.error.HTTPError(
        f"{ENDPOINT}/v1/batch", code, "err", headers or {}, io.BytesIO(b'{"error":"x"}')  # type: ignore[arg-type]
    )


def sent_batches(urlopen: MagicMock) -> List[List[Dict[str, Any]]]:
    return [json.loads(call.args[0].data)["batch"] for call in urlopen.call_args_list]


# --- a patched urlopen gets the request --------------------------------------------------------


def test_patched_urlopen_receives_the_batch_as_the_official_sdk_sends_it(
    clients: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    with patch("urllib.request.urlopen", side_effect=accept_all) as urlopen:
        client = clients(ENDPOINT + "/")
        client.identify("u1", {"email": "ada@example.com"})
        client.track("Clicked", {"plan": "pro"}, user_id="u1")
        client.group("g1", {"seats": 3}, user_id="u1")
        assert client.flush(timeout=10)
    [call] = urlopen.call_args_list
    request = call.args[0]
    assert isinstance(request, urllib.request.Request)
    assert request.full_url == f"{ENDPOINT}/v1/batch"
    assert request.get_method() == "POST"
    assert request.get_header("Authorization") == f"Bearer {KEY}"
    assert request.get_header("Content-type") == "application/json"
    assert isinstance(request.data, bytes)
    body = json.loads(request.data)
    assert list(body) == ["batch"]
    identify, track, group = body["batch"]
    assert (identify["type"], identify["userId"]) == ("identify", "u1")
    assert identify["traits"] == {"email": "ada@example.com"}
    assert (track["type"], track["event"], track["properties"]) == ("track", "Clicked", {"plan": "pro"})
    assert (group["type"], group["groupId"], group["userId"]) == ("group", "g1", "u1")
    assert track["context"] == {"library": {"name": "python-sdk", "version": __import__("klime").__version__}}
    assert [r.accepted for r in recorder.successes] == [3]


def test_a_client_built_before_the_patch_uses_it_and_the_network_after_it(
    clients: Callable[..., KlimeClient], raw_servers: RawServers, recorder: Recorder
) -> None:
    server = raw_servers()
    client = clients(server.url)  # a module-level client, created at import
    with patch("urllib.request.urlopen", side_effect=accept_all) as urlopen:
        client.track("Patched", user_id="u1")
        assert client.flush(timeout=10)
        assert client.track_sync("Patched Sync", user_id="u1").accepted == 1
    assert [e["event"] for b in sent_batches(urlopen) for e in b] == ["Patched", "Patched Sync"]
    assert server.connections == 0, "nothing reached the network while patched"
    client.track("Unpatched", user_id="u1")
    assert client.flush(timeout=10)
    assert [e["event"] for r in server.requests for e in r.json()["batch"]] == ["Unpatched"]


def test_sync_results_and_callbacks_as_on_the_real_transport(
    clients: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    partial = {
        "status": "partial",
        "accepted": 1,
        "failed": 1,
        "errors": [{"index": 1, "message": "invalid userId", "code": "invalid"}],
    }
    with patch("urllib.request.urlopen", return_value=answer()):
        client = clients()
        response = client.track_sync("One", user_id="u1")
    assert response == BatchResponse(status="ok", accepted=1, failed=0)
    assert recorder.successes == [], "sync calls do not call on_success"
    with patch("urllib.request.urlopen", return_value=answer(partial)):
        client = clients(max_batch_size=2)
        client.track("A", user_id="u1")
        client.track("B", user_id="u2")
        assert client.flush(timeout=10) is False, "one event was rejected"
    [success] = recorder.successes
    assert isinstance(success, BatchResponse)
    assert (success.accepted, success.failed) == (1, 1)
    assert success.errors == [ValidationError(index=1, message="invalid userId", code="invalid")]
    stats = client.stats()
    assert (stats.delivered, stats.rejected) == (1, 1)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 413, 422])
def test_http_error_4xx_is_permanent_not_retried(
    clients: Callable[..., KlimeClient], recorder: Recorder, code: int
) -> None:
    with patch("urllib.request.urlopen", side_effect=http_error(code)) as urlopen:
        client = clients(retry_max_attempts=5)
        client.track("Refused", user_id="u1")
        assert client.flush(timeout=10) is False
        assert urlopen.call_count == 1
        with pytest.raises(SendError) as info:
            client.track_sync("Refused Sync", user_id="u1")
        assert urlopen.call_count == 2
    [(error, events)] = recorder.errors
    assert (error.reason, error.status) == ("permanent_error", code)
    assert [ev.event for ev in events] == ["Refused"]
    assert "Failed to send" in info.value.message and str(code) in info.value.message
    assert (info.value.reason, info.value.status) == ("permanent_error", code)


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
def test_http_error_transient_is_retried_per_policy(
    clients: Callable[..., KlimeClient], recorder: Recorder, code: int
) -> None:
    with patch("urllib.request.urlopen", side_effect=http_error(code)) as urlopen:
        client = clients(retry_max_attempts=3)
        client.track("Busy", user_id="u1")
        assert client.flush(timeout=30) is False
        assert urlopen.call_count == 3
    [(error, _)] = recorder.errors
    assert (error.reason, error.status) == ("retries_exhausted", code)
    assert client.stats().retries == 2


def test_503_then_success_delivers(clients: Callable[..., KlimeClient], recorder: Recorder) -> None:
    with patch("urllib.request.urlopen", side_effect=[http_error(503), http_error(503), answer()]) as urlopen:
        client = clients(retry_max_attempts=5)
        assert client.identify_sync("u1").accepted == 1
    assert urlopen.call_count == 3
    assert len({json.loads(c.args[0].data)["batch"][0]["messageId"] for c in urlopen.call_args_list}) == 1


@pytest.mark.parametrize(
    "exc",
    [urllib.error.URLError("Name or service not known"), ConnectionResetError(104, "reset"), TimeoutError("timed out")],
    ids=["URLError", "ConnectionResetError", "TimeoutError"],
)
def test_url_and_os_errors_are_connection_errors(
    clients: Callable[..., KlimeClient], recorder: Recorder, exc: OSError
) -> None:
    with patch("urllib.request.urlopen", side_effect=exc) as urlopen:
        client = clients(retry_max_attempts=2)
        with pytest.raises(SendError) as info:
            client.group_sync("g1")
        assert urlopen.call_count == 2, "retried like any connection error"
    assert info.value.reason == "retries_exhausted"
    assert info.value.message.startswith("Failed to send 1 event(s)")
    assert KEY not in info.value.message


def test_the_write_key_stays_out_of_what_a_patched_failure_reports(
    clients: Callable[..., KlimeClient], recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    error = urllib.error.HTTPError(
        ENDPOINT, 401, "Unauthorized", {}, io.BytesIO(f'{{"error":"bad key {KEY}"}}'.encode())  # type: ignore[arg-type]
    )
    with patch("urllib.request.urlopen", side_effect=error):
        client = clients()
        client.track("X", user_id="u1")
        assert client.flush(timeout=10) is False
    [(err, _)] = recorder.errors
    assert KEY not in err.message and KEY not in repr(err)
    assert all(KEY not in r.getMessage() for r in caplog.records)


def test_unpatched_sends_build_no_urllib_request(
    clients: Callable[..., KlimeClient], raw_servers: RawServers
) -> None:
    built: List[Any] = []
    original = urllib.request.Request

    class Counting(original):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(args)
            super().__init__(*args, **kwargs)

    server = raw_servers()
    client = clients(server.url, max_batch_size=5)
    with patch("urllib.request.Request", Counting):
        for i in range(20):
            client.track("Plain", {"i": i}, user_id="u1")
        assert client.flush(timeout=10)
        assert client.track_sync("Plain Sync", user_id="u1").accepted == 1
    assert len(server.requests) == 5
    assert built == []
    assert client._sender.transport._urllib is None  # type: ignore[attr-defined]


# --- the official types ------------------------------------------------------------------------


def test_official_types_import_from_klime_types() -> None:
    import klime
    import klime.types as types

    for name in ("Event", "EventType", "EventContext", "LibraryInfo", "BatchResponse", "ValidationError", "SendError"):
        assert hasattr(types, name), name
    assert types.Event is klime.Event and types.SendError is klime.SendError
    assert issubclass(EventType, str)
    assert [m.name for m in EventType] == ["TRACK", "IDENTIFY", "GROUP"]
    assert (EventType.TRACK, EventType.IDENTIFY, EventType.GROUP) == ("track", "identify", "group")
    assert EventType("group") is EventType.GROUP
    info = LibraryInfo("python-sdk", "1.1.0")
    assert (info.name, info.version) == ("python-sdk", "1.1.0")
    assert LibraryInfo(name="n", version="v") == LibraryInfo("n", "v")
    assert EventContext().library is None
    assert EventContext(library=info).library is info


def test_event_with_official_keywords_to_dict() -> None:
    ctx = EventContext(library=LibraryInfo(name="python-sdk", version="1.1.0"))
    track = Event(
        type=EventType.TRACK,
        messageId="0b9c5b2e-6f1a-4c3e-9a57-2d1f2a3b4c5d",
        timestamp="2025-03-04T05:06:07.089Z",
        event="Report Generated",
        userId="u1",
        properties={"pages": 3},
        context=ctx,
    )
    assert track.to_dict() == {
        "type": "track",
        "messageId": "0b9c5b2e-6f1a-4c3e-9a57-2d1f2a3b4c5d",
        "timestamp": "2025-03-04T05:06:07.089Z",
        "event": "Report Generated",
        "userId": "u1",
        "properties": {"pages": 3},
        "context": {"library": {"name": "python-sdk", "version": "1.1.0"}},
    }
    identify = Event(type=EventType.IDENTIFY, messageId="m2", timestamp="2025-01-01T00:00:00.000Z", userId="u2",
                     traits={"plan": "pro"})
    assert identify.to_dict() == {
        "type": "identify", "messageId": "m2", "timestamp": "2025-01-01T00:00:00.000Z", "userId": "u2",
        "traits": {"plan": "pro"},
    }
    group = Event(type=EventType.GROUP, messageId="m3", timestamp="2025-01-01T00:00:00.000Z", groupId="g1",
                  userId="u3", context=EventContext())
    assert group.to_dict() == {
        "type": "group", "messageId": "m3", "timestamp": "2025-01-01T00:00:00.000Z", "groupId": "g1", "userId": "u3",
    }
    assert (group.type, group.messageId, group.userId, group.groupId) == (EventType.GROUP, "m3", "u3", "g1")


def test_on_error_reads_official_attributes_of_client_events(
    clients: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    seen: List[Any] = []

    def on_error(error: SendError, events: List[Event]) -> None:
        for ev in events:
            seen.append((ev.type, ev.messageId, ev.userId, ev.timestamp, ev.type == EventType.TRACK))

    with patch("urllib.request.urlopen", side_effect=http_error(400)):
        client = clients(on_error=on_error)
        client.track("T", user_id="u1", message_id="mid-1", timestamp="2025-02-03T04:05:06.007Z")
        assert client.flush(timeout=10) is False
    assert seen == [("track", "mid-1", "u1", "2025-02-03T04:05:06.007Z", True)]


# --- messages users match on -----------------------------------------------------------------


def test_missing_write_key_message_starts_as_the_official_one() -> None:
    with pytest.raises(ValueError) as info:
        KlimeClient()
    assert str(info.value).startswith("write_key is required")
    assert "KLIME_WRITE_KEY" in str(info.value), "the advice after it is kept"


def test_sync_after_shutdown_mentions_shutdown(clients: Callable[..., KlimeClient]) -> None:
    with patch("urllib.request.urlopen", side_effect=accept_all) as urlopen:
        client = clients()
        client.shutdown(timeout=5)
        for call in (
            lambda: client.track_sync("T", user_id="u1"),
            lambda: client.identify_sync("u1"),
            lambda: client.group_sync("g1"),
        ):
            with pytest.raises(SendError) as info:
                call()
            assert "shutdown" in str(info.value) and "shutdown" in info.value.message
    assert urlopen.call_count == 0


def test_failed_sync_message_contains_failed_to_send(clients: Callable[..., KlimeClient]) -> None:
    with patch("urllib.request.urlopen", side_effect=http_error(500)):
        client = clients(retry_max_attempts=2)
        with pytest.raises(SendError) as info:
            client.track_sync("T", user_id="u1")
    assert "Failed to send" in str(info.value)
    assert "Failed to send" in info.value.message


class CountingLogger(logging.Logger):
    """Counts isEnabledFor checks and every debug() call or record made."""

    def __init__(self, name: str) -> None:
        super().__init__(name, logging.INFO)
        self.checks = 0  # on the thread that reset it (the caller's)
        self.caller = threading.get_ident()
        self.debug_calls = 0
        self.made: List[logging.LogRecord] = []

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging's name
        if threading.get_ident() == self.caller:
            self.checks += 1
        return super().isEnabledFor(level)

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug_calls += 1
        super().debug(msg, *args, **kwargs)

    def makeRecord(self, *args: Any, **kwargs: Any) -> logging.LogRecord:  # noqa: N802
        record = super().makeRecord(*args, **kwargs)
        self.made.append(record)
        return record


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_enqueued_is_logged_at_debug_for_each_queued_event(clients: Callable[..., KlimeClient]) -> None:
    logger = CountingLogger("klime.test.enqueued")
    logger.setLevel(logging.DEBUG)
    keep = Keep()
    logger.addHandler(keep)
    with patch("urllib.request.urlopen", side_effect=accept_all):
        client = clients(logger=logger)
        client.track("T", user_id="u1")
        client.identify("u1")
        client.group("g1")
        enqueued = [r for r in keep.records if r.getMessage().startswith("Enqueued")]
        assert len(enqueued) == 3
        assert all(r.levelno == logging.DEBUG for r in enqueued)
        assert [r.getMessage().split()[1] for r in enqueued] == ["track", "identify", "group"]
        assert client.flush(timeout=10)


def test_no_logging_cost_when_debug_is_off(clients: Callable[..., KlimeClient]) -> None:
    logger = CountingLogger("klime.test.quiet_enqueue")  # level INFO
    keep = Keep()
    logger.addHandler(keep)
    with patch("urllib.request.urlopen", side_effect=accept_all):
        client = clients(logger=logger, max_queue_size=10_000, max_batch_size=100)
        logger.checks = 0
        for i in range(200):
            client.track("T", {"i": i}, user_id="u1")
        checks = logger.checks
        assert client.flush(timeout=10)
    assert logger.debug_calls == 0, "debug() is never even called"
    assert not any(r.levelno == logging.DEBUG for r in logger.made), "no record built"
    assert keep.records == [] or all(r.levelno > logging.DEBUG for r in keep.records)
    assert checks <= 200, "at most one isEnabledFor check per call"


def test_a_patched_urlopen_never_slows_the_caller(clients: Callable[..., KlimeClient]) -> None:
    """track() does not call urlopen on the caller's thread: the patch is used by the sending side."""
    callers: List[int] = []

    def record(request: urllib.request.Request, timeout: Optional[float] = None) -> MagicMock:
        callers.append(threading.get_ident())
        return accept_all(request, timeout)

    with patch("urllib.request.urlopen", side_effect=record):
        client = clients(max_batch_size=1)
        client.track("T", user_id="u1")
        assert wait_until(lambda: len(callers) == 1)
        assert client.flush(timeout=10)
    assert threading.get_ident() not in callers
