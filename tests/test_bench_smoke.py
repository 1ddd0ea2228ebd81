"""The benchmark runs, prints every figure, and accounts for every event (``bench.py --quick``, ours only).

No timing assertions: the figures themselves depend on the machine. What
must hold on any machine is that every workload produces every figure, and
that no event goes missing without a report (delivered to the collector or
handed to on_error).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict

from .conftest import run_process

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench.py"

FIGURES = {
    "default": ["median", "mean", "p99", "p999", "max", "cpu_per_event", "e2e", "lost", "peak_rss"],
    "burst": ["median", "mean", "p99", "p999", "max", "cpu_per_event", "e2e", "lost", "peak_rss"],
    "live": ["rate", "max", "made", "delivered", "lost", "reported", "e2e", "shutdown", "cpu_per_event"],
    "live-100": ["rate", "max", "made", "delivered", "lost", "reported", "e2e", "shutdown", "cpu_per_event"],
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
    "app's call rate",
    "events delivered",
    "not delivered",
    "worst track()",
    "shutdown() took",
    "exit without shutdown()",
]


def test_quick_benchmark_prints_all_figures_and_accounts_for_every_event(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(BENCH), "--quick", "--json", str(out), "--src", str(REPO / "src")]
    proc = run_process(argv, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in FIGURES:
        assert f"== {name}:" in proc.stdout
    for label in LABELS:
        assert label in proc.stdout

    dump: Dict[str, Any] = json.loads(out.read_text())
    assert [s["label"] for s in dump["sdks"]] == ["ours"]
    for name, keys in FIGURES.items():
        (run,) = dump["results"][f"{name}/ours"]
        values = run["values"]
        missing = [k for k in keys if values.get(k) is None]
        assert not missing, f"{name}: no figure for {missing}"
        assert not any(run["lower"].values()), f"{name}: cut off at the time cap"
        assert set(dump["summary"][name]["ours"]) == {f["key"] for f in dump["workloads"][name]["figures"]}
        if name in ("default", "burst"):
            assert values["lost"] == 0, name
        elif name.startswith("live"):
            # Paced calls against the distant collector: whatever did not
            # arrive was reported (an event cut off in flight at the
            # shutdown deadline may be both: it arrived, unconfirmed).
            assert 0 < values["made"] <= dump["calls"][name], name
            assert values["delivered"] + values["reported"] >= values["made"], name
        else:
            # Nothing reaches a dead endpoint, and nothing is lost silently.
            assert values["reported"] == dump["calls"][name], name
