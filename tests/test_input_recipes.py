"""Input recipes live in their own family modules, registered by decorator (issue 12, item 12)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from magsdk.inspect import inputs
from magsdk.inspect.recipes import FAMILIES, OMIT, input_recipe, recipe_for, registered

#: Every class that had a recipe in the single dict of magsdk/inspect/inputs.py.
RECIPE_CLASSES = {
    "AceStepTransformer1DModel", "AnyFlowFARTransformer3DModel", "AnyFlowTransformer3DModel",
    "BriaFibo2Transformer2DModel", "BriaFiboTransformer2DModel", "BriaTransformer2DModel",
    "ChromaTransformer2DModel", "ChronoEditTransformer3DModel", "CogVideoXTransformer3DModel",
    "CogView3PlusTransformer2DModel", "CogView4Transformer2DModel", "ConsisIDTransformer3DModel",
    "Cosmos3OmniTransformer", "CosmosTransformer3DModel", "DiTTransformer2DModel", "ErnieImageTransformer2DModel",
    "Flux2Transformer2DModel", "Flux3Transformer2DModel", "FluxTransformer2DModel", "GlmImageTransformer2DModel",
    "HiDreamImageTransformer2DModel", "HunyuanVideo15Transformer3DModel", "HunyuanVideoFramepackTransformer3DModel",
    "Ideogram4Transformer2DModel", "JoyImageEditPlusTransformer3DModel", "Kandinsky5Transformer3DModel",
    "Kandinsky6SRTransformer3DModel", "Kandinsky6Transformer3DModel", "Krea2Transformer2DModel",
    "LTX2VideoTransformer3DModel", "LTXVideoTransformer3DModel", "LatteTransformer3DModel",
    "LongCatImageTransformer2DModel", "Lumina2Transformer2DModel", "MiniMaxH3Transformer3DModel",
    "MiniMaxMusic3Transformer1DModel", "OmniGenTransformer2DModel", "OvisImageTransformer2DModel",
    "PixArtTransformer2DModel", "QwenImage21Transformer2DModel", "QwenImageTransformer2DModel",
    "SanaWMLTX2RefinerTransformer3DModel", "SanaWMTransformer3DModel", "SkyReelsV2Transformer3DModel",
    "TransformerTemporalModel", "WanAnimate2Transformer3DModel", "WanAnimateTransformer3DModel",
    "WanTransformer3DModel", "WanVACETransformer3DModel", "ZImageTransformer2DModel",
}


def test_every_recipe_is_registered_from_a_family_module() -> None:
    recipes = {k: v for k, v in registered().items() if v.__module__.startswith("magsdk.")}  # not the tests' own
    assert set(recipes) == RECIPE_CLASSES
    modules = {recipe.__module__ for recipe in recipes.values()}
    assert modules == {f"magsdk.inspect.recipes.{family}" for family in FAMILIES}
    assert recipes["WanTransformer3DModel"] is recipes["SkyReelsV2Transformer3DModel"]


def test_inputs_keeps_the_generic_synthesiser_only() -> None:
    source = Path(inputs.__file__).read_text()
    for gone in ("_RECIPES", "_UNIT_TIMESTEP", "_THOUSAND_TIMESTEP", "_magsdk_timestep_scale", "def _flux_like"):
        assert gone not in source, gone
    assert len(source.splitlines()) < 450


class MyBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.proj(hidden_states)


class RecipeOnlyModel(torch.nn.Module):
    """``warp`` cannot be synthesized from its name; ``bias`` must stay at its default."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([MyBlock(), MyBlock()])

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, warp: torch.Tensor,
                bias: Any = "default") -> torch.Tensor:
        assert bias == "default"
        for block in self.blocks:
            hidden_states = block(hidden_states * warp)
        return hidden_states


class SubclassModel(RecipeOnlyModel):
    pass


def test_a_user_recipe_registered_by_decorator_is_used_for_the_class_and_its_subclasses() -> None:
    @input_recipe("RecipeOnlyModel")
    def recipe(ctx: inputs.Ctx) -> dict[str, Any]:
        return {"hidden_states": ctx.packed(channels=4), "warp": torch.ones(1), "bias": OMIT}

    assert recipe_for(SubclassModel) is recipe
    _, kwargs = inputs.synthesize_inputs(SubclassModel())
    assert kwargs["hidden_states"].shape == (1, inputs.GRID * inputs.GRID, 4) and "bias" not in kwargs
    assert kwargs["timestep"].shape == (1,)  # still from the generic rules
    with pytest.raises(ValueError, match="already has the input recipe"):
        input_recipe("RecipeOnlyModel")(lambda ctx: {})
    assert inspect.isfunction(recipe)
