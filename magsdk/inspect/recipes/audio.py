"""Audio and audio-video transformers (ACE-Step, MiniMax).

Each recipe returns the arguments that parameter names alone get wrong; every other parameter still
goes through the generic rules of ``magsdk.inspect.inputs``. ``OMIT`` leaves an optional parameter
at its default.
"""

from __future__ import annotations

from typing import Any

import torch

from magsdk.inspect.inputs import GRID, TEXT, Ctx
from magsdk.inspect.recipes.registry import input_recipe


@input_recipe("AceStepTransformer1DModel")
def ace_step(ctx: Ctx) -> dict[str, Any]:
    length = 2 * int(ctx.get("patch_size", default=1))
    acoustic = int(ctx.get("audio_acoustic_hidden_dim", default=64))
    context = int(ctx.get("in_channels")) - acoustic
    width = int(ctx.get("encoder_hidden_size", "hidden_size"))
    t = ctx.timestep()
    return {
        "hidden_states": ctx.randn(ctx.batch, length, acoustic),
        "context_latents": ctx.randn(ctx.batch, length, context),
        "encoder_hidden_states": ctx.text(width),
        "timestep": t,
        "timestep_r": t.clone(),
    }


@input_recipe("MiniMaxH3Transformer3DModel")
def minimax_h3(ctx: Ctx) -> dict[str, Any]:
    # one packed sequence: text rows, then video rows, then audio rows; one shared timestep
    video, audio = GRID * GRID, TEXT
    length = TEXT + video + audio
    tags = torch.tensor([1] * TEXT + [0] * video + [2] * audio)
    positions = torch.zeros(length, 3, dtype=torch.long)
    positions[:TEXT, 0] = torch.arange(TEXT)
    positions[TEXT : TEXT + video, 1] = torch.arange(video) // GRID
    positions[TEXT : TEXT + video, 2] = torch.arange(video) % GRID
    positions[TEXT + video :, 0] = torch.arange(audio)
    pt, ph, pw = ctx.patch()
    return {
        "hidden_states": ctx.packed(video, int(ctx.get("in_channels")) * pt * ph * pw),
        "audio_hidden_states": ctx.randn(ctx.batch, audio, int(ctx.get("audio_in_channels"))),
        "encoder_hidden_states": ctx.text(int(ctx.get("text_dim"))),
        "timestep": torch.tensor([0.5]),
        "timestep_indices": torch.zeros(length, dtype=torch.long),
        "token_tags": tags,
        "position_ids": positions,
        "text_indices": torch.arange(TEXT),
        "video_indices": torch.arange(TEXT, TEXT + video),
        "audio_indices": torch.arange(TEXT + video, length),
    }


@input_recipe("MiniMaxMusic3Transformer1DModel")
def minimax_music3(ctx: Ctx) -> dict[str, Any]:
    length = TEXT
    return {
        "hidden_states": ctx.randn(ctx.batch, int(ctx.get("in_channels")), length),
        "encoder_hidden_states": ctx.randn(ctx.batch, length, int(ctx.get("condition_dim"))),
    }
