"""Framework integrations: request scope, per-request flush, task and worker hooks.

Each integration lives in its own module and imports its framework only
there, so ``import klime`` never imports Flask, Django, Starlette or Celery:

* :mod:`klime.integrations.wsgi` — ``KlimeMiddleware`` for any WSGI app
  (Flask, Django, Bottle, Falcon ...).
* :mod:`klime.integrations.asgi` — ``KlimeMiddleware`` for any ASGI app
  (Starlette, FastAPI, Django under ASGI ...).
* :mod:`klime.integrations.django` — ``KlimeMiddleware`` for Django's
  ``MIDDLEWARE`` setting, configured from ``settings.KLIME``.
* :mod:`klime.integrations.celery` — ``install()`` connects Celery's worker
  and task signals.
"""

from ._common import Flushable

__all__ = ["Flushable"]
