"""The budget planner: exact budgets, optimality against brute force, constraints, and clear errors."""

from __future__ import annotations

import cmath
import itertools
import math

import numpy as np
import pytest
from pydantic import ValidationError

import magsdk
from magsdk.errors import UsageError
from magsdk.planner import (
    ERROR_MODELS,
    InfeasibleBudgetError,
    budget_bounds,
    budget_from_speedup,
    config_budget,
    config_constraints,
    plan_budget,
    recommended_error_model,
    retention_steps,
    smallest_max_skip_steps,
)
from magsdk.ratios import resample_nearest
from strategies.flux import VARIANTS

FLUX = VARIANTS[0]["calibrations"][0]["branches"]["default"]  # the MagCache repo's FLUX.1-dev curve, 28 steps


def random_run(n: int, seed: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    return {
        "curve": [1.0, *np.exp(rng.normal(0, 0.08, n - 1)).tolist()],
        "cos_dists": rng.uniform(0, 0.05, n).tolist(),
        "norm_stds": rng.uniform(0, 0.1, n).tolist(),
        "sigmas": np.sort(rng.uniform(0, 1, n))[::-1].tolist(),
    }


def reference_cost(run: dict[str, list[float]], computed: list[int], model: str) -> float:
    """The error model written out run by run, independently of the planner's vectorised form."""
    curve, cos, std, sig = run["curve"], run["cos_dists"], run["norm_stds"], run["sigmas"]
    n, total = len(curve), 0.0
    for index, c in enumerate(computed):
        end = computed[index + 1] if index + 1 < len(computed) else n
        p = computed[index - 1] if index > 0 else None
        acc, angle, var = 1.0, 0.0, 0.0
        for j in range(c + 1, end):
            acc *= curve[j]
            angle += math.acos(1 - cos[j])
            var += std[j] ** 2
            if model == "acc_err":
                term = abs(1 - acc)
            elif model == "acc_err_sq":
                term = (1 - acc) ** 2
            elif model in ("residual", "residual_std"):
                sq = (1 - acc) ** 2 + 2 * acc * (1 - math.cos(angle))
                term = math.sqrt(sq + (acc**2 * var if model == "residual_std" else 0.0))
            else:  # forecast: extrapolate z_p -> z_c linearly in sigma to step j (z_c = 1)
                w = acc * cmath.exp(1j * angle)
                if p is None:
                    term = abs(w - 1)
                else:
                    growth = math.prod(curve[p + 1 : c + 1])
                    turn = sum(math.acos(1 - cos[m]) for m in range(p + 1, c + 1))
                    zp = cmath.exp(-1j * turn) / growth
                    slope = min((sig[j] - sig[c]) / (sig[c] - sig[p]), 0.5)  # the runtime's reach
                    term = abs(w - (1 + (1 - zp) * slope))
            total += term
    return total


def feasible_schedules(n: int, budget: int, k: int, r: float) -> list[list[int]]:
    fixed = max(1, retention_steps(r, n))
    out = []
    for extra in itertools.combinations(range(fixed, n), budget - fixed):
        computed = [*range(fixed), *extra]
        edges = [*computed, n]
        if all(b - a - 1 <= k for a, b in itertools.pairwise(edges)):
            out.append(computed)
    return out


def check_schedule(plan: magsdk.planner.BudgetPlan, n: int, budget: int, k: int, r: float) -> None:
    computed = plan.computed_steps
    assert len(computed) == budget and len(set(computed)) == budget
    assert computed == sorted(computed) and computed[0] == 0 and computed[-1] < n
    assert sorted(computed + plan.skipped_steps) == list(range(n))
    assert set(range(retention_steps(r, n))) <= set(computed)
    edges = [*computed, n]
    assert max(b - a - 1 for a, b in itertools.pairwise(edges)) <= k
    assert plan.schedule_string().count("C") == budget


# -- exact budgets and constraints ------------------------------------------------------------------
@pytest.mark.parametrize("n", [10, 28, 50])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, None])
@pytest.mark.parametrize("r", [0.1, 0.2, None])
def test_every_feasible_budget_is_met_exactly(n, k, r):
    curve = resample_nearest(FLUX, n)
    rr = 0.0 if r is None else r
    least, most = budget_bounds(n, n if k is None else k, rr)  # K unset: runs of any length
    assert most == n
    budgets = range(least, most + 1) if n <= 28 else sorted({least, least + 1, (least + most) // 2, most - 1, most})
    for budget in budgets:
        plan = plan_budget(curve, budget, max_skip_steps=k, retention_ratio=r)
        kk = k if k is not None else smallest_max_skip_steps(n, budget, rr)
        assert plan.max_skip_steps == kk
        check_schedule(plan, n, budget, kk, rr)
        assert plan.cost == pytest.approx(reference_cost(_flat(curve), plan.computed_steps, "acc_err"), abs=1e-9)
    if least > 1:
        with pytest.raises(InfeasibleBudgetError, match=f"smallest feasible budget is {least}"):
            plan_budget(curve, least - 1, max_skip_steps=k, retention_ratio=r)


def _flat(curve: list[float]) -> dict[str, list[float]]:
    n = len(curve)
    return {"curve": curve, "cos_dists": [0.0] * n, "norm_stds": [0.0] * n, "sigmas": [float(n - i) for i in range(n)]}


def test_unset_k_is_the_smallest_that_meets_the_budget():
    for n, r in [(9, 0.0), (11, 0.2), (12, 0.1)]:
        run = random_run(n, n)
        fixed = max(1, retention_steps(r, n))
        for budget in range(fixed, n + 1):
            k_min = smallest_max_skip_steps(n, budget, r)
            assert feasible_schedules(n, budget, k_min, r)
            assert k_min == 0 or not feasible_schedules(n, budget, k_min - 1, r)
            plan = plan_budget(run["curve"], budget, retention_ratio=r if r else None, cos_dists=run["cos_dists"])
            assert plan.max_skip_steps == k_min
            best = min(reference_cost(run, s, "residual") for s in feasible_schedules(n, budget, k_min, r))
            assert plan.cost == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_recommended_models_follow_the_reuse_mode():
    assert recommended_error_model("forecast") == "residual"
    assert recommended_error_model("plain") == "acc_err"
    assert recommended_error_model("scaled") == "acc_err"


def test_residual_without_cos_dists_is_magcaches_acc_err():
    run = random_run(12, 3)
    for budget in (4, 6, 9):
        a = plan_budget(run["curve"], budget, max_skip_steps=4, error_model="residual")
        b = plan_budget(run["curve"], budget, max_skip_steps=4, error_model="acc_err")
        assert a.computed_steps == b.computed_steps and a.cost == pytest.approx(b.cost, rel=1e-12)


@pytest.mark.parametrize(("n", "k", "r"), [(7, 1, 0.0), (9, 2, 0.2), (10, 3, 0.1), (11, 0, 0.3), (12, 4, 0.25)])
def test_budget_bounds_are_tight(n, k, r):
    least, most = budget_bounds(n, k, r)
    assert feasible_schedules(n, least, k, r)
    if least > max(1, retention_steps(r, n)):
        assert not feasible_schedules(n, least - 1, k, r)
    assert most == n


def test_the_issue_example_defaults_cannot_reach_9_of_28():
    assert budget_bounds(28, 3, 0.2) == (11, 28)
    with pytest.raises(InfeasibleBudgetError) as info:
        plan_budget(FLUX, 9, max_skip_steps=3, retention_ratio=0.2)
    message = str(info.value)
    assert "smallest feasible budget is 11" in message and "max_skip_steps=3" in message
    assert "retention_ratio=0.2" in message and "compute_steps >= 11" in message
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    # left unset, K and retention are the planner's: 9 of 28 is reachable, with runs of at most 3 skips
    plan = plan_budget(FLUX, 9)
    check_schedule(plan, 28, 9, 3, 0.0)
    assert plan.max_skip_steps == 3


@pytest.mark.parametrize("n", [10, 28, 50])
def test_hints_in_infeasible_errors_work_when_followed(n):
    for k, r in [(1, 0.2), (2, 0.1), (3, 0.3), (0, 0.0)]:
        least = budget_bounds(n, k, r)[0]
        if least == 1:
            continue
        with pytest.raises(InfeasibleBudgetError) as info:
            plan_budget(resample_nearest(FLUX, n), least - 1, max_skip_steps=k, retention_ratio=r)
        text = str(info.value)
        speedup = float(text.split("speedup <= ")[1].split(")")[0])
        assert budget_from_speedup(n, speedup) >= least
        followed = plan_budget(resample_nearest(FLUX, n), least, max_skip_steps=k, retention_ratio=r)
        assert len(followed.computed_steps) == least
    with pytest.raises(InfeasibleBudgetError, match=f"more than the run's {n} steps; use at most {n}"):
        plan_budget(resample_nearest(FLUX, n), n + 1)


# -- optimality --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ERROR_MODELS)
@pytest.mark.parametrize("seed", range(6))
def test_optimal_against_brute_force(model, seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 13))
    k = int(rng.integers(1, 5))
    r = float(rng.choice([0.0, 0.1, 0.2, 0.3]))
    run = random_run(n, seed)
    least, most = budget_bounds(n, k, r)
    for budget in range(least, most + 1):
        plan = plan_budget(run["curve"], budget, max_skip_steps=k, retention_ratio=r, error_model=model,
                           cos_dists=run["cos_dists"], norm_stds=run["norm_stds"], sigmas=run["sigmas"])
        check_schedule(plan, n, budget, k, r)
        best = min(reference_cost(run, s, model) for s in feasible_schedules(n, budget, k, r))
        assert plan.cost == pytest.approx(reference_cost(run, plan.computed_steps, model), rel=1e-9, abs=1e-12)
        assert plan.cost == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_planner_beats_the_threshold_rule_on_its_own_error_at_the_same_budget():
    for threshold, k, r in [(0.06, 3, 0.2), (0.12, 4, 0.2), (0.24, 5, 0.1), (0.5, 6, 0.1)]:
        config = magsdk.MagCacheConfig(mag_ratios=FLUX, threshold=threshold, max_skip_steps=k, retention_ratio=r)
        greedy = magsdk.plan(FLUX, config, 28)
        plan = plan_budget(FLUX, len(greedy.computed_steps), max_skip_steps=k, retention_ratio=r)
        assert plan.cost <= reference_cost(_flat(FLUX), greedy.computed_steps, "acc_err") + 1e-12


def test_a_flat_curve_costs_nothing_and_a_rough_step_is_computed():
    flat = [1.0] * 20
    assert plan_budget(flat, 4).cost == 0.0
    rough = [1.0] * 20
    rough[12] = 1.8  # the residual jumps at step 12: reusing across it is expensive
    assert 12 in plan_budget(rough, 5).computed_steps


def test_a_400_step_run_gets_a_valid_plan_for_a_budget_of_120():
    """Exactly 120 computed steps, step 0 first, no run of skips longer than the smallest feasible K."""
    curve = resample_nearest(FLUX, 400)
    plan = plan_budget(curve, 120)
    check_schedule(plan, 400, 120, smallest_max_skip_steps(400, 120, 0.0), 0.0)


def test_a_budget_of_a_few_steps_needs_no_max_skip_steps():
    """3 of 28 (runs of 9 skips) and 1 of 28 (only step 0) are plans, not errors, when K is left to the planner."""
    curve = resample_nearest(FLUX, 28)
    for budget, k in ((3, 9), (2, 13), (1, 27)):
        plan = plan_budget(curve, budget)
        assert plan.max_skip_steps == k
        check_schedule(plan, 28, budget, k, 0.0)
    assert magsdk.MagCacheConfig(num_inference_steps=28, compute_steps=2).compute_steps == 2
    with pytest.raises(ValidationError, match="smallest feasible budget is 6"):
        magsdk.MagCacheConfig(num_inference_steps=28, compute_steps=3, retention_ratio=0.2)


# -- input checks ------------------------------------------------------------------------------------
def test_bad_inputs_name_what_is_wrong():
    run = random_run(10, 0)
    with pytest.raises(ValueError, match="error_model must be one of"):
        plan_budget(run["curve"], 5, error_model="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs norm_stds"):
        plan_budget(run["curve"], 5, error_model="residual_std", cos_dists=run["cos_dists"])
    with pytest.raises(ValueError, match="cos_dists has 9 values but the run has 10 steps"):
        plan_budget(run["curve"], 5, error_model="residual", cos_dists=run["cos_dists"][:9])
    with pytest.raises(ValueError, match=r"curve\[3\] = -1.0 is not a finite positive number"):
        plan_budget([1.0, 1.0, 1.0, -1.0], 2)
    with pytest.raises(ValueError, match="budget must be an integer >= 1, got 0"):
        plan_budget(run["curve"], 0)
    with pytest.raises(ValueError, match="max_skip_steps must be an integer >= 0"):
        plan_budget(run["curve"], 5, max_skip_steps=-1)
    with pytest.raises(ValueError, match=r"retention_ratio must be in \[0, 1\)"):
        plan_budget(run["curve"], 5, retention_ratio=1.5)
    with pytest.raises(ValueError, match="sigmas must differ between steps"):
        plan_budget(run["curve"], 5, error_model="forecast", sigmas=[1.0] * 10)
    with pytest.raises(ValueError, match="speedup must be a finite number > 0"):
        budget_from_speedup(28, math.nan)


def test_speedup_maps_to_a_budget():
    assert budget_from_speedup(28, 2.0) == 14
    assert budget_from_speedup(28, 3.0) == 9
    assert budget_from_speedup(29, 2.0) == 15  # a tie rounds up: one step more, never less
    assert budget_from_speedup(28, 1.0) == 28
    assert budget_from_speedup(10, 100.0) == 1


# -- configuration -----------------------------------------------------------------------------------
def test_budget_fields_and_planner_choices():
    plain = magsdk.MagCacheConfig(mag_ratios=FLUX, compute_steps=9)
    assert config_budget(plain, 28) == 9 and config_constraints(plain) == (None, None)
    explicit = magsdk.MagCacheConfig(mag_ratios=FLUX, speedup=2.0, max_skip_steps=3)  # 3 is the default value
    assert config_budget(explicit, 28) == 14 and config_budget(explicit, 50) == 25
    assert config_constraints(explicit) == (3, None)
    both = magsdk.MagCacheConfig(mag_ratios=FLUX, compute_steps=12, max_skip_steps=4, retention_ratio=0.1)
    assert config_constraints(both) == (4, 0.1)
    threshold_mode = magsdk.MagCacheConfig(mag_ratios=FLUX)
    assert config_budget(threshold_mode, 28) is None
    assert magsdk.MagCacheConfig(mag_ratios=FLUX, compute_steps=9, num_inference_steps=28).compute_steps == 9


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"compute_steps": 9, "speedup": 2.0}, "compute_steps=9 and speedup=2 both set a budget"),
        ({"compute_steps": 0}, "compute_steps"),
        ({"compute_steps": 2.5}, "compute_steps"),
        ({"speedup": 0.5}, "speedup"),
        ({"speedup": math.inf}, "speedup"),
        ({"speedup": math.nan}, "speedup"),
        ({"compute_steps": 5, "calibrate": True}, "compute_steps sets a compute budget, but calibrate=True"),
        ({"compute_steps": 30, "num_inference_steps": 28}, "compute_steps=30 is more than num_inference_steps=28"),
        (
            {"compute_steps": 9, "max_skip_steps": 3, "retention_ratio": 0.2, "num_inference_steps": 28},
            "compute_steps=9 cannot be met .* max_skip_steps=3 and retention_ratio=0.2: the smallest feasible "
            "budget is 11 computed steps; use compute_steps >= 11",
        ),
        (
            {"speedup": 4.0, "max_skip_steps": 2, "num_inference_steps": 28},
            r"speedup=4 \(7 of 28 steps\) cannot be met .* max_skip_steps=2: the smallest feasible budget is 10 "
            r"computed steps; use speedup <= 2.8",
        ),
    ],
)
def test_budget_validation_errors_name_the_field(kwargs, pattern):
    with pytest.raises(ValidationError, match=pattern):
        magsdk.MagCacheConfig(mag_ratios=FLUX, **kwargs)


def test_config_hint_for_speedup_works_when_followed():
    with pytest.raises(ValidationError, match=r"use speedup <= 2.8"):
        magsdk.MagCacheConfig(mag_ratios=FLUX, speedup=4.0, max_skip_steps=2, num_inference_steps=28)
    config = magsdk.MagCacheConfig(mag_ratios=FLUX, speedup=2.8, max_skip_steps=2, num_inference_steps=28)
    budget = config_budget(config, 28)
    assert budget is not None
    assert len(plan_budget(FLUX, budget, max_skip_steps=2).computed_steps) == 10
