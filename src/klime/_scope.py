"""``klime.scope()``: ids and properties that ``track`` calls inside a block inherit.

Built on :mod:`contextvars`, so a scope follows asyncio tasks (a task
started inside it inherits it) and stays separate per thread. ``track``
checks the module flag :data:`used` before it looks at the context
variable at all, so an application that never enters a scope pays one
attribute test per call (docs/design.md, "Request scope").
"""

from __future__ import annotations

from contextvars import ContextVar
from types import TracebackType
from typing import Any, Dict, Mapping, Optional, Tuple, Type

from ._event import copy_fields

# Flipped once, by the first scope entered; never reset.
used = False


class _Frame:
    """The ids and properties in force: a scope merged with the scopes around it."""

    __slots__ = ("user_id", "group_id", "properties", "owner", "parent")

    def __init__(
        self,
        user_id: Optional[str],
        group_id: Optional[str],
        properties: Dict[str, Any],
        owner: Scope,
        parent: Optional[_Frame],
    ) -> None:
        self.user_id = user_id
        self.group_id = group_id
        self.properties = properties
        self.owner = owner  # the Scope that entered it
        self.parent = parent  # what was in force before


_current: ContextVar[Optional[_Frame]] = ContextVar("klime_scope", default=None)


def _check_id(name: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a string, not {type(value).__name__}; pass str({value!r}) if it is a number"
        )
    if not value:
        raise ValueError(f"{name} must be a non-empty string (or None to inherit it)")
    return "".join((value,))  # a str subclass as the plain string it holds


class Scope:
    """A block whose ``track`` calls inherit ``user_id``, ``group_id`` and ``properties``.

    Returned by :func:`klime.scope`; use it with ``with``. It keeps no
    state of its own while entered (that lives in the context), so one
    object may be entered again, nested in itself, or entered by several
    threads and tasks at once.
    """

    __slots__ = ("_user_id", "_group_id", "_properties")

    def __init__(
        self,
        user_id: Optional[str] = None,
        group_id: Optional[str] = None,
        properties: Optional[Mapping[str, Any]] = None,
    ) -> None:
        # Checked here, so a mistake shows at the scope rather than at some later track().
        self._user_id = _check_id("user_id", user_id)
        self._group_id = _check_id("group_id", group_id)
        self._properties = copy_fields(properties, "properties")

    def __repr__(self) -> str:
        return f"klime.scope(user_id={self._user_id!r}, group_id={self._group_id!r}, properties={self._properties!r})"

    def __enter__(self) -> Scope:
        global used
        used = True
        outer = _current.get()
        if outer is None:
            frame = _Frame(self._user_id, self._group_id, self._properties, self, None)
        else:
            frame = _Frame(
                self._user_id if self._user_id is not None else outer.user_id,
                self._group_id if self._group_id is not None else outer.group_id,
                {**outer.properties, **self._properties} if self._properties else outer.properties,
                self,
                outer,
            )
        _current.set(frame)
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        # Back to what was in force when this scope was entered, found from
        # the context itself (a Token would tie the exit to one Context).
        frame = _current.get()
        probe = frame
        while probe is not None and probe.owner is not self:
            probe = probe.parent
        if probe is not None:
            _current.set(probe.parent)


def scope(
    user_id: Optional[str] = None,
    group_id: Optional[str] = None,
    properties: Optional[Mapping[str, Any]] = None,
) -> Scope:
    """Inside ``with klime.scope(...):``, ``track`` calls inherit what they leave out.

    Each id a ``track`` call does not pass is taken from the scope, and the
    scope's ``properties`` are merged under the call's own (the call's keys
    win). Scopes nest: an inner scope's ids win and the properties merge.
    The scope applies to every client (the default one included) and
    follows asyncio tasks started inside it; each thread has its own.
    ``identify`` and ``group`` are not affected. ``properties`` is copied at
    its top level now::

        with klime.scope(user_id=str(request.user.pk), properties={"plan": "pro"}):
            klime.track("Report Generated")   # userId and plan come from the scope
    """
    return Scope(user_id, group_id, properties)


def fill(user_id: Any, group_id: Any, properties: Any) -> Tuple[Any, Any, Any]:
    """A track call's ids and properties with the scope's filled in (called only once :data:`used`)."""
    frame = _current.get()
    if frame is None:
        return user_id, group_id, properties
    if user_id is None:
        user_id = frame.user_id
    if group_id is None:
        group_id = frame.group_id
    if frame.properties:
        merged = dict(frame.properties)
        merged.update(copy_fields(properties, "properties"))
        properties = merged
    return user_id, group_id, properties
