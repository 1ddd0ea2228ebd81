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

    @property
    def port(self) -> int:
        return int(self.server.port)

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
        threading.Thread(target=self._accept_loop, name="test-server-accept", daemon=True).start()

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
            threading.Thread(target=self._serve, args=(conn, index), name="test-server-conn", daemon=True).start()

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


def scripted(*replies: Any) -> Callable[[RawRequest], Any]:
    """A server behaviour: ``replies`` in order, then the default 200."""
    pending = list(replies)
    lock = threading.Lock()

    def behaviour(req: RawRequest) -> Any:
        with lock:
            reply = pending.pop(0) if pending else None
        return default_behaviour(req) if reply is None else reply

    return behaviour


def raw_events(server: RawServer) -> List[Dict[str, Any]]:
    """Every event ``server`` received, in the order its requests arrived."""
    return [ev for req in server.requests for ev in req.json()["batch"]]


def ids_of(events: List[Any]) -> List[str]:
    """The message ids of events as callbacks get them (``Event`` objects)."""
    return [ev.messageId for ev in events]


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


# --- appended for the transport tests: raw wire replies, proxies, TLS ---------------

import ssl  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402


@dataclass
class Wire:
    """A WireServer reply written byte for byte: ``data`` as is, then keep or close the connection.

    ``drip`` > 0 sends it one byte at a time with that pause between bytes
    (a server stretching its answer); ``close`` closes the connection after it.
    """

    data: bytes
    close: bool = False
    drip: float = 0.0


def response_bytes(status: int, body: bytes, headers: Optional[Dict[str, str]] = None, length: bool = True) -> bytes:
    """An HTTP/1.1 answer; ``length=False`` leaves out Content-Length."""
    head = f"HTTP/1.1 {status} X\r\n"
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    return head.encode("latin-1") + b"\r\n" + body


def ok_bytes(req: RawRequest) -> bytes:
    """The default 200 answer's body for ``req``."""
    reply = default_behaviour(req)
    assert not isinstance(reply, str)
    return reply[1]


class WireServer(RawServer):
    """A RawServer whose behaviour may also answer with :class:`Wire` (any bytes at all).

    Counts ``client_closed``: connections the client closed (the server read
    end-of-file while waiting for the next request).
    """

    def __init__(self, behaviour: Callable[[RawRequest], Union[Reply, Wire]] = default_behaviour) -> None:
        self.client_closed = 0
        super().__init__(behaviour)  # type: ignore[arg-type]

    def _serve(self, conn: socket.socket, index: int) -> None:
        f = conn.makefile("rb")
        try:
            while not self._stop.is_set():
                line = f.readline()
                if not line:
                    with self._lock:
                        self.client_closed += 1
                        self._lock.notify_all()
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
                reply: Any = self.behaviour(req)
                if isinstance(reply, Wire):
                    if reply.drip > 0:
                        for i in range(len(reply.data)):
                            if self._stop.wait(reply.drip):
                                return
                            conn.sendall(reply.data[i : i + 1])
                    else:
                        conn.sendall(reply.data)
                    if reply.close:
                        return
                    continue
                if reply == "hang":
                    self._stop.wait()
                    return
                if reply == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                if reply == "close":
                    return
                assert not isinstance(reply, str), reply
                extra = reply[2] if len(reply) > 2 else {}
                conn.sendall(response_bytes(reply[0], reply[1], {"Content-Type": "application/json", **extra}))
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                f.close()
                conn.close()

    def wait_for_closed(self, n: int, timeout: float = 5.0) -> int:
        """Block until the client closed at least ``n`` connections (or the timeout)."""
        wait_until(lambda: self.client_closed >= n, timeout)
        return self.client_closed


def read_message(f: Any) -> Optional[Tuple[str, List[Tuple[str, str]], bytes]]:
    """One HTTP/1.1 message with a Content-Length body (or none): (start line, headers, body)."""
    start = f.readline()
    if not start:
        return None
    headers: List[Tuple[str, str]] = []
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
    return start.decode("latin-1").rstrip("\r\n"), headers, f.read(length) if length else b""


def write_message(sock: socket.socket, start: str, headers: List[Tuple[str, str]], body: bytes) -> None:
    head = start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    sock.sendall(head.encode("latin-1") + body)


def kill(sock: socket.socket) -> None:
    # shutdown() first: close() alone waits for makefile() readers to let go.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        kill(src)
        kill(dst)


class LoopbackServer:
    """A listening socket on 127.0.0.1 with one thread per accepted connection."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._open: List[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.settimeout(10)
            self.keep(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def keep(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.append(sock)

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def drop(self) -> None:
        """Close every open connection from this side (an idle timeout, a restart)."""
        with self._lock:
            conns, self._open = self._open, []
        for c in conns:
            kill(c)

    def close(self) -> None:
        kill(self._sock)
        self.drop()


class ForwardProxy(LoopbackServer):
    """An HTTP proxy: forwards absolute-URI requests, tunnels CONNECT (or refuses it with 502).

    ``seen`` records each request line with its headers (names lower-cased)
    exactly as the client sent them to the proxy.
    """

    def __init__(self, tunnel: bool = True) -> None:
        self.tunnel = tunnel
        self.seen: List[Tuple[str, Dict[str, str]]] = []
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, conn: socket.socket) -> None:
        upstream: Optional[socket.socket] = None
        try:
            f = conn.makefile("rb")
            while True:
                msg = read_message(f)
                if msg is None:
                    return
                line, headers, body = msg
                self.seen.append((line, {k.lower(): v for k, v in headers}))
                method, target, _ = line.split(" ", 2)
                if method == "CONNECT":
                    self._connect(conn, target)
                    return
                url = urlsplit(target)
                if upstream is None:
                    upstream = socket.create_connection((url.hostname, url.port or 80), timeout=10)
                    self.keep(upstream)
                    upstream_file = upstream.makefile("rb")
                forwarded = [(k, v) for k, v in headers if not k.lower().startswith("proxy-")]
                write_message(upstream, f"{method} {url.path} HTTP/1.1", forwarded, body)
                reply = read_message(upstream_file)
                if reply is None:
                    return
                write_message(conn, *reply)
        except OSError:
            return
        finally:
            kill(conn)
            if upstream is not None:
                kill(upstream)

    def _connect(self, conn: socket.socket, target: str) -> None:
        host, _, port = target.rpartition(":")
        try:
            if not self.tunnel:
                raise OSError("tunnelling disabled")
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        self.keep(upstream)
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
        pipe(conn, upstream)


class TlsFront(LoopbackServer):
    """TLS termination in front of a RawServer: one plain upstream connection per TLS connection."""

    def __init__(self, upstream: RawServer, cert_pem: str, tmp_path: Path) -> None:
        certfile = tmp_path / f"server-{id(self)}.pem"
        certfile.write_text(cert_pem)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(str(certfile))
        self._upstream = upstream
        self.handshakes = 0
        super().__init__()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def serve(self, conn: socket.socket) -> None:
        try:
            tls = self._ctx.wrap_socket(conn, server_side=True)
        except OSError:
            kill(conn)  # the client refused our certificate
            return
        self.handshakes += 1
        self.keep(tls)
        upstream = socket.create_connection(("127.0.0.1", self._upstream.port), timeout=10)
        try:
            f, uf = tls.makefile("rb"), upstream.makefile("rb")
            while True:
                msg = read_message(f)
                if msg is None:
                    return
                write_message(upstream, *msg)
                reply = read_message(uf)
                if reply is None:
                    return
                write_message(tls, *reply)
        except OSError:
            return
        finally:
            kill(tls)
            kill(upstream)


# Test-only PKI (EC P-256, valid 2024-2124), made once with `cryptography` so
# the suite needs neither it nor the openssl CLI.
CA_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBeDCCAR6gAwIBAgIUGTlYOuy7zeu+EYlPD9dOKxpxw5cwCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOa2xpbWUgdGVzdHMgQ0EwIBcNMjQwMTAxMDAwMDAwWhgPMjEy
NDAxMDEwMDAwMDBaMBkxFzAVBgNVBAMMDmtsaW1lIHRlc3RzIENBMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAEEkOCjUrahsFsnMF029h0KJBBpyToB8pKOCe/YuOc
0MdemibI/oOsk1bb6Q2jDP0JMjoHQu6mpFxf7Y8BtHr5gqNCMEAwDwYDVR0TAQH/
BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwHQYDVR0OBBYEFCSm/+rJEin4A3osjOTa
uGyDjOKzMAoGCCqGSM49BAMCA0gAMEUCIFjOsZFewyn/z3I1qHAVDEE4SsGP9bpN
jB+14AHOvyRoAiEAoGJOgOt0W42MEhvOl2BCesTkGztn4eSq55IgzwAdMek=
-----END CERTIFICATE-----
"""

# Signed by CA_CERT for 127.0.0.1 and localhost.
LOOPBACK_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBxDCCAWqgAwIBAgIUHqUQlxmuXfW1ZnE3wSOdLe7+5ZwwCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOa2xpbWUgdGVzdHMgQ0EwIBcNMjQwMTAxMDAwMDAwWhgPMjEy
NDAxMDEwMDAwMDBaMBQxEjAQBgNVBAMMCTEyNy4wLjAuMTBZMBMGByqGSM49AgEG
CCqGSM49AwEHA0IABCf+9fXZIp/h30tJGlejFk8no1AsuE0XPfxtTjfsYo9MhbPR
6fvSOEZ7oJh7+Fvut6bBO8AZ9Rwv6lcW+1s908GjgZIwgY8wDAYDVR0TAQH/BAIw
ADAOBgNVHQ8BAf8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwEwGgYDVR0RBBMw
EYcEfwAAAYIJbG9jYWxob3N0MB0GA1UdDgQWBBTNxhCVcGuXsv8r6VpiRfP+x2kQ
yzAfBgNVHSMEGDAWgBQkpv/qyRIp+AN6LIzk2rhsg4ziszAKBggqhkjOPQQDAgNI
ADBFAiASVt25Xx0HILpbtB1mDf5vqMrdlMfpvtOodxBMJNuInwIhAIpjmkzoptbJ
6zORHeqawehSLIC8IM+irGDWknm1Cqvm
-----END CERTIFICATE-----
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgPTwzG2hLXdVgLXuz
u8Y0t96n2AzBhmQpdRkLqrvh28uhRANCAAQn/vX12SKf4d9LSRpXoxZPJ6NQLLhN
Fz38bU437GKPTIWz0en70jhGe6CYe/hb7remwTvAGfUcL+pXFvtbPdPB
-----END PRIVATE KEY-----
"""

# Signed by CA_CERT for another name only.
OTHER_NAME_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBxTCCAWygAwIBAgIUA3rAKlf+71OcX6k9N3SVqOPzdjowCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOa2xpbWUgdGVzdHMgQ0EwIBcNMjQwMTAxMDAwMDAwWhgPMjEy
NDAxMDEwMDAwMDBaMBgxFjAUBgNVBAMMDWtsaW1lLmludmFsaWQwWTATBgcqhkjO
PQIBBggqhkjOPQMBBwNCAAQedakxB4d4DiJGUE3vmUYJG4BPDMLCFQsKTqS397NE
OSAuvaa9Z9TYPeqLYe2KgXo8mdFoMUmw3/0V6ktdp8Buo4GQMIGNMAwGA1UdEwEB
/wQCMAAwDgYDVR0PAQH/BAQDAgeAMBMGA1UdJQQMMAoGCCsGAQUFBwMBMBgGA1Ud
EQQRMA+CDWtsaW1lLmludmFsaWQwHQYDVR0OBBYEFJialxlRFOewV//H0Nv0J0De
2sWLMB8GA1UdIwQYMBaAFCSm/+rJEin4A3osjOTauGyDjOKzMAoGCCqGSM49BAMC
A0cAMEQCIESN0TINGr2cE0PB2M0sF1Y2g68S2dg4DsK3md22CdhmAiASCZcpPw2p
PlYlE7Co6KzykAiThNHVycp4kEVKK4e3hg==
-----END CERTIFICATE-----
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQglqVHuPpBH/kaDdgu
93d2mF16qoSwQY1DT17DaG8EDkqhRANCAAQedakxB4d4DiJGUE3vmUYJG4BPDMLC
FQsKTqS397NEOSAuvaa9Z9TYPeqLYe2KgXo8mdFoMUmw3/0V6ktdp8Bu
-----END PRIVATE KEY-----
"""
