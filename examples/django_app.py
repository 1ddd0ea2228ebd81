"""Django: a shared client, identify on the login signal, track in views.

    pip install django
    python examples/django_app.py      # offline demo with Django's test client

This file is a whole (tiny) Django project so that it can run on its own.
In a real project the pieces go here:

* ``settings.py``: ``KLIME = {"write_key": os.environ["KLIME_WRITE_KEY"]}``
  (any ``KlimeClient`` option may go in that dict).
* ``analytics.py`` (any module): ``klime()`` below, which creates the client
  once per process on first use. The client is fork-safe, so gunicorn
  ``--preload`` and uWSGI workers may inherit one made in the master.
* ``apps.py`` ``ready()`` (or ``signals.py``): connect ``identify_on_login``
  to ``user_logged_in``; call ``group()`` where a user joins an organisation.
* Views call ``klime().track(...)``, which only queues the event.
* Shutdown: the client's exit hook delivers what is queued when the worker
  process exits (bounded by ``shutdown_timeout``, 10 s by default).

The demo runs offline against a loopback collector unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Dict, Optional

try:
    import django
    from django.conf import settings
except ImportError:
    print("this example needs Django: pip install django")
    raise SystemExit(0) from None

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="example-only-not-secret",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["testserver", "localhost", "127.0.0.1"],
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.sessions"],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],  # fast, for the demo only
        KLIME={},  # filled in by demo(); empty means KLIME_WRITE_KEY / KLIME_ENDPOINT
    )
    django.setup()

from django.contrib.auth import authenticate, login  # after settings.configure()
from django.contrib.auth.signals import user_logged_in
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from klime import KlimeClient

# --- analytics.py ------------------------------------------------------------

_client: Optional[KlimeClient] = None
_client_lock = threading.Lock()


def klime() -> KlimeClient:
    """The process's one client, created on first use from ``settings.KLIME``."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                _client = KlimeClient(**getattr(settings, "KLIME", {}))
    return _client


# Stand-in for a membership model: which organisation each user belongs to.
ORG_OF_USER = {"stefan": ("org_456", {"name": "Acme Inc", "plan": "enterprise"})}


def identify_on_login(sender: Any, request: HttpRequest, user: Any, **kwargs: Any) -> None:
    """Connected to ``user_logged_in``: every successful login identifies the user."""
    user_id = str(user.pk)
    klime().identify(user_id, {"email": user.email, "name": user.get_full_name() or user.username})
    membership = ORG_OF_USER.get(user.username)
    if membership is not None:
        org_id, org_traits = membership
        klime().group(org_id, org_traits, user_id=user_id)


user_logged_in.connect(identify_on_login, dispatch_uid="klime-identify-on-login")

# --- views.py ----------------------------------------------------------------


@csrf_exempt
@require_POST
def login_view(request: HttpRequest) -> JsonResponse:
    form: Dict[str, str] = json.loads(request.body)
    user = authenticate(request, username=form.get("username"), password=form.get("password"))
    if user is None:
        return JsonResponse({"error": "invalid credentials"}, status=401)
    login(request, user)  # sends user_logged_in -> identify_on_login
    return JsonResponse({"ok": True})


@csrf_exempt
@require_POST
def invite_view(request: HttpRequest) -> JsonResponse:
    if not request.user.is_authenticated:
        return JsonResponse({"error": "login required"}, status=401)
    role = json.loads(request.body).get("role", "member")
    # ... create the invitation ...
    membership = ORG_OF_USER.get(request.user.username)
    klime().track(
        "Teammate Invited",
        {"role": role},
        user_id=str(request.user.pk),
        group_id=membership[0] if membership else None,
    )
    return JsonResponse({"ok": True})


urlpatterns = [path("login", login_view), path("invitations", invite_view)]


def demo() -> int:
    """Create a user, log in and invite someone with Django's test client."""
    from _loopback import describe, klime_target
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client

    with klime_target() as (options, collector):
        settings.KLIME = options
        call_command("migrate", verbosity=0)
        User.objects.create_user("stefan", "stefan@example.com", "hunter2", first_name="Stefan")
        web = Client()
        web.post("/login", json.dumps({"username": "stefan", "password": "hunter2"}), content_type="application/json")
        web.post("/invitations", json.dumps({"role": "admin"}), content_type="application/json")
        delivered = klime().shutdown(timeout=10)  # in a server, the exit hook does this
        if collector is not None:
            for event in collector.events:
                print(describe(event))
        print("delivered" if delivered else "NOT delivered")
        return 0 if delivered else 1


if __name__ == "__main__":
    raise SystemExit(demo())
