"""The registry of input recipes: per-family ``forward`` inputs that parameter names alone get wrong.

A recipe is a function ``(Ctx) -> {parameter: value}`` registered for one or more transformer
class names with ``@input_recipe("WanTransformer3DModel", ...)``. ``synthesize_inputs`` looks the
model's class and its bases up (nearest first) and fills every parameter the recipe leaves out
by the generic rules. This module holds no recipe itself, so that a recipe module (or a user's
own, imported before inspecting) can register without importing the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from magsdk.inspect.inputs import Ctx

Recipe = Callable[["Ctx"], dict[str, Any]]

OMIT: Any = object()
"""A recipe value meaning: leave this parameter at its default."""

#: The bundled recipe modules (``magsdk/inspect/recipes/<family>.py``), imported on the first look-up.
FAMILIES = ("audio", "flux", "image", "video", "wan")

_RECIPES: dict[str, Recipe] = {}
_loaded = False


def _load_bundled() -> None:
    """Import the family modules once; they import ``magsdk.inspect.inputs``, so not at import time."""
    global _loaded
    if not _loaded:
        _loaded = True
        for family in FAMILIES:
            importlib.import_module(f"magsdk.inspect.recipes.{family}")


def input_recipe(*class_names: str) -> Callable[[Recipe], Recipe]:
    """Register the decorated function as the input recipe of each named transformer class.

    A class name registered twice is an error: two families disagreeing about one class would
    otherwise depend on import order.
    """
    if not class_names:
        raise ValueError("input_recipe needs at least one transformer class name")

    def register(recipe: Recipe) -> Recipe:
        for name in class_names:
            other = _RECIPES.get(name)
            if other is not None and other is not recipe:
                raise ValueError(
                    f"{name} already has the input recipe {other.__module__}.{other.__qualname__}; "
                    f"{recipe.__module__}.{recipe.__qualname__} cannot replace it"
                )
            _RECIPES[name] = recipe
        return recipe

    return register


def recipe_for(cls: type) -> Recipe | None:
    """The recipe of ``cls`` or of its nearest base class that has one."""
    _load_bundled()
    for base in cls.__mro__:
        recipe = _RECIPES.get(base.__name__)
        if recipe is not None:
            return recipe
    return None


def registered() -> dict[str, Recipe]:
    """Class name → recipe, for every registered recipe (a copy)."""
    _load_bundled()
    return dict(_RECIPES)
