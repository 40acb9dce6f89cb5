"""magsdk together with the diffusers hooks people use to fit big models, in both orders.

Layerwise casting (bf16 storage, fp32 compute), group offloading (block and leaf level; on this
CPU-only machine the onload device is the CPU, so the hooks run and move nothing) and
``enable_model_cpu_offload`` (accelerate's hooks; run here with ``device="cpu"``). Each is
compared with magsdk alone: the same computed steps, and the same output (exactly where the
hook changes no arithmetic, closely where casting rounds the weights to bf16).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers_features import lacks

import magsdk
from strategies.flux import VARIANTS

FLUX_RATIOS = VARIANTS[0]["calibrations"][0]["branches"]["default"]  # flux.1-dev
CONFIG = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, threshold=0.24, max_skip_steps=5, retention_ratio=0.1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base_pipe() -> Any:
    from magsdk.reference.components import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any) -> torch.Tensor:
    with torch.no_grad():
        out = pipe("a cat", num_inference_steps=28, height=32, width=32, max_sequence_length=16, output_type="latent",
                   generator=torch.Generator().manual_seed(0))
    return out.images  # type: ignore[no-any-return]


def run(pipe: Any, hook: Callable[[Any], None] | None, magsdk_first: bool) -> tuple[torch.Tensor, list[int]]:
    pipe = copy.deepcopy(pipe)
    if hook is not None and not magsdk_first:
        hook(pipe)
    handle = magsdk.enable(pipe, CONFIG)
    if hook is not None and magsdk_first:
        hook(pipe)
    out = generate(pipe)
    steps = handle.stats.computed_steps()
    handle.disable()
    return out, steps


@pytest.fixture(scope="module")
def alone(base_pipe) -> tuple[torch.Tensor, list[int]]:
    return run(base_pipe, None, True)


def layerwise_casting(pipe: Any) -> None:
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)


def _group_offload_problem() -> str | None:
    """Why diffusers' group offloading cannot be set up on this machine, or None.

    diffusers < 0.41 looks up ``torch.accelerator.current_accelerator().type`` when it builds an offload
    group, which raises where there is no accelerator (this CPU-only machine); 0.41 fixed it.
    """
    from diffusers.hooks import apply_group_offloading

    try:
        apply_group_offloading(torch.nn.Sequential(torch.nn.Linear(2, 2)), onload_device=CPU, offload_device=CPU,
                               offload_type="leaf_level")
    except AttributeError as exc:
        return lacks(f"group offloading on a machine without an accelerator (it raises {exc!r})")
    return None


GROUP_OFFLOAD_PROBLEM = _group_offload_problem()
needs_group_offload = pytest.mark.skipif(GROUP_OFFLOAD_PROBLEM is not None, reason=GROUP_OFFLOAD_PROBLEM or "")


def group_offload_blocks(pipe: Any) -> None:
    pipe.transformer.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="block_level",
                                          num_blocks_per_group=1)


def group_offload_leaves(pipe: Any) -> None:
    pipe.transformer.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="leaf_level")


def model_cpu_offload(pipe: Any) -> None:
    pytest.importorskip("accelerate", reason="enable_model_cpu_offload needs accelerate")
    pipe.enable_model_cpu_offload(device="cpu")


@pytest.mark.parametrize("magsdk_first", [True, False], ids=["magsdk-then-hook", "hook-then-magsdk"])
@pytest.mark.parametrize("hook", [
    pytest.param(group_offload_blocks, id="group-offload-block", marks=needs_group_offload),
    pytest.param(group_offload_leaves, id="group-offload-leaf", marks=needs_group_offload),
    pytest.param(model_cpu_offload, id="model-cpu-offload"),
])
def test_offloading_hooks_change_nothing(base_pipe, alone, hook, magsdk_first):
    out, steps = run(base_pipe, hook, magsdk_first)
    assert steps == alone[1]
    assert torch.equal(out, alone[0])


@pytest.mark.parametrize("magsdk_first", [True, False], ids=["magsdk-then-hook", "hook-then-magsdk"])
def test_layerwise_casting_keeps_the_schedule(base_pipe, alone, magsdk_first):
    out, steps = run(base_pipe, layerwise_casting, magsdk_first)
    assert steps == alone[1]  # the decision reads only the curve
    assert torch.allclose(out, alone[0], atol=0.1, rtol=0.05), (out - alone[0]).abs().max()
    other, _ = run(base_pipe, layerwise_casting, not magsdk_first)
    assert torch.equal(out, other)  # the order of enabling does not matter
