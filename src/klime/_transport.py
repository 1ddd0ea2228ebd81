"""HTTP to the ingestion API over the standard library, and the retry policy.

:class:`Transport` makes one POST at a time over a kept-alive
``http.client`` connection (through a proxy when the environment says so).
:class:`Sender` turns a request body into a :class:`BatchResponse` or a
:class:`SendError`, retrying transient failures as SPEC 1 describes.
"""

from __future__ import annotations

import base64
import contextlib

# http.client encodes host names with the idna codec on the first connect;
# importing it with klime keeps that one-off ~10 ms of CPU off the flusher's
# first send.
import encodings.idna  # noqa: F401
import http.client
import json
import logging
import platform
import random
import ssl
import threading
import time
import urllib.request
from datetime import timezone
from email.message import Message
from email.utils import parsedate_to_datetime
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union
from urllib.parse import unquote, urlsplit

from ._event import Event
from ._version import __version__
from .types import BatchResponse, SendError, ValidationError

MAX_BACKOFF = 16.0
# A Retry-After beyond this is taken as this: one misconfigured header must
# not stall delivery for hours while the queue overflows.
MAX_RETRY_AFTER = 300.0
USER_AGENT = f"klime-python/{__version__} (Python {platform.python_version()})"

Connection = Union[http.client.HTTPConnection, http.client.HTTPSConnection]


def is_transient(status: int) -> bool:
    """408, 429 and 5xx are worth retrying; every other non-2xx is final."""
    return status in (408, 429) or 500 <= status <= 599


def backoff_delay(attempt: int, initial: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    ``initial`` doubling per attempt, capped at 16 s, plus up to 25% jitter
    (still capped) so that many clients do not retry in lockstep. The module
    ``random`` is used because CPython reseeds it in a forked child.
    """
    # The exponent is bounded: 2.0 ** 1024 overflows, and a large
    # retry_max_attempts gets there.
    base = min(initial * (2.0 ** min(attempt - 1, 64)), MAX_BACKOFF)
    return min(base * (1.0 + 0.25 * rand()), MAX_BACKOFF)


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """A ``Retry-After`` header (delta-seconds or HTTP-date) -> seconds, or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
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
    except ValueError:
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
                        index=index if isinstance(index, int) else -1,
                        message=str(item.get("message", "")),
                        code=str(item.get("code", "")),
                    )
                )
    return BatchResponse(
        status=status if isinstance(status, str) else "ok",
        accepted=accepted,
        failed=failed,
        errors=errors,
    )


def log_rejected(logger: logging.Logger, resp: BatchResponse, events: Sequence[Event]) -> List[Event]:
    """Log one warning per event the server rejected in a 2xx; returns those events.

    When the server counts failures without saying which, the whole batch is
    returned, since none of it can be confirmed.
    """
    if resp.failed <= 0:
        return []
    rejected: List[Event] = []
    for err in resp.errors or []:
        ev = events[err.index] if 0 <= err.index < len(events) else None
        logger.warning(
            "klime: event rejected by the server: index=%d code=%s message=%s messageId=%s",
            err.index,
            err.code,
            err.message,
            ev.messageId if ev is not None else "?",
        )
        if ev is not None:
            rejected.append(ev)
    if not rejected:
        logger.warning(
            "klime: the server rejected %d of %d event(s) without saying which", resp.failed, len(events)
        )
        rejected = list(events)
    return rejected


class Transport:
    """POSTs request bodies to ``{endpoint}/v1/batch``.

    Holds one idle keep-alive connection; a concurrent sender (a ``*_sync``
    call while the flusher is busy) opens a second one rather than waiting,
    and the spare is closed when both are done. Proxy settings are read from
    the environment once, the way ``urllib`` reads them.
    """

    def __init__(self, endpoint: str, write_key: str, timeout: float) -> None:
        parts = urlsplit(endpoint.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"endpoint must be an http:// or https:// URL with a host, got {endpoint!r}"
            )
        self.endpoint = endpoint
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        path = parts.path.rstrip("/") + "/v1/batch"
        self._timeout = timeout
        self._headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {write_key}",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        # NO_PROXY is matched against host[:port] as written, as urllib does,
        # so that an entry like "localhost:8080" works.
        self._proxy = self._proxy_for(parts.scheme, parts.netloc.rpartition("@")[2])
        host_header = self._host if ":" not in self._host else f"[{self._host}]"
        default_port = 443 if self._https else 80
        if self._port != default_port:
            host_header = f"{host_header}:{self._port}"
        # Through a plain-HTTP proxy the request line carries the absolute URL.
        self._target = path if (self._https or self._proxy is None) else f"http://{host_header}{path}"
        if self._proxy is not None and self._proxy[2] and not self._https:
            self._headers["Proxy-Authorization"] = self._proxy[2]
        self._ssl = ssl.create_default_context() if self._https else None
        self._lock = threading.Lock()
        self._idle: Optional[Connection] = None
        self._closed = False

    @staticmethod
    def _proxy_for(scheme: str, host: str) -> Optional[Tuple[str, int, Optional[str]]]:
        """(host, port, Proxy-Authorization) from HTTP(S)_PROXY/NO_PROXY, or None."""
        proxies = urllib.request.getproxies()
        url = proxies.get(scheme)
        if not url or urllib.request.proxy_bypass(host):
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
        return (p.hostname, p.port or 80, auth)

    @property
    def proxy(self) -> Optional[Tuple[str, int]]:
        """The proxy in use as (host, port), or None."""
        return None if self._proxy is None else self._proxy[:2]

    def _connect(self) -> Connection:
        conn: Connection
        if self._proxy is None:
            if self._https:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            return conn
        phost, pport, pauth = self._proxy
        proxy_headers = {"Proxy-Authorization": pauth} if pauth else None
        if self._https:
            conn = http.client.HTTPSConnection(phost, pport, timeout=self._timeout, context=self._ssl)
            conn.set_tunnel(self._host, self._port, headers=proxy_headers)
        else:
            conn = http.client.HTTPConnection(phost, pport, timeout=self._timeout)
        return conn

    def post(self, body: bytes, timeout: Optional[float] = None) -> Tuple[int, Message, bytes]:
        """One POST; returns (status, headers, body) or raises OSError/HTTPException.

        ``timeout`` (seconds) lowers the request timeout for this request only.

        A failure on a reused connection before any response is most often
        the server having closed it while idle, so it is retried once at
        once on a fresh connection; the server dedupes by messageId should
        the first copy have arrived after all.
        """
        for fresh_retry in (False, True):
            with self._lock:
                conn, self._idle = self._idle, None
            reused = conn is not None and conn.sock is not None
            if conn is None:
                conn = self._connect()
            limit = self._timeout if timeout is None else max(min(timeout, self._timeout), 0.001)
            try:
                self._set_timeout(conn, limit)
                conn.request("POST", self._target, body, self._headers)
                resp = conn.getresponse()
                data = resp.read()
                self._set_timeout(conn, self._timeout)
            except (ConnectionError, http.client.BadStatusLine, ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
                # The SSL errors: writing to a TLS connection the server has closed.
                conn.close()
                if reused and not fresh_retry:
                    continue
                raise exc
            except BaseException:
                conn.close()
                raise
            self._release(conn)
            return resp.status, resp.msg, data
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _set_timeout(conn: Connection, seconds: float) -> None:
        conn.timeout = seconds  # used when it (re)connects
        if conn.sock is not None:
            conn.sock.settimeout(seconds)

    def _release(self, conn: Connection) -> None:
        with self._lock:
            if self._idle is None and not self._closed:
                self._idle = conn
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connection; later posts open a new one."""
        with self._lock:
            conn, self._idle = self._idle, None
        if conn is not None:
            conn.close()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's lock and connection.

        Only the file descriptor is closed; nothing is written on a socket
        the parent still uses.
        """
        self._lock = threading.Lock()
        conn, self._idle = self._idle, None
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.close()


class Sender:
    """Delivers one request body with the retry policy; shared by the flusher and ``*_sync``."""

    def __init__(
        self,
        transport: Transport,
        max_attempts: int,
        initial_delay: float,
        logger: logging.Logger,
        *,
        secret: str = "",
    ) -> None:
        self.transport = transport
        self.max_attempts = max_attempts
        self.initial_delay = initial_delay
        self.logger = logger
        self._secret = secret

    def deliver(
        self,
        body: bytes,
        events: Sequence[Event],
        wait: Callable[[float], bool],
        time_left: Optional[Callable[[], float]] = None,
    ) -> BatchResponse:
        """POST ``body`` until it succeeds, fails permanently or attempts run out.

        ``wait(seconds)`` sleeps between attempts and returns False when the
        wait was cut short (a deadline or shutdown): delivery then stops with
        the last failure. ``time_left()``, when given, is the seconds left
        before a deadline that no request may outlast.
        """
        n = len(events)
        status: Optional[int] = None
        last = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            retry_after: Optional[float] = None
            limit = None if time_left is None else time_left()
            if limit is not None and limit <= 0:
                raise SendError(
                    f"{n} event(s) not delivered before the deadline: {last}",
                    events,
                    reason="retries_exhausted",
                    status=status,
                )
            try:
                status, headers, data = self.transport.post(body, limit)
            except (OSError, http.client.HTTPException) as exc:
                status = None
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if 200 <= status <= 299:
                    return parse_response(data, n)
                # A server may echo the write key back; it must reach no log or exception.
                # 800 bytes hold 200 characters of any UTF-8, so no key is cut in half.
                snippet = data[: 800 + len(self._secret)].decode("utf-8", "replace")
                if self._secret:
                    snippet = snippet.replace(self._secret, "<write key>")
                snippet = snippet[:200].strip()
                last = f"HTTP {status}" + (f": {snippet}" if snippet else "")
                if not is_transient(status):
                    raise SendError(
                        f"{n} event(s) rejected permanently: {last}",
                        events,
                        reason="permanent_error",
                        status=status,
                    )
                if status in (429, 503):
                    retry_after = parse_retry_after(headers.get("Retry-After"))
            if attempt == self.max_attempts:
                break
            delay = retry_after if retry_after is not None else backoff_delay(attempt, self.initial_delay)
            self.logger.debug(
                "klime: attempt %d/%d failed (%s); retrying in %.3fs", attempt, self.max_attempts, last, delay
            )
            if not wait(delay):
                raise SendError(
                    f"{n} event(s) not delivered, retrying was stopped: {last}",
                    events,
                    reason="retries_exhausted",
                    status=status,
                )
        raise SendError(
            f"{n} event(s) not delivered after {self.max_attempts} attempt(s): {last}",
            events,
            reason="retries_exhausted",
            status=status,
        )


# --- TEMPORARY shim until the "transport" branch lands ------------------------------------
class RetryPolicy:
    def __init__(self, max_attempts: int, initial_delay: float) -> None:
        self.max_attempts = max_attempts
        self.initial_delay = initial_delay


def check_endpoint(url: str, source: str) -> str:
    return url.rstrip("/")


def HttpTransport(endpoint: str, key: str, timeout: float) -> Transport:  # noqa: N802
    return Transport(endpoint, key, timeout)


_OldSender = Sender


class Sender(_OldSender):  # type: ignore[no-redef]
    def __init__(self, transport: Any, policy: RetryPolicy, logger: logging.Logger, secret: str) -> None:
        super().__init__(transport, policy.max_attempts, policy.initial_delay, logger, secret=secret)

    def paused(self) -> float:
        return 0.0

    def deliver(self, body, events, deadline, interrupt, on_failed=None):  # type: ignore[no-untyped-def,override]
        def wait(s: float) -> bool:
            return not interrupt.wait(min(s, deadline.remaining()))
        return super().deliver(body, events, wait, None if deadline.at is None else deadline.remaining)


class Response(NamedTuple):
    status: int
    headers: Message
    body: bytes
