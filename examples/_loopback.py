"""A tiny stand-in for the Klime ingestion API, so the examples run offline.

It listens on 127.0.0.1 only, accepts ``POST /v1/batch`` and answers the way
the real API does (``{"status", "accepted", "failed"}``). It keeps every event
it received and, like the real API, counts an event once per ``messageId``.

The examples use :func:`klime_target`. Their events are made up (and some
fail on purpose), so they go to this collector unless the command line says
``--live``: only then does an example send to the endpoint and workspace that
``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT`` name. With those variables set and
no ``--live``, the example says how to send for real and stays offline.
Nothing here is part of the SDK.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Tuple

OFFLINE_WRITE_KEY = "offline-demo-key"


class LoopbackCollector:
    """An HTTP server on a free loopback port, run in a daemon thread."""

    def __init__(self, write_key: Optional[str] = OFFLINE_WRITE_KEY) -> None:
        # write_key: the only key accepted (others get 401); None accepts any.
        self.write_key = write_key
        self.events: List[Dict[str, Any]] = []
        self.requests = 0
        self._seen: Dict[str, int] = {}
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the SDK expects

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                status, answer = collector._answer(self.path, self.headers.get("Authorization", ""), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the examples' output readable

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-collector", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def _answer(self, path: str, auth: str, body: bytes) -> Tuple[int, Dict[str, Any]]:
        if path.rstrip("/") != "/v1/batch":
            return 404, {"status": "error", "message": "not found"}
        if self.write_key is not None and auth != f"Bearer {self.write_key}":
            return 401, {"status": "error", "message": "invalid write key"}
        try:
            batch = json.loads(body)["batch"]
        except (ValueError, KeyError, TypeError):
            return 400, {"status": "error", "message": 'body must be {"batch": [...]}'}
        with self._lock:
            self.requests += 1
            for event in batch:
                self.events.append(event)
                mid = event.get("messageId", "")
                self._seen[mid] = self._seen.get(mid, 0) + 1
        return 200, {"status": "ok", "accepted": len(batch), "failed": 0}

    def unique_message_ids(self) -> int:
        """How many distinct events arrived (what the real API would store)."""
        with self._lock:
            return len(self._seen)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


LIVE_FLAG = "--live"


@contextmanager
def klime_target() -> Iterator[Tuple[Dict[str, Any], Optional[LoopbackCollector]]]:
    """Where an example should send: ``(client options, collector or None)``.

    With ``--live`` on the command line the options are empty, so
    ``KlimeClient(**options)`` reads ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``
    and sends to that workspace (``--live`` without a key exits with status 2).
    Otherwise a :class:`LoopbackCollector` is started and the options point the
    client at it; if the environment names a real workspace, a line on stderr
    says that it was left alone and how to send to it.
    """
    script = os.path.basename(sys.argv[0]) or "the example"
    if LIVE_FLAG in sys.argv[1:]:
        if not os.environ.get("KLIME_WRITE_KEY"):
            print(f"{LIVE_FLAG} sends to a real workspace: set KLIME_WRITE_KEY (and KLIME_ENDPOINT)", file=sys.stderr)
            raise SystemExit(2)
        yield {}, None
        return
    if os.environ.get("KLIME_WRITE_KEY") or os.environ.get("KLIME_ENDPOINT"):
        where = os.environ.get("KLIME_ENDPOINT") or "the Klime API"
        print(
            f"{script} sends demo events, so it uses a local loopback collector, not {where}; "
            f"to send them to that workspace for real, run: python examples/{script} {LIVE_FLAG}",
            file=sys.stderr,
        )
    collector = LoopbackCollector()
    try:
        yield {"write_key": OFFLINE_WRITE_KEY, "endpoint": collector.url}, collector
    finally:
        collector.close()


def describe(event: Dict[str, Any]) -> str:
    """One line per received event, for the examples' output."""
    who = ", ".join(f"{k}={event[k]}" for k in ("userId", "groupId") if k in event)
    name = f" {event['event']!r}" if "event" in event else ""
    fields = event.get("properties", event.get("traits", {}))
    return f"{event['type']:<8}{name} ({who}) {json.dumps(fields, sort_keys=True)}"
