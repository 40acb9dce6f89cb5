"""The curve each branch follows in a run: chosen, averaged and mapped onto the run's schedule.

A calibration measures ``γ_i = ‖r_i‖ / ‖r_{i-1}‖`` on one schedule. A run may use another step
count, shift or resolution. The product of the ratios between two steps is the growth of ‖r‖
between their noise levels, so a curve is mapped through its recorded timesteps: the cumulative
log-ratio is interpolated as a function of the timestep and differenced between the run's
consecutive timesteps (docs/design.md, section 6, "Schedules"). Curves without timesteps fall back
to nearest-index resampling — the original's and diffusers' rule, kept as ``resample="index"``
for parity.

Everything that needs "the curve of branch b in this run" — the runtime, ``magsdk.plan``, the CLI,
the exporters — goes through ``CurveSource.curve_for``: preview and run cannot disagree. Pure
functions on floats; no torch.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from magsdk.config import DEFAULT_BRANCH, CalibrationEntry, MagCacheConfig, ResampleMode, ScheduleInfo
from magsdk.errors import UsageError
from magsdk.planner import PlanValueError, check_count

logger = logging.getLogger("magsdk")


def check_ratios(name: str, curve: Sequence[float], least: int = 1) -> list[float]:
    """``curve`` as floats, refused unless it has ``least`` values, all finite and > 0.

    Ratios are ‖r_t‖/‖r_t-1‖: the mapping takes their logarithm and the cache multiplies them into an
    accumulated error, so a 0, a negative or a NaN gave NaNs downstream (with numpy warnings) instead of an
    error, and an empty curve an IndexError. ``MagCacheConfig`` checks its curves the same way.
    """
    try:
        values = [float(v) for v in curve]
    except (TypeError, ValueError) as exc:
        raise PlanValueError(f"{name} must be a sequence of numbers (magnitude ratios), got {curve!r}") from exc
    if len(values) < least:
        raise PlanValueError(
            f"{name} has {len(values)} value(s) but needs at least {least} (one magnitude ratio per step of the "
            "calibrated run); pass a whole curve, e.g. one branch of a calibration's cal.result.curves()"
        )
    for index, value in enumerate(values):
        if not math.isfinite(value) or value <= 0:
            raise PlanValueError(
                f"{name}[{index}] = {value!r} is not a finite positive number; magnitude ratios are "
                "‖r_t‖/‖r_t-1‖ and must be > 0. Re-run calibration or fix the value"
            )
    return values


def check_timesteps(name: str, timesteps: Sequence[float], least: int = 1) -> list[float]:
    """``timesteps`` as floats, refused unless there are ``least`` and all are finite (a NaN made every mapped
    ratio NaN)."""
    try:
        values = [float(t) for t in timesteps]
    except (TypeError, ValueError) as exc:
        raise PlanValueError(
            f"{name} must be a sequence of numbers (one timestep per step), got {timesteps!r}"
        ) from exc
    if len(values) < least:
        raise PlanValueError(f"{name} has {len(values)} value(s); give one timestep per step, at least {least}")
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise PlanValueError(f"{name}[{index}] = {value!r} is not a finite number; give one timestep per step")
    return values


def resample_nearest(curve: Sequence[float], num_steps: int) -> list[float]:
    """Nearest-index resampling, ``idx = round(arange(n) * (L-1)/(n-1))`` (the original's and diffusers')."""
    num_steps = check_count("num_steps", num_steps, what="the steps of the run to resample onto")
    curve = check_ratios("curve", curve)
    length = len(curve)
    if length == num_steps:
        return [float(v) for v in curve]
    if num_steps == 1:
        return [float(curve[-1])]
    scale = (length - 1) / (num_steps - 1)
    grid = np.arange(num_steps, dtype=np.float32) * np.float32(scale)
    indices = np.round(grid).astype(np.int64)
    return [float(curve[i]) for i in indices]


class TimestepMap:
    """A curve as a function of the timestep: ``ratio(t_prev, t)`` is the growth of ‖r‖ from t_prev to t.

    Between two timesteps of the calibration that are consecutive, the calibrated ratio itself is
    returned (no log/exp round trip), so a run on the calibration's own schedule follows the curve
    bit for bit and threshold decisions cannot drift.
    """

    def __init__(
        self, curve: Sequence[float], timesteps: Sequence[float], probes: Sequence[float] | None = None
    ) -> None:
        self.curve = check_ratios("curve", curve, least=2)
        self.timesteps = check_timesteps("timesteps", timesteps, least=2)
        if len(self.curve) != len(self.timesteps):
            raise PlanValueError(
                f"curve has {len(self.curve)} values but {len(self.timesteps)} timesteps; give the timesteps the "
                "curve was calibrated on, one per value"
            )
        # Stored calibrations keep 5 decimals: a run's own timestep matches its stored value within this.
        self.tolerance = max(1e-5, 1e-8 * (max(self.timesteps) - min(self.timesteps)))
        logs = np.log(np.asarray(self.curve[1:], dtype=np.float64))
        cumulative = np.concatenate([[0.0], np.cumsum(logs)])
        #: The first ratio's start-up jump: a step effect (‖r_1‖/‖r_0‖ jumps at the first step whatever its
        #: noise-level gap), kept whole at a run's first step instead of spread over the steps a finer schedule
        #: puts in the calibration's first interval. The growth along the noise level over that first interval
        #: is the next interval's rate, extrapolated (docs/design.md, section 6, "Schedules").
        self.startup = 0.0
        if len(self.curve) >= 3 and self.timesteps[2] != self.timesteps[1]:
            rate = (cumulative[2] - cumulative[1]) / (self.timesteps[2] - self.timesteps[1])
            cumulative[0] = cumulative[1] - rate * (self.timesteps[1] - self.timesteps[0])
            self.startup = float(cumulative[0])
        xs, ys = np.asarray(self.timesteps, dtype=np.float64), cumulative
        if probes:
            xs, ys = self._probed(cumulative, probes)
        order = np.argsort(xs, kind="stable")
        self._xs = xs[order]
        self._ys = ys[order]
        #: +1 when the calibration's timesteps rise from step to step, -1 when they fall (the usual case).
        self.direction = 1.0 if self.timesteps[-1] > self.timesteps[0] else -1.0
        self.low, self.high = float(self._xs[0]), float(self._xs[-1])

    def _probed(self, cumulative: np.ndarray, probes: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """The cumulative log-ratio between the calibrated steps too, shaped by the between-step probes.

        Inside step i's interval the probes give the growth along the noise level at step i's latent; the
        latent's own change over the interval is spread linearly on top, so that the growth over the whole
        interval stays the calibrated ratio (the curve's own schedule maps to itself, and the probes only
        place the growth inside each interval). The first interval is the probes' alone: its ratio's rest is
        the start-up jump, kept whole at a run's first step as without probes (docs/design.md, "Probes").
        """
        intervals = len(self.curve) - 1
        per = len(probes) // intervals
        shape = np.asarray(probes, dtype=np.float64).reshape(intervals, per)
        cumulative = cumulative.copy()
        cumulative[0] = cumulative[1] - shape[0, -1]
        self.startup = float(cumulative[0])
        ts = np.asarray(self.timesteps, dtype=np.float64)
        fractions = np.arange(1, per + 1, dtype=np.float64) / per
        xs, ys = [ts[:1]], [cumulative[:1]]
        for i in range(intervals):
            start, growth = cumulative[i], cumulative[i + 1] - cumulative[i]
            inside = start + shape[i] + fractions * (growth - shape[i, -1])
            inside[-1] = cumulative[i + 1]  # the calibrated point itself, exactly
            xs.append(ts[i] + fractions * (ts[i + 1] - ts[i]))
            ys.append(inside)
        return np.concatenate(xs), np.concatenate(ys)

    def _index(self, timestep: float) -> int | None:
        position = int(np.argmin(np.abs(np.asarray(self.timesteps) - timestep)))
        return position if abs(self.timesteps[position] - timestep) <= self.tolerance else None

    def same_schedule(self, timesteps: Sequence[float]) -> bool:
        return len(timesteps) == len(self.timesteps) and all(
            abs(a - b) <= self.tolerance for a, b in zip(timesteps, self.timesteps, strict=True)
        )

    def ratio(self, previous: float, current: float, first: bool = False) -> float:
        """The growth from ``previous`` to ``current``; ``first``: the run's first step (it carries the start-up
        jump)."""
        i, j = self._index(previous), self._index(current)
        if i is not None and j is not None and j == i + 1 and first == (i == 0):
            return self.curve[j]
        grown = np.interp(current, self._xs, self._ys) - np.interp(previous, self._xs, self._ys)
        return float(math.exp(grown + (self.startup if first else 0.0)))

    def map(self, timesteps: Sequence[float]) -> list[float]:
        """The curve on another schedule; its first value is the calibration's first (step 0 has no past)."""
        values = check_timesteps("new_timesteps", timesteps)
        if self.same_schedule(values):
            return list(self.curve)
        pairs = itertools.pairwise(values)
        return [self.curve[0], *(self.ratio(a, b, first=k == 0) for k, (a, b) in enumerate(pairs))]

    def outside(self, timesteps: Sequence[float], tolerance: float = 1e-3) -> list[float]:
        """Timesteps beyond the calibrated range (the map holds the curve flat there: ratio 1).

        A run's first timestep a little noisier than the calibration's first (less than the calibration's first
        interval: diffusers' FlowMatch Wan runs start at 1000, the Wan repos' at 999) is not counted: step 0 is
        always computed and the first ratio is the start-up jump, kept whole, so nothing is extrapolated there.
        """
        span = max(self.high - self.low, 1e-12)
        found = [t for t in timesteps if t < self.low - tolerance * span or t > self.high + tolerance * span]
        if found and timesteps and found[0] == timesteps[0]:
            beyond = (timesteps[0] - self.timesteps[0]) * -self.direction  # > 0: noisier than the first
            if 0 < beyond < abs(self.timesteps[1] - self.timesteps[0]):
                found = found[1:]
        return found

    def retained(self, timestep: float, retention_index: int) -> bool:
        """Whether a step at ``timestep`` lies before the calibration's retention step (always computed)."""
        if retention_index <= 0:
            return False
        if retention_index >= len(self.timesteps):
            return True
        edge = self.timesteps[retention_index]
        return (timestep - edge) * self.direction < -self.tolerance


@dataclass(frozen=True)
class RunSchedule:
    """What is known of a run before its calls: the step count and, if a scheduler set it, its timesteps."""

    num_steps: int | None = None
    #: The scheduler's timesteps of this run (same units as ``ScheduleInfo.timesteps``).
    timesteps: tuple[float, ...] | None = None

    @classmethod
    def of(cls, num_steps: int | None, timesteps: Sequence[float] | None = None) -> RunSchedule:
        return cls(num_steps, tuple(float(t) for t in timesteps) if timesteps is not None else None)


@dataclass(frozen=True)
class MappedCurve:
    """The curve one branch follows in one run, and how it was obtained.

    ``values`` is set when the run's step count is known (one ratio per step). ``online`` is set
    when it is not: each call's ratio then comes from its own and the previous call's timestep.
    """

    values: list[float] | None
    how: str
    retention_steps: int | None = None
    online: TimestepMap | None = None
    retention_index: int = 0
    out_of_range: tuple[float, ...] = ()
    #: True when the curve was mapped through timesteps (online, retention then follows the noise level too).
    by_timesteps: bool = False
    #: The calibrated timesteps' range (lowest, highest) where the curve was mapped through them.
    calibrated_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class CurveTable:
    """One calibration: curves per branch, measured over ``num_steps`` steps of one schedule."""

    num_steps: int
    branches: dict[str, list[float]]
    #: The transformer's timestep argument at each step, when recorded.
    timesteps: list[float] | None = None
    schedule: ScheduleInfo | None = None
    label: str = ""
    #: Between-step probes per branch (``magsdk.calibrate(..., probes=P)``), when the calibration made them.
    probes: dict[str, list[float]] | None = None

    @classmethod
    def from_entry(cls, entry: CalibrationEntry) -> CurveTable:
        recorded = entry.timesteps
        stamps = [float(t) for t in recorded if t is not None] if recorded and None not in recorded else None
        return cls(entry.num_steps, dict(entry.branches), stamps, entry.schedule, entry.source, entry.probes or None)


def probes_fit_schedule(schedule: Sequence[float], arguments: Sequence[float] | None) -> bool:
    """Whether probes (spaced evenly in the timestep argument) sit evenly in the scheduler's timesteps too.

    True where the argument is an affine function of the scheduler's timestep (diffusers' flow-matching
    pipelines pass t/1000 or 1 − t/1000), or where only one of them was recorded. Checked at the recorded
    steps: relative deviation from the best straight line at most 1e-3 of the argument's range.
    """
    if arguments is None or len(arguments) != len(schedule) or len(schedule) < 3:
        return True
    xs, ys = np.asarray(schedule, dtype=np.float64), np.asarray(arguments, dtype=np.float64)
    span = float(ys.max() - ys.min())
    if span <= 0 or float(xs.max() - xs.min()) <= 0:
        return True
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(np.abs(slope * xs + intercept - ys).max()) <= 1e-3 * span


def retention_steps(retention_ratio: float, num_steps: int) -> int:
    """Steps at the start that are always computed (diffusers rounds half up)."""
    return int(retention_ratio * num_steps + 0.5)


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Element-wise mean of branch curves (resampled by index to the longest when lengths differ)."""
    if len(curves) == 1:
        return [float(v) for v in curves[0]]
    length = max(len(c) for c in curves)
    resampled = [resample_nearest(c, length) for c in curves]
    return [sum(values) / len(values) for values in zip(*resampled, strict=True)]


def select_branch_curve(
    curves: Mapping[str, Sequence[float]], branch: str, position: int | None = None
) -> list[float]:
    """Pick a branch's curve: exact name, then ``default``, then the curve at the same position."""
    return list(curves[branch_curve_name(curves, branch, position)])


def branch_curve_name(curves: Mapping[str, Sequence[float]], branch: str, position: int | None = None) -> str:
    """The name of the curve ``select_branch_curve`` picks (a calibration's ``pass0`` serves a pipeline's
    ``cond`` by position), so that where it is not the branch's own name the run can say so."""
    if branch in curves:
        return branch
    if DEFAULT_BRANCH in curves:
        return DEFAULT_BRANCH
    names = list(curves)
    if position is not None and position < len(names):
        return names[position]
    return names[0]


def module_curves(curves: Mapping[str, list[float]], module: str) -> dict[str, list[float]]:
    """The curves of one transformer of a pipeline: ``transformer_2:cond`` belongs to ``transformer_2``.

    Unprefixed names belong to the first transformer (and to any transformer without curves of its own).
    """
    prefix = f"{module}:"
    own = {name[len(prefix):]: c for name, c in curves.items() if name.startswith(prefix)}
    if own:
        return own
    plain = {name: c for name, c in curves.items() if ":" not in name}
    return plain or dict(curves)


@dataclass
class CurveSource:
    """Every calibration a config or strategy holds, and the rule for turning them into a run's curve."""

    tables: list[CurveTable]
    per_branch: bool = False
    resample: ResampleMode = "auto"
    retention_ratio: float = 0.2
    #: Budget mode (``compute_steps`` / ``speedup``): the run's schedule is planned before its first call, so a
    #: curve is always given one ratio per step where the run's step count is known (never mapped call by call).
    budget: bool = False
    _warned: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.tables:
            raise ValueError("a curve source needs at least one calibration")

    @classmethod
    def from_config(cls, config: MagCacheConfig) -> CurveSource | None:
        if config.mag_ratios is None:
            return None
        steps = max(len(c) for c in config.mag_ratios.values())
        table = CurveTable(steps, dict(config.mag_ratios), config.timesteps, config.schedule, "config", config.probes)
        return cls([table], config.per_branch_curves, config.resample, config.retention_ratio, _budget(config))

    @classmethod
    def from_entries(cls, entries: Sequence[CalibrationEntry], config: MagCacheConfig) -> CurveSource:
        tables = [CurveTable.from_entry(e) for e in entries]
        return cls(tables, config.per_branch_curves, config.resample, config.retention_ratio, _budget(config))

    def uses_schedules(self) -> bool:
        """Whether a run's scheduler timesteps can change the curve (worth one read per generation)."""
        return self.resample != "index" and any(t.schedule is not None for t in self.tables)

    # -- choosing --------------------------------------------------------------------------------
    def table_for(self, num_steps: int | None) -> CurveTable:
        """The calibration at the run's step count, else the nearest one (ties: the shorter)."""
        if num_steps is None:
            return self.tables[0]
        return min(self.tables, key=lambda t: (abs(t.num_steps - num_steps), t.num_steps))

    def raw_curve(self, table: CurveTable, branch: str, position: int, module: str = "transformer") -> list[float]:
        curves = module_curves(table.branches, module)
        if not self.per_branch:
            return mean_curve(list(curves.values()))
        return select_branch_curve(curves, branch, position)

    def raw_probes(self, table: CurveTable, branch: str, position: int, module: str = "transformer"
                   ) -> list[float] | None:
        """The probes that go with ``raw_curve`` (their mean where the curves' mean is followed), if any."""
        if not table.probes:
            return None
        probes = module_curves(table.probes, module)
        if not self.per_branch:
            lengths = {len(p) for p in probes.values()}
            if len(lengths) != 1:
                return None
            return [sum(values) / len(values) for values in zip(*probes.values(), strict=True)]
        name = branch_curve_name(module_curves(table.branches, module), branch, position)
        return list(probes[name]) if name in probes else None

    # -- mapping ---------------------------------------------------------------------------------
    def curve_for(
        self, branch: str, position: int, run: RunSchedule, module: str = "transformer"
    ) -> MappedCurve:
        """The curve ``branch`` follows in ``run``: the one function behind the runtime and ``plan``."""
        table = self.table_for(run.num_steps)
        raw = self.raw_curve(table, branch, position, module)
        retention_index = retention_steps(self.retention_ratio, len(raw))
        source = f"{len(raw)}-step curve" + (f" ({table.label})" if table.label else "")
        if self.per_branch:
            chosen = branch_curve_name(module_curves(table.branches, module), branch, position)
            if chosen not in (branch, DEFAULT_BRANCH):
                source += f" of branch {chosen!r} (the curves have no {branch!r}; taken by call position)"
        if self.resample != "index":
            probes = self.raw_probes(table, branch, position, module)
            shaped = f", shaped by {len(probes) // (len(raw) - 1)} probes per step," if probes else ""
            if run.timesteps is not None and table.schedule is not None and len(table.schedule.timesteps) == len(raw):
                if probes and not probes_fit_schedule(table.schedule.timesteps, table.timesteps):
                    probes, shaped = None, ""  # spaced evenly in an argument that is not linear in these timesteps
                tmap = TimestepMap(raw, table.schedule.timesteps, probes)
                values = tmap.map(run.timesteps)
                same = tmap.same_schedule(run.timesteps)
                how = (
                    f"{source} as calibrated (same schedule)"
                    if same
                    else f"{source}{shaped} mapped through scheduler timesteps onto {len(values)} steps"
                    f" ({_describe_schedule(table.schedule)} → this run's)"
                )
                # the first retention_ratio of the run's own steps are kept, as a native calibration's run
                # keeps them: a noise-level window (the calibration's first steps' timesteps) kept 3-5 more
                # steps per branch on a shift-3 schedule than a native calibration and broke the ±1 step goal
                retained = retention_steps(self.retention_ratio, len(run.timesteps))
                return MappedCurve(
                    values, how, retained, None, retention_index, tuple(tmap.outside(run.timesteps)), True,
                    (tmap.low, tmap.high),
                )
            if table.timesteps is not None and len(table.timesteps) == len(raw):
                tmap = TimestepMap(raw, table.timesteps, probes)
                if self.budget and run.num_steps is not None:
                    return self._planned_by_argument(tmap, raw, source, run, retention_index, shaped)
                how = f"{source}{shaped} mapped online through the transformer's timestep argument, call by call"
                return MappedCurve(None, how, None, tmap, retention_index, (), True, (tmap.low, tmap.high))
            if self.resample == "timesteps":
                raise UsageError(
                    f"resample='timesteps' but the {source} has no recorded timesteps"
                    + (" matching this run (the run has no scheduler timesteps)" if table.timesteps is None else "")
                    + "; recalibrate with magsdk.calibrate (it records them) or use resample='auto' / 'index'"
                )
            self._note_index_fallback(source)
        if run.num_steps is None:
            return MappedCurve(list(raw), f"{source} as is (the run's step count is unknown)", retention_index)
        values = resample_nearest(raw, run.num_steps)
        how = (
            f"{source} as calibrated"
            if len(raw) == run.num_steps
            else f"{source} resampled by nearest index to {run.num_steps} steps"
        )
        return MappedCurve(values, how, retention_steps(self.retention_ratio, run.num_steps))

    def _planned_by_argument(
        self, tmap: TimestepMap, raw: list[float], source: str, run: RunSchedule, retention_index: int,
        shaped: str = "",
    ) -> MappedCurve:
        """A budget run's curve, one ratio per step, from a curve that recorded only the transformer's timestep
        argument (a calibration of a bare transformer: no scheduler schedule).

        Threshold mode maps such a curve call by call, from each call's argument; a budget is planned before
        the first call, when the run's arguments are not known. It used to be refused even where the run's
        step count was known (a pipeline, ``scheduler=``, ``num_inference_steps``). Now: through the run's
        timesteps when they are in the argument's units (``magsdk.plan(..., timesteps=)`` on such a curve: the
        source has no scheduler schedule, so the given timesteps are the loop's arguments); else the curve as
        calibrated at its own step count; else nearest-index resampling, the rule for curves without timesteps.
        """
        assert run.num_steps is not None
        n = run.num_steps
        retained = retention_steps(self.retention_ratio, n)
        if run.timesteps is not None and len(run.timesteps) == n and not self.uses_schedules():
            values = tmap.map(run.timesteps)
            how = (
                f"{source} as calibrated (same timestep arguments)"
                if tmap.same_schedule(run.timesteps)
                else f"{source}{shaped} mapped through the given timestep arguments onto {n} steps"
            )
            return MappedCurve(values, how, retained, None, retention_index, tuple(tmap.outside(run.timesteps)),
                               True, (tmap.low, tmap.high))
        later = "planned before the run, whose timestep arguments come with its calls"
        if self.resample == "timesteps":
            raise UsageError(
                f"resample='timesteps' maps the {source} through timesteps, but a budget (compute_steps / speedup) "
                f"is {later}, and this curve recorded the transformer's timestep argument only (no scheduler "
                "schedule). Give the run's arguments (magsdk.plan(..., timesteps=...)), or recalibrate through the "
                "pipeline (magsdk.calibrate(pipe) records its schedule), or use resample='auto' / 'index'"
            )
        if len(raw) == n:
            return MappedCurve(list(raw), f"{source} as calibrated (a budget is {later})", retained)
        values = resample_nearest(raw, n)
        return MappedCurve(values, f"{source} resampled by nearest index to {n} steps (a budget is {later})", retained)

    def _note_index_fallback(self, source: str) -> None:
        if source not in self._warned:
            self._warned.add(source)
            logger.info("magsdk: the %s has no recorded timesteps; it is followed by step index", source)


def _budget(config: MagCacheConfig) -> bool:
    return config.compute_steps is not None or config.speedup is not None


def _describe_schedule(schedule: ScheduleInfo) -> str:
    parts = [f"{schedule.num_steps} steps"]
    if schedule.scheduler:
        parts.append(schedule.scheduler)
    shift = schedule.config.get("shift")
    if shift not in (None, 1.0):
        parts.append(f"shift {shift}")
    if schedule.set_timesteps.get("mu") is not None:
        parts.append(f"mu {float(schedule.set_timesteps['mu']):.3f}")
    if schedule.resolution:
        parts.append(schedule.resolution)
    return ", ".join(parts)
