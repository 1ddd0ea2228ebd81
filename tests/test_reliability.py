"""Nothing lost silently (docs/delivery.md) under a seeded storm of faults.

A loopback server answers every batch with a seeded choice of: 200, 202
with no body, 200 with some events rejected, 400, 429 (sometimes with
``Retry-After: 0`` or ``1``), 500, 503 (sometimes ``Retry-After: 0``), a
reset before any answer, a close before any answer, an answer slower than
the client's request timeout, or a connection closed mid-body. The first
requests go through every kind once, so each run meets all of them.

The client runs in a subprocess (so that "the process exits" is observed
from outside): eight producer threads call track/identify/group with
explicit message ids, in bursts, with a few unencodable and oversize
events and random ``flush()`` calls; the small queue overflows. Part-way
through, the process forks; the child produces its own events through the
inherited client, shuts it down, writes what it saw and leaves with
``os._exit``. The parent then shuts down and writes its own account.

Every id must end in one of the places docs/delivery.md allows: accepted by the
server in an answered 2xx, rejected in a 2xx partial failure *and* named in
the client's log, or handed to ``on_error`` with a reason, all by the time
``shutdown()`` returned. The server decides each request's fault from the
seed and the request's first message id, so a seed replays the same
workload and the same fault for the same batch; only thread timing varies.
Set ``KLIME_RELIABILITY_SEED`` to try another seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from klime import BatchResponse, Event, KlimeClient

from .conftest import ROOT, run_process
from .servers import RawRequest, RawServer, Reply

SEED = int(os.environ.get("KLIME_RELIABILITY_SEED", "20261122"))

PRODUCERS = 8
PER_PRODUCER = 280
CHILD_PRODUCERS = 2
PER_CHILD_PRODUCER = 200
FORK_AFTER = 0.35  # fraction of the parent's events produced before the fork

REQUEST_TIMEOUT_MS = 300
SLOW_REPLY = 0.45  # seconds; longer than the request timeout
SHUTDOWN_TIMEOUT = 8.0
TRACK_BOUND = 0.5  # generous: two loaded cores, other suites running
FLUSH_OVERRUN_BOUND = 1.0
RUN_LIMIT = 60.0
EXIT_BOUND = 5.0  # from the scenario's last line to the process being gone

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
OVERSIZE = "x" * 210_000
NEVER_SENT = ("queue_overflow", "oversize", "unencodable")

# kind -> weight once every kind has been served once
KINDS: Dict[str, int] = {
    "ok": 40,
    "ok_no_body": 4,
    "partial": 10,
    "bad_request": 4,
    "rate_limited": 6,
    "server_error": 8,
    "unavailable": 6,
    "reset": 6,
    "close": 4,
    "slow": 4,
    "close_mid_body": 5,
}


# --- the fault-injecting server (runs in the pytest process) -------------------


@dataclass
class Served:
    """One request as the server saw and answered it."""

    number: int
    kind: str
    ids: List[str]
    connection: int
    accepted: List[str] = field(default_factory=list)  # answered 2xx at once, not rejected
    rejected: List[str] = field(default_factory=list)  # listed in a 2xx partial failure


class FaultPlan:
    """The RawServer behaviour: a seeded fault per request, and a record of each."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.served: List[Served] = []
        self.bad_bodies = 0
        self._lock = threading.Lock()
        self._count = 0
        self._seen: Counter[str] = Counter()
        self._forced = sorted(KINDS)
        random.Random(f"{seed}/forced").shuffle(self._forced)

    def __call__(self, req: RawRequest) -> Reply:
        try:
            ids = [ev["messageId"] for ev in req.json()["batch"]]
        except (ValueError, KeyError, TypeError):
            with self._lock:
                self.bad_bodies += 1
            return (400, b'{"error":"unreadable batch"}')
        with self._lock:
            number = self._count
            self._count += 1
            # Keyed by content, not arrival order, so a seed replays the same
            # fault for the same batch however the threads interleave.
            first = ids[0] if ids else ""
            rng = random.Random(f"{self.seed}/{first}/{self._seen[first]}")
            self._seen[first] += 1
        if number < len(self._forced):
            kind = self._forced[number]
        else:
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        rec = Served(number, kind, ids, req.connection)
        reply = self._reply(rec, rng)
        with self._lock:
            self.served.append(rec)
        return reply

    @staticmethod
    def _reply(rec: Served, rng: random.Random) -> Reply:
        n = len(rec.ids)
        kind = rec.kind
        if kind == "ok":
            rec.accepted = list(rec.ids)
            return (200, json.dumps({"status": "ok", "accepted": n, "failed": 0}).encode())
        if kind == "ok_no_body":
            rec.accepted = list(rec.ids)
            return (202, b"")
        if kind == "partial":
            bad = sorted(rng.sample(range(n), rng.randint(1, min(3, n))))
            rec.rejected = [rec.ids[i] for i in bad]
            rec.accepted = [mid for i, mid in enumerate(rec.ids) if i not in bad]
            errors = [{"index": i, "message": "event failed validation", "code": "invalid_event"} for i in bad]
            body = {"status": "partial", "accepted": n - len(bad), "failed": len(bad), "errors": errors}
            return (200, json.dumps(body).encode())
        if kind == "bad_request":
            return (400, b'{"error":"invalid batch"}')
        if kind in ("rate_limited", "unavailable"):
            status = 429 if kind == "rate_limited" else 503
            roll = rng.random()
            if kind == "rate_limited" and roll < 0.12:
                return (status, b"", {"Retry-After": "1"})
            if roll < 0.4:
                return (status, b"", {"Retry-After": "0"})
            return (status, b"")
        if kind == "server_error":
            return (500, b"internal error")
        if kind == "reset":
            return "reset"
        if kind == "close":
            return "close"
        if kind == "slow":
            return f"slow:{SLOW_REPLY}"
        assert kind == "close_mid_body", kind
        return "half"


def _client_socket_inode(client_port: int, server_port: int) -> Optional[str]:
    local = f"0100007F:{client_port:04X}"
    remote = f"0100007F:{server_port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] == local and parts[2] == remote:
                return parts[9]
    return None


def _holds(pid: int, inode: str) -> bool:
    target = f"socket:[{inode}]"
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def _children_of(pid: int) -> List[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(name))
    return found


class FaultServer(RawServer):
    """A RawServer that also learns which process (scenario parent or its fork) opened each connection.

    The client's headers are the same in both processes, so the only way to
    tell who sent a request is the socket: the connection's client port ->
    its inode in /proc/net/tcp -> the process holding that inode.
    """

    def __post_init__(self) -> None:
        self.owners: Dict[int, str] = {}
        self._scenario_pid = 0
        self._pid_known = threading.Event()
        self._children: Set[int] = set()
        super().__post_init__()

    def watch(self, pid: int) -> None:
        self._scenario_pid = pid
        self._pid_known.set()

    def _serve(self, conn: socket.socket, index: int) -> None:
        owner = "unknown"
        if self._pid_known.wait(10) and os.path.exists("/proc/net/tcp"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                owner = self._owner(conn.getpeername()[1])
        self.owners[index] = owner
        super()._serve(conn, index)

    def _owner(self, client_port: int) -> str:
        # The client is waiting for an answer, so its socket is still open.
        inode = _client_socket_inode(client_port, self.port)
        if inode is None:
            return "unknown"
        if _holds(self._scenario_pid, inode):
            return "parent"
        for pid in list(self._children):
            if _holds(pid, inode):
                return "child"
        for pid in _children_of(self._scenario_pid):
            if _holds(pid, inode):
                self._children.add(pid)
                return "child"
        return "unknown"


# --- the scenario (runs in a subprocess, and its fork) ---------------------------


class Tally:
    """on_error / on_success as plain lists (appends are atomic; no lock to inherit across fork)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.errors: List[Tuple[str, Any, List[str]]] = []
        self.successes = 0

    def on_error(self, error: Exception, events: List[Event]) -> None:
        self.errors.append((type(error).__name__, getattr(error, "reason", None), [ev.messageId for ev in events]))

    def on_success(self, response: BatchResponse) -> None:
        self.successes += 1


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Producer(threading.Thread):
    """Calls track/identify/group in seeded bursts, with an occasional flush()."""

    def __init__(self, client: KlimeClient, tag: str, count: int, seed: int) -> None:
        super().__init__(name=f"producer-{tag}")
        self.client = client
        self.tag = tag
        self.count = count
        self.rng = random.Random(f"{seed}/{tag}")
        self.ids: List[str] = []
        self.raised: List[str] = []
        self.max_latency = 0.0
        self.flushes = 0
        self.flush_overrun = 0.0
        self.done = 0

    def run(self) -> None:
        rng = self.rng
        client = self.client
        burst = 0
        for i in range(self.count):
            if burst <= 0:
                time.sleep(rng.uniform(0.05, 0.55))
                # Now and then a burst well past the queue size, to force overflow.
                burst = 300 if rng.random() < 0.02 else rng.randint(1, 40)
                if self.tag == "p2" and i == 0:
                    burst = self.count  # one certain overflow per run
            burst -= 1
            mid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            self.ids.append(mid)
            user = f"user-{rng.randrange(50)}"
            props: Dict[str, Any] = {"n": i, "producer": self.tag}
            roll = rng.random()
            if (self.tag == "p0" and i == 3) or roll < 0.003:
                props["ratio"] = float("nan")
            elif (self.tag == "p1" and i == 4) or roll < 0.005:
                props["blob"] = OVERSIZE
            call = rng.random()
            started = time.perf_counter()
            try:
                if call < 0.8:
                    client.track("Reliability Probe", props, user_id=user, message_id=mid)
                elif call < 0.9:
                    client.identify(user, props, message_id=mid)
                else:
                    client.group(f"org-{rng.randrange(10)}", props, user_id=user, message_id=mid)
            except Exception as exc:
                self.raised.append(f"{type(exc).__name__}: {exc}")
            self.max_latency = max(self.max_latency, time.perf_counter() - started)
            self.done = i + 1
            if rng.random() < 0.005:
                timeout = rng.choice([0.05, 1.0, 2.0, 3.0, None])
                started = time.monotonic()
                client.flush(timeout=timeout)
                self.flushes += 1
                if timeout is not None:
                    self.flush_overrun = max(self.flush_overrun, time.monotonic() - started - timeout)


def _produce_and_shut_down(
    client: KlimeClient, producers: List[Producer], tally: Tally, capture: LogCapture, before: Set[threading.Thread]
) -> Dict[str, Any]:
    """Join the producers, shut the client down and describe what happened."""
    for p in producers:
        p.join()
    started = time.monotonic()
    ok = client.shutdown(timeout=SHUTDOWN_TIMEOUT)
    elapsed = time.monotonic() - started
    # What shutdown() has accounted for by the time it returns is what a
    # process exiting right now would have reported.
    errors_at_shutdown = list(tally.errors)
    lines_at_shutdown = list(capture.lines)
    queue_after = client.queue_size()
    extra: List[threading.Thread] = []
    # A request in flight at a deadline may keep the thread for one request timeout.
    deadline = time.monotonic() + 3.0
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t not in producers and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return {
        "produced": [mid for p in producers for mid in p.ids],
        "raised": [r for p in producers for r in p.raised],
        "max_track": max(p.max_latency for p in producers),
        "flushes": sum(p.flushes for p in producers),
        "flush_overrun": max(p.flush_overrun for p in producers),
        "shutdown_ok": ok,
        "shutdown_elapsed": elapsed,
        "queue_after_shutdown": queue_after,
        "threads_left": [t.name for t in extra],
        "errors": errors_at_shutdown,
        "warnings": lines_at_shutdown,
        "successes": tally.successes,
    }


def _child_main(client: KlimeClient, tally: Tally, capture: LogCapture, seed: int, out: str) -> None:
    """The forked child: produce through the inherited client, report, and never return."""
    code = 1
    result: Dict[str, Any] = {}
    try:
        # The parent's callbacks and log lines up to the fork are not ours.
        tally.reset()
        capture.lines = []
        result["queue_at_fork"] = client.queue_size()
        before = {threading.current_thread()}
        producers = [Producer(client, f"c{i}", PER_CHILD_PRODUCER, seed) for i in range(CHILD_PRODUCERS)]
        for p in producers:
            p.start()
        result.update(_produce_and_shut_down(client, producers, tally, capture, before))
        result["errors_final"] = list(tally.errors)
        code = 0
    except BaseException:
        result["crash"] = traceback.format_exc()
    finally:
        try:
            with open(out, "w") as f:
                json.dump(result, f)
        finally:
            os._exit(code)


def run_scenario(config_path: str) -> None:
    """Entry point of the subprocess: the parent's side of the scenario."""
    with open(config_path) as f:
        cfg = json.load(f)
    seed: int = cfg["seed"]
    rng = random.Random(f"{seed}/config")
    options = {
        "flush_interval": rng.choice([20, 50, 100]),
        "max_batch_size": rng.choice([10, 20, 40]),
        "max_queue_size": rng.choice([100, 150, 200]),
        "retry_max_attempts": 4,
        "retry_initial_delay": rng.choice([5, 10, 20]),
        "request_timeout": REQUEST_TIMEOUT_MS,
        "shutdown_timeout": int(SHUTDOWN_TIMEOUT * 1000),
    }
    logger = logging.getLogger("klime.reliability")
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    capture = LogCapture()
    logger.addHandler(capture)
    tally = Tally()

    before = set(threading.enumerate())
    client = KlimeClient(
        "test-write-key", cfg["url"], logger=logger, on_error=tally.on_error, on_success=tally.on_success, **options
    )
    producers = [Producer(client, f"p{i}", PER_PRODUCER, seed) for i in range(PRODUCERS)]
    for p in producers:
        p.start()
    fork_at = int(FORK_AFTER * PRODUCERS * PER_PRODUCER)
    while sum(p.done for p in producers) < fork_at and any(p.is_alive() for p in producers):
        time.sleep(0.002)

    # Forked mid-stream: producers appending, the flusher mid-request.
    pid = os.fork()
    if pid == 0:
        _child_main(client, tally, capture, seed, cfg["child_out"])

    result = _produce_and_shut_down(client, producers, tally, capture, before)
    result["options"] = options
    result["child_pid"] = pid
    deadline = time.monotonic() + 30
    status: Optional[int] = None
    while time.monotonic() < deadline:
        done_pid, raw = os.waitpid(pid, os.WNOHANG)
        if done_pid:
            status = os.waitstatus_to_exitcode(raw)
            break
        time.sleep(0.01)
    if status is None:
        os.kill(pid, signal.SIGABRT)  # PYTHONFAULTHANDLER=1 (run_process): its threads' tracebacks on stderr
        time.sleep(2.0)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    result["child_exit"] = status
    result["errors_final"] = list(tally.errors)
    result["finished_at"] = time.time()
    with open(cfg["out"], "w") as f:
        json.dump(result, f)


# --- the test (pytest process) -------------------------------------------------------


def _account(
    who: str, res: Dict[str, Any], plan: FaultPlan, history: Dict[str, List[str]]
) -> Tuple[List[str], Counter[str]]:
    """Problems with one process's account of its own ids, and its on_error reasons."""
    problems: List[str] = []
    produced = set(res["produced"])
    accepted = {mid for s in plan.served for mid in s.accepted}
    rejected = {mid for s in plan.served for mid in s.rejected}
    received = {mid for s in plan.served for mid in s.ids}

    if len(produced) != len(res["produced"]):
        problems.append(f"{who}: duplicate message ids produced (test bug)")
    if res["raised"]:
        problems.append(f"{who}: {len(res['raised'])} call(s) raised, e.g. {res['raised'][:3]}")
    if res["max_track"] >= TRACK_BOUND:
        problems.append(f"{who}: a call blocked for {res['max_track']:.3f}s")
    if res["flush_overrun"] > FLUSH_OVERRUN_BOUND:
        problems.append(f"{who}: flush(timeout) overran its timeout by {res['flush_overrun']:.3f}s")
    if res["shutdown_elapsed"] > SHUTDOWN_TIMEOUT + 2:
        problems.append(f"{who}: shutdown took {res['shutdown_elapsed']:.2f}s (timeout {SHUTDOWN_TIMEOUT}s)")
    if res["queue_after_shutdown"]:
        problems.append(f"{who}: {res['queue_after_shutdown']} event(s) still queued after shutdown")
    if res["threads_left"]:
        problems.append(f"{who}: thread(s) still running after shutdown: {res['threads_left']}")
    if len(res["errors_final"]) != len(res["errors"]):
        late = res["errors_final"][len(res["errors"]) :]
        problems.append(f"{who}: on_error called {len(late)} time(s) after shutdown() returned: {late[:3]}")

    reasons: Counter[str] = Counter()
    reported: Counter[str] = Counter()
    never_sent: Set[str] = set()
    for type_name, reason, ids in res["errors_final"]:
        if type_name != "SendError" or not isinstance(reason, str) or not reason:
            problems.append(f"{who}: on_error got {type_name} with reason {reason!r}")
        if not ids:
            problems.append(f"{who}: on_error called with no events ({reason})")
        reasons[str(reason)] += len(ids)
        reported.update(ids)
        if reason in NEVER_SENT:
            never_sent.update(ids)
    twice = [mid for mid, n in reported.items() if n > 1]
    if twice:
        problems.append(f"{who}: {len(twice)} id(s) reported to on_error more than once, e.g. {twice[:3]}")
    foreign = set(reported) - produced
    if foreign:
        problems.append(
            f"{who}: on_error got {len(foreign)} id(s) this process never produced, e.g. {sorted(foreign)[:3]}"
        )

    in_time = {mid for _, _, ids in res["errors"] for mid in ids}
    logged = {mid for line in res["warnings"] for mid in UUID_RE.findall(line)}
    wrong_log = logged - rejected
    if wrong_log:
        problems.append(f"{who}: the log names {len(wrong_log)} id(s) as rejected that the server never rejected")
    lost = produced - accepted - in_time - (rejected & logged)
    if lost:
        examples = {mid: history.get(mid, ["never received"]) for mid in sorted(lost)[:5]}
        problems.append(f"{who}: {len(lost)} of {len(produced)} id(s) not accounted for; e.g. {examples}")
    sent_anyway = never_sent & received
    if sent_anyway:
        problems.append(f"{who}: {len(sent_anyway)} id(s) reported as never sendable reached the server")
    return problems, reasons


def test_every_event_accounted_for_under_faults_threads_and_fork(tmp_path: Path) -> None:
    seed = SEED
    print(f"klime reliability seed: {seed} (set KLIME_RELIABILITY_SEED to replay or vary)")
    plan = FaultPlan(seed)
    cfg_path = tmp_path / "config.json"
    out = tmp_path / "parent.json"
    child_out = tmp_path / "child.json"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from tests.test_reliability import run_scenario; run_scenario(sys.argv[2])"
    )
    with FaultServer(plan) as server:
        cfg_path.write_text(json.dumps({"seed": seed, "url": server.url, "out": str(out), "child_out": str(child_out)}))
        started = time.monotonic()
        # Past RUN_LIMIT the scenario and its fork are killed together and the test fails with their output.
        proc = run_process(
            [sys.executable, "-c", code, str(ROOT), str(cfg_path)],
            cwd=str(ROOT),
            # A proxy from the environment would take the client off loopback.
            env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
            timeout=RUN_LIMIT,
            on_start=lambda p: server.watch(p.pid),
        )
        stderr = proc.stderr
        ended = time.time()
        runtime = time.monotonic() - started
        owners = dict(server.owners)

    assert proc.returncode == 0, f"seed {seed}: scenario exited with {proc.returncode}\n{stderr[-3000:]}"
    parent = json.loads(out.read_text())
    assert child_out.exists(), f"seed {seed}: the forked child wrote no result\n{stderr[-3000:]}"
    child = json.loads(child_out.read_text())
    assert "crash" not in child, f"seed {seed}: the forked child failed:\n{child['crash']}"

    history: Dict[str, List[str]] = defaultdict(list)
    for s in sorted(plan.served, key=lambda s: s.number):
        for mid in s.ids:
            history[mid].append(f"#{s.number}:{s.kind}")

    problems: List[str] = []
    parent_problems, parent_reasons = _account("parent", parent, plan, history)
    child_problems, child_reasons = _account("child", child, plan, history)
    problems += parent_problems + child_problems

    parent_ids, child_ids = set(parent["produced"]), set(child["produced"])
    received = {mid for s in plan.served for mid in s.ids}
    accepted = {mid for s in plan.served for mid in s.accepted}
    if plan.bad_bodies:
        problems.append(f"{plan.bad_bodies} request(s) had an unreadable body")
    if parent_ids & child_ids:
        problems.append("parent and child produced the same id (test bug)")
    strangers = received - parent_ids - child_ids
    if strangers:
        problems.append(f"the server received {len(strangers)} id(s) nobody produced, e.g. {sorted(strangers)[:3]}")
    if child["queue_at_fork"] != 0:
        problems.append(f"the child started with {child['queue_at_fork']} event(s) of the parent's queued")
    if parent["child_exit"] != 0:
        problems.append(f"the forked child exited with {parent['child_exit']}")
    exit_lag = ended - parent["finished_at"]
    if exit_lag > EXIT_BOUND:
        problems.append(f"the process took {exit_lag:.2f}s to exit after its last line")

    by_owner: Dict[str, Set[str]] = defaultdict(set)
    for s in plan.served:
        by_owner[owners.get(s.connection, "unknown")].update(s.ids)
    if by_owner["child"] - child_ids:
        problems.append(f"the child sent {len(by_owner['child'] - child_ids)} id(s) it did not produce")
    if by_owner["parent"] - parent_ids:
        problems.append(f"the parent sent {len(by_owner['parent'] - parent_ids)} id(s) it did not produce")
    if os.path.exists("/proc/net/tcp") and not (by_owner["child"] and by_owner["parent"]):
        problems.append(f"could not tell parent and child connections apart: {dict(Counter(owners.values()))}")

    # The scenario must have met what it claims to test.
    kinds = Counter(s.kind for s in plan.served)
    if set(kinds) != set(KINDS):
        problems.append(f"fault kinds never served: {sorted(set(KINDS) - set(kinds))}")
    if not (parent_reasons["queue_overflow"] + child_reasons["queue_overflow"]):
        problems.append("no queue overflow happened")
    if not (accepted & parent_ids and accepted & child_ids):
        problems.append("nothing from the parent or the child was delivered")

    summary = (
        f"seed {seed}, {runtime:.1f}s, options {parent['options']}; "
        f"{len(parent_ids)} + {len(child_ids)} ids produced (parent + child), "
        f"{len(plan.served)} requests {dict(sorted(kinds.items()))}, "
        f"connections {dict(Counter(owners.values()))}; "
        f"on_error parent {dict(parent_reasons)}, child {dict(child_reasons)}; "
        f"max track() {max(parent['max_track'], child['max_track']) * 1000:.1f} ms; "
        f"shutdown parent {parent['shutdown_elapsed']:.2f}s ok={parent['shutdown_ok']}, "
        f"child {child['shutdown_elapsed']:.2f}s ok={child['shutdown_ok']}"
    )
    print(summary)
    assert not problems, "\n".join([summary, *problems])
    assert runtime < RUN_LIMIT
