"""The one way magsdk changes someone else's object: patch an instance attribute, put it back exactly.

The runtime (a transformer's ``forward`` and ``cache_context``, a scheduler's ``set_timesteps``),
first-call tracing and ``magsdk inspect``'s block tracing all go through ``Patches``. Each
patched value is marked with its owner, so patching an attribute that magsdk already patched is
refused with a clear error instead of stacking wrappers (which would run the cache twice or
restore the wrong function later). Restoring is exact: an attribute the instance did not have
is removed again, not set to the class's function. If somebody else wrapped the attribute after
us (accelerate's offload hooks, diffusers' hook registry), their wrapper is left in place — and
``restore`` reports ``False`` for it, so that the caller can make its own wrapper a pass-through.

What is patched in is a ``PatchedCall``, not a bare function, because magsdk's wrappers close
over the *original* object: a deep copy that carried one would set up the original scheduler
(LTX2 pipelines deep-copy their scheduler for the audio stream) or run the original transformer.
``copy.deepcopy`` of a ``PatchedCall`` made while its object is being copied gives the copy its
own attribute back — the one magsdk replaced, or the class's method — also where another library
kept ours (accelerate's offload hook keeps the forward it wrapped as ``_old_forward``). So a deep
copy of a pipeline, transformer or scheduler magsdk patched is a plain object.
This module imports only the standard library (see docs/design.md, "Patching").
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

from magsdk.errors import UsageError

#: Attribute set on every value magsdk patched in: the owner's description.
MARK = "__magsdk_patch__"

_ABSENT = object()


class PatchedCall:
    """A patched-in callable: calls ``fn``; a deep copy of its object gets its own, unpatched attribute.

    One more Python frame per call than a bare function: the price of being copyable.
    """

    def __init__(self, fn: Callable[..., Any], obj: Any, attr: str, previous: Any, owner: str) -> None:
        functools.update_wrapper(self, fn)  # name, docstring, and inspect.signature through __wrapped__
        self.fn = fn
        self.obj = obj
        self.attr = attr
        self.previous = previous
        setattr(self, MARK, owner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        twin = memo.get(id(self.obj))
        if twin is None:  # copied apart from its object (from a shallow copy's dict): nothing to rebind to
            return self
        if self.previous is not _ABSENT:
            return copy.deepcopy(self.previous, memo)
        return getattr(type(twin), self.attr).__get__(twin, type(twin))


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
        self._set(obj, attr, PatchedCall(value, obj, attr, current, self.owner))

    def set_value(self, obj: Any, attr: str, value: Any) -> None:
        """Set a plain (unmarked) instance attribute, removed or restored with the patches."""
        self._set(obj, attr, value)

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        previous = obj.__dict__.get(attr, _ABSENT)
        obj.__dict__[attr] = value
        self._saved.append((obj, attr, previous, value))

    @staticmethod
    def _put_back(obj: Any, attr: str, previous: Any, value: Any) -> bool:
        """Undo one patch; False if somebody wrapped ours since (theirs stays, ours must pass through)."""
        if obj.__dict__.get(attr, _ABSENT) is not value:
            return False
        if previous is _ABSENT:
            del obj.__dict__[attr]
        else:
            obj.__dict__[attr] = previous
        return True

    def restore_one(self, obj: Any, attr: str) -> None:
        """Undo the patch of ``obj.attr`` alone (an object the owner stops using while it keeps the others)."""
        for index, (saved_obj, saved_attr, previous, value) in enumerate(self._saved):
            if saved_obj is obj and saved_attr == attr:
                del self._saved[index]
                self._put_back(obj, attr, previous, value)
                return

    def restore(self) -> list[tuple[Any, str]]:
        """Undo every patch, last first. Returns the ``(obj, attr)`` that someone wrapped after us."""
        covered: list[tuple[Any, str]] = []
        for obj, attr, previous, value in reversed(self._saved):
            if not self._put_back(obj, attr, previous, value):
                covered.append((obj, attr))
        self._saved.clear()
        return covered
