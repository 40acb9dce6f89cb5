"""Flux-style transformers: packed latent tokens with rope ids (Flux, Chroma, LongCat, Ovis, Bria, Flux2, Flux3).

Each recipe returns the arguments that parameter names alone get wrong; every other parameter still
goes through the generic rules of ``magsdk.inspect.inputs``. ``OMIT`` leaves an optional parameter
at its default.
"""

from __future__ import annotations

from typing import Any

import torch

from magsdk.inspect.inputs import TEXT, Ctx, flux_ids, rope_axes_count
from magsdk.inspect.recipes.registry import OMIT, input_recipe


@input_recipe(
    "ChromaTransformer2DModel",
    "FluxTransformer2DModel",
    "LongCatImageTransformer2DModel",
    "OvisImageTransformer2DModel",
)
def flux_like(ctx: Ctx) -> dict[str, Any]:
    axes = rope_axes_count(ctx)
    img, txt = flux_ids(ctx, axes)
    return {"hidden_states": ctx.packed(), "img_ids": img, "txt_ids": txt}


@input_recipe("BriaTransformer2DModel")
def bria(ctx: Ctx) -> dict[str, Any]:
    values = flux_like(ctx)
    if ctx.get("pooled_projection_dim") is None:
        values["pooled_projections"] = OMIT
    return values


@input_recipe("BriaFiboTransformer2DModel")
def bria_fibo(ctx: Ctx) -> dict[str, Any]:
    values = bria(ctx)
    # one text-encoder hidden state per block, each as wide as the text encoder
    layers = int(ctx.get("num_layers", default=1)) + int(ctx.get("num_single_layers", default=0))
    width = int(ctx.get("text_encoder_dim", default=ctx.text_width()))
    values["text_encoder_layers"] = [ctx.text(width) for _ in range(layers)]
    return values


@input_recipe("BriaFibo2Transformer2DModel")
def bria_fibo2(ctx: Ctx) -> dict[str, Any]:
    bundles = 1 + len(ctx.get("injection_layer_ids", default=()))
    return {
        "hidden_states": ctx.image(),
        "encoder_hidden_states": ctx.randn(ctx.batch, bundles, TEXT, ctx.text_width()),
        "encoder_attention_mask": ctx.mask(),
    }


@input_recipe("Flux2Transformer2DModel")
def flux2(ctx: Ctx) -> dict[str, Any]:
    axes = rope_axes_count(ctx, 4)
    img, txt = flux_ids(ctx, axes, batched=True)
    return {"hidden_states": ctx.packed(), "img_ids": img, "txt_ids": txt,
            "guidance": torch.full((ctx.batch,), 3.5) if ctx.get("guidance_embeds") else OMIT}


@input_recipe("Flux3Transformer2DModel")
def flux3(ctx: Ctx) -> dict[str, Any]:
    axes = rope_axes_count(ctx, 4)
    img, txt = flux_ids(ctx, axes)
    values: dict[str, Any] = {"hidden_states": ctx.packed(), "img_ids": img, "txt_ids": txt}
    if ctx.get("flow_map"):
        values["target_timestep"] = ctx.timestep(0.0)
    return values
