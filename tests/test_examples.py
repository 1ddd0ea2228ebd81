"""The programs in examples/ run and print what they promise.

The framework-free ones run offline in a subprocess (they start their own
loopback collector), and once more with ``--live`` against this suite's
collector through KLIME_ENDPOINT. The framework ones are always compiled, run
when their framework is installed, and say how to install it when it is not.
With KLIME_WRITE_KEY set but no ``--live``, no example sends its demo events
to that endpoint.
"""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from .conftest import ROOT, run_process
from .servers import Collector

EXAMPLES = ROOT / "examples"

FRAMEWORK_FREE = [
    "quickstart.py",
    "cron_job.py",
    "error_tracking.py",
    "backfill.py",
    "testing_example.py",
    "asyncio_app.py",
    "sigterm.py",
]
FRAMEWORKS = {
    "flask_app.py": ["flask"],
    "django_app.py": ["django"],
    "fastapi_app.py": ["fastapi", "httpx"],
    "flask_middleware.py": ["flask"],
    "starlette_middleware.py": ["starlette", "httpx"],
    "django_middleware.py": ["django"],
    "celery_tasks.py": ["celery"],
}
# Integration examples: the last line each prints when nothing is left queued.
INTEGRATION_DONE = {
    "flask_middleware.py": "queued after the request: 0",
    "starlette_middleware.py": "queued after the request: 0",
    "django_middleware.py": "queued after the requests: 0",
    "celery_tasks.py": "queued after the task: 0",
}


def _env(endpoint: Optional[str] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLIME_") and not k.upper().endswith("_PROXY")}
    if endpoint is not None:
        env["KLIME_ENDPOINT"] = endpoint
        env["KLIME_WRITE_KEY"] = "examples-test-key"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run(
    name: str, *args: str, endpoint: Optional[str] = None, env: Optional[Dict[str, str]] = None
) -> subprocess.CompletedProcess[str]:
    """``python examples/NAME ARGS``; it must succeed."""
    env = _env(endpoint) if env is None else env
    proc = run_process([sys.executable, str(EXAMPLES / name), *args], cwd=str(ROOT), env=env, timeout=120)
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def lines(text: str) -> List[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_every_example_is_covered() -> None:
    found = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert found == set(FRAMEWORK_FREE) | set(FRAMEWORKS)


def test_quickstart_offline() -> None:
    out = lines(run("quickstart.py").stdout)
    assert out[0].startswith("sending to http://127.0.0.1:")
    assert "the collector received 3 event(s):" in out
    assert [line.split()[0] for line in out[2:5]] == ["identify", "track", "group"]
    assert "BatchResponse: status='ok' accepted=3 failed=0" in out
    assert out[-1] == "all delivered"


def test_quickstart_uses_the_endpoint_from_the_environment(collector: Collector) -> None:
    out = lines(run("quickstart.py", "--live", endpoint=collector.url).stdout)
    assert out[0] == "sending to the endpoint from the environment"
    assert [e["type"] for e in collector.events] == ["identify", "track", "group"]
    assert collector.requests[0].headers["Authorization"] == "Bearer examples-test-key"
    assert out[-1] == "all delivered"


def test_cron_job_sends_group_level_events() -> None:
    out = lines(run("cron_job.py").stdout)
    tracks = [line for line in out if line.startswith("track")]
    assert len(tracks) == 3
    assert all("groupId=" in line and "userId" not in line for line in tracks)
    assert out[-1] == "usage job: delivered"


def test_cron_job_against_the_environment(collector: Collector) -> None:
    run("cron_job.py", "--live", endpoint=collector.url)
    tracks = [e for e in collector.events if e["type"] == "track"]
    assert len(tracks) == 3
    assert all("userId" not in e and e["groupId"].startswith("org_") for e in tracks)


def test_error_tracking_reports_a_permanent_failure() -> None:
    out = lines(run("error_tracking.py").stdout)
    assert out[0] == "delivered events: 1"
    assert out[1] == "captured: reason=permanent_error status=401 events=1 names=['Invoice Sent']"


def test_backfill_is_idempotent() -> None:
    out = lines(run("backfill.py").stdout)
    assert out[:2] == ["run 1: sent 1200 events", "run 2: sent 1200 events"]
    assert out[2].startswith("earliest event: timestamp=2025-01-06T09:00:00.000Z messageId=")
    assert out[3] == "collector: 2400 events received, 1200 distinct message ids (what Klime stores)"
    assert out[-1] == "undelivered: 0"


def test_backfill_against_the_environment(collector: Collector) -> None:
    run("backfill.py", "--live", endpoint=collector.url)
    events = collector.events
    assert len(events) == 1200
    assert len({e["messageId"] for e in events}) == 1200
    assert min(e["timestamp"] for e in events) == "2025-01-06T09:00:00.000Z"


def test_testing_example_as_a_script() -> None:
    out = lines(run("testing_example.py").stdout)
    assert [line for line in out if line.startswith("ok")] == [
        "ok  test_signup_identifies_and_tracks",
        "ok  test_company_signup_links_user_to_group",
        "ok  test_rejected_signup_sends_nothing",
        "ok  test_delivery_failure_reaches_on_error",
    ]


def test_testing_example_under_pytest() -> None:
    proc = run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "testing_example.py")],
        cwd=str(ROOT),
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed" in proc.stdout


def test_asyncio_app_scopes_requests_and_flushes_the_job() -> None:
    out = lines(run("asyncio_app.py").stdout)
    assert out[0] == "signup confirmed: accepted=1"
    assert out[1] == "nightly report: 2 org(s), queued afterwards: 0"
    views = sorted(line for line in out if line.startswith("track") and "'Page Viewed'" in line)
    assert views == [
        'track    \'Page Viewed\' (userId=user_1) {"path": "/pricing"}',
        'track    \'Page Viewed\' (userId=user_2) {"path": "/signup"}',
        'track    \'Page Viewed\' (userId=user_3) {"path": "/docs"}',
    ]
    assert 'track    \'Signed Up\' (userId=user_2) {"path": "/signup", "plan": "trial"}' in out
    assert len([line for line in out if "'Usage Snapshot Recorded' (groupId=org_" in line]) == 2
    assert out[-2:] == ["the loop stayed responsive: yes", "all delivered"]


def test_asyncio_app_against_the_environment(collector: Collector) -> None:
    run("asyncio_app.py", "--live", endpoint=collector.url)
    events = collector.events
    assert len(events) == 6
    assert sorted(e["userId"] for e in events if e["event"] == "Page Viewed") == ["user_1", "user_2", "user_3"]
    assert collector.requests[0].headers["Authorization"] == "Bearer examples-test-key"


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_framework_example_compiles(name: str, tmp_path: Path) -> None:
    py_compile.compile(str(EXAMPLES / name), cfile=str(tmp_path / "out.pyc"), doraise=True)


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_framework_example_runs_when_installed(name: str) -> None:
    for module in FRAMEWORKS[name]:
        pytest.importorskip(module)
    out = lines(run(name).stdout)
    kinds = [line.split()[0] for line in out if line.split()[0] in ("identify", "group", "track")]
    assert kinds[:2] == ["identify", "group"]
    assert "track" in kinds


@pytest.mark.parametrize("name", sorted(INTEGRATION_DONE))
def test_integration_example_delivers_everything(name: str) -> None:
    for module in FRAMEWORKS[name]:
        pytest.importorskip(module)
    out = lines(run(name).stdout)
    assert out[-1] == INTEGRATION_DONE[name]
    assert any(line.startswith("track") and ("userId=" in line or "groupId=" in line) for line in out)


def test_sigterm_example_delivers_then_dies_by_the_signal() -> None:
    out = lines(run("sigterm.py").stdout)
    assert [line.split()[1] for line in out if line.startswith("track")] == ["'Worker", "'Email"]
    assert out[-1] == "child exit: killed by SIGTERM"


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_framework_example_without_its_framework_says_how_to_install(name: str, tmp_path: Path) -> None:
    # A module named like the framework that fails to import, first on the path.
    for module in FRAMEWORKS[name]:
        (tmp_path / f"{module}.py").write_text("raise ImportError('not installed')\n")
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = run(name, env=env)
    assert "pip install" in proc.stdout and "Traceback" not in proc.stderr


# Every example that sends events (all but testing_example.py, which uses klime.testing).
SENDERS = sorted(set(FRAMEWORK_FREE) - {"testing_example.py"} | set(FRAMEWORKS))


@pytest.mark.parametrize("name", [*SENDERS, "testing_example.py"])
def test_a_write_key_alone_does_not_send_demo_events(name: str, collector: Collector) -> None:
    # KLIME_WRITE_KEY and KLIME_ENDPOINT name a workspace (here this suite's collector), but the
    # command line does not say --live: the demo events go to the example's own loopback collector.
    for module in FRAMEWORKS.get(name, []):
        pytest.importorskip(module)
    proc = run(name, endpoint=collector.url)
    assert collector.requests == []
    if name in SENDERS:
        assert f"run: python examples/{name} --live" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_live_without_a_write_key_refuses(collector: Collector) -> None:
    env = {**_env(), "KLIME_ENDPOINT": collector.url}
    proc = run_process([sys.executable, str(EXAMPLES / "quickstart.py"), "--live"], cwd=str(ROOT), env=env)
    assert proc.returncode == 2
    assert "set KLIME_WRITE_KEY" in proc.stderr
    assert collector.requests == []
