"""The module-level API: klime.track(...) and friends on a default client."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from typing import Iterator, List

import pytest

import klime
from klime import KlimeClient, SendError, _lifecycle, _module

from .conftest import FAST, SRC, Recorder
from .servers import Collector, refused_url


@pytest.fixture(autouse=True)
def fresh_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No default client and no KLIME_* variables at the start; whatever was made is shut down after."""
    for var in [v for v in os.environ if v.startswith("KLIME_")]:
        monkeypatch.delenv(var)
    monkeypatch.setattr(_module, "_default", None)
    yield
    client = _module._default
    if client is not None:
        client.shutdown(timeout=1)


def env_for(monkeypatch: pytest.MonkeyPatch, url: str, **more: str) -> None:
    monkeypatch.setenv("KLIME_WRITE_KEY", "env-write-key")
    monkeypatch.setenv("KLIME_ENDPOINT", url)
    monkeypatch.setenv("KLIME_RETRY_INITIAL_DELAY", "10")
    for k, v in more.items():
        monkeypatch.setenv(f"KLIME_{k.upper()}", v)


def test_default_client_comes_from_the_environment(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    env_for(monkeypatch, collector.url, flush_interval="60000", max_batch_size="2")
    klime.identify("u1", {"plan": "pro"})
    klime.track("Report Generated", {"n": 1}, user_id="u1")  # a full batch of 2: sent without a flush
    events = collector.wait_for_events(2)
    assert [e["type"] for e in events] == ["identify", "track"]
    client = klime.get_client()
    assert isinstance(client, KlimeClient)
    assert client.endpoint == collector.url and client.max_batch_size == 2 and client.flush_interval == 60000
    assert collector.requests[0].headers["Authorization"] == "Bearer env-write-key"
    klime.group("org1", {"name": "Acme"}, user_id="u1")
    assert klime.queue_size() == 1
    assert klime.flush(timeout=10) is True
    assert klime.queue_size() == 0
    assert [e["type"] for e in collector.events] == ["identify", "track", "group"]


def test_missing_write_key_raises_the_same_value_error_at_the_first_call() -> None:
    with pytest.raises(ValueError) as direct:
        KlimeClient()
    for call in (
        lambda: klime.track("x", user_id="u"),
        lambda: klime.identify("u"),
        lambda: klime.group("g"),
        lambda: klime.track_sync("x", user_id="u"),
        klime.get_client,
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == str(direct.value)
        assert "KLIME_WRITE_KEY" in str(info.value)
    assert _module._default is None


def test_a_key_set_after_a_failed_first_call_is_picked_up(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError):
        klime.track("x", user_id="u")
    env_for(monkeypatch, collector.url)
    klime.track("y", user_id="u")
    assert klime.flush(timeout=10) is True
    assert [e["event"] for e in collector.events] == ["y"]


def test_flush_shutdown_and_queue_size_create_no_client() -> None:
    assert klime.queue_size() == 0
    assert klime.flush(timeout=1) is True
    assert klime.shutdown(timeout=1) is True
    assert _module._default is None
    with pytest.raises(TypeError, match="timeout"):
        klime.flush(timeout="soon")  # type: ignore[arg-type]


def test_sync_variants(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    env_for(monkeypatch, collector.url)
    assert klime.track_sync("Now", {"a": 1}, user_id="u").accepted == 1
    assert klime.identify_sync("u", {"t": 1}).accepted == 1
    assert klime.group_sync("org", user_id="u").accepted == 1
    assert [r.events[0]["type"] for r in collector.requests] == ["track", "identify", "group"]


def test_sync_variant_with_the_endpoint_down_raises_send_error(monkeypatch: pytest.MonkeyPatch) -> None:
    env_for(monkeypatch, refused_url(), retry_max_attempts="2")
    with pytest.raises(SendError) as info:
        klime.track_sync("Down", user_id="u")
    assert info.value.reason == "retries_exhausted"


def test_configure_creates_and_returns_the_default(collector: Collector, recorder: Recorder) -> None:
    client = klime.configure("cfg-key", collector.url, **FAST, on_success=recorder.on_success)
    assert klime.get_client() is client
    klime.track("Configured", user_id="u", timestamp="2025-01-01T00:00:00Z", message_id="m-1")
    assert klime.flush(timeout=10) is True
    [ev] = collector.events
    assert (ev["messageId"], ev["timestamp"]) == ("m-1", "2025-01-01T00:00:00.000Z")
    assert collector.requests[0].headers["Authorization"] == "Bearer cfg-key"
    assert len(recorder.successes) == 1


def test_configure_replaces_and_shuts_down_the_old_one_without_losing_events(collector: Collector) -> None:
    first = klime.configure("k", collector.url, **FAST)
    klime.track("To The Old One", user_id="u")
    assert first.queue_size() == 1
    second = klime.configure("k", collector.url, **{**FAST, "max_batch_size": 5})
    assert second is not first and klime.get_client() is second
    # The old one delivered what it queued and is shut down, out of the exit registry.
    assert [e["event"] for e in collector.events] == ["To The Old One"]
    assert "shut down" in repr(first) and first not in _lifecycle.clients()
    klime.track("To The New One", user_id="u")
    assert second.queue_size() == 1 and klime.flush(timeout=10) is True
    assert [e["event"] for e in collector.events] == ["To The Old One", "To The New One"]


def test_configure_with_bad_options_changes_nothing(collector: Collector) -> None:
    first = klime.configure("k", collector.url, **FAST)
    with pytest.raises(ValueError):
        klime.configure("k", collector.url, max_batch_size=0)
    with pytest.raises(ValueError, match=r"ftp://nowhere\.example"):
        klime.configure("k", "ftp://nowhere.example")
    assert klime.get_client() is first and "open" in repr(first)


def test_after_shutdown_the_default_stays_shut_down_until_configured(collector: Collector) -> None:
    first = klime.configure("k", collector.url, **FAST)
    klime.track("Before", user_id="u")
    assert klime.shutdown() is True
    klime.track("Ignored", user_id="u")  # ignored, like any shut-down client
    with pytest.raises(SendError) as info:
        klime.track_sync("Refused", user_id="u")
    assert info.value.reason == "shutdown"
    assert klime.get_client() is first
    second = klime.configure("k", collector.url, **FAST)
    klime.track("After", user_id="u")
    assert klime.flush(timeout=10) is True and second is klime.get_client()
    assert [e["event"] for e in collector.events] == ["Before", "After"]


def test_first_calls_from_many_threads_share_one_client(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_for(monkeypatch, collector.url, flush_interval="60000")
    before = set(_lifecycle.clients())
    barrier = threading.Barrier(12)
    seen: List[KlimeClient] = []
    lock = threading.Lock()

    def first_call(i: int) -> None:
        barrier.wait(5)
        klime.track("Race", {"i": i}, user_id="u")
        with lock:
            seen.append(klime.get_client())

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 12 and len({id(c) for c in seen}) == 1
    # Any client built by a thread that lost the race was shut down, not left registered.
    assert set(_lifecycle.clients()) - before == {seen[0]}
    assert klime.flush(timeout=10) is True
    assert sorted(e["properties"]["i"] for e in collector.events) == list(range(12))


def test_a_callback_calling_the_module_api_does_not_deadlock(collector: Collector) -> None:
    calls: List[str] = []

    def on_success(response: object) -> None:
        calls.append("success")
        if len(calls) == 1:
            klime.track("From Callback", user_id="u")
            klime.get_client()

    klime.configure("k", collector.url, **FAST, on_success=on_success)
    klime.track("First", user_id="u")
    assert klime.flush(timeout=10) is True
    assert klime.flush(timeout=10) is True
    assert [e["event"] for e in collector.events] == ["First", "From Callback"]


def test_process_exit_delivers_what_the_default_client_queued(collector: Collector) -> None:
    script = textwrap.dedent(
        """
        import klime
        for i in range(3):
            klime.track("Module Exit", {"i": i}, user_id="u")
        print(klime.queue_size())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLIME_")}
    env.update(PYTHONPATH=SRC, KLIME_WRITE_KEY="k", KLIME_ENDPOINT=collector.url, KLIME_FLUSH_INTERVAL="60000")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"
    assert sorted(e["properties"]["i"] for e in collector.events) == [0, 1, 2]
