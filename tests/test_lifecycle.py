"""The client's lifecycle: shutdown, process exit (atexit), and os.fork().

Exit behaviour is tested in real subprocesses, since what happens at
interpreter exit cannot be observed from inside the test process.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest

from klime import KlimeClient, SendError

from .conftest import FAST, WAIT_FOR_CHILD, MakeClient, RawServers, Recorder, fork_and_wait, run_process
from .servers import Collector, Held, ids_of, raw_events, wait_until

# --- shutdown ----------------------------------------------------------------------------


def test_after_shutdown_async_calls_are_ignored_and_sync_calls_raise(
    collector: Collector, make_client: MakeClient, recorder: Recorder
) -> None:
    client = make_client(collector.url)
    client.track("Before", user_id="u1")
    assert client.shutdown() is True
    assert [e["event"] for e in collector.events] == ["Before"]

    client.track("After", user_id="u1")
    client.identify("u1", {"name": "x"})
    client.group("g1", {"name": "y"}, user_id="u1")
    assert client.queue_size() == 0
    with pytest.raises(SendError):
        client.track_sync("After", user_id="u1")
    with pytest.raises(SendError):
        client.identify_sync("u1")
    with pytest.raises(SendError):
        client.group_sync("g1")
    client.flush(timeout=1)
    assert client.shutdown() is True  # a second shutdown is harmless
    assert [e["event"] for e in collector.events] == ["Before"]
    assert not recorder.errors  # ignored calls are not reported as failed batches


def test_context_manager_delivers_and_shuts_down(collector: Collector) -> None:
    with KlimeClient("test-write-key", collector.url, **FAST) as client:
        client.track("Inside", user_id="u1")
        client.identify("u1")
    assert [e["type"] for e in collector.events] == ["track", "identify"]
    with pytest.raises(SendError):
        client.track_sync("Outside", user_id="u1")
    client.track("Outside", user_id="u1")
    assert len(collector.events) == 2


def test_shutdown_is_bounded_with_a_hanging_endpoint(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    server = raw_servers(lambda r: "hang")
    client = make_client(server.url, max_batch_size=3, request_timeout=30_000, shutdown_timeout=500)
    mids = [f"s{i}" for i in range(7)]
    for mid in mids:
        client.track("Stuck", user_id="u1", message_id=mid)
    server.wait_for_requests(1)

    t0 = time.monotonic()
    assert client.shutdown() is False  # shutdown_timeout=500 ms applies when no timeout is given
    took = time.monotonic() - t0
    assert 0.4 <= took < 5
    assert sorted(ids_of(recorder.failed_events)) == sorted(mids)
    assert {getattr(e, "reason", None) for e, _ in recorder.errors} == {"shutdown_deadline"}
    assert not recorder.successes
    assert client.queue_size() == 0


def test_shutdown_timeout_argument_overrides_the_option(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    server = raw_servers(lambda r: "hang")
    client = make_client(server.url, request_timeout=30_000, shutdown_timeout=60_000)
    client.track("Stuck", user_id="u1", message_id="only")
    t0 = time.monotonic()
    assert client.shutdown(timeout=0.3) is False
    assert time.monotonic() - t0 < 5
    assert [(getattr(e, "reason", None), ids_of(evs)) for e, evs in recorder.errors] == [
        ("shutdown_deadline", ["only"])
    ]
    server.close()  # the abandoned request now fails; it must not be reported again
    time.sleep(0.2)
    assert len(recorder.errors) == 1


# --- process exit ------------------------------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    import threading

    from klime import KlimeClient

    url, count, flush_on_shutdown = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

    def on_error(error, events):
        ids = ",".join(ev.messageId for ev in events)
        # One write per line: callbacks may run on several sender threads at once.
        sys.stdout.write(f"ERROR {error.reason} {ids}\\n")
        sys.stdout.flush()

    def on_success(response):
        sys.stdout.write(f"OK {response.accepted}\\n")
        sys.stdout.flush()

    client = KlimeClient(
        "test-write-key",
        url,
        flush_interval=60000,
        max_batch_size=20,
        request_timeout=30000,
        retry_initial_delay=10,
        shutdown_timeout=1000,
        flush_on_shutdown=flush_on_shutdown,
        on_error=on_error,
        on_success=on_success,
    )
    for i in range(count):
        client.track("Exit Test", {"i": i}, user_id="u1", message_id=f"exit-{i}")
    # One write, as the callbacks do: the first batch's on_success may print at the same time.
    sys.stdout.write("QUEUED\\n")
    sys.stdout.flush()
    # No shutdown(), no flush(): the interpreter just exits.
    """
)


def run_exit_script(tmp_path: Path, url: str, count: int, flush_on_shutdown: bool) -> Tuple[float, List[str]]:
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    t0 = time.monotonic()
    proc = run_process([sys.executable, str(script), url, str(count), "1" if flush_on_shutdown else "0"])
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # A full batch may be delivered, and its on_success print, before the script's own line.
    assert lines.count("QUEUED") == 1, proc.stdout
    lines.remove("QUEUED")
    return took, lines


def errors_in(lines: List[str]) -> List[Tuple[str, List[str]]]:
    out = []
    for line in lines:
        if line.startswith("ERROR "):
            _, reason, ids = line.split(" ", 2)
            out.append((reason, ids.split(",")))
    return out


def test_process_exit_is_bounded_with_hanging_endpoint(tmp_path: Path, raw_servers: RawServers) -> None:
    server = raw_servers(lambda r: "hang")
    took, lines = run_exit_script(tmp_path, server.url, 25, flush_on_shutdown=True)
    assert took < 15, f"exit took {took:.1f}s with shutdown_timeout=1000"
    errors = errors_in(lines)
    reported = [mid for _, ids in errors for mid in ids]
    assert sorted(reported) == sorted(f"exit-{i}" for i in range(25))  # each exactly once
    assert {reason for reason, _ in errors} == {"shutdown_deadline"}
    assert not [line for line in lines if line.startswith("OK")]
    assert server.requests  # the flusher did try: these were not just dropped


def test_exit_without_flush_on_shutdown_reports_instead_of_sending(
    tmp_path: Path, raw_servers: RawServers
) -> None:
    server = raw_servers()
    took, lines = run_exit_script(tmp_path, server.url, 5, flush_on_shutdown=False)
    assert took < 15
    assert errors_in(lines) == [("not_flushed_at_exit", [f"exit-{i}" for i in range(5)])]
    assert server.requests == []


def test_exit_flushes_events_queued_just_before(tmp_path: Path, raw_servers: RawServers) -> None:
    server = raw_servers()
    took, lines = run_exit_script(tmp_path, server.url, 25, flush_on_shutdown=True)
    assert took < 15
    assert errors_in(lines) == []
    # 20 went out as a full batch; the last 5 only because of the exit hook.
    assert sorted(int(line.split()[1]) for line in lines if line.startswith("OK")) == [5, 20]
    assert sorted(e["messageId"] for e in raw_events(server)) == sorted(f"exit-{i}" for i in range(25))


# --- fork ----------------------------------------------------------------------------------------

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is not available")


def run_in_child(child: Callable[[], Dict[str, Any]], timeout: float = 20.0) -> Dict[str, Any]:
    """Fork; run ``child`` there and return its result (JSON through a pipe).

    The child leaves with ``os._exit`` so that neither pytest nor the exit
    hooks run in it. A child still running after ``timeout`` counts as
    deadlocked: it is killed with its process group and the test fails.
    """
    code, data = fork_and_wait(lambda: json.dumps(child()).encode(), timeout=timeout)
    assert code == 0, data.decode(errors="replace")
    result: Dict[str, Any] = json.loads(data)
    return result


@needs_fork
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Python 3.12+ warns about forking with threads
def test_fork_child_does_not_resend_parent_events(
    collector: Collector, make_client: MakeClient, recorder: Recorder
) -> None:
    client = make_client(collector.url, max_batch_size=20)
    for i in range(5):
        client.track("Parent", {"i": i}, user_id="parent")
    assert client.queue_size() == 5

    def child() -> Dict[str, Any]:
        queued_at_start = client.queue_size()
        for i in range(3):
            client.track("Child", {"i": i}, user_id="child")
        ok = client.flush(timeout=10)
        return {"queued_at_start": queued_at_start, "flushed": ok, "left": client.queue_size()}

    result = run_in_child(child)
    assert result == {"queued_at_start": 0, "flushed": True, "left": 0}
    assert client.queue_size() == 5  # the parent's queue is untouched
    assert client.flush(timeout=5) is True

    events = collector.events
    parent = [e for e in events if e["event"] == "Parent"]
    child_events = [e for e in events if e["event"] == "Child"]
    assert sorted(e["properties"]["i"] for e in parent) == [0, 1, 2, 3, 4]
    assert sorted(e["properties"]["i"] for e in child_events) == [0, 1, 2]
    ids = [e["messageId"] for e in events]
    assert len(ids) == len(set(ids)) == 8
    assert not recorder.errors


@needs_fork
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_while_parent_flusher_is_mid_send(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    held = Held(0)
    server = raw_servers(held)
    client = make_client(server.url, max_batch_size=5)
    for i in range(5):
        client.track("Parent", {"i": i}, user_id="parent")
    server.wait_for_requests(1)  # the parent's flusher is now blocked in its request

    def child() -> Dict[str, Any]:
        t0 = time.monotonic()
        for i in range(4):
            client.track("Child", {"i": i}, user_id="child")
        ok = client.flush(timeout=10)
        return {"flushed": ok, "took": time.monotonic() - t0}

    result = run_in_child(child)
    assert result["flushed"] is True
    assert result["took"] < 10
    held.release(0)
    assert client.flush(timeout=10) is True

    events = raw_events(server)
    assert sorted(e["properties"]["i"] for e in events if e["event"] == "Parent") == [0, 1, 2, 3, 4]
    assert sorted(e["properties"]["i"] for e in events if e["event"] == "Child") == [0, 1, 2, 3]
    ids = [e["messageId"] for e in events]
    assert len(ids) == len(set(ids)) == 9
    assert wait_until(lambda: len(recorder.successes) == 1)
    assert not recorder.errors


@needs_fork
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_message_ids_differ_between_parent_and_child(collector: Collector, make_client: MakeClient) -> None:
    client = make_client(collector.url, max_batch_size=50)

    def child() -> Dict[str, Any]:
        for i in range(20):
            client.track("Same", {"i": i}, user_id="u1")
        return {"flushed": client.flush(timeout=10)}

    assert run_in_child(child) == {"flushed": True}
    # Same calls in the parent after the fork: a copied id generator would repeat the child's ids.
    for i in range(20):
        client.track("Same", {"i": i}, user_id="u1")
    assert client.flush(timeout=5) is True
    ids = [e["messageId"] for e in collector.events]
    assert len(ids) == len(set(ids)) == 40


@needs_fork
def test_forked_child_that_exits_normally_delivers_only_its_own_events(
    tmp_path: Path, raw_servers: RawServers
) -> None:
    """The prefork-server shape: both processes end through the exit hook, neither flushes by hand."""
    server = raw_servers()
    script = tmp_path / "fork_exit.py"
    script.write_text(
        WAIT_FOR_CHILD
        + textwrap.dedent(
            """
            import os, sys, warnings
            from klime import KlimeClient

            warnings.simplefilter("ignore", DeprecationWarning)
            client = KlimeClient("test-write-key", sys.argv[1], flush_interval=60000, max_batch_size=50)
            for i in range(5):
                client.track("Parent", {"i": i}, user_id="parent")
            pid = os.fork()
            if pid == 0:
                for i in range(3):
                    client.track("Child", {"i": i}, user_id="child")
                sys.exit(0)  # a normal exit: atexit hooks run in the child
            print("child exit", wait_for_child(pid), flush=True)
            """
        )
    )
    proc = run_process([sys.executable, str(script), server.url])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "child exit 0", proc.stdout + proc.stderr
    events = raw_events(server)
    assert sorted(e["properties"]["i"] for e in events if e["event"] == "Parent") == [0, 1, 2, 3, 4]
    assert sorted(e["properties"]["i"] for e in events if e["event"] == "Child") == [0, 1, 2]
    assert len({e["messageId"] for e in events}) == 8


# --- no flusher thread available ------------------------------------------------------------------

ATEXIT_TRACK_SCRIPT = textwrap.dedent(
    """
    import atexit
    import sys
    import threading

    from klime import KlimeClient

    url, refuse_threads = sys.argv[1], sys.argv[2] == "1"
    client = KlimeClient(
        "test-write-key",
        url,
        request_timeout=1000,
        shutdown_timeout=1000,
        on_error=lambda error, events: print("ERROR", error.reason, len(events), flush=True),
        on_success=lambda response: print("OK", response.accepted, flush=True),
    )

    @atexit.register  # registered after klime's own hook, so it runs before it
    def last_event():
        if refuse_threads:
            # What Python 3.12 does in atexit handlers, on any version.
            def start(self):
                raise RuntimeError("can't create new thread at interpreter shutdown")
            threading.Thread.start = start
        client.track("App Stopped", user_id="u1")
        print("tracked", flush=True)
    """
)


@pytest.mark.parametrize("refuse_threads", [False, True], ids=["threads", "no-threads"])
def test_event_tracked_in_an_atexit_handler_is_delivered(
    tmp_path: Path, raw_servers: RawServers, refuse_threads: bool
) -> None:
    server = raw_servers()
    script = tmp_path / "atexit_track.py"
    script.write_text(ATEXIT_TRACK_SCRIPT)
    t0 = time.monotonic()
    proc = run_process([sys.executable, str(script), server.url, "1" if refuse_threads else "0"])
    assert time.monotonic() - t0 < 15
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.split() == ["tracked", "OK", "1"]  # track() did not raise, and the event went out
    assert [e["event"] for e in raw_events(server)] == ["App Stopped"]


@pytest.fixture
def no_flusher_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make starting the flusher fail as it does in a Python 3.12 atexit handler (other threads still start)."""
    start = threading.Thread.start

    def refusing_start(self: threading.Thread) -> None:
        if self.name == "klime-flusher":
            raise RuntimeError("can't create new thread at interpreter shutdown")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", refusing_start)


@pytest.mark.usefixtures("no_flusher_thread")
def test_without_a_flusher_thread_flush_sends_on_the_calling_thread(
    collector: Collector, make_client: MakeClient, recorder: Recorder
) -> None:
    client = make_client(collector.url, max_batch_size=4)
    for i in range(10):
        client.track("Threadless", {"i": i}, user_id="u1")  # must not raise
    assert client.queue_size() == 10
    assert client.flush(timeout=5) is True
    assert [e["properties"]["i"] for e in collector.events] == list(range(10))
    assert [len(r.events) for r in collector.requests] == [4, 4, 2]
    assert len(recorder.successes) == 3
    client.track("Threadless", {"i": 10}, user_id="u1")
    assert client.shutdown(timeout=5) is True
    assert len(collector.events) == 11


@pytest.mark.usefixtures("no_flusher_thread")
def test_without_a_flusher_thread_flush_keeps_its_deadline(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    server = raw_servers(lambda r: "hang")
    client = make_client(server.url, request_timeout=300, retry_initial_delay=10)
    client.track("Stuck", user_id="u1", message_id="t1")
    client.track("Stuck", user_id="u1", message_id="t2")
    t0 = time.monotonic()
    assert client.flush(timeout=0.5) is False
    assert time.monotonic() - t0 < 5
    assert sorted(ids_of(recorder.failed_events)) == ["t1", "t2"]
    assert {getattr(e, "reason", None) for e, _ in recorder.errors} == {"flush_deadline"}
    assert client.queue_size() == 0


@pytest.mark.usefixtures("no_flusher_thread")
def test_without_a_flusher_thread_a_hanging_request_does_not_outlast_the_deadline(
    raw_servers: RawServers, make_client: MakeClient, recorder: Recorder
) -> None:
    """Sending on the caller's thread, nothing else can cut a request short: the deadline caps it."""
    server = raw_servers(lambda r: "hang")
    client = make_client(server.url, request_timeout=20_000)
    client.track("Stuck", user_id="u1", message_id="t1")
    t0 = time.monotonic()
    assert client.flush(timeout=0.5) is False
    assert time.monotonic() - t0 < 5, "a 20 s request timeout must not stretch a 0.5 s flush"
    assert ids_of(recorder.failed_events) == ["t1"]
    assert {getattr(e, "reason", None) for e, _ in recorder.errors} == {"flush_deadline"}


@pytest.mark.usefixtures("no_flusher_thread")
def test_without_a_flusher_thread_flush_from_a_callback_does_not_deadlock(
    collector: Collector, make_client: MakeClient
) -> None:
    nested: List[bool] = []
    client: KlimeClient

    def on_success(response: Any) -> None:
        client.track("From Callback", user_id="u1")
        nested.append(client.flush())  # no timeout: would wait forever on its own sending

    client = make_client(collector.url, on_success=on_success)
    client.track("Outer", user_id="u1")
    outer = threading.Thread(target=client.flush, kwargs={"timeout": None}, daemon=True)
    outer.start()
    outer.join(10)
    assert not outer.is_alive(), "flush() deadlocked"
    assert nested and nested[0] is False
    assert collector.events[0]["event"] == "Outer"


# --- a fork the fork hooks do not see ---------------------------------------------------------------


@needs_fork
def test_child_of_a_c_level_fork_still_delivers_its_own_events(tmp_path: Path, raw_servers: RawServers) -> None:
    """uWSGI without py-call-osafterfork forks from C: os.register_at_fork hooks never run.

    libc's fork() through ctypes does the same. The client must notice the
    new pid by itself, start fresh, and never send the parent's queue.
    """
    server = raw_servers()
    script = tmp_path / "c_fork.py"
    script.write_text(
        WAIT_FOR_CHILD
        + textwrap.dedent(
            """
            import ctypes, os, sys
            from klime import KlimeClient

            client = KlimeClient("test-write-key", sys.argv[1], flush_interval=60000, max_batch_size=50)
            for i in range(4):
                client.track("Parent", {"i": i}, user_id="parent")
            # PyDLL keeps the GIL across the call, as a C server forking from
            # Python-aware code does; CDLL would release it and the child
            # could inherit a GIL owned by a thread that no longer exists.
            pid = ctypes.PyDLL(None).fork()
            if pid == 0:
                code = 4  # raised
                try:
                    for i in range(3):
                        client.track("Child", {"i": i}, user_id="child")
                    code = 0 if client.flush(timeout=10) else 3
                finally:
                    os._exit(code)  # never the parent's code, never the exit hooks
            # Bounded: a child that hangs is killed (after printing its threads) and shows as "hung".
            print("child", wait_for_child(pid), "parent", client.flush(timeout=10), flush=True)
            """
        )
    )
    proc = run_process([sys.executable, str(script), server.url], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "child 0 parent True", proc.stdout + proc.stderr
    events = raw_events(server)
    assert sorted(e["properties"]["i"] for e in events if e["event"] == "Parent") == [0, 1, 2, 3]
    assert sorted(e["properties"]["i"] for e in events if e["event"] == "Child") == [0, 1, 2]


def test_shutdown_lets_a_report_already_under_way_reach_on_error(
    raw_servers: RawServers, make_client: MakeClient
) -> None:
    """Events the flusher has taken to report cannot be claimed at the deadline.

    shutdown() must not return (and let the process exit) before on_error
    has had them; a slow callback shows the window.
    """
    reported: List[str] = []
    entered = threading.Event()

    def slow_on_error(error: Exception, events: List[Any]) -> None:
        if getattr(error, "reason", None) == "queue_overflow":
            entered.set()
            time.sleep(0.4)
        reported.extend(ev.messageId for ev in events)

    # The first request is answered slowly, so the flusher is busy while the queue overflows.
    answers = iter(["slow:0.3"])
    server = raw_servers(lambda r: next(answers, "hang"))
    client = make_client(server.url, max_queue_size=2, max_batch_size=100, on_error=slow_on_error)
    client.track("Overflow", user_id="u1", message_id="m-0")
    client.track("Overflow", user_id="u1", message_id="m-1")  # a full queue: sent at once
    assert server.wait_for_requests(1)
    for i in range(2, 5):  # m-2 is dropped when m-4 arrives; the flusher reports it
        client.track("Overflow", user_id="u1", message_id=f"m-{i}")
    assert entered.wait(5)
    client.shutdown(timeout=0.01)
    # The drop report under way (m-2) reached on_error before shutdown
    # returned; what was queued was claimed at the deadline. The batch in
    # flight (m-0, m-1) may have been answered or claimed, never lost.
    assert {"m-2", "m-3", "m-4"} <= set(reported)
    assert len(reported) == len(set(reported))


def test_client_the_application_let_go_of_still_delivers_at_exit(
    tmp_path: Path, raw_servers: RawServers
) -> None:
    """No reference left to the client, yet its queued events are not lost at exit."""
    server = raw_servers()
    script = tmp_path / "dropped_client.py"
    script.write_text(
        textwrap.dedent(
            """
            import gc, sys
            from klime import KlimeClient

            def send_and_forget():
                client = KlimeClient("test-write-key", sys.argv[1], flush_interval=60000)
                for i in range(3):
                    client.track("Forgotten", {"i": i}, user_id="u1")

            send_and_forget()
            gc.collect()
            """
        )
    )
    proc = run_process([sys.executable, str(script), server.url])
    assert proc.returncode == 0, proc.stderr
    assert sorted(e["properties"]["i"] for e in raw_events(server)) == [0, 1, 2]


@needs_fork
def test_the_fork_mark_reads_false_in_any_child_until_the_fork_entry_ran(tmp_path: Path) -> None:
    """Every call's fork check reads a mark instead of asking for the pid.

    The mark must read false in a child forked from C (no hooks ran) until
    the first call resets the clients, and true again after; a child forked
    from Python has been reset by the hook already. The parent's mark stays.
    """
    script = tmp_path / "mark.py"
    script.write_text(
        WAIT_FOR_CHILD
        + textwrap.dedent(
            """
            import ctypes, os
            from klime import _lifecycle

            assert _lifecycle.mark[0]
            pid = ctypes.PyDLL(None).fork()
            if pid == 0:
                code = 4
                try:
                    before = bool(_lifecycle.mark[0])
                    _lifecycle.check_fork()
                    code = 0 if (not before and _lifecycle.mark[0] and _lifecycle._pid == os.getpid()) else 3
                finally:
                    os._exit(code)
            c_child = wait_for_child(pid)
            pid = os.fork()
            if pid == 0:
                os._exit(0 if _lifecycle.mark[0] and _lifecycle._pid == os.getpid() else 3)
            py_child = wait_for_child(pid)
            print(c_child, py_child, bool(_lifecycle.mark[0]), type(_lifecycle.mark).__name__, flush=True)
            """
        )
    )
    proc = run_process([sys.executable, str(script)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    expected_kind = "mmap" if sys.platform.startswith("linux") else "_PidMark"
    assert proc.stdout.split() == ["0", "0", "True", expected_kind], proc.stdout + proc.stderr


def test_the_fork_mark_is_not_trusted_where_any_advice_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """An emulator that accepts advice it does not know would never show a fork: the pid is compared there."""
    import mmap

    from klime import _lifecycle

    class Lenient(mmap.mmap):
        def madvise(self, *args: Any) -> None:
            return None

    monkeypatch.setattr(mmap, "mmap", Lenient)
    assert type(_lifecycle._fork_mark()).__name__ == "_PidMark"
    monkeypatch.undo()
    if sys.platform.startswith("linux"):
        assert type(_lifecycle._fork_mark()).__name__ == "mmap"


def test_a_fork_mark_found_cleared_is_set_again_even_if_the_pid_is_the_same() -> None:
    """A fork that keeps the pid (a new pid namespace) must not leave every call taking the lock."""
    from klime import _lifecycle

    _lifecycle.mark[0] = 0  # a _PidMark (not Linux) ignores this and compares the pid
    try:
        _lifecycle.check_fork()
        assert _lifecycle.mark[0] and _lifecycle._pid == os.getpid()
    finally:
        _lifecycle.mark[0] = 1
