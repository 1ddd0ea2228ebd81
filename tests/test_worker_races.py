"""Races in the worker's accounting, each pinned down deterministically.

A callback that blocks on an Event holds the flusher exactly in the window
under test (an outcome decided but not yet finished), so no test depends on
sleeping and hoping.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest

from klime import BatchResponse

from .conftest import MakeClient, RawServers, Recorder, run_process
from .servers import RawRequest, Reply, default_behaviour


class Gate:
    """A callback that signals it was entered, then blocks until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.calls: List[Any] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)
        self.entered.set()
        self.released.wait(30)


# --- flush() must not return True while a failure is still being reported -------------------


def test_flush_is_false_while_a_failed_batch_is_still_being_reported(
    raw_servers: RawServers, make_client: MakeClient
) -> None:
    """The batch failed (400) and on_error is running: the deadline must not turn that into True."""
    server = raw_servers(lambda r: (400, b'{"error":"bad"}'))
    gate = Gate()
    client = make_client(server.url, max_batch_size=1, on_error=gate)
    client.track("Rejected", user_id="u1")
    assert gate.entered.wait(10)
    try:
        assert client.flush(timeout=0.2) is False
    finally:
        gate.released.set()
    client.flush(timeout=10)  # waits until the report has finished
    assert client.flush(timeout=10) is True  # nothing new queued since


def test_flush_waiting_when_the_failure_is_decided_is_false(
    raw_servers: RawServers, make_client: MakeClient
) -> None:
    """Same window, with the flush() already waiting when the 400 arrives."""
    server = raw_servers(lambda r: (400, b'{"error":"bad"}'))
    gate = Gate()
    client = make_client(server.url, max_batch_size=1, on_error=gate)
    client.track("Rejected", user_id="u1")
    result: List[bool] = []
    waiter = threading.Thread(target=lambda: result.append(client.flush(timeout=1.0)))
    waiter.start()
    assert gate.entered.wait(10)
    waiter.join(10)  # its deadline passes while on_error is still blocked
    gate.released.set()
    assert result == [False]


def test_flush_is_false_while_server_rejections_are_being_reported(
    raw_servers: RawServers, make_client: MakeClient
) -> None:
    """A 2xx with failed=1: the rejected event is not delivered, even while on_success still runs."""

    def partial(req: RawRequest) -> Reply:
        n = len(req.json()["batch"])
        body = {"status": "partial", "accepted": n - 1, "failed": 1,
                "errors": [{"index": 0, "message": "bad", "code": "invalid_event"}]}
        return (200, json.dumps(body).encode())

    server = raw_servers(partial)
    gate = Gate()
    client = make_client(server.url, max_batch_size=2, on_success=gate)
    client.track("Half", user_id="u1")
    client.track("Half", user_id="u1")
    assert gate.entered.wait(10)
    try:
        assert client.flush(timeout=0.2) is False
    finally:
        gate.released.set()
    assert isinstance(gate.calls[0][0], BatchResponse)


def test_flush_is_false_while_an_unencodable_event_is_being_reported(
    raw_servers: RawServers, make_client: MakeClient
) -> None:
    server = raw_servers()
    gate = Gate()
    client = make_client(server.url, max_batch_size=1, on_error=gate)
    client.track("Bad", {"x": object()}, user_id="u1")
    assert gate.entered.wait(10)
    try:
        assert client.flush(timeout=0.2) is False
    finally:
        gate.released.set()
    assert getattr(gate.calls[0][0], "reason", None) == "unencodable"
    assert not server.requests


# --- an encoding error of an unexpected kind --------------------------------------------------


class ExplodingDict(dict):  # type: ignore[type-arg]
    """A dict subclass whose items() fails, as a dict mutated during encoding would
    ("RuntimeError: dictionary changed size during iteration")."""

    def items(self) -> Any:
        raise RuntimeError("dictionary changed size during iteration")


def test_unexpected_error_encoding_one_event_fails_that_event_only(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    server = raw_servers()
    client = make_client(server.url)
    client.track("Good", user_id="u1", message_id="good-1")
    client.track("Bad", {"nested": ExplodingDict(a=1)}, user_id="u1", message_id="bad")
    client.track("Good", user_id="u1", message_id="good-2")
    assert client.flush(timeout=10) is False
    sent = [e["messageId"] for req in server.requests for e in req.json()["batch"]]
    assert sent == ["good-1", "good-2"]
    assert [(getattr(e, "reason", None), [ev.messageId for ev in evs]) for e, evs in recorder.errors] == [
        ("unencodable", ["bad"])
    ]


# --- a fork the fork hooks do not see, then shutdown ------------------------------------------

C_FORK_SCRIPT = """
import ctypes, os, sys, time
import klime._lifecycle
from klime import KlimeClient

def on_error(error, events):
    print("reported", os.getpid() == PARENT, len(events), flush=True)

PARENT = os.getpid()
client = KlimeClient("test-write-key", sys.argv[1], flush_interval=60000, max_batch_size=50,
                     flush_on_shutdown=False, on_error=on_error)
for i in range(3):
    client.track("Parent", {"i": i}, user_id="parent")
if sys.argv[2] == "locked":
    # As if the parent's flusher held the worker's lock at the moment of the fork.
    client._worker._lock.acquire()
pid = ctypes.PyDLL(None).fork()  # from C: os.register_at_fork hooks do not run
if pid == 0:
    try:
        if sys.argv[2] == "locked":
            print("child shutdown", client.shutdown(timeout=2), flush=True)
        else:
            # What the interpreter's exit runs; flush_on_shutdown=False reports the queue instead.
            klime._lifecycle.exit_all()
            print("child exit hook done", flush=True)
    finally:
        os._exit(0)  # never the parent's code, never the exit hooks
if sys.argv[2] == "locked":
    client._worker._lock.release()
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.02)
else:
    os.kill(pid, 6)  # SIGABRT: with PYTHONFAULTHANDLER=1 (run_process) it prints where it hung
    time.sleep(2)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("child hung", flush=True)
print("parent flush", client.flush(timeout=10), flush=True)
"""


@pytest.mark.parametrize("mode", ["exit", "locked"])
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_shutdown_in_the_child_of_a_c_level_fork(tmp_path: Path, raw_servers: RawServers, mode: str) -> None:
    """shutdown() as the first call in the child (a uWSGI worker's exit) must start afresh, as put()
    and flush() do: never report the parent's queue as the child's ("exit": the exit hook with
    flush_on_shutdown=False), never wait on the parent's lock ("locked")."""
    server = raw_servers()
    script = tmp_path / "c_fork_shutdown.py"
    script.write_text(textwrap.dedent(C_FORK_SCRIPT))
    proc = run_process([sys.executable, str(script), server.url, mode])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    child_line = "child shutdown True" if mode == "locked" else "child exit hook done"
    assert lines == [child_line, "parent flush True"]
    events: List[Dict[str, Any]] = [e for req in server.requests for e in req.json()["batch"]]
    assert sorted(e["properties"]["i"] for e in events) == [0, 1, 2]


# --- a callback that raises SystemExit ---------------------------------------------------------


def test_sys_exit_in_a_callback_does_not_end_the_flusher(
    raw_servers: RawServers, make_client: MakeClient
) -> None:
    """sys.exit() on the flusher thread would end only that thread, and with it every later send:
    flush() would then wait out its deadline (or, without one, forever)."""
    replies = iter([(400, b'{"error":"bad"}')])

    def first_rejected(req: RawRequest) -> Reply:
        return next(replies, None) or default_behaviour(req)

    def on_error(error: Exception, events: List[Any]) -> None:
        sys.exit("analytics failed")

    server = raw_servers(first_rejected)
    client = make_client(server.url, on_error=on_error)
    client.track("First", user_id="u1")
    assert client.flush(timeout=10) is False
    client.track("Second", user_id="u1", message_id="second")
    assert client.flush(timeout=10) is True
    assert [e["messageId"] for e in server.requests[-1].json()["batch"]] == ["second"]
