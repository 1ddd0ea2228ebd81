"""Django with klime's middleware: the signed-in user on every track, settings.KLIME, a flush per request.

    pip install django
    python examples/django_middleware.py

In a project: add ``"klime.integrations.django.KlimeMiddleware"`` to
``MIDDLEWARE`` after ``AuthenticationMiddleware`` and put the client options
in ``settings.KLIME`` (upper-case keys). Views then call ``klime.track(...)``
on the default client without a ``user_id``. Offline against a loopback
collector unless run with
``--live``, which sends to the workspace of ``KLIME_WRITE_KEY`` and ``KLIME_ENDPOINT``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict

try:
    import django
    from django.conf import settings
except ImportError:
    print("this example needs Django: pip install django")
    raise SystemExit(0) from None

from _loopback import describe, klime_target

import klime


class DemoUser:
    """Stands in for request.user as django.contrib.auth sets it."""

    is_authenticated = True
    pk = 123


class FakeAuthMiddleware:
    """Stands in for AuthenticationMiddleware (no database in this demo)."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        request.user = DemoUser()
        return self.get_response(request)


def report(request: Any) -> Any:
    from django.http import JsonResponse

    klime.track("Report Generated", {"report_type": "revenue"})  # userId "123" from the middleware
    return JsonResponse({"ok": True})


urlpatterns: list = []
ORDER = {"identify": 0, "group": 1, "track": 2}


def main() -> int:
    with klime_target() as (options, collector):
        conf: Dict[str, Any] = {key.upper(): value for key, value in options.items()}
        if not conf:  # the environment's endpoint and key
            conf = {"WRITE_KEY": os.environ.get("KLIME_WRITE_KEY")}
        settings.configure(
            ROOT_URLCONF=__name__,
            ALLOWED_HOSTS=["testserver"],
            SECRET_KEY="example-only",
            MIDDLEWARE=[f"{__name__}.FakeAuthMiddleware", "klime.integrations.django.KlimeMiddleware"],
            KLIME={**conf, "FLUSH_INTERVAL": 60_000, "FLUSH": True, "FLUSH_TIMEOUT": 2.0},
        )
        django.setup()
        from django.test import Client
        from django.urls import path

        urlpatterns.append(path("reports", report))
        web = Client()
        web.get("/reports")  # loads the middleware, which configures the default client
        client = klime.get_client()
        client.identify("123", {"name": "Stefan"})
        client.group("org_456", {"name": "Acme Inc"}, user_id="123")
        web.get("/reports")
        left = client.queue_size()
        if collector is not None:
            for event in sorted(collector.events, key=lambda e: ORDER[e["type"]]):
                print(describe(event))
        print(f"queued after the requests: {left}")
        klime.shutdown(timeout=5)
        return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
