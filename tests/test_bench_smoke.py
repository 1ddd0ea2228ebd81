"""The benchmark runs, prints every figure, and loses nothing (``bench.py --quick``, ours only)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict

from .conftest import run_process

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"

FIGURES = {
    "default": ["median", "mean", "p99", "p999", "max", "cpu_per_event", "e2e", "lost", "peak_rss"],
    "burst": ["median", "mean", "p99", "p999", "max", "cpu_per_event", "e2e", "lost", "peak_rss"],
    "refuse": ["worst", "median", "shutdown", "exit", "lost", "reported"],
    "hang": ["worst", "median", "shutdown", "exit", "lost", "reported"],
    "hang-exit": ["worst", "exit", "exit_hooks", "lost", "reported"],
}
LABELS = [
    "track() median",
    "track() p99.9",
    "CPU per delivered event",
    "delivered end to end",
    "events lost",
    "peak RSS",
    "worst track()",
    "shutdown() took",
    "exit without shutdown()",
]


def test_quick_benchmark_prints_all_figures_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    started = time.monotonic()
    proc = run_process([sys.executable, str(BENCH), "--quick", "--json", str(out)], timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    for name in FIGURES:
        assert f"== {name}:" in proc.stdout
    for label in LABELS:
        assert label in proc.stdout
    assert took < 30, f"--quick took {took:.1f} s"

    dump: Dict[str, Any] = json.loads(out.read_text())
    for name, keys in FIGURES.items():
        (run,) = dump["results"][f"{name}/ours"]
        values = run["values"]
        missing = [k for k in keys if values.get(k) is None]
        assert not missing, f"{name}: no figure for {missing}"
        assert not any(run["lower"].values()), f"{name}: cut off at the time cap"
        if name in ("default", "burst"):
            assert values["lost"] == 0, name
        else:
            # Nothing reaches a dead endpoint, and nothing is lost silently.
            assert values["reported"] == dump["calls"][name], name
