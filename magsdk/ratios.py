"""The skip decision, and the whole skip schedule of a run before it starts.

The decision reads only the precomputed curve, so the schedule is a pure function of (curve,
settings, run schedule): ``plan``. The runtime asks the very same ``BranchSchedule`` call by
call, and both get their curve from ``CurveSource.curve_for`` — so a plan printed before a run
is exactly what the run does, for every branch, mapping mode and budget.

Arithmetic is done in float32 on purpose: diffusers 0.42.1 keeps its curve in a float32 tensor
and accumulates in float32, and parity means the same decision at every threshold boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from magsdk.config import DEFAULT_BRANCH, CalibrationEntry, CalibrationResult, MagCacheConfig
from magsdk.curves import (
    CurveSource,
    MappedCurve,
    RunSchedule,
    TimestepMap,
    check_timesteps,
    resample_nearest,
    retention_steps,
    select_branch_curve,
)
from magsdk.errors import UsageError
from magsdk.planner import (
    BudgetPlan,
    PlanValueError,
    check_count,
    config_budget,
    config_constraints,
    plan_budget,
    recommended_error_model,
)

_F32 = np.float32

__all__ = [
    "FRESH",
    "Accumulator",
    "BranchSchedule",
    "SkipPlan",
    "decide",
    "plan",
    "plan_source",
    "resample_by_timesteps",
    "resample_nearest",
    "retention_steps",
    "select_branch_curve",
    "select_calibration",
]


def resample_by_timesteps(
    curve: Sequence[float], timesteps: Sequence[float], new_timesteps: Sequence[float]
) -> list[float]:
    """Map a curve onto another schedule through its recorded timesteps (see ``magsdk.curves.TimestepMap``).

    The curve must be ratios (finite, > 0) and the timesteps finite: the map takes logarithms, and a 0 or a NaN
    came back as NaNs with numpy warnings instead of an error.
    """
    return TimestepMap(curve, timesteps).map(new_timesteps)


@dataclass(frozen=True)
class Accumulator:
    """MagCache's running error since the last computed step (float32, as diffusers)."""

    ratio: float = 1.0
    steps: int = 0
    err: float = 0.0


FRESH = Accumulator()


def decide(
    acc: Accumulator, scale: float, retained: bool, config: MagCacheConfig, has_residual: bool
) -> tuple[bool, Accumulator]:
    """Return ``(skip, next_accumulator)`` for one call of one branch whose step has ratio ``scale``."""
    if config.calibrate or retained:
        return False, acc
    ratio = _F32(acc.ratio) * _F32(scale)
    steps = acc.steps + 1
    err = _F32(acc.err) + abs(_F32(1.0) - ratio)
    if has_residual and err <= config.threshold and steps <= config.max_skip_steps:
        return True, Accumulator(float(ratio), steps, float(err))
    return False, FRESH


Constraints = tuple[int | None, float | None]
"""``(max_skip_steps, retention_ratio)`` the user set explicitly; None where the budget planner chooses."""


class BranchSchedule:
    """One branch's decisions in one run: the curve it follows and its running accumulator.

    Threshold mode decides call by call (MagCache's rule). Budget mode (``compute_steps`` /
    ``speedup``) plans the run's computed steps once, when the branch starts, with
    ``magsdk.planner.plan_budget``; then it looks them up.
    """

    def __init__(self, curve: MappedCurve, config: MagCacheConfig, start: int = 0,
                 constraints: Constraints | None = None) -> None:
        self.curve = curve
        self.config = config
        self.acc = FRESH
        self._previous_t: float | None = None
        #: The next online call is the run's first step after step 0 (it carries the curve's start-up jump).
        self._first_interval = True
        #: A transformer that joins mid-schedule (Wan 2.2's low-noise expert) restarts the retention window at its
        #: first step, as the MagCache source does: its first ``round(R · steps left)`` steps are computed.
        self.start = start
        self._restart_until = start
        if start > 0 and curve.values is not None:
            self._restart_until = start + retention_steps(config.retention_ratio, len(curve.values) - start)
        self.budget: BudgetPlan | None = None
        self.planned: frozenset[int] | None = None
        #: The first step past the end of ``curve.values`` (a run that does not know its step count); None: none.
        self.outran_at: int | None = None
        if config.compute_steps is not None or config.speedup is not None:
            self._plan_budget(constraints if constraints is not None else config_constraints(config))

    def _plan_budget(self, constraints: Constraints) -> None:
        values = self.curve.values
        if values is None:
            raise UsageError(
                "compute_steps / speedup plan a whole run before its first call, so they need its step count, and "
                "this run does not know it (a bare transformer whose loop steps no scheduler magsdk was given): "
                "pass scheduler=<the scheduler your loop steps> to magsdk.enable, or "
                "MagCacheConfig(num_inference_steps=N), or enable the cache on the pipeline (its scheduler says)"
            )
        budget = config_budget(self.config, len(values))
        assert budget is not None
        k, r = constraints
        self.budget = plan_budget(values, budget, max_skip_steps=k, retention_ratio=r,
                                  error_model=recommended_error_model(self.config.effective_reuse()))
        self.planned = frozenset(self.budget.computed_steps)

    def should_skip(self, step: int, timestep: float | None, has_residual: bool) -> bool:
        """Decide one call (and advance the accumulator). ``timestep`` is needed only for online curves."""
        if self.planned is not None:
            return has_residual and step not in self.planned and not self.config.calibrate
        curve = self.curve
        if curve.values is not None:
            if step < len(curve.values):
                scale = curve.values[step]
            else:  # a run that does not know its step count, past the curve: flat (the session says so once)
                scale = 1.0
                if self.outran_at is None:
                    self.outran_at = step
            if self.start > 0:
                retained = step < self._restart_until
            else:
                retained = curve.retention_steps is not None and step < curve.retention_steps
        else:
            online = curve.online
            if online is None or timestep is None:
                return False  # nothing to map with: compute
            if self._previous_t is None:
                scale = online.curve[0]
            else:
                scale = online.ratio(self._previous_t, timestep, first=self._first_interval)
            retained = online.retained(timestep, curve.retention_index)
            self._first_interval = self._previous_t is None
            self._previous_t = timestep
        skip, self.acc = decide(self.acc, scale, retained, self.config, has_residual)
        return skip

    def growth(self, since: int, step: int) -> float:
        """The curve's accumulated ratio from the computed step ``since`` to ``step`` (for ``reuse="scaled"``)."""
        values = self.curve.values
        if values is None:
            return self.acc.ratio
        product = 1.0
        for i in range(since + 1, min(step, len(values) - 1) + 1):
            product *= values[i]
        return product


class SkipPlan(BaseModel):
    """The whole skip schedule of one branch, known before the first call."""

    model_config = ConfigDict(frozen=True)

    num_steps: int
    threshold: float
    max_skip_steps: int
    retention_ratio: float
    computed_steps: list[int]
    skipped_steps: list[int]
    curve: list[float]
    branch: str = DEFAULT_BRANCH
    #: How the branch's curve was obtained for this run (calibration chosen, mapping applied).
    mapping: str = ""
    #: Timesteps of the run that lie outside the calibrated range (the curve is flat there).
    out_of_range: list[float] = []
    #: Leading steps always computed (the run's first int(r·N+0.5)); None when online (a noise-level window).
    retained_steps: int | None = None
    #: Budget mode: the steps computed per branch asked for (the threshold is then unused).
    budget: int | None = None
    #: What a skipped step reuses: residual, scaled or forecast.
    reuse: str = "residual"

    @property
    def ideal_speedup(self) -> float:
        """Speedup if a skipped step cost nothing (the block stack dominates a step)."""
        return self.num_steps / max(1, len(self.computed_steps))

    def schedule_string(self) -> str:
        skipped = set(self.skipped_steps)
        return "".join("." if i in skipped else "C" for i in range(self.num_steps))


RatiosLike = Sequence[float] | Mapping[str, Sequence[float]] | CalibrationResult | MagCacheConfig


def plan(
    mag_ratios: RatiosLike | None,
    config: MagCacheConfig | None,
    num_steps: int,
    branch: str = DEFAULT_BRANCH,
    *,
    position: int = 0,
    timesteps: Sequence[float] | None = None,
    module: str = "transformer",
    first_step: int = 0,
) -> SkipPlan:
    """Which steps of ``branch`` compute and which skip in a ``num_steps`` run.

    ``mag_ratios`` takes every form ``MagCacheConfig.mag_ratios`` takes (``None``: the config's); ``config``
    None means ``MagCacheConfig()``'s defaults, as a run enabled without settings on a curve would use.
    ``timesteps`` are the run's timesteps in the units the calibration recorded (the scheduler's
    when it has a schedule); given, the curve is mapped through them as the runtime would. Left out
    for a calibration that recorded its schedule, the recorded scheduler is rebuilt at ``num_steps``
    (``magsdk.schedules``): the plan of a pipeline that uses that scheduler.
    """
    if isinstance(mag_ratios, MagCacheConfig):
        config, mag_ratios = mag_ratios, None
    if config is None:
        config = MagCacheConfig()
    elif not isinstance(config, MagCacheConfig):
        # a dict failed as an AttributeError on model_fields_set, far from the cause; magsdk.enable says the same
        hint = " (a dict: magsdk.MagCacheConfig(**settings))" if isinstance(config, Mapping) else ""
        raise UsageError(
            f"config must be a magsdk.MagCacheConfig or None (the defaults), got {type(config).__name__} "
            f"{config!r}{hint}"
        )
    constraints = config_constraints(config)  # what the user set, before the config is rebuilt below
    if mag_ratios is not None:
        values = config.model_dump(exclude={"mag_ratios", "timesteps", "schedule", "probes", "calibrate"})
        config = MagCacheConfig(**values, mag_ratios=mag_ratios)
    source = CurveSource.from_config(config)
    if source is None:
        raise UsageError(
            "plan() needs a curve: pass mag_ratios (a list of ratios, a dict branch -> list or a CalibrationResult) "
            "or a MagCacheConfig that has them"
        )
    return plan_source(
        source, config, num_steps, branch, position=position, timesteps=timesteps, module=module, first_step=first_step,
        constraints=constraints,
    )


def plan_source(
    source: CurveSource,
    config: MagCacheConfig,
    num_steps: int,
    branch: str = DEFAULT_BRANCH,
    *,
    position: int = 0,
    timesteps: Sequence[float] | None = None,
    module: str = "transformer",
    first_step: int = 0,
    constraints: Constraints | None = None,
    count_known: bool = True,
) -> SkipPlan:
    """``plan`` for a curve source with several calibrations (a strategy's), exactly as the runtime.

    ``first_step``: the first step this transformer runs (Wan 2.2's second expert joins at its boundary);
    earlier steps are in neither list. ``count_known=False``: a run of ``num_steps`` calls that is not told
    its step count (a bare transformer with neither a scheduler nor ``num_inference_steps``), which follows
    the curve as it is, one ratio per call.
    """
    # an integral numpy number is a count too (plan_budget took np.int64 while plan refused it)
    num_steps = check_count("num_steps", num_steps, what="the run's denoising steps")
    integral = isinstance(first_step, (int, np.integer)) and not isinstance(first_step, bool)
    if not integral or not 0 <= first_step <= num_steps:
        # num_steps itself: a second transformer whose boundary lies past the last step runs none of them
        raise PlanValueError(f"first_step must be 0 .. {num_steps} for a {num_steps}-step run, got {first_step!r}")
    first_step = int(first_step)
    if timesteps is not None:
        timesteps = check_timesteps("timesteps", timesteps)
        if len(timesteps) != num_steps:
            raise PlanValueError(
                f"{len(timesteps)} timesteps given for a {num_steps}-step run; give one per step, or leave them out"
            )
    if timesteps is None and source.uses_schedules():
        # no run to ask: rebuild the recorded scheduler at this step count (what a pipeline with it would set)
        from magsdk.schedules import timesteps_for

        recorded = source.table_for(num_steps).schedule
        timesteps = timesteps_for(recorded, num_steps) if recorded is not None else None
    mapped = source.curve_for(branch, position, RunSchedule.of(num_steps if count_known else None, timesteps), module)
    budget_mode = config.compute_steps is not None or config.speedup is not None
    if mapped.values is None and timesteps is None and not budget_mode:  # a budget's own error is BranchSchedule's
        raise UsageError(
            f"cannot plan {num_steps} steps without the run's timesteps: the curve is mapped call by call from the "
            f"transformer's timestep argument ({mapped.how}). Give the timesteps the loop passes (Python: "
            "magsdk.plan(..., timesteps=...) or handle.plan(..., timesteps=...)), or preview by step index "
            "(resample='index'; CLI: --resample index)"
        )
    if mapped.values is None and timesteps is not None:
        # the calibration has timesteps of the transformer's argument only: simulate the online mapping
        stamps: list[float | None] = [float(t) for t in timesteps]
    else:
        stamps = [None] * num_steps
    schedule = BranchSchedule(mapped, config, start=first_step, constraints=constraints)
    computed: list[int] = []
    skipped: list[int] = []
    has_residual = False
    for step in range(first_step, num_steps):
        skip = schedule.should_skip(step, stamps[step], has_residual)
        (skipped if skip else computed).append(step)
        has_residual = has_residual or not skip
    curve = mapped.values if mapped.values is not None else []
    budget = schedule.budget
    return SkipPlan(
        num_steps=num_steps,
        threshold=config.threshold,
        max_skip_steps=config.max_skip_steps if budget is None else budget.max_skip_steps,
        retention_ratio=config.retention_ratio if budget is None else budget.retention_ratio,
        computed_steps=computed,
        skipped_steps=skipped,
        curve=curve,
        branch=branch,
        mapping=mapped.how,
        out_of_range=list(mapped.out_of_range),
        retained_steps=mapped.retention_steps if budget is None else retention_steps(budget.retention_ratio, num_steps),
        budget=None if budget is None else budget.budget,
        reuse=config.effective_reuse(),
    )


def select_calibration(entries: Sequence[CalibrationEntry], num_steps: int | None) -> CalibrationEntry:
    """The entry calibrated at the run's step count, else the one with the nearest step count."""
    if not entries:
        raise ValueError("no calibration entries to choose from")
    if num_steps is None:
        return entries[0]
    return min(entries, key=lambda e: (abs(e.num_steps - num_steps), e.num_steps))
