"""The client's options: one frozen value built from arguments and the environment.

Validation, defaults, ``KLIME_*`` environment variables and the conversion
from the docs' milliseconds to the seconds used internally all happen here,
once, at construction (docs/design.md, "Options").
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, cast

from ._transport import check_endpoint

DEFAULT_ENDPOINT = "https://i.klime.com"
DEFAULT_FLUSH_INTERVAL = 2000
DEFAULT_MAX_BATCH_SIZE = 20
DEFAULT_MAX_QUEUE_SIZE = 1000
DEFAULT_RETRY_MAX_ATTEMPTS = 5
DEFAULT_RETRY_INITIAL_DELAY = 1000
DEFAULT_REQUEST_TIMEOUT = 10000
DEFAULT_SHUTDOWN_TIMEOUT = 10000
MAX_BATCH_SIZE = 100
# Batches in flight at once under a backlog (docs/design.md, "Lanes").
DEFAULT_MAX_IN_FLIGHT = 8
_MAX_DURATION_MS = threading.TIMEOUT_MAX * 1000

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

# option -> (environment variable, kind)
ENVIRONMENT: Dict[str, Tuple[str, str]] = {
    "write_key": ("KLIME_WRITE_KEY", "str"),
    "endpoint": ("KLIME_ENDPOINT", "str"),
    "flush_interval": ("KLIME_FLUSH_INTERVAL", "ms"),
    "max_batch_size": ("KLIME_MAX_BATCH_SIZE", "int"),
    "max_queue_size": ("KLIME_MAX_QUEUE_SIZE", "int"),
    "retry_max_attempts": ("KLIME_RETRY_MAX_ATTEMPTS", "int"),
    "retry_initial_delay": ("KLIME_RETRY_INITIAL_DELAY", "ms"),
    "request_timeout": ("KLIME_REQUEST_TIMEOUT", "ms"),
    "shutdown_timeout": ("KLIME_SHUTDOWN_TIMEOUT", "ms"),
    "flush_on_shutdown": ("KLIME_FLUSH_ON_SHUTDOWN", "bool"),
    "disabled": ("KLIME_DISABLED", "bool"),
    "debug": ("KLIME_DEBUG", "bool"),
}

MISSING_KEY = (
    "write_key is required: pass KlimeClient(write_key=...) or set the KLIME_WRITE_KEY environment variable"
)


def _env_value(option: str, environ: Mapping[str, str]) -> Any:
    """The option's value from its environment variable, or None when unset."""
    var, kind = ENVIRONMENT[option]
    raw = environ.get(var)
    if raw is None:
        return None
    if kind == "str":
        return raw or None
    text = raw.strip()
    if kind == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{var}={raw!r} is not a boolean; use 1/0, true/false or yes/no")
    if not text:
        return None
    try:
        value: Any = int(text) if kind == "int" else float(text)
    except ValueError:
        what = "a whole number" if kind == "int" else "a number of milliseconds"
        raise ValueError(f"{var}={raw!r} is not {what}") from None
    # Checked before int(value): int() of NaN or infinity raises its own
    # error, which would not name the variable (docs/design.md, "Options").
    if not value > 0:
        raise ValueError(f"{var}={raw!r} must be a number greater than 0")
    if kind == "ms" and not value <= _MAX_DURATION_MS:
        raise ValueError(f"{var}={raw!r} must be a finite number of milliseconds, at most {_MAX_DURATION_MS:.0f}")
    if kind == "ms" and value == int(value):
        value = int(value)
    return value


def _number(name: str, value: Any, default: float, *, integer: bool = True) -> Any:
    """An option that must be a positive number (None means the default)."""
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")
    if not integer and not value <= _MAX_DURATION_MS:
        # Past this (e.g. inf) thread waits and socket timeouts raise OverflowError.
        raise ValueError(f"{name} must be a finite number of milliseconds, at most {_MAX_DURATION_MS:.0f}")
    return value


def _flag(name: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def _callable(name: str, fn: Any) -> Any:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable, not {type(fn).__name__}")
    return fn


def _mapping(name: str, value: Any) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict (a mapping with string keys), not {type(value).__name__}")
    copy = dict(value)
    for key in copy:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings; got key {key!r} of type {type(key).__name__}")
    return copy or None


@dataclass(frozen=True)
class Options:
    """Every setting of one client, validated; durations in seconds unless named ``*_ms``."""

    write_key: str = field(repr=False)
    endpoint: str
    flush_interval_ms: float
    max_batch_size: int
    max_queue_size: int
    retry_max_attempts: int
    retry_initial_delay_ms: float
    request_timeout_ms: float
    shutdown_timeout_ms: float
    flush_on_shutdown: bool
    logger: logging.Logger = field(repr=False)  # or a LoggerAdapter, which has the same methods
    on_error: Optional[Callable[..., None]] = field(repr=False)
    on_success: Optional[Callable[..., None]] = field(repr=False)
    before_send: Optional[Callable[..., Any]] = field(repr=False)
    json_default: Optional[Callable[[Any], Any]] = field(repr=False)
    default_properties: Optional[Dict[str, Any]] = field(repr=False)
    default_context: Optional[Dict[str, Any]] = field(repr=False)
    disabled: bool
    debug: bool
    max_in_flight: int

    @property
    def flush_interval(self) -> float:
        return self.flush_interval_ms / 1000.0

    @property
    def retry_initial_delay(self) -> float:
        return self.retry_initial_delay_ms / 1000.0

    @property
    def request_timeout(self) -> float:
        return self.request_timeout_ms / 1000.0

    @property
    def shutdown_timeout(self) -> float:
        return self.shutdown_timeout_ms / 1000.0

    @classmethod
    def build(cls, environ: Optional[Mapping[str, str]] = None, **given: Any) -> Options:
        """Options from explicit arguments (None: not given), then ``KLIME_*``, then defaults."""
        env = os.environ if environ is None else environ
        args: Dict[str, Any] = {}
        for name in ENVIRONMENT:
            value = given.get(name)
            args[name] = _env_value(name, env) if value is None else value

        disabled = _flag("disabled", args["disabled"], False)
        write_key = args["write_key"]
        if write_key is None or write_key == "":
            if not disabled:
                raise ValueError(MISSING_KEY)
            write_key = ""
        if not isinstance(write_key, str):
            raise TypeError(f"write_key must be a string, not {type(write_key).__name__}")
        if write_key and not (write_key.isascii() and write_key.isprintable()):
            # The header would be refused on every send; the message must not quote the key.
            raise ValueError(
                "write_key contains a newline, control or non-ASCII character; "
                "strip it (e.g. a trailing newline read from a file)"
            )

        endpoint = args["endpoint"]
        source = "endpoint" if given.get("endpoint") is not None else "KLIME_ENDPOINT"
        if endpoint is None:
            endpoint, source = DEFAULT_ENDPOINT, "the default endpoint"
        if not isinstance(endpoint, str):
            raise TypeError(f"endpoint must be a string, not {type(endpoint).__name__}")
        endpoint = check_endpoint(endpoint, source)

        logger = given.get("logger")
        if logger is not None and not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
            raise TypeError(f"logger must be a logging.Logger, not {type(logger).__name__}")

        max_in_flight = given.get("max_in_flight")
        return cls(
            write_key=write_key,
            endpoint=endpoint,
            flush_interval_ms=_number("flush_interval", args["flush_interval"], DEFAULT_FLUSH_INTERVAL, integer=False),
            max_batch_size=min(
                _number("max_batch_size", args["max_batch_size"], DEFAULT_MAX_BATCH_SIZE), MAX_BATCH_SIZE
            ),
            max_queue_size=_number("max_queue_size", args["max_queue_size"], DEFAULT_MAX_QUEUE_SIZE),
            retry_max_attempts=_number(
                "retry_max_attempts", args["retry_max_attempts"], DEFAULT_RETRY_MAX_ATTEMPTS
            ),
            retry_initial_delay_ms=_number(
                "retry_initial_delay", args["retry_initial_delay"], DEFAULT_RETRY_INITIAL_DELAY, integer=False
            ),
            request_timeout_ms=_number(
                "request_timeout", args["request_timeout"], DEFAULT_REQUEST_TIMEOUT, integer=False
            ),
            shutdown_timeout_ms=_number(
                "shutdown_timeout", args["shutdown_timeout"], DEFAULT_SHUTDOWN_TIMEOUT, integer=False
            ),
            flush_on_shutdown=_flag("flush_on_shutdown", args["flush_on_shutdown"], True),
            logger=cast(logging.Logger, logger) if logger is not None else logging.getLogger("klime"),
            on_error=_callable("on_error", given.get("on_error")),
            on_success=_callable("on_success", given.get("on_success")),
            before_send=_callable("before_send", given.get("before_send")),
            json_default=_callable("json_default", given.get("json_default")),
            default_properties=_mapping("default_properties", given.get("default_properties")),
            default_context=_mapping("default_context", given.get("default_context")),
            disabled=disabled,
            debug=_flag("debug", args["debug"], False),
            max_in_flight=_number("max_in_flight", max_in_flight, DEFAULT_MAX_IN_FLIGHT),
        )
