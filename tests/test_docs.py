"""Every page of docs/ holds up: its code runs, its links resolve, its figures are the benchmark's.

- Every ```python block of ``docs/*.md`` compiles; those not preceded by
  ``<!-- no-run -->`` run as scripts against a loopback collector, exactly
  as tests/test_readme.py runs the README's (same helpers, same rules).
  ``$ python -m klime ...`` lines of ```console blocks run too.
- Every relative link of README.md and docs/*.md points to a file, and
  every ``#anchor`` to a heading of the page it names.
- The performance tables of docs/performance.md and README.md, between
  ``<!-- bench:NAME -->`` and ``<!-- /bench -->``, are exactly what
  :func:`render` makes of ``benchmarks/results/latest.json`` (written by
  ``python benchmarks/bench.py --compare --save``). After a new benchmark
  run, rewrite them with ``python -m tests.test_docs --update``.
- README.md and every page link each other as docs/design.md expects.
"""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

from .servers import Collector
from .test_readme import Block, blocks_in, cli_lines, compile_block, run_block, run_cli_line

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
LATEST = ROOT / "benchmarks" / "results" / "latest.json"
PAGES = sorted(DOCS.glob("*.md"))
EXPECTED_PAGES = {
    "api.md",
    "configuration.md",
    "delivery.md",
    "design.md",
    "integrations.md",
    "migrating.md",
    "performance.md",
    "troubleshooting.md",
}

BLOCKS: List[Tuple[str, Block]] = [(p.name, b) for p in PAGES for b in blocks_in(p)]
PYTHON = [(name, b) for name, b in BLOCKS if b.lang == "python"]
RUNNABLE = [(name, b) for name, b in PYTHON if not b.no_run]
CLI = [(p.name, b, c) for p in PAGES for b, c in cli_lines(blocks_in(p))]


def _ids(items: Sequence[Tuple[Any, ...]]) -> List[str]:
    return [f"{item[0]}-{item[1].id}" for item in items]


# --- code ------------------------------------------------------------------------------------


def test_every_page_is_there() -> None:
    assert {p.name for p in PAGES} >= EXPECTED_PAGES


def test_docs_have_runnable_examples() -> None:
    assert len(RUNNABLE) >= 30, "the docs lost their examples?"
    no_run = len(PYTHON) - len(RUNNABLE)
    assert no_run <= 12, "keep examples runnable; <!-- no-run --> is for framework and application code"


@pytest.mark.parametrize("page,block", PYTHON, ids=_ids(PYTHON))
def test_python_block_compiles(page: str, block: Block) -> None:
    compile_block(block, f"docs/{page}")


@pytest.mark.parametrize("page,block", RUNNABLE, ids=_ids(RUNNABLE))
def test_python_block_runs(page: str, block: Block, collector: Collector, tmp_path: Path) -> None:
    run_block(block, collector, tmp_path, f"docs/{page}")


@pytest.mark.parametrize("page,block,command", CLI, ids=[f"{p}-{b.id}-{c.split()[3]}" for p, b, c in CLI])
def test_cli_line_runs(page: str, block: Block, command: str, collector: Collector, tmp_path: Path) -> None:
    run_cli_line(block, command, collector, tmp_path, f"docs/{page}")


# --- links -----------------------------------------------------------------------------------


def slug(title: str) -> str:
    """A heading's anchor as GitHub makes it."""
    title = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return title.replace(" ", "-")


def anchors(path: Path) -> set:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def links(path: Path) -> List[Tuple[str, str]]:
    """(target file or "", anchor or "") of every relative Markdown link on the page."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        found.append((file, anchor))
    return found


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_links_resolve(page: Path) -> None:
    for file, anchor in links(page):
        target = (page.parent / file).resolve() if file else page
        assert target.exists(), f"{page.name} links to {file}, which does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page.name} links to {file}#{anchor}, which is no heading there"


def test_readme_links_every_page() -> None:
    linked = {Path(file).name for file, _ in links(README) if file.startswith("docs/")}
    assert linked >= EXPECTED_PAGES
    files = {file for file, _ in links(README)}
    assert {"CHANGELOG.md", "CONTRIBUTING.md"} <= files


def test_readme_is_short() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


def test_no_spec_citations() -> None:
    for page in [README, *PAGES]:
        assert not re.search(r"\bSPEC\s+\d", page.read_text(encoding="utf-8")), page.name


def test_configuration_lists_every_option() -> None:
    import inspect

    from klime import KlimeClient
    from klime._options import ENVIRONMENT

    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for name in inspect.signature(KlimeClient).parameters:
        assert f"| `{name}`" in text, f"configuration.md does not list {name}"
    for var, _ in ENVIRONMENT.values():
        assert f"`{var}`" in text, f"configuration.md does not list {var}"


def test_every_reason_is_explained() -> None:
    from klime.types import REASONS

    delivery = (DOCS / "delivery.md").read_text(encoding="utf-8")
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    for reason in REASONS:
        assert f'`"{reason}"`' in delivery, f"delivery.md does not explain {reason}"
        assert f'`"{reason}"`' in api, f"api.md does not list {reason}"


def test_api_names_every_export() -> None:
    import klime
    import klime.testing
    import klime.types

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    for module in (klime, klime.types, klime.testing):
        for name in module.__all__:
            if name == "REASONS":
                continue
            documented = re.search(rf"`[^`\n]*\b{re.escape(name)}\b[^`\n]*`", text)
            assert documented, f"api.md does not document {module.__name__}.{name}"


# --- performance figures -----------------------------------------------------------------------


def _bench() -> Any:
    """benchmarks/bench.py as a module: its formatting is the one the command prints."""
    spec = importlib.util.spec_from_file_location("klime_bench", ROOT / "benchmarks" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("klime_bench", module)
    spec.loader.exec_module(module)
    return module


NAMES = {"ours": "this klime", "ref": "klime", "segment": "Segment", "posthog": "PostHog", "amplitude": "Amplitude"}
# The README's summary: (workload, figure, label)
SUMMARY = (
    ("default", "median", "`track()`, median of 1 000 calls"),
    ("default", "p999", "`track()`, 99.9th percentile"),
    ("burst", "cpu_per_event", "CPU per delivered event, 20 000-event burst"),
    ("burst", "e2e", "that burst delivered end to end"),
    ("live-100", "delivered", "events delivered of 50 000 offered, collector 50 ms away"),
    ("hang", "worst", "worst `track()`, endpoint hanging"),
    ("hang-exit", "exit", "process exit, endpoint hanging"),
)


def _median(dump: Dict[str, Any], workload: str, sdk: str, key: str) -> Tuple[Optional[float], bool]:
    runs = dump["results"].get(f"{workload}/{sdk}", [])
    values = [r["values"].get(key) for r in runs if r["values"].get(key) is not None]
    if not values:
        return None, False
    return statistics.median(values), any(r.get("lower", {}).get(key, False) for r in runs)


DASH, TIMES, AT_LEAST = "\u2013", "\u00d7", "\u2265"  # how the pages print "-", "x" and ">="


def _fmt(bench: Any, value: Optional[float], unit: str, lower: bool) -> str:
    text = bench.fmt_value(value, unit, lower)
    return DASH if text == "-" else text.replace(" us", " \u00b5s").replace(">= ", f"{AT_LEAST} ")


def _ratio(bench: Any, other: Optional[float], ours: Optional[float], other_lb: bool, ours_lb: bool) -> str:
    text = bench.fmt_ratio(other, ours, other_lb, ours_lb)
    if text == "-":
        return DASH
    if other is not None and ours and other / ours >= 1000:
        return f"> 1000{TIMES}"
    return text.replace(">= ", f"{AT_LEAST} ").replace("x", TIMES)


def render(dump: Dict[str, Any], bench: Any) -> Dict[str, str]:
    """Each ``<!-- bench:NAME -->`` section's Markdown, from the saved figures."""
    sdks = [s["label"] for s in dump["sdks"]]
    versions = {s["label"]: s["version"] for s in dump["sdks"]}

    def column(sdk: str) -> str:
        return NAMES["ours"] if sdk == "ours" else f"{NAMES.get(sdk, sdk)} {versions[sdk]}"

    out: Dict[str, str] = {}
    for name, wl in dump["workloads"].items():
        head = ["figure", *[column(s) for s in sdks]]
        if "ref" in sdks:
            head.insert(3, "1.1.0 \u00f7 this")
        rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for fig in wl["figures"]:
            cells = [fig["label"]]
            ours, ours_lb = _median(dump, name, "ours", fig["key"])
            for s in sdks:
                value, lower = _median(dump, name, s, fig["key"])
                cells.append(_fmt(bench, value, fig["unit"], lower))
                if s == "ref":
                    # A ratio only where less is better (times, CPU, memory).
                    comparable = fig["unit"] in (bench.TIME, bench.CPU, bench.BYTES)
                    cells.append(_ratio(bench, value, ours, lower, ours_lb) if comparable else "")
            rows.append("| " + " | ".join(cells) + " |")
        out[name] = "\n".join(rows)
    head = ["", *[column(s) for s in sdks if s in ("ours", "ref", "segment", "posthog")]]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for workload, key, label in SUMMARY:
        unit = next(f["unit"] for f in dump["workloads"][workload]["figures"] if f["key"] == key)
        cells = [label]
        for s in sdks:
            if s in ("ours", "ref", "segment", "posthog"):
                value, lower = _median(dump, workload, s, key)
                cells.append(_fmt(bench, value, unit, lower))
        rows.append("| " + " | ".join(cells) + " |")
    out["summary"] = "\n".join(rows)
    out["run"] = (
        f"Run of {dump['date'][:10]} on {dump['machine'].split(', load average')[0]}: "
        f"`{dump['command']}`, collector round trip {dump['rtt_ms']:g} ms."
    )
    return out


# A section's lines, possibly none; never across another marker.
SECTION = re.compile(r"(<!-- bench:([\w-]+) -->\n)((?:(?!<!-- /?bench).)*?)(<!-- /bench -->)", re.DOTALL)


def sections(text: str) -> Dict[str, str]:
    return {m.group(2): m.group(3).rstrip("\n") for m in SECTION.finditer(text)}


def rewrite(text: str, rendered: Dict[str, str]) -> str:
    return SECTION.sub(lambda m: m.group(1) + rendered[m.group(2)] + "\n" + m.group(4), text)


@pytest.mark.parametrize("page", [DOCS / "performance.md", README], ids=lambda p: p.name)
def test_figures_come_from_the_saved_benchmark(page: Path) -> None:
    rendered = render(json.loads(LATEST.read_text(encoding="utf-8")), _bench())
    found = sections(page.read_text(encoding="utf-8"))
    wanted = {"summary", "run"} if page == README else set(rendered) - {"summary"}
    assert set(found) == wanted, f"{page.name} should have exactly the bench sections {sorted(wanted)}"
    for name, text in found.items():
        assert text == rendered[name], (
            f"{page.name}: the '{name}' figures differ from {LATEST.relative_to(ROOT)}; "
            "run `python -m tests.test_docs --update`"
        )
    assert "python benchmarks/bench.py --compare --save" in page.read_text(encoding="utf-8")


def main(argv: Sequence[str]) -> int:
    if list(argv) != ["--update"]:
        print("usage: python -m tests.test_docs --update", file=sys.stderr)
        return 2
    rendered = render(json.loads(LATEST.read_text(encoding="utf-8")), _bench())
    for page in (DOCS / "performance.md", README):
        page.write_text(rewrite(page.read_text(encoding="utf-8"), rendered), encoding="utf-8")
        print(f"updated {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
