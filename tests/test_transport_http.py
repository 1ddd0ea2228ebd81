"""HttpTransport, the HTTP/1.1 client: framing, keep-alive, the pool, deadlines, TLS, secrets.

Every request goes through real sockets to loopback servers (tests/servers.py);
nothing of our HTTP layer is replaced. Time bounds are generous: they tell a
bounded attempt from an unbounded one, not fast from slow.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List

import pytest

from klime._deadline import Deadline
from klime._transport import HttpTransport, Response

from .servers import (
    CA_CERT,
    LOOPBACK_CERT,
    OTHER_NAME_CERT,
    RawRequest,
    TlsFront,
    Wire,
    WireServer,
    default_behaviour,
    drop_connections,
    refused_url,
    response_bytes,
    scripted,
)

pytestmark = pytest.mark.usefixtures("no_ambient_proxy")  # loopback only


KEY = "wk_live_SECRET-123"
BODY = json.dumps({"batch": [{"type": "track", "event": "A", "userId": "u1"}]}).encode()
OK = json.dumps({"status": "ok", "accepted": 1, "failed": 0}).encode()  # as default_behaviour answers


@pytest.fixture
def trust_test_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the test CA the default trust store, as an admin would with SSL_CERT_FILE."""
    cafile = tmp_path / "ca.pem"
    cafile.write_text(CA_CERT)
    monkeypatch.setenv("SSL_CERT_FILE", str(cafile))


def never() -> Deadline:
    return Deadline.never()


def transport(url: str, timeout: float = 5.0) -> HttpTransport:
    return HttpTransport(url, KEY, timeout)


# --- the request on the wire ------------------------------------------------------


def test_request_line_headers_and_body(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer())
    resp = closing(transport(server.url)).post(BODY, never())
    assert isinstance(resp, Response)
    assert resp.status == 200
    assert json.loads(resp.body) == {"status": "ok", "accepted": 1, "failed": 0}
    assert resp.headers.get("content-type") == "application/json"  # case-insensitive
    [req] = server.requests
    assert (req.method, req.path, req.body) == ("POST", "/v1/batch", BODY)
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["content-length"] == str(len(BODY))
    assert req.headers["host"] == f"127.0.0.1:{server.port}"
    assert req.headers["user-agent"].startswith("klime-python/")


@pytest.mark.parametrize(("suffix", "path"), [("", "/v1/batch"), ("/", "/v1/batch"), ("/in/", "/in/v1/batch")])
def test_endpoint_path_joins_without_double_slash(suffix: str, path: str, closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer())
    closing(transport(server.url + suffix)).post(BODY, never())
    assert [r.path for r in server.requests] == [path]


def test_large_body_is_sent_whole(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(lambda req: (200, str(len(req.body)).encode())))
    body = json.dumps({"batch": [{"i": i, "x": "y" * 5000} for i in range(400)]}).encode()
    resp = closing(transport(server.url)).post(body, never())
    assert int(resp.body) == len(body) > 2_000_000


# --- framing of the answer ----------------------------------------------------------


def test_chunked_answer_with_extensions_and_trailers(closing: Callable[[Any], Any]) -> None:
    chunked = b"5;ext=1\r\n" + OK[:5] + b"\r\n" + b"%x\r\n" % (len(OK) - 5) + OK[5:] + b"\r\n0\r\nX-Trailer: t\r\n\r\n"
    answer = response_bytes(200, chunked, {"Transfer-Encoding": "chunked"}, length=False)
    server = closing(WireServer(scripted(Wire(answer), Wire(answer, drip=0.0005))))
    t = closing(transport(server.url))
    for _ in range(3):
        resp = t.post(BODY, never())
        assert (resp.status, resp.body) == (200, OK)
    assert server.connections == 1, "a chunked answer leaves the connection reusable"


def test_close_delimited_answer(closing: Callable[[Any], Any]) -> None:
    answer = response_bytes(200, OK, {"Connection": "close"}, length=False)
    server = closing(WireServer(scripted(Wire(answer, close=True), Wire(answer, close=True))))
    t = closing(transport(server.url))
    for _ in range(3):
        assert t.post(BODY, never()).body == OK
    assert [r.connection for r in server.requests] == [0, 1, 2]


def test_http10_answer_without_length_reads_to_close(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(scripted(Wire(b"HTTP/1.0 202 Accepted\r\n\r\n" + OK, close=True))))
    t = closing(transport(server.url))
    resp = t.post(BODY, never())
    assert (resp.status, resp.body) == (202, OK)
    assert server.connections == 1
    assert t.post(BODY, never()).status == 200
    assert server.connections == 2, "an HTTP/1.0 answer without keep-alive is not reused"


def test_interim_100_continue_is_skipped(closing: Callable[[Any], Any]) -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + response_bytes(200, OK)
    server = closing(WireServer(scripted(Wire(answer))))
    t = closing(transport(server.url))
    assert t.post(BODY, never()).body == OK
    assert t.post(BODY, never()).status == 200
    assert server.connections == 1


def test_no_body_statuses_and_folded_headers(closing: Callable[[Any], Any]) -> None:
    answer = b"HTTP/1.1 204 No Content\r\nX-Long: part one\r\n  part two\r\nRetry-After: 3\r\n\r\n"
    server = closing(WireServer(scripted(Wire(answer))))
    t = closing(transport(server.url))
    resp = t.post(BODY, never())
    assert (resp.status, resp.body) == (204, b"")
    assert resp.headers["x-long"] == "part one part two"
    assert resp.headers.get("Retry-After") == "3"
    assert t.post(BODY, never()).status == 200
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    ],
)
def test_malformed_answer_is_an_http_exception(answer: bytes, closing: Callable[[Any], Any]) -> None:
    import http.client

    server = closing(WireServer(scripted(Wire(answer, close=True))))
    t = closing(transport(server.url))
    with pytest.raises(http.client.HTTPException):
        t.post(BODY, never())
    assert t.post(BODY, never()).status == 200, "the broken connection is not reused"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ("reset", ConnectionResetError),
        ("close", ConnectionError),
        (Wire(response_bytes(200, OK)[:-10], close=True), Exception),
    ],
)
def test_failures_of_a_fresh_connection_raise(reply: Any, error: type, closing: Callable[[Any], Any]) -> None:
    import http.client

    server = closing(WireServer(scripted(reply)))
    t = closing(transport(server.url))
    with pytest.raises((OSError, http.client.HTTPException)) as info:
        t.post(BODY, never())
    assert isinstance(info.value, error)
    assert len(server.requests) == 1, "a fresh connection's failure is not retried by the transport"
    assert t.post(BODY, never()).status == 200


def test_refused_connection_raises_connection_refused(closing: Callable[[Any], Any]) -> None:
    with pytest.raises(ConnectionRefusedError):
        closing(transport(refused_url())).post(BODY, never())


# --- the whole-attempt deadline (docs/design.md, "Deadlines") -------------------------


def test_dripping_answer_cannot_stretch_an_attempt(closing: Callable[[Any], Any]) -> None:
    """One byte every 50 ms would take ~6 s; request_timeout is 0.5 s for the whole attempt."""
    server = closing(WireServer(lambda req: Wire(response_bytes(200, OK, {"X-Pad": "p" * 40}), drip=0.05)))
    t = closing(transport(server.url, timeout=0.5))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        t.post(BODY, never())
    assert time.monotonic() - started < 2.5


def test_dripping_chunked_answer_is_bounded_too(closing: Callable[[Any], Any]) -> None:
    chunked = b"".join(b"1\r\n" + OK[i : i + 1] + b"\r\n" for i in range(len(OK))) + b"0\r\n\r\n"
    answer = response_bytes(200, chunked, {"Transfer-Encoding": "chunked"}, length=False)
    server = closing(WireServer(lambda req: Wire(answer, drip=0.02)))
    t = closing(transport(server.url, timeout=0.5))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        t.post(BODY, never())
    assert time.monotonic() - started < 2.5


def test_the_deadline_bounds_the_attempt_below_request_timeout(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(lambda req: "hang"))
    t = closing(transport(server.url, timeout=30.0))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        t.post(BODY, Deadline.after(0.3))
    assert time.monotonic() - started < 2.5
    with pytest.raises(TimeoutError):
        t.post(BODY, Deadline.after(0))  # already passed: not even a connection
    assert server.connections == 1


def test_hanging_server_times_out_and_the_connection_is_dropped(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(scripted("hang")))
    t = closing(transport(server.url, timeout=0.3))
    with pytest.raises(TimeoutError):
        t.post(BODY, never())
    assert t.post(BODY, never()).status == 200
    assert [r.connection for r in server.requests] == [0, 1]


def test_work_done_while_waiting_does_not_use_up_the_request_timeout(closing: Callable[[Any], Any]) -> None:
    """The sender's own work between writing and reading (``meanwhile``) is not the server's time."""
    server = closing(WireServer())
    t = closing(transport(server.url, timeout=0.2))
    calls: List[float] = []
    resp = t.post(BODY, never(), lambda: calls.append(time.sleep(0.5) or time.monotonic()))
    assert resp.status == 200 and resp.body == OK
    assert len(calls) == 1 and len(server.requests) == 1, "answered once, not retried"


def test_work_done_while_waiting_never_moves_the_callers_deadline(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(lambda req: "hang"))
    t = closing(transport(server.url, timeout=30.0))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        t.post(BODY, Deadline.after(0.6), lambda: time.sleep(0.2))
    assert time.monotonic() - started < 3.0


# --- keep-alive and stale connections ------------------------------------------------


def test_sequential_posts_share_one_connection(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer())
    t = closing(transport(server.url))
    for _ in range(20):
        assert t.post(BODY, never()).status == 200
    assert server.connections == 1
    assert t.connections == 1


def test_connection_close_header_makes_it_reconnect(closing: Callable[[Any], Any]) -> None:
    # The server keeps its end open; only the header says the connection is done.
    server = closing(WireServer(scripted((200, OK, {"Connection": "close"}))))
    t = closing(transport(server.url))
    for _ in range(4):
        assert t.post(BODY, never()).status == 200
    assert [r.connection for r in server.requests] == [0, 1, 1, 1]


def test_idle_connection_closed_by_the_server_is_replaced_at_once(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer())
    t = closing(transport(server.url))
    assert t.post(BODY, never()).status == 200
    assert drop_connections(server) == 1  # the server's idle timeout fires
    time.sleep(0.05)
    for _ in range(2):
        assert t.post(BODY, never()).status == 200
    assert server.connections == 2
    assert [r.connection for r in server.requests] == [0, 1, 1]


def test_used_connection_closed_without_an_answer_is_retried_once_on_a_new_one(
    closing: Callable[[Any], Any],
) -> None:
    server = closing(WireServer(scripted((200, OK), "close")))
    t = closing(transport(server.url))
    assert t.post(BODY, never()).status == 200
    assert t.post(BODY, never()).status == 200
    reqs = server.requests
    assert [r.connection for r in reqs] == [0, 0, 1]
    assert reqs[1].body == reqs[2].body


def test_a_fresh_connection_is_not_retried_twice(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(scripted((200, OK), "close", "close")))
    t = closing(transport(server.url))
    t.post(BODY, never())
    with pytest.raises(ConnectionError):
        t.post(BODY, never())
    assert len(server.requests) == 3


def test_partial_answer_on_a_reused_connection_is_not_resent(closing: Callable[[Any], Any]) -> None:
    """An answer had begun: the server has the request, so the transport does not send it again."""
    import http.client

    server = closing(WireServer(scripted((200, OK), Wire(response_bytes(200, OK)[:20], close=True))))
    t = closing(transport(server.url))
    t.post(BODY, never())
    with pytest.raises(http.client.HTTPException):
        t.post(BODY, never())
    assert len(server.requests) == 2


# --- the pool of connections (docs/design.md, "Connection pool") ------------------------


class Gate:
    """A behaviour that holds every request until ``n`` are in, so that they overlap."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=10)

    def __call__(self, req: RawRequest) -> Any:
        self.barrier.wait()
        return default_behaviour(req)


def post_concurrently(t: HttpTransport, n: int) -> List[int]:
    statuses: List[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(t.post(BODY, never()).status)) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(15)
    return statuses


def test_concurrent_posts_each_use_their_own_connection(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(Gate(4)))
    t = closing(transport(server.url))
    assert post_concurrently(t, 4) == [200] * 4
    assert server.connections == 4
    assert sorted(r.connection for r in server.requests) == [0, 1, 2, 3]
    assert t.connections == 4


def test_light_traffic_after_a_burst_stays_on_one_connection(closing: Callable[[Any], Any]) -> None:
    """LIFO: the most recently released connection is taken first."""
    gate = Gate(3)
    server = closing(WireServer(lambda req: gate(req) if len(server.requests) <= 3 else default_behaviour(req)))
    t = closing(transport(server.url))
    post_concurrently(t, 3)
    for _ in range(6):
        t.post(BODY, never())
    assert len({r.connection for r in server.requests[3:]}) == 1


def test_idle_spares_are_closed_keeping_the_most_recent(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(Gate(3)))
    t = closing(transport(server.url))
    t.spare_idle = 0.3
    post_concurrently(t, 3)
    assert t.connections == 3
    time.sleep(0.5)
    server.behaviour = default_behaviour
    t.post(BODY, never())  # closes the two spares idle too long
    assert server.wait_for_closed(2) == 2
    assert t.connections == 1
    assert server.connections == 3, "the post itself reused the kept connection"
    time.sleep(0.5)
    t.post(BODY, never())
    time.sleep(0.1)
    assert server.client_closed == 2, "the last connection is kept however long it idles"


def test_close_closes_idle_connections_and_later_posts_reconnect(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer())
    t = closing(transport(server.url))
    t.post(BODY, never())
    t.close()
    assert server.wait_for_closed(1) == 1
    assert t.post(BODY, never()).status == 200
    assert server.connections == 2


def test_close_during_a_post_closes_that_connection_when_it_ends(closing: Callable[[Any], Any]) -> None:
    release = threading.Event()
    server = closing(WireServer(lambda req: (release.wait(10), default_behaviour(req))[1]))
    t = closing(transport(server.url))
    th = threading.Thread(target=t.post, args=(BODY, never()))
    th.start()
    assert server.wait_for_requests(1)
    t.close()
    release.set()
    th.join(10)
    assert server.wait_for_closed(1) == 1
    assert t.connections == 0


def test_after_fork_forgets_connections_without_writing_to_them(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer())
    t = closing(transport(server.url))
    t.post(BODY, never())
    old_lock = t._lock
    t.after_fork()
    assert t._lock is not old_lock
    assert t.connections == 0
    # The server saw the connection end with nothing more written on it.
    assert server.wait_for_closed(1) == 1
    assert len(server.requests) == 1
    assert t.post(BODY, never()).status == 200
    assert server.connections == 2


# --- TLS, verified with the system defaults ---------------------------------------------


def test_tls_context_verifies_certificates_and_hostnames() -> None:
    ctx = HttpTransport("https://ingest.klime.invalid", KEY, 1.0)._ssl
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True


def test_certificate_trusted_by_the_system_defaults_is_accepted(
    tmp_path: Path, trust_test_ca: None, closing: Callable[[Any], Any]
) -> None:
    server = closing(WireServer())
    front = closing(TlsFront(server, LOOPBACK_CERT, tmp_path))
    t = closing(transport(front.url))
    for _ in range(3):
        assert t.post(BODY, never()).status == 200
    assert len(server.requests) == 3
    assert front.handshakes == 1, "one kept-alive TLS connection"


def test_untrusted_certificate_is_refused(tmp_path: Path, closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer())
    front = closing(TlsFront(server, LOOPBACK_CERT, tmp_path))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        closing(transport(front.url)).post(BODY, never())
    assert server.requests == [], "nothing is sent over an unverified connection"


def test_certificate_for_another_name_is_refused(
    tmp_path: Path, trust_test_ca: None, closing: Callable[[Any], Any]
) -> None:
    server = closing(WireServer())
    front = closing(TlsFront(server, OTHER_NAME_CERT, tmp_path))
    with pytest.raises(ssl.SSLCertVerificationError, match=r"(?i)mismatch"):
        closing(transport(front.url)).post(BODY, never())
    assert server.requests == []


def test_stale_tls_connection_is_replaced_transparently(
    tmp_path: Path, trust_test_ca: None, closing: Callable[[Any], Any]
) -> None:
    server = closing(WireServer())
    front = closing(TlsFront(server, LOOPBACK_CERT, tmp_path))
    t = closing(transport(front.url))
    t.post(BODY, never())
    front.drop()  # the load balancer's idle timeout
    time.sleep(0.05)
    assert t.post(BODY, never()).status == 200
    assert front.handshakes == 2
    assert len(server.requests) == 2


def test_tls_handshake_to_a_silent_server_is_bounded(closing: Callable[[Any], Any]) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never speaks TLS
    closing(listener)
    t = closing(transport(f"https://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        t.post(BODY, never())
    assert time.monotonic() - started < 2.5


# --- the write key stays out of tracebacks (docs/design.md, "Secrets") ---------------------


def formatted_with_locals(exc: BaseException) -> str:
    """The traceback with every frame's locals, leaving out this test module's own frames."""
    tb = traceback.TracebackException.from_exception(exc, capture_locals=True)
    tb.stack = traceback.StackSummary.from_list([f for f in tb.stack if f.filename != __file__])
    return "".join(tb.format())


@pytest.mark.parametrize("reply", ["reset", "close", "hang"])
def test_failing_send_keeps_the_key_out_of_frame_locals(reply: str, closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer(scripted((200, OK), reply, reply)))
    t = closing(transport(server.url, timeout=0.3))
    t.post(BODY, never())
    with pytest.raises((OSError, Exception)) as info:
        t.post(BODY, never())
    text = formatted_with_locals(info.value)
    assert "_exchange" in text, "the frames were captured"
    assert KEY not in text
    assert repr(t._head) == "<hidden>"
    assert KEY not in repr(t)


def test_failing_tls_send_keeps_the_key_out_of_frame_locals(
    tmp_path: Path, trust_test_ca: None, closing: Callable[[Any], Any]
) -> None:
    server = closing(WireServer())
    front = closing(TlsFront(server, LOOPBACK_CERT, tmp_path))
    t = closing(transport(front.url))
    t.post(BODY, never())
    # A big body into a connection the other side has just closed: the send itself fails.
    front.drop()
    server.close()
    time.sleep(0.05)
    big = b"x" * 4_000_000
    with pytest.raises(OSError) as info:
        t.post(big, never())
    assert KEY not in formatted_with_locals(info.value)


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_an_absurdly_large_answer_is_not_kept_in_memory(framing: str, closing: Callable[[Any], Any]) -> None:
    import http.client

    big = b"x" * (5 * 1024 * 1024)
    if framing == "length":
        answer = Wire(response_bytes(200, big), close=True)
    elif framing == "chunked":
        body = b"".join(
            b"%x\r\n" % len(big[i : i + 65536]) + big[i : i + 65536] + b"\r\n" for i in range(0, len(big), 65536)
        )
        answer = Wire(
            response_bytes(200, body + b"0\r\n\r\n", {"Transfer-Encoding": "chunked"}, length=False), close=True
        )
    else:
        answer = Wire(response_bytes(200, big, length=False), close=True)
    server = closing(WireServer(scripted(answer)))
    t = closing(transport(server.url))
    with pytest.raises(http.client.HTTPException, match="too large"):
        t.post(BODY, never())
    assert t.post(BODY, never()).status == 200
