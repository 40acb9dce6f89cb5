"""Other image transformers: micro-conditions, class labels, fused token layouts, lists of latents.

Each recipe returns the arguments that parameter names alone get wrong; every other parameter still
goes through the generic rules of ``magsdk.inspect.inputs``. ``OMIT`` leaves an optional parameter
at its default.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from magsdk.inspect.inputs import GRID, TEXT, Ctx
from magsdk.inspect.recipes.registry import OMIT, input_recipe


def _size_conditions(ctx: Ctx) -> dict[str, Any]:
    """SDXL-style micro-conditions of CogView: (B, 2) sizes and crop coordinates in pixels."""
    side = float(8 * GRID * ctx.patch()[1])
    size = torch.tensor([[side, side]] * ctx.batch)
    return {"original_size": size, "target_size": size.clone(), "crop_coords": torch.zeros(ctx.batch, 2)}


@input_recipe(
    "CogView3PlusTransformer2DModel",
    "CogView4Transformer2DModel",
)
def cogview4(ctx: Ctx) -> dict[str, Any]:
    return {"hidden_states": ctx.image(), **_size_conditions(ctx)}


@input_recipe("GlmImageTransformer2DModel")
def glm_image(ctx: Ctx) -> dict[str, Any]:
    tokens = GRID * GRID
    codebook = int(ctx.get("prior_vq_quantizer_codebook_size", default=16))
    values = _size_conditions(ctx)
    values.pop("original_size")
    return {
        "hidden_states": ctx.image(),
        "prior_token_id": torch.randint(0, codebook, (ctx.batch, tokens), generator=ctx.generator),
        "prior_token_drop": torch.zeros(ctx.batch, tokens, dtype=torch.bool),
        **values,
    }


@input_recipe("DiTTransformer2DModel")
def dit(ctx: Ctx) -> dict[str, Any]:
    return {"hidden_states": ctx.image(), "class_labels": torch.ones(ctx.batch, dtype=torch.long)}


@input_recipe("PixArtTransformer2DModel")
def pixart(ctx: Ctx) -> dict[str, Any]:
    image = ctx.image()
    side = float(image.shape[-1] * 8)
    return {
        "hidden_states": image,
        "added_cond_kwargs": {
            "resolution": torch.tensor([[side, side]] * ctx.batch),
            "aspect_ratio": torch.ones(ctx.batch, 1),
        },
    }


@input_recipe("ErnieImageTransformer2DModel")
def ernie(ctx: Ctx) -> dict[str, Any]:
    width = int(ctx.get("text_in_dim", default=ctx.get("hidden_size")))
    return {
        "hidden_states": ctx.image(),
        "text_bth": ctx.text(width),
        "text_lens": torch.full((ctx.batch,), TEXT, dtype=torch.long),
    }


@input_recipe("HiDreamImageTransformer2DModel")
def hidream(ctx: Ctx) -> dict[str, Any]:
    channels = ctx.get("caption_channels", default=[32, 32])
    layers = len(ctx.get("llama_layers", default=[0]))
    return {
        "hidden_states": ctx.image(),
        "encoder_hidden_states_t5": ctx.text(int(channels[0])),
        "encoder_hidden_states_llama3": ctx.randn(layers, ctx.batch, TEXT, int(channels[1])),
        "pooled_embeds": ctx.randn(ctx.batch, int(ctx.get("text_emb_dim"))),
    }


@input_recipe("Ideogram4Transformer2DModel")
def ideogram4(ctx: Ctx) -> dict[str, Any]:
    # one packed sequence: TEXT llm tokens (indicator 3) then the image tokens (indicator 2)
    image_tokens = GRID * GRID
    length = TEXT + image_tokens
    indicator = torch.tensor([3] * TEXT + [2] * image_tokens).expand(ctx.batch, -1).clone()
    positions = torch.zeros(ctx.batch, length, 3, dtype=torch.long)
    positions[:, :TEXT, 0] = torch.arange(TEXT)
    positions[:, TEXT:, 0] = TEXT
    positions[:, TEXT:, 1] = torch.arange(image_tokens) // GRID
    positions[:, TEXT:, 2] = torch.arange(image_tokens) % GRID
    return {
        "hidden_states": ctx.packed(length, int(ctx.get("in_channels"))),
        "encoder_hidden_states": ctx.text(int(ctx.get("llm_features_dim")), length),
        "position_ids": positions,
        "segment_ids": torch.zeros(ctx.batch, length, dtype=torch.long),
        "indicator": indicator,
    }


@input_recipe("Krea2Transformer2DModel")
def krea2(ctx: Ctx) -> dict[str, Any]:
    layers = int(ctx.get("num_text_layers", default=1))
    positions = torch.zeros(TEXT + GRID * GRID, 3, dtype=torch.long)
    positions[:TEXT, 0] = torch.arange(TEXT)
    positions[TEXT:, 1] = torch.arange(GRID * GRID) // GRID
    positions[TEXT:, 2] = torch.arange(GRID * GRID) % GRID
    return {
        "hidden_states": ctx.packed(),
        "encoder_hidden_states": ctx.randn(ctx.batch, TEXT, layers, int(ctx.get("text_hidden_dim"))),
        "position_ids": positions,
    }


@input_recipe("Lumina2Transformer2DModel")
def lumina2(ctx: Ctx) -> dict[str, Any]:
    return {"hidden_states": ctx.image()}


@input_recipe("OmniGenTransformer2DModel")
def omnigen(ctx: Ctx) -> dict[str, Any]:
    # no text prompt (input_ids=None): the sequence is [time token, image tokens]
    image = ctx.image()
    length = 1 + GRID * GRID
    return {
        "hidden_states": image,
        "input_ids": None,
        "input_img_latents": None,
        "input_image_sizes": None,
        "attention_mask": torch.ones(ctx.batch, length, length),
        "position_ids": torch.arange(length).unsqueeze(0).expand(ctx.batch, -1).clone(),
    }


@input_recipe("QwenImageTransformer2DModel")
def qwenimage(ctx: Ctx) -> dict[str, Any]:
    inputs: dict[str, Any] = {"hidden_states": ctx.packed(), "img_shapes": [[(1, GRID, GRID)]] * ctx.batch}
    if _rope_needs_text_lengths(ctx.model):
        inputs["txt_seq_lens"] = [TEXT] * ctx.batch
    return inputs


def _rope_needs_text_lengths(model: torch.nn.Module) -> bool:
    """diffusers < 0.37 builds QwenImage's rotary embedding from ``txt_seq_lens`` (later ones from the mask,
    with ``txt_seq_lens`` deprecated), so it is passed only where the embedding cannot do without it."""
    rope = getattr(model, "pos_embed", None)
    parameter = inspect.signature(type(rope).forward).parameters.get("txt_seq_lens") if rope is not None else None
    return parameter is not None and parameter.default is inspect.Parameter.empty


@input_recipe("QwenImage21Transformer2DModel")
def qwenimage21(ctx: Ctx) -> dict[str, Any]:
    # text slots, then one image slot per 4 target tokens (each slot expands to 4 tokens)
    target = GRID * GRID
    slots = target // 4
    mask = torch.tensor([[False] * TEXT + [True] * slots]).expand(ctx.batch, -1).clone()
    return {
        "hidden_states": ctx.packed(target),
        "encoder_hidden_states": ctx.text(int(ctx.get("context_in_dim"))),
        "img_shapes": [[(1, GRID, GRID)]] * ctx.batch,
        "img_mask": mask,
        "encoder_hidden_states_mask": OMIT,
    }


@input_recipe("ZImageTransformer2DModel")
def zimage(ctx: Ctx) -> dict[str, Any]:
    patch = int(ctx.get("all_patch_size", default=(2,))[0])
    f_patch = int(ctx.get("all_f_patch_size", default=(1,))[0])
    channels = int(ctx.get("in_channels"))
    return {
        "x": [ctx.randn(channels, f_patch, patch * GRID, patch * GRID) for _ in range(ctx.batch)],
        "t": ctx.timestep(),
        "cap_feats": [ctx.randn(TEXT, int(ctx.get("cap_feat_dim"))) for _ in range(ctx.batch)],
        "patch_size": patch,
        "f_patch_size": f_patch,
    }
