"""Budget mode (compute exactly B steps) and the reuse modes, in the runtime and in ``plan``: the same schedule."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import denoise, tiny_flux

import magsdk
from magsdk.planner import FORECAST_REACH, InfeasibleBudgetError
from strategies.flux import VARIANTS

FLUX_RATIOS = VARIANTS[0]["calibrations"][0]["branches"]["default"]  # flux.1-dev


@pytest.fixture(scope="module")
def flux() -> torch.nn.Module:
    return tiny_flux()


def run(model: torch.nn.Module, config: magsdk.MagCacheConfig, steps: int, cfg: bool = False
        ) -> tuple[magsdk.MagCacheHandle, torch.Tensor]:
    scheduler = FlowMatchEulerDiscreteScheduler()
    handle = magsdk.enable(model, config, scheduler=scheduler)  # the scheduler gives the run's step count
    out = denoise(model, steps, cfg=cfg, scheduler=scheduler)
    return handle, out


@pytest.mark.parametrize("steps", [10, 28, 50])
@pytest.mark.parametrize("k", [None, 3, 6])
def test_a_budget_computes_exactly_that_many_steps_as_planned(flux, steps, k):
    budget = max(steps // 3, 4)
    settings = {} if k is None else {"max_skip_steps": k}
    config = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, compute_steps=budget, **settings)
    handle, _ = run(copy.deepcopy(flux), config, steps, cfg=True)
    for position, branch in enumerate(("pass0", "pass1")):
        computed = handle.stats.computed_steps(branch)
        assert len(computed) == budget, (branch, computed)
        assert computed == handle.plan(steps, branch, position=position).computed_steps
        assert computed == magsdk.plan(None, config, steps, branch, position=position).computed_steps
    runs = [b - a - 1 for a, b in zip(computed, [*computed[1:], steps], strict=True)]
    assert max(runs) <= (6 if k is None else k)
    plan = handle.plan(steps)
    assert plan.budget == budget and plan.reuse == "forecast"  # "auto" reuse in budget mode


def test_speedup_and_a_settings_only_config_use_the_strategy_curves(flux):
    model = copy.deepcopy(flux)
    handle, _ = run(model, magsdk.MagCacheConfig(speedup=2.0), 28)
    assert len(handle.stats.computed_steps()) == 14
    assert handle.config.mag_ratios == {"default": FLUX_RATIOS}  # flux.1-dev's curve
    handle.disable()
    handle, _ = run(model, magsdk.MagCacheConfig(threshold=0.1), 28)
    assert handle.config.threshold == 0.1 and handle.config.max_skip_steps == 5  # the variant's K, the user's threshold


def test_an_infeasible_budget_names_the_smallest_feasible_one(flux):
    with pytest.raises(ValueError, match="smallest feasible budget is 11"):
        magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, compute_steps=9, max_skip_steps=3, retention_ratio=0.2,
                              num_inference_steps=28)
    config = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, compute_steps=9, max_skip_steps=3, retention_ratio=0.2)
    with pytest.raises(InfeasibleBudgetError, match="compute_steps >= 11"):
        magsdk.plan(None, config, 28)
    # a curve mapped online (timesteps of the argument only) on a bare transformer: the run's length is unknown
    online = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, timesteps=[1 - i / 28 for i in range(28)], compute_steps=12)
    model = copy.deepcopy(flux)
    with magsdk.enable(model, online), pytest.raises(magsdk.UsageError, match="need its step count"):
        denoise(model, 28)


@pytest.mark.parametrize("reuse", ["residual", "scaled", "forecast"])
def test_reuse_modes_change_what_a_skip_adds_not_which_steps_skip(flux, reuse):
    settings = dict(mag_ratios=FLUX_RATIOS, threshold=0.24, max_skip_steps=5, retention_ratio=0.1)
    base, base_out = run(copy.deepcopy(flux), magsdk.MagCacheConfig(**settings), 28)
    model = copy.deepcopy(flux)
    scheduler = FlowMatchEulerDiscreteScheduler()
    handle = magsdk.enable(model, magsdk.MagCacheConfig(reuse=reuse, **settings), scheduler=scheduler)
    # the block stack's input and output on every call, seen from outside it (the model's own modules)
    stack_in: list[torch.Tensor] = []
    stack_out: list[torch.Tensor] = []
    model.x_embedder.register_forward_hook(lambda m, a, output: stack_in.append(output.clone()))
    model.norm_out.register_forward_pre_hook(lambda m, a: stack_out.append(a[0].clone()))
    session = handle.sessions[0]
    added: dict[int, torch.Tensor] = {}
    original = session._reused

    def spy(state, step):  # type: ignore[no-untyped-def]
        value = original(state, step)
        added[step] = value.clone()
        return value

    session._reused = spy
    out = denoise(model, 28, scheduler=scheduler)
    computed, skipped = handle.stats.computed_steps(), handle.stats.skipped_steps()
    assert computed == base.stats.computed_steps()
    assert torch.equal(out, base_out) == (reuse == "residual")
    assert skipped and sorted(added) == skipped
    assert handle.plan(28).curve == FLUX_RATIOS  # run on the calibration's own step count: the curve as it is
    residual = {c: stack_out[c] - stack_in[c] for c in computed}  # r = x_out - x_in of each computed step
    scaled_somewhere = False
    for step in skipped:
        last = max(c for c in computed if c < step)
        if reuse == "residual":
            expected = residual[last]
        elif reuse == "scaled":  # r_c times the curve's ratios of the steps since c: γ[c+1] · … · γ[step]
            growth = 1.0
            for i in range(last + 1, step + 1):
                growth *= FLUX_RATIOS[i]
            scaled_somewhere = scaled_somewhere or growth != 1.0
            expected = residual[last] * growth
        else:  # r_c + (r_c - r_p) · min((j - c) / (c - p), 1/2)
            earlier = [c for c in computed if c < last]
            if not earlier:
                expected = residual[last]
            else:
                weight = min((step - last) / (last - earlier[-1]), FORECAST_REACH)
                expected = torch.lerp(residual[earlier[-1]], residual[last], 1.0 + weight)
        assert torch.equal(added[step], expected), (reuse, step, last)
        assert torch.equal(stack_out[step], stack_in[step] + added[step])  # and that is what the stack output got
    assert scaled_somewhere or reuse != "scaled"  # the scaled check saw a growth that is not 1


def test_the_forecast_extrapolates_half_its_interval_then_holds(flux):
    # Computed steps 0 and 14: the skips 15..27 extrapolate the line through their residuals up to step 21
    # (half of the 14-step interval, FORECAST_REACH) and reuse step 21's value after it.
    settings = dict(mag_ratios=FLUX_RATIOS, threshold=10.0, max_skip_steps=13, retention_ratio=0.0)
    model = copy.deepcopy(flux)
    scheduler = FlowMatchEulerDiscreteScheduler()
    handle = magsdk.enable(model, magsdk.MagCacheConfig(reuse="forecast", **settings), scheduler=scheduler)
    session = handle.sessions[0]
    added: dict[int, torch.Tensor] = {}
    bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    original = session._reused

    def spy(state, step):  # type: ignore[no-untyped-def]
        added[step] = original(state, step).clone()
        if state.previous is not None:
            bases[step] = (state.previous.clone(), state.residual.clone())
        return added[step]

    session._reused = spy
    denoise(model, 28, scheduler=scheduler)
    assert handle.stats.computed_steps() == [0, 14]
    assert sorted(added) == list(range(1, 14)) + list(range(15, 28))
    first, last = bases[15]
    for step in range(15, 28):
        weight = min((step - 14) / 14, FORECAST_REACH)
        torch.testing.assert_close(added[step], torch.lerp(first, last, 1.0 + weight))
    assert not torch.equal(added[20], added[21]) and all(torch.equal(added[21], added[s]) for s in range(22, 28))


def test_forecast_keeps_at_most_two_residuals_per_branch(flux):
    model = tiny_flux(layers=2, single_layers=2, heads=2, head_dim=8)
    side = 16
    residual_bytes = side * side * 16 * 4

    def held() -> int:
        gc.collect()
        return sum(t.untyped_storage().nbytes() for t in gc.get_objects()
                   if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.device.type == "cpu"
                   and t.numel() == side * side * 16)

    before = held()
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, compute_steps=9),
                           scheduler=FlowMatchEulerDiscreteScheduler())
    scheduler = handle.scheduler
    out = denoise(model, 28, side=side, cfg=True, scheduler=scheduler)
    del out
    assert handle.stats.skipped_calls > 0
    assert held() - before <= 2 * 2 * residual_bytes  # two branches, two residuals each
    handle.disable()
    assert held() - before == 0
