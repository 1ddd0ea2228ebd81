"""klime.scope(): ids and properties that track calls inherit, on contextvars."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from typing import Any, Dict, List

import pytest

import klime
from klime import AsyncKlimeClient, KlimeClient

from .conftest import FAST, SRC, MakeClient
from .servers import Collector


def sent(collector: Collector, client: KlimeClient, n: int) -> List[Dict[str, Any]]:
    assert client.flush(timeout=10) is True
    events = collector.wait_for_events(n)
    assert len(events) == n
    return events


def test_track_inherits_ids_and_properties(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    with klime.scope(user_id="u1", group_id="org1", properties={"plan": "pro", "region": "eu"}):
        client.track("Inside", {"region": "us", "n": 1})
    [ev] = sent(collector, client, 1)
    assert ev["userId"] == "u1" and ev["groupId"] == "org1"
    assert ev["properties"] == {"plan": "pro", "region": "us", "n": 1}  # the call's keys win


def test_ids_the_call_gives_win(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    with klime.scope(user_id="scope-user", group_id="scope-org"):
        client.track("Own User", user_id="call-user")
        client.track("Own Group", group_id="call-org")
    events = {e["event"]: e for e in sent(collector, client, 2)}
    assert (events["Own User"]["userId"], events["Own User"]["groupId"]) == ("call-user", "scope-org")
    assert (events["Own Group"]["userId"], events["Own Group"]["groupId"]) == ("scope-user", "call-org")


def test_track_without_ids_is_valid_only_inside_a_scope_that_supplies_one(
    collector: Collector, make_client: MakeClient
) -> None:
    client = make_client(collector.url)
    with klime.scope(properties={"only": "props"}), pytest.raises(ValueError, match="user_id or group_id"):
        client.track("No Ids")
    with klime.scope(group_id="org1"):
        client.track("Org Event")
    with pytest.raises(ValueError, match="user_id or group_id"):
        client.track("Outside")
    [ev] = sent(collector, client, 1)
    assert ev["groupId"] == "org1" and "userId" not in ev


def test_scopes_nest_and_restore(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    with klime.scope(user_id="outer", group_id="org", properties={"a": 1, "b": 1}):
        with klime.scope(user_id="inner", properties={"b": 2, "c": 2}):
            client.track("Inner")
        client.track("Outer Again")
    events = {e["event"]: e for e in sent(collector, client, 2)}
    inner, outer = events["Inner"], events["Outer Again"]
    assert (inner["userId"], inner["groupId"], inner["properties"]) == ("inner", "org", {"a": 1, "b": 2, "c": 2})
    assert (outer["userId"], outer["groupId"], outer["properties"]) == ("outer", "org", {"a": 1, "b": 1})


def test_a_scope_left_by_an_exception_is_restored(make_client: MakeClient, collector: Collector) -> None:
    client = make_client(collector.url)
    with pytest.raises(RuntimeError), klime.scope(user_id="u"):
        raise RuntimeError("boom")
    with pytest.raises(ValueError):
        client.track("No Scope Any More")


def test_identify_and_group_are_unchanged(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    with klime.scope(user_id="scope-user", group_id="scope-org", properties={"p": 1}):
        client.identify("u2", {"t": 1})
        client.group("org2", {"t": 2})
        with pytest.raises(ValueError):
            client.identify("")
    events = {e["type"]: e for e in sent(collector, client, 2)}
    assert events["identify"]["userId"] == "u2" and "groupId" not in events["identify"]
    assert events["identify"]["traits"] == {"t": 1}
    assert events["group"]["groupId"] == "org2" and "userId" not in events["group"]


def test_applies_to_track_sync(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    with klime.scope(user_id="u9", properties={"via": "scope"}):
        assert client.track_sync("Now").accepted == 1
    [ev] = collector.events
    assert ev["userId"] == "u9" and ev["properties"] == {"via": "scope"}


def test_the_scope_properties_are_copied_when_the_scope_is_made(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    props = {"k": "before"}
    s = klime.scope(user_id="u", properties=props)
    props["k"] = "after"
    with s:
        client.track("One")
        client.track("Two", {"x": 1})
    events = {e["event"]: e for e in sent(collector, client, 2)}
    assert events["One"]["properties"] == {"k": "before"}
    assert events["Two"]["properties"] == {"k": "before", "x": 1}


def test_bad_scope_arguments_raise_where_written() -> None:
    with pytest.raises(TypeError, match="user_id must be a string"):
        klime.scope(user_id=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_id must be a non-empty string"):
        klime.scope(group_id="")
    with pytest.raises(TypeError, match="properties must be a dict"):
        klime.scope(properties=[("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keys must be strings"):
        klime.scope(properties={1: "x"})  # type: ignore[dict-item]


def test_a_call_with_bad_properties_inside_a_scope_still_gets_the_clear_error(make_client: MakeClient) -> None:
    client = make_client("http://127.0.0.1:9")
    with klime.scope(user_id="u", properties={"a": 1}), pytest.raises(TypeError, match="properties must be a dict"):
        client.track("x", ["not", "a", "dict"])  # type: ignore[arg-type]


def test_each_thread_has_its_own_scope(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    inside = threading.Event()
    done = threading.Event()
    seen: List[BaseException] = []

    def other() -> None:
        inside.wait(5)
        try:
            client.track("Other Thread")  # the main thread's scope is not here
        except ValueError as exc:
            seen.append(exc)
        with klime.scope(user_id="thread-user"):
            client.track("Thread Scoped")
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with klime.scope(user_id="main-user"):
        inside.set()
        done.wait(5)
        client.track("Main")
    t.join(5)
    assert len(seen) == 1
    events = {e["event"]: e["userId"] for e in sent(collector, client, 2)}
    assert events == {"Thread Scoped": "thread-user", "Main": "main-user"}


def test_scopes_follow_asyncio_tasks(collector: Collector) -> None:
    async def handle(client: AsyncKlimeClient, user: str) -> None:
        with klime.scope(user_id=user, properties={"user": user}):
            await asyncio.sleep(0.01)  # interleave with the other requests
            client.track("Request")
            # A task started inside the scope inherits it.
            await asyncio.ensure_future(child(client))

    async def child(client: AsyncKlimeClient) -> None:
        await asyncio.sleep(0.01)
        client.track("Child Task")

    async def main() -> None:
        async with AsyncKlimeClient("k", collector.url, **FAST) as client:
            await asyncio.gather(*(handle(client, f"u{i}") for i in range(5)))

    asyncio.run(main())
    events = collector.events
    assert len(events) == 10
    assert all(e["userId"] == e["properties"]["user"] for e in events)
    assert sorted(e["userId"] for e in events if e["event"] == "Child Task") == [f"u{i}" for i in range(5)]


def test_applies_to_the_default_client(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    from klime import _module

    monkeypatch.setattr(_module, "_default", None)
    client = klime.configure("k", collector.url, **FAST)
    try:
        with klime.scope(group_id="org7"):
            klime.track("Module Level")
        assert klime.flush(timeout=10) is True
        assert collector.events[0]["groupId"] == "org7"
    finally:
        client.shutdown(timeout=1)


def test_nothing_is_looked_up_when_no_scope_was_ever_used(collector: Collector) -> None:
    # In a fresh process: track never touches the context variable until a scope is entered.
    script = textwrap.dedent(
        """
        import sys
        import klime
        from klime import _scope

        class Tripwire:
            def get(self):
                raise AssertionError("the scope was looked up")
            def set(self, value):
                return _real.set(value)
            def reset(self, token):
                _real.reset(token)

        _real = _scope._current
        _scope._current = Tripwire()
        client = klime.KlimeClient("k", sys.argv[1])
        client.track("Plain", user_id="u")
        assert _scope.used is False
        _scope._current = _real
        with klime.scope(user_id="s"):
            client.track("Scoped")
        assert _scope.used is True
        assert client.shutdown(timeout=10)
        print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, collector.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr
    assert sorted(e["userId"] for e in collector.events) == ["s", "u"]


def test_one_scope_object_shared_by_threads_and_nested_in_itself(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    shared = klime.scope(group_id="org-shared")
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        with shared:
            barrier.wait(5)
            with klime.scope(user_id=f"u{i}"), shared:
                client.track("Nested", {"i": i})
            client.track("Outer", {"i": i}, user_id=f"w{i}")
            barrier.wait(5)
        with pytest.raises(ValueError):
            client.track("Outside")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    events = sent(collector, client, 8)
    assert all(e["groupId"] == "org-shared" for e in events)
    assert sorted(e["userId"] for e in events if e["event"] == "Nested") == ["u0", "u1", "u2", "u3"]
    assert sorted(e["userId"] for e in events if e["event"] == "Outer") == ["w0", "w1", "w2", "w3"]


def test_a_scope_entered_in_one_task_and_left_in_another_context_does_not_raise(collector: Collector) -> None:
    import contextvars

    s = klime.scope(user_id="u")
    ctx = contextvars.copy_context()
    ctx.run(s.__enter__)
    s.__exit__(None, None, None)  # a different context: nothing of this scope is in force here
    ctx.run(s.__exit__, None, None, None)
    assert ctx.run(lambda: klime._scope._current.get()) is None
