"""Opt-in signal handlers that deliver queued events before the process ends, and the uWSGI check.

A SIGTERM (container stop, ``kill``, a process manager) ends a Python process
without running ``atexit`` unless something handles it: the events it had
queued would be lost. :func:`install_signal_handlers` runs the same bounded
exit as ``atexit`` (docs/design.md, "Exit"), then lets the signal do what it
would have done.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional, Union

from . import _lifecycle

if TYPE_CHECKING:
    from .client import KlimeClient

Handler = Union[Callable[[int, Optional[FrameType]], Any], int, signal.Handlers, None]

_logger = logging.getLogger("klime")


def install_signal_handlers(
    client: Optional[KlimeClient] = None,
    signals: Iterable[int] = (signal.SIGTERM,),
) -> Dict[int, Handler]:
    """On each of ``signals``, deliver what every open client queued, then let the signal act.

    The handler shuts every open client down at once within one shared
    budget (the longest ``shutdown_timeout``), like the exit hook. Then it
    calls the handler that was installed before; if there was none (the
    default action), it restores the default and sends the signal again, so
    the process ends exactly as it would have (killed by the signal). A
    previously ignored signal stays ignored once the clients are shut down.

    ``client`` is shut down with the others; it may be given to make sure a
    particular client is open and registered before the signal arrives.

    Must be called from the main thread (``ValueError`` otherwise, as
    :func:`signal.signal` requires). Returns ``{signal number: previous
    handler}``.
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("install_signal_handlers() must be called from the main thread")
    if client is not None and not hasattr(client, "_options"):
        raise TypeError(f"client must be a klime client, not {type(client).__name__}")
    wanted = [signal.Signals(s) for s in signals]  # ValueError for a number that is no signal
    previous: Dict[int, Handler] = {}
    try:
        for sig in wanted:
            if sig in previous:
                continue
            previous[sig] = signal.signal(sig, _make_handler(previous))
    except BaseException:
        for number, old in previous.items():  # all or nothing
            signal.signal(number, signal.SIG_DFL if old is None else old)
        raise
    return dict(previous)


def _make_handler(previous: Dict[int, Handler]) -> Callable[[int, Optional[FrameType]], None]:
    def handler(signum: int, frame: Optional[FrameType]) -> None:
        try:
            _lifecycle.exit_all()
        except Exception:
            _logger.exception("klime: shutting down on signal %d failed", signum)
        old = previous.get(signum)
        if callable(old):
            old(signum, frame)
        elif old == signal.SIG_IGN:
            return
        else:
            # SIG_DFL, or a handler installed from C (None): the default action.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handler


# --- uWSGI -------------------------------------------------------------------------

_uwsgi_checked = False


def check_uwsgi() -> None:
    """Warn once when running under uWSGI with Python threads disabled (the flusher could not run).

    uWSGI runs application threads only with ``enable-threads`` or
    ``threads`` set; it exposes its options as the ``uwsgi.opt`` mapping.
    Called by each client's constructor when ``"uwsgi" in sys.modules``.
    """
    global _uwsgi_checked
    if _uwsgi_checked:
        return
    _uwsgi_checked = True
    try:
        enabled = _uwsgi_threads_enabled(sys.modules["uwsgi"])
    except Exception:
        return  # not the real uWSGI module, or an unexpected shape: say nothing
    if enabled is False:
        _logger.warning(
            "klime: uWSGI is running with Python threads disabled, so events are sent only when "
            "flush() or shutdown() is called; start uWSGI with --enable-threads (or --threads N)"
        )


def _uwsgi_threads_enabled(uwsgi: Any) -> Optional[bool]:
    """True/False from ``uwsgi.opt``; None when it cannot tell."""
    opt = getattr(uwsgi, "opt", None)
    if opt is None or not hasattr(opt, "get"):
        return None
    for name in ("threads", "enable-threads"):
        for key in (name, name.encode()):
            if key in opt and _truthy(opt.get(key), name):
                return True
    return False


def _truthy(value: Any, name: str) -> bool:
    """An option value as uWSGI exposes it: True, bytes or str, or a list when repeated."""
    if isinstance(value, (list, tuple)):
        return any(_truthy(v, name) for v in value)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        text = value.strip().lower()
        if name == "threads":
            return True  # any threads setting turns Python threads on
        return text not in ("0", "false", "no", "off", "n", "f")
    return bool(value) or name == "threads"
