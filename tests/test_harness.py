"""The process helpers in conftest.py: a process that hangs never outlives its bound, nor leaves orphans."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List

import pytest

from .conftest import fork_and_wait, run_process, run_python
from .servers import wait_until

needs_process_groups = pytest.mark.skipif(not hasattr(os, "killpg"), reason="no process groups")


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for whoever inherited it."""
    status = Path(f"/proc/{pid}/status")
    if status.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            return "\nState:\tZ" in status.read_text()
        except (FileNotFoundError, ProcessLookupError):
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# The child forks; both print their pid and sleep well past the test's bound.
HANGING_FAMILY = """
import os, time
if os.fork() == 0:
    os.write(1, b"grandchild %d\\n" % os.getpid())
else:
    os.write(1, b"child %d\\n" % os.getpid())
time.sleep(120)
"""


def pids_in(text: str) -> List[int]:
    return [int(line.split()[1]) for line in text.splitlines() if line.split()[:1] in (["child"], ["grandchild"])]


@needs_process_groups
def test_a_process_that_hangs_is_killed_with_its_children_and_fails_the_test() -> None:
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed:
        run_python(HANGING_FAMILY, timeout=1.5)
    assert time.monotonic() - started < 30
    message = str(failed.value)
    assert "was still running after 1.5s; killed its process group" in message
    assert "Fatal Python error: Aborted" in message  # the tracebacks faulthandler printed
    pids = pids_in(message)
    assert len(pids) == 2, message
    assert wait_until(lambda: all(gone(pid) for pid in pids), timeout=10), pids


@needs_process_groups
def test_what_a_finished_process_left_behind_is_killed() -> None:
    """A child that exits while its own child holds the output open: bounded, and nothing survives."""
    code = """
    import os, time
    if os.fork() == 0:
        os.write(1, b"grandchild %d\\n" % os.getpid())
        time.sleep(120)
    os.write(1, b"child %d\\n" % os.getpid())
    os._exit(0)
    """
    with pytest.raises(pytest.fail.Exception) as failed:
        run_python(code, timeout=1.5)
    message = str(failed.value)
    assert "exited with 0, but processes it left behind still held its output" in message
    pids = pids_in(message)
    assert len(pids) == 2, message
    assert wait_until(lambda: all(gone(pid) for pid in pids), timeout=10), pids


@needs_process_groups
def test_a_finished_process_gives_its_output_and_status() -> None:
    proc = run_process([sys.executable, "-c", "import sys; print(sys.stdin.read()); sys.exit(3)"], input="hi")
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "hi\n", "")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is not available")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # 3.12+
def test_a_forked_child_is_bounded_and_always_leaves_through_os_exit() -> None:
    code, data = fork_and_wait(lambda: b"x" * 200_000)  # more than a pipe holds
    assert (code, len(data)) == (0, 200_000)

    def raises() -> bytes:
        raise ValueError("in the child")

    code, data = fork_and_wait(raises)
    assert code == 3 and b"ValueError: in the child" in data

    def hangs() -> bytes:
        print("hanging", os.getpid(), flush=True)
        time.sleep(120)
        return b""

    with pytest.raises(pytest.fail.Exception, match="did not finish within 1s"):
        fork_and_wait(hangs, timeout=1)
