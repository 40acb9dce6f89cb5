"""The budget planner: which B of a run's N steps to compute so that the skipped ones cost least.

MagCache's threshold rule is greedy: it skips while the error accumulated since the last computed
step stays under a threshold. A user who asks for "12 of 28 steps" or "2x" wants a budget spent
well instead, and the greedy rule does not do that (quality is not even monotonic in the number of
calls it computes). Because the error of a skipped run depends only on calibrated data, the best
schedule for an exact budget is a shortest path over "the last computed step": dynamic
programming, O(B·N·K) with B the budget and K the longest run of skips.

A schedule is a set of computed steps; the steps between two computed ones are *skipped*. The
cost of a run of skips after computed step ``c`` is the sum, over its steps ``j``, of an error
term. The residual is modelled as a point in the plane, ``z_m = ‖r_m‖·exp(i·φ_m)``: its norm grows
by ``curve[m]`` per step and it turns by ``arccos(1 − cos_dists[m])`` per step (0 without
cos_dists). With ``acc_j = curve[c+1]·…·curve[j]`` and ``θ_j`` the angle turned since ``c``:

- ``"residual"`` (default): ``|z_j − z_c| / |z_c| = sqrt((1 − acc_j)² + 2·acc_j·(1 − cos θ_j))``,
  the relative error of reusing ``r_c`` at step ``j``. Without cos_dists it is ``|1 − acc_j|``;
- ``"acc_err"``: ``|1 − acc_j|``, MagCache's own accumulated error (the threshold rule stops a
  run when its sum passes the threshold);
- ``"acc_err_sq"``: ``(1 − acc_j)²``;
- ``"residual_std"``: ``"residual"`` plus the token-level spread of the ratio under the root
  (``acc_j²·Σ norm_stds[m]²``); needs ``norm_stds``;
- ``"forecast"``: the error of a first-order forecast from the two last computed residuals in the
  same planar model (extrapolated in ``sigmas``, else in step index); its terms depend on the
  computed step before ``c`` too, so the programme tracks that gap (O(B·N·K²)).

``step_weights`` multiply each skipped step's term. When ``max_skip_steps`` is left unset, the
planner takes the *smallest* K that meets the budget: the budget is spread as evenly as it can be,
and the model decides where the computed steps go within that.

Measured on the reference model (``tools/research_planner.py``, 80 images, budgets 18, 14, 10 and
8 of 28 steps, true CFG; the tables are in docs): every model here, even one fed the residuals
recorded in a real run, under-prices long runs of skips (a stale residual is added to an input that
has itself drifted), so with K free up to 6 its schedules lost to evenly spaced computes by up to
5 dB; the smallest K closes most of that gap. With the first-order forecast on skipped steps
(extrapolating whole runs, as the study's own executor does; the runtime's ``FORECAST_REACH`` came later
and is measured in the budget table of docs/benchmarks.md),
``"residual"`` beat the best threshold setting at no more calls by 10.5, 11.5, 11.9 and 8.9 dB
(2.8–8.1 dB when the threshold schedules get the forecast too), was on or above evenly spaced
computes (+4.1, 0, +0.6, −0.1 ± 0.2 dB) and 1.5 dB above ``"acc_err"`` at 8 of 28. With plain reuse
``"acc_err"`` measured better than ``"residual"`` (0.4–0.6 dB at 18 and 8 of 28), hence
``recommended_error_model``, and evenly spaced computes still beat both by 0.6–1.4 dB at 18, 10 and
8: the curve does not say that early steps matter more to the image (skipping step 5 alone costs
15x the squared error of skipping step 20, while their ratio terms are equal). A forced retention
lowered PSNR at every budget below 18 of 28.

Pure functions over numpy; no torch, so the runtime, ``magsdk.plan`` and the CLI share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict

from magsdk.errors import UsageError

if TYPE_CHECKING:  # config imports this module for its budget checks
    from magsdk.config import MagCacheConfig

#: How far the runtime's forecast extrapolates, as a share of the interval its slope was measured over;
#: further skips hold the value reached there. A line through two residuals drifts off a curving
#: trajectory; the budget table of docs/benchmarks.md measures this reach against extrapolating the
#: whole run (docs/design.md section 7).
FORECAST_REACH = 0.5

ErrorModel = Literal["acc_err", "acc_err_sq", "residual", "residual_std", "forecast"]
ERROR_MODELS: tuple[str, ...] = get_args(ErrorModel)

#: The error model used when none is named (see the module docstring for the measurement).
DEFAULT_ERROR_MODEL: ErrorModel = "residual"
#: Retention when ``retention_ratio`` is left unset: only step 0 is forced (the model and the
#: smallest K keep early steps; a forced retention made lower budgets worse on the reference model).
PLANNER_RETENTION_RATIO = 0.0


def recommended_error_model(reuse: str) -> ErrorModel:
    """The model that measured best for a reuse mode: ``"residual"`` with the forecast, else ``"acc_err"``."""
    return "residual" if reuse == "forecast" else "acc_err"


class InfeasibleBudgetError(UsageError, ValueError):
    """A budget that no schedule can meet under the given constraints (the message names the range)."""


class PlanValueError(UsageError, ValueError):
    """A planning argument with a value out of its range (a ``ValueError`` too, as before it was a UsageError)."""


class PlanTypeError(UsageError, TypeError):
    """A planning argument of the wrong type (a ``TypeError`` too, as before it was a UsageError)."""


def check_count(name: str, value: object, least: int = 1, what: str = "") -> int:
    """``value`` as a plain int >= ``least``; a UsageError naming ``name`` and the value otherwise.

    Step counts and budgets are counts: an integral numpy number (``np.int64(8)``, what array code hands
    around) is one, and is returned as a plain int so that every later ``isinstance(n, int)`` holds; a bool,
    a float (``8.0`` is refused too: a count that arrives as a float was usually computed, and may be 7.999)
    or a string is not. ``what`` says what the count counts, for the message.
    """
    about = f"; it counts {what}" if what else ""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        hint = f"; pass int({value!r})" if isinstance(value, float) and value.is_integer() else ""
        raise PlanTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}{about}{hint}")
    if value < least:
        raise PlanValueError(f"{name} must be an integer >= {least}, got {int(value)}{about}")
    return int(value)


class BudgetPlan(BaseModel):
    """The computed steps of one branch for an exact budget, and the constraints they satisfy."""

    model_config = ConfigDict(frozen=True)

    num_steps: int
    budget: int
    computed_steps: list[int]
    skipped_steps: list[int]
    max_skip_steps: int
    retention_ratio: float
    error_model: str
    #: The error model's value for this schedule (0 when nothing is skipped).
    cost: float

    def schedule_string(self) -> str:
        skipped = set(self.skipped_steps)
        return "".join("." if i in skipped else "C" for i in range(self.num_steps))


def retention_steps(retention_ratio: float, num_steps: int) -> int:
    """Steps at the start that are always computed; rounds half up like MagCache (``magsdk.ratios``)."""
    return int(retention_ratio * num_steps + 0.5)


def budget_bounds(num_steps: int, max_skip_steps: int, retention_ratio: float) -> tuple[int, int]:
    """``(smallest, largest)`` number of computed steps that a run of ``num_steps`` can have.

    Step 0 and every step before the retention step are computed; each of the remaining steps
    is computed or belongs to a run of at most ``max_skip_steps`` skips (the last run may reach
    the end of the run). With ``c`` computed among ``M`` free steps there are ``c + 1`` gaps of at
    most K skips each, so ``c ≥ (M − K) / (K + 1)``.
    """
    num_steps = check_count("num_steps", num_steps)
    max_skip_steps = check_count("max_skip_steps", max_skip_steps, least=0)
    fixed = max(1, min(num_steps, retention_steps(retention_ratio, num_steps)))
    free = num_steps - fixed
    least = max(0, -(-(free - max_skip_steps) // (max_skip_steps + 1)))
    return fixed + least, num_steps


def smallest_max_skip_steps(num_steps: int, budget: int, retention_ratio: float) -> int:
    """The shortest longest-run of skips with which ``budget`` steps cover the run (a large number if none)."""
    fixed = max(1, min(num_steps, retention_steps(retention_ratio, num_steps)))
    free, chosen = num_steps - fixed, budget - fixed
    if chosen < 0:
        return num_steps
    return max(0, -(-(free - chosen) // (chosen + 1)))


def budget_from_speedup(num_steps: int, speedup: float) -> int:
    """``N / S`` rounded half up (like the retention step: a tie computes one step more), clamped to ``[1, N]``."""
    num_steps = check_count("num_steps", num_steps)
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float, np.integer, np.floating)):
        raise PlanTypeError(f"speedup must be a number (N / computed steps), got {type(speedup).__name__} {speedup!r}")
    if not math.isfinite(speedup) or speedup <= 0:
        raise PlanValueError(f"speedup must be a finite number > 0, got {speedup!r}")
    return min(num_steps, max(1, math.floor(num_steps / speedup + 0.5)))


def config_budget(config: MagCacheConfig, num_steps: int) -> int | None:
    """The budget a config asks for in a run of ``num_steps`` (None: threshold mode).

    ``compute_steps`` is not clamped: more steps than the run has is an error of ``plan_budget``,
    not a silent change of what the user asked for; a speedup is clamped to ``[1, N]``.
    """
    if config.compute_steps is not None:
        return config.compute_steps
    if config.speedup is not None:
        return budget_from_speedup(num_steps, config.speedup)
    return None


def config_constraints(config: MagCacheConfig) -> tuple[int | None, float | None]:
    """``(max_skip_steps, retention_ratio)`` the user set explicitly; None where the planner chooses."""
    chosen = config.model_fields_set
    k = config.max_skip_steps if "max_skip_steps" in chosen else None
    r = config.retention_ratio if "retention_ratio" in chosen else None
    return k, r


def plan_budget(
    curve: Sequence[float],
    budget: int,
    *,
    max_skip_steps: int | None = None,
    retention_ratio: float | None = None,
    error_model: ErrorModel = DEFAULT_ERROR_MODEL,
    norm_stds: Sequence[float] | None = None,
    cos_dists: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    step_weights: Sequence[float] | None = None,
) -> BudgetPlan:
    """The ``budget`` computed steps of a run whose step ``i`` has ratio ``curve[i]`` that minimise the error model.

    ``curve`` (and every optional per-step array) is already mapped onto the run: one value per
    step. ``max_skip_steps`` / ``retention_ratio`` given are constraints; left as None they are
    the planner's choice: the smallest K that meets the budget (so any budget from 1 to N is
    feasible), and ``PLANNER_RETENTION_RATIO``. ``sigmas`` (or timesteps) are what the
    ``"forecast"`` model extrapolates in; step indices when absent.
    """
    n = len(curve)
    if n < 1:
        raise PlanValueError("curve is empty; the planner needs one ratio per step of the run")
    # checked here, not where they are used: a string failed deep in the bounds arithmetic (TypeError) and a
    # float as an array index (IndexError), neither naming the argument
    budget = check_count("budget", budget, what="the steps computed")
    if max_skip_steps is not None:
        max_skip_steps = check_count("max_skip_steps", max_skip_steps, least=0, what="the most skipped steps in a row")
    if retention_ratio is not None and (
        isinstance(retention_ratio, bool) or not isinstance(retention_ratio, (int, float, np.integer, np.floating))
    ):
        raise PlanTypeError(
            f"retention_ratio must be a number in [0, 1), got {type(retention_ratio).__name__} {retention_ratio!r}"
        )
    if retention_ratio is not None and not 0 <= retention_ratio < 1:
        raise PlanValueError(f"retention_ratio must be in [0, 1), got {retention_ratio!r}")
    ratios = _array("curve", curve, n, positive=True)
    # per-step arrays are checked whether or not the chosen model reads them: one of another length is a mistake
    for name, values in (("norm_stds", norm_stds), ("cos_dists", cos_dists), ("step_weights", step_weights)):
        if values is not None:
            _array(name, values, n)
    if sigmas is not None:
        _array("sigmas", sigmas, n, signed=True)
    r = PLANNER_RETENTION_RATIO if retention_ratio is None else retention_ratio
    k = max_skip_steps
    if k is None:
        # No cap: a user who asks for 3 of 28 steps gets runs of 8-9 skips rather than an error (the quality
        # sweep in docs/benchmarks.md measures budgets down to 2 of 28 against FirstBlockCache at the same calls).
        k = smallest_max_skip_steps(n, budget, r)
    least, most = budget_bounds(n, k, r)
    if not least <= budget <= most:
        raise InfeasibleBudgetError(_infeasible_message(n, budget, least, max_skip_steps, retention_ratio))
    span = max(1, min(n - 1, k))
    terms = step_terms(ratios, span, error_model, norm_stds=norm_stds, cos_dists=cos_dists, sigmas=sigmas,
                       step_weights=step_weights)
    computed, cost = _solve(terms, n, budget, k, retention_steps(r, n))
    return BudgetPlan(
        num_steps=n, budget=budget, computed_steps=computed, skipped_steps=sorted(set(range(n)) - set(computed)),
        max_skip_steps=k, retention_ratio=r, error_model=error_model, cost=cost,
    )


# -- the error model ------------------------------------------------------------------------------
def step_terms(
    curve: np.ndarray,
    span: int,
    model: str,
    *,
    norm_stds: Sequence[float] | None = None,
    cos_dists: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    step_weights: Sequence[float] | None = None,
) -> np.ndarray:
    """``terms[c, g, l-1]``: error of the l-th skipped step after computed step ``c`` (l ≤ span).

    ``g`` is the gap back to the computed step before ``c`` (``c - g``), which only the
    ``"forecast"`` model reads (axis of size ``span + 2``, ``g = 0``: no earlier computed step, so
    the forecast falls back to plain reuse); the other models have an axis of size 1. Entries
    past the end of the run, or with ``c - g < 0``, are inf.

    The residual is modelled as a point in the plane, ``z_m = ‖r_m‖ · exp(i φ_m)``: its norm
    grows by ``curve[m]`` per step and it turns by ``arccos(1 − cos_dists[m])`` (0 without
    cos_dists). Plain reuse at step ``j`` errs by ``|z_j − z_c| / |z_c|`` and the forecast by
    ``|z_j − (z_c + (z_c − z_p)·(x_j − x_c)/(x_c − x_p))| / |z_c|``.
    """
    if model not in ERROR_MODELS:
        raise PlanValueError(f"error_model must be one of {', '.join(ERROR_MODELS)}; got {model!r}")
    n = curve.size
    log_norm = np.cumsum(np.log(curve))
    if cos_dists is not None:
        angle = np.cumsum(np.arccos(1.0 - np.clip(_array("cos_dists", cos_dists, n), 0.0, 2.0)))
    else:  # a curve without cos_dists (a strategy's table): the magnitude alone
        angle = np.zeros(n)
    c = np.arange(n)[:, None, None]
    gaps = np.arange(span + 2)[None, :, None] if model == "forecast" else np.zeros((1, 1, 1), dtype=np.int64)
    j = c + np.arange(1, span + 1)[None, None, :]
    valid = (j <= n - 1) & (c - gaps >= 0)
    jc = np.minimum(j, n - 1)
    acc = np.exp(log_norm[jc] - log_norm[c])
    turn = np.minimum(angle[jc] - angle[c], math.pi)
    if model == "acc_err":
        terms = np.abs(1.0 - acc)
    elif model == "acc_err_sq":
        terms = (1.0 - acc) ** 2
    else:
        w = acc * np.exp(1j * turn)  # z_j / z_c
        if model == "forecast":
            p = np.maximum(c - gaps, 0)
            x = np.arange(n, dtype=np.float64) if sigmas is None else _array("sigmas", sigmas, n, signed=True)
            dx = x[c] - x[p]
            if np.any((dx == 0) & (gaps > 0) & valid):
                raise PlanValueError("sigmas must differ between steps; the forecast extrapolates in them")
            back = np.exp(-(log_norm[c] - log_norm[p]) - 1j * (angle[c] - angle[p]))  # z_p / z_c
            slope = np.where(gaps > 0, (x[jc] - x[c]) / np.where(dx == 0, 1.0, dx), 0.0)
            slope = np.minimum(slope, FORECAST_REACH)  # the runtime holds the forecast past half the interval
            terms = np.abs(w - (1.0 + (1.0 - back) * slope))
        else:
            terms = np.abs(w - 1.0)
            if model == "residual_std":
                if norm_stds is None:
                    raise PlanValueError(
                        "error_model='residual_std' needs norm_stds (one per step, from the calibration)"
                    )
                var = np.cumsum(_array("norm_stds", norm_stds, n) ** 2)
                terms = np.sqrt(terms**2 + acc**2 * (var[jc] - var[c]))
    if step_weights is not None:
        terms = terms * _array("step_weights", step_weights, n)[jc]
    return np.where(valid, terms, np.inf)


# -- the dynamic programme ------------------------------------------------------------------------
def run_costs(terms: np.ndarray, max_skip_steps: int) -> np.ndarray:
    """``cost[c, g, L]``: the error of skipping the ``L`` steps after computed step ``c`` (inf where impossible)."""
    n, groups, span = terms.shape
    cost = np.full((n, groups, max_skip_steps + 1), np.inf)
    cost[:, :, 0] = 0.0
    for length in range(1, min(max_skip_steps, span) + 1):
        cost[:, :, length] = cost[:, :, length - 1] + terms[:, :, length - 1]
    return cost


def _solve(terms: np.ndarray, n: int, budget: int, k: int, retention: int) -> tuple[list[int], float]:
    """Least-cost schedule with exactly ``budget`` computed steps; the first ``retention`` steps computed.

    ``best[b, i, g]``: least cost of the steps up to ``i`` when ``i`` is the b-th computed step
    (1-based) and the computed step before it is ``i - g`` (``g`` only tracked when the model
    reads it: axis of size 1 otherwise). A transition skips ``L ≤ K`` steps after ``i`` and
    computes ``i + L + 1``; the final run may reach the end. O(B·N·K) (·K for the forecast).
    """
    fixed = max(1, min(n, retention))
    groups = terms.shape[1]
    pair = groups > 1
    cost = run_costs(terms, k)
    best = np.full((budget + 1, n, groups), np.inf)
    back_step = np.zeros((budget + 1, n, groups), dtype=np.int64)
    back_gap = np.zeros((budget + 1, n, groups), dtype=np.int64)
    best[fixed, fixed - 1, (1 if fixed > 1 else 0) if pair else 0] = 0.0
    for b in range(fixed, budget):
        for length in range(k + 1):
            src = np.arange(fixed - 1, n - length - 1)
            if src.size == 0:
                continue
            options = best[b, src, :] + cost[src, :, length]
            g_best = np.argmin(options, axis=1)
            value = options[np.arange(src.size), g_best]
            dst, g_new = src + length + 1, (length + 1 if pair else 0)
            better = value < best[b + 1, dst, g_new]
            best[b + 1, dst[better], g_new] = value[better]
            back_step[b + 1, dst[better], g_new] = src[better]
            back_gap[b + 1, dst[better], g_new] = g_best[better]
    last_len = (n - 1) - np.arange(n)
    total = np.full((n, groups), np.inf)
    ok = last_len <= k
    total[ok] = best[budget, ok, :] + cost[np.arange(n)[ok], :, last_len[ok]]
    flat = int(np.argmin(total))
    i, g = divmod(flat, groups)
    value = float(total[i, g])
    if not math.isfinite(value):
        raise AssertionError(f"no schedule of {budget} steps; the caller checks feasibility")  # pragma: no cover
    steps = [i]
    for b in range(budget, fixed, -1):
        i, g = int(back_step[b, i, g]), int(back_gap[b, i, g])
        steps.append(i)
    return sorted(set(steps) | set(range(fixed))), value


# -- checks and messages --------------------------------------------------------------------------
def _array(name: str, values: Sequence[float], n: int, positive: bool = False, signed: bool = False) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n,):
        raise PlanValueError(f"{name} has {array.size} values but the run has {n} steps; map it onto the run first")
    bad = ~np.isfinite(array)
    if not signed:
        bad |= (array <= 0) if positive else (array < 0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        kind = "finite" if signed else "finite positive" if positive else "finite non-negative"
        raise PlanValueError(f"{name}[{index}] = {float(array[index])!r} is not a {kind} number")
    return array


def _infeasible_message(
    n: int, budget: int, least: int, max_skip_steps: int | None, retention_ratio: float | None
) -> str:
    if budget > n:
        return f"a budget of {budget} computed steps is more than the run's {n} steps; use at most {n}"
    given = [f"{name}={value:g}" for name, value in (("max_skip_steps", max_skip_steps),
                                                      ("retention_ratio", retention_ratio)) if value is not None]
    under = " and ".join(given) if given else "the planner's own constraints"
    hint = ", or loosen or unset " + " / ".join(g.split("=")[0] for g in given) if given else ""
    return (
        f"a budget of {budget} computed steps cannot be met in a {n}-step run under {under}: "
        f"the smallest feasible budget is {least}; ask for at least {least} computed steps "
        f"(compute_steps >= {least}, or speedup <= {largest_speedup(n, least)}){hint}"
    )


def largest_speedup(num_steps: int, least: int) -> str:
    """The largest speedup (3 decimals, rounded down) whose budget is still at least ``least`` steps."""
    return f"{math.floor(num_steps / least * 1000) / 1000:g}"


__all__ = [
    "DEFAULT_ERROR_MODEL",
    "ERROR_MODELS",
    "FORECAST_REACH",
    "BudgetPlan",
    "ErrorModel",
    "InfeasibleBudgetError",
    "PlanTypeError",
    "PlanValueError",
    "budget_bounds",
    "budget_from_speedup",
    "check_count",
    "config_budget",
    "config_constraints",
    "largest_speedup",
    "plan_budget",
    "recommended_error_model",
    "retention_steps",
    "smallest_max_skip_steps",
    "step_terms",
]
