"""Which scheduler a handle steps by (docs/design.md, "Step tracking").

The scheduler tells the runtime where a run stands without reading any tensor, and its
``set_timesteps`` marks where a generation starts. diffusers users swap a pipeline's scheduler
whenever they like — ``pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
pipe.scheduler.config, shift=3.0)`` — often after ``magsdk.enable(pipe)``. A handle that kept the
scheduler it saw at ``enable`` would read one the pipeline no longer steps: its ``step_index``
stands still, every call of the next generation lands on one step, and the curve is followed
nowhere near the run. So a handle on a pipeline follows ``pipe.scheduler``: it looks the attribute
up at every transformer call (one attribute read), and a new scheduler starts a generation on it.
A scheduler passed as ``scheduler=`` is the user's own loop's and is kept as given.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from magsdk.patching import DoublePatchError, Patches
from magsdk.runtime.steps import SchedulerProbe, scheduler_probe

logger = logging.getLogger("magsdk")

#: Told that a generation starts: the ``set_timesteps`` keyword arguments it was set up with (``mu``, ``sigmas``;
#: empty when the pipeline's new scheduler was set up before magsdk saw it) and whether the scheduler changed.
GenerationListener = Callable[[dict[str, Any], bool], None]


class SchedulerLink:
    """The scheduler a handle follows, and the probe its step trackers read."""

    def __init__(self, scheduler: Any, pipeline: Any | None, patches: Patches) -> None:
        #: The pipeline whose ``scheduler`` attribute is followed; None for a scheduler given as ``scheduler=``.
        self.pipeline = pipeline
        self.scheduler = scheduler
        self.probe: SchedulerProbe = scheduler_probe(scheduler)
        self._patches = patches
        self._listeners: list[GenerationListener] = []
        self._wrap(scheduler)

    def subscribe(self, listener: GenerationListener) -> None:
        self._listeners.append(listener)

    def release(self) -> None:
        """Stop following (the handle was disabled): a handle kept for its statistics must not keep the
        pipeline, and its weights, alive."""
        self.pipeline = None
        self._listeners.clear()

    def current(self) -> Any:
        """The scheduler runs step by now: for a pipeline, its ``scheduler`` attribute as it is at this moment."""
        pipeline = self.pipeline
        if pipeline is not None:
            scheduler = getattr(pipeline, "scheduler", None)
            if scheduler is not self.scheduler and scheduler is not None:
                self._follow(scheduler)
        return self.scheduler

    def _follow(self, scheduler: Any) -> None:
        logger.info(
            "magsdk: the pipeline's scheduler was replaced (%s -> %s); following the new one from this generation",
            type(self.scheduler).__name__, type(scheduler).__name__,
        )
        self._patches.restore_one(self.scheduler, "set_timesteps")
        self.scheduler = scheduler
        self.probe = scheduler_probe(scheduler)
        # its set_timesteps ran before magsdk saw it: the generation starts here, set up in a way nobody recorded
        self._tell({}, True)
        self._wrap(scheduler)

    def _wrap(self, scheduler: Any) -> None:
        set_timesteps = getattr(scheduler, "set_timesteps", None)
        if set_timesteps is None:
            return

        @functools.wraps(set_timesteps)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._tell({k: v for k, v in kwargs.items() if k in ("mu", "sigmas")}, False)
            return set_timesteps(*args, **kwargs)

        try:
            self._patches.patch(scheduler, "set_timesteps", wrapper)
        except DoublePatchError:
            # another handle's pipeline shares this scheduler and wrapped it: its generations still start where
            # its step index goes back to 0, so it is followed without a wrapper of our own
            logger.info("magsdk: the new scheduler is already followed by another handle; generations are told "
                        "apart by its step index")

    def _tell(self, passed: dict[str, Any], swapped: bool) -> None:
        for listener in self._listeners:
            listener(passed, swapped)
