"""Parity with diffusers' apply_mag_cache: same computed steps, same latents bit for bit (docs/design.md, section 1).

The comparisons need diffusers' own MagCache (diffusers >= 0.37) and skip, saying so, on an older release.
"""

from __future__ import annotations

import pytest
import torch
from diffusers_features import MAG_CACHE, needs_mag_cache, require
from tiny_models import ComputeRecorder, denoise, fresh_copy, tiny_flux, tiny_flux2

import magsdk
from strategies.flux import VARIANTS as FLUX_VARIANTS
from strategies.flux2_klein import VARIANTS as FLUX2_VARIANTS

FLUX_RATIOS = FLUX_VARIANTS[0]["calibrations"][0]["branches"]["default"]  # flux.1-dev
FLUX2_RATIOS = FLUX2_VARIANTS[0]["calibrations"][0]["branches"]["default"]  # flux.2-klein-4b
SETTINGS = [(0.06, 3, 0.2), (0.24, 5, 0.1)]


@pytest.fixture(scope="module")
def flux() -> torch.nn.Module:
    return tiny_flux()


def run_diffusers(model, ratios, settings, steps, **loop):
    threshold, k, retention = settings
    apply_mag_cache = require("diffusers.hooks.apply_mag_cache", MAG_CACHE)
    DiffusersMagCacheConfig = require("diffusers.hooks.MagCacheConfig", MAG_CACHE)
    apply_mag_cache(model, DiffusersMagCacheConfig(mag_ratios=ratios, threshold=threshold, max_skip_steps=k,
                                                   retention_ratio=retention, num_inference_steps=steps))
    recorder = ComputeRecorder(model, model.transformer_blocks[0])
    return denoise(model, steps, **loop), recorder


def run_magsdk(model, ratios, settings, steps, **loop):
    threshold, k, retention = settings
    config = magsdk.MagCacheConfig(mag_ratios=ratios, threshold=threshold, max_skip_steps=k, retention_ratio=retention,
                                   num_inference_steps=steps)
    handle = magsdk.enable(model, config)
    recorder = ComputeRecorder(model, model.transformer_blocks[0])
    return denoise(model, steps, **loop), recorder, handle


@needs_mag_cache
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("steps", [28, 20, 50])
def test_flux_matches_diffusers(flux, settings, steps):
    ours, our_rec, handle = run_magsdk(fresh_copy(flux), FLUX_RATIOS, settings, steps)
    theirs, their_rec = run_diffusers(fresh_copy(flux), FLUX_RATIOS, settings, steps)

    assert their_rec.computed_steps() == our_rec.computed_steps()
    assert handle.stats.computed_steps() == our_rec.computed_steps()
    assert 0 < handle.stats.skipped_calls < steps  # the comparison is not vacuous
    assert torch.equal(ours, theirs)
    # the runtime follows the plan computed before the run
    planned = magsdk.plan(FLUX_RATIOS, handle.config, steps)
    assert planned.computed_steps == handle.stats.computed_steps()


@needs_mag_cache
def test_step_count_comes_from_the_scheduler_when_not_configured(flux):
    """No num_inference_steps in the config: the curve is resampled to the run's own step count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps in (20, 50):
        model = fresh_copy(flux)
        scheduler = FlowMatchEulerDiscreteScheduler()
        handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS), scheduler=scheduler)
        ours = denoise(model, steps, scheduler=scheduler)
        theirs, _ = run_diffusers(fresh_copy(flux), FLUX_RATIOS, (0.06, 3, 0.2), steps)
        assert handle.stats.computed_steps() == magsdk.plan(FLUX_RATIOS, handle.config, steps).computed_steps
        assert torch.equal(ours, theirs)


@needs_mag_cache
def test_cfg_two_unnamed_passes_equal_diffusers_with_named_contexts(flux):
    """docs/design.md trap 1: two passes per step with no context names are two branches, not two steps."""
    settings, steps = (0.24, 5, 0.1), 28
    ours, our_rec, handle = run_magsdk(fresh_copy(flux), FLUX_RATIOS, settings, steps, cfg=True)
    theirs, their_rec = run_diffusers(fresh_copy(flux), FLUX_RATIOS, settings, steps, cfg=True, named_contexts=True)
    assert handle.stats.branches() == ["pass0", "pass1"]
    assert our_rec.flags == their_rec.flags
    assert handle.stats.skipped_calls > 0
    assert torch.equal(ours, theirs)
    # diffusers without context names counts two steps per step and drifts away: magsdk does not.
    naive, _ = run_diffusers(fresh_copy(flux), FLUX_RATIOS, settings, steps, cfg=True)
    assert not torch.allclose(naive, theirs, atol=1e-3)


@needs_mag_cache
def test_cfg_named_contexts_use_the_names(flux):
    ours, _, handle = run_magsdk(fresh_copy(flux), FLUX_RATIOS, (0.24, 5, 0.1), 28, cfg=True, named_contexts=True)
    theirs, _ = run_diffusers(fresh_copy(flux), FLUX_RATIOS, (0.24, 5, 0.1), 28, cfg=True, named_contexts=True)
    assert handle.stats.branches() == ["cond", "uncond"]
    assert torch.equal(ours, theirs)


def reference_magcache(model, ratios, settings, steps):
    """docs/design.md section 1 written out directly: the block stack runs or is replaced by x_in + residual."""
    from magsdk.ratios import resample_nearest

    threshold, k, retention = settings
    curve = torch.tensor(resample_nearest(ratios, steps))
    retention_step = int(retention * steps + 0.5)
    state = {"ratio": 1.0, "steps": 0, "err": 0.0, "residual": None, "step": 0, "skip": False, "x_in": None}
    head, tail = model.transformer_blocks[0], model.single_transformer_blocks[-1]
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    originals = {id(b): b.forward for b in blocks}

    def decide():
        step = state["step"]
        state["skip"] = False
        if step >= retention_step:
            state["ratio"] *= curve[step]
            state["steps"] += 1
            state["err"] += abs(1.0 - state["ratio"])
            if state["residual"] is not None and state["err"] <= threshold and state["steps"] <= k:
                state["skip"] = True
            else:
                state.update(ratio=1.0, steps=0, err=0.0)

    def wrap(block):
        original = originals[id(block)]

        def forward(hidden_states, encoder_hidden_states=None, *args, **kwargs):
            if block is head:
                decide()
                state["x_in"] = hidden_states
                if state["skip"]:
                    return encoder_hidden_states, hidden_states + state["residual"]
            if state["skip"]:
                return hidden_states if encoder_hidden_states is None else (encoder_hidden_states, hidden_states)
            out = original(hidden_states, encoder_hidden_states, *args, **kwargs)
            if block is tail:
                fused = out if isinstance(out, torch.Tensor) else out[1]
                state["residual"] = fused[:, -state["x_in"].shape[1]:] - state["x_in"]
            return out

        return forward

    for block in blocks:
        block.forward = wrap(block)
    tail_forward = tail.forward

    def tail_and_count(*args, **kwargs):
        out = tail_forward(*args, **kwargs)
        state["step"] += 1
        return out

    tail.forward = tail_and_count
    return denoise(model, steps)


@pytest.mark.parametrize("settings", SETTINGS)
def test_flux2_fused_single_blocks_match_reference(settings):
    """Flux2's single blocks return one fused [text; image] sequence; the residual uses the image tokens."""
    base = tiny_flux2()
    expected = reference_magcache(fresh_copy(base), FLUX2_RATIOS, settings, 28)
    threshold, k, retention = settings
    model = fresh_copy(base)
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX2_RATIOS, threshold=threshold,
                                                        max_skip_steps=k, retention_ratio=retention))
    ours = denoise(model, 28)
    assert handle.stats.skipped_calls > 0
    assert torch.equal(ours, expected)
    plain = denoise(fresh_copy(base), 28)
    assert not torch.allclose(ours, plain, atol=1e-4)  # skipping changed something: not a silent no-op
