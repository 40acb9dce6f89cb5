"""The one way magsdk changes someone else's object: patch an instance attribute, put it back exactly.

The runtime (a transformer's ``forward`` and ``cache_context``, a scheduler's ``set_timesteps``),
first-call tracing and ``magsdk inspect``'s block tracing all go through ``Patches``. Each
patched value is marked with its owner, so patching an attribute that magsdk already patched is
refused with a clear error instead of stacking wrappers (which would run the cache twice or
restore the wrong function later). Restoring is exact: an attribute the instance did not have
is removed again, not set to the class's function. If somebody else wrapped the attribute after
us (accelerate's offload hooks, diffusers' hook registry), their wrapper is left in place — and
``restore`` reports ``False`` for it, so that the caller can make its own wrapper a pass-through.

A patched object also gets an instance ``__deepcopy__`` for as long as it carries a patch:
``copy.deepcopy`` of it (LTX2 pipelines deep-copy their scheduler for the audio stream; users
deep-copy pipelines) makes the copy from the object as it was before magsdk touched it. Without it
the copy would carry magsdk's wrappers, closures over the *original* object: the copy's
``set_timesteps`` would set up the original scheduler, the copy's ``forward`` run the original
transformer. A deep copy is a plain object; enable magsdk on it if it should be cached.
This module imports only the standard library (see docs/design.md, "Patching").
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from magsdk.errors import UsageError

#: Attribute set on every value magsdk patched in: the owner's description.
MARK = "__magsdk_patch__"

_ABSENT = object()


_DEEPCOPY = "__deepcopy__"


class _CopyUnpatched:
    """``obj.__deepcopy__`` while magsdk has patched ``obj``: deep copies are made of the unpatched object."""

    def __init__(self, obj: Any, previous: Any) -> None:
        self.obj = obj
        self.previous = previous  # an instance __deepcopy__ the object had before ours, or _ABSENT
        #: attribute -> (the value magsdk set, the value it replaced or _ABSENT), per patch in place.
        self.attrs: dict[str, tuple[Any, Any]] = {}

    def __call__(self, memo: dict[int, Any]) -> Any:
        state = self.obj.__dict__
        saved: dict[str, Any] = {}
        for attr, (value, previous) in [*self.attrs.items(), (_DEEPCOPY, (self, self.previous))]:
            if state.get(attr, _ABSENT) is not value:
                continue  # somebody wrapped ours since: theirs is theirs to copy
            saved[attr] = state.pop(attr)
            if previous is not _ABSENT:
                state[attr] = previous
        try:
            return copy.deepcopy(self.obj, memo)
        finally:
            state.update(saved)


def _guard(obj: Any) -> _CopyUnpatched:
    guard = obj.__dict__.get(_DEEPCOPY, _ABSENT)
    if not isinstance(guard, _CopyUnpatched) or guard.obj is not obj:
        guard = _CopyUnpatched(obj, guard)
        obj.__dict__[_DEEPCOPY] = guard
    return guard


def _unguard(obj: Any, attr: str) -> None:
    guard = obj.__dict__.get(_DEEPCOPY)
    if not isinstance(guard, _CopyUnpatched) or guard.obj is not obj:
        return
    guard.attrs.pop(attr, None)
    if not guard.attrs:
        if guard.previous is _ABSENT:
            del obj.__dict__[_DEEPCOPY]
        else:
            obj.__dict__[_DEEPCOPY] = guard.previous


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
        self._set(obj, attr, value)

    def set_value(self, obj: Any, attr: str, value: Any) -> None:
        """Set a plain (unmarked) instance attribute, removed or restored with the patches."""
        self._set(obj, attr, value)

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        previous = obj.__dict__.get(attr, _ABSENT)
        _guard(obj).attrs[attr] = (value, previous)
        obj.__dict__[attr] = value
        self._saved.append((obj, attr, previous, value))

    @staticmethod
    def _put_back(obj: Any, attr: str, previous: Any, value: Any) -> bool:
        """Undo one patch; False if somebody wrapped ours since (theirs stays, ours must pass through)."""
        _unguard(obj, attr)
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
