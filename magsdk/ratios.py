"""Curve maths: resampling a ratio curve to a run's step count, and the skip decision.

The skip decision reads only the precomputed curve, so the whole schedule is a pure function
of (curve, settings, step count): ``plan``. The runtime calls the very same ``decide`` step by
step, so a plan printed before a run is exactly what the run does.

Arithmetic is done in float32 on purpose: diffusers 0.42.1 keeps its curve in a float32 tensor
and accumulates in float32, and parity means the same decision at every threshold boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from magsdk.config import DEFAULT_BRANCH, CalibrationEntry, MagCacheConfig

_F32 = np.float32


def resample_nearest(curve: Sequence[float], num_steps: int) -> list[float]:
    """Nearest-index resampling, ``idx = round(arange(n) * (L-1)/(n-1))`` (the original's and diffusers')."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    length = len(curve)
    if length == num_steps:
        return [float(v) for v in curve]
    if num_steps == 1:
        return [float(curve[-1])]
    scale = (length - 1) / (num_steps - 1)
    grid = np.arange(num_steps, dtype=np.float32) * np.float32(scale)
    indices = np.round(grid).astype(np.int64)
    return [float(curve[i]) for i in indices]


def resample_by_timesteps(
    curve: Sequence[float], timesteps: Sequence[float], new_timesteps: Sequence[float]
) -> list[float]:
    """Map a curve onto another schedule through its recorded timesteps.

    The product of ratios between two steps is the growth of ‖r‖ between their timesteps, so the
    cumulative log-ratio is interpolated as a function of the timestep and differenced between
    consecutive timesteps of the new schedule. The first value stays 1.0.
    """
    if len(curve) != len(timesteps):
        raise ValueError(f"curve has {len(curve)} values but {len(timesteps)} timesteps")
    src_t = np.asarray(timesteps, dtype=np.float64)
    cum = np.cumsum(np.log(np.asarray(curve, dtype=np.float64)))
    order = np.argsort(src_t)
    new_t = np.asarray(new_timesteps, dtype=np.float64)
    new_cum = np.interp(new_t, src_t[order], cum[order])
    out = np.exp(np.diff(new_cum))
    return [1.0, *(float(v) for v in out)]


def retention_steps(retention_ratio: float, num_steps: int) -> int:
    """Steps at the start that are always computed (diffusers rounds half up)."""
    return int(retention_ratio * num_steps + 0.5)


@dataclass(frozen=True)
class Accumulator:
    """MagCache's running error since the last computed step (float32, as diffusers)."""

    ratio: float = 1.0
    steps: int = 0
    err: float = 0.0


FRESH = Accumulator()


def decide(
    acc: Accumulator,
    step: int,
    curve: Sequence[float],
    config: MagCacheConfig,
    num_steps: int,
    has_residual: bool,
) -> tuple[bool, Accumulator]:
    """Return ``(skip, next_accumulator)`` for one call of one branch at ``step``."""
    if config.calibrate or step < retention_steps(config.retention_ratio, num_steps):
        return False, acc
    scale = _F32(curve[step]) if step < len(curve) else _F32(1.0)
    ratio = _F32(acc.ratio) * scale
    steps = acc.steps + 1
    err = _F32(acc.err) + abs(_F32(1.0) - ratio)
    if has_residual and err <= config.threshold and steps <= config.max_skip_steps:
        return True, Accumulator(float(ratio), steps, float(err))
    return False, FRESH


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

    @property
    def ideal_speedup(self) -> float:
        """Speedup if a skipped step cost nothing (the block stack dominates a step)."""
        return self.num_steps / max(1, len(self.computed_steps))

    def schedule_string(self) -> str:
        skipped = set(self.skipped_steps)
        return "".join("." if i in skipped else "C" for i in range(self.num_steps))


def plan(
    mag_ratios: Sequence[float] | MagCacheConfig | Mapping[str, Sequence[float]] | None,
    config: MagCacheConfig,
    num_steps: int,
    branch: str = DEFAULT_BRANCH,
) -> SkipPlan:
    """Which steps compute and which skip, for a curve resampled to ``num_steps``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if mag_ratios is None:
        mag_ratios = config.mag_ratios
    if isinstance(mag_ratios, MagCacheConfig):
        mag_ratios = mag_ratios.mag_ratios
    if mag_ratios is None:
        raise ValueError("plan() needs a curve: pass mag_ratios or a config that has them")
    raw = select_branch_curve(mag_ratios, branch) if isinstance(mag_ratios, Mapping) else mag_ratios
    curve = resample_nearest(raw, num_steps)
    acc, has_residual = FRESH, False
    computed: list[int] = []
    skipped: list[int] = []
    for step in range(num_steps):
        skip, acc = decide(acc, step, curve, config, num_steps, has_residual)
        (skipped if skip else computed).append(step)
        has_residual = has_residual or not skip
    return SkipPlan(
        num_steps=num_steps,
        threshold=config.threshold,
        max_skip_steps=config.max_skip_steps,
        retention_ratio=config.retention_ratio,
        computed_steps=computed,
        skipped_steps=skipped,
        curve=curve,
    )


def select_branch_curve(
    curves: Mapping[str, Sequence[float]], branch: str, position: int | None = None
) -> list[float]:
    """Pick a branch's curve: exact name, then ``default``, then the curve at the same position."""
    if branch in curves:
        return list(curves[branch])
    if DEFAULT_BRANCH in curves:
        return list(curves[DEFAULT_BRANCH])
    names = list(curves)
    if position is not None and position < len(names):
        return list(curves[names[position]])
    return list(curves[names[0]])


def select_calibration(entries: Sequence[CalibrationEntry], num_steps: int | None) -> CalibrationEntry:
    """The entry calibrated at the run's step count, else the one with the nearest step count."""
    if not entries:
        raise ValueError("no calibration entries to choose from")
    if num_steps is None:
        return entries[0]
    return min(entries, key=lambda e: (abs(e.num_steps - num_steps), e.num_steps))
