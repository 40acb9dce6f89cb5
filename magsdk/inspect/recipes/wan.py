"""Wan-style video transformers (Wan, ChronoEdit, SkyReels-V2, VACE, Animate).

Each recipe returns the arguments that parameter names alone get wrong; every other parameter still
goes through the generic rules of ``magsdk.inspect.inputs``. ``OMIT`` leaves an optional parameter
at its default.
"""

from __future__ import annotations

from typing import Any

import torch

from magsdk.inspect.inputs import FRAMES, GRID, TEXT, Ctx
from magsdk.inspect.recipes.registry import OMIT, input_recipe


@input_recipe(
    "WanTransformer3DModel",
    "ChronoEditTransformer3DModel",
    "SkyReelsV2Transformer3DModel",
)
def wan(ctx: Ctx) -> dict[str, Any]:
    """Wan-style image-to-video: the attention splits off the image tokens by assuming 512 text tokens."""
    values: dict[str, Any] = {"hidden_states": ctx.video()}
    if ctx.get("added_kv_proj_dim") is not None:
        values["encoder_hidden_states"] = ctx.text(tokens=512)
        image_dim = ctx.get("image_dim")
        if image_dim is not None:
            values["encoder_hidden_states_image"] = ctx.randn(ctx.batch, TEXT, int(image_dim))
    return values


@input_recipe("WanVACETransformer3DModel")
def wan_vace(ctx: Ctx) -> dict[str, Any]:
    values = wan(ctx)
    video = values["hidden_states"]
    values["control_hidden_states"] = ctx.randn(ctx.batch, int(ctx.get("vace_in_channels")), *video.shape[2:])
    return values


@input_recipe("WanAnimateTransformer3DModel")
def wan_animate(ctx: Ctx) -> dict[str, Any]:
    video = ctx.video()
    size = int(ctx.get("motion_encoder_size", default=512))
    latent = int(ctx.get("latent_channels", default=16))
    return {
        "hidden_states": video,
        "pose_hidden_states": ctx.randn(ctx.batch, latent, video.shape[2] - 1, video.shape[3], video.shape[4]),
        "face_pixel_values": ctx.randn(ctx.batch, 3, video.shape[2] - 1, size, size),
    }


@input_recipe("WanAnimate2Transformer3DModel")
def wan_animate2(ctx: Ctx) -> dict[str, Any]:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    pt, ph, pw = ctx.patch()
    in_dim, out_dim = int(ctx.get("in_dim")), int(ctx.get("out_dim"))
    frames, height, width = pt * FRAMES, ph * GRID, pw * GRID
    grid = torch.tensor([[FRAMES, GRID, GRID]] * ctx.batch)
    return {
        "hidden_states": [ctx.randn(out_dim, frames, height, width) for _ in range(ctx.batch)],
        "condition_latents": [ctx.randn(in_dim - out_dim, frames, height, width) for _ in range(ctx.batch)],
        "encoder_hidden_states": [ctx.randn(TEXT, int(ctx.get("text_dim"))) for _ in range(ctx.batch)],
        "encoder_hidden_states_image": ctx.randn(ctx.batch, TEXT, 1280) if ctx.get("use_img_emb") else OMIT,
        "kv_cache": WanAnimate2KVCache(int(ctx.get("num_layers"))),
        "kv_cache_mode": "extract",
        "seq_len": FRAMES * GRID * GRID,
        "offset_grid_sizes": grid,
        "reference_grid_sizes": grid.clone(),
    }
