"""Regression tests for the defects found by trying the SDK as a user would (issue 7).

Each test fails on the code before its fix. Behaviour at exit, under signals
and across processes is tested in real subprocesses, each in its own process
group that is killed whole if it outlives its bound.
"""

from __future__ import annotations

import enum
import json
import logging
import multiprocessing
import os
import pickle
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest

from klime import KlimeClient, SendError

from .conftest import WAIT_FOR_CHILD, MakeClient, RawServers, Recorder, run_python
from .servers import Collector, refused_url, wait_until


def run_script(code: str, *args: str, timeout: float = 60.0) -> Tuple[int, str, str, float]:
    """``run_python`` (own process group, killed whole on timeout), timed."""
    t0 = time.monotonic()
    proc = run_python(code, *args, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


# --- 1. a signal handler or logging handler that calls the client ----------------------------


def test_signal_handler_calling_the_client_while_the_main_thread_is_inside_track(
    raw_servers: RawServers,
) -> None:
    server = raw_servers()
    code, out, err, _ = run_script(
        """
        import signal, sys, threading
        from klime import KlimeClient

        client = KlimeClient("test-write-key", sys.argv[1], flush_interval=60000, max_batch_size=50)
        calls = 0

        def handler(signum, frame):
            global calls
            calls += 1
            client.track("From Handler", user_id="u1")
            client.flush(timeout=2)
            if calls == 100:
                client.shutdown(timeout=5)

        signal.signal(signal.SIGUSR1, handler)
        stop = threading.Event()

        def pester():
            import os, time
            while not stop.is_set():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.002)

        t = threading.Thread(target=pester, daemon=True)
        t.start()
        n = 0
        while calls < 100:
            client.track("Main", user_id="u1")
            n += 1
        stop.set()
        print("done", calls, flush=True)
        """,
        server.url,
        timeout=60,
    )
    assert code == 0, err
    assert out.startswith("done ") and int(out.split()[1]) >= 100


def test_logging_handler_calling_the_client_does_not_deadlock(raw_servers: RawServers) -> None:
    server = raw_servers(lambda r: (500, b"down"))

    class Echo(logging.Handler):
        def __init__(self, client: List[KlimeClient]) -> None:
            super().__init__()
            self.client = client
            self.records = 0

        def emit(self, record: logging.LogRecord) -> None:
            self.records += 1
            c = self.client[0]
            c.track("Log Seen", {"level": record.levelname}, user_id="ops")
            c.queue_size()
            c.flush(timeout=0.05)

    holder: List[KlimeClient] = []
    logger = logging.getLogger("klime.test.echo")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = Echo(holder)
    logger.addHandler(handler)
    client = KlimeClient(
        "test-write-key", server.url, flush_interval=50, retry_max_attempts=2, retry_initial_delay=5,
        max_queue_size=20, request_timeout=1000, logger=logger,
    )
    holder.append(client)
    try:
        done = threading.Event()

        def work() -> None:
            for i in range(300):
                client.track("Work", {"i": i}, user_id="u1")
            client.flush(timeout=3)
            done.set()

        t = threading.Thread(target=work, daemon=True)
        t.start()
        assert done.wait(30), "the client deadlocked with a logging handler that calls it"
        assert handler.records > 0
    finally:
        logger.removeHandler(handler)
        client.shutdown(timeout=2)


# --- 2. an endpoint that can never work ------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint", ["https://" + "a" * 64 + ".klime.example", "https://i..klime.example", "https://i.klime.com/pfad-ü"]
)
def test_unusable_endpoint_is_refused_at_construction_naming_its_source(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError) as info:
        KlimeClient("test-write-key", endpoint)
    assert "endpoint" in str(info.value)
    monkeypatch.setenv("KLIME_ENDPOINT", endpoint)
    with pytest.raises(ValueError) as info:
        KlimeClient("test-write-key")
    assert "KLIME_ENDPOINT" in str(info.value)
    assert "test-write-key" not in str(info.value)


# --- 4. SendError crosses processes ------------------------------------------------------------


def _failing_track_sync(url: str) -> str:
    client = KlimeClient("test-write-key", url, retry_max_attempts=1)
    try:
        client.track_sync("Pool Task", user_id="u1")
    finally:
        client.shutdown(timeout=1)
    return "sent"


def test_a_pool_task_whose_sync_send_fails_raises_send_error_in_the_parent() -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(_failing_track_sync, (refused_url(),))
        with pytest.raises(SendError) as info:
            result.get(timeout=60)
    assert info.value.reason == "retries_exhausted"
    assert len(info.value.events) == 1
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.message, again.reason, len(again.events)) == (info.value.message, "retries_exhausted", 1)


# --- 6. str subclasses are strings ---------------------------------------------------------------


class Action(str, enum.Enum):
    EXPORTED = "Report Exported"


class Plan(str, enum.Enum):
    ORG = "org_1"


def test_str_subclasses_are_accepted_as_names_and_ids(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url)
    client.track(Action.EXPORTED, {Plan.ORG: 1}, user_id=Plan.ORG, group_id=Plan.ORG)
    client.identify(Plan.ORG)
    client.group(Plan.ORG, user_id=Plan.ORG)
    assert client.track_sync(Action.EXPORTED, group_id=Plan.ORG).accepted == 1
    assert client.flush(timeout=5) is True
    track, identify, group, sync = _by_type(collector.events)
    assert track["event"] == "Report Exported" and track["userId"] == "org_1" and track["groupId"] == "org_1"
    assert track["properties"] == {"org_1": 1}
    assert identify["userId"] == "org_1"
    assert group["groupId"] == "org_1" and group["userId"] == "org_1"
    assert sync["event"] == "Report Exported"


def _by_type(events: List[Dict[str, Any]]) -> Tuple[Dict[str, Any], ...]:
    tracks = [e for e in events if e["type"] == "track"]
    with_props = [e for e in tracks if e["properties"]]
    without = [e for e in tracks if not e["properties"]]
    identify = next(e for e in events if e["type"] == "identify")
    group = next(e for e in events if e["type"] == "group")
    return with_props[0], identify, group, without[0]


# --- 7. overflow while a batch waits between retries ----------------------------------------------


def test_overflow_during_a_retry_wait_is_reported_and_freed_promptly(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    server = raw_servers(lambda r: (500, b"down"))
    client = make_client(
        server.url, max_queue_size=100, max_batch_size=100, retry_max_attempts=3, retry_initial_delay=30_000
    )
    for i in range(20_000):
        client.track("Flood", {"i": i}, user_id="u1")
    assert server.wait_for_requests(1)
    # The retry waits 30 s; the drops must not wait for it.
    assert wait_until(lambda: client.stats().failed.get("queue_overflow", 0) >= 19_800, timeout=10), client.stats()
    # stats() counts a failure as it is decided; on_error hears of it just after.
    def dropped() -> List[Any]:
        return [ev for e, evs in recorder.errors if getattr(e, "reason", "") == "queue_overflow" for ev in evs]

    assert wait_until(lambda: len(dropped()) >= 19_800, timeout=10), len(dropped())
    assert client.queue_size() <= 100
    # Memory: nothing beyond the queue and the batches in flight is still held.
    worker = client._worker
    held = len(worker.ledger.queue) + len(worker.ledger.dropped) + sum(len(b.events) for b in worker.ledger.batches)
    assert held <= 100 + 100 * client._options.max_in_flight


# --- 9. shutdown() given a bad argument, or interrupted ----------------------------------------------


def test_shutdown_with_a_bad_timeout_raises_before_anything_changes(
    collector: Collector, make_client: MakeClient
) -> None:
    client = make_client(collector.url)
    client.track("Before", user_id="u1")
    with pytest.raises(TypeError, match="timeout"):
        client.shutdown(timeout="5")  # type: ignore[arg-type]
    client.track("After", user_id="u1")
    assert client.shutdown(timeout=5) is True
    assert sorted(e["event"] for e in collector.events) == ["After", "Before"]


def test_ctrl_c_during_shutdown_leaves_every_event_accounted_for_at_exit(raw_servers: RawServers) -> None:
    server = raw_servers(lambda r: "hang")
    code, out, err, took = run_script(
        """
        import os, signal, sys, threading, time
        from klime import KlimeClient

        def on_error(error, events):
            sys.stdout.write("ERROR %s %d\\n" % (error.reason, len(events)))
            sys.stdout.flush()

        client = KlimeClient("test-write-key", sys.argv[1], flush_interval=60000, request_timeout=60000,
                             shutdown_timeout=2000, on_error=on_error)
        for i in range(30):
            client.track("Interrupted", {"i": i}, user_id="u1")
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            client.shutdown(timeout=30)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        """,
        server.url,
        timeout=60,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "interrupted"
    reported = sum(int(line.split()[2]) for line in lines if line.startswith("ERROR"))
    assert reported == 30
    assert took < 20


# --- 11. the write key echoed in a partial failure ---------------------------------------------------


def test_write_key_echoed_in_a_partial_failure_is_not_logged(
    collector: Collector, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    collector.respond(
        200,
        {"status": "partial", "accepted": 0, "failed": 1,
         "errors": [{"index": 0, "message": "bad key test-write-key here", "code": "test-write-key"}]},
    )
    client = make_client(collector.url)
    client.track("Echo", user_id="u1")
    assert client.flush(timeout=5) is False
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "event rejected by the server" in text
    assert "test-write-key" not in text


# --- 13. one exit budget for every client --------------------------------------------------------------


def test_exit_with_several_clients_takes_one_budget_not_one_each(raw_servers: RawServers) -> None:
    server = raw_servers(lambda r: "hang")
    code, out, err, took = run_script(
        """
        import sys
        from klime import KlimeClient
        clients = [KlimeClient("test-write-key", sys.argv[1], shutdown_timeout=3000, request_timeout=60000,
                               on_error=lambda e, evs: print("ERROR", e.reason, len(evs), flush=True))
                   for _ in range(3)]
        for c in clients:
            c.track("Exit", user_id="u1")
            c.track("Exit", user_id="u1")
        print("queued", flush=True)
        """,
        server.url,
        timeout=60,
    )
    assert code == 0, err
    reported = sum(int(line.split()[2]) for line in out.splitlines() if line.startswith("ERROR"))
    assert reported == 6
    # One 3 s budget shared (plus interpreter start-up), not 3 x 3 s.
    assert took < 7.5, f"exit took {took:.1f}s"


# --- 14. multiprocessing children end with os._exit ----------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs the fork start method")
def test_multiprocessing_children_deliver_what_they_queued(collector: Collector) -> None:
    code, out, err, _ = run_script(
        """
        import multiprocessing, sys
        from klime import KlimeClient

        client = KlimeClient("test-write-key", sys.argv[1], flush_interval=60000)

        def target(name):
            for i in range(3):
                client.track("Child", {"who": name, "i": i}, user_id="u1")

        def task(i):
            client.track("Pool Task", {"i": i}, user_id="u1")
            return i

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("fork")
            p = ctx.Process(target=target, args=("process",))
            p.start()
            p.join(30)
            pool = ctx.Pool(2)
            print(sum(pool.map(task, range(8))), flush=True)
            pool.close()
            pool.join()
            print("exit", p.exitcode, flush=True)
        """,
        collector.url,
        timeout=90,
    )
    assert code == 0, err
    assert out.split() == ["28", "exit", "0"]
    events = collector.wait_for_events(11, timeout=10)
    assert sorted(e["event"] for e in events) == ["Child"] * 3 + ["Pool Task"] * 8
    assert sorted(e["properties"]["i"] for e in events if e["event"] == "Pool Task") == list(range(8))


# --- 15. log lines name the cause, once prefixed ------------------------------------------------------


def test_failure_logs_name_the_cause_at_their_own_level(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="klime.test")
    client = make_client(refused_url(), retry_max_attempts=50, retry_initial_delay=100)
    client.track("Lost", user_id="u1")
    time.sleep(0.3)  # let a few attempts fail
    assert client.shutdown(timeout=0.5) is False
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING and "Failed to send" in r.getMessage()]
    assert failures, [r.getMessage() for r in caplog.records]
    message = failures[0].getMessage()
    assert "shutdown timed out" in message and "Connection refused" in message, message
    formatted = logging.Formatter("%(name)s: %(message)s").format(failures[0])
    assert "klime: klime" not in formatted and not failures[0].getMessage().startswith("klime:")


# --- 3. a fork made from C -------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_c_level_fork_child_with_threads_racing_on_their_first_calls(raw_servers: RawServers) -> None:
    """Hooks do not run: the first calls of several threads find the parent's state, once."""
    server = raw_servers()
    code, out, err, _ = run_script(
        WAIT_FOR_CHILD
        + """
import ctypes, json, os, sys, threading
from klime import KlimeClient

url = sys.argv[1]
client = KlimeClient("test-write-key", url, flush_interval=60000, max_batch_size=10)
client.track_sync("Parent Sync", user_id="parent")  # a kept-alive connection the child must not reuse
for i in range(25):
    client.track("Parent", {"i": i}, user_id="parent")
client.flush(timeout=10)
# Forking while other threads are running Python code is unsafe in CPython
# itself after a fork from C (its own locks are not reset), so the parent's
# threads are idle here, as in a uWSGI master; these stay queued, unsent.
for i in range(5):
    client.track("Parent Queued", {"i": i}, user_id="parent")
import time
time.sleep(0.3)  # let the sending threads settle into their waits

results = []
for round_ in range(5):
    pid = ctypes.PyDLL(None).fork()
    if pid == 0:
        try:
            start = threading.Barrier(6)
            out = []

            def first_call(k):
                start.wait()
                if k == 0:
                    out.append(("sync", client.track_sync("Child Sync", {"r": round_}, user_id="child").accepted))
                elif k == 1:
                    out.append(("flush", client.flush(timeout=10)))
                else:
                    for i in range(5):
                        client.track("Child", {"r": round_, "k": k, "i": i}, user_id="child")
                    out.append(("track", k))

            threads = [threading.Thread(target=first_call, args=(k,)) for k in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            ok = client.shutdown(timeout=10)
            sys.stdout.write(json.dumps({"round": round_, "out": sorted(map(list, out)), "ok": ok}) + "\\n")
            sys.stdout.flush()
        finally:
            os._exit(0)
    results.append(wait_for_child(pid))
print(json.dumps({"parent": client.flush(timeout=10), "children": results}))
""",
        server.url,
        timeout=120,
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    children, summary = lines[:-1], lines[-1]
    assert summary == {"parent": True, "children": [0, 0, 0, 0, 0]}, (summary, err)
    assert len(children) == 5
    for child in children:
        assert child["ok"] is True
        assert (["sync", 1] in child["out"] and ["flush", True] in child["out"]) or ["flush", False] not in child["out"]
    events = [ev for req in server.requests for ev in req.json()["batch"]]
    names = sorted(e["event"] for e in events)
    # Each child: its own sync event and 4 threads x 5 tracks, once; the parent's 25 + 1, once.
    assert names.count("Child Sync") == 5
    assert names.count("Child") == 5 * 4 * 5
    assert names.count("Parent") == 25 and names.count("Parent Sync") == 1
    assert names.count("Parent Queued") == 5  # sent by the parent only, never by a child
    assert len({e["messageId"] for e in events}) == len(events)
