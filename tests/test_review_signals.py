"""Review: a signal handler that calls the client while the main thread is inside it.

Signal handlers run on the main thread between two bytecodes, so they can
interrupt the client anywhere, also while it holds one of its locks. To hit
the narrow windows deterministically, a trace function raises the signal
exactly when the main thread reaches a chosen line (what a SIGTERM arriving
at that instant does); a second test shows the same with real, randomly
timed signals.

Everything that can hang runs in a child process started in its own session
and killed as a process group on timeout.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .conftest import run_script
from .servers import RawServer

needs_unix = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")


# A trace function that raises a signal on the main thread when it is about
# to run the first line containing ``marker`` in function ``func``.
SIGNAL_AT = """
import inspect, signal, sys, threading

def signal_at(func, marker, signum=signal.SIGUSR1):
    code = func.__code__
    lines, first = inspect.getsourcelines(func)
    target = next(first + i for i, text in enumerate(lines) if marker in text)
    fired = []

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == target and not fired:
            fired.append(True)
            sys.settrace(None)
            frame.f_trace = None
            signal.raise_signal(signum)  # runs the Python handler right here
        return local

    def tracer(frame, event, arg):
        if frame.f_code is code and not fired:
            return local
        return None

    sys.settrace(tracer)
    return fired
"""


# --- 1. shutdown() in a handler that interrupted track() between its check and its append --------

PUT_WINDOW = (
    SIGNAL_AT
    + """
import os, sys, time
from klime import KlimeClient
from klime._worker import Worker

def on_error(error, events):
    print("reported", [ev.messageId for ev in events], flush=True)

client = KlimeClient("test-write-key", sys.argv[1], flush_interval=60000, request_timeout=2000,
                     on_error=on_error)
client.track("Before", user_id="u1", message_id="before")

def on_term(signum, frame):
    print("handler shutdown", client.shutdown(timeout=5), flush=True)

signal.signal(signal.SIGUSR1, on_term)
fired = signal_at(Worker.put, "ledger.add(ev)")
client.track("During", user_id="u1", message_id="during")  # the signal lands inside this call
sys.settrace(None)
assert fired, "the signal was not raised"
# The handler's shutdown() returned; the interrupted track() returned normally (the event was
# accepted, not ignored). The process now ends the way a multiprocessing child does: the exit
# hook, then os._exit. By then the event must have been delivered or reported.
print("track returned", flush=True)
import klime._lifecycle as lc
lc.exit_all()
st = client.stats()
print("left", st.queued + st.in_flight, flush=True)
os._exit(0)
"""
)


@needs_unix
def test_review_signal_shutdown_inside_track_does_not_strand_the_event(tmp_path: Path) -> None:
    """A SIGTERM handler calls shutdown() while track() holds the worker lock after its
    ``_accepting`` check: shutdown completes inside the handler, then the interrupted put()
    appends the event to the ledger of a client that is shut down and unregistered. The event
    sits in the queue forever: neither delivered nor reported (lost silently at exit)."""
    with RawServer() as server:
        rc, out, err = run_script(tmp_path, PUT_WINDOW, server.url)
        assert rc == 0, (out, err)
        assert "handler shutdown True" in out and "track returned" in out, (out, err)
    # When the exit hook returns, nothing may be left queued or in flight (daemon threads die next).
    assert "left 0" in out, out


# --- 2. shutdown() in a handler that interrupted a *_sync inside the transport's pool lock ----------

POOL_WINDOW = (
    SIGNAL_AT
    + """
import sys
from klime import KlimeClient, SendError
from klime._transport import HttpTransport

client = KlimeClient("test-write-key", sys.argv[1], flush_interval=60000, request_timeout=2000)

def on_term(signum, frame):
    print("handler shutdown", client.shutdown(timeout=2), flush=True)

signal.signal(signal.SIGUSR1, on_term)
fired = signal_at(HttpTransport._release, "keep = reusable")
client.track_sync("Sync", user_id="u1")
sys.settrace(None)
print("fired", bool(fired), flush=True)
"""
)


@needs_unix
def test_review_signal_shutdown_inside_track_sync_does_not_deadlock(tmp_path: Path) -> None:
    """The pool lock of HttpTransport is a plain Lock, and shutdown() ends with
    ``transport.close()``, which takes it: a SIGTERM handler calling shutdown() while the main
    thread is inside ``_take``/``_release``/``_open`` (every ``*_sync``) deadlocks the process."""
    with RawServer() as server:
        rc, out, err = run_script(tmp_path, POOL_WINDOW, server.url, timeout=20)
    assert rc == 0, (out, err)
    assert "handler shutdown True" in out and "fired True" in out


# --- 3. the same with real signals: a timer fires while the main thread loops on track() -----------

STRESS = """
import os, signal, sys, threading, time, random
from klime import KlimeClient
import klime._lifecycle as lc

url, rounds = sys.argv[1], int(sys.argv[2])
stranded = 0
for r in range(rounds):
    errors = []
    client = KlimeClient("test-write-key", url, flush_interval=60000, request_timeout=2000,
                         max_queue_size=50, max_batch_size=20,
                         on_error=lambda e, evs: errors.extend(evs))
    done = []

    def on_term(signum, frame, client=client):
        done.append(client.shutdown(timeout=5))

    signal.signal(signal.SIGUSR1, on_term)
    threading.Timer(random.random() * 0.003, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    i = 0
    t0 = time.monotonic()
    while not done and time.monotonic() - t0 < 5:
        client.track("Loop", {"i": i}, user_id="u1")
        i += 1
    lc.exit_all()  # what exit runs: after it, nothing may be left undelivered and unreported
    st = client.stats()
    if st.queued + st.in_flight:
        stranded += 1
print("stranded", stranded, "of", rounds, flush=True)
"""


@needs_unix
def test_review_random_sigterm_shutdown_while_tracking(tmp_path: Path) -> None:
    """Real, randomly timed signals: no round may leave events queued in a shut-down client,
    and none may hang."""
    with RawServer() as server:
        rc, out, err = run_script(tmp_path, STRESS, server.url, "150", timeout=120)
    assert rc == 0, (out, err)
    assert "stranded 0 of" in out, out
