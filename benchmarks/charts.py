"""Draw the benchmark's charts from the figures ``bench.py`` wrote.

    python benchmarks/charts.py benchmarks/results/latest.json docs/images

Needs matplotlib, which klime itself never does: ``bench.py --save`` (or
``--charts-only``) runs this file in a venv of its own that has it. Writes
``bench-live.png`` (the distant-collector workloads) and
``bench-loopback.png`` (the loopback ones), each drawn only when the
figures hold those workloads.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OURS_COLOR = "#2b7bba"
OTHER_COLORS = ["#9a9a9a", "#c9884a", "#8e6bb0", "#5a9e6f", "#c25b5b"]
NAMES = {
    "ours": "this klime",
    "ref": "klime 1.1.0",
    "segment": "Segment",
    "posthog": "PostHog",
    "amplitude": "Amplitude",
}


def _label(sdk: Dict[str, Any]) -> str:
    name = NAMES.get(sdk["label"], sdk["label"])
    return f"{name}\n{sdk.get('version', '')}".rstrip()


def _colors(labels: Sequence[str]) -> List[str]:
    out, i = [], 0
    for label in labels:
        if label == "ours":
            out.append(OURS_COLOR)
        else:
            out.append(OTHER_COLORS[i % len(OTHER_COLORS)])
            i += 1
    return out


def _fmt_time(v: float) -> str:
    if v < 1e-3:
        return f"{v * 1e6:.1f} µs" if v < 1e-4 else f"{v * 1e6:.0f} µs"
    if v < 1:
        return f"{v * 1e3:.1f} ms" if v < 0.01 else f"{v * 1e3:.0f} ms"
    return f"{v:.2f} s"


def _bars(
    ax: Any,
    sdks: List[Dict[str, Any]],
    values: List[Optional[float]],
    title: str,
    fmt: Any,
    log: bool = False,
) -> None:
    labels = [_label(s) for s in sdks]
    shown = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(range(len(sdks)), shown, color=_colors([s["label"] for s in sdks]))
    ax.set_xticks(range(len(sdks)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    if log and any(v for v in shown):
        ax.set_yscale("log")
    # The value is written on each bar; an axis of powers of ten of seconds reads worse.
    ax.yaxis.set_visible(False)
    ax.spines["left"].set_visible(False)
    for bar, v in zip(bars, values):
        text = "-" if v is None else fmt(v)
        y = bar.get_height() if v else (ax.get_ylim()[0] if log else 0)
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)


def loopback(dump: Dict[str, Any], path: str) -> bool:
    summary = dump["summary"]
    if "default" not in summary and "burst" not in summary:
        return False
    sdks = dump["sdks"]
    panels = []
    if "default" in summary:
        d = summary["default"]
        panels.append(("track() median, default config", [d.get(s["label"], {}).get("median") for s in sdks]))
        panels.append(("track() p99.9, default config", [d.get(s["label"], {}).get("p999") for s in sdks]))
    if "burst" in summary:
        b = summary["burst"]
        calls = dump["calls"].get("burst", 0)
        panels.append(
            (f"CPU per delivered event, {calls} burst", [b.get(s["label"], {}).get("cpu_per_event") for s in sdks])
        )
        panels.append((f"{calls} burst delivered end to end", [b.get(s["label"], {}).get("e2e") for s in sdks]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        _bars(ax, sdks, values, title, _fmt_time, log=True)
    fig.suptitle(f"Loopback collector (lower is better; log scale) — {dump['date'][:10]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def live(dump: Dict[str, Any], path: str) -> bool:
    names = [w for w, info in dump["workloads"].items() if info["mode"] == "live" and w in dump["summary"]]
    if not names:
        return False
    sdks = dump["sdks"]
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 3.9), squeeze=False)
    for ax, name in zip(axes[0], names):
        info = dump["workloads"][name]
        offered = info["rate"] * info["duration"]
        figs = dump["summary"][name]
        made = [figs.get(s["label"], {}).get("made") for s in sdks]
        delivered = [figs.get(s["label"], {}).get("delivered") for s in sdks]
        x = range(len(sdks))
        width = 0.38
        pct_made = [100 * v / offered if v is not None else 0.0 for v in made]
        pct_delivered = [100 * v / offered if v is not None else 0.0 for v in delivered]
        ax.bar([i - width / 2 for i in x], pct_made, width, color="#c8c8c8", label="calls the app made")
        bars = ax.bar(
            [i + width / 2 for i in x],
            pct_delivered,
            width,
            color=_colors([s["label"] for s in sdks]),
            label="events delivered",
        )
        for bar, v in zip(bars, pct_delivered):
            ax.annotate(f"{v:.0f}%", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x))
        ax.set_xticklabels([_label(s) for s in sdks], fontsize=8)
        ax.set_ylim(0, 125)
        ax.set_ylabel("% of the calls offered", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        batch = " at batch 100" if "100" in name else " at the documented defaults"
        ax.set_title(
            f"{info['rate']:.0f} calls/s for {info['duration']:g} s{batch}",
            fontsize=10,
        )
        ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(
        f"Live traffic, collector {dump['rtt_ms']:g} ms away (+2 round trips per new connection)"
        f" — higher is better — {dump['date'][:10]}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: charts.py RESULTS_JSON OUTPUT_DIR", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        dump = json.load(f)
    os.makedirs(args[1], exist_ok=True)
    for name, draw in (("bench-live.png", live), ("bench-loopback.png", loopback)):
        path = os.path.join(args[1], name)
        if draw(dump, path):
            print(f"charts: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
