"""Review: forks, from Python (hooks run) and from C (hooks do not run).

Each scenario runs in its own session and is killed as a process group on
timeout, so a hang is a failure and never an orphan.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import WAIT_FOR_CHILD, run_script
from .servers import RawServer

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")




# --- a client built in the child of a C fork, before any call --------------------------------------

NEW_CLIENT_IN_C_CHILD = (
    WAIT_FOR_CHILD
    + """
import ctypes, os, sys, threading, time
from klime import KlimeClient

url = sys.argv[1]
parent = KlimeClient("test-write-key", url, flush_interval=60000)
parent.track("Parent", user_id="parent", message_id="p0")
pid = ctypes.PyDLL(None).fork()
if pid == 0:
    crashes = []
    threading.excepthook = lambda a: crashes.append(f"{a.thread.name}: {a.exc_type.__name__}: {a.exc_value}")
    # A per-process client created lazily on the first request, before any call on the old one.
    local = KlimeClient("test-write-key", url, flush_interval=100, max_batch_size=5)
    time.sleep(0.05)
    parent.track("Child Old Client", user_id="child", message_id="c-old")  # first call: the fork entry
    for i in range(12):
        local.track("Child New Client", user_id="child", message_id=f"c-new-{i}")
    ok = local.flush(timeout=5) and parent.flush(timeout=5)
    time.sleep(0.5)  # several flush intervals
    for i in range(12, 15):
        local.track("Child New Client", user_id="child", message_id=f"c-new-{i}")
    ok = ok and local.flush(timeout=5)
    print("child", ok, crashes, flush=True)
    os._exit(0)
print("child exit", wait_for_child(pid, 15), "parent", parent.flush(timeout=10), flush=True)
"""
)


@needs_fork
def test_review_client_built_in_a_c_fork_child_is_not_reset_under_its_dispatcher(tmp_path: Path) -> None:
    """A client constructed in the child of a C fork is registered before the fork entry has
    run, so the first call on any client resets it too: its ledger, lock and conditions are
    replaced under its running dispatcher, which then waits on a Condition of a lock it does not
    hold ("RuntimeError: cannot wait on un-acquired lock") and dies -- after first touching the
    new ledger without the new lock."""
    with RawServer() as server:
        rc, out, err = run_script(tmp_path, NEW_CLIENT_IN_C_CHILD, server.url)
        ids = sorted(e["messageId"] for r in server.requests for e in r.json()["batch"])
    assert rc == 0, (out, err)
    assert "child True []" in out, (out, err[-3000:])
    assert ids == sorted(["p0", "c-old"] + [f"c-new-{i}" for i in range(15)])


# --- several threads make their first call at once in the child of a C fork ---------------------------

MANY_FIRST_CALLS = (
    WAIT_FOR_CHILD
    + """
import ctypes, os, sys, threading, time
from klime import KlimeClient, SendError

url, rounds = sys.argv[1], int(sys.argv[2])
sys.setswitchinterval(1e-6)
client = KlimeClient("test-write-key", url, flush_interval=60000, max_batch_size=50)
client.track_sync("Parent Sync", user_id="parent")  # leaves a kept-alive connection in the pool
for r in range(rounds):
    client.track("Parent", {"round": r}, user_id="parent")
    pid = ctypes.PyDLL(None).fork()
    if pid == 0:
        errors = []
        crashes = []
        threading.excepthook = lambda a: crashes.append(f"{a.exc_type.__name__}: {a.exc_value}")
        start = threading.Barrier(6)

        def run(what):
            start.wait()
            try:
                if what == "track":
                    for i in range(5):
                        client.track("Child", {"round": r, "i": i}, user_id="child", message_id=f"r{r}-t{i}")
                elif what == "sync":
                    client.track_sync("Child Sync", {"round": r}, user_id="child", message_id=f"r{r}-sync")
                elif what == "identify_sync":
                    client.identify_sync("child", {"round": r}, message_id=f"r{r}-isync")
                elif what == "flush":
                    client.flush(timeout=5)
                elif what == "stats":
                    client.stats()
                elif what == "queue":
                    client.queue_size()
            except Exception as exc:
                errors.append(f"{what}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(w,)) for w in
                   ("track", "sync", "identify_sync", "flush", "stats", "queue")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        ok = client.shutdown(timeout=5)
        print("child", r, ok, errors, crashes, flush=True)
        os._exit(0)
    code = wait_for_child(pid, 15)
    if code != 0:
        print("child", r, "exit", code, flush=True)
print("parent", client.flush(timeout=10), flush=True)
"""
)


@needs_fork
def test_review_many_first_calls_at_once_in_c_fork_children(tmp_path: Path) -> None:
    rounds = 15
    with RawServer() as server:
        rc, out, err = run_script(tmp_path, MANY_FIRST_CALLS, server.url, str(rounds), timeout=150)
        reqs = list(server.requests)
    assert rc == 0, (out, err[-3000:])
    lines = out.strip().splitlines()
    assert lines[-1] == "parent True", out
    for r in range(rounds):
        assert f"child {r} True [] []" in lines, (out, err[-3000:])
    parent_conns = {q.connection for q in reqs if q.json()["batch"][0]["userId"] == "parent"}
    child_ids = [e["messageId"] for q in reqs for e in q.json()["batch"] if e["userId"] == "child"]
    # Every child event arrived exactly once ...
    expected = [f"r{r}-{k}" for r in range(rounds) for k in ("t0", "t1", "t2", "t3", "t4", "sync", "isync")]
    assert sorted(child_ids) == sorted(expected)
    # ... and never on a connection the parent used.
    child_conns = {q.connection for q in reqs if q.json()["batch"][0]["userId"] == "child"}
    assert not (parent_conns & child_conns)


# --- a client that is not registered (disabled, or shut down) in a forked child -------------------------

UNREGISTERED = (
    WAIT_FOR_CHILD
    + """
import os, sys
from klime import KlimeClient

url, kind = sys.argv[1], sys.argv[2]
if kind == "disabled":
    client = KlimeClient(disabled=True)
else:
    client = KlimeClient("test-write-key", url, flush_interval=60000)
    client.shutdown(timeout=2)
# As if another thread of the parent was inside client.track() at the moment of the fork
# (put() takes the worker lock even on a disabled or shut-down client).
import threading
held, release = threading.Event(), threading.Event()

def inside_track():
    with client._worker._lock:
        held.set()
        release.wait()

threading.Thread(target=inside_track, daemon=True).start()
held.wait()
pid = os.fork()  # a plain os.fork(): the fork hooks run
if pid == 0:
    client.track("In Child", user_id="child")
    client.flush(timeout=1)
    os._exit(0)
release.set()
print("child", wait_for_child(pid, 10), flush=True)
"""
)


@needs_fork
@pytest.mark.parametrize("kind", ["disabled", "shut_down"])
def test_review_fork_child_does_not_hang_on_an_unregistered_client(tmp_path: Path, kind: str) -> None:
    """The fork entry resets only registered clients. A disabled client, or one shut down before
    the fork, keeps the parent's worker lock in the child; if a parent thread held it at the fork
    (it calls track() on that client), the child's first track() hangs forever."""
    with RawServer() as server:
        rc, out, err = run_script(tmp_path, UNREGISTERED, server.url, kind, timeout=40)
    assert rc == 0, (out, err)
    assert out.strip() == "child 0", (out, err)
