"""The HTTP layer and the retry policy, against real servers on loopback.

Covers SPEC 1 (status classes, retries, Retry-After, 2xx bodies, headers)
and SPEC 3.4 (keep-alive, reconnects, proxies from the environment, TLS
verification). Nothing here replaces our own HTTP code: every request goes
through ``http.client`` to a socket. Waits between retries are either short
real ones (``retry_initial_delay=10`` ms) or, where only their length
matters, recorded through the ``wait`` hook the Sender already takes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

import pytest
from freezegun import freeze_time

from klime import BatchResponse, KlimeClient, SendError, ValidationError, __version__
from klime._event import Event, prepare_batch
from klime._transport import (
    MAX_BACKOFF,
    MAX_RETRY_AFTER,
    Sender,
    Transport,
    backoff_delay,
    parse_retry_after,
)

from .conftest import Recorder
from .servers import Collector, RawRequest, RawServer, Reply, default_behaviour, drop_connections, refused_url

LOG = logging.getLogger("klime.test")

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


# --- helpers -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_ambient_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback tests must not be routed through a proxy the machine happens to set."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    # urllib ignores HTTP_PROXY when this CGI variable is set (httpoxy).
    monkeypatch.delenv("REQUEST_METHOD", raising=False)


def scripted(*replies: Reply) -> Callable[[RawRequest], Reply]:
    """A RawServer behaviour: ``replies`` in order, then the default 200."""
    pending = list(replies)
    lock = threading.Lock()

    def behaviour(req: RawRequest) -> Reply:
        with lock:
            reply = pending.pop(0) if pending else None
        return default_behaviour(req) if reply is None else reply

    return behaviour


def ids(events: List[Dict[str, Any]]) -> List[str]:
    return [ev["messageId"] for ev in events]


def raw_ids(req: RawRequest) -> List[str]:
    return ids(req.json()["batch"])


def batch_of(n: int = 1) -> Tuple[bytes, List[Event]]:
    """A ready request body of ``n`` track events, as the flusher would build it."""
    events = [Event("track", "Sent", "u1", None, {"i": i}, None, time.time()) for i in range(n)]
    prep = prepare_batch(events)
    return prep.body, prep.events


class Waits:
    """The Sender's ``wait`` hook: remembers each requested delay and returns at once."""

    def __init__(self, keep_going: bool = True) -> None:
        self.delays: List[float] = []
        self.keep_going = keep_going

    def __call__(self, seconds: float) -> bool:
        self.delays.append(seconds)
        return self.keep_going


def sender(url: str, attempts: int = 3, initial: float = 0.01, timeout: float = 2.0) -> Sender:
    return Sender(Transport(url, "test-write-key", timeout), attempts, initial, LOG)


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


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Register test servers to be closed at teardown."""
    servers: List[Any] = []

    def add(server: Any) -> Any:
        servers.append(server)
        return server

    yield add
    for s in servers:
        s.close()


@pytest.fixture
def trust_test_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the test CA the default trust store, as an admin would with SSL_CERT_FILE."""
    cafile = tmp_path / "ca.pem"
    cafile.write_text(CA_CERT)
    monkeypatch.setenv("SSL_CERT_FILE", str(cafile))


# --- 1. attempts are counted in all ---------------------------------------------


@pytest.mark.parametrize("attempts", [1, 3, 5])
def test_retry_max_attempts_counts_every_attempt(
    attempts: int, collector: Collector, make_client: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    for _ in range(attempts + 2):
        collector.respond(500, "down")
    client = make_client(collector.url, retry_max_attempts=attempts)
    client.track("Report Generated", user_id="u1")
    assert client.flush(timeout=10) is False
    assert len(collector.requests) == attempts
    [(error, events)] = recorder.errors
    assert isinstance(error, SendError)
    assert error.reason == "retries_exhausted"
    assert error.status == 500
    assert [ev.messageId for ev in events] == ids(collector.events[:1])
    assert recorder.successes == []
    time.sleep(0.1)
    assert len(collector.requests) == attempts, "nothing is sent after the batch was reported"


# --- 2. which failures are retried ---------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 410, 413, 422, 451, 301])
def test_permanent_failure_is_never_retried(
    status: int, collector: Collector, make_client: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    collector.respond(status, {"error": "no"})
    client = make_client(collector.url, retry_max_attempts=5)
    client.track("Report Generated", user_id="u1")
    assert client.flush(timeout=10) is False
    assert len(collector.requests) == 1
    [(error, events)] = recorder.errors
    assert isinstance(error, SendError)
    assert (error.reason, error.status) == ("permanent_error", status)
    assert str(status) in error.message
    assert len(events) == 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_status_is_retried(
    status: int, collector: Collector, make_client: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    collector.respond(status, "try later")
    client = make_client(collector.url, retry_max_attempts=2)
    client.track("Report Generated", user_id="u1")
    assert client.flush(timeout=10) is True
    assert len(collector.requests) == 2
    assert ids(collector.requests[0].events) == ids(collector.requests[1].events)
    assert recorder.errors == []
    assert [r.accepted for r in recorder.successes] == [1]


@pytest.mark.parametrize("failure", ["reset", "close", "half", "slow:1.5"])
def test_transport_failure_is_retried(
    failure: str,
    raw_servers: Callable[..., RawServer],
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    """The server read the request, then: RST / closed / half an answer / no answer in time."""
    server = raw_servers(scripted(failure))
    client = make_client(server.url, retry_max_attempts=2, request_timeout=300)
    client.track("Report Generated", user_id="u1")
    client.track("Report Viewed", user_id="u1")
    assert client.flush(timeout=10) is True
    assert recorder.errors == []
    first, second = server.wait_for_requests(2)[:2]
    # An uncertain delivery is resent with the same ids, so the server can dedupe.
    assert raw_ids(first) == raw_ids(second)
    assert len(set(raw_ids(first))) == 2
    assert second.connection == 1, "a broken connection is not reused"


def test_refused_connection_is_retried_until_the_server_listens() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
    port = listener.getsockname()[1]
    received: List[str] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            msg = read_message(conn.makefile("rb"))
            assert msg is not None
            received.append(msg[0])
            body = b'{"status":"ok","accepted":1,"failed":0}'
            write_message(conn, "HTTP/1.1 200 OK", [("Content-Length", str(len(body)))], body)

    def wait(seconds: float) -> bool:
        if not waits:
            listener.listen(1)
            threading.Thread(target=serve_one, daemon=True).start()
        waits.append(seconds)
        return True

    waits: List[float] = []
    body, events = batch_of(1)
    try:
        resp = sender(f"http://127.0.0.1:{port}", attempts=3).deliver(body, events, wait)
    finally:
        listener.close()
    assert resp.accepted == 1
    assert received == ["POST /v1/batch HTTP/1.1"]
    assert len(waits) == 1


def test_refused_connection_exhausts_retries(make_client: Callable[..., KlimeClient], recorder: Recorder) -> None:
    client = make_client(refused_url(), retry_max_attempts=3)
    client.track("Report Generated", user_id="u1")
    assert client.flush(timeout=10) is False
    [(error, events)] = recorder.errors
    assert isinstance(error, SendError)
    assert error.reason == "retries_exhausted"
    assert error.status is None
    assert "3 attempt" in error.message
    assert "Connection" in error.message or "refused" in error.message.lower()
    assert len(events) == 1


def test_wait_cut_short_stops_retrying(collector: Collector) -> None:
    """A deadline or shutdown interrupting a retry wait ends delivery with the last failure."""
    collector.respond(503, "busy")
    waits = Waits(keep_going=False)
    body, events = batch_of(2)
    with pytest.raises(SendError) as info:
        sender(collector.url, attempts=5).deliver(body, events, waits)
    assert len(collector.requests) == 1
    assert (info.value.reason, info.value.status) == ("retries_exhausted", 503)
    assert info.value.events == events


# --- 3. what counts as success -------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, None),
        (201, None),
        (202, None),
        (204, ""),
        (200, "<html>thanks</html>"),
        (200, "null"),
        (202, '["not", "an", "object"]'),
        (200, "{broken json"),
    ],
)
def test_any_2xx_means_all_accepted(
    status: int,
    body: Optional[str],
    collector: Collector,
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    if body is None:
        collector.respond(status, {"status": "ok", "accepted": 3, "failed": 0})
    else:
        collector.respond(status, body)
    client = make_client(collector.url, max_batch_size=3, retry_max_attempts=3)
    for i in range(3):
        client.track("Report Generated", {"i": i}, user_id="u1")
    assert client.flush(timeout=10) is True
    assert len(collector.requests) == 1, "a 2xx is never retried"
    assert recorder.errors == []
    [resp] = recorder.successes
    assert isinstance(resp, BatchResponse)
    assert (resp.accepted, resp.failed) == (3, 0)


def test_partial_failure_warns_per_rejected_event_and_still_succeeds(
    collector: Collector,
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector.respond(
        200,
        {
            "status": "partial",
            "accepted": 2,
            "failed": 1,
            "errors": [{"index": 1, "message": "userId too long", "code": "invalid_user_id"}],
        },
    )
    caplog.set_level(logging.WARNING, logger="klime.test")
    client = make_client(collector.url, max_batch_size=3)
    for i in range(3):
        client.track("Report Generated", {"i": i}, user_id=f"u{i}")
    assert client.flush(timeout=10) is False, "one event was not delivered"
    assert len(collector.requests) == 1, "a partial success is not retried"
    sent = ids(collector.events)
    [resp] = recorder.successes
    assert resp == BatchResponse(
        status="partial",
        accepted=2,
        failed=1,
        errors=[ValidationError(index=1, message="userId too long", code="invalid_user_id")],
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    [line] = [w for w in warnings if sent[1] in w]
    assert "index=1" in line
    assert "invalid_user_id" in line
    assert not any(sent[0] in w or sent[2] in w for w in warnings), "accepted events are not named"


def test_partial_failure_without_details_is_still_logged(
    collector: Collector,
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector.respond(200, {"status": "partial", "accepted": 1, "failed": 1})
    caplog.set_level(logging.WARNING, logger="klime.test")
    client = make_client(collector.url, max_batch_size=2)
    client.track("A", user_id="u1")
    client.track("B", user_id="u1")
    client.flush(timeout=10)
    [resp] = recorder.successes
    assert (resp.accepted, resp.failed, resp.errors) == (1, 1, None)
    assert any("rejected 1 of 2" in r.getMessage() for r in caplog.records)


# --- 4. backoff and Retry-After --------------------------------------------------


def test_backoff_starts_at_the_initial_delay_and_doubles() -> None:
    no_jitter = lambda: 0.0  # noqa: E731
    assert [backoff_delay(n, 0.5, no_jitter) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(1, 1.0, no_jitter) == 1.0


def test_backoff_is_capped_at_16_seconds() -> None:
    assert MAX_BACKOFF == 16.0
    for rand in (lambda: 0.0, lambda: 0.5, lambda: 0.999999):
        assert backoff_delay(6, 1.0, rand) == 16.0
        assert backoff_delay(60, 1.0, rand) == 16.0
        assert backoff_delay(2000, 1.0, rand) == 16.0  # no OverflowError from 2.0 ** 1999
        assert backoff_delay(1, 100.0, rand) == 16.0


def test_backoff_jitter_stays_within_a_quarter_above_the_base() -> None:
    assert backoff_delay(2, 1.0, lambda: 0.999999) == pytest.approx(2.5, abs=1e-5)
    assert backoff_delay(3, 1.0, lambda: 0.5) == 4.5
    # Near the cap the jitter is cut off by the cap, not added on top of it.
    assert backoff_delay(5, 1.0, lambda: 0.999999) == 16.0
    samples = [backoff_delay(3, 0.1, __import__("random").random) for _ in range(500)]
    assert all(0.4 <= d <= 0.5 for d in samples)
    assert len(set(samples)) > 100, "clients must not retry in lockstep"


def test_delays_between_attempts_follow_the_backoff(collector: Collector) -> None:
    for _ in range(4):
        collector.respond(500)
    waits = Waits()
    body, events = batch_of(1)
    with pytest.raises(SendError):
        sender(collector.url, attempts=4, initial=0.2).deliver(body, events, waits)
    assert len(collector.requests) == 4
    assert len(waits.delays) == 3, "no wait after the last attempt"
    for delay, base in zip(waits.delays, (0.2, 0.4, 0.8)):
        assert base <= delay <= base * 1.25


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_replace_the_backoff(status: int, collector: Collector) -> None:
    collector.respond(status, "slow down", {"Retry-After": "7"})
    waits = Waits()
    body, events = batch_of(1)
    resp = sender(collector.url, attempts=3, initial=0.01).deliver(body, events, waits)
    assert resp.accepted == 1
    assert waits.delays == [7.0]


@pytest.mark.parametrize("status", [500, 502, 504, 408])
def test_retry_after_only_counts_on_429_and_503(status: int, collector: Collector) -> None:
    collector.respond(status, "no", {"Retry-After": "7"})
    waits = Waits()
    body, events = batch_of(1)
    sender(collector.url, attempts=3, initial=0.01).deliver(body, events, waits)
    [delay] = waits.delays
    assert 0.01 <= delay <= 0.0125


def test_retry_after_http_date_is_honoured(collector: Collector) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=100)
    collector.respond(429, "", {"Retry-After": format_datetime(when, usegmt=True)})
    waits = Waits()
    body, events = batch_of(1)
    sender(collector.url, attempts=2).deliver(body, events, waits)
    [delay] = waits.delays
    assert 95.0 <= delay <= 100.0


@pytest.mark.parametrize("garbage", ["soon", "", "Fri, 99 Foo 2015 25:00:00 GMT", "-5", "nan", "0x10"])
def test_garbage_retry_after_falls_back_to_the_backoff(garbage: str, collector: Collector) -> None:
    collector.respond(503, "", {"Retry-After": garbage})
    waits = Waits()
    body, events = batch_of(1)
    sender(collector.url, attempts=2, initial=0.01).deliver(body, events, waits)
    [delay] = waits.delays
    assert 0.01 <= delay <= 0.0125


def test_huge_retry_after_is_capped(collector: Collector) -> None:
    collector.respond(429, "", {"Retry-After": "86400"})
    collector.respond(503, "", {"Retry-After": "Fri, 01 Jan 2100 00:00:00 GMT"})
    waits = Waits()
    body, events = batch_of(1)
    sender(collector.url, attempts=3).deliver(body, events, waits)
    assert waits.delays == [MAX_RETRY_AFTER, MAX_RETRY_AFTER]
    assert 0 < MAX_RETRY_AFTER <= 3600


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_really_waited_for(
    status: int,
    raw_servers: Callable[..., RawServer],
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    arrivals: List[float] = []

    def behaviour(req: RawRequest) -> Reply:
        arrivals.append(time.monotonic())
        if len(arrivals) == 1:
            return (status, b"", {"Retry-After": "1"})
        return default_behaviour(req)

    server = raw_servers(behaviour)
    client = make_client(server.url, retry_initial_delay=10, retry_max_attempts=3)
    client.track("Report Generated", user_id="u1")
    assert client.flush(timeout=10) is True
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.9
    assert recorder.errors == []


def test_parse_retry_after_delta_seconds() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 5 ") == 5.0
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after("86400") == MAX_RETRY_AFTER


DATE_NOW = datetime(2015, 10, 21, 7, 27, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 21 Oct 2015 07:28:00 GMT",  # IMF-fixdate, the preferred form
        "Wednesday, 21-Oct-15 07:28:00 GMT",  # RFC 850, obsolete but to be accepted
        "Wed Oct 21 07:28:00 2015",  # asctime, obsolete, always GMT
    ],
)
def test_parse_retry_after_http_date_forms(value: str) -> None:
    assert parse_retry_after(value, now=DATE_NOW) == pytest.approx(60.0)


@pytest.fixture
def local_time_is_est() -> Iterator[None]:
    """The process's local timezone set to UTC-5 (a POSIX TZ string: no tz database needed)."""
    if not hasattr(time, "tzset"):
        pytest.skip("needs time.tzset")
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "EST+05"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


def test_parse_retry_after_http_date_ignores_the_local_timezone(local_time_is_est: None) -> None:
    """HTTP dates are GMT even when they do not say so (asctime form)."""
    assert time.localtime(DATE_NOW).tm_hour == 2, "the local timezone really is UTC-5"
    assert parse_retry_after("Wed Oct 21 07:28:00 2015", now=DATE_NOW) == pytest.approx(60.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=DATE_NOW) == pytest.approx(60.0)


def test_parse_retry_after_uses_the_current_time() -> None:
    with freeze_time("2015-10-21 07:27:30"):
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == pytest.approx(30.0)
    with freeze_time("2015-10-21 07:20:00"):
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == MAX_RETRY_AFTER == 300.0
        assert parse_retry_after("Wed, 21 Oct 2015 07:22:00 GMT") == pytest.approx(120.0)


def test_parse_retry_after_date_in_the_past_means_now() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=DATE_NOW + 3600) == 0.0


@pytest.mark.parametrize(
    "value", [None, "", "   ", "soon", "-5", "nan", "inf", "-inf", "12 seconds", "Fri, 99 Foo 2015 25:00:00 GMT"]
)
def test_parse_retry_after_garbage_is_none(value: Optional[str]) -> None:
    assert parse_retry_after(value, now=DATE_NOW) is None


# --- 5. one messageId per event, whatever happens ---------------------------------


def test_retries_resend_the_same_message_ids(
    collector: Collector, make_client: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    collector.respond(500)
    collector.respond(503)
    client = make_client(collector.url, max_batch_size=3, retry_max_attempts=3)
    for i in range(3):
        client.track("Report Generated", {"i": i}, user_id="u1")
    assert client.flush(timeout=10) is True
    attempts = [ids(r.events) for r in collector.requests]
    assert len(attempts) == 3
    assert attempts[0] == attempts[1] == attempts[2]
    assert len(set(attempts[0])) == 3
    assert [ev["properties"]["i"] for ev in collector.requests[2].events] == [0, 1, 2]


@pytest.mark.parametrize("failure", ["reset", "slow:1.5"])
def test_uncertain_delivery_keeps_the_message_id_on_sync_sends(
    failure: str, raw_servers: Callable[..., RawServer], make_client: Callable[..., KlimeClient]
) -> None:
    """The server read the request, then reset / did not answer within request_timeout."""
    server = raw_servers(scripted(failure))
    client = make_client(server.url, retry_max_attempts=3, request_timeout=300)
    resp = client.identify_sync("u1", {"plan": "pro"})
    assert resp.accepted == 1
    first, second = server.requests[:2]
    assert first.body == second.body, "the very same event, id and timestamp included"
    assert len(server.requests) == 2


def test_caller_message_id_survives_retries(collector: Collector, make_client: Callable[..., KlimeClient]) -> None:
    collector.respond(502)
    client = make_client(collector.url, retry_max_attempts=2)
    client.track_sync("Report Generated", user_id="u1", message_id="order-42-created")
    assert ids(collector.events) == ["order-42-created", "order-42-created"]


# --- 6. keep-alive ---------------------------------------------------------------


def test_sequential_batches_share_one_connection(
    raw_servers: Callable[..., RawServer], make_client: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    server = raw_servers()
    client = make_client(server.url, max_batch_size=5)
    for batch in range(8):
        for i in range(5):
            client.track("Report Generated", {"batch": batch, "i": i}, user_id="u1")
        assert client.flush(timeout=10) is True
    client.track_sync("Sync Sent", user_id="u1")
    assert len(server.requests) == 9
    assert server.connections == 1
    assert sum(r.accepted for r in recorder.successes) == 40


def test_connection_close_header_makes_the_client_reconnect(
    raw_servers: Callable[..., RawServer], make_client: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    ok = json.dumps({"status": "ok", "accepted": 1, "failed": 0}).encode()
    # The server keeps its end open; only the header says the connection is done.
    server = raw_servers(scripted((200, ok, {"Connection": "close"})))
    client = make_client(server.url, max_batch_size=1)
    for i in range(4):
        client.track("Report Generated", {"i": i}, user_id="u1")
        assert client.flush(timeout=10) is True
    assert [r.connection for r in server.requests] == [0, 1, 1, 1]
    assert recorder.errors == []


def test_server_closing_a_used_connection_without_answering(
    raw_servers: Callable[..., RawServer], make_client: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    ok = json.dumps({"status": "ok", "accepted": 1, "failed": 0}).encode()
    server = raw_servers(scripted((200, ok), "close"))
    # One attempt only: replacing a connection the server dropped is not a retry.
    client = make_client(server.url, max_batch_size=1, retry_max_attempts=1)
    for i in range(3):
        client.track("Report Generated", {"i": i}, user_id="u1")
        assert client.flush(timeout=10) is True
    reqs = server.requests
    assert [r.connection for r in reqs] == [0, 0, 1, 1]
    assert raw_ids(reqs[1]) == raw_ids(reqs[2])
    assert recorder.errors == []
    assert len(recorder.successes) == 3


@pytest.mark.parametrize("failure", ["half", "reset", "slow:1.5"])
def test_reconnects_after_an_error_and_keeps_the_new_connection(
    failure: str,
    raw_servers: Callable[..., RawServer],
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    ok = json.dumps({"status": "ok", "accepted": 1, "failed": 0}).encode()
    server = raw_servers(scripted((200, ok), failure))
    client = make_client(server.url, max_batch_size=1, retry_max_attempts=3, request_timeout=300)
    for i in range(5):
        client.track("Report Generated", {"i": i}, user_id="u1")
        assert client.flush(timeout=10) is True
    assert server.connections == 2
    assert [r.connection for r in server.requests] == [0, 0, 1, 1, 1, 1]
    assert recorder.errors == []
    delivered = [r.json()["batch"][0]["properties"]["i"] for r in server.requests]
    assert delivered == [0, 1, 1, 2, 3, 4]


def test_stale_idle_connection_is_replaced_transparently(
    raw_servers: Callable[..., RawServer], make_client: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    server = raw_servers()
    client = make_client(server.url, max_batch_size=2, retry_max_attempts=1)
    client.track("A", user_id="u1")
    client.track("B", user_id="u1")
    assert client.flush(timeout=10) is True
    assert drop_connections(server) == 1  # the server's idle timeout fires
    time.sleep(0.05)
    for _ in range(2):
        client.track("C", user_id="u1")
        client.track("D", user_id="u1")
        assert client.flush(timeout=10) is True
    assert recorder.errors == []
    assert sum(r.accepted for r in recorder.successes) == 6
    assert server.connections == 2
    assert [r.connection for r in server.requests] == [0, 1, 1]


def test_stale_connection_on_sync_send_is_replaced(
    raw_servers: Callable[..., RawServer], make_client: Callable[..., KlimeClient]
) -> None:
    server = raw_servers()
    client = make_client(server.url, retry_max_attempts=1)
    client.track_sync("A", user_id="u1")
    drop_connections(server)
    time.sleep(0.05)
    assert client.track_sync("B", user_id="u1").accepted == 1
    assert server.connections == 2


# --- 7. proxies from the environment, as urllib reads them --------------------------


@pytest.mark.parametrize("var", ["HTTP_PROXY", "http_proxy"])
def test_http_proxy_forwards_with_an_absolute_uri(
    var: str,
    monkeypatch: pytest.MonkeyPatch,
    closing: Callable[[Any], Any],
    collector: Collector,
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    proxy = closing(ForwardProxy())
    monkeypatch.setenv(var, proxy.url)
    client = make_client(collector.url, max_batch_size=2)
    for _ in range(2):
        client.track("A", user_id="u1")
        client.track("B", user_id="u1")
        assert client.flush(timeout=10) is True
    assert len(collector.events) == 4
    host = urlsplit(collector.url).netloc
    assert [line for line, _ in proxy.seen] == [f"POST http://{host}/v1/batch HTTP/1.1"] * 2
    _, headers = proxy.seen[0]
    assert headers["host"] == host
    assert headers["authorization"] == "Bearer test-write-key"
    assert "proxy-authorization" not in headers
    assert recorder.errors == []


@pytest.mark.parametrize(
    ("no_proxy", "via_proxy"),
    [
        ("example.com", True),
        ("localhost", False),
        ("example.com, localhost", False),
        (".example.com,localhost:1", True),
        ("localhost:{port}", False),
        ("*", False),
    ],
)
def test_no_proxy_bypasses_the_proxy_for_listed_hosts(
    no_proxy: str,
    via_proxy: bool,
    monkeypatch: pytest.MonkeyPatch,
    closing: Callable[[Any], Any],
    collector: Collector,
    make_client: Callable[..., KlimeClient],
) -> None:
    assert urlsplit(collector.url).hostname == "localhost"
    proxy = closing(ForwardProxy())
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy.format(port=urlsplit(collector.url).port))
    client = make_client(collector.url)
    client.track_sync("Report Generated", user_id="u1")
    assert len(collector.events) == 1
    assert len(proxy.seen) == (1 if via_proxy else 0)


def test_proxy_credentials_become_proxy_authorization(
    monkeypatch: pytest.MonkeyPatch,
    closing: Callable[[Any], Any],
    collector: Collector,
    make_client: Callable[..., KlimeClient],
) -> None:
    proxy = closing(ForwardProxy())
    monkeypatch.setenv("HTTP_PROXY", f"http://ann%40corp:p%3Ass@127.0.0.1:{proxy.port}")
    client = make_client(collector.url)
    client.track_sync("Report Generated", user_id="u1")
    [(_, headers)] = proxy.seen
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"ann@corp:p:ss").decode()
    assert "proxy-authorization" not in {k.lower() for k in collector.requests[0].headers}
    assert len(collector.events) == 1


def test_https_endpoint_ignores_http_proxy(monkeypatch: pytest.MonkeyPatch, closing: Callable[[Any], Any]) -> None:
    proxy = closing(ForwardProxy())
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert Transport("https://ingest.klime.invalid", "k", 1.0).proxy is None
    assert Transport("http://ingest.klime.invalid", "k", 1.0).proxy == ("127.0.0.1", proxy.port)


def test_https_proxy_gets_a_connect_and_failure_is_reported(
    monkeypatch: pytest.MonkeyPatch,
    closing: Callable[[Any], Any],
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    proxy = closing(ForwardProxy(tunnel=False))
    monkeypatch.setenv("HTTPS_PROXY", f"http://bob:hunter2@127.0.0.1:{proxy.port}")
    client = make_client("https://ingest.klime.invalid:8443", retry_max_attempts=2)
    client.track("Report Generated", user_id="u1")  # must not raise
    assert client.flush(timeout=10) is False
    lines = [line for line, _ in proxy.seen]
    assert len(lines) == 2
    assert all(line.startswith("CONNECT ingest.klime.invalid:8443 HTTP/1.") for line in lines)
    assert proxy.seen[0][1]["proxy-authorization"] == "Basic " + base64.b64encode(b"bob:hunter2").decode()
    [(error, events)] = recorder.errors
    assert isinstance(error, SendError)
    assert error.reason == "retries_exhausted"
    assert "502" in error.message
    assert len(events) == 1


def test_https_through_a_proxy_tunnel_end_to_end(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    trust_test_ca: None,
    closing: Callable[[Any], Any],
    raw_servers: Callable[..., RawServer],
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    server = raw_servers()
    front = closing(TlsFront(server, LOOPBACK_CERT, tmp_path))
    proxy = closing(ForwardProxy())
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    client = make_client(front.url, max_batch_size=1)
    for i in range(3):
        client.track("Report Generated", {"i": i}, user_id="u1")
        assert client.flush(timeout=10) is True
    [(line, _)] = proxy.seen
    assert line.startswith(f"CONNECT 127.0.0.1:{front.port} HTTP/1.")
    assert len(server.requests) == 3
    assert server.connections == 1, "the tunnel is kept alive too"
    assert recorder.errors == []


# --- 8. TLS ----------------------------------------------------------------------


def test_tls_context_verifies_certificates_and_hostnames(make_client: Callable[..., KlimeClient]) -> None:
    client = make_client("https://ingest.klime.invalid")
    ctx = client._sender.transport._ssl
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True


def test_untrusted_certificate_is_refused(
    tmp_path: Path,
    closing: Callable[[Any], Any],
    raw_servers: Callable[..., RawServer],
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    server = raw_servers()
    front = closing(TlsFront(server, LOOPBACK_CERT, tmp_path))
    client = make_client(front.url, retry_max_attempts=2)
    client.track("Report Generated", user_id="u1")
    assert client.flush(timeout=10) is False
    assert server.requests == [], "nothing is sent over an unverified connection"
    [(error, _)] = recorder.errors
    assert "certificate verify failed" in str(error).lower()


def test_certificate_trusted_by_the_system_defaults_is_accepted(
    tmp_path: Path,
    trust_test_ca: None,
    closing: Callable[[Any], Any],
    raw_servers: Callable[..., RawServer],
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    server = raw_servers()
    front = closing(TlsFront(server, LOOPBACK_CERT, tmp_path))
    client = make_client(front.url)
    client.track("Report Generated", user_id="u1")
    assert client.flush(timeout=10) is True
    assert client.track_sync("Sync Sent", user_id="u1").accepted == 1
    assert len(server.requests) == 2
    assert front.handshakes == 1, "one kept-alive TLS connection"
    assert recorder.errors == []


def test_certificate_for_another_name_is_refused(
    tmp_path: Path,
    trust_test_ca: None,
    closing: Callable[[Any], Any],
    raw_servers: Callable[..., RawServer],
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    server = raw_servers()
    front = closing(TlsFront(server, OTHER_NAME_CERT, tmp_path))
    client = make_client(front.url, retry_max_attempts=1)
    client.track("Report Generated", user_id="u1")
    assert client.flush(timeout=10) is False
    assert server.requests == []
    [(error, _)] = recorder.errors
    assert "mismatch" in str(error).lower()


def test_stale_tls_connection_is_replaced_transparently(
    tmp_path: Path,
    trust_test_ca: None,
    closing: Callable[[Any], Any],
    raw_servers: Callable[..., RawServer],
    make_client: Callable[..., KlimeClient],
    recorder: Recorder,
) -> None:
    server = raw_servers()
    front = closing(TlsFront(server, LOOPBACK_CERT, tmp_path))
    client = make_client(front.url, max_batch_size=1, retry_max_attempts=1)
    client.track("A", user_id="u1")
    assert client.flush(timeout=10) is True
    front.drop()  # the load balancer's idle timeout
    time.sleep(0.05)
    client.track("B", user_id="u1")
    assert client.flush(timeout=10) is True
    assert recorder.errors == []
    assert front.handshakes == 2
    assert len(server.requests) == 2


# --- 9. *_sync: same sender, same policy -----------------------------------------


def test_track_sync_retries_then_returns_the_response(
    collector: Collector, make_client: Callable[..., KlimeClient], recorder: Recorder
) -> None:
    collector.respond(500, "oops")
    client = make_client(collector.url, retry_max_attempts=3)
    resp = client.track_sync("Report Generated", {"plan": "pro"}, user_id="u1")
    assert isinstance(resp, BatchResponse)
    assert (resp.status, resp.accepted, resp.failed) == ("ok", 1, 0)
    assert len(collector.requests) == 2
    assert recorder.errors == [] and recorder.successes == [], "sync sends do not call the callbacks"


def test_track_sync_raises_when_retries_are_exhausted(
    collector: Collector, make_client: Callable[..., KlimeClient]
) -> None:
    for _ in range(5):
        collector.respond(500, "oops")
    client = make_client(collector.url, retry_max_attempts=3)
    with pytest.raises(SendError) as info:
        client.track_sync("Report Generated", user_id="u1")
    err = info.value
    assert (err.reason, err.status) == ("retries_exhausted", 500)
    assert len(collector.requests) == 3
    [ev] = err.events
    assert ev.event == "Report Generated"
    assert ev.messageId == collector.events[0]["messageId"]
    assert "500" in err.message


def test_track_sync_raises_at_once_on_a_permanent_error(
    collector: Collector, make_client: Callable[..., KlimeClient]
) -> None:
    collector.respond(400, {"error": "bad batch"})
    client = make_client(collector.url, retry_max_attempts=5, retry_initial_delay=5000)
    started = time.monotonic()
    with pytest.raises(SendError) as info:
        client.identify_sync("u1", {"plan": "pro"})
    assert time.monotonic() - started < 3
    assert (info.value.reason, info.value.status) == ("permanent_error", 400)
    assert len(collector.requests) == 1
    assert [ev.userId for ev in info.value.events] == ["u1"]


def test_group_sync_uses_the_backoff_of_the_client(
    raw_servers: Callable[..., RawServer], make_client: Callable[..., KlimeClient]
) -> None:
    arrivals: List[float] = []

    def behaviour(req: RawRequest) -> Reply:
        arrivals.append(time.monotonic())
        return (503, b"") if len(arrivals) < 3 else default_behaviour(req)

    server = raw_servers(behaviour)
    client = make_client(server.url, retry_max_attempts=3, retry_initial_delay=200)
    assert client.group_sync("org1", {"name": "Acme"}).accepted == 1
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(gaps) == 2
    assert 0.19 <= gaps[0] < 1.5
    assert 0.39 <= gaps[1] < 2.0


# --- 10. headers and the request line ----------------------------------------------


def test_request_headers(collector: Collector, make_client: Callable[..., KlimeClient]) -> None:
    client = make_client(collector.url)
    client.track_sync("Report Generated", user_id="u1")
    headers = {k.lower(): v for k, v in collector.requests[0].headers.items()}
    assert headers["authorization"] == "Bearer test-write-key"
    assert headers["content-type"] == "application/json"
    ua = headers["user-agent"]
    assert "klime" in ua.lower()
    assert __version__ in ua
    assert collector.requests[0].path == "/v1/batch"


@pytest.mark.parametrize(
    ("suffix", "path"), [("/", "/v1/batch"), ("/ingest", "/ingest/v1/batch"), ("/ingest/", "/ingest/v1/batch")]
)
def test_endpoint_path_joins_without_double_slash(
    suffix: str, path: str, raw_servers: Callable[..., RawServer], make_client: Callable[..., KlimeClient]
) -> None:
    server = raw_servers()
    client = make_client(server.url + suffix)
    client.track_sync("Report Generated", user_id="u1")
    assert [r.path for r in server.requests] == [path]
    assert server.requests[0].method == "POST"
