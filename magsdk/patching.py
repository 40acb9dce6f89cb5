"""The one way magsdk changes someone else's object: patch an instance attribute, put it back exactly.

The runtime (a transformer's ``forward`` and ``cache_context``, a scheduler's ``set_timesteps``),
first-call tracing and ``magsdk inspect``'s block tracing all go through ``Patches``. Each
patched value is marked with its owner, so patching an attribute that magsdk already patched is
refused with a clear error instead of stacking wrappers (which would run the cache twice or
restore the wrong function later). Restoring is exact: an attribute the instance did not have
is removed again, not set to the class's function. If somebody else wrapped the attribute after
us (accelerate's offload hooks, diffusers' hook registry), their wrapper is left in place — and
``restore`` reports ``False`` for it, so that the caller can make its own wrapper a pass-through.
This module imports only the standard library (see docs/design.md, "Patching").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from magsdk.errors import UsageError

#: Attribute set on every value magsdk patched in: the owner's description.
MARK = "__magsdk_patch__"

_ABSENT = object()


class DoublePatchError(UsageError):
    """An attribute is already patched by magsdk."""


def patch_owner(value: Any) -> str | None:
    """Who in magsdk patched ``value`` in, or None if it is not a magsdk patch."""
    owner = getattr(value, MARK, None)
    return owner if isinstance(owner, str) else None


class Patches:
    """A set of instance-attribute patches made by one owner, undone together in reverse order."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._saved: list[tuple[Any, str, Any, Any]] = []

    def __len__(self) -> int:
        return len(self._saved)

    def patch(self, obj: Any, attr: str, value: Callable[..., Any]) -> None:
        """Set ``obj.attr = value`` on the instance; refuse if magsdk already patched it."""
        current = obj.__dict__.get(attr, _ABSENT)
        owner = patch_owner(current)
        if owner is not None:
            raise DoublePatchError(
                f"{type(obj).__name__}.{attr} is already patched by magsdk ({owner}); disable that handle "
                f"(handle.disable() or leave its `with` block) before {self.owner} patches it again"
            )
        setattr(value, MARK, self.owner)
        obj.__dict__[attr] = value
        self._saved.append((obj, attr, current, value))

    def set_value(self, obj: Any, attr: str, value: Any) -> None:
        """Set a plain (unmarked) instance attribute, removed or restored with the patches."""
        self._saved.append((obj, attr, obj.__dict__.get(attr, _ABSENT), value))
        obj.__dict__[attr] = value

    def restore_one(self, obj: Any, attr: str) -> None:
        """Undo the patch of ``obj.attr`` alone (an object the owner stops using while it keeps the others)."""
        for index, (saved_obj, saved_attr, previous, value) in enumerate(self._saved):
            if saved_obj is obj and saved_attr == attr:
                del self._saved[index]
                if obj.__dict__.get(attr, _ABSENT) is value:  # else someone wrapped ours: leave theirs
                    if previous is _ABSENT:
                        del obj.__dict__[attr]
                    else:
                        obj.__dict__[attr] = previous
                return

    def restore(self) -> list[tuple[Any, str]]:
        """Undo every patch, last first. Returns the ``(obj, attr)`` that someone wrapped after us."""
        covered: list[tuple[Any, str]] = []
        for obj, attr, previous, value in reversed(self._saved):
            if obj.__dict__.get(attr, _ABSENT) is not value:
                covered.append((obj, attr))  # someone wrapped ours: leave theirs, ours must pass through
                continue
            if previous is _ABSENT:
                del obj.__dict__[attr]
            else:
                obj.__dict__[attr] = previous
        self._saved.clear()
        return covered
