"""klime.install_signal_handlers in real subprocesses, and the uWSGI threads warning."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import types
from typing import Any, Dict

import pytest

import klime
from klime import _signals

from .conftest import ROOT
from .servers import Collector

CHILD = """
import signal, sys, time
import klime
from klime import KlimeClient

client = KlimeClient("k", sys.argv[1], flush_interval=60_000)
other = KlimeClient("k", sys.argv[1], flush_interval=60_000)
if sys.argv[2] == "previous":
    def previous(signum, frame):
        print("previous handler ran", client.queue_size(), flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, previous)
old = klime.install_signal_handlers(client)
print("old", old.get(signal.SIGTERM), flush=True)
client.track("Before Term", user_id="u1")
other.track("Other Client", user_id="u2")
print("ready", flush=True)
time.sleep(60)
"""


def _run(collector: Collector, mode: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, collector.url, mode],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        while "ready" not in proc.stdout.readline():
            assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigterm_delivers_then_dies_by_the_signal(collector: Collector) -> None:
    result = _run(collector, "default")
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert sorted(e["event"] for e in collector.events) == ["Before Term", "Other Client"]


def test_sigterm_delivers_then_calls_the_previous_handler(collector: Collector) -> None:
    result = _run(collector, "previous")
    assert result.returncode == 3, result.stderr
    assert "previous handler ran 0" in result.stdout  # after the shutdown delivered everything
    assert sorted(e["event"] for e in collector.events) == ["Before Term", "Other Client"]


def test_only_from_the_main_thread() -> None:
    errors: list = []

    def attempt() -> None:
        try:
            klime.install_signal_handlers()
        except ValueError as exc:
            errors.append(exc)

    t = threading.Thread(target=attempt)
    t.start()
    t.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_returns_the_previous_handlers_and_is_all_or_nothing() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    try:
        old = klime.install_signal_handlers(signals=(signal.SIGUSR1,))
        assert old == {signal.SIGUSR1: before}
        assert signal.getsignal(signal.SIGUSR1) is not before
        with pytest.raises(ValueError):
            klime.install_signal_handlers(signals=(signal.SIGUSR2, 10_000))
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, before)


def _fake_uwsgi(opt: Dict[Any, Any]) -> types.ModuleType:
    module = types.ModuleType("uwsgi")
    module.opt = opt  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize(
    ("opt", "enabled"),
    [
        ({}, False),
        ({"enable-threads": True}, True),
        ({"enable-threads": b"1"}, True),
        ({"enable-threads": b"false"}, False),
        ({"threads": b"4"}, True),
        ({b"enable-threads": b"true"}, True),
        ({"enable-threads": [b"0", b"1"]}, True),
    ],
)
def test_uwsgi_options_are_read_defensively(opt: Dict[Any, Any], enabled: bool) -> None:
    assert _signals._uwsgi_threads_enabled(_fake_uwsgi(opt)) is enabled


def test_uwsgi_without_threads_warns_once_at_client_construction(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uwsgi", _fake_uwsgi({"master": True}))
    monkeypatch.setattr(_signals, "_uwsgi_checked", False)
    with caplog.at_level(logging.WARNING, logger="klime"):
        for _ in range(2):
            klime.KlimeClient("k", "http://127.0.0.1:9", flush_interval=60_000).shutdown(timeout=0)
    assert caplog.text.count("enable-threads") == 1


def test_uwsgi_module_of_an_unexpected_shape_says_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uwsgi", types.ModuleType("uwsgi"))
    monkeypatch.setattr(_signals, "_uwsgi_checked", False)
    with caplog.at_level(logging.WARNING, logger="klime"):
        _signals.check_uwsgi()
    assert "uWSGI" not in caplog.text
