"""Starlette (or FastAPI) behind klime's ASGI middleware: ids from the request, a flush per request.

    pip install starlette httpx
    python examples/starlette_middleware.py

The flush after each response never blocks the event loop (the client's
sending threads hand their result to the loop), and it also covers what
background tasks tracked after the response went out. Offline against a
loopback collector unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

try:
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient
except ImportError:
    print("this example needs Starlette and httpx: pip install starlette httpx")
    raise SystemExit(0) from None

from _loopback import describe, klime_target

from klime import KlimeClient
from klime.integrations.asgi import KlimeMiddleware


def who(scope: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    user = dict(scope["headers"]).get(b"x-user-id")
    return {"user_id": user.decode(), "group_id": "org_456"} if user else None


def create_app(client: KlimeClient) -> Starlette:
    async def export(request: Request) -> JSONResponse:
        client.track("Export Started", {"format": "csv"})

        async def finish() -> None:
            client.track("Export Finished", {"rows": 1200})  # still inside the request's scope

        return JSONResponse({"ok": True}, background=BackgroundTask(finish))

    middleware = [Middleware(KlimeMiddleware, client=client, identify=who, flush=True, flush_timeout=2.0)]
    return Starlette(routes=[Route("/exports", export, methods=["POST"])], middleware=middleware)


def main() -> int:
    with klime_target() as (options, collector):
        client = KlimeClient(**options, flush_interval=60_000)
        client.identify("user_123", {"name": "Stefan"})
        client.group("org_456", {"name": "Acme Inc"}, user_id="user_123")
        with TestClient(create_app(client)) as web:
            web.post("/exports", headers={"X-User-Id": "user_123"})
        left = client.queue_size()
        if collector is not None:
            for event in collector.events:
                print(describe(event))
        print(f"queued after the request: {left}")
        client.shutdown(timeout=5)
        return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
