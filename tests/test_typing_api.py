"""User code calling AsyncKlimeClient, the module-level API, scope and flushing type-checks
under ``mypy --strict``, and mistakes in such code are caught (docs/design.md, "Typing")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from .conftest import ROOT

TYPING = ROOT / "tests" / "typing"

pytest.importorskip("mypy")


def mypy(path: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir", str(cache), str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def marked_lines(path: Path) -> List[int]:
    return [i for i, line in enumerate(path.read_text().splitlines(), 1) if "# E:" in line]


def test_user_code_passes_mypy_strict(tmp_path: Path) -> None:
    proc = mypy(TYPING / "user_code.py", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mistakes_in_user_code_are_caught(tmp_path: Path) -> None:
    path = TYPING / "user_mistakes.py"
    proc = mypy(path, tmp_path)
    found = sorted({int(m.group(1)) for m in re.finditer(r"user_mistakes\.py:(\d+): error", proc.stdout)})
    assert found == marked_lines(path), proc.stdout
