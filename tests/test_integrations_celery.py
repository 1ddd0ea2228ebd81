"""klime.integrations.celery with a real Celery app: eager, and a real prefork worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import ROOT, MakeClient
from .servers import Collector

celery = pytest.importorskip("celery")



def test_eager_task_flushes_after_each_task(collector: Collector, make_client: MakeClient) -> None:
    from klime.integrations.celery import install

    client = make_client(collector.url, flush_interval=60_000)
    app = celery.Celery("eager", broker="memory://")
    app.conf.task_always_eager = True

    @app.task
    def work(n: int) -> int:
        client.track("Task Ran", {"n": n}, user_id="u1")
        return n

    install(client, flush_after_task=True)
    try:
        assert work.delay(3).get() == 3
        # task_postrun flushed: no waiting for the 60 s interval.
        assert [e["properties"]["n"] for e in collector.events] == [3]
    finally:
        from celery import signals

        from klime.integrations import celery as integration

        integration._uninstall(signals)


WORKER_MODULE = """
import os
from celery import Celery
from klime import KlimeClient
from klime.integrations.celery import install

folder = os.environ["BROKER_DIR"]
app = Celery("tasks")
app.conf.update(
    broker_url="filesystem://",
    broker_transport_options={"data_folder_in": folder, "data_folder_out": folder},
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)
client = KlimeClient(flush_interval=60_000)  # only a shutdown delivers
install(client)

@app.task(name="tasks.work")
def work(n):
    client.track("Worker Task", {"n": n}, user_id="u1")
    with open(os.path.join(os.environ["MARK_DIR"], f"done-{n}"), "w") as f:
        f.write(str(os.getpid()))
"""


def test_a_prefork_worker_delivers_what_its_child_queued_at_shutdown(collector: Collector, tmp_path: Path) -> None:
    broker = tmp_path / "broker"
    marks = tmp_path / "marks"
    broker.mkdir()
    marks.mkdir()
    (tmp_path / "tasks.py").write_text(textwrap.dedent(WORKER_MODULE))
    env = {
        **os.environ,
        "BROKER_DIR": str(broker),
        "MARK_DIR": str(marks),
        "KLIME_WRITE_KEY": "k",
        "KLIME_ENDPOINT": collector.url,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")]),
    }
    # Queue the task first, through the same filesystem broker.
    subprocess.run(
        [sys.executable, "-c", "import tasks; tasks.work.delay(1)"], env=env, cwd=tmp_path, check=True, timeout=60
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork", "--concurrency=1",
         "--loglevel=WARNING", "--without-heartbeat", "--without-gossip", "--without-mingle"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (marks / "done-1").exists():
            assert worker.poll() is None, worker.communicate()[0]
            assert time.monotonic() < deadline, "the task never ran"
            time.sleep(0.1)
        child_pid = int((marks / "done-1").read_text())
        assert child_pid != worker.pid  # it ran in a prefork child
        assert collector.events == []  # still queued (60 s interval)
        worker.send_signal(signal.SIGTERM)  # warm shutdown: the child ends with os._exit
        output, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    events = collector.wait_for_events(1, timeout=10)
    assert [(e["event"], e["properties"]["n"]) for e in events] == [("Worker Task", 1)], output
