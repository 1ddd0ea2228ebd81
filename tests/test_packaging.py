"""The distribution is what a release needs, and nothing more.

Builds the wheel and the sdist with the installed hatchling (the build
backend that ``pip install -e .`` uses), offline and without build
isolation, into a temporary directory, then looks inside.
"""

from __future__ import annotations

import email
import sys
import tarfile
import zipfile
from email.message import Message
from pathlib import Path
from typing import Dict, List

import pytest

import klime

from .conftest import ROOT, run_process

PACKAGE = ROOT / "src" / "klime"

BUILD = """
import sys
from hatchling.build import build_sdist, build_wheel
out = sys.argv[1]
print(build_wheel(out))
print(build_sdist(out))
"""


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    pytest.importorskip("hatchling", reason="hatchling (the build backend) is part of the test extra")
    out = tmp_path_factory.mktemp("dist")
    proc = run_process([sys.executable, "-c", BUILD, str(out)], cwd=str(ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr
    wheel_name, sdist_name = proc.stdout.split()
    return {"wheel": out / wheel_name, "sdist": out / sdist_name}


def wheel_files(dists: Dict[str, Path]) -> List[str]:
    with zipfile.ZipFile(dists["wheel"]) as zf:
        return zf.namelist()


def wheel_metadata(dists: Dict[str, Path]) -> Message:
    with zipfile.ZipFile(dists["wheel"]) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


def test_wheel_name_and_version(dists: Dict[str, Path]) -> None:
    assert dists["wheel"].name == f"klime-{klime.__version__}-py3-none-any.whl"


def test_wheel_holds_the_package_and_py_typed(dists: Dict[str, Path]) -> None:
    files = wheel_files(dists)
    assert "klime/py.typed" in files
    expected = {f"klime/{p.name}" for p in PACKAGE.glob("*.py")}
    assert expected <= set(files)
    assert {"klime/testing.py", "klime/_cli.py", "klime/__main__.py"} <= set(files)


def test_wheel_holds_nothing_else(dists: Dict[str, Path]) -> None:
    for name in wheel_files(dists):
        top = name.split("/", 1)[0]
        assert top in ("klime", f"klime-{klime.__version__}.dist-info"), name
        assert "tests" not in name.split("/") and "conftest" not in name, name
        assert not name.endswith((".pyc", ".orig", ".rej")), name


def test_wheel_metadata(dists: Dict[str, Path]) -> None:
    meta = wheel_metadata(dists)
    assert meta["Name"] == "klime"
    assert meta["Version"] == klime.__version__
    assert meta["Requires-Python"] == ">=3.9"
    assert meta["Summary"]
    assert meta["License-Expression"] == "MIT"
    assert meta["Description-Content-Type"] == "text/markdown"
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Development Status :: 5 - Production/Stable" in classifiers
    for minor in range(9, 15):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Repository", "Issues", "Changelog"} <= set(urls)
    assert all(u.startswith("https://") for u in urls.values())
    # No runtime dependencies: every Requires-Dist belongs to an extra.
    assert all("extra ==" in r for r in meta.get_all("Requires-Dist") or [])
    # The long description is the README.
    body = meta.get_payload()
    assert isinstance(body, str) and body.startswith("# klime")


def test_wheel_installs_the_klime_command(dists: Dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        entry_points = zf.read(name).decode()
    assert "[console_scripts]" in entry_points
    assert "klime = klime._cli:main" in entry_points


def test_sdist_holds_sources_docs_and_tests(dists: Dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for required in ("README.md", "CHANGELOG.md", "CONTRIBUTING.md", "LICENSE", "pyproject.toml", "src/klime/py.typed"):
        assert required in names, required
    assert any(n.startswith("tests/") for n in names)
    assert any(n.startswith("examples/") for n in names)
    assert not any(n.startswith((".venv/", ".git/", "dist/")) for n in names)
