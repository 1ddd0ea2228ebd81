"""Shared fixtures: a recording collector, clients that are always shut down, and bounded subprocesses."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import pytest
from pytest_httpserver import HTTPServer

from klime import Event, KlimeClient

from .servers import Collector, Held, RawRequest, RawServer, Reply, default_behaviour

# Quick but realistic settings for tests; each test overrides what it checks.
FAST = dict(flush_interval=60_000, retry_initial_delay=10, request_timeout=2_000, shutdown_timeout=5_000)

ROOT = Path(__file__).resolve().parent.parent  # the repository
SRC = str(ROOT / "src")  # for a subprocess's PYTHONPATH

# The types of the make_client and raw_servers fixtures, for annotations.
MakeClient = Callable[..., KlimeClient]
RawServers = Callable[..., RawServer]


@pytest.fixture
def collector(httpserver: HTTPServer) -> Collector:
    return Collector(httpserver)


class Recorder:
    """on_error / on_success callbacks that remember what they were given."""

    def __init__(self) -> None:
        self.errors: List[Tuple[Exception, List[Event]]] = []
        self.successes: List[Any] = []

    def on_error(self, error: Exception, events: List[Event]) -> None:
        self.errors.append((error, list(events)))

    def on_success(self, response: Any) -> None:
        self.successes.append(response)

    @property
    def failed_events(self) -> List[Event]:
        return [ev for _, evs in self.errors for ev in evs]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_client(recorder: Recorder) -> Iterator[Callable[..., KlimeClient]]:
    """Build a client (wired to ``recorder`` unless told otherwise); shut down after the test."""
    clients: List[KlimeClient] = []

    def make(endpoint: str, **options: Any) -> KlimeClient:
        opts = {**FAST, "on_error": recorder.on_error, "on_success": recorder.on_success, **options}
        opts.setdefault("logger", logging.getLogger("klime.test"))
        client = KlimeClient("test-write-key", endpoint, **opts)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.shutdown(timeout=1)


@pytest.fixture
def no_ambient_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback tests must not be routed through a proxy the machine happens to set.

    Not autouse: transport test modules ask for it with ``pytestmark``.
    """
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    # urllib ignores HTTP_PROXY when this CGI variable is set (httpoxy).
    monkeypatch.delenv("REQUEST_METHOD", raising=False)


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Register servers and transports (anything with ``close()``) to be closed at teardown, newest first."""
    things: List[Any] = []

    def add(thing: Any) -> Any:
        things.append(thing)
        return thing

    yield add
    for t in reversed(things):
        t.close()


@pytest.fixture
def raw_servers(make_client: Callable[..., KlimeClient]) -> Iterator[Callable[..., RawServer]]:
    """Start RawServers; closed (and Held gates released) before ``make_client`` shuts clients down.

    Depending on ``make_client`` makes this fixture tear down first, so a
    client stuck on a hanging server sees its connection close instead of
    waiting out its shutdown timeout.
    """
    servers: List[RawServer] = []

    def start(behaviour: Callable[[RawRequest], Reply] = default_behaviour) -> RawServer:
        server = RawServer(behaviour)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if isinstance(server.behaviour, Held):
            server.behaviour.release()
        server.close()


# --- processes --------------------------------------------------------------------------------------
#
# Every test that starts a process goes through run_process() / run_python(), and every test that
# calls os.fork() in the pytest process through fork_and_wait(). Each child gets a process group of
# its own, and whatever happens -- a timeout, a failed assertion, Ctrl-C, SIGTERM from a CI timeout --
# the whole group is killed before the test ends: a hung child (or its own forked child) never
# outlives its bound and never stays behind as an orphan.

PROCESS_TIMEOUT = 60.0
_DUMP_GRACE = 3.0  # seconds a timed-out group gets to print its tracebacks (faulthandler) before SIGKILL
_live_groups: Set[int] = set()  # add/discard are atomic; no lock (the SIGTERM handler reads it)


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    # ProcessLookupError: the group is gone (PermissionError: how macOS reports a group of zombies).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_live_groups_on_sigterm(signum: int, frame: Any) -> None:
    for pgid in list(_live_groups):
        _kill_group(pgid)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def pytest_sessionstart(session: pytest.Session) -> None:
    # A CI step timeout SIGTERMs pytest; without this its children (in their own sessions) would survive.
    main = threading.current_thread() is threading.main_thread()
    if hasattr(os, "killpg") and main and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _kill_live_groups_on_sigterm)


def _describe(argv: Sequence[str]) -> str:
    shown = [a if len(a) <= 80 and "\n" not in a else "<code>" for a in argv]
    return " ".join(shown)


def _tail(text: Optional[str], limit: int = 6000) -> str:
    text = text or ""
    return text if len(text) <= limit else "[...]" + text[-limit:]


def run_process(
    argv: Sequence[str],
    *,
    timeout: float = PROCESS_TIMEOUT,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    input: Optional[str] = None,
    on_start: Optional[Callable[[subprocess.Popen[str]], None]] = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion in a new session (its own process group), text in, text out.

    ``env`` replaces the environment (``None``: inherit); ``PYTHONFAULTHANDLER=1`` is added so that
    a Python process that hangs prints every thread's traceback when killed, and relative
    ``PYTHONPATH`` entries are made absolute (the child may run elsewhere). stdin is ``input`` (or
    empty). ``on_start(proc)`` runs as soon as the process exists.

    If the process (or anything holding its output pipes) is still running after ``timeout``
    seconds, the whole group gets SIGABRT (tracebacks), then SIGKILL, and the test fails with the
    output so far. Processes the child left behind in its group are killed when it ends; the
    group is also killed when the test stops for any other reason (failure, Ctrl-C).
    """
    child_env: Dict[str, str] = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONFAULTHANDLER", "1")
    if child_env.get("PYTHONPATH"):
        # PYTHONPATH=src as pytest saw it, whatever the child's cwd: the same klime in both.
        child_env["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) if p else p for p in child_env["PYTHONPATH"].split(os.pathsep)
        )
    proc = subprocess.Popen(
        list(argv),
        env=child_env,
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pgid = proc.pid  # start_new_session: the child leads a new session and process group
    _live_groups.add(pgid)
    timed_out = False
    try:
        if on_start is not None:
            on_start(proc)
        try:
            stdout, stderr = proc.communicate(input or "", timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            exited = proc.poll()
            _kill_group(pgid, signal.SIGABRT)  # faulthandler prints each process's threads
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=_DUMP_GRACE)
            _kill_group(pgid)
            try:
                stdout, stderr = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a process outside the group holds the pipes
                proc.kill()
                stdout, stderr = "", "(output unavailable: the pipes stayed open after the group was killed)"
            why = (
                f"exited with {exited}, but processes it left behind still held its output"
                if exited is not None
                else "was still running"
            )
            pytest.fail(
                f"{_describe(argv)} {why} after {timeout:g}s; killed its process group.\n"
                f"--- stdout:\n{_tail(stdout)}\n--- stderr:\n{_tail(stderr)}",
                pytrace=False,
            )
    finally:
        _kill_group(pgid)  # leftovers of a finished child; everything on timeout or on any error
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        _live_groups.discard(pgid)
    assert not timed_out
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


def run_python(
    code: str,
    *args: str,
    timeout: float = PROCESS_TIMEOUT,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    input: Optional[str] = None,
) -> subprocess.CompletedProcess[str]:
    """``python -c CODE ARGS`` (``code`` is dedented) through :func:`run_process`."""
    return run_process(
        [sys.executable, "-c", textwrap.dedent(code), *args], timeout=timeout, env=env, cwd=cwd, input=input
    )



def run_script(tmp_path: Path, code: str, *args: str, timeout: float = PROCESS_TIMEOUT) -> Tuple[int, str, str]:
    """Write ``code`` (dedented) to ``tmp_path/script.py`` and run it with this checkout's ``src``
    first on ``PYTHONPATH``, through :func:`run_process` (a timeout kills its group and fails the
    test). For scripts that need a real file, e.g. for tracebacks or line lookups. Returns
    ``(returncode, stdout, stderr)``."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    proc = run_process([sys.executable, str(script), *args], timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr

# For scripts a test runs that fork: prepend this and wait with wait_for_child(pid) instead of
# os.waitpid(pid, 0). A child still running after the bound gets SIGABRT (with PYTHONFAULTHANDLER=1,
# which run_process sets, it prints its threads' tracebacks to the shared stderr), then SIGKILL.
WAIT_FOR_CHILD = """
def wait_for_child(pid, timeout=30.0):
    import os, signal, time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGABRT)
    time.sleep(2.0)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"
"""


def fork_and_wait(child: Callable[[], bytes], timeout: float = 20.0) -> Tuple[int, bytes]:
    """os.fork() in the pytest process: run ``child`` there, wait for it with a bound.

    The child gets its own process group and always leaves through ``os._exit`` (never pytest's
    code or the exit hooks): with 0 after writing ``child()``'s bytes to a pipe, with 3 after
    writing the traceback of whatever it raised. Returns the child's exit code and those bytes;
    the pipe is read while waiting, so a large result cannot block the child. A child still
    running after ``timeout`` seconds is killed with its group and the test fails.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 3
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the pytest process's group killer
            os.setpgid(0, 0)
            os.close(read_end)
            try:
                data = child()
                code = 0
            except BaseException:
                import traceback

                data = traceback.format_exc().encode()
            while data:
                data = data[os.write(write_end, data) :]
        finally:
            os._exit(code)
    os.close(write_end)
    with contextlib.suppress(OSError):  # the child did it first, or has already exited
        os.setpgid(pid, pid)  # also here: no window in which the group does not exist yet
    _live_groups.add(pid)
    chunks: List[bytes] = []
    status: Optional[int] = None
    deadline = time.monotonic() + timeout
    try:
        os.set_blocking(read_end, False)
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
            while True:
                try:
                    chunk = os.read(read_end, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            if status is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
    finally:
        if status is None:
            _kill_group(pid)
            _kill_group_leader(pid)
        _live_groups.discard(pid)
        os.close(read_end)
    if status is None:
        pytest.fail(
            f"the forked child did not finish within {timeout:g}s (deadlock?); killed it.\n"
            f"--- it wrote:\n{_tail(b''.join(chunks).decode(errors='replace'))}",
            pytrace=False,
        )
    _kill_group(pid)  # anything the child forked and left behind
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def _kill_group_leader(pid: int) -> None:
    """SIGKILL ``pid`` (in case it had not made its group yet) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
