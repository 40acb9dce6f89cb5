"""Planning on bad or unusual input: budgets on curves of a bare transformer, wrong argument types, curves that
cannot be mapped, paths that cannot be written. Each error names the argument and its value, and each hint works
when followed (the tests follow them)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import denoise, tiny_flux

import magsdk
from magsdk.errors import UsageError
from magsdk.planner import budget_bounds, budget_from_speedup, plan_budget
from magsdk.reference.components import build_pipeline

CURVE = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.9, 0.85]


@pytest.fixture(scope="module")
def pipe() -> Any:
    pipeline = build_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline: Any, steps: int = 8) -> Any:
    return pipeline("a cat", num_inference_steps=steps, height=32, width=32, max_sequence_length=16,
                    output_type="latent")


@pytest.fixture(scope="module")
def bare_calibration(pipe: Any) -> magsdk.CalibrationResult:
    """A calibration of the bare transformer: its timestep argument per step, no scheduler schedule."""
    with magsdk.calibrate(pipe.transformer) as cal:
        generate(pipe)
    assert cal.result.schedule is None and cal.result.argument_timesteps() is not None
    return cal.result


# -- 1: budget mode on a curve with timestep arguments only ---------------------------------------------------
def test_a_budget_runs_on_a_pipeline_with_a_curve_calibrated_on_its_bare_transformer(
    pipe: Any, bare_calibration: magsdk.CalibrationResult
) -> None:
    config = magsdk.MagCacheConfig(mag_ratios=bare_calibration, speedup=2)
    with magsdk.enable(pipe, config) as handle:  # refused with "need its step count" although on a pipeline
        generate(pipe)
        computed = handle.stats.computed_steps("cond")
        assert len(computed) == 4
        assert handle.plan(8, "cond").computed_steps == computed  # the preview is what the run did
        assert "as calibrated" in handle.stats.curves["transformer:cond"]
    assert magsdk.plan(bare_calibration, magsdk.MagCacheConfig(speedup=2), 8, "cond").computed_steps == computed
    # at another step count the run's arguments are not known before it: the curve is resampled by index
    with magsdk.enable(pipe, config) as handle:
        generate(pipe, 12)
        assert len(handle.stats.computed_steps("cond")) == 6
        assert "resampled by nearest index to 12 steps" in handle.stats.curves["transformer:cond"]


def test_a_budget_plan_follows_given_timestep_arguments_as_the_threshold_plan_does(
    bare_calibration: magsdk.CalibrationResult,
) -> None:
    stamps = bare_calibration.argument_timesteps()
    assert stamps is not None
    budget = magsdk.plan(bare_calibration, magsdk.MagCacheConfig(speedup=2), 8, timesteps=stamps)
    assert len(budget.computed_steps) == 4 and "same timestep arguments" in budget.mapping
    assert budget.curve == pytest.approx(bare_calibration.curves()["cond"])
    # a coarser run's arguments: mapped through them, one ratio per step
    coarse = stamps[::2]
    mapped = magsdk.plan(bare_calibration, magsdk.MagCacheConfig(compute_steps=2), 4, timesteps=coarse)
    assert len(mapped.computed_steps) == 2 and "mapped through the given timestep arguments" in mapped.mapping
    assert len(mapped.curve) == 4


def test_a_budget_on_a_bare_transformer_that_does_not_know_its_step_count_says_how_to_tell_it() -> None:
    model = tiny_flux()
    with magsdk.calibrate(model) as cal:
        denoise(model, 4)
    config = magsdk.MagCacheConfig(mag_ratios=cal.result, speedup=2)
    with magsdk.enable(model, config), pytest.raises(UsageError, match="need its step count") as info:
        denoise(model, 4)
    message = str(info.value)
    assert "scheduler=" in message and "num_inference_steps=N" in message
    scheduler = FlowMatchEulerDiscreteScheduler()  # the first hint, followed: the loop's scheduler
    with magsdk.enable(model, config, scheduler=scheduler) as handle:
        denoise(model, 4, scheduler=scheduler)
        assert len(handle.stats.computed_steps()) == 2
    counted = config.model_copy(update={"num_inference_steps": 4})  # the second
    with magsdk.enable(model, magsdk.MagCacheConfig(**counted.model_dump())) as handle:
        denoise(model, 4)
        assert len(handle.stats.computed_steps()) == 2


def test_resample_timesteps_refuses_a_budget_it_cannot_map_and_its_hints_work(
    bare_calibration: magsdk.CalibrationResult,
) -> None:
    strict = magsdk.MagCacheConfig(speedup=2, resample="timesteps")
    with pytest.raises(UsageError, match="resample='timesteps'") as info:
        magsdk.plan(bare_calibration, strict, 8)
    assert "magsdk.plan(..., timesteps=...)" in str(info.value) and "resample='auto' / 'index'" in str(info.value)
    stamps = bare_calibration.argument_timesteps()
    assert len(magsdk.plan(bare_calibration, strict, 8, timesteps=stamps).computed_steps) == 4
    for mode in ("auto", "index"):
        loose = magsdk.MagCacheConfig(speedup=2, resample=mode)
        assert len(magsdk.plan(bare_calibration, loose, 8).computed_steps) == 4


# -- 2: plan's config argument --------------------------------------------------------------------------------
def test_plan_takes_no_config_as_the_defaults_and_refuses_a_dict() -> None:
    assert magsdk.plan([1.0, 0.9, 0.9], None, 3) == magsdk.plan([1.0, 0.9, 0.9], magsdk.MagCacheConfig(), 3)
    with pytest.raises(UsageError, match=r"config must be a magsdk.MagCacheConfig or None.*got dict") as info:
        magsdk.plan([1.0, 0.9, 0.9], {"threshold": 0.1}, 3)  # type: ignore[arg-type]
    assert r"magsdk.MagCacheConfig(**settings)" in str(info.value)
    followed = magsdk.plan([1.0, 0.9, 0.9], magsdk.MagCacheConfig(**{"threshold": 0.1}), 3)
    assert followed.threshold == 0.1
    with pytest.raises(UsageError, match="plan\\(\\) needs a curve"):
        magsdk.plan(None, None, 3)


# -- 3: plan_budget's max_skip_steps --------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["2", 1.5, 2.0, True, None])
def test_plan_budget_refuses_a_max_skip_steps_that_is_no_int(value: Any) -> None:
    if value is None:
        assert plan_budget([1.0] * 6, 3, max_skip_steps=np.int64(2)).max_skip_steps == 2  # numpy ints are ints
        return
    with pytest.raises(UsageError, match="max_skip_steps must be an int") as info:
        plan_budget([1.0] * 5, 2, max_skip_steps=value)
    assert repr(value) in str(info.value)
    assert isinstance(info.value, TypeError)
    with pytest.raises(UsageError, match="max_skip_steps must be an integer >= 0, got -1"):
        plan_budget([1.0] * 5, 2, max_skip_steps=-1)
    with pytest.raises(UsageError, match="retention_ratio must be a number"):
        plan_budget([1.0] * 5, 2, retention_ratio="0.2")  # type: ignore[arg-type]


def test_plan_budget_refuses_per_step_arrays_of_another_length_even_where_its_model_ignores_them() -> None:
    with pytest.raises(UsageError, match="sigmas has 2 values but the run has 4 steps"):
        plan_budget([1.0] * 4, 2, sigmas=[1, 0.5])  # the default model does not read sigmas: they were dropped
    with pytest.raises(UsageError, match="norm_stds has 3 values but the run has 4 steps"):
        plan_budget([1.0] * 4, 2, norm_stds=[0.1] * 3)
    assert plan_budget([1.0] * 4, 2, sigmas=[1, 0.75, 0.5, 0.25]).budget == 2


# -- 4: resampling functions ----------------------------------------------------------------------------------
def test_resampling_refuses_an_empty_curve_and_ratios_that_are_not_positive() -> None:
    with pytest.raises(UsageError, match="curve has 0 value"):
        magsdk.resample_nearest([], 3)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(UsageError, match=r"curve\[1\] = .* is not a finite positive number"):
            magsdk.resample_by_timesteps([1.0, bad, 1.0], [1, 0.5, 0], [1, 0.7, 0.3])
        with pytest.raises(UsageError, match=r"curve\[1\] = .* is not a finite positive number"):
            magsdk.resample_nearest([1.0, bad, 1.0], 5)
    with pytest.raises(UsageError, match=r"new_timesteps\[1\] = nan is not a finite number"):
        magsdk.resample_by_timesteps([1.0, 0.9, 1.0], [1, 0.5, 0], [1, math.nan, 0.3])
    with pytest.raises(UsageError, match="curve has 3 values but 2 timesteps"):
        magsdk.resample_by_timesteps([1.0, 0.9, 0.8], [1.0, 0.5], [1.0, 0.7, 0.3])
    mapped = magsdk.resample_by_timesteps([1.0, 0.9, 1.1], [1, 0.5, 0], [1, 0.7, 0.3])
    assert all(math.isfinite(v) and v > 0 for v in mapped)


# -- 5: saving ------------------------------------------------------------------------------------------------
def test_save_to_a_folder_or_below_a_file_names_the_path_and_what_to_give(
    tmp_path: Path, bare_calibration: magsdk.CalibrationResult
) -> None:
    with pytest.raises(UsageError) as info:
        bare_calibration.save(tmp_path)
    message = str(info.value)
    assert f"cannot write {tmp_path}: it is a folder" in message and ".tmp" not in message
    suggested = tmp_path / "calibration.json"
    assert str(suggested) in message
    assert magsdk.CalibrationResult.load(bare_calibration.save(suggested)) == bare_calibration  # followed

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(UsageError) as info:
        bare_calibration.save(blocker / "deeper" / "cal.json")
    message = str(info.value)
    assert f"{blocker} is a file, not a folder" in message and "File exists" not in message
    hinted = tmp_path / "cal.json"
    assert f"e.g. {hinted}" in message
    assert bare_calibration.save(hinted).is_file()


# -- 6: step counts -------------------------------------------------------------------------------------------
def test_step_counts_take_numpy_ints_and_refuse_zero_negative_and_floats() -> None:
    config = magsdk.MagCacheConfig(mag_ratios=CURVE)
    assert magsdk.plan(None, config, np.int64(8)) == magsdk.plan(None, config, 8)
    assert magsdk.plan(None, config, np.int32(8), first_step=np.int64(2)).computed_steps[0] == 2
    assert magsdk.resample_nearest(CURVE, np.int64(4)) == magsdk.resample_nearest(CURVE, 4)
    assert budget_from_speedup(np.int64(8), 2) == 4
    assert budget_bounds(np.int64(8), np.int64(2), 0.2) == budget_bounds(8, 2, 0.2)
    for bad in (0, -3):
        with pytest.raises(UsageError, match=f"num_steps must be an integer >= 1, got {bad}"):
            magsdk.plan(None, config, bad)
        with pytest.raises(UsageError, match=f"num_steps must be an integer >= 1, got {bad}"):
            magsdk.resample_nearest(CURVE, bad)
    for bad_type in (8.0, "8", True):
        with pytest.raises(UsageError, match="num_steps must be an int, got") as info:
            magsdk.plan(None, config, bad_type)  # type: ignore[arg-type]
        assert isinstance(info.value, TypeError)
    with pytest.raises(UsageError, match=r"pass int\(8.0\)"):
        magsdk.resample_nearest(CURVE, 8.0)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="budget must be an integer >= 1, got 0"):
        plan_budget(CURVE, 0)


# -- 7: MagCacheConfig's curves and timesteps -----------------------------------------------------------------
def test_config_refuses_branches_of_different_lengths_naming_them() -> None:
    with pytest.raises(ValueError, match=r"different lengths \('cond': 4, 'uncond': 2\)") as info:
        magsdk.MagCacheConfig(mag_ratios={"cond": [1.0, 0.9, 0.9, 0.9], "uncond": [1.0, 0.9]})
    assert "mag_ratios={'cond': <its 4 values>}" in str(info.value)
    followed = magsdk.MagCacheConfig(mag_ratios={"cond": [1.0, 0.9, 0.9, 0.9]})  # the hint
    assert followed.mag_ratios == {"cond": [1.0, 0.9, 0.9, 0.9]}
    # a second transformer's curves cover the whole run too: equal lengths are accepted
    joined = {"cond": CURVE, "transformer_2:cond": CURVE}
    assert magsdk.MagCacheConfig(mag_ratios=joined).mag_ratios == joined


def test_config_refuses_timesteps_of_another_length_than_its_curve() -> None:
    with pytest.raises(ValueError, match="timesteps has 2 values but the mag_ratios curves have 3") as info:
        magsdk.MagCacheConfig(mag_ratios=[1.0, 0.9, 0.8], timesteps=[1.0, 0.5])
    assert "leave timesteps out" in str(info.value)
    followed = magsdk.MagCacheConfig(mag_ratios=[1.0, 0.9, 0.8])
    assert magsdk.plan(None, followed, 3).mapping.endswith("as calibrated")
    config = magsdk.MagCacheConfig(mag_ratios=[1.0, 0.9, 0.8], timesteps=[1.0, 0.5, 0.0])
    assert "timestep argument" in magsdk.plan(None, config, 3, timesteps=[1.0, 0.5, 0.0]).mapping


# -- 8: a 1-step calibration ----------------------------------------------------------------------------------
def test_a_one_step_calibration_is_refused_when_saved_or_loaded(tmp_path: Path) -> None:
    model = tiny_flux()
    with pytest.raises(UsageError, match="a calibration needs a run of at least 2 steps"):
        with magsdk.calibrate(model):  # the block itself refuses such a run (magsdk/runtime/api.py)
            denoise(model, 1)
    with magsdk.calibrate(model) as cal:  # a 1-step result as older releases handed back
        denoise(model, 2)
    data = cal.result.model_dump()
    for branch in data["branches"].values():
        for key, value in branch.items():
            if isinstance(value, list):
                branch[key] = value[:1]
    data.update(num_steps=1, schedule=None)
    one = magsdk.CalibrationResult.model_validate(data)
    with pytest.raises(UsageError, match="a calibration needs a run of at least 2 steps") as info:
        one.save(tmp_path / "one.json")
    assert "num_inference_steps=28" in str(info.value) and not (tmp_path / "one.json").exists()
    path = tmp_path / "written-before.json"
    path.write_text(json.dumps(one.model_dump()))
    with pytest.raises(UsageError, match="a calibration needs a run of at least 2 steps") as info:
        magsdk.CalibrationResult.load(path)
    assert str(path) in str(info.value)
    with magsdk.calibrate(model) as cal:  # the hint: calibrate on a run of the step count used
        denoise(model, 4)
    assert magsdk.CalibrationResult.load(cal.result.save(path)).num_steps == 4
