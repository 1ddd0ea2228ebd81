"""The loopback collector the benchmark sends to; runs in a process of its own.

Started by ``bench.py``; prints one JSON line with its ports, then serves
until it is terminated. Five ports:

* ``ok``: accepts any batch POST over HTTP/1.1 keep-alive and counts the
  distinct events received per run. The run is the first path segment
  after ``/r/`` (``/r/<run>/v1/batch`` for Klime and Segment,
  ``/r/<run>/batch/`` for PostHog), so one collector serves every run
  without being reset. It is a single-threaded event loop on raw sockets,
  not ``http.server``: it shares the machine with the SDK being measured,
  so each request must cost it as little as possible, and ``http.server``
  spends most of a request parsing headers with the ``email`` package.
* ``far``: the same, as if the collector were far away (a distant API):
  each request is answered one round trip (``--rtt``, 50 ms by default)
  after the collector has read it, and a new connection is not read from
  until two round trips after it was accepted, the cost of the TCP and
  TLS handshakes. An event counts as delivered when the collector has
  read it.
* ``control``: ``GET /wait?run=..&n=..&timeout=..`` blocks until the run has
  ``n`` events, so that a driver learns of complete delivery without
  spending CPU on polling; ``GET /count?run=..`` reports the totals.
* ``hang``: accepts connections and reads whatever is sent, never answers.
* ``refuse``: a port that is bound but not listening, so every connection
  attempt is refused at once (and no other process can take the port).

Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import heapq
import json
import re
import selectors
import socket
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, urlsplit

MAX_HEAD = 64 * 1024


class _Run:
    __slots__ = ("ids", "requests", "events", "first_mono", "last_mono")

    def __init__(self) -> None:
        self.ids: Set[str] = set()
        self.requests = 0
        self.events = 0  # including duplicates, which the ids set removes
        self.first_mono: Optional[float] = None
        self.last_mono: Optional[float] = None


class Tally:
    """Distinct events per run, and a condition that ``/wait`` sleeps on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._runs: Dict[str, _Run] = {}

    def add(self, run: str, ids: List[str]) -> None:
        now = time.monotonic()
        with self._lock:
            r = self._runs.get(run)
            if r is None:
                r = self._runs[run] = _Run()
            before = len(r.ids)
            r.ids.update(ids)
            r.requests += 1
            r.events += len(ids)
            if len(r.ids) > before:
                if r.first_mono is None:
                    r.first_mono = now
                r.last_mono = now
            self._changed.notify_all()

    def snapshot(self, run: str) -> Dict[str, Any]:
        with self._lock:
            return self._describe(run)

    def wait(self, run: str, n: int, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                r = self._runs.get(run)
                if r is not None and len(r.ids) >= n:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return self._describe(run)

    def _describe(self, run: str) -> Dict[str, Any]:
        r = self._runs.get(run) or _Run()
        return {
            "count": len(r.ids),
            "events": r.events,
            "requests": r.requests,
            "first_mono": r.first_mono,
            "last_mono": r.last_mono,
        }


# Klime and Segment call the event id messageId, PostHog uuid, Amplitude
# insert_id; json.dumps
# with default separators puts a space after the colon. One simple pattern
# per spelling is several times faster than one pattern for all of them.
_ID_PATTERNS = [
    re.compile(b'"' + key + b'":' + space + b'"([^"]*)"')
    for key in (b"messageId", b"uuid", b"insert_id")
    for space in (b"", b" ")
]


def decompress(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def scan_ids(body: bytes) -> List[str]:
    """The event ids in a batch body, found by pattern.

    About a tenth of the cost of parsing the JSON, which matters because
    the collector shares the CPUs with the SDK being measured. The
    benchmark's properties contain no such keys, so every match is one
    event's id.
    """
    for pattern in _ID_PATTERNS:
        found = pattern.findall(body)
        if found:
            return [m.decode("utf-8", "replace") for m in found]
    return []


def event_ids(body: bytes) -> List[str]:
    """The event ids in a batch body, from the parsed JSON (which must be valid)."""
    obj = json.loads(body)
    batch = (obj.get("batch") or obj.get("events")) if isinstance(obj, dict) else obj
    if not isinstance(batch, list):
        return []
    ids = []
    for ev in batch:
        if isinstance(ev, dict):
            mid = ev.get("messageId") or ev.get("uuid") or ev.get("insert_id")
            if isinstance(mid, str):
                ids.append(mid)
    return ids


def split_run(path: str) -> str:
    """``/r/<run>/...`` -> ``<run>``; anything else belongs to run ``-``."""
    if path.startswith("/r/"):
        return path[3:].partition("/")[0]
    return "-"


def _response(status: int, obj: Dict[str, Any], close: bool = False) -> bytes:
    body = json.dumps(obj).encode()
    reason = {200: "OK", 400: "Bad Request", 411: "Length Required"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _Ingest:
    """An ``ok`` or ``far`` port: an HTTP/1.1 keep-alive event loop that counts batch events.

    With ``rtt`` > 0 (the ``far`` port), every answer is held back for one
    round trip after its request was read, and a new connection is left
    unread for ``handshake_rtts`` round trips after it was accepted. The
    waits are timers in this one loop, so any number of connections can be
    waiting at once (as they would be on a real network) at no CPU cost.
    """

    def __init__(self, tally: Tally, rtt: float = 0.0, handshake_rtts: int = 2) -> None:
        self.tally = tally
        self.rtt = rtt
        self.handshake = rtt * handshake_rtts
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self._sel = selectors.DefaultSelector()
        self._buffers: Dict[socket.socket, bytearray] = {}
        self._checked: Set[str] = set()
        # (due, seq, socket, reply or None to start reading, close after the reply)
        self._timers: List[Tuple[float, int, socket.socket, Optional[bytes], bool]] = []
        self._seq = 0
        self._last_due: Dict[socket.socket, float] = {}

    def serve_forever(self) -> None:
        self._sel.register(self.sock, selectors.EVENT_READ)
        while True:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            for key, _ in self._sel.select(timeout):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                if s is self.sock:
                    self._accept()
                elif s in self._buffers:
                    self._readable(s)
            self._run_timers()

    def _later(self, due: float, s: socket.socket, reply: Optional[bytes], close: bool) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (due, self._seq, s, reply, close))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, s, reply, close = heapq.heappop(self._timers)
            if s not in self._buffers:
                continue  # the client gave up on this connection meanwhile
            if reply is None:
                self._sel.register(s, selectors.EVENT_READ)  # the handshakes are over
                continue
            try:
                s.sendall(reply)
            except OSError:
                self._close(s)
                continue
            if close:
                self._close(s)

    def _accept(self) -> None:
        conn, _ = self.sock.accept()
        # Replies are one small write each; Nagle would hold them for the
        # client's delayed ACK.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffers[conn] = bytearray()
        if self.handshake > 0:
            due = time.monotonic() + self.handshake
            self._last_due[conn] = due
            self._later(due, conn, None, False)
        else:
            self._sel.register(conn, selectors.EVENT_READ)

    def _close(self, s: socket.socket) -> None:
        if s in self._buffers:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            del self._buffers[s]
            self._last_due.pop(s, None)
            s.close()

    def _send(self, s: socket.socket, reply: bytes, close: bool) -> bool:
        """Answer now, or one round trip from now on the far port; False if the connection is gone."""
        if self.rtt <= 0:
            s.sendall(reply)
            if close:
                self._close(s)
                return False
            return True
        # Answers on one connection leave in order.
        due = max(time.monotonic() + self.rtt, self._last_due.get(s, 0.0))
        self._last_due[s] = due
        self._later(due, s, reply, close)
        if close:
            # Read nothing more from it; the timer sends the answer, then closes.
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            return False
        return True

    def _readable(self, s: socket.socket) -> None:
        try:
            data = s.recv(1 << 18)  # readable, so this does not block
        except OSError:
            data = b""
        if not data:
            self._close(s)
            return
        buf = self._buffers[s]
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._close(s)
                return
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            method, target, *_ = [*lines[0].split(" "), "", ""]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                # No SDK measured here sends chunked bodies; say so rather than hang.
                self._send(s, _response(411, {"status": "error"}, close=True), close=True)
                return
            length = int(headers.get("content-length") or 0)
            if len(buf) < end + 4 + length:
                return  # the rest of the body is still on its way
            body = bytes(buf[end + 4 : end + 4 + length])
            del buf[: end + 4 + length]
            close = headers.get("connection", "").lower() == "close"
            if not self._send(s, self._handle(method, target, headers, body), close):
                return

    def _handle(self, method: str, target: str, headers: Dict[str, str], body: bytes) -> bytes:
        if method != "POST":
            return _response(200, {})  # e.g. an SDK asking for feature flags
        run = split_run(urlsplit(target).path)
        try:
            body = decompress(body, headers.get("content-encoding", "").lower())
            if run in self._checked:
                ids = scan_ids(body)
            else:
                # The first batch of every run is parsed in full: an SDK
                # sending invalid JSON must not pass unnoticed.
                ids = event_ids(body)
                if sorted(ids) != sorted(scan_ids(body)):
                    raise ValueError("the id pattern does not match the parsed events")
                self._checked.add(run)
        except (ValueError, OSError, EOFError, zlib.error):
            return _response(400, {"status": "error", "accepted": 0, "failed": 0})
        self.tally.add(run, ids)
        # "code" is what Amplitude's SDK reads; the others ignore it.
        return _response(200, {"status": "ok", "accepted": len(ids), "failed": 0, "code": 200})


class _ControlHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _ControlServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        tally = self.server.tally
        if url.path == "/wait":
            info = tally.wait(query.get("run", "-"), int(query["n"]), float(query.get("timeout", 60)))
        else:
            info = tally.snapshot(query.get("run", "-"))
        data = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ControlServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tally: Tally) -> None:
        super().__init__(("127.0.0.1", 0), _ControlHandler)
        self.tally = tally


def _serve_hang(sock: socket.socket) -> None:
    """Accept and read forever, never answer; connections stay open until the peer gives up."""
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if s is sock:
                conn, _ = sock.accept()
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="the benchmark's loopback collector")
    p.add_argument("--rtt", type=float, default=50.0, help="round trip of the far port, ms (50)")
    args = p.parse_args(argv)
    tally = Tally()
    ingest = _Ingest(tally)
    far = _Ingest(tally, rtt=args.rtt / 1000.0)
    control = _ControlServer(tally)

    hang = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    hang.bind(("127.0.0.1", 0))
    hang.listen(128)

    # Bound but never listening: connecting gets an immediate RST. Kept
    # open for the life of the process so no one else can take the port.
    refuse = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    refuse.bind(("127.0.0.1", 0))

    threading.Thread(target=ingest.serve_forever, name="ingest", daemon=True).start()
    threading.Thread(target=far.serve_forever, name="far", daemon=True).start()
    threading.Thread(target=_serve_hang, args=(hang,), name="hang", daemon=True).start()
    ports = {
        "ok": ingest.sock.getsockname()[1],
        "far": far.sock.getsockname()[1],
        "control": control.server_address[1],
        "hang": hang.getsockname()[1],
        "refuse": refuse.getsockname()[1],
    }
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        control.serve_forever(poll_interval=0.5)


if __name__ == "__main__":
    main()
