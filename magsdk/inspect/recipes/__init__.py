"""Input recipes per model family, registered with ``@input_recipe(...)`` (see ``registry``).

The bundled families are imported on the first look-up (``recipe_for`` / ``registered``), since
they build on ``magsdk.inspect.inputs``, which looks recipes up. Families are grouped by how their
forward differs from the generic rules: ``flux`` (rope ids), ``wan`` (video, image conditioning),
``video``, ``image``, ``audio``.
"""

from magsdk.inspect.recipes.registry import FAMILIES, OMIT, Recipe, input_recipe, recipe_for, registered

__all__ = ["FAMILIES", "OMIT", "Recipe", "input_recipe", "recipe_for", "registered"]
