"""A long-running process stopped with SIGTERM still delivers what it queued.

    python examples/sigterm.py

A container stop or ``kill`` sends SIGTERM, whose default action ends the
process without running ``atexit``. ``klime.install_signal_handlers()``
(opt-in, from the main thread) first shuts every client down within one
bounded budget, then lets the signal act as before: here the process still
dies by SIGTERM. This demo starts itself as a child, stops it, and shows
what arrived. Offline against a loopback collector unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import klime
from klime import KlimeClient


def child() -> None:
    client = KlimeClient(flush_interval=60_000)  # reads KLIME_WRITE_KEY / KLIME_ENDPOINT
    klime.install_signal_handlers()
    client.track("Worker Started", {"queue": "emails"}, group_id="org_456")
    client.track("Email Batch Processed", {"emails": 250}, group_id="org_456")
    print("ready", flush=True)
    time.sleep(60)  # the work loop; SIGTERM arrives here


def main() -> int:
    from _loopback import OFFLINE_WRITE_KEY, describe, klime_target

    with klime_target() as (options, collector):
        env = dict(os.environ)
        if options:
            env.update(KLIME_WRITE_KEY=OFFLINE_WRITE_KEY, KLIME_ENDPOINT=options["endpoint"])
        proc = subprocess.Popen([sys.executable, __file__, "--child"], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        if collector is not None:
            for event in collector.events:
                print(describe(event))
        killed = code == -signal.SIGTERM
        print(f"child exit: {'killed by SIGTERM' if killed else code}")
        return 0 if killed else 1


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        sys.exit(main())
