"""Flask behind klime's WSGI middleware: user ids from the request, a flush per request.

    pip install flask
    python examples/flask_middleware.py

``KlimeMiddleware`` runs every request inside ``klime.scope(...)`` built from
what ``identify(environ)`` returns, so views call ``track`` without ids.
``flush=True`` delivers once the response has been sent (for serverless hosts
that freeze the process between requests); a failing flush never fails the
response. Offline against a loopback collector unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

try:
    from flask import Flask, jsonify
except ImportError:
    print("this example needs Flask: pip install flask")
    raise SystemExit(0) from None

from _loopback import describe, klime_target

from klime import KlimeClient
from klime.integrations.wsgi import KlimeMiddleware


def who(environ: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    # In a real app: the session or a verified token. Here: a header.
    user = environ.get("HTTP_X_USER_ID")
    return {"user_id": user, "group_id": "org_456", "properties": {"path": environ["PATH_INFO"]}} if user else None


def create_app(client: KlimeClient) -> Flask:
    app = Flask(__name__)

    @app.post("/reports")
    def reports() -> Any:
        client.track("Report Generated", {"report_type": "churn"})  # ids come from the scope
        return jsonify(ok=True)

    app.wsgi_app = KlimeMiddleware(app.wsgi_app, client, identify=who, flush=True, flush_timeout=2.0)  # type: ignore[method-assign]
    return app


def main() -> int:
    with klime_target() as (options, collector):
        client = KlimeClient(**options, flush_interval=60_000)  # only the middleware's flush sends
        client.identify("user_123", {"name": "Stefan"})
        client.group("org_456", {"name": "Acme Inc"}, user_id="user_123")
        web = create_app(client).test_client()
        web.post("/reports", headers={"X-User-Id": "user_123"}).close()
        left = client.queue_size()
        if collector is not None:
            for event in collector.events:
                print(describe(event))
        print(f"queued after the request: {left}")
        client.shutdown(timeout=5)
        return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
