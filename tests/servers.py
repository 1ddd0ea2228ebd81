"""Loopback servers for the tests.

``Collector`` wraps pytest-httpserver: it records every batch and answers
200 unless told otherwise. ``RawServer`` is a small HTTP/1.1 keep-alive
server on a plain socket, for what pytest-httpserver cannot do: hang, reset
a connection, close mid-body, count TCP connections.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

from pytest_httpserver import HTTPServer
from werkzeug.wrappers import Request, Response


@dataclass
class Received:
    """One request the server read."""

    path: str
    headers: Dict[str, str]
    body: Dict[str, Any]

    @property
    def events(self) -> List[Dict[str, Any]]:
        return list(self.body.get("batch", []))


def ok_body(batch: Dict[str, Any]) -> Dict[str, Any]:
    n = len(batch.get("batch", []))
    return {"status": "ok", "accepted": n, "failed": 0}


class Collector:
    """Records batches POSTed to ``/v1/batch`` on a pytest-httpserver.

    ``script`` holds canned answers (status, body, headers) used in order
    before falling back to 200 with every event accepted.
    """

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.requests: List[Received] = []
        self.script: Deque[Tuple[int, Any, Dict[str, str]]] = deque()
        self._cond = threading.Condition()
        server.expect_request("/v1/batch", method="POST").respond_with_handler(self._handle)

    @property
    def url(self) -> str:
        return self.server.url_for("/").rstrip("/")

    def respond(self, status: int, body: Any = None, headers: Optional[Dict[str, str]] = None) -> None:
        """Queue one canned answer (body: dict -> JSON, str/bytes as is)."""
        self.script.append((status, body, headers or {}))

    def _handle(self, request: Request) -> Response:
        body = json.loads(request.get_data())
        with self._cond:
            self.requests.append(Received(request.path, dict(request.headers), body))
            self._cond.notify_all()
            canned = self.script.popleft() if self.script else None
        if canned is None:
            return Response(json.dumps(ok_body(body)), status=200, content_type="application/json")
        status, payload, headers = canned
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        return Response(payload or "", status=status, headers=headers, content_type="application/json")

    @property
    def events(self) -> List[Dict[str, Any]]:
        with self._cond:
            return [ev for r in self.requests for ev in r.events]

    def wait_for_events(self, n: int, timeout: float = 5.0) -> List[Dict[str, Any]]:
        """Block until at least ``n`` events arrived (or the timeout), return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(len(r.events) for r in self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        return self.events


# --- the raw socket server ---------------------------------------------------


@dataclass
class RawRequest:
    method: str
    path: str
    headers: Dict[str, str]
    body: bytes
    connection: int  # which accepted connection (0-based) carried it

    def json(self) -> Any:
        return json.loads(self.body)


Reply = Union[str, Tuple[int, bytes], Tuple[int, bytes, Dict[str, str]]]
"""What a behaviour returns: (status, body[, headers]), or one of the strings
``"hang"`` (read the request, never answer), ``"reset"`` (RST before any
answer), ``"close"`` (close without answering), ``"half"`` (send headers and
half the body, then close), or ``"slow:SECONDS"`` (answer 200 after a pause)."""


def default_behaviour(req: RawRequest) -> Reply:
    try:
        n = len(req.json().get("batch", []))
    except ValueError:
        n = 0
    return (200, json.dumps({"status": "ok", "accepted": n, "failed": 0}).encode())


@dataclass
class RawServer:
    """HTTP/1.1 with keep-alive on 127.0.0.1, one thread per connection."""

    behaviour: Callable[[RawRequest], Reply] = default_behaviour
    requests: List[RawRequest] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._conns: List[socket.socket] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.close()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> List[RawRequest]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            return list(self.requests)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                index = self.connections
                self.connections += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        f = conn.makefile("rb")
        try:
            while not self._stop.is_set():
                line = f.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: Dict[str, str] = {}
                while True:
                    h = f.readline().decode("latin-1")
                    if h in ("\r\n", "\n", ""):
                        break
                    k, _, v = h.partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = f.read(int(headers.get("content-length", "0")))
                req = RawRequest(method, path, headers, body, index)
                with self._lock:
                    self.requests.append(req)
                    self._lock.notify_all()
                reply = self.behaviour(req)
                if reply == "hang":
                    self._stop.wait()
                    return
                if reply == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                if reply == "close":
                    return
                if isinstance(reply, str) and reply.startswith("slow:"):
                    time.sleep(float(reply[5:]))
                    reply = default_behaviour(req)
                if reply == "half":
                    payload = b'{"status":"ok","accepted":1,"failed":0}'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                        + payload[: len(payload) // 2]
                    )
                    return
                assert not isinstance(reply, str), reply
                status, payload = reply[0], reply[1]
                extra = reply[2] if len(reply) > 2 else {}  # type: ignore[misc]
                head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                for k, v in extra.items():
                    head += f"{k}: {v}\r\n"
                conn.sendall(head.encode() + b"\r\n" + payload)
        except OSError:
            return
        finally:
            try:
                f.close()
                conn.close()
            except OSError:
                pass


def refused_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


class Held:
    """A RawServer behaviour that answers 200 but holds chosen requests.

    Requests are numbered in arrival order from 0; each number in ``hold``
    waits (a hanging endpoint) until :meth:`release` is called for it, so a
    test decides exactly when the flusher's send completes.
    """

    def __init__(self, *hold: int, limit: float = 30.0) -> None:
        self.gates = {n: threading.Event() for n in hold}
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, req: RawRequest) -> Reply:
        with self._lock:
            n = self.count
            self.count += 1
        gate = self.gates.get(n)
        if gate is not None:
            gate.wait(self.limit)
        return default_behaviour(req)

    def release(self, *numbers: int) -> None:
        for n in numbers or tuple(self.gates):
            self.gates[n].set()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns its last truth."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(0.01)
    return True


def drop_connections(server: RawServer) -> int:
    """Close every connection ``server`` holds, from its side, as an idle timeout would.

    Returns how many were closed. The client is not told; it finds out when
    it next uses the connection.
    """
    with server._lock:
        conns = list(server._conns)
        server._conns.clear()
    for c in conns:
        with contextlib.suppress(OSError):
            c.shutdown(socket.SHUT_RDWR)
    return len(conns)
