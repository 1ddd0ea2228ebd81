"""Benchmark klime against a loopback collector, optionally side by side with another SDK.

    .venv/bin/python benchmarks/bench.py                      # our klime only
    .venv/bin/python benchmarks/bench.py --quick              # smoke run, a few seconds
    .venv/bin/python benchmarks/bench.py --compare /tmp/ref-venv/bin/python --runs 5

The collector (``collector.py``) runs in a process of its own. Every
workload runs in a fresh process of the interpreter under test
(``driver.py``), which reports JSON lines back here. With ``--compare``,
our runs and the other interpreter's alternate, and the table shows the
median of each figure with the ratio other/ours next to the SPEC 4 target.
segment-analytics-python and posthog are measured too when the other
interpreter can import them. See ``benchmarks/README.md``.

Standard library only.
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
DRIVER = os.path.join(HERE, "driver.py")
COLLECTOR = os.path.join(HERE, "collector.py")

# --- what is measured -------------------------------------------------------------

TIME, CPU, COUNT, BYTES = "time", "cpu", "count", "bytes"


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str  # TIME, CPU (seconds per event), COUNT or BYTES


@dataclass(frozen=True)
class Target:
    """A SPEC 4 target: a ratio other/ours, or an absolute bound on ours."""

    kind: str  # "ratio" (other/ours >= value), "below" (ours < value), "atmost" (ours <= value), "zero"
    value: float = 0.0

    def describe(self) -> str:
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
    mode: str  # "throughput" or "failure"
    endpoint: str  # which collector port: "ok", "refuse" or "hang"
    calls: int
    quick_calls: int
    figures: Tuple[Figure, ...]
    batch_size: Optional[int] = None
    queue_size: Optional[int] = None  # None: the SDK's default; -1: as many as the calls
    explicit_shutdown: bool = True
    targets: Dict[str, Target] = field(default_factory=dict)


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
        targets={"cpu_per_event": Target("ratio", 4), "e2e": Target("ratio", 3.5), "lost": Target("zero")},
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
    label: str  # column name: "ours", "ref", "segment", "posthog"
    python: str
    module: str  # driver adapter: "klime", "segment" or "posthog"
    version: str = "?"


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
    return prefix + f"{v:.0f}"


def fmt_ratio(other: Optional[float], ours: Optional[float], other_lower: bool, ours_lower: bool) -> str:
    if other is None or ours is None or ours_lower:
        return "-"
    if ours <= 0:
        return "inf" if other > 0 else "-"
    r = other / ours
    text = f"{r:.1f}x" if r < 100 else f"{r:.0f}x"
    return (">= " if other_lower else "") + text


def verdict(t: Target, ours: Optional[float], ours_lower: bool, other: Optional[float], other_lower: bool) -> str:
    if ours is None:
        return "?"
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


def _driver_env() -> Dict[str, str]:
    env = dict(os.environ)
    # A proxy from the environment would put a third process between SDK and collector.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONPATH", None)
    return env


class Collector:
    """The collector subprocess and a small client for its control endpoints."""

    def __init__(self, python: str) -> None:
        self.proc = subprocess.Popen(
            [python, COLLECTOR], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_driver_env()
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

    def count(self, run: str) -> int:
        conn = HTTPConnection("127.0.0.1", self.ports["control"], timeout=30)
        try:
            conn.request("GET", f"/count?run={run}")
            return int(json.loads(conn.getresponse().read())["count"])
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
    calls = wl.quick_calls if settings.quick else wl.calls
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
    }
    lines = Lines()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sdk.python, DRIVER, json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=_driver_env(),
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
    delivered = collector.count(run)
    result = _interpret(wl, calls, lines, delivered, exited[0] if killed_at is None else None, killed_at)
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
    delivered: int,
    exited_at: Optional[float],
    killed_at: Optional[float],
) -> Result:
    r = Result()
    r.values["lost"] = float(calls - delivered)
    tracked = lines.last("tracked")
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


# --- the whole benchmark -----------------------------------------------------------


def _probe(python: str, code: str) -> Optional[str]:
    try:
        out = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=60, env=_driver_env(), cwd=HERE
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def find_sdks(args: argparse.Namespace) -> List[Sdk]:
    ours_version = _probe(args.ours, "import klime; print(klime.__version__)")
    if ours_version is None:
        raise SystemExit(f"bench: {args.ours} cannot import klime")
    sdks = [Sdk("ours", args.ours, "klime", ours_version)]
    if args.compare:
        ref_version = _probe(args.compare, "import klime; print(getattr(klime, '__version__', '?'))")
        if ref_version is None:
            raise SystemExit(f"bench: {args.compare} cannot import klime")
        sdks.append(Sdk("ref", args.compare, "klime", ref_version))
        if not args.no_others:
            if _probe(args.compare, "import segment.analytics") is not None:
                sdks.append(Sdk("segment", args.compare, "segment"))
            if _probe(args.compare, "import posthog") is not None:
                sdks.append(Sdk("posthog", args.compare, "posthog"))
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


def report(sdks: List[Sdk], results: Dict[Tuple[str, str], List[Result]], workloads: Sequence[Workload]) -> bool:
    """Print one table per workload; True when every target that could be judged passed."""
    all_pass = True
    has_ref = any(s.label == "ref" for s in sdks)
    others = [s for s in sdks if s.label not in ("ours", "ref")]
    for wl in workloads:
        runs = len(results.get((wl.name, "ours"), []))
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
                v = verdict(target, ours, ours_lb, ref, ref_lb)
                if target.kind == "ratio" and not has_ref:
                    v = ""
                all_pass = all_pass and v != "MISS"
                row += [target.describe(), v]
            for s in others:
                val, lb = median_of(results.get((wl.name, s.label), []), fig.key)
                row.append(fmt_value(val, fig.unit, lb))
            rows.append(row)
        print(f"\n== {wl.name}: {wl.title} ({runs} run{'s' if runs != 1 else ''}, median)")
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
    p.add_argument("--compare", metavar="PYTHON", help="interpreter whose klime is the SDK to compare against")
    p.add_argument("--ours", metavar="PYTHON", default=sys.executable, help="interpreter with our klime (this one)")
    p.add_argument("--runs", type=int, default=None, help="runs of the default and burst workloads (5; quick: 1)")
    p.add_argument("--failure-runs", type=int, default=1, help="runs of the refuse/hang workloads (1)")
    p.add_argument("--cap", type=float, default=None, help="seconds one driver process may take (90; quick: 20)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer calls, short shutdown timeout, one run")
    p.add_argument(
        "--workloads",
        default=",".join(w.name for w in WORKLOADS),
        help="comma-separated subset of: " + ", ".join(w.name for w in WORKLOADS),
    )
    p.add_argument("--no-others", action="store_true", help="do not run segment and posthog")
    p.add_argument("--json", metavar="PATH", help="also write every run's figures here")
    p.add_argument("--verbose", action="store_true", help="show each driver's stderr")
    args = p.parse_args(argv)
    # Drivers run in this directory: make a relative interpreter path absolute
    # (not resolved: a venv's python is a symlink that must stay one).
    for name in ("compare", "ours"):
        path = getattr(args, name)
        if path:
            setattr(args, name, os.path.abspath(path) if os.sep in path else shutil.which(path) or path)
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.cap is None:
        args.cap = 20.0 if args.quick else 90.0
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
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
    if args.quick:
        print("quick mode: fewer calls, shutdown_timeout=1500 ms where the SDK has it")

    results: Dict[Tuple[str, str], List[Result]] = {}
    collector = Collector(sys.executable)
    started = time.monotonic()
    try:
        comparison = [s for s in sdks if s.label != "ours"]
        for i in range(args.runs):
            # Alternate who goes first so that neither side always runs on a warmer machine.
            order = [sdks[0], *comparison] if i % 2 == 0 else [*comparison, sdks[0]]
            for wl in (w for w in workloads if w.mode == "throughput"):
                for sdk in order:
                    _run_one(sdk, wl, collector, settings, results, f"run {i + 1}/{args.runs}")
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
    print("sdks: " + ", ".join(f"{s.label}={s.module} {s.version} ({s.python})" for s in sdks))
    print(f"took {time.monotonic() - started:.0f} s")
    ok = report(sdks, results, workloads)
    if args.json:
        dump = {
            "machine": machine(),
            "quick": args.quick,
            "calls": {w.name: w.quick_calls if args.quick else w.calls for w in workloads},
            "sdks": [s.__dict__ for s in sdks],
            "results": {f"{w}/{label}": [r.__dict__ for r in rs] for (w, label), rs in results.items()},
        }
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)
    verdict_line = "all targets met" if ok else "some targets missed"
    if not args.compare:
        verdict_line += " (ratio targets need --compare)"
    print("\n" + verdict_line)
    return 0


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
