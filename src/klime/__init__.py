"""klime: the Python SDK for Klime customer analytics.

>>> from klime import KlimeClient
>>> client = KlimeClient(write_key="...")          # doctest: +SKIP
>>> client.track("Report Generated", user_id="u1")  # doctest: +SKIP
"""

from ._event import Event
from ._signals import install_signal_handlers
from ._version import __version__
from .client import KlimeClient
from .types import BatchResponse, OnError, OnSuccess, Reason, SendError, Stats, ValidationError

__all__ = [
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
    "install_signal_handlers",
]
