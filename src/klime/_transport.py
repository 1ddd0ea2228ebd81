"""HTTP to the ingestion API, and the retry policy (docs/design.md, "Transport").

:class:`HttpTransport` makes one POST per call over a small pool of kept-alive
connections, with an HTTP/1.1 client of its own on plain sockets (TLS from
:mod:`ssl`, proxies from the environment read as :mod:`urllib` reads them).
It replaces :mod:`http.client` for two reasons, both measured: one deadline
bounds the whole attempt (connect, send and the entire response, however
slowly the server drips it), and it spends a fraction of the CPU per request.

:class:`UrllibTransport` sends through ``urllib.request.urlopen`` instead, as
the official SDK does; the default transport switches to it for a request
when a test suite has patched ``urlopen`` (docs/design.md, "Patched urlopen").

:class:`Sender` turns a request body into a :class:`BatchResponse` or a
:class:`SendError`, retrying transient failures under a :class:`RetryPolicy`,
with one pause shared by every lane after a 429/503 (docs/design.md, "Retries").
"""

from __future__ import annotations

import base64
import contextlib

# Host names are encoded with the idna codec on the first connect; importing
# it with klime keeps that one-off ~10 ms of CPU off the first send.
import encodings.idna  # noqa: F401
import json
import logging
import platform
import random
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timezone
from email.message import Message
from email.utils import parsedate_to_datetime
from http.client import HTTPException, IncompleteRead, RemoteDisconnected
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Set, Tuple, cast
from urllib.parse import unquote, urlsplit

from ._deadline import Deadline, monotonic
from ._event import Event
from ._version import __version__
from .types import BatchResponse, SendError, ValidationError

MAX_BACKOFF = 16.0
# A Retry-After beyond this is taken as this: one misconfigured header must
# not stall delivery for hours while the queue overflows.
MAX_RETRY_AFTER = 300.0
USER_AGENT = f"klime-python/{__version__} (Python {platform.python_version()})"

# A spare connection (not the most recently used one) idle this long is
# closed on the next post or release (docs/design.md, "Connection pool").
SPARE_IDLE = 5.0
# Limits on what a server may send before the body; beyond them the answer is garbage.
MAX_HEAD_BYTES = 65536
MAX_HEADERS = 200
# An ingestion API answers in a few hundred bytes; a body past this is not
# kept in memory (the attempt fails and the connection is dropped).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
_RECV = 65536

# The function urllib.request.urlopen is at import; anything else there at send
# time is a test double (docs/design.md, "Patched urlopen").
_ORIGINAL_URLOPEN = urllib.request.urlopen


class Response(NamedTuple):
    """One HTTP answer: status, headers (case-insensitive ``.get``) and the whole body."""

    status: int
    headers: Message
    body: bytes


class Transport(Protocol):
    """What the sender needs from the network (docs/design.md, "Transport").

    ``post`` makes ONE attempt that ends by ``min(now + request_timeout,
    deadline)``; network failures raise ``OSError`` (``TimeoutError`` at the
    deadline) or ``http.client.HTTPException``. It is called from several
    threads at once. ``close`` closes idle connections (later posts
    reconnect); ``after_fork`` forgets the parent's connections in a child
    without writing to them.
    """

    def post(self, body: bytes, deadline: Deadline) -> Response: ...

    def close(self) -> None: ...

    def after_fork(self) -> None: ...


# --- the endpoint -------------------------------------------------------------


def _bad(url: str, source: str, why: str) -> ValueError:
    return ValueError(f"{source} {url!r} cannot be used: {why}")


def check_endpoint(url: str, source: str) -> str:
    """The endpoint with any trailing ``/`` stripped, or ``ValueError`` if it can never work.

    ``source`` names where the URL came from (``"endpoint"`` or
    ``"KLIME_ENDPOINT"``) and is part of the message, with the URL itself.
    """
    if not isinstance(url, str):
        raise ValueError(f"{source} must be a string URL such as 'https://i.klime.com', got {type(url).__name__}")
    text = url.strip()
    problem: Optional[str] = None
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        problem = f"not a valid URL ({exc})"
    if problem is not None:
        raise _bad(url, source, problem)
    if parts.scheme not in ("http", "https"):
        raise _bad(url, source, "it must start with http:// or https://")
    host = parts.hostname
    if not host:
        raise _bad(url, source, "it has no host name")
    if ":" not in host:  # an IPv6 literal needs no encoding
        encodable = True
        try:
            host.encode("idna")
        except UnicodeError:
            encodable = False
        if not encodable:
            raise _bad(
                url, source, f"the host name {host!r} cannot be encoded (an empty label, or one over 63 characters)"
            )
    path = parts.path
    if not path.isascii():
        raise _bad(url, source, "the path has non-ASCII characters (percent-encode them)")
    if any(c <= " " or c == "\x7f" for c in path):
        raise _bad(url, source, "the path has spaces or control characters (percent-encode them)")
    return text.rstrip("/")


# --- secrets ------------------------------------------------------------------


class _Hidden:
    """Bytes that carry the write key; its repr never shows them.

    Kept on objects (never in a frame's local variables), so a traceback
    formatted with ``capture_locals=True`` cannot reveal the key
    (docs/design.md, "Secrets").
    """

    __slots__ = ("data", "headers")

    def __init__(self, data: bytes, headers: Dict[str, str]) -> None:
        self.data = data
        self.headers = headers

    def __repr__(self) -> str:
        return "<hidden>"


def _build_head(target: str, host_header: str, write_key: str, proxy_auth: Optional[str]) -> _Hidden:
    """The request line and headers up to ``Content-Length: `` (its value and the body follow)."""
    headers = _request_headers(write_key)
    lines = [f"POST {target} HTTP/1.1", f"Host: {host_header}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if proxy_auth:
        lines.append(f"Proxy-Authorization: {proxy_auth}")
    lines.append("Content-Length: ")
    return _Hidden("\r\n".join(lines).encode("latin-1"), headers)


def _request_headers(write_key: str) -> Dict[str, str]:
    if not write_key.isprintable() or not _latin1(write_key):
        # The key itself stays out of the message and of any chained exception.
        raise ValueError("write_key contains characters that cannot be sent in an HTTP header")
    return {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {write_key}",
        "User-Agent": USER_AGENT,
        "Accept": "application/json",
    }


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


# --- proxies ------------------------------------------------------------------


class _Proxy(NamedTuple):
    host: str
    port: int
    auth: Optional[str]  # a Proxy-Authorization value


def _proxy_for(scheme: str, netloc: str) -> Optional[_Proxy]:
    """The proxy for ``scheme`` from HTTP(S)_PROXY, unless NO_PROXY lists ``netloc``.

    NO_PROXY is matched against host[:port] as written, as urllib does, so
    an entry like ``localhost:8080`` works.
    """
    url = urllib.request.getproxies().get(scheme)
    if not url or urllib.request.proxy_bypass(netloc):
        return None
    if "://" not in url:
        url = "http://" + url
    p = urlsplit(url)
    if not p.hostname:
        return None
    auth = None
    if p.username is not None:
        creds = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
        auth = "Basic " + base64.b64encode(creds).decode("ascii")
    return _Proxy(p.hostname, p.port or 80, auth)


# --- one connection -------------------------------------------------------------


def _timed_out(limit: float) -> TimeoutError:
    return TimeoutError(f"request not completed within {limit:.3g} s")


class _Conn:
    """One TCP (or TLS) connection and the bytes read past the last answer."""

    __slots__ = ("sock", "buf", "since", "gen", "answered")

    def __init__(self, sock: socket.socket, gen: int) -> None:
        self.sock = sock
        self.buf = b""
        self.since = 0.0  # when it went idle
        self.gen = gen  # HttpTransport._gen when opened; close() bumps it
        self.answered = False  # the current exchange has an answer head

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def recv(self, end: float, limit: float) -> bytes:
        left = end - monotonic()
        if left <= 0:
            raise _timed_out(limit)
        self.sock.settimeout(left)
        try:
            return self.sock.recv(_RECV)
        except socket.timeout:
            raise _timed_out(limit) from None

    def send(self, view: memoryview, end: float, limit: float) -> None:
        # A memoryview, so that no frame (ours, or ssl's) has the request
        # head, and with it the write key, in a local whose repr shows it.
        while view:
            left = end - monotonic()
            if left <= 0:
                raise _timed_out(limit)
            self.sock.settimeout(left)
            try:
                sent = self.sock.send(view)
            except socket.timeout:
                raise _timed_out(limit) from None
            view = view[sent:]

    def read_head(self, end: float, limit: float) -> Tuple[int, str, Message, bool]:
        """(status, reason, headers, keep-alive per the version) of the next answer."""
        buf = self.buf
        start = 0
        while True:
            i = buf.find(b"\r\n\r\n", start)
            if i >= 0:
                head, self.buf = buf[:i], buf[i + 4 :]
                break
            j = buf.find(b"\n\n", start)
            if j >= 0:
                head, self.buf = buf[:j], buf[j + 2 :]
                break
            if len(buf) > MAX_HEAD_BYTES:
                raise HTTPException("the response head is too long")
            start = max(len(buf) - 3, 0)
            data = self.recv(end, limit)
            if not data:
                if buf:
                    raise IncompleteRead(buf)
                raise RemoteDisconnected("Remote end closed connection without response")
            buf += data
        lines = head.split(b"\n")
        status_line = lines[0].rstrip(b"\r").decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
            raise HTTPException(f"not an HTTP response: {status_line[:80]!r}")
        headers = Message()
        if len(lines) > MAX_HEADERS:
            raise HTTPException("too many response headers")
        name = value = ""
        for raw in lines[1:]:
            line = raw.rstrip(b"\r").decode("latin-1")
            if line[:1] in (" ", "\t") and name:  # an obsolete folded continuation
                value += " " + line.strip()
                continue
            if name:
                headers[name] = value
            name, sep, value = line.partition(":")
            if not sep:
                raise HTTPException(f"malformed response header: {line[:80]!r}")
            name, value = name.strip(), value.strip()
        if name:
            headers[name] = value
        return int(code), reason, headers, version == "HTTP/1.1"

    def read_exact(self, n: int, end: float, limit: float) -> bytes:
        if n > MAX_RESPONSE_BYTES:
            raise HTTPException(f"response body of {n} bytes is too large")
        buf = self.buf
        if len(buf) >= n:
            self.buf = buf[n:]
            return buf[:n]
        parts = [buf]
        have = len(buf)
        while have < n:
            data = self.recv(end, limit)
            if not data:
                raise IncompleteRead(b"".join(parts), n - have)
            parts.append(data)
            have += len(data)
        whole = b"".join(parts)
        self.buf = whole[n:]
        return whole[:n]

    def read_line(self, end: float, limit: float) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[: i + 1], self.buf[i + 1 :]
                return line
            if len(self.buf) > MAX_HEAD_BYTES:
                raise HTTPException("a chunk line is too long")
            data = self.recv(end, limit)
            if not data:
                raise IncompleteRead(self.buf)
            self.buf += data

    def read_chunked(self, end: float, limit: float) -> bytes:
        parts: List[bytes] = []
        total = 0
        while True:
            line = self.read_line(end, limit)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HTTPException(f"bad chunk size: {size_text[:20]!r}") from None
            if size < 0:
                raise HTTPException("bad chunk size")
            if size == 0:
                # Trailer fields, if any, up to the empty line.
                while self.read_line(end, limit).strip():
                    pass
                return b"".join(parts)
            parts.append(self.read_exact(size, end, limit))
            total += size
            if total > MAX_RESPONSE_BYTES:
                raise HTTPException("chunked response body is too large")
            if self.read_exact(2, end, limit).strip():
                raise HTTPException("a chunk does not end with CRLF")

    def read_to_close(self, end: float, limit: float) -> bytes:
        parts = [self.buf]
        total = len(self.buf)
        self.buf = b""
        while True:
            data = self.recv(end, limit)
            if not data:
                return b"".join(parts)
            parts.append(data)
            total += len(data)
            if total > MAX_RESPONSE_BYTES:
                raise HTTPException("close-delimited response body is too large")


# Failures on a reused connection before any answer: most often the server
# closed it while it sat idle (docs/design.md, "Connection pool").
_STALE = (ConnectionError, RemoteDisconnected, ssl.SSLEOFError, ssl.SSLZeroReturnError)


class HttpTransport:
    """POSTs request bodies to ``{endpoint}/v1/batch`` (docs/design.md, "Transport").

    Thread-safe: each concurrent ``post`` takes its own kept-alive
    connection from a pool, the most recently used first, so one connection
    carries all the traffic while it is light. Proxy settings are read from
    the environment once, here, the way ``urllib`` reads them.
    """

    spare_idle = SPARE_IDLE

    def __init__(self, endpoint: str, write_key: str, request_timeout: float) -> None:
        self.endpoint = check_endpoint(endpoint, "endpoint")
        parts = urlsplit(self.endpoint)
        self._https = parts.scheme == "https"
        host = parts.hostname or ""
        # The ASCII form goes on the wire, in DNS and in SNI.
        self._host = host if ":" in host else host.encode("idna").decode("ascii")
        self._port = parts.port or (443 if self._https else 80)
        self.url = self.endpoint + "/v1/batch"
        path = (parts.path or "") + "/v1/batch"
        self._timeout = float(request_timeout)
        host_header = self._host if ":" not in self._host else f"[{self._host}]"
        if self._port != (443 if self._https else 80):
            host_header = f"{host_header}:{self._port}"
        self._proxy = _proxy_for(parts.scheme, parts.netloc.rpartition("@")[2])
        self._ssl: Optional[ssl.SSLContext] = ssl.create_default_context() if self._https else None
        # Through a plain-HTTP proxy the request line carries the absolute URL.
        target = path if (self._https or self._proxy is None) else f"http://{host_header}{path}"
        proxy_auth = self._proxy.auth if self._proxy is not None and not self._https else None
        # Built once; each request appends only its length and body.
        self._head = _build_head(target, host_header, write_key, proxy_auth)
        del write_key  # out of this frame's locals from here on
        # Re-entrant: a signal handler that shuts the client down (close()) may
        # run on a thread that is inside _take/_release/_open (a *_sync call).
        self._lock = threading.RLock()
        self._idle: List[_Conn] = []  # most recently released last
        self._busy: Set[_Conn] = set()
        self._gen = 0
        self._urllib: Optional[UrllibTransport] = None

    def __repr__(self) -> str:
        return f"<HttpTransport {self.url}>"

    @property
    def proxy(self) -> Optional[Tuple[str, int]]:
        """The proxy in use as (host, port), or None."""
        return None if self._proxy is None else (self._proxy.host, self._proxy.port)

    # -- the pool --

    def _take(self) -> Optional[_Conn]:
        now = monotonic()
        with self._lock:
            stale = self._prune(now)
            conn = self._idle.pop() if self._idle else None
            if conn is not None and conn.gen != self._gen:
                stale.append(conn)  # released as close() ran (from a signal handler)
                conn = None
            if conn is not None:
                self._busy.add(conn)
        for c in stale:
            c.close()
        return conn

    def _prune(self, now: float) -> List[_Conn]:
        """Spares idle over ``spare_idle`` (all but the most recent one); call under the lock."""
        idle = self._idle
        n = 0
        limit = now - self.spare_idle
        while n < len(idle) - 1 and idle[n].since < limit:
            n += 1
        if not n:
            return []
        stale = idle[:n]
        del idle[:n]
        return stale

    def _release(self, conn: _Conn, reusable: bool) -> None:
        now = monotonic()
        with self._lock:
            self._busy.discard(conn)
            keep = reusable and conn.gen == self._gen and not conn.buf
            if keep:
                conn.since = now
                self._idle.append(conn)
            stale = self._prune(now)
        if not keep:
            conn.close()
        for c in stale:
            c.close()

    def close(self) -> None:
        """Close every idle connection; busy ones are closed when their request ends."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._gen += 1
        for c in idle:
            c.close()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections and lock.

        Only the file descriptors are closed (no TLS close_notify, no
        shutdown): nothing is written on a socket the parent still uses.
        """
        self._lock = threading.RLock()
        conns = self._idle + list(self._busy)
        self._idle = []
        self._busy = set()
        self._gen += 1
        for c in conns:
            c.close()

    @property
    def connections(self) -> int:
        """Connections open now (idle and busy)."""
        with self._lock:
            return len(self._idle) + len(self._busy)

    # -- one attempt --

    def post(
        self, body: bytes, deadline: Deadline, meanwhile: Optional[Callable[[], None]] = None
    ) -> Response:
        """One POST that ends by ``min(now + request_timeout, deadline)``.

        Raises OSError (TimeoutError at the end) or HTTPException. A failure
        on a reused connection before any answer is most often the server
        having closed it while idle, so it is retried once at once on a fresh
        connection; the server dedupes by messageId should the first copy
        have arrived after all.

        ``meanwhile``, if given, is called once the request is written and
        before the answer is awaited (again if the request is made again on
        a fresh connection): the sending thread's own work overlaps the
        server's (docs/design.md, "Lanes"). It must not raise.
        """
        if urllib.request.urlopen is not _ORIGINAL_URLOPEN:
            return self._via_urllib().post(body, deadline)
        limit = self._timeout
        end = monotonic() + limit
        if deadline.at is not None and deadline.at < end:
            end = deadline.at
            limit = max(end - monotonic(), 0.0)
        conn = self._take()
        if conn is not None:
            try:
                return self._exchange(conn, body, end, limit, meanwhile, deadline.at)
            except _STALE:
                if conn.answered:
                    raise
            # The server closed the idle connection: once more, on a new one.
        conn = self._open(end, limit)
        return self._exchange(conn, body, end, limit, meanwhile, deadline.at)

    def _exchange(
        self,
        conn: _Conn,
        body: bytes,
        end: float,
        limit: float,
        meanwhile: Optional[Callable[[], None]] = None,
        cap: Optional[float] = None,
    ) -> Response:
        """Send and read one answer on ``conn``; it goes back to the pool or is closed."""
        reusable = False
        try:
            conn.answered = False
            conn.send(memoryview(self._head.data + b"%d\r\n\r\n" % len(body) + body), end, limit)
            if meanwhile is not None:
                started = monotonic()
                meanwhile()
                # The sender's own work is not the server's time: the attempt's
                # end moves by as much (never past the caller's deadline), so an
                # answer that arrived meanwhile is read, not timed out.
                end += monotonic() - started
                if cap is not None and end > cap:
                    end = cap
            status, _, headers, keep = conn.read_head(end, limit)
            while 100 <= status < 200 and status != 101:
                status, _, headers, keep = conn.read_head(end, limit)  # 100 Continue, 103 ...
            conn.answered = True
            connection = (headers.get("Connection") or "").lower()
            if "close" in connection:
                keep = False
            elif "keep-alive" in connection:
                keep = True
            te = headers.get("Transfer-Encoding")
            length = headers.get("Content-Length")
            if status in (204, 304) or status == 101:
                data = b""
                keep = keep and status != 101
            elif te is not None and "chunked" in te.lower():
                data = conn.read_chunked(end, limit)
            elif length is not None:
                try:
                    n = int(length.split(",")[0])
                except ValueError:
                    raise HTTPException(f"bad Content-Length: {length[:20]!r}") from None
                if n < 0:
                    raise HTTPException("bad Content-Length")
                data = conn.read_exact(n, end, limit)
            else:
                keep = False
                data = conn.read_to_close(end, limit)
            reusable = keep
            return Response(status, headers, data)
        finally:
            self._release(conn, reusable)

    def _open(self, end: float, limit: float) -> _Conn:
        """A new connection (through the proxy, TLS verified), registered as busy."""
        if self._proxy is not None:
            sock = _connect(self._proxy.host, self._proxy.port, end, limit)
        else:
            sock = _connect(self._host, self._port, end, limit)
        with self._lock:
            conn = _Conn(sock, self._gen)
            self._busy.add(conn)
        try:
            if self._proxy is not None and self._https:
                self._tunnel(conn, end, limit)
            if self._ssl is not None:
                left = end - monotonic()
                if left <= 0:
                    raise _timed_out(limit)
                sock.settimeout(left)
                try:
                    conn.sock = self._ssl.wrap_socket(sock, server_hostname=self._host)
                except socket.timeout:
                    raise _timed_out(limit) from None
        except BaseException:
            self._release(conn, False)
            raise
        return conn

    def _tunnel(self, conn: _Conn, end: float, limit: float) -> None:
        """CONNECT through the proxy; raises OSError unless it answers 2xx."""
        authority = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if self._proxy is not None and self._proxy.auth:
            lines.append(f"Proxy-Authorization: {self._proxy.auth}")
        conn.send(memoryview(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")), end, limit)
        status, reason, _, _ = conn.read_head(end, limit)
        if not 200 <= status <= 299:
            raise OSError(f"Tunnel connection failed: {status} {reason}".rstrip())
        if conn.buf:
            raise HTTPException("the proxy sent data after its CONNECT answer")

    def _via_urllib(self) -> UrllibTransport:
        tr = self._urllib
        if tr is None:
            tr = self._urllib = UrllibTransport(self.url, self._head, self._timeout)
        return tr


def _connect(host: str, port: int, end: float, limit: float) -> socket.socket:
    """A connected TCP socket; each address tried within what is left of the attempt.

    The name lookup itself cannot be bounded without a thread per request;
    it is usually answered from a cache.
    """
    err: Optional[OSError] = None
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        left = end - monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(addr)
        except socket.timeout:
            sock.close()
            err = _timed_out(limit)
        except OSError as exc:
            sock.close()
            err = exc
        else:
            return sock
    if err is not None:
        raise err
    raise _timed_out(limit)


# --- through urllib.request.urlopen (issue 12) ------------------------------------


def _as_message(headers: Any) -> Message:
    """Whatever a urlopen double gives as headers -> a Message (empty if unreadable)."""
    if isinstance(headers, Message):
        return headers
    msg = Message()
    try:
        for k, v in headers.items():
            if isinstance(k, str):
                msg[k] = str(v)
    except Exception:
        pass
    return msg


class UrllibTransport:
    """Sends each request through whatever ``urllib.request.urlopen`` is now.

    The request is built as the official SDK builds it: a
    ``urllib.request.Request`` for ``{endpoint}/v1/batch`` with the JSON body
    in ``.data``, method POST and the same headers, so a test that patched
    ``urlopen`` sees what it expects (docs/design.md, "Patched urlopen").
    """

    def __init__(self, url: str, head: _Hidden, request_timeout: float) -> None:
        self.url = url
        self._head = head
        self._timeout = request_timeout

    def __repr__(self) -> str:
        return f"<UrllibTransport {self.url}>"

    def post(self, body: bytes, deadline: Deadline) -> Response:
        timeout = max(min(self._timeout, deadline.remaining()), 0.001)
        request = urllib.request.Request(self.url, data=body, headers=self._head.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                status = answer.status
                headers = _as_message(answer.headers)
                data = answer.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            headers = _as_message(exc.headers)
            try:
                data = exc.read()
            except Exception:
                data = b""
        if not isinstance(status, int) or isinstance(status, bool):
            raise HTTPException(f"urlopen gave no integer status: {type(status).__name__}")
        if not isinstance(data, (bytes, bytearray)):
            data = b""
        return Response(status, headers, bytes(data))

    def close(self) -> None:
        pass

    def after_fork(self) -> None:
        pass


if TYPE_CHECKING:  # both implementations satisfy the Protocol (checked by mypy)

    def _conforms(http: HttpTransport, via_urllib: UrllibTransport) -> Tuple[Transport, Transport]:
        return http, via_urllib


# --- the retry policy -------------------------------------------------------------


def is_transient(status: int) -> bool:
    """408, 429 and 5xx are worth retrying; every other non-2xx is final."""
    return status in (408, 429) or 500 <= status <= 599


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts in all, and the backoff between them (docs/design.md, "Retries")."""

    max_attempts: int
    initial_delay: float  # seconds
    max_delay: float = MAX_BACKOFF

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based).

        ``initial_delay`` doubling per attempt, capped, plus up to 25% jitter
        (still capped) so that many clients do not retry in lockstep. The
        module ``random`` is used because CPython reseeds it in a forked child.
        """
        # The exponent is bounded: 2.0 ** 1024 overflows.
        base = min(self.initial_delay * (2.0 ** min(max(attempt, 1) - 1, 64)), self.max_delay)
        return min(base * (1.0 + 0.25 * rand()), self.max_delay)


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """A ``Retry-After`` header (delta-seconds or HTTP-date) -> seconds, or None."""
    if value is None:
        return None
    value = str(value).strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            # HTTP dates are GMT; the asctime form just does not say so.
            when = when.replace(tzinfo=timezone.utc)
        # A date already past means "now".
        seconds = max(when.timestamp() - (time.time() if now is None else now), 0.0)
    if not 0.0 <= seconds < float("inf"):
        # Negative, NaN or infinite delta-seconds is garbage, not "retry at once".
        return None
    return min(seconds, MAX_RETRY_AFTER)


def parse_response(data: bytes, count: int) -> BatchResponse:
    """A 2xx body -> BatchResponse; a body that is not the documented JSON means all accepted."""
    try:
        obj: Any = json.loads(data) if data else None
    except Exception:  # ValueError, and RecursionError for absurd nesting
        obj = None
    if not isinstance(obj, dict):
        return BatchResponse(status="ok", accepted=count, failed=0, errors=None)
    failed = obj.get("failed")
    failed = failed if isinstance(failed, int) and not isinstance(failed, bool) and failed >= 0 else 0
    accepted = obj.get("accepted")
    if not isinstance(accepted, int) or isinstance(accepted, bool):
        accepted = max(count - failed, 0)
    status = obj.get("status")
    errors: Optional[List[ValidationError]] = None
    raw_errors = obj.get("errors")
    if isinstance(raw_errors, list):
        errors = []
        for item in raw_errors:
            if isinstance(item, dict):
                index = item.get("index")
                errors.append(
                    ValidationError(
                        index=index if isinstance(index, int) and not isinstance(index, bool) else -1,
                        message=_text(item.get("message", "")),
                        code=_text(item.get("code", "")),
                    )
                )
    return BatchResponse(
        status=status if isinstance(status, str) else "ok",
        accepted=accepted,
        failed=failed,
        errors=errors,
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, whatever its ``__str__`` does."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except BaseException:
        text = ""
    return f"{name}: {text}" if text else name


# 800 bytes hold 200 characters of any UTF-8; enough to name the problem.
_SNIPPET_CHARS = 200


class Log(Protocol):
    """What the sender needs of a logger (a ``logging.Logger``, or the client's safe wrapper)."""

    def isEnabledFor(self, level: int) -> bool: ...  # noqa: N802 - logging's name

    def debug(self, msg: str, *args: Any) -> None: ...

    def exception(self, msg: str, *args: Any) -> None: ...


class Sender:
    """Delivers one request body under the retry policy; shared by every lane.

    A 429 or 503 pauses every lane: the pause is kept here, and each attempt
    of any :meth:`deliver` first waits it out (docs/design.md, "Retries").
    """

    def __init__(
        self,
        transport: Transport,
        policy: RetryPolicy,
        logger: Log,
        secret: str,
    ) -> None:
        self.transport = transport
        self.policy = policy
        self.logger = logger
        self._secret = secret
        # Monotonic instant; written without a lock (a forked child must never
        # find one held). Two lanes racing may keep the shorter of two pauses.
        self._pause_until = 0.0

    def __repr__(self) -> str:
        return f"<Sender {self.policy}>"

    def paused(self) -> float:
        """Seconds until the shared pause ends (0 if none)."""
        return max(self._pause_until - monotonic(), 0.0)

    def _pause(self, seconds: float) -> None:
        until = monotonic() + seconds
        if until > self._pause_until:
            self._pause_until = until

    def _scrub(self, text: str) -> str:
        if self._secret and self._secret in text:
            text = text.replace(self._secret, "<write key>")
        return text

    def _snippet(self, data: bytes) -> str:
        # Decoded with room for a key so that no key is cut in half before scrubbing.
        text = data[: 4 * _SNIPPET_CHARS + 4 * len(self._secret)].decode("utf-8", "replace")
        text = self._scrub(text)
        return " ".join(text[:_SNIPPET_CHARS].split())

    def deliver(
        self,
        body: bytes,
        events: Sequence[Event],
        deadline: Deadline,
        interrupt: threading.Event,
        on_failed_attempt: Optional[Callable[[str, bool], None]] = None,
        meanwhile: Optional[Callable[[], None]] = None,
    ) -> BatchResponse:
        """POST ``body`` until it succeeds, fails permanently, attempts run out or waiting stops.

        Each wait (between attempts, and for the shared pause) lasts at most
        until ``deadline`` and ends early when ``interrupt`` is set; delivery
        then stops with the last failure. ``interrupt`` cuts waits only: an
        attempt not preceded by a wait is still made. ``on_failed_attempt(cause,
        will_retry)`` is called after every failed attempt. Raises only
        :class:`SendError`, with no exception chained to it. ``meanwhile``
        goes to the HTTP transport, which calls it while the server works
        (see :meth:`HttpTransport.post`); other transports never call it.
        """
        n = len(events)
        overlap = meanwhile if isinstance(self.transport, HttpTransport) else None
        status: Optional[int] = None
        cause = "no attempt made before the deadline"
        attempts = max(self.policy.max_attempts, 1)
        attempt = 0
        stopped = ""
        while True:
            pause = self._pause_until - monotonic()
            if pause > 0 and not self._wait(pause, deadline, interrupt):
                stopped = "retrying was stopped" if interrupt.is_set() else "the deadline passed"
                break
            if deadline.expired():
                stopped = "the deadline passed"
                break
            attempt += 1
            retry_after: Optional[float] = None
            permanent = False
            try:
                if overlap is not None:
                    resp = cast(HttpTransport, self.transport).post(body, deadline, overlap)
                else:
                    resp = self.transport.post(body, deadline)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # the network stack, or anything raised from inside it
                status = None
                cause = self._scrub(_describe(exc))
            else:
                status = resp.status
                if 200 <= status <= 299:
                    return self._accepted(resp.body, n)
                snippet = self._snippet(resp.body)
                cause = f"HTTP {status}" + (f": {snippet}" if snippet else "")
                if not is_transient(status):
                    permanent = True
                elif status in (429, 503):
                    try:
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    except Exception:
                        retry_after = None
            will_retry = not permanent and attempt < attempts
            self._failed(on_failed_attempt, cause, will_retry, attempt, attempts)
            if permanent:
                raise SendError(
                    f"Failed to send {n} event(s): {cause} (rejected, not retried)",
                    events,
                    reason="permanent_error",
                    status=status,
                )
            if not will_retry:
                break
            delay = self.policy.delay(attempt)
            if status in (429, 503):
                if retry_after is not None:
                    delay = retry_after
                self._pause(delay)
            if not self._wait(delay, deadline, interrupt):
                stopped = "retrying was stopped" if interrupt.is_set() else "the deadline passed"
                break
        how = f"{stopped} after {attempt} attempt(s)" if stopped else f"after {attempt} attempt(s)"
        raise SendError(
            f"Failed to send {n} event(s): {cause} ({how})", events, reason="retries_exhausted", status=status
        )

    def _accepted(self, data: bytes, n: int) -> BatchResponse:
        resp = parse_response(data, n)
        if resp.errors and self._secret:
            # A server may echo the key in a rejection; it must reach no log.
            for err in resp.errors:
                err.message = self._scrub(err.message)
                err.code = self._scrub(err.code)
        return resp

    def _failed(
        self,
        hook: Optional[Callable[[str, bool], None]],
        cause: str,
        will_retry: bool,
        attempt: int,
        attempts: int,
    ) -> None:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug(
                "attempt %d/%d failed: %s%s", attempt, attempts, cause, "; will retry" if will_retry else ""
            )
        if hook is not None:
            try:
                hook(cause, will_retry)
            except Exception:
                self.logger.exception("on_failed_attempt hook raised")

    @staticmethod
    def _wait(seconds: float, deadline: Deadline, interrupt: threading.Event) -> bool:
        """Wait ``seconds`` within the deadline; False if interrupted or the deadline came first."""
        left = deadline.remaining()
        if interrupt.wait(min(seconds, left, threading.TIMEOUT_MAX)):
            return False
        return seconds < left or not deadline.expired()
