"""Process-wide lifecycle: the client registry, the fork entry and the exit budget.

- Every client not yet shut down is registered (strongly: a client the
  application let go of may still hold events that exit must deliver).
- One fork entry resets every client in a child process, exactly once,
  whether it is reached from ``os.register_at_fork`` or from the process-id
  check that every public call makes (forks made from C skip the hooks)
  (docs/design.md, "Fork").
- At exit, every client shuts down at once within one shared budget, so
  several clients do not multiply the time exit takes; multiprocessing
  children, which end with ``os._exit`` and skip atexit, run the same exit
  through a multiprocessing finalizer (docs/design.md, "Exit").
"""

from __future__ import annotations

import atexit
import mmap
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, List, Optional, Set

from ._deadline import Deadline

if TYPE_CHECKING:
    from .client import KlimeClient

_clients: Set[KlimeClient] = set()
# Every client of this process, open or not (disabled, shut down): a forked
# child must give each of them fresh locks, whoever held the parent's.
_every: weakref.WeakSet[KlimeClient] = weakref.WeakSet()
_pid = os.getpid()
_fork_lock = threading.Lock()


class _PidMark:
    """``mark[0]`` is true until this process forks: the portable, slower form."""

    def __getitem__(self, _index: int) -> bool:
        return os.getpid() == _pid

    def __setitem__(self, _index: int, _value: int) -> None:
        pass


def _fork_mark() -> mmap.mmap | _PidMark:
    """An object whose ``[0]`` is true in this process and false in a forked child.

    Every call checks for a fork (docs/design.md, "Fork"), and ``os.getpid()``
    is a system call, about a tenth of what a ``track()`` costs. On Linux a
    private page marked ``MADV_WIPEONFORK`` (4.14+; 18 in the kernel's ABI,
    not exposed by the mmap module) reads as zeros in any child, forked from
    Python or from C, so one byte read replaces the call. Elsewhere, or if
    the kernel refuses the advice, the process id is compared.
    """
    if sys.platform.startswith("linux") and hasattr(mmap.mmap, "madvise"):
        try:
            page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError):
            return _PidMark()
        try:
            # An emulator that accepts any advice and ignores it (older
            # qemu-user) would make every fork look like none: it must
            # refuse advice that does not exist before this one is trusted.
            page.madvise(-1)
        except (OSError, ValueError, OverflowError):
            try:
                page.madvise(18)  # MADV_WIPEONFORK
            except (OSError, ValueError):
                pass
            else:
                page[0] = 1
                return page
    return _PidMark()


# Read by check_fork() and by the inlined check on every call's path.
mark = _fork_mark()
_mp_finalizer_pid: Optional[int] = None


class _Token:
    """Kept alive for multiprocessing's weak after-fork registry."""


_TOKEN = _Token()


def created(client: KlimeClient) -> None:
    """``client`` was built in this process (call after ``check_fork()``): reset it in a child."""
    client._owner_pid = os.getpid()
    _every.add(client)


def register(client: KlimeClient) -> None:
    """Track ``client`` until it is shut down."""
    _clients.add(client)
    _watch_multiprocessing_child()


def unregister(client: KlimeClient) -> None:
    """``client`` is shut down: exit has nothing left to do for it."""
    _clients.discard(client)


def clients() -> List[KlimeClient]:
    """The clients not yet shut down."""
    return list(_clients)


def check_fork() -> None:
    """Reset every client if this is a new process; cheap when it is not."""
    if not mark[0]:
        _forked(from_hook=False)


def _forked(from_hook: bool) -> None:
    """The one fork entry: runs once per child, whatever reached it first.

    Several threads of a fresh child can make their first call at once: the
    first resets, the others wait on the lock and then find the mark set.
    """
    global _pid
    with _fork_lock:
        if mark[0]:
            return  # another thread of this child did it first
        pid = os.getpid()
        for client in {*_clients, *_every}:
            # A client built in this child before the entry ran is already fresh:
            # resetting it would pull its state out from under its running threads.
            if client._owner_pid != pid:
                client._owner_pid = pid
                client._after_fork()
        _pid = pid
        mark[0] = 1
    _after_fork_multiprocessing()


def _fork_hook() -> None:
    # Runs in the child right after os.fork(), before any other thread
    # exists there, so a fresh lock is safe; forks from C never get here.
    global _fork_lock
    _fork_lock = threading.Lock()
    _forked(from_hook=True)


# --- exit ---------------------------------------------------------------------------


def exit_all(budget: Optional[float] = None) -> None:
    """Shut every open client down at once, within one budget.

    ``budget`` defaults to the longest ``shutdown_timeout`` of the clients.
    Each client first stops accepting and starts delivering; then all are
    waited for against the same deadline.
    """
    check_fork()
    open_clients = list(_clients)
    if not open_clients:
        return
    if budget is None:
        budget = max(c._options.shutdown_timeout for c in open_clients)
    deadline = Deadline.after(budget)
    for client in open_clients:
        client._begin_exit()
    for client in open_clients:
        client._finish_exit(deadline)


def _at_exit() -> None:
    exit_all()


# --- multiprocessing ------------------------------------------------------------------


def _watch_multiprocessing_child() -> None:
    """In a multiprocessing child created after its bootstrap (spawn, forkserver): register the exit."""
    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is not None and mp_process.parent_process() is not None:
        _register_mp_finalizer()


def _after_fork_multiprocessing() -> None:
    # A multiprocessing child clears its finalizers after the fork, then runs
    # its after-fork callbacks: register from there, so the finalizer survives.
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        mp_util.register_after_fork(_TOKEN, lambda _token: _register_mp_finalizer())


def _register_mp_finalizer() -> None:
    global _mp_finalizer_pid
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is None or _mp_finalizer_pid == os.getpid():
        return
    _mp_finalizer_pid = os.getpid()
    # exitpriority >= 0: run by the child's exit function before it ends with os._exit.
    mp_util.Finalize(None, exit_all, exitpriority=10)


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fork_hook)
