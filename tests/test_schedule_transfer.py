"""Curves mapped through recorded schedules, and one curve function behind the runtime and ``plan``."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from reference_runs import generate, hand_loop, reference_pipe
from tiny_models import tiny_flux

import magsdk
from magsdk.codegen.literal import round_entry
from magsdk.config import CalibrationEntry
from magsdk.curves import TimestepMap
from magsdk.schedules import timesteps_for
from strategies.flux import VARIANTS

FLUX_RATIOS = VARIANTS[0]["calibrations"][0]["branches"]["default"]  # flux.1-dev


def flux_schedule(steps: int, shift: float = 3.0) -> list[float]:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


# -- the maths -----------------------------------------------------------------------------------------
def test_mapping_onto_its_own_schedule_is_the_identity_even_after_rounding():
    t28 = flux_schedule(28)
    assert TimestepMap(FLUX_RATIOS, t28).map(t28) == FLUX_RATIOS
    stored = [round(t, 5) for t in t28]  # what a strategy file keeps
    assert TimestepMap(FLUX_RATIOS, stored).map(t28) == FLUX_RATIOS


def test_mapping_28_to_14_to_28_keeps_the_growth_between_shared_timesteps():
    t28 = flux_schedule(28)
    t14 = t28[::2]  # every other step: the coarse grid is part of the fine one
    coarse = TimestepMap(FLUX_RATIOS, t28).map(t14)
    for k in range(1, 14):  # a coarse ratio is the product of the fine ratios it spans
        assert coarse[k] == pytest.approx(FLUX_RATIOS[2 * k - 1] * FLUX_RATIOS[2 * k], rel=1e-9)
    back = TimestepMap(coarse, t14).map(t28)
    for k in range(1, 14):  # and mapping back keeps that growth between the shared timesteps
        assert back[2 * k - 1] * back[2 * k] == pytest.approx(coarse[k], rel=1e-9)
    assert math.prod(back[1:27]) == pytest.approx(math.prod(FLUX_RATIOS[1:27]), rel=1e-9)
    assert back[:27] == pytest.approx(FLUX_RATIOS[:27], rel=0.05)
    assert back[27] == 1.0  # beyond the coarse schedule's last timestep the curve is held flat, not extrapolated


def test_the_first_ratios_start_up_jump_stays_at_the_first_step_of_a_finer_schedule():
    """‖r₁‖/‖r₀‖ jumps at step 1 whatever its noise-level gap: a finer run gets the jump at its own step 1,
    and the steps after it grow at the calibration's rate instead of sharing the jump."""
    coarse_t = [1000.0 - 100.0 * i for i in range(8)]
    curve = [1.0, 1.5] + [0.9] * 6  # a jump at step 1, then 0.9 per 100 timesteps
    fine_t = [1000.0 - 50.0 * i for i in range(15)]
    fine = TimestepMap(curve, coarse_t).map(fine_t)
    assert fine[1] == pytest.approx(1.5 / math.sqrt(0.9), rel=1e-12)  # the jump, less the growth it did not span
    assert fine[2:] == pytest.approx([math.sqrt(0.9)] * 13, rel=1e-12)  # steady growth, also inside the first gap
    for k in range(1, 8):  # the growth between timesteps both schedules share is kept
        assert fine[2 * k - 1] * fine[2 * k] == pytest.approx(curve[k], rel=1e-12)
    # online, call by call, the same: the first interval is the run's first, wherever it starts
    tmap = TimestepMap(curve, coarse_t)
    assert tmap.ratio(1000.0, 950.0, first=True) == pytest.approx(fine[1], rel=1e-12)
    assert tmap.ratio(1000.0, 950.0) == pytest.approx(math.sqrt(0.9), rel=1e-12)
    assert tmap.ratio(1000.0, 900.0, first=True) == curve[1]  # the calibration's own first interval: as measured


# -- runtime == plan, per branch, both mapping modes ---------------------------------------------------
@pytest.fixture(scope="module")
def pipe() -> Any:
    return reference_pipe()


@pytest.fixture(scope="module")
def calibration(pipe) -> magsdk.CalibrationResult:
    with magsdk.calibrate(pipe) as cal:
        generate(pipe, 12)
        generate(pipe, 12, seed=1)
    assert cal.result is not None and set(cal.result.branches) == {"cond", "uncond"}
    assert cal.result.schedule is not None and len(cal.result.schedule.timesteps) == 12
    return cal.result


@pytest.mark.parametrize("per_branch", [False, True], ids=["shared", "per-branch"])
@pytest.mark.parametrize("resample", ["auto", "index"])
def test_plan_is_what_the_runtime_computes_per_branch(pipe, calibration, resample, per_branch):
    config = magsdk.MagCacheConfig(mag_ratios=calibration, threshold=0.12, max_skip_steps=3, retention_ratio=0.2,
                                   resample=resample, per_branch_curves=per_branch)
    with magsdk.enable(pipe, config) as handle:
        for steps in (12, 8, 20):
            generate(pipe, steps)
            run_timesteps = [float(t) for t in pipe.scheduler.timesteps]
            assert timesteps_for(calibration.schedule, steps) == pytest.approx(run_timesteps, abs=1e-3)
            for position, branch in enumerate(("cond", "uncond")):
                planned = handle.plan(steps, branch, position=position, timesteps=run_timesteps)
                assert handle.stats.computed_steps(branch) == planned.computed_steps, (steps, branch)
                # the same plan from the public function, as `magsdk plan` makes it
                assert magsdk.plan(calibration, config, steps, branch, position=position,
                                   timesteps=run_timesteps) == planned
            curves = handle.stats.curves
            mapped = "mapped through scheduler timesteps" in curves["transformer:cond"]
            assert mapped == (resample == "auto" and steps != 12), curves
            if not per_branch:
                assert handle.stats.computed_steps("cond") == handle.stats.computed_steps("uncond")


def test_handle_plan_reads_the_schedule_without_touching_the_pipelines_scheduler(pipe, calibration):
    """``handle.plan(N)`` before any generation (what a user previews first) and after a run at another
    step count: the plan of the timesteps N steps will really have, and the live scheduler is left alone."""
    config = magsdk.MagCacheConfig(mag_ratios=calibration, threshold=0.12)
    with magsdk.enable(pipe, config) as handle:
        before = [float(t) for t in pipe.scheduler.timesteps]
        previewed = handle.plan(8, "cond")  # no generation yet: the scheduler holds its training timesteps
        assert [float(t) for t in pipe.scheduler.timesteps] == before
        generate(pipe, 20)
        assert handle.plan(8, "cond") == previewed
        assert len(pipe.scheduler.timesteps) == 20  # the preview did not reset the live scheduler
        generate(pipe, 8)
        assert previewed == handle.plan(8, "cond", timesteps=[float(t) for t in pipe.scheduler.timesteps])


def test_a_pipeline_on_another_shift_follows_the_mapped_curve(pipe, calibration):
    shifted = copy.copy(pipe)
    shifted.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)
    settings = dict(threshold=0.12, max_skip_steps=3, retention_ratio=0.2)
    with magsdk.enable(shifted, magsdk.MagCacheConfig(mag_ratios=calibration, **settings)) as handle:
        generate(shifted, 12)
        assert "mapped through scheduler timesteps onto 12 steps" in handle.stats.curves["transformer:cond"]
        mapped_steps = handle.stats.computed_steps("cond")
        expected = handle.plan(12, "cond", timesteps=[float(t) for t in shifted.scheduler.timesteps])
        assert mapped_steps == expected.computed_steps
    index_config = magsdk.MagCacheConfig(mag_ratios=calibration, resample="index", **settings)
    same_schedule = magsdk.plan(calibration, index_config, 12, "cond").computed_steps
    assert mapped_steps != same_schedule  # the shift changed what the curve says


def test_a_scheduler_replaced_after_enable_is_followed(pipe, calibration):
    """``pipe.scheduler = X.from_config(..., shift=3)`` after ``enable`` (the usual diffusers idiom): the handle steps
    by the new scheduler, as if it had been enabled on it. It used to keep the old one, whose step_index stood
    still: every call of the next generation landed on one step past the curve's end."""
    settings = dict(threshold=0.12, max_skip_steps=3, retention_ratio=0.2)
    config = magsdk.MagCacheConfig(mag_ratios=calibration, **settings)
    pipe = copy.copy(pipe)  # the module's pipeline keeps its scheduler
    original = pipe.scheduler
    shifted = FlowMatchEulerDiscreteScheduler.from_config(original.config, shift=3.0)
    reference = copy.copy(pipe)
    reference.scheduler = copy.deepcopy(shifted)
    with magsdk.enable(reference, config) as fresh:  # enabled on the shifted pipeline from the start
        expected_output = generate(reference, 12)
        expected = fresh.stats.computed_steps("cond")
    with magsdk.enable(pipe, config) as handle:
        generate(pipe, 12)
        unshifted = handle.stats.computed_steps("cond")
        pipe.scheduler = shifted
        assert handle.scheduler is shifted
        assert handle.plan(12, "cond").computed_steps == expected  # the plan previews the new scheduler too
        output = generate(pipe, 12)
        assert handle.stats.computed_steps("cond") == expected != unshifted
        assert torch.equal(output, expected_output)
        assert "mapped through scheduler timesteps onto 12 steps" in handle.stats.curves["transformer:cond"]
        assert len(handle.stats.generations()) == 2
        pipe.scheduler = original  # and back
        generate(pipe, 12)
        assert handle.stats.computed_steps("cond") == unshifted
    for scheduler in (original, shifted):  # every wrapper removed exactly
        assert "set_timesteps" not in scheduler.__dict__


def test_handle_plan_after_a_run_is_what_that_run_computed_with_custom_sigmas_and_img2img(pipe):
    """The plan of a run with sigmas of its own, or an img2img run that starts late (``strength``), is the plan
    of the timesteps the scheduler was set up with: magsdk cannot rebuild either from a step count. It used to
    rebuild a plain N-step schedule and plan that ([0, 1, 3, 9] for a run that computed [0, 1, 3, 8])."""
    import numpy as np
    import PIL.Image
    from diffusers import FluxImg2ImgPipeline

    pipe = copy.copy(pipe)
    pipe.scheduler = copy.deepcopy(pipe.scheduler)
    call = dict(height=32, width=32, max_sequence_length=16, output_type="latent")
    with magsdk.enable(pipe) as handle, torch.no_grad():  # the FLUX.1-dev curve, mapped through its schedule
        sigmas = [1.0, 0.95, 0.9, 0.7, 0.5, 0.45, 0.4, 0.2, 0.1, 0.05]
        pipe("a cat", sigmas=sigmas, generator=torch.Generator().manual_seed(0), **call)
        assert "mapped through scheduler timesteps onto 10 steps" in handle.stats.curves["transformer:cond"]
        assert handle.plan(10).computed_steps == handle.stats.computed_steps()
        img2img = FluxImg2ImgPipeline.from_pipe(pipe)  # shares the transformer and the scheduler
        img2img.set_progress_bar_config(disable=True)
        image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
        img2img("a cat", image=image, strength=0.6, num_inference_steps=28,
                generator=torch.Generator().manual_seed(0), **call)
        ran = handle.stats.computed_steps() + handle.stats.skipped_steps()
        assert len(ran) == 17 < 28  # strength 0.6: the run starts 11 steps in
        assert handle.plan(17).computed_steps == handle.stats.computed_steps()


@pytest.mark.parametrize("bad", [0, -3, 8.0, True])
def test_handle_plan_of_a_step_count_that_is_not_one_says_so(pipe, bad):
    with magsdk.enable(copy.copy(pipe)) as handle, pytest.raises(magsdk.UsageError, match="a whole number >= 1"):
        handle.plan(bad)


def test_after_a_run_stepped_by_another_scheduler_the_pipelines_own_runs_step_by_its_scheduler_again(pipe, caplog):
    """An img2img pipeline made with from_pipe keeps the old scheduler when the text-to-image one is given a new
    one: its run is tracked by timesteps (with a warning). The fallback used to last until the next swap: every
    later generation of the pipeline itself paid a host read per call."""
    import numpy as np
    import PIL.Image
    from diffusers import FluxImg2ImgPipeline

    pipe = copy.copy(pipe)
    pipe.scheduler = copy.deepcopy(pipe.scheduler)
    call = dict(height=32, width=32, max_sequence_length=16, output_type="latent")
    with magsdk.enable(pipe) as handle, torch.no_grad():
        img2img = FluxImg2ImgPipeline.from_pipe(pipe)
        img2img.set_progress_bar_config(disable=True)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
        with caplog.at_level(logging.WARNING, logger="magsdk"):
            img2img("a cat", image=image, strength=0.6, num_inference_steps=8, **call)
        assert "is not the one stepping this run" in caplog.text
        assert handle.sessions[0].tracker.probe is None  # that run: by its timesteps
        pipe("a cat", num_inference_steps=8, generator=torch.Generator().manual_seed(0), **call)
        assert handle.sessions[0].tracker.probe is not None  # the pipeline's own run: by its scheduler again
        assert handle.plan(8).computed_steps == handle.stats.computed_steps()


def test_a_run_outside_the_calibrated_range_warns_once_with_the_numbers(pipe, calibration, caplog):
    config = magsdk.MagCacheConfig(mag_ratios=calibration, threshold=0.12)
    with caplog.at_level(logging.WARNING, logger="magsdk"), magsdk.enable(pipe, config):
        generate(pipe, 40)  # 40 steps reach timesteps below the 12-step schedule's last (1000/12)
        generate(pipe, 40)
    warnings = [r.getMessage() for r in caplog.records if "outside the calibrated schedule's range" in r.getMessage()]
    assert len(warnings) == 1 and "of this run's timesteps" in warnings[0]
    low, high = min(calibration.schedule.timesteps), max(calibration.schedule.timesteps)
    assert f"Calibrated range: {low:g}..{high:g}." in warnings[0]  # the numbers, also when mapped by the scheduler
    plan = magsdk.plan(calibration, config, 40, "cond", timesteps=timesteps_for(calibration.schedule, 40))
    assert plan.out_of_range and min(plan.out_of_range) < min(calibration.schedule.timesteps)


def test_a_first_timestep_a_little_noisier_than_the_calibrations_first_is_not_out_of_range():
    """Diffusers' FlowMatch Wan runs start at t = 1000, the Wan curves' schedules at 999: no warning for that (the
    first ratio is the start-up jump, kept whole); a run starting a whole calibration interval higher still warns,
    and so does one whose other timesteps leave the range."""
    calibrated = [999.0 - 111.0 * i for i in range(9)]  # 999 .. 111
    tmap = TimestepMap([1.0, 1.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.95], calibrated)
    assert tmap.outside([1000.0, 900.0, 500.0, 200.0]) == []
    assert tmap.outside([1000.0, 900.0, 100.0]) == [100.0]
    assert tmap.outside([1111.0, 900.0]) == [1111.0]
    assert tmap.outside([900.0, 1000.0]) == [1000.0]  # not the run's first: counted


# -- online mapping: a hand loop that knows nothing of its schedule ---------------------------------------
def test_online_mapping_computes_what_the_scheduler_aware_run_computes():
    model = tiny_flux()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with magsdk.calibrate(model, scheduler=scheduler) as cal:
        hand_loop(model, scheduler, 28)
    result = cal.result
    assert result is not None and result.schedule is not None and result.argument_timesteps() is not None
    settings = dict(threshold=0.2, max_skip_steps=4, retention_ratio=0.2)
    for steps in (28, 14, 40):
        known = copy.deepcopy(model)
        with magsdk.enable(known, magsdk.MagCacheConfig(mag_ratios=result, **settings), scheduler=scheduler) as a:
            hand_loop(known, scheduler, steps)
            assert "scheduler timesteps" in a.stats.curves["transformer:pass0"] or steps == 28
        online = copy.deepcopy(model)
        bare = result.model_copy(update={"schedule": None})  # only the timestep argument's values
        with magsdk.enable(online, magsdk.MagCacheConfig(mag_ratios=bare, **settings)) as b:
            hand_loop(online, FlowMatchEulerDiscreteScheduler(shift=3.0), steps)
            assert "online" in b.stats.curves["transformer:pass0"]
        assert b.stats.skipped_calls > 0
        if steps != 40:
            assert b.stats.computed_steps() == a.stats.computed_steps(), steps
            continue
        # Online, the run's step count is unknown, so the retention window is a noise level (steps noisier
        # than the calibration's 6th of 28); a run that knows its schedule keeps its first int(0.2·40+0.5) = 8
        # steps, as a calibration made on that schedule would. Here the noise level covers one step more
        # (step 8), after which the two runs accumulate from different computed steps.
        online_steps, known_steps = b.stats.computed_steps(), a.stats.computed_steps()
        assert online_steps[:9] == list(range(9)) and known_steps[:8] == list(range(8)) and known_steps[8] > 8
        assert abs(len(online_steps) - len(known_steps)) <= 1


def test_entries_without_timesteps_fall_back_to_index_mapping_with_a_note(caplog):
    entry = CalibrationEntry(num_steps=28, branches={"default": FLUX_RATIOS})
    rounded = round_entry(entry)
    config = magsdk.MagCacheConfig(mag_ratios=rounded.branches, threshold=0.24, max_skip_steps=5, retention_ratio=0.1)
    with caplog.at_level(logging.INFO, logger="magsdk"):
        plan = magsdk.plan(None, config, 14)
    assert "resampled by nearest index" in plan.mapping
    assert any("no recorded timesteps" in r.getMessage() for r in caplog.records)
    index = magsdk.plan(None, config.model_copy(update={"resample": "index"}), 14)
    assert plan.computed_steps == index.computed_steps
    with pytest.raises(magsdk.UsageError, match="resample='timesteps' but"):
        magsdk.plan(None, config.model_copy(update={"resample": "timesteps"}), 14)


def test_a_curve_mapped_call_by_call_is_not_planned_without_the_runs_timesteps(tmp_path, capsys):
    """A hand loop's calibration (timesteps of the transformer's argument only) is mapped from each call's
    timestep: a preview without the run's timesteps would show every step computed, so it is refused with
    hints that work (timesteps=, or by index), and planned once they are given."""
    from magsdk.cli import main
    from magsdk.config import BranchCalibration, CalibrationResult

    ratios = [1.0, 1.1, 1.05, 1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.9]
    stamps = [1000.0 - 100 * i for i in range(10)]
    calibration = CalibrationResult(branches={"default": BranchCalibration(norm_ratios=ratios, timesteps=stamps)})
    config = magsdk.MagCacheConfig(threshold=0.1, max_skip_steps=3, retention_ratio=0.2)
    with pytest.raises(magsdk.UsageError, match="timesteps=") as refused:
        magsdk.plan(calibration, config, 20)
    assert "--resample index" in str(refused.value)
    planned = magsdk.plan(calibration, config, 10, timesteps=stamps)
    assert planned.skipped_steps  # the run's own timesteps: the calibrated curve as it is, with skips
    path = calibration.save(tmp_path / "hand-loop.json")
    assert main(["plan", "--ratios", str(path), "--steps", "20"]) == 2
    assert "--resample index" in capsys.readouterr().err
    assert main(["plan", "--ratios", str(path), "--steps", "20", "--resample", "index"]) == 0  # the hint works
    assert "resampled by nearest index to 20 steps" in capsys.readouterr().out


def test_a_pipelines_step_count_overrules_a_configs_num_inference_steps_with_a_warning(pipe, caplog):
    """The run is what the scheduler says: a config's ``num_inference_steps=28`` on a 14-step generation used to
    make the run follow the 28-step curve (its retention and its ratios) while ``handle.plan(14)`` said otherwise."""
    settings = dict(mag_ratios=FLUX_RATIOS, threshold=0.24, max_skip_steps=5, retention_ratio=0.1)
    computed = {}
    for fixed in (None, 28):
        with caplog.at_level(logging.WARNING, logger="magsdk"), \
                magsdk.enable(pipe, magsdk.MagCacheConfig(num_inference_steps=fixed, **settings)) as handle:
            caplog.clear()
            generate(pipe, 14)
            generate(pipe, 14)
            computed[fixed] = handle.stats.computed_steps("cond")
            assert computed[fixed] == handle.plan(14, "cond").computed_steps
            assert "resampled by nearest index to 14 steps" in handle.stats.curves["transformer:cond"]
        told = [r.getMessage() for r in caplog.records if "MagCacheConfig(num_inference_steps=" in r.getMessage()]
        assert told == ([] if fixed is None else [
            "magsdk: this run has 14 steps (its scheduler's timesteps) but MagCacheConfig(num_inference_steps=28); "
            "the run's 14 steps are followed. With a pipeline or scheduler= leave num_inference_steps unset: it is "
            "taken from each run"])
    assert computed[28] == computed[None]
    plan_28 = magsdk.plan(FLUX_RATIOS, magsdk.MagCacheConfig(**settings), 28, "cond").computed_steps
    assert computed[28] != [s for s in plan_28 if s < 14]  # what the run used to follow


# -- published curves measured on the Wan repos' own scheduler ------------------------------------------------
def test_the_wan_scheduler_formula_matches_the_sources_own_account_of_its_expert_switch():
    """diffusers has no FlowUniPCMultistepScheduler; the Wan curves' schedules come from its formula. Wan2.2's
    MagCache script says that at 40 steps and shift 12 the high-noise expert (timesteps >= 875) runs steps 0-25."""
    from magsdk.schedules import flow_unipc_schedule

    timesteps, sigmas = flow_unipc_schedule(40, 12.0)
    assert sum(t >= 875 for t in timesteps) == 26
    assert timesteps[:3] == [999.0, 997.0, 995.0] and all(t == int(t) for t in timesteps)  # truncated to integers
    assert sigmas[0] == pytest.approx(12 * 0.999 / (1 + 11 * 0.999), rel=1e-6)


@pytest.mark.parametrize("variant", ["wan2.1-t2v-1.3b", "wan2.2-t2v-a14b"])
def test_wan_variants_carry_their_schedule_and_rebuild_it_at_other_step_counts(variant):
    from magsdk.schedules import flow_unipc_schedule
    from strategies.wan import VARIANTS as WAN

    entry = CalibrationEntry.model_validate(next(v for v in WAN if v["name"] == variant)["calibrations"][0])
    schedule = entry.schedule
    assert schedule is not None and schedule.scheduler == "FlowUniPCMultistepScheduler"
    shift = schedule.config["shift"]
    own = flow_unipc_schedule(entry.num_steps, shift)[0]
    assert timesteps_for(schedule, entry.num_steps) == schedule.timesteps == own
    assert timesteps_for(schedule, 30) == flow_unipc_schedule(30, shift)[0]  # what `magsdk plan --steps 30` maps onto


def test_a_diffusers_wan_pipeline_on_another_shift_maps_the_published_curve():
    """diffusers' Wan docs: by default Wan uses UniPCMultistepScheduler(..., flow_shift=3.0); the 1.3B curve was
    measured at shift 5 by the Wan repo's own scheduler."""
    import library_models as lm
    from diffusers import UniPCMultistepScheduler

    pipe, call = lm.wan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    with magsdk.enable(pipe) as handle:
        pipe(num_inference_steps=30, **call)
        assert "mapped through scheduler timesteps onto 30 steps" in handle.stats.curves["transformer:cond"]
        for position, branch in enumerate(handle.stats.branches()):
            assert handle.stats.computed_steps(branch) == handle.plan(30, branch, position=position).computed_steps
        assert handle.stats.skipped_calls > 0
