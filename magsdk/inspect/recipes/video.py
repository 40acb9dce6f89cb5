"""Other video transformers: frame-major latents, per-frame timesteps, rope positions and history streams.

Each recipe returns the arguments that parameter names alone get wrong; every other parameter still
goes through the generic rules of ``magsdk.inspect.inputs``. ``OMIT`` leaves an optional parameter
at its default.
"""

from __future__ import annotations

from typing import Any

import torch

from magsdk.inspect.inputs import FRAMES, GRID, TEXT, Ctx, timestep_value
from magsdk.inspect.recipes.registry import OMIT, input_recipe


def _video_fchw(ctx: Ctx, channels: int | None = None) -> torch.Tensor:
    """(B, F, C, H, W): CogVideoX / ConsisID / AnyFlow order."""
    pt, ph, pw = ctx.patch()
    return ctx.randn(ctx.batch, pt * FRAMES, channels or ctx.channels(), ph * GRID, pw * GRID)


@input_recipe(
    "CogVideoXTransformer3DModel",
    "ConsisIDTransformer3DModel",
)
def cogvideox(ctx: Ctx) -> dict[str, Any]:
    # the sincos position table covers exactly max_text_seq_length text tokens
    tokens = int(ctx.get("max_text_seq_length", default=TEXT))
    return {"hidden_states": _video_fchw(ctx), "encoder_hidden_states": ctx.text(tokens=tokens)}


@input_recipe("AnyFlowTransformer3DModel")
def anyflow(ctx: Ctx) -> dict[str, Any]:
    t = torch.full((ctx.batch, FRAMES), timestep_value(ctx.model))
    return {"hidden_states": _video_fchw(ctx), "timestep": t, "r_timestep": t.clone()}


@input_recipe("AnyFlowFARTransformer3DModel")
def anyflow_far(ctx: Ctx) -> dict[str, Any]:
    # the spatial grid must also divide by the compressed patch size used for far-away chunks
    compressed = ctx.get("compressed_patch_size", default=(1, 4, 4))
    _, ph, pw = ctx.patch()
    grid = max(GRID, int(compressed[1]) // ph)
    t = torch.full((ctx.batch, FRAMES), timestep_value(ctx.model))
    return {
        "hidden_states": ctx.randn(ctx.batch, FRAMES, ctx.channels(), ph * grid, pw * grid),
        "timestep": t,
        "r_timestep": t.clone(),
        "chunk_partition": [1] * FRAMES,
    }


@input_recipe("CosmosTransformer3DModel")
def cosmos(ctx: Ctx) -> dict[str, Any]:
    video = ctx.video(int(ctx.get("in_channels")))
    values: dict[str, Any] = {"hidden_states": video}
    if ctx.get("concat_padding_mask"):
        values["padding_mask"] = torch.zeros(ctx.batch, 1, video.shape[-2], video.shape[-1])
    return values


@input_recipe("Cosmos3OmniTransformer")
def cosmos3(ctx: Ctx) -> dict[str, Any]:
    # one packed sequence without batch axis: TEXT text tokens ("und"), then one latent frame of GRID×GRID patches
    patch = int(ctx.get("latent_patch_size", default=2))
    channels = int(ctx.get("latent_channel"))
    vision = GRID * GRID
    length = TEXT + vision
    positions = torch.zeros(3, length, dtype=torch.long)
    positions[:, :TEXT] = torch.arange(TEXT)
    positions[0, TEXT:] = TEXT
    positions[1, TEXT:] = TEXT + torch.arange(vision) // GRID
    positions[2, TEXT:] = TEXT + torch.arange(vision) % GRID
    vision_rows = torch.arange(TEXT, length)
    return {
        "input_ids": torch.randint(0, int(ctx.get("vocab_size")), (TEXT,), generator=ctx.generator),
        "text_indexes": torch.arange(TEXT),
        "position_ids": positions,
        "und_len": TEXT,
        "sequence_length": length,
        "vision_tokens": [ctx.randn(1, channels, 1, patch * GRID, patch * GRID)],
        "vision_token_shapes": [(1, GRID, GRID)],
        "vision_sequence_indexes": vision_rows,
        "vision_mse_loss_indexes": vision_rows.clone(),
        "vision_timesteps": torch.full((vision,), timestep_value(ctx.model)),
        "vision_noisy_frame_indexes": [torch.tensor([0])],
    }


@input_recipe("HunyuanVideo15Transformer3DModel")
def hunyuan_video15(ctx: Ctx) -> dict[str, Any]:
    return {
        "hidden_states": ctx.video(),
        "encoder_hidden_states_2": ctx.text(int(ctx.get("text_embed_2_dim"))),
        "encoder_attention_mask_2": ctx.mask(),
        "image_embeds": torch.zeros(ctx.batch, TEXT, int(ctx.get("image_embed_dim"))),
    }


@input_recipe("HunyuanVideoFramepackTransformer3DModel")
def hunyuan_framepack(ctx: Ctx) -> dict[str, Any]:
    video = ctx.video()
    return {
        "hidden_states": video,
        "image_embeds": ctx.randn(ctx.batch, TEXT, int(ctx.get("image_proj_dim"))),
        "indices_latents": torch.arange(video.shape[2]),
        # diffusers reads the rope of every history stream, so all of them must be given
        "latents_clean": ctx.randn(*video.shape[:2], 1, *video.shape[3:]),
        "indices_latents_clean": torch.arange(1),
        "latents_history_2x": ctx.randn(*video.shape[:2], 2, *video.shape[3:]),
        "indices_latents_history_2x": torch.arange(2),
        "latents_history_4x": ctx.randn(*video.shape[:2], 4, *video.shape[3:]),
        "indices_latents_history_4x": torch.arange(4),
        "guidance": torch.full((ctx.batch,), 3.5) if ctx.get("guidance_embeds") else OMIT,
    }


@input_recipe("JoyImageEditPlusTransformer3DModel")
def joyimage_plus(ctx: Ctx) -> dict[str, Any]:
    pt, ph, pw = ctx.patch()
    patches = FRAMES * GRID * GRID
    return {
        "hidden_states": ctx.randn(ctx.batch, patches, ctx.channels(), pt, ph, pw),
        "shape_list": [[(FRAMES, GRID, GRID)] for _ in range(ctx.batch)],
        "encoder_hidden_states_mask": ctx.mask(dtype=torch.long),
    }


@input_recipe("Kandinsky5Transformer3DModel")
def kandinsky5(ctx: Ctx) -> dict[str, Any]:
    pt, ph, pw = ctx.patch()
    frames, height, width = pt * FRAMES, ph * GRID, pw * GRID
    return {
        "hidden_states": ctx.randn(ctx.batch, frames, height, width, int(ctx.get("in_visual_dim"))),
        "encoder_hidden_states": ctx.text(int(ctx.get("in_text_dim"))),
        "pooled_projections": ctx.randn(ctx.batch, int(ctx.get("in_text_dim2"))),
        "visual_rope_pos": (torch.arange(FRAMES), torch.arange(GRID), torch.arange(GRID)),
        "text_rope_pos": torch.arange(TEXT),
    }


@input_recipe("Kandinsky6Transformer3DModel")
def kandinsky6(ctx: Ctx) -> dict[str, Any]:
    pt, ph, pw = ctx.patch()
    channels = int(ctx.get("in_visual_dim"))
    if ctx.get("visual_cond"):
        channels = 2 * channels + 1
    return {
        "hidden_states": ctx.randn(ctx.batch, pt * FRAMES, ph * GRID, pw * GRID, channels),
        "encoder_hidden_states": ctx.text(int(ctx.get("in_text_dim"))),
        "pooled_projections": ctx.randn(ctx.batch, int(ctx.get("in_text_dim2"))),
        "encoder_attention_mask": OMIT,
    }


@input_recipe("Kandinsky6SRTransformer3DModel")
def kandinsky6_sr(ctx: Ctx) -> dict[str, Any]:
    # NABLA attention works on 8×8 token tiles
    pt, ph, pw = ctx.patch()
    grid = 8
    channels = 2 * int(ctx.get("in_visual_dim")) + 1  # noisy latents, low-resolution condition, mask
    return {"hidden_states": ctx.randn(ctx.batch, pt * 1, ph * grid, pw * grid, channels)}


@input_recipe("LatteTransformer3DModel")
def latte(ctx: Ctx) -> dict[str, Any]:
    # the temporal position table covers exactly video_length frames
    frames = int(ctx.get("video_length", default=FRAMES))
    return {"hidden_states": ctx.video(frames=frames), "encoder_attention_mask": OMIT}


@input_recipe("LTXVideoTransformer3DModel")
def ltx(ctx: Ctx) -> dict[str, Any]:
    return {
        "hidden_states": ctx.packed(FRAMES * GRID * GRID),
        "num_frames": FRAMES,
        "height": GRID,
        "width": GRID,
    }


@input_recipe("LTX2VideoTransformer3DModel")
def ltx2(ctx: Ctx) -> dict[str, Any]:
    caption = int(ctx.get("caption_channels"))
    return {
        "hidden_states": ctx.packed(FRAMES * GRID * GRID),
        "audio_hidden_states": ctx.randn(ctx.batch, TEXT, int(ctx.get("audio_in_channels"))),
        "encoder_hidden_states": ctx.text(caption),
        "audio_encoder_hidden_states": ctx.text(caption),
        "audio_encoder_attention_mask": ctx.mask(dtype=torch.long),
        "encoder_attention_mask": ctx.mask(dtype=torch.long),
        "num_frames": FRAMES,
        "height": GRID,
        "width": GRID,
        "audio_num_frames": TEXT,
    }


@input_recipe("SanaWMLTX2RefinerTransformer3DModel")
def sana_wm_refiner(ctx: Ctx) -> dict[str, Any]:
    model: Any = ctx.model
    rope = model.build_rotary_emb_for_absolute_positions(
        ctx.batch, list(range(FRAMES)), GRID, GRID, torch.device("cpu"), fps=24.0
    )
    return {
        "hidden_states": ctx.packed(FRAMES * GRID * GRID),
        "encoder_hidden_states": ctx.text(int(ctx.get("caption_channels"))),
        "video_rotary_emb": rope,
        "encoder_attention_mask": ctx.mask(dtype=torch.long),
    }


@input_recipe("SanaWMTransformer3DModel")
def sana_wm(ctx: Ctx) -> dict[str, Any]:
    # one timestep per latent frame: (B, 1, F)
    timestep = torch.full((ctx.batch, 1, FRAMES), timestep_value(ctx.model))
    return {"hidden_states": ctx.video(), "timestep": timestep, "encoder_attention_mask": ctx.mask(dtype=torch.long)}


@input_recipe("TransformerTemporalModel")
def temporal(ctx: Ctx) -> dict[str, Any]:
    # (batch × frames, C, H, W), attention across frames
    return {
        "hidden_states": ctx.randn(ctx.batch * FRAMES, ctx.channels(), GRID, GRID),
        "num_frames": FRAMES,
        "encoder_hidden_states": OMIT,
    }
