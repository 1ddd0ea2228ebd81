"""Flask: one client per process, identify at login, group on membership, track in views.

    pip install flask
    python examples/flask_app.py                          # offline demo with Flask's test client
    KLIME_WRITE_KEY=... flask --app examples/flask_app run  # serve it (uses create_app)

Where the pieces go:

* The client is created once, in the app factory, and kept in
  ``app.extensions["klime"]``; views reach it through ``current_app``.
  Under gunicorn with ``--preload`` it is created in the master and keeps
  working in every forked worker.
* ``identify()`` runs when login succeeds, ``group()`` when the user's
  company is known (here: at login, and when an invitation is accepted),
  ``track()`` in the views that do something worth counting.
* Shutdown: the client registers an exit hook that delivers what is queued,
  bounded by ``shutdown_timeout`` (10 s by default), when the process exits,
  so Flask needs no teardown code.

``python examples/flask_app.py`` runs offline against a loopback collector
unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

try:
    from flask import Flask, current_app, jsonify, request, session
except ImportError:
    print("this example needs Flask: pip install flask")
    raise SystemExit(0) from None

from klime import KlimeClient


# Stand-ins for your user and organisation models.
@dataclass
class User:
    id: str
    name: str
    password: str
    org_id: Optional[str]


USERS = {
    "stefan@example.com": User("user_123", "Stefan", "hunter2", "org_456"),
    "jane@example.com": User("user_124", "Jane Smith", "correct horse", None),
}
ORGS = {"org_456": {"name": "Acme Inc", "plan": "enterprise"}}


def klime() -> KlimeClient:
    client: KlimeClient = current_app.extensions["klime"]
    return client


def create_app(klime_client: Optional[KlimeClient] = None) -> Flask:
    app = Flask(__name__)
    app.secret_key = "example-only-not-secret"
    # Reads KLIME_WRITE_KEY (and KLIME_ENDPOINT) from the environment unless
    # a client is passed in, e.g. klime.testing.CapturingClient in tests.
    app.extensions["klime"] = klime_client or KlimeClient()

    @app.post("/login")
    def login() -> Any:
        form: Dict[str, str] = request.get_json(force=True)
        user = USERS.get(form.get("email", ""))
        if user is None or user.password != form.get("password"):
            return jsonify(error="invalid credentials"), 401
        session["user_id"] = user.id
        session["org_id"] = user.org_id
        klime().identify(user.id, {"email": form["email"], "name": user.name})
        if user.org_id:
            org = ORGS[user.org_id]
            klime().group(user.org_id, {"name": org["name"], "plan": org["plan"]}, user_id=user.id)
        klime().track("User Logged In", user_id=user.id, group_id=user.org_id)
        return jsonify(ok=True)

    @app.post("/invitations/<org_id>/accept")
    def accept_invitation(org_id: str) -> Any:
        user_id = session.get("user_id")
        if user_id is None:
            return jsonify(error="login required"), 401
        session["org_id"] = org_id
        # Membership is known now: link the user; the company's traits are already set.
        klime().group(org_id, user_id=user_id)
        klime().track("Invitation Accepted", user_id=user_id, group_id=org_id)
        return jsonify(ok=True)

    @app.post("/reports")
    def generate_report() -> Any:
        user_id = session.get("user_id")
        if user_id is None:
            return jsonify(error="login required"), 401
        report_type = (request.get_json(force=True) or {}).get("type", "revenue")
        # ... build the report ...
        klime().track("Report Generated", {"report_type": report_type}, user_id=user_id, group_id=session.get("org_id"))
        return jsonify(ok=True, report_type=report_type)

    return app


def demo() -> int:
    """Drive the app with Flask's test client and show what Klime received."""
    from _loopback import describe, klime_target

    with klime_target() as (options, collector):
        client = KlimeClient(**options)
        app = create_app(client)
        web = app.test_client()
        web.post("/login", json={"email": "stefan@example.com", "password": "hunter2"})
        web.post("/reports", json={"type": "churn"})
        other = app.test_client()
        other.post("/login", json={"email": "jane@example.com", "password": "correct horse"})
        other.post("/invitations/org_456/accept")
        delivered = client.shutdown(timeout=10)  # in a server, the exit hook does this
        if collector is not None:
            for event in collector.events:
                print(describe(event))
        print("delivered" if delivered else "NOT delivered")
        return 0 if delivered else 1


if __name__ == "__main__":
    raise SystemExit(demo())
