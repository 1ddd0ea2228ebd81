"""Benchmark klime against a loopback collector, side by side with the reference and peer SDKs.

    .venv/bin/python benchmarks/bench.py --compare --save   # everything: figures, tables, charts
    .venv/bin/python benchmarks/bench.py                     # our klime (src/) only
    .venv/bin/python benchmarks/bench.py --quick             # smoke run, about 10 seconds

The collector (``collector.py``) runs in a process of its own; its ``far``
port answers one round trip late, as a distant API would. Every workload
runs in a fresh process of the interpreter under test (``driver.py``),
which reports JSON lines back here. With ``--compare``, the reference
``klime==1.1.0``, Segment, PostHog and Amplitude are measured too, each
from a venv of its own under the cache directory; our runs and theirs
alternate, and the table shows the median of each figure with the ratio
reference/ours next to the target. See ``benchmarks/README.md``.

Standard library only (the charts run in a venv with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPConnection
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DRIVER = os.path.join(HERE, "driver.py")
COLLECTOR = os.path.join(HERE, "collector.py")
CHARTS = os.path.join(HERE, "charts.py")
DEFAULT_SRC = os.path.join(REPO, "src")
LATEST = os.path.join(HERE, "results", "latest.json")
CHARTS_DIR = os.path.join(REPO, "docs", "images")

# --- what is measured -------------------------------------------------------------

TIME, CPU, COUNT, BYTES, RATE = "time", "cpu", "count", "bytes", "rate"


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str  # TIME, CPU (seconds per event), COUNT, BYTES or RATE (per second)


@dataclass(frozen=True)
class Target:
    """A performance target: a ratio reference/ours, or an absolute bound on ours."""

    # "ratio" (other/ours >= value), "below" (ours < value), "atmost" (ours <= value), "zero",
    # "pace" (ours >= value * the workload's offered rate: the app was not slowed)
    kind: str
    value: float = 0.0

    def describe(self) -> str:
        if self.kind == "pace":
            return f">= {self.value:.0%} of offered"
        if self.kind == "ratio":
            return f">= {self.value:g}x"
        if self.kind == "below":
            return f"< {fmt_value(self.value, TIME)}"
        if self.kind == "atmost":
            return f"<= {fmt_value(self.value, TIME)}"
        return "0"


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    mode: str  # "throughput", "live" or "failure"
    endpoint: str  # which collector port: "ok", "far", "refuse" or "hang"
    calls: int
    quick_calls: int
    figures: Tuple[Figure, ...]
    batch_size: Optional[int] = None
    queue_size: Optional[int] = None  # None: the SDK's default; -1: as many as the calls
    explicit_shutdown: bool = True
    targets: Dict[str, Target] = field(default_factory=dict)
    # live workloads: calls per second, for how long (seconds); calls = rate * duration
    rate: float = 0.0
    duration: float = 0.0
    quick_rate: float = 0.0
    quick_duration: float = 0.0

    def pace(self, quick: bool) -> Tuple[float, float]:
        return (self.quick_rate, self.quick_duration) if quick else (self.rate, self.duration)

    def ncalls(self, quick: bool) -> int:
        if self.mode == "live":
            rate, duration = self.pace(quick)
            return int(rate * duration)
        return self.quick_calls if quick else self.calls


LATENCY = (
    Figure("median", "track() median", TIME),
    Figure("mean", "track() mean", TIME),
    Figure("p99", "track() p99", TIME),
    Figure("p999", "track() p99.9", TIME),
    Figure("max", "track() max", TIME),
)
THROUGHPUT = (
    *LATENCY,
    Figure("cpu_per_event", "CPU per delivered event", CPU),
    Figure("e2e", "delivered end to end", TIME),
    Figure("lost", "events lost", COUNT),
    Figure("peak_rss", "peak RSS", BYTES),
)
FAILURE = (
    Figure("worst", "worst track()", TIME),
    Figure("median", "track() median", TIME),
    Figure("shutdown", "shutdown() took", TIME),
    Figure("exit", "then process exit took", TIME),
    Figure("lost", "events lost", COUNT),
    Figure("reported", "reported to on_error", COUNT),
)
LIVE = (
    Figure("rate", "app's call rate", RATE),
    Figure("max", "worst track()", TIME),
    Figure("made", "calls made", COUNT),
    Figure("delivered", "events delivered", COUNT),
    Figure("lost", "not delivered", COUNT),
    Figure("reported", "reported to on_error", COUNT),
    Figure("e2e", "delivered end to end", TIME),
    Figure("shutdown", "shutdown() took", TIME),
    Figure("cpu_per_event", "CPU per delivered event", CPU),
)
EXIT_ONLY = (
    Figure("worst", "worst track()", TIME),
    Figure("exit", "exit without shutdown()", TIME),
    Figure("exit_hooks", "of which exit hooks", TIME),
    Figure("lost", "events lost", COUNT),
    Figure("reported", "reported to on_error", COUNT),
)

WORKLOADS = (
    Workload(
        "default",
        "default config, back-to-back track() calls",
        "throughput",
        "ok",
        calls=1000,
        quick_calls=1000,
        figures=THROUGHPUT,
        targets={
            "median": Target("ratio", 7),
            "mean": Target("ratio", 10),
            "p999": Target("ratio", 20),
            "lost": Target("zero"),
        },
    ),
    Workload(
        "burst",
        "burst, max_batch_size=100, queue holds the burst",
        "throughput",
        "ok",
        calls=20000,
        quick_calls=5000,
        figures=THROUGHPUT,
        batch_size=100,
        queue_size=-1,
        targets={"cpu_per_event": Target("ratio", 5), "e2e": Target("ratio", 4.5), "lost": Target("zero")},
    ),
    Workload(
        "live",
        "collector one round trip away, documented defaults, paced live traffic",
        "live",
        "far",
        calls=0,
        quick_calls=0,
        figures=LIVE,
        rate=2000,
        duration=10,
        quick_rate=2000,
        quick_duration=1,
        targets={"rate": Target("pace", 0.98), "lost": Target("zero")},
    ),
    Workload(
        "live-100",
        "collector one round trip away, max_batch_size=100, max_queue_size=10000, paced live traffic",
        "live",
        "far",
        calls=0,
        quick_calls=0,
        figures=LIVE,
        batch_size=100,
        queue_size=10000,
        rate=10000,
        duration=5,
        quick_rate=10000,
        quick_duration=0.5,
        targets={"rate": Target("pace", 0.98), "lost": Target("zero")},
    ),
    Workload(
        "refuse",
        "endpoint refusing connections, then shutdown()",
        "failure",
        "refuse",
        calls=200,
        quick_calls=50,
        figures=FAILURE,
        targets={"worst": Target("below", 0.050), "shutdown": Target("atmost", 10.0)},
    ),
    Workload(
        "hang",
        "endpoint accepting and never answering, then shutdown()",
        "failure",
        "hang",
        calls=200,
        quick_calls=50,
        figures=FAILURE,
        targets={"worst": Target("below", 0.050), "shutdown": Target("atmost", 10.0)},
    ),
    Workload(
        "hang-exit",
        "endpoint never answering, process exits without shutdown()",
        "failure",
        "hang",
        calls=200,
        quick_calls=50,
        figures=EXIT_ONLY,
        explicit_shutdown=False,
        # The SDK's part of the exit (its thread joins and exit hooks) is what
        # shutdown_timeout bounds; the interpreter's own teardown comes on top.
        targets={"worst": Target("below", 0.050), "exit_hooks": Target("atmost", 10.0)},
    ),
)


@dataclass
class Sdk:
    label: str  # column name: "ours", "ref", "segment", "posthog", "amplitude"
    python: str
    module: str  # driver adapter: "klime", "segment", "posthog" or "amplitude"
    version: str = "?"
    pythonpath: Optional[str] = None  # ours: the source directory measured


@dataclass
class Result:
    """One driver process: each figure's value, and which ones are only lower bounds."""

    values: Dict[str, Optional[float]] = field(default_factory=dict)
    lower: Dict[str, bool] = field(default_factory=dict)
    note: str = ""


# --- formatting ---------------------------------------------------------------------


def fmt_value(v: Optional[float], unit: str, lower: bool = False) -> str:
    if v is None:
        return "-"
    prefix = ">= " if lower else ""
    if unit in (TIME, CPU):
        if v < 1e-3:
            text = f"{v * 1e6:.1f} us" if v < 1e-4 else f"{v * 1e6:.0f} us"
        elif v < 1.0:
            text = f"{v * 1e3:.1f} ms" if v < 0.1 else f"{v * 1e3:.0f} ms"
        else:
            # Three decimals: a shutdown deadline overrun of a few ms must show.
            text = f"{v:.3f} s" if v < 100 else f"{v:.0f} s"
        return prefix + text
    if unit == BYTES:
        return prefix + f"{v / 2**20:.1f} MiB"
    if unit == RATE:
        return prefix + f"{v:.0f}/s"
    return prefix + f"{v:.0f}"


def fmt_ratio(other: Optional[float], ours: Optional[float], other_lower: bool, ours_lower: bool) -> str:
    if other is None or ours is None or ours_lower:
        return "-"
    if ours <= 0:
        return "inf" if other > 0 else "-"
    r = other / ours
    text = f"{r:.1f}x" if r < 100 else f"{r:.0f}x"
    return (">= " if other_lower else "") + text


def verdict(
    t: Target, ours: Optional[float], ours_lower: bool, other: Optional[float], other_lower: bool, offered: float = 0.0
) -> str:
    if ours is None:
        return "?"
    if t.kind == "pace":
        return "PASS" if ours >= t.value * offered else "MISS"
    if t.kind == "zero":
        return "PASS" if ours == 0 else "MISS"
    if t.kind == "below":
        return "PASS" if ours < t.value and not ours_lower else "MISS"
    if t.kind == "atmost":
        return "PASS" if ours <= t.value and not ours_lower else "MISS"
    if other is None or ours_lower:
        return "?"
    ok = other >= t.value * ours
    if not ok and other_lower:
        return "?"  # the other side was cut off at the cap; it could be slower still
    return "PASS" if ok else "MISS"


# --- processes ----------------------------------------------------------------------


def _driver_env(pythonpath: Optional[str] = None) -> Dict[str, str]:
    env = dict(os.environ)
    # A proxy from the environment would put a third process between SDK and collector.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


class Collector:
    """The collector subprocess and a small client for its control endpoints."""

    def __init__(self, python: str, rtt_ms: float) -> None:
        self.proc = subprocess.Popen(
            [python, COLLECTOR, "--rtt", str(rtt_ms)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=_driver_env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("bench: the collector did not start")
        self.ports: Dict[str, int] = json.loads(line)

    def url(self, kind: str, run: str) -> str:
        return f"http://127.0.0.1:{self.ports[kind]}/r/{run}"

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.ports['control']}"

    def count(self, run: str) -> Dict[str, Any]:
        """What the collector has of a run: ``count`` distinct events, ``first_mono``/``last_mono``."""
        conn = HTTPConnection("127.0.0.1", self.ports["control"], timeout=30)
        try:
            conn.request("GET", f"/count?run={run}")
            got: Dict[str, Any] = json.loads(conn.getresponse().read())
            return got
        finally:
            conn.close()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Lines:
    """What a driver printed, each line with the time it arrived."""

    items: List[Tuple[float, Dict[str, Any]]] = field(default_factory=list)

    def of(self, kind: str) -> List[Dict[str, Any]]:
        return [obj for _, obj in self.items if obj.get("kind") == kind]

    def last(self, kind: str) -> Optional[Dict[str, Any]]:
        found = self.of(kind)
        return found[-1] if found else None


def _read_lines(stream: IO[bytes], out: Lines) -> None:
    for raw in stream:
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.items.append((time.monotonic(), obj))


@dataclass
class Settings:
    quick: bool
    cap: float
    shutdown_timeout_ms: Optional[int]
    verbose: bool


_run_counter = [0]
_run_lock = threading.Lock()


def run_driver(sdk: Sdk, wl: Workload, collector: Collector, settings: Settings) -> Result:
    with _run_lock:
        _run_counter[0] += 1
        run = f"{os.getpid()}-{_run_counter[0]}-{wl.name}-{sdk.label}"
    calls = wl.ncalls(settings.quick)
    rate, duration = wl.pace(settings.quick)
    cfg = {
        "sdk": sdk.module,
        "mode": wl.mode,
        "run": run,
        "endpoint": collector.url(wl.endpoint, run),
        "control": collector.control,
        "calls": calls,
        "batch_size": wl.batch_size,
        "queue_size": calls if wl.queue_size == -1 else wl.queue_size,
        "explicit_shutdown": wl.explicit_shutdown,
        "shutdown_timeout_ms": settings.shutdown_timeout_ms,
        "wait_timeout": max(settings.cap - 5, 1),
        "rate": rate,
        "duration": duration,
    }
    lines = Lines()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sdk.python, DRIVER, json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=_driver_env(sdk.pythonpath),
            cwd=HERE,
        )
        assert proc.stdout is not None
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
        reader.start()
        exited: List[float] = []

        def wait_exit() -> None:
            proc.wait()  # a blocking waitpid: the exit time is exact, not polled
            exited.append(time.monotonic())

        waiter = threading.Thread(target=wait_exit, daemon=True)
        waiter.start()
        waiter.join(settings.cap)
        killed_at: Optional[float] = None
        if waiter.is_alive():
            killed_at = time.monotonic()
            proc.kill()
            waiter.join()
        reader.join(5)
        proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    got = collector.count(run)
    result = _interpret(wl, calls, lines, got, exited[0] if killed_at is None else None, killed_at)
    info = lines.last("info")
    if info is not None:
        sdk.version = info.get("version", sdk.version)
    if proc.returncode not in (0, None) and killed_at is None:
        result.note = f"exit code {proc.returncode}"
    if (lines.last("done") is None and killed_at is None) or settings.verbose:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        if tail:
            print(f"--- {sdk.label} {wl.name} stderr (tail) ---\n{tail}", file=sys.stderr)
    return result


def _interpret(
    wl: Workload,
    calls: int,
    lines: Lines,
    got: Dict[str, Any],
    exited_at: Optional[float],
    killed_at: Optional[float],
) -> Result:
    r = Result()
    delivered = int(got["count"])
    r.values["lost"] = float(calls - delivered)
    tracked = lines.last("tracked")
    if wl.mode == "live":
        return _interpret_live(r, lines, got)
    if tracked is not None:
        lat = tracked["latency"]
        for key in ("median", "mean", "p99", "p999", "max"):
            r.values[key] = lat[key] / 1e9
        r.values["worst"] = lat["max"] / 1e9
    elif killed_at is not None:
        # Killed inside the loop: the worst is at least the slowest call that
        # returned, or the one still in progress, whichever is longer.
        slow = {obj["index"]: obj["seconds"] for obj in lines.of("slow")}
        seen = list(slow.values())
        stuck = lines.last("call")
        if stuck is not None and stuck["index"] not in slow:
            seen.append(killed_at - stuck["start_mono"])
        if seen:
            r.values["worst"] = max(seen)
            r.lower["worst"] = True
    if wl.mode == "throughput":
        got = lines.last("delivered")
        if got is not None:
            r.values["cpu_per_event"] = got["cpu"] / delivered if delivered else None
            r.values["e2e"] = got["e2e"]
            r.values["peak_rss"] = float(got["maxrss"])
        return r
    shut = lines.last("shutdown")
    if shut is not None:
        r.values["shutdown"] = shut["seconds"]
    else:
        started = lines.last("shutdown_start")
        if started is not None and killed_at is not None:
            r.values["shutdown"] = killed_at - started["mono"]
            r.lower["shutdown"] = True
    done = lines.last("done")
    if done is not None:
        if exited_at is not None:
            r.values["exit"] = exited_at - done["mono"]
        elif killed_at is not None:
            r.values["exit"] = killed_at - done["mono"]
            r.lower["exit"] = True
    hook = lines.last("atexit")
    if hook is not None:
        r.values["reported"] = float(hook["reported"])
        if done is not None:
            r.values["exit_hooks"] = hook["mono"] - done["mono"]
    return r


def _interpret_live(r: Result, lines: Lines, got: Dict[str, Any]) -> Result:
    delivered = int(got["count"])
    r.values["delivered"] = float(delivered)
    tracked = lines.last("tracked")
    if tracked is None:
        r.values.pop("lost", None)
        return r
    made = int(tracked["made"])
    r.values["made"] = float(made)
    r.values["lost"] = float(made - delivered)
    r.values["rate"] = made / tracked["seconds"]
    if tracked.get("latency"):
        r.values["max"] = tracked["latency"]["max"] / 1e9
    if got.get("last_mono") is not None:
        r.values["e2e"] = got["last_mono"] - tracked["mono0"]
    end = lines.last("live")
    if end is not None:
        r.values["shutdown"] = end["seconds"] if "seconds" in end else end["shutdown"]
        r.values["cpu_per_event"] = end["cpu"] / delivered if delivered else None
        reported = end["reported"]
        hook = lines.last("atexit")
        if hook is not None:  # reports that came after shutdown() returned
            reported = max(reported, hook["reported"])
        r.values["reported"] = float(reported)
    return r


# --- the whole benchmark -----------------------------------------------------------


# Every SDK but ours gets a venv of its own under the cache directory (the
# reference shares our import name; the others' dependencies must not meet).
# Pinned, so that a figure can be traced to a release.
PEERS: Dict[str, Tuple[str, str]] = {
    # label: (pip requirement, driver adapter)
    "ref": ("klime==1.1.0", "klime"),
    "segment": ("segment-analytics-python==2.4.0", "segment"),
    "posthog": ("posthog==7.91.1", "posthog"),
    "amplitude": ("amplitude-analytics==1.3.0", "amplitude"),
}
CHARTS_REQUIREMENT = "matplotlib>=3.8,<4"
MARKER = "klime-bench-requirement.txt"


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "klime-bench")


def ensure_venv(cache: str, name: str, requirement: str) -> str:
    """The interpreter of ``cache``/venvs/``name``, created and ``pip install``-ed once."""
    path = os.path.join(cache, "venvs", name)
    python = os.path.join(path, "bin", "python")
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as f:
            if f.read().strip() == requirement and os.path.exists(python):
                return python
    except OSError:
        pass
    print(f"bench: setting up {path} ({requirement})", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", path], check=True)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement],
        check=True,
        env=_driver_env(),
    )
    with open(marker, "w") as f:
        f.write(requirement + "\n")
    return python


def _probe(python: str, code: str, pythonpath: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=_driver_env(pythonpath),
            cwd=HERE,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def describe_src(src: str) -> str:
    """``src`` and, when it is in a git checkout, its commit (``-dirty`` with uncommitted changes)."""
    try:
        out = subprocess.run(
            ["git", "-C", src, "describe", "--always", "--dirty", "--abbrev=10"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return src
    commit = out.stdout.strip()
    return f"{src} (git {commit})" if out.returncode == 0 and commit else src


def find_sdks(args: argparse.Namespace) -> List[Sdk]:
    src = args.src
    found = _probe(args.ours, "import klime; print(klime.__version__); print(klime.__file__)", src)
    if found is None:
        raise SystemExit(f"bench: {args.ours} cannot import klime with PYTHONPATH={src}")
    version, _, where = found.partition("\n")
    if not os.path.realpath(where).startswith(os.path.realpath(src) + os.sep):
        raise SystemExit(f"bench: klime comes from {where}, not from {src}")
    sdks = [Sdk("ours", args.ours, "klime", version, pythonpath=src)]
    if args.compare:
        for label in args.peers:
            requirement, module = PEERS[label]
            if label == "ref" and args.ref_python:
                python = args.ref_python
            else:
                python = ensure_venv(args.cache_dir, label, requirement)
            sdks.append(Sdk(label, python, module, requirement.partition("==")[2] or "?"))
    return sdks


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs, load average {load}"


def median_of(results: Sequence[Result], key: str) -> Tuple[Optional[float], bool]:
    vals = [r.values.get(key) for r in results]
    present = [v for v in vals if v is not None]
    if not present:
        return None, False
    return statistics.median(present), any(r.lower.get(key, False) for r in results)


def report(
    sdks: List[Sdk],
    results: Dict[Tuple[str, str], List[Result]],
    workloads: Sequence[Workload],
    quick: bool,
) -> bool:
    """Print one table per workload; True when every target that could be judged passed."""
    all_pass = True
    has_ref = any(s.label == "ref" for s in sdks)
    others = [s for s in sdks if s.label not in ("ours", "ref")]
    for wl in workloads:
        runs = len(results.get((wl.name, "ours"), []))
        rate, duration = wl.pace(quick)
        header = ["figure", "ours"]
        if has_ref:
            header += ["ref", "ref/ours"]
        header += ["target", "verdict"]
        header += [s.label for s in others]
        rows = [header]
        for fig in wl.figures:
            ours, ours_lb = median_of(results.get((wl.name, "ours"), []), fig.key)
            row = [fig.label, fmt_value(ours, fig.unit, ours_lb)]
            ref: Optional[float] = None
            ref_lb = False
            if has_ref:
                ref, ref_lb = median_of(results.get((wl.name, "ref"), []), fig.key)
                ratio = fmt_ratio(ref, ours, ref_lb, ours_lb) if fig.unit != COUNT else ""
                row += [fmt_value(ref, fig.unit, ref_lb), ratio]
            target = wl.targets.get(fig.key)
            if target is None:
                row += ["", ""]
            else:
                v = verdict(target, ours, ours_lb, ref, ref_lb, rate)
                if target.kind == "ratio" and not has_ref:
                    v = ""
                all_pass = all_pass and v != "MISS"
                row += [target.describe(), v]
            for s in others:
                val, lb = median_of(results.get((wl.name, s.label), []), fig.key)
                row.append(fmt_value(val, fig.unit, lb))
            rows.append(row)
        what = f"{wl.title}: {rate:.0f} calls/s for {duration:g} s" if wl.mode == "live" else wl.title
        print(f"\n== {wl.name}: {what} ({runs} run{'s' if runs != 1 else ''}, median)")
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for i, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            print("  " + "  ".join(cells).rstrip())
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))
    print(
        "\n'-': not measured (the process was killed at the time cap before that point);"
        " '>=': a lower bound, cut off at the cap."
    )
    return all_pass


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--compare",
        action="store_true",
        help="also measure the reference klime==1.1.0, Segment, PostHog and Amplitude (venvs under --cache-dir)",
    )
    p.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="with --compare, which of: " + ", ".join(PEERS) + " (all)",
    )
    p.add_argument("--ref-python", metavar="PYTHON", help="interpreter with klime==1.1.0, instead of a cached venv")
    p.add_argument("--cache-dir", default=default_cache(), help="where the venvs go (%(default)s)")
    p.add_argument("--src", default=DEFAULT_SRC, help="source directory of the klime measured as ours (%(default)s)")
    p.add_argument("--ours", metavar="PYTHON", default=sys.executable, help="interpreter for ours (this one)")
    p.add_argument("--runs", type=int, default=None, help="runs of the default and burst workloads (5; quick: 1)")
    p.add_argument("--live-runs", type=int, default=1, help="runs of the live workloads (1)")
    p.add_argument("--failure-runs", type=int, default=1, help="runs of the refuse/hang workloads (1)")
    p.add_argument("--rtt", type=float, default=50.0, help="round trip to the far collector, ms (50)")
    p.add_argument("--cap", type=float, default=None, help="seconds one driver process may take (90; quick: 20)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer calls, short shutdown timeout, one run")
    p.add_argument(
        "--workloads",
        default=",".join(w.name for w in WORKLOADS),
        help="comma-separated subset of: " + ", ".join(w.name for w in WORKLOADS),
    )
    p.add_argument("--json", metavar="PATH", help="also write every run's figures here")
    p.add_argument(
        "--save",
        action="store_true",
        help=f"write the figures to {os.path.relpath(LATEST, REPO)} and draw the charts",
    )
    p.add_argument(
        "--charts", action="store_true", help="draw the charts from the figures written (needs --json/--save)"
    )
    p.add_argument(
        "--charts-only",
        action="store_true",
        help="measure nothing: draw the charts from --json (default: the saved figures)",
    )
    p.add_argument("--charts-dir", default=CHARTS_DIR, help="where the PNGs go (%(default)s)")
    p.add_argument("--verbose", action="store_true", help="show each driver's stderr")
    args = p.parse_args(argv)
    # Drivers run in this directory: make relative paths absolute (an
    # interpreter's not resolved: a venv's python is a symlink that must stay one).
    for name in ("ref_python", "ours"):
        path = getattr(args, name)
        if path:
            setattr(args, name, os.path.abspath(path) if os.sep in path else shutil.which(path) or path)
    args.src = os.path.abspath(args.src)
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        p.error(f"unknown peer(s): {', '.join(sorted(unknown))}")
    if args.save:
        args.json = args.json or LATEST
        args.charts = True
    if args.charts_only:
        args.json = args.json or LATEST
    if args.charts and not args.json:
        p.error("--charts needs --json PATH or --save")
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.cap is None:
        args.cap = 20.0 if args.quick else 90.0
    return args


def draw_charts(args: argparse.Namespace) -> None:
    """Run charts.py in a venv with matplotlib (never a dependency of klime itself)."""
    python = ensure_venv(args.cache_dir, "charts", CHARTS_REQUIREMENT)
    subprocess.run([python, CHARTS, args.json, args.charts_dir], check=True, env=_driver_env())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.charts_only:
        draw_charts(args)
        return 0
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = set(names) - {w.name for w in WORKLOADS}
    if unknown:
        raise SystemExit(f"bench: unknown workload(s): {', '.join(sorted(unknown))}")
    workloads = [w for w in WORKLOADS if w.name in names]
    sdks = find_sdks(args)
    # Quick runs cut the failure workloads short where the SDK has the option
    # (ours does: shutdown_timeout); the default config is measured otherwise.
    settings = Settings(args.quick, args.cap, 1500 if args.quick else None, args.verbose)
    print(f"machine: {machine()}")
    print(f"python: {platform.python_implementation()} {platform.python_version()} ({sys.executable})")
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"ours: klime from {describe_src(args.src)}; far collector round trip {args.rtt:g} ms, +2 per new connection")
    if args.quick:
        print("quick mode: fewer calls, shorter live runs, shutdown_timeout=1500 ms where the SDK has it")

    results: Dict[Tuple[str, str], List[Result]] = {}
    collector = Collector(sys.executable, args.rtt)
    started = time.monotonic()
    try:
        comparison = [s for s in sdks if s.label != "ours"]
        for mode, runs in (("throughput", args.runs), ("live", args.live_runs)):
            for i in range(runs):
                # Alternate who goes first so that neither side always runs on a warmer machine.
                order = [sdks[0], *comparison] if i % 2 == 0 else [*comparison, sdks[0]]
                for wl in (w for w in workloads if w.mode == mode):
                    for sdk in order:
                        _run_one(sdk, wl, collector, settings, results, f"{mode} run {i + 1}/{runs}")
        for i in range(args.failure_runs):
            for wl in (w for w in workloads if w.mode == "failure"):
                # Ours alone, so that its worst latency is not disturbed; the
                # others mostly sleep on their timeouts, so they share the wait.
                _run_one(sdks[0], wl, collector, settings, results, f"failure run {i + 1}/{args.failure_runs}")
                with ThreadPoolExecutor(max_workers=max(1, len(comparison))) as pool:
                    for sdk in comparison:
                        pool.submit(
                            _run_one, sdk, wl, collector, settings, results, f"failure run {i + 1}/{args.failure_runs}"
                        )
    finally:
        collector.close()
    took = time.monotonic() - started
    print("sdks: " + ", ".join(f"{s.label}={s.module} {s.version} ({s.python})" for s in sdks))
    print(f"took {took:.0f} s")
    ok = report(sdks, results, workloads, args.quick)
    if args.json:
        write_json(args, sdks, results, workloads)
        print(f"\nfigures written to {args.json}")
    verdict_line = "all targets met" if ok else "some targets missed"
    if not args.compare:
        verdict_line += " (ratio targets need --compare)"
    print("\n" + verdict_line)
    if args.charts:
        draw_charts(args)
    return 0


def write_json(
    args: argparse.Namespace,
    sdks: List[Sdk],
    results: Dict[Tuple[str, str], List[Result]],
    workloads: Sequence[Workload],
) -> None:
    summary: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {}
    for wl in workloads:
        for sdk in sdks:
            rs = results.get((wl.name, sdk.label), [])
            summary.setdefault(wl.name, {})[sdk.label] = {f.key: median_of(rs, f.key)[0] for f in wl.figures}
    dump = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "command": " ".join(["python", os.path.relpath(__file__, REPO), *(sys.argv[1:])]),
        "quick": args.quick,
        "ours_src": describe_src(args.src),
        "rtt_ms": args.rtt,
        "calls": {w.name: w.ncalls(args.quick) for w in workloads},
        "workloads": {
            w.name: {
                "title": w.title,
                "mode": w.mode,
                "rate": w.pace(args.quick)[0],
                "duration": w.pace(args.quick)[1],
                "calls": w.ncalls(args.quick),
                "figures": [{"key": f.key, "label": f.label, "unit": f.unit} for f in w.figures],
            }
            for w in workloads
        },
        "sdks": [s.__dict__ for s in sdks],
        "summary": summary,
        "results": {f"{w}/{label}": [r.__dict__ for r in rs] for (w, label), rs in results.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dump, f, indent=1)
        f.write("\n")


def _run_one(
    sdk: Sdk,
    wl: Workload,
    collector: Collector,
    settings: Settings,
    results: Dict[Tuple[str, str], List[Result]],
    where: str,
) -> None:
    t = time.monotonic()
    r = run_driver(sdk, wl, collector, settings)
    results.setdefault((wl.name, sdk.label), []).append(r)
    note = f" ({r.note})" if r.note else ""
    print(f"  {where}: {wl.name:9} {sdk.label:8} {time.monotonic() - t:6.1f} s{note}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
