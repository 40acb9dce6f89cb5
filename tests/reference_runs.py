"""Runs of the bundled reference pipeline and of a bare tiny Flux that several test modules make alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import flux_inputs

from magsdk.reference.components import build_pipeline


def reference_pipe() -> Any:
    """The reference pipeline (random init, seed 0), quiet."""
    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved_reference_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference pipeline saved with ``save_pretrained``, as a user's local folder (no hub)."""
    folder = tmp_path_factory.mktemp("models") / "digits-pipeline"
    build_pipeline(seed=0).save_pretrained(folder)
    return folder


def generate(pipe: Any, steps: int, seed: int = 0) -> torch.Tensor:
    """One true-CFG generation (two branches per step), latents out."""
    with torch.no_grad():
        out = pipe("a cat", negative_prompt="blurry", true_cfg_scale=2.0, num_inference_steps=steps, height=32,
                   width=32, max_sequence_length=16, output_type="latent",
                   generator=torch.Generator().manual_seed(seed))
    return out.images  # type: ignore[no-any-return]


def hand_loop(model: torch.nn.Module, scheduler: FlowMatchEulerDiscreteScheduler, steps: int) -> torch.Tensor:
    """A user's own denoising loop over a bare transformer: the timestep argument is all it tells."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 4, generator=g)
    cond = flux_inputs(model, side=4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            pred = model(hidden_states=latents, timestep=t.expand(1) / 1000, **cond)[0]
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


def prompts_file(tmp_path_factory: pytest.TempPathFactory, *lines: str) -> Path:
    """A ``--prompts`` file with these lines."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path
