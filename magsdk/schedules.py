"""Rebuild a recorded schedule at another step count, for previews made before any pipeline runs.

At run time the pipeline's scheduler says what the timesteps are. ``magsdk plan``, the exporters
and the strategy table have no pipeline: they rebuild the scheduler a calibration recorded (its
class and the config values that shape the timesteps) and ask it for ``num_steps`` steps, passing
what the pipeline passed (``mu`` for resolution-dependent shifting; FLUX-style pipelines pass
``sigmas = linspace(1, 1/N, N)``). A rebuild is trusted only if, at the calibration's own step
count, it reproduces the recorded timesteps; otherwise ``None`` (callers then say so and fall back).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from magsdk.config import ScheduleInfo

logger = logging.getLogger("magsdk")


def _flux_sigmas(num_steps: int) -> list[float]:
    return [float(v) for v in np.linspace(1.0, 1.0 / num_steps, num_steps)]


def flow_unipc_schedule(
    num_steps: int, shift: float, num_train_timesteps: int = 1000
) -> tuple[list[float], list[float]]:
    """Timesteps and sigmas of the Wan repositories' own ``FlowUniPCMultistepScheduler`` (not a diffusers class).

    Wan2.1 / Wan2.2 build it with ``shift=1`` and call ``set_timesteps(N, shift=s)``: N sigmas evenly spaced
    from ``1 - 1/T`` down to 0 (N + 1 points, the last dropped), shifted by ``s·σ / (1 + (s - 1)·σ)``;
    the timesteps are ``σ·T`` truncated to integers. diffusers' ``UniPCMultistepScheduler`` with
    ``use_flow_sigmas`` starts at 1 instead and keeps fractional timesteps, so it is a few timesteps off
    (up to 8 at shift 12): the curves measured by the Wan scripts are described by this formula.
    """
    top = float(np.float32(1.0 - 1.0 / num_train_timesteps))  # its sigma_max: the training sigmas are float32
    sigmas = np.linspace(top, 0.0, num_steps + 1)[:-1]
    sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    timesteps = np.trunc(sigmas * num_train_timesteps)
    return [float(t) for t in timesteps], [float(v) for v in sigmas]


#: Samplers outside diffusers whose schedule magsdk computes itself, from the config values recorded with a curve.
FORMULA_SCHEDULERS = {
    "FlowUniPCMultistepScheduler": lambda config, n: flow_unipc_schedule(
        n, float(config.get("shift", 1.0)), int(config.get("num_train_timesteps", 1000))
    )[0],
}


def _rebuild(schedule: ScheduleInfo, num_steps: int) -> list[float] | None:
    if not schedule.scheduler:
        return None
    formula = FORMULA_SCHEDULERS.get(schedule.scheduler)
    if formula is not None:
        return formula(schedule.config, num_steps)
    try:
        import diffusers
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    cls = getattr(diffusers, schedule.scheduler, None)
    if cls is None or not hasattr(cls, "from_config"):
        return None
    kwargs: dict[str, Any] = {}
    if schedule.input_sigmas is not None:
        passed = schedule.input_sigmas
        if not np.allclose(passed, _flux_sigmas(len(passed)), atol=1e-5):
            return None  # the pipeline passed sigmas by a rule magsdk does not know
        kwargs["sigmas"] = _flux_sigmas(num_steps)
    if schedule.set_timesteps.get("mu") is not None:
        kwargs["mu"] = float(schedule.set_timesteps["mu"])
    try:
        scheduler = cls.from_config(dict(schedule.config))
        scheduler.set_timesteps(num_inference_steps=num_steps, **kwargs)
    except Exception as exc:  # a scheduler that wants what was not recorded
        logger.debug("cannot rebuild %s for %d steps: %s", schedule.scheduler, num_steps, exc)
        return None
    return [float(t) for t in scheduler.timesteps.tolist()]


def timesteps_for(schedule: ScheduleInfo, num_steps: int) -> list[float] | None:
    """The scheduler timesteps a ``num_steps`` run on the recorded schedule would have, or None."""
    check = _rebuild(schedule, schedule.num_steps)
    if check is None or len(check) != schedule.num_steps:
        return None
    if not np.allclose(check, schedule.timesteps, atol=1e-3, rtol=1e-5):
        return None
    if num_steps == schedule.num_steps:
        return list(schedule.timesteps)
    return _rebuild(schedule, num_steps)


def recorded_set_timesteps(schedule: ScheduleInfo | None) -> dict[str, Any]:
    """What the calibrating pipeline passed to ``set_timesteps`` (``sigmas``, ``mu``), as ``passed`` below takes it."""
    if schedule is None:
        return {}
    passed: dict[str, Any] = {}
    if schedule.input_sigmas is not None:
        passed["sigmas"] = list(schedule.input_sigmas)
    if schedule.set_timesteps.get("mu") is not None:
        passed["mu"] = schedule.set_timesteps["mu"]
    return passed


def timesteps_from_scheduler(scheduler: Any, num_steps: int, passed: dict[str, Any]) -> list[float] | None:
    """The timesteps a live pipeline's scheduler would give a ``num_steps`` run, without touching it.

    ``passed`` holds what the pipeline passed to ``set_timesteps`` last time (``mu``, ``sigmas``); a
    copy of the scheduler is set up the same way for ``num_steps``. None when that cannot be done.
    """
    kwargs: dict[str, Any] = {}
    sigmas = passed.get("sigmas")
    if sigmas is not None:
        values = [float(v) for v in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
        if not np.allclose(values, _flux_sigmas(len(values)), atol=1e-5):
            return None
        kwargs["sigmas"] = _flux_sigmas(num_steps)
    if passed.get("mu") is not None:
        kwargs["mu"] = float(passed["mu"])
    try:
        # a fresh scheduler from the live one's config: a copy would carry magsdk's own set_timesteps
        # patch, still bound to the live scheduler (the copy would stay unset and the live one change)
        twin = type(scheduler).from_config(scheduler.config)
        twin.set_timesteps(num_inference_steps=num_steps, **kwargs)
        values = twin.timesteps.tolist()
    except Exception as exc:
        logger.debug("cannot set %s up for %d steps: %s", type(scheduler).__name__, num_steps, exc)
        return None
    begin = int(getattr(twin, "begin_index", None) or 0)
    return [float(t) for t in values[begin:]]
