"""Calibration probes: the curve measured between its steps, and the timestep map that follows it."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from reference_runs import generate, hand_loop, reference_pipe
from tiny_models import flux_inputs, tiny_flux

import magsdk
from magsdk.config import CalibrationEntry
from magsdk.curves import TimestepMap
from magsdk.errors import UsageError

PROBES = 3
STEPS = 8


@pytest.fixture(scope="module")
def pipe() -> Any:
    return reference_pipe()


@pytest.fixture(scope="module")
def plain(pipe) -> tuple[magsdk.CalibrationResult, torch.Tensor]:
    with magsdk.calibrate(pipe) as cal:
        images = generate(pipe, STEPS)
    assert cal.result is not None
    return cal.result, images


@pytest.fixture(scope="module")
def probed(pipe) -> tuple[magsdk.CalibrationResult, torch.Tensor]:
    with magsdk.calibrate(pipe, probes=PROBES) as cal:
        images = generate(pipe, STEPS)
    assert cal.result is not None
    return cal.result, images


# -- what calibration records ----------------------------------------------------------------------
def test_probes_leave_the_generation_and_its_curve_as_they_were(plain, probed):
    """The probe calls run after a step's own call and change nothing the pipeline or the curve sees."""
    (without, images_without), (with_probes, images_with) = plain, probed
    assert torch.equal(images_with, images_without)
    for name, branch in with_probes.branches.items():
        assert branch.norm_ratios == without.branches[name].norm_ratios
        assert len(branch.probes) == (STEPS - 1) * PROBES
        assert not without.branches[name].probes
    assert with_probes.probe_curves() is not None and without.probe_curves() is None


def test_a_probe_is_the_steps_latent_run_at_a_later_timestep(pipe, probed):
    """Checked against a forward made here by hand: step s's inputs with step s+1's timestep (the last probe of
    the interval), residual = last block's image tokens − first block's input, mean per-token norm ratio."""
    result, _ = probed
    model = pipe.transformer
    calls: list[dict[str, Any]] = []
    grab = model.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}),
        with_kwargs=True,
    )
    try:
        generate(pipe, STEPS)
    finally:
        grab.remove()
    assert len(calls) == 2 * STEPS  # cond, uncond per step

    seen: dict[str, torch.Tensor] = {}

    def first_in(_m: Any, args: Any, kwargs: Any) -> None:
        seen["in"] = kwargs.get("hidden_states", args[0] if args else None)

    def last_out(_m: Any, _a: Any, output: Any) -> None:
        seen["out"] = output[1] if isinstance(output, tuple) else output

    hooks = [model.transformer_blocks[0].register_forward_pre_hook(first_in, with_kwargs=True),
             model.single_transformer_blocks[-1].register_forward_hook(last_out)]

    def residual(kwargs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            model(**kwargs)
        out, inp = seen["out"], seen["in"]
        return out[:, -inp.shape[1]:] - inp if out.shape != inp.shape else out - inp

    try:
        for s in (0, 3, STEPS - 2):
            for offset, branch in enumerate(("cond", "uncond")):
                here, after = calls[2 * s + offset], calls[2 * (s + 1) + offset]
                base = residual(here)
                moved = residual({**here, "timestep": after["timestep"]})
                ratio = (torch.linalg.norm(moved, dim=-1) / (torch.linalg.norm(base, dim=-1) + 1e-8)).mean()
                recorded = result.branches[branch].probes[s * PROBES + PROBES - 1]
                assert recorded == pytest.approx(math.log(float(ratio)), abs=1e-5), (s, branch)
    finally:
        for hook in hooks:
            hook.remove()


def test_probes_round_trip_through_json_and_the_config(probed, tmp_path):
    result, _ = probed
    loaded = magsdk.CalibrationResult.load(result.save(tmp_path / "curve.json"))
    assert loaded.probe_curves() == result.probe_curves()
    config = magsdk.MagCacheConfig(mag_ratios=loaded)
    assert config.probes == result.probe_curves()
    with pytest.raises(ValueError, match="probes are given for branches"):
        magsdk.MagCacheConfig(mag_ratios={"default": [1.0] * STEPS}, probes=result.probe_curves())
    with pytest.raises(ValueError, match="not a multiple"):
        magsdk.MagCacheConfig(mag_ratios={"default": [1.0] * STEPS}, probes={"default": [0.0] * 5})
    entry = CalibrationEntry(num_steps=STEPS, branches=result.curves(), probes=result.probe_curves() or {})
    assert entry.probes == result.probe_curves()
    with pytest.raises(ValueError, match="probes name branches"):
        CalibrationEntry(num_steps=STEPS, branches=result.curves(), probes={"cond": [0.0] * (STEPS - 1)})


@pytest.mark.parametrize("bad", [-1, 65, 1.5, "8", True])
def test_bad_probe_counts_are_refused_before_anything_is_patched(pipe, bad):
    forward = pipe.transformer.forward
    with pytest.raises(UsageError, match="probes="):
        magsdk.calibrate(pipe, probes=bad)
    assert pipe.transformer.forward == forward and not hasattr(pipe.transformer, "_magsdk_session")


# -- the map -----------------------------------------------------------------------------------------
COARSE_T = [1000.0 - 100.0 * i for i in range(6)]
CURVE = [1.0, 1.2, 0.9, 0.8, 0.9, 0.95]


def front_loaded(per: int) -> list[float]:
    """Probes saying each interval's growth along the noise level happens in its first half (log 0.9 there)."""
    return [math.log(0.9) * min(1.0, 2 * j / per) for _ in range(len(CURVE) - 1) for j in range(1, per + 1)]


def test_a_probed_curve_on_its_own_schedule_or_a_coarser_part_of_it_keeps_the_calibrated_ratios():
    tmap = TimestepMap(CURVE, COARSE_T, front_loaded(4))
    assert tmap.map(COARSE_T) == CURVE
    coarse = tmap.map(COARSE_T[::2])  # 1000, 800, 600: each ratio spans two calibrated ones
    assert coarse[1] == pytest.approx(CURVE[1] * CURVE[2], rel=1e-12)
    assert coarse[2] == pytest.approx(CURVE[3] * CURVE[4], rel=1e-12)


def test_probes_place_the_growth_inside_each_interval():
    fine_t = [1000.0 - 50.0 * i for i in range(11)]
    plain = TimestepMap(CURVE, COARSE_T).map(fine_t)
    probed = TimestepMap(CURVE, COARSE_T, front_loaded(4)).map(fine_t)
    for k in range(2, 6):  # intervals after the first: probes say log 0.9 in the first half
        first_half, second_half = probed[2 * k - 1], probed[2 * k]
        assert first_half * second_half == pytest.approx(CURVE[k], rel=1e-12)
        drift = math.log(CURVE[k]) - math.log(0.9)  # the latent's own change, spread evenly
        assert first_half == pytest.approx(0.9 * math.exp(drift / 2), rel=1e-12)
        assert second_half == pytest.approx(math.exp(drift / 2), rel=1e-12)
        assert plain[2 * k - 1] == pytest.approx(math.sqrt(CURVE[k]), rel=1e-12)  # without probes: even split
    # the first interval: the probes' growth, and the start-up jump whole at the run's first step
    assert probed[2] == pytest.approx(1.0, rel=1e-12)  # second half of interval 0: no growth by the probes
    assert probed[1] * probed[2] == pytest.approx(CURVE[1], rel=1e-12)


# -- runtime == plan with a probed calibration ------------------------------------------------------
def test_a_shifted_pipeline_follows_the_probed_curve_and_plan_says_the_same(pipe, probed):
    result, _ = probed
    shifted = copy.copy(pipe)
    shifted.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)
    config = magsdk.MagCacheConfig(mag_ratios=result, threshold=0.12, max_skip_steps=3, retention_ratio=0.2)
    for steps in (STEPS, 12):
        with magsdk.enable(shifted, config) as handle:
            generate(shifted, steps)
            how = handle.stats.curves["transformer:cond"]
            assert f"shaped by {PROBES} probes per step" in how and "mapped through scheduler timesteps" in how
            run_timesteps = [float(t) for t in shifted.scheduler.timesteps]
            for position, branch in enumerate(("cond", "uncond")):
                planned = magsdk.plan(result, config, steps, branch, position=position, timesteps=run_timesteps)
                assert handle.stats.computed_steps(branch) == planned.computed_steps, (steps, branch)
    # the probes change the mapped curve, not the calibrated one
    run_timesteps = [float(t) for t in shifted.scheduler.timesteps]
    unprobed = result.model_copy(update={"branches": {
        name: b.model_copy(update={"probes": []}) for name, b in result.branches.items()}})
    with_probes = magsdk.plan(result, config, 12, "cond", timesteps=run_timesteps).curve
    without = magsdk.plan(unprobed, config, 12, "cond", timesteps=run_timesteps).curve
    assert with_probes != without
    assert magsdk.plan(result, config, STEPS, "cond").curve == magsdk.plan(unprobed, config, STEPS, "cond").curve


def test_a_bare_transformer_probed_in_a_hand_loop_maps_online_as_with_its_scheduler():
    """Probes are fractions of each interval, so they serve the timestep argument's units (online, call by
    call) as they serve the scheduler's."""
    model = tiny_flux()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with magsdk.calibrate(model, scheduler=scheduler, probes=2) as cal:
        hand_loop(model, scheduler, 12)
    result = cal.result
    assert result is not None and len(result.branches["pass0"].probes) == 11 * 2
    settings = dict(threshold=0.2, max_skip_steps=4, retention_ratio=0.2)
    known = copy.deepcopy(model)
    with magsdk.enable(known, magsdk.MagCacheConfig(mag_ratios=result, **settings), scheduler=scheduler) as a:
        hand_loop(known, scheduler, 20)
    online = copy.deepcopy(model)
    bare = result.model_copy(update={"schedule": None})
    with magsdk.enable(online, magsdk.MagCacheConfig(mag_ratios=bare, **settings)) as b:
        hand_loop(online, FlowMatchEulerDiscreteScheduler(shift=3.0), 20)
    assert "probes per step" in b.stats.curves["transformer:pass0"]
    assert a.stats.skipped_calls > 0 and b.stats.skipped_calls > 0
    # online, the retention window is a noise level and may keep one step more (docs/design.md, section 6)
    assert abs(len(a.stats.computed_steps()) - len(b.stats.computed_steps())) <= 1


# -- what goes wrong, handled ---------------------------------------------------------------------------
def test_a_failing_probe_discards_its_generation_like_a_failing_call(pipe, probed):
    """A probe's forward raising (out of memory, say) inside the block: that generation is left out, as when the
    step's own call raises, and the generations around it keep their probes."""
    clean, _ = probed
    block_calls = [0]

    def fail_once(*_: Any) -> None:
        block_calls[0] += 1
        # 2 calls at step 0, then per step: cond, its PROBES probes, uncond, its probes; fail at the last step's
        # first probe, when every call of the generation has run (a partial run would be dropped by its length)
        if block_calls[0] == 2 + (2 + 2 * PROBES) * (STEPS - 2) + 2:
            raise RuntimeError("out of memory (simulated)")

    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(fail_once)
    try:
        with magsdk.calibrate(pipe, probes=PROBES) as cal:
            with pytest.raises(RuntimeError, match="simulated"):
                generate(pipe, STEPS)
            generate(pipe, STEPS)
    finally:
        hook.remove()
    assert block_calls[0] > 5
    for name, branch in cal.result.branches.items():
        assert branch.num_runs == 1
        assert branch.norm_ratios == clean.branches[name].norm_ratios
        assert branch.probes == pytest.approx(clean.branches[name].probes, abs=1e-12)


def test_two_transformers_keep_each_experts_probes_over_the_joined_run():
    """Wan 2.2 A14B: each expert runs part of the steps; the joined curve keeps each one's probes, and the
    interval where one hands over to the other (measured by neither) is spread evenly."""
    import library_models

    pipe, call = library_models.wan(two_transformers=True, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    with magsdk.calibrate(pipe, probes=2) as cal, torch.no_grad():
        pipe(**call, num_inference_steps=8, generator=torch.Generator().manual_seed(0))
    result = cal.result
    assert result.probe_curves() is not None
    switch = next(i for i, t in enumerate(result.schedule.timesteps) if t < 500)  # boundary_ratio 0.5: t < 500
    for name, branch in result.branches.items():
        assert len(branch.probes) == 2 * 7, name
        handover = branch.probes[2 * (switch - 1): 2 * switch]
        assert handover == [0.0, 0.0], name
        assert any(v != 0.0 for v in branch.probes[: 2 * (switch - 1)] + branch.probes[2 * switch:]), name


def test_the_mapping_says_shaped_by_probes_only_where_they_shaped_it(probed):
    result, _ = probed
    no_timesteps = magsdk.MagCacheConfig(mag_ratios=result.curves(), probes=result.probe_curves())
    assert "probes" not in magsdk.plan(None, no_timesteps, 10).mapping  # resampled by index: probes unused
    config = magsdk.MagCacheConfig(mag_ratios=result)
    assert "shaped by 3 probes per step" in magsdk.plan(None, config, 10).mapping
    assert "probes" not in magsdk.plan(None, config, STEPS).mapping  # its own schedule: as calibrated


def test_probes_are_not_used_where_the_timestep_argument_is_not_linear_in_the_schedulers(caplog):
    """Cosmos-style: argument σ/(σ+1) against scheduler timesteps 1000σ. Probes spaced evenly in the argument are
    not evenly spaced in the scheduler's timesteps, so the scheduler-timestep map leaves them out, with a warning."""
    from magsdk.curves import probes_fit_schedule

    assert probes_fit_schedule([1000.0, 750.0, 500.0, 250.0], [1.0, 0.75, 0.5, 0.25])
    assert probes_fit_schedule([1000.0, 750.0, 500.0, 250.0], [0.0, 0.25, 0.5, 0.75])  # Lumina2: 1 - t/1000
    sigmas = [80.0, 20.0, 5.0, 1.0, 0.2]
    assert not probes_fit_schedule([1000 * s for s in sigmas], [s / (s + 1) for s in sigmas])

    model = tiny_flux()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    def loop(steps: int) -> None:
        scheduler.set_timesteps(steps)
        latents = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
        cond = flux_inputs(model, side=4)
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                sigma = scheduler.sigmas[i] * 80
                pred = model(hidden_states=latents, timestep=(sigma / (sigma + 1)).expand(1), **cond)[0]
                latents = scheduler.step(pred, t, latents, return_dict=False)[0]

    with caplog.at_level(logging.WARNING, logger="magsdk"), magsdk.calibrate(model, scheduler=scheduler,
                                                                             probes=2) as cal:
        loop(8)
    assert any("not proportional to the scheduler's timesteps" in r.getMessage() for r in caplog.records)
    config = magsdk.MagCacheConfig(mag_ratios=cal.result)
    planned = magsdk.plan(None, config, 12)
    assert "mapped through scheduler timesteps" in planned.mapping and "probes" not in planned.mapping


def test_a_calibration_of_two_step_counts_records_the_schedule_of_the_generations_it_averaged(pipe):
    """The curve is the mean of the longest generations; its recorded schedule is theirs, not the last one's."""
    with magsdk.calibrate(pipe) as cal:
        generate(pipe, 7)
        generate(pipe, 5)
    assert cal.result.num_steps == 7 and len(cal.result.schedule.timesteps) == 7
