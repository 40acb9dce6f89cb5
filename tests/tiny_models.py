"""Tiny real diffusers models (random weights) and a plain flow-matching denoising loop.

Shared by the tests and the benchmarks: the loop is what a diffusers pipeline does, written
out so that CFG passes and cache-context names can be controlled.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers_features import FLUX2, MAG_CACHE, find, require


def tiny_flux(seed: int = 0, layers: int = 2, single_layers: int = 2, heads: int = 2, head_dim: int = 8,
              in_channels: int = 4) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=16,
        pooled_projection_dim=8, axes_dims_rope=[head_dim // 4, head_dim // 4, head_dim // 2],
    )
    return model.eval()


def tiny_flux2(seed: int = 0, layers: int = 2, single_layers: int = 2) -> Any:
    """A tiny FLUX.2 transformer; skips the calling test on a diffusers without one."""
    flux2 = require("diffusers.Flux2Transformer2DModel", FLUX2)
    torch.manual_seed(seed)
    model = flux2(
        patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        axes_dims_rope=(2, 2, 2, 2), timestep_guidance_channels=8, mlp_ratio=2.0,
    )
    return model.eval()


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def flux_inputs(model: torch.nn.Module, batch: int = 1, side: int = 4, text: int = 6,
                seed: int = 1) -> dict[str, Any]:
    """Conditioning inputs for a tiny Flux/Flux2 transformer (everything but latents and timestep)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    joint = cfg.joint_attention_dim
    n_axes = len(cfg.axes_dims_rope)
    img_ids = torch.zeros(side * side, n_axes)
    img_ids[:, 1] = torch.arange(side * side) // side
    img_ids[:, 2] = torch.arange(side * side) % side
    txt_ids = torch.zeros(text, n_axes)
    inputs: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(batch, text, joint, generator=g),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "return_dict": False,
    }
    if "pooled_projection_dim" in cfg:
        inputs["pooled_projections"] = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    flux2 = find("diffusers.Flux2Transformer2DModel")
    if flux2 is not None and isinstance(model, flux2):
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def denoise(model: torch.nn.Module, steps: int, *, cfg: bool = False, named_contexts: bool = False,
            side: int = 4, seed: int = 0, guidance_scale: float = 3.0, raise_at: int | None = None,
            scheduler: FlowMatchEulerDiscreteScheduler | None = None, text: int = 6) -> torch.Tensor:
    """Run one generation with FlowMatchEulerDiscreteScheduler; returns the final latents.

    ``cfg`` calls the transformer twice per step (cond, then uncond) as diffusers' true-CFG
    pipelines do; ``named_contexts`` wraps each call in ``cache_context("cond"/"uncond")``.
    """
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    channels = model.config.in_channels
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, side * side, channels, generator=g)
    cond = flux_inputs(model, side=side, text=text, seed=seed + 1)
    uncond = dict(cond, encoder_hidden_states=torch.zeros_like(cond["encoder_hidden_states"]))

    def context(name: str) -> contextlib.AbstractContextManager[Any]:
        if named_contexts:
            return model.cache_context(name)  # type: ignore[operator]
        return contextlib.nullcontext()

    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if raise_at is not None and i == raise_at:
                raise RuntimeError(f"stopped at step {i}")
            timestep = t.expand(1) / 1000
            with context("cond"):
                pred = model(hidden_states=latents, timestep=timestep, **cond)[0]
            if cfg:
                with context("uncond"):
                    pred_u = model(hidden_states=latents, timestep=timestep, **uncond)[0]
                pred = pred_u + guidance_scale * (pred - pred_u)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


@contextlib.contextmanager
def diffusers_mag_cache(model: torch.nn.Module, ratios: list[float], threshold: float, k: int,
                        retention: float, steps: int) -> Iterator[None]:
    """diffusers' own MagCache on ``model`` (the reference for parity); skips the test where diffusers lacks it."""
    MagCacheConfig = require("diffusers.hooks.MagCacheConfig", MAG_CACHE)
    apply_mag_cache = require("diffusers.hooks.apply_mag_cache", MAG_CACHE)

    apply_mag_cache(model, MagCacheConfig(mag_ratios=ratios, threshold=threshold, max_skip_steps=k,
                                          retention_ratio=retention, num_inference_steps=steps))
    yield


class ComputeRecorder:
    """Records, per transformer call, whether the first block really computed.

    A torch forward hook on a module *inside* the head block fires only when the block's own
    code runs, so the same probe observes magsdk and diffusers alike.
    """

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module) -> None:
        self.flags: list[bool] = []
        self._ran = False
        inner = next(m for m in head.modules() if m is not head and not list(m.children()))
        self._handles = [
            inner.register_forward_hook(self._on_inner),
            model.register_forward_pre_hook(self._on_call),
            model.register_forward_hook(self._on_return),
        ]

    def _on_inner(self, *_: Any) -> None:
        self._ran = True

    def _on_call(self, *_: Any) -> None:
        self._ran = False

    def _on_return(self, *_: Any) -> None:
        self.flags.append(self._ran)

    def computed_steps(self, passes_per_step: int = 1, branch: int = 0) -> list[int]:
        return [i // passes_per_step for i, ran in enumerate(self.flags) if ran and i % passes_per_step == branch]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
