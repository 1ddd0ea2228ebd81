"""The client under real application servers: gunicorn with --preload, and uvicorn.

gunicorn imports the app (and creates the client) in its master, then forks
its workers: each worker must send only what it tracked, the master only
what it tracked before forking, and each worker must deliver what it queued
when it exits (docs/design.md, "Fork" and "Exit"). The servers run in their
own process group, killed whole if they outlive their bound.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

from .conftest import SRC, run_process
from .servers import Collector

pytest.importorskip("gunicorn")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drive(proc: subprocess.Popen[str], port: int, paths: List[str], answers: List[str]) -> None:
    """Wait for the server, make the requests, then stop it with SIGTERM (as a supervisor would)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.05)
    try:
        for path in paths:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                answers.append(resp.read().decode())
    finally:
        os.kill(proc.pid, signal.SIGTERM)


def server_env(collector: Collector) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(KLIME_WRITE_KEY="test-write-key", KLIME_ENDPOINT=collector.url, KLIME_FLUSH_INTERVAL="600000")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH", "")) if p)
    env.pop("HTTP_PROXY", None)
    env.pop("http_proxy", None)
    return env


GUNICORN_APP = textwrap.dedent(
    """
    import os

    from klime import KlimeClient

    client = KlimeClient()  # from KLIME_WRITE_KEY / KLIME_ENDPOINT; the interval is long
    client.track("Master Booted", {"pid": os.getpid()}, group_id="org_1")  # queued in the master

    def app(environ, start_response):
        client.track("Page Viewed", {"pid": os.getpid(), "path": environ["PATH_INFO"]}, user_id="u1")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    """
)


def test_gunicorn_preload_workers_deliver_their_own_events_at_exit(collector: Collector, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(GUNICORN_APP)
    port = free_port()
    answers: List[str] = []
    paths = [f"/page/{i}" for i in range(20)]
    argv = [
        sys.executable, "-m", "gunicorn", "--preload", "--workers", "2", "--bind", f"127.0.0.1:{port}",
        "--graceful-timeout", "20", "app:app",
    ]  # fmt: skip
    proc = serve_and_drive(argv, collector, tmp_path, port, paths, answers)
    assert len(answers) == 20, proc.stderr
    events = collector.wait_for_events(21, timeout=10)
    views = [e for e in events if e["event"] == "Page Viewed"]
    boots = [e for e in events if e["event"] == "Master Booted"]
    # Every request's event, once, from the worker that served it; the master's once, from the master.
    assert sorted(e["properties"]["path"] for e in views) == sorted(paths)
    assert len({e["messageId"] for e in events}) == len(events) == 21
    served_by = {int(a) for a in answers}
    assert {e["properties"]["pid"] for e in views} == served_by
    assert len(boots) == 1 and boots[0]["properties"]["pid"] not in served_by


def serve_and_drive(
    argv: List[str], collector: Collector, tmp_path: Path, port: int, paths: List[str], answers: List[str]
) -> subprocess.CompletedProcess[str]:
    """Run the server in ``argv`` (its process group killed on timeout) while ``drive`` requests ``paths``."""
    return run_process(
        argv,
        timeout=90,
        env=server_env(collector),
        cwd=str(tmp_path),
        on_start=lambda p: threading.Thread(target=drive, args=(p, port, paths, answers), daemon=True).start(),
    )


UVICORN_APP = textwrap.dedent(
    """
    import os

    import klime
    from klime.integrations.asgi import KlimeMiddleware

    async def inner(scope, receive, send):
        if scope["type"] != "http":
            return
        klime.track("Api Called", {"path": scope["path"]})  # the scope supplies the user
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    app = KlimeMiddleware(inner, identify=lambda scope: {"user_id": "u-" + scope["path"].rsplit("/", 1)[-1]})
    """
)


def test_uvicorn_app_with_the_asgi_middleware_delivers_at_shutdown(collector: Collector, tmp_path: Path) -> None:
    (tmp_path / "asgi_app.py").write_text(UVICORN_APP)
    port = free_port()
    answers: List[str] = []
    paths = [f"/api/{i}" for i in range(10)]
    argv = [sys.executable, "-m", "uvicorn", "asgi_app:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = serve_and_drive(argv, collector, tmp_path, port, paths, answers)
    assert answers == ["ok"] * 10, proc.stderr
    events = collector.wait_for_events(10, timeout=10)
    assert sorted((e["properties"]["path"], e["userId"]) for e in events) == sorted(
        (p, "u-" + p.rsplit("/", 1)[-1]) for p in paths
    )
    assert json.dumps(events).count("test-write-key") == 0
