"""One workload, run in a fresh process of the interpreter under test.

``bench.py`` starts ``PYTHON driver.py CONFIG_JSON`` and reads JSON lines
from stdout. Only the standard library and the SDK being measured are
imported, so the same file drives our ``klime``, the reference ``klime``
from PyPI, ``segment.analytics``, ``posthog`` and ``amplitude``.

Lines printed (``kind`` says which):

* ``info``: SDK name and version, Python version.
* ``call``: a ``track()`` call has been running for a while, and ``slow``:
  a call took long (failure workloads only; a watchdog thread prints the
  first, so that a call that never returns still leaves a lower bound
  behind when the parent kills us at its time cap).
* ``tracked``: per-call latencies of the loop, in nanoseconds, summarised
  (live workloads: also the calls made, when the loop started and how long
  it ran).
* ``shutdown_start`` / ``shutdown``: around an explicit ``shutdown()``.
* ``delivered``: what the collector had once it had everything (or gave up).
* ``live``: after the paced loop and ``shutdown()``: CPU, shutdown time,
  events reported to the error callback.
* ``done``: ``main()`` is returning; the rest is interpreter exit.
* ``atexit``: the last exit hook ran (SDK hooks registered later ran first).
"""

from __future__ import annotations

import atexit
import json
import math
import resource
import sys
import threading
import time
from http.client import HTTPConnection
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import quote, urlsplit

EVENT_NAME = "Report Generated"
SLOW_NS = 100_000_000
USERS = [f"user_{i}" for i in range(100)]

# Written only by the SDK's thread(s) via on_error; read at exit.
_reported = [0]
# The client lives until the interpreter exits, as a module-level client in
# an application would; the hang-exit workload depends on it.
_clients: List[Any] = []


def emit(kind: str, **fields: Any) -> None:
    fields["kind"] = kind
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _last_exit_hook() -> None:
    emit("atexit", mono=time.monotonic(), reported=_reported[0])


# Registered before any SDK is imported: exit hooks run last-in first-out,
# so this one runs after the SDK's own flush-at-exit hook has finished.
atexit.register(_last_exit_hook)


def _on_error(_error: Any, events: Any, *_rest: Any) -> None:
    try:
        _reported[0] += len(events)
    except TypeError:
        _reported[0] += 1


# --- SDK adapters -------------------------------------------------------------
# Each returns (track, shutdown, name, version). ``track(event, properties,
# user_id)`` is, for Klime, the client's own bound method, so that nothing
# but the SDK is timed.

Track = Callable[[str, Dict[str, Any], str], Any]
Adapter = Any


def _klime(cfg: Dict[str, Any]) -> Adapter:
    import inspect

    import klime

    opts: Dict[str, Any] = {"endpoint": cfg["endpoint"], "on_error": _on_error}
    if cfg.get("batch_size"):
        opts["max_batch_size"] = cfg["batch_size"]
    if cfg.get("queue_size"):
        opts["max_queue_size"] = cfg["queue_size"]
    params = inspect.signature(klime.KlimeClient).parameters
    if cfg.get("shutdown_timeout_ms") and "shutdown_timeout" in params:
        opts["shutdown_timeout"] = cfg["shutdown_timeout_ms"]
    client = klime.KlimeClient("bench-write-key", **opts)
    _clients.append(client)
    return client.track, client.shutdown, "klime", getattr(klime, "__version__", "?")


def _segment(cfg: Dict[str, Any]) -> Adapter:
    from segment.analytics import Client  # type: ignore[import-not-found]
    from segment.analytics.version import VERSION  # type: ignore[import-not-found]

    opts: Dict[str, Any] = {"host": cfg["endpoint"], "on_error": _on_error}
    if cfg.get("batch_size"):
        opts["upload_size"] = cfg["batch_size"]
    if cfg.get("queue_size"):
        opts["max_queue_size"] = cfg["queue_size"]
    client = Client("bench-write-key", **opts)
    _clients.append(client)

    def track(event: str, properties: Dict[str, Any], user_id: str) -> None:
        client.track(user_id, event, properties)

    return track, client.shutdown, "segment", VERSION


def _posthog(cfg: Dict[str, Any]) -> Adapter:
    import posthog  # type: ignore[import-not-found]
    from posthog import Posthog

    opts: Dict[str, Any] = {"host": cfg["endpoint"], "on_error": _on_error}
    if cfg.get("batch_size"):
        opts["flush_at"] = cfg["batch_size"]
    if cfg.get("queue_size"):
        opts["max_queue_size"] = cfg["queue_size"]
    client = Posthog("bench-write-key", **opts)
    _clients.append(client)

    def track(event: str, properties: Dict[str, Any], user_id: str) -> None:
        client.capture(event, distinct_id=user_id, properties=properties)

    return track, client.shutdown, "posthog", getattr(posthog, "VERSION", "?")


def _amplitude(cfg: Dict[str, Any]) -> Adapter:
    from amplitude import Amplitude, BaseEvent, Config  # type: ignore[import-not-found]
    from amplitude.constants import SDK_VERSION  # type: ignore[import-not-found]

    def callback(_event: Any, code: int, _message: Any = None) -> None:
        # Called once per event with the outcome; anything but 200 is a failure.
        if code != 200:
            _reported[0] += 1

    opts: Dict[str, Any] = {"server_url": cfg["endpoint"] + "/2/httpapi", "callback": callback}
    if cfg.get("batch_size"):
        opts["flush_queue_size"] = cfg["batch_size"]
    # Amplitude has no bound on its queue, so queue_size has nothing to map to.
    client = Amplitude("bench-write-key", Config(**opts))
    _clients.append(client)

    def track(event: str, properties: Dict[str, Any], user_id: str) -> None:
        client.track(BaseEvent(event, user_id=user_id, event_properties=properties))

    return track, client.shutdown, "amplitude", SDK_VERSION


ADAPTERS = {"klime": _klime, "segment": _segment, "posthog": _posthog, "amplitude": _amplitude}


# --- measuring ------------------------------------------------------------------


def _props(i: int) -> Dict[str, Any]:
    return {"report": "monthly", "plan": "pro", "index": i, "rows": 1234, "ratio": 0.25, "exported": False}


def _summary(lat_ns: List[int]) -> Dict[str, Any]:
    s = sorted(lat_ns)
    n = len(s)

    def rank(q: float) -> int:
        # Nearest rank: the smallest latency that q of the calls did not exceed.
        return s[max(0, math.ceil(round(q * n, 6)) - 1)]

    return {
        "n": n,
        "median": rank(0.5),
        "mean": sum(s) / n,
        "p99": rank(0.99),
        "p999": rank(0.999),
        "max": s[-1],
    }


class _Watch:
    """Reports a ``track()`` call that has not returned after ``after`` seconds."""

    def __init__(self, after: float = 0.25) -> None:
        self.index = -1
        self.started = 0.0  # monotonic start of the call in progress; 0 when none
        self._after = after
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="bench-watchdog", daemon=True).start()

    def _run(self) -> None:
        reported = -1
        while not self._stop.wait(0.1):
            started, index = self.started, self.index
            if started and index != reported and time.monotonic() - started >= self._after:
                emit("call", index=index, start_mono=started)
                reported = index

    def stop(self) -> None:
        self._stop.set()


def _loop(track: Track, calls: int, watch: Optional[_Watch]) -> List[int]:
    # Properties are built per call, outside the timed part, as an application
    # would; building them all up front would count them as the SDK's memory.
    lat = [0] * calls
    users = USERS
    nusers = len(users)
    clock = time.perf_counter_ns
    if watch is None:
        for i in range(calls):
            p, u = _props(i), users[i % nusers]
            t0 = clock()
            track(EVENT_NAME, p, u)
            lat[i] = clock() - t0
        return lat
    mono = time.monotonic
    for i in range(calls):
        p, u = _props(i), users[i % nusers]
        watch.index = i
        watch.started = mono()
        t0 = clock()
        track(EVENT_NAME, p, u)
        lat[i] = clock() - t0
        watch.started = 0.0
        if lat[i] >= SLOW_NS:
            # If we are killed later in the loop, this is the only trace of it.
            emit("slow", index=i, seconds=lat[i] / 1e9)
    return lat


def _collector(control: str, path: str) -> Dict[str, Any]:
    parts = urlsplit(control)
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=600)
    try:
        conn.request("GET", path)
        result: Dict[str, Any] = json.loads(conn.getresponse().read())
        return result
    finally:
        conn.close()


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def throughput(cfg: Dict[str, Any], track: Track, shutdown: Callable[[], Any]) -> None:
    """Back-to-back calls, then wait until the collector has them all, then shut down."""
    calls = cfg["calls"]
    rss0 = _maxrss_bytes()
    cpu0 = _cpu()
    mono0 = time.monotonic()
    lat = _loop(track, calls, None)
    emit("tracked", latency=_summary(lat), seconds=time.monotonic() - mono0)
    run = quote(cfg["run"])
    got = _collector(cfg["control"], f"/wait?run={run}&n={calls}&timeout={cfg['wait_timeout']}")
    complete = got["count"] >= calls and got["last_mono"] is not None
    t = time.perf_counter()
    shutdown()
    shutdown_s = time.perf_counter() - t
    cpu = _cpu() - cpu0
    emit(
        "delivered",
        count=got["count"],
        e2e=(got["last_mono"] - mono0) if complete else None,
        cpu=cpu,
        shutdown=shutdown_s,
        maxrss=_maxrss_bytes(),
        rss_growth=_maxrss_bytes() - rss0,
    )


def failure(cfg: Dict[str, Any], track: Track, shutdown: Callable[[], Any]) -> None:
    """Calls against a dead or hanging endpoint; then shutdown() (or not) and exit."""
    watch = _Watch()
    lat = _loop(track, cfg["calls"], watch)
    watch.stop()
    emit("tracked", latency=_summary(lat))
    if cfg.get("explicit_shutdown", True):
        emit("shutdown_start", mono=time.monotonic())
        t = time.perf_counter()
        shutdown()
        emit("shutdown", seconds=time.perf_counter() - t)


def _paced(track: Track, rate: float, duration: float) -> Dict[str, Any]:
    """Calls at ``rate`` per second for ``duration`` seconds, as live traffic would arrive.

    The calls due so far are made every millisecond or so (sleeping in
    between); a caller held up by the SDK then makes the calls that fell
    due meanwhile back to back, as an application works off the requests
    that queued up, until ``duration`` is over. Calls the SDK kept it from
    making in time are never made: the rate achieved is the figure.
    """
    lat: List[int] = []
    users = USERS
    nusers = len(users)
    clock = time.perf_counter
    clock_ns = time.perf_counter_ns
    sleep = time.sleep
    total = int(rate * duration)
    mono0 = time.monotonic()
    start = clock()
    end = start + duration
    i = 0
    while i < total:
        now = clock()
        if now >= end:
            break
        due = min(total, int((now - start) * rate) + 1)
        if i >= due:
            sleep(min(0.001, start + i / rate - now))
            continue
        while i < due:
            p, u = _props(i), users[i % nusers]
            t0 = clock_ns()
            track(EVENT_NAME, p, u)
            lat.append(clock_ns() - t0)
            i += 1
            if clock() >= end:
                break
    # Ahead of schedule the loop ends with the last call; the rate is over the whole window.
    elapsed = max(clock() - start, duration)
    return {"made": i, "seconds": elapsed, "mono0": mono0, "lat": lat}


def live(cfg: Dict[str, Any], track: Track, shutdown: Callable[[], Any]) -> None:
    """Paced calls against the far collector, then shutdown(); bench.py counts what arrived."""
    cpu0 = _cpu()
    got = _paced(track, cfg["rate"], cfg["duration"])
    lat = got.pop("lat")
    emit("tracked", latency=_summary(lat) if lat else None, **got)
    t = time.perf_counter()
    shutdown()
    shutdown_s = time.perf_counter() - t
    emit("live", cpu=_cpu() - cpu0, shutdown=shutdown_s, reported=_reported[0], maxrss=_maxrss_bytes())


def main() -> None:
    cfg: Dict[str, Any] = json.loads(sys.argv[1])
    track, shutdown, name, version = ADAPTERS[cfg["sdk"]](cfg)
    emit("info", sdk=name, version=str(version), python=sys.version.split()[0])
    if cfg["mode"] == "throughput":
        throughput(cfg, track, shutdown)
    elif cfg["mode"] == "live":
        live(cfg, track, shutdown)
    else:
        failure(cfg, track, shutdown)
    emit("done", mono=time.monotonic())


if __name__ == "__main__":
    main()
