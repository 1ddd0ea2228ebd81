"""FastAPI: the client lives for the app's lifespan; identify at login, track in endpoints.

    pip install fastapi httpx          # httpx only for the demo's TestClient
    python examples/fastapi_app.py     # offline demo with FastAPI's TestClient
    KLIME_WRITE_KEY=... uvicorn --app-dir examples fastapi_app:app

Where the pieces go:

* The client is created in the ``lifespan`` handler, stored on
  ``app.state`` and handed to endpoints through a dependency.
* ``track()``, ``identify()`` and ``group()`` only append to an in-memory
  queue, so calling them from ``async def`` endpoints never blocks the event
  loop. ``flush()`` and ``shutdown()`` do wait, so the lifespan runs
  ``shutdown()`` in a worker thread.
* ``identify()`` at login, ``group()`` when the user's company is known,
  ``track()`` where something worth counting happens.

The demo runs offline against a loopback collector unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Dict, Optional

try:
    from fastapi import Depends, FastAPI, Header, HTTPException, Request
except ImportError:
    print("this example needs FastAPI: pip install fastapi httpx")
    raise SystemExit(0) from None

from klime import KlimeClient

# Stand-ins for your user store and sessions.
USERS = {"stefan@example.com": {"id": "user_123", "name": "Stefan", "org_id": "org_456"}}
ORGS = {"org_456": {"name": "Acme Inc", "plan": "enterprise"}}
TOKENS: Dict[str, Dict[str, Any]] = {}


def get_klime(request: Request) -> KlimeClient:
    client: KlimeClient = request.app.state.klime
    return client


def current_user(authorization: Annotated[str, Header()] = "") -> Dict[str, Any]:
    scheme, _, token = authorization.partition(" ")
    user = TOKENS.get(token) if scheme == "Bearer" else None
    if user is None:
        raise HTTPException(status_code=401, detail="login required")
    return user


Klime = Annotated[KlimeClient, Depends(get_klime)]
CurrentUser = Annotated[Dict[str, Any], Depends(current_user)]


def create_app(klime_options: Optional[Dict[str, Any]] = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Reads KLIME_WRITE_KEY / KLIME_ENDPOINT unless options are given.
        app.state.klime = KlimeClient(**(klime_options or {}))
        yield
        # Deliver what is queued (at most shutdown_timeout, 10 s by default)
        # without blocking the event loop.
        await asyncio.to_thread(app.state.klime.shutdown)

    app = FastAPI(lifespan=lifespan)

    @app.post("/login")
    async def login(body: Dict[str, str], klime: Klime) -> Dict[str, str]:
        user = USERS.get(body.get("email", ""))
        if user is None:
            raise HTTPException(status_code=401, detail="invalid credentials")
        token = f"token-{user['id']}"
        TOKENS[token] = user
        klime.identify(user["id"], {"email": body["email"], "name": user["name"]})
        if user["org_id"]:
            org = ORGS[user["org_id"]]
            klime.group(user["org_id"], {"name": org["name"], "plan": org["plan"]}, user_id=user["id"])
        return {"token": token}

    @app.post("/exports")
    async def create_export(body: Dict[str, str], user: CurrentUser, klime: Klime) -> Dict[str, str]:
        export_format = body.get("format", "csv")
        # ... start the export ...
        klime.track("Export Started", {"format": export_format}, user_id=user["id"], group_id=user["org_id"])
        return {"status": "started", "format": export_format}

    return app


# For `uvicorn fastapi_app:app`; the client is created only when the app starts.
app = create_app()


def demo() -> int:
    """Drive the app with FastAPI's TestClient and show what Klime received."""
    from _loopback import describe, klime_target

    try:
        from fastapi.testclient import TestClient
    except (ImportError, RuntimeError):  # Starlette raises RuntimeError when httpx is missing
        print("the demo drives the app with FastAPI's TestClient, which needs httpx: pip install httpx")
        return 0

    with klime_target() as (options, collector):
        with TestClient(create_app(options)) as web:  # runs the lifespan
            token = web.post("/login", json={"email": "stefan@example.com"}).json()["token"]
            auth = {"Authorization": f"Bearer {token}"}
            print("export:", web.post("/exports", json={"format": "xlsx"}, headers=auth).json())
        # Leaving the block ran the lifespan's shutdown: everything is delivered.
        if collector is not None:
            for event in collector.events:
                print(describe(event))
            return 0 if len(collector.events) == 3 else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(demo())
