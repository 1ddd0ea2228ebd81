"""klime: the Python SDK for Klime customer analytics.

>>> from klime import KlimeClient
>>> client = KlimeClient(write_key="...")          # doctest: +SKIP
>>> client.track("Report Generated", user_id="u1")  # doctest: +SKIP

Or, with ``KLIME_WRITE_KEY`` set, the module-level API on a default client:

>>> import klime
>>> klime.track("Report Generated", user_id="u1")  # doctest: +SKIP
"""

from ._async import AsyncKlimeClient
from ._event import Event
from ._module import (
    configure,
    flush,
    flushing,
    get_client,
    group,
    group_sync,
    identify,
    identify_sync,
    queue_size,
    shutdown,
    track,
    track_sync,
)
from ._scope import scope
from ._signals import install_signal_handlers
from ._version import __version__
from .client import KlimeClient
from .types import BatchResponse, OnError, OnSuccess, Reason, SendError, Stats, ValidationError

__all__ = [
    "AsyncKlimeClient",
    "BatchResponse",
    "Event",
    "KlimeClient",
    "OnError",
    "OnSuccess",
    "Reason",
    "SendError",
    "Stats",
    "ValidationError",
    "__version__",
    "configure",
    "flush",
    "flushing",
    "get_client",
    "group",
    "group_sync",
    "identify",
    "identify_sync",
    "install_signal_handlers",
    "queue_size",
    "scope",
    "shutdown",
    "track",
    "track_sync",
]
