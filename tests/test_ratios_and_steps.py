"""Curve maths and step tracking without models, and one tiny-Flux run that follows its plan."""

from __future__ import annotations

import pytest
import torch
from diffusers_features import MAG_CACHE, needs_mag_cache, require
from tiny_models import ComputeRecorder, denoise, tiny_flux

import magsdk
from magsdk.ratios import resample_by_timesteps, resample_nearest, select_calibration
from magsdk.runtime.steps import StepTracker
from strategies.flux import VARIANTS, FluxStrategy

FLUX_RATIOS = VARIANTS[0]["calibrations"][0]["branches"]["default"]  # flux.1-dev


@needs_mag_cache
@pytest.mark.parametrize("n", [1, 2, 7, 14, 20, 27, 28, 29, 50, 100])
def test_nearest_resampling_equals_diffusers(n):
    nearest_interp = require("diffusers.hooks.mag_cache.nearest_interp", MAG_CACHE)
    theirs = nearest_interp(torch.tensor(FLUX_RATIOS), n).tolist()
    assert resample_nearest(FLUX_RATIOS, n) == pytest.approx(theirs, abs=1e-6)


def test_timestep_resampling_keeps_the_total_growth():
    timesteps = [1000 * (1 - i / 28) for i in range(28)]
    same = resample_by_timesteps(FLUX_RATIOS, timesteps, timesteps)
    assert same == pytest.approx(FLUX_RATIOS, rel=1e-9)
    coarse_t = timesteps[::2]
    coarse = resample_by_timesteps(FLUX_RATIOS, timesteps, coarse_t)
    assert len(coarse) == 14 and coarse[0] == 1.0
    # product over the coarse schedule == product of the fine ratios it spans
    fine_growth = torch.tensor(FLUX_RATIOS[1:27]).prod().item()
    assert torch.tensor(coarse).prod().item() == pytest.approx(fine_growth, rel=1e-6)


def test_plan_is_the_runtime_schedule_and_reports_speedup():
    config = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, threshold=0.24, max_skip_steps=5, retention_ratio=0.1)
    p = magsdk.plan(FLUX_RATIOS, config, 28)
    assert p.computed_steps[:3] == [0, 1, 2]  # retention: int(0.1 * 28 + 0.5) = 3 steps kept
    assert sorted(p.computed_steps + p.skipped_steps) == list(range(28))
    assert p.ideal_speedup == pytest.approx(28 / len(p.computed_steps))
    assert p.schedule_string().count(".") == len(p.skipped_steps)
    # the runtime on a tiny Flux follows the plan: the steps it records and the steps whose blocks really ran
    model = tiny_flux()
    handle = magsdk.enable(model, config)
    recorder = ComputeRecorder(model, model.transformer_blocks[0])
    denoise(model, 28)
    assert 0 < len(p.skipped_steps) < 28  # the comparison is not vacuous
    assert handle.stats.computed_steps() == p.computed_steps
    assert handle.stats.skipped_steps() == p.skipped_steps
    assert recorder.computed_steps() == p.computed_steps
    # zero threshold: nothing can be skipped unless ratios are exactly 1
    strict = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, threshold=0.0)
    assert magsdk.plan(FLUX_RATIOS, strict, 28).skipped_steps == [14, 16, 18, 19]  # ratio exactly 1.0


def test_calibration_entry_selection_prefers_matching_step_count():
    entries = magsdk.load_calibrations([
        {"num_steps": 28, "branches": {"default": FLUX_RATIOS}},
        {"num_steps": 4, "branches": {"default": [1.0, 1.1, 1.0, 0.9]}},
    ])
    assert select_calibration(entries, 28).num_steps == 28
    assert select_calibration(entries, 5).num_steps == 4
    assert select_calibration(entries, 50).num_steps == 28
    assert FluxStrategy.default_config(28).mag_ratios == {"default": FLUX_RATIOS}


def test_calibration_entry_rejects_length_mismatch():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="num_steps is 5"):
        magsdk.load_calibrations([{"num_steps": 5, "branches": {"default": FLUX_RATIOS}}])


def test_tracker_branches_steps_and_generations():
    tracker = StepTracker()
    seen = [tracker.observe_timestep(t, None) for t in (1.0, 1.0, 0.5, 0.5, 0.1, 0.1)]
    assert [(p.step, p.branch) for p in seen] == [(0, "pass0"), (0, "pass1"), (1, "pass0"), (1, "pass1"),
                                                  (2, "pass0"), (2, "pass1")]
    again = tracker.observe_timestep(1.0, None)  # the timestep went back up: a new generation
    assert again.new_generation and again.generation == 1 and again.step == 0


def test_tracker_ascending_schedules_and_context_names():
    tracker = StepTracker()
    names = [tracker.observe_timestep(t, c) for t, c in ((0.0, "cond"), (0.0, "uncond"), (0.3, "cond"), (0.6, "cond"))]
    assert [(p.step, p.branch) for p in names] == [(0, "cond"), (0, "uncond"), (1, "cond"), (2, "cond")]
    assert tracker.observe_timestep(0.1, "cond").new_generation  # against the schedule's direction


def test_tracker_known_step_count_starts_a_new_generation():
    tracker = StepTracker(fixed_num_steps=2)
    positions = [tracker.observe_timestep(t, None) for t in (0.9, 0.8, 0.7)]
    assert [p.generation for p in positions] == [0, 0, 1]


def test_tracker_without_timesteps_counts_calls_per_branch():
    tracker = StepTracker()
    steps = [tracker.observe_timestep(None, c).step for c in ("cond", "uncond", "cond", "uncond")]
    assert steps == [0, 0, 1, 1]


def test_user_strategy_registered_first_is_not_replaced_by_discovery():
    with magsdk.StrategyRegistry.isolated():
        magsdk.StrategyRegistry.reset()  # as in a fresh process: nothing registered, nothing discovered

        class MyFlux(FluxStrategy):
            threshold = 0.3

        assert magsdk.StrategyRegistry.get("FluxTransformer2DModel") is MyFlux
        magsdk.StrategyRegistry.all()  # discovers the bundled strategies/flux.py
        assert magsdk.StrategyRegistry.get("FluxTransformer2DModel") is MyFlux
