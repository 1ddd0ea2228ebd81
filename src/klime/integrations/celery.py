"""Celery: deliver what a worker queued before its processes end, and optionally after each task.

    # where the Celery app is created (e.g. proj/celery.py)
    from klime.integrations.celery import install
    install()                          # or install(client, flush_after_task=True)

Celery's prefork pool ends its child processes with ``os._exit``, which
skips ``atexit``: without this, what a child queued just before it was
recycled (``max_tasks_per_child``) or stopped would be lost. Celery is
imported only by this module.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional

from .. import _lifecycle
from .._deadline import Deadline
from ..client import KlimeClient
from ._common import logger

__all__ = ["install"]

_lock = threading.Lock()
_installed: List[Callable[..., None]] = []  # strong references to the connected receivers


def install(
    client: Optional[KlimeClient] = None,
    flush_after_task: bool = False,
    *,
    flush_timeout: Optional[float] = None,
) -> None:
    """Connect to Celery's signals; call it once, where the Celery app is created.

    - ``worker_process_shutdown`` (each prefork child, before ``os._exit``)
      and ``worker_shutdown`` (the main worker process): every open client
      shuts down within one shared budget, as at a normal interpreter exit,
      so what the process queued is delivered (or reported to ``on_error``).
    - With ``flush_after_task=True``, ``task_postrun``: after each task,
      ``client`` is flushed (with ``client=None``, every open client, the
      default one included; none is created for it), within
      ``flush_timeout`` seconds (None: until every event is delivered or
      reported, as ``flush()`` does). A failing flush is logged and never
      fails the task.

    Calling it again replaces the earlier connections.
    """
    from celery import signals  # type: ignore[import-untyped,import-not-found,unused-ignore]

    if flush_timeout is not None and (isinstance(flush_timeout, bool) or not flush_timeout >= 0):
        raise ValueError(f"flush_timeout must be None or zero or more seconds, not {flush_timeout!r}")

    def on_shutdown(**_: Any) -> None:
        try:
            _lifecycle.exit_all()
        except Exception:
            logger.exception("klime: delivering at the Celery worker's shutdown failed")

    def on_task_done(**_: Any) -> None:
        deadline = Deadline.after(flush_timeout)
        targets = [client] if client is not None else _lifecycle.clients()
        for target in targets:
            try:
                left = deadline.remaining()
                target.flush(timeout=None if left == float("inf") else left)
            except Exception:
                logger.exception("klime: flushing after a Celery task failed")

    with _lock:
        _uninstall(signals)
        signals.worker_process_shutdown.connect(on_shutdown, weak=False)
        signals.worker_shutdown.connect(on_shutdown, weak=False)
        _installed.append(on_shutdown)
        if flush_after_task:
            signals.task_postrun.connect(on_task_done, weak=False)
            _installed.append(on_task_done)


def _uninstall(signals: Any) -> None:
    for receiver in _installed:
        for signal in (signals.worker_process_shutdown, signals.worker_shutdown, signals.task_postrun):
            signal.disconnect(receiver)
    _installed.clear()
