"""Where a transformer call sits in a run: generation, step, branch (docs/design.md, "Step tracking").

Counting transformer calls gets CFG wrong (two calls per step) and breaks when two transformers
share one schedule. Two sources of truth are used instead, the cheaper first:

- **the scheduler** of the pipeline, when magsdk knows it: its ``step_index`` is a Python int that
  the pipeline advances once per step, so the step is known without looking at any tensor — no
  device→host synchronisation per call. A call at the same index as the previous one is another
  branch (CFG pass) of the same step; ``set_timesteps`` (wrapped by ``enable``) starts a generation.
- **the timestep value** of each call otherwise (a bare transformer in a hand-written loop): the same
  timestep again is another branch of the same step, a new one is the next step, and one that goes
  back against the schedule's direction starts a new generation. Reading a timestep that lives on
  the GPU costs one synchronisation per call; that is the price of knowing nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

logger = logging.getLogger("magsdk")

DEFAULT_BRANCH_PREFIX = "pass"
#: Calls at one scheduler step beyond which the scheduler is taken not to be advancing (pipelines run at most
#: three or four branches per step; a false alarm only costs a host read per call, a late one a whole generation).
MAX_BRANCHES_PER_STEP = 8


class CallPosition(NamedTuple):
    """Where one transformer call sits: generation, step, branch (a tuple: one is built per call, and a frozen
    dataclass costs several times more to build)."""

    generation: int
    step: int
    branch: str
    branch_position: int
    new_generation: bool
    num_steps: int | None


@dataclass
class SchedulerProbe:
    """Reads a diffusers scheduler's state: the run's step count, the current step and the timesteps."""

    num_steps: Callable[[], int | None]
    step_index: Callable[[], int | None]
    timesteps: Callable[[], list[float] | None]
    #: False for a scheduler whose ``set_timesteps`` never ran: it cannot be the one stepping the run.
    was_set: Callable[[], bool] = lambda: True


@dataclass
class StepTracker:
    probe: SchedulerProbe | None = None
    fixed_num_steps: int | None = None
    generation: int = -1
    step: int = -1
    num_steps: int | None = None
    _last_t: float | None = None
    _direction: float = 0.0
    _calls_in_step: list[str] = field(default_factory=list)
    _pending_new: bool = True
    _run_timesteps: list[float] | None = None
    _run_timesteps_read: bool = False
    _told_steps: bool = False

    def begin_generation(self) -> None:
        """An explicit boundary (a pipeline set new timesteps, an exception, a reset)."""
        self._pending_new = True

    @property
    def uses_scheduler(self) -> bool:
        return self.probe is not None

    def known_run_timesteps(self) -> list[float] | None:
        """This generation's timesteps if something already read them (never reads itself)."""
        return self._run_timesteps

    def run_timesteps(self) -> list[float] | None:
        """The scheduler's timesteps of this generation, read once per generation (not per call)."""
        if not self._run_timesteps_read:
            self._run_timesteps_read = True
            self._run_timesteps = self.probe.timesteps() if self.probe is not None else None
        return self._run_timesteps

    def observe(self, read_timestep: Callable[[], float | None], context: str | None) -> CallPosition:
        """Place one call. ``read_timestep`` is called only when the scheduler cannot say."""
        if self.probe is not None:
            return self._observe_scheduler(self.probe, read_timestep, context)
        return self.observe_timestep(read_timestep(), context)

    # -- with a scheduler: no tensor is read -------------------------------------------------------
    def _observe_scheduler(
        self, probe: SchedulerProbe, read_timestep: Callable[[], float | None], context: str | None
    ) -> CallPosition:
        index = probe.step_index()
        step = index if index is not None else 0
        new_generation = self._pending_new or step < self.step
        why = None
        if new_generation:
            # A scheduler whose timesteps nobody set is not the one the loop steps (checked once per generation:
            # an attribute read, no tensor). Its step_index would stay None, every call would land on step 0.
            if index is None and not probe.was_set():
                why = "its set_timesteps was never called, so it is not the scheduler that runs the steps"
        elif step == self.step:
            calls = self._calls_in_step
            if context is not None and context in calls:
                # one branch (cache_context name) twice at one step: the scheduler did not step in between
                why = f"it {_stood(index)} while the transformer was called twice for the branch {context!r}"
            elif len(calls) >= MAX_BRANCHES_PER_STEP:
                why = f"it {_stood(index)} over {MAX_BRANCHES_PER_STEP} transformer calls"
        if why is not None:
            return self._stop_following(why, read_timestep, context, 0 if new_generation else len(self._calls_in_step))
        if new_generation:
            self._start_generation(probe.num_steps())
        if new_generation or step != self.step:
            self.step = step
            self._calls_in_step = []
        return self._place(context, new_generation)

    # -- without: the timestep value of each call --------------------------------------------------
    def observe_timestep(self, timestep: float | None, context: str | None) -> CallPosition:
        new_generation = self._pending_new
        next_step = new_generation
        if not new_generation:
            if timestep is None or self._last_t is None:
                # No timestep to go by: a branch name seen again in this step means the next step.
                label = context or f"{DEFAULT_BRANCH_PREFIX}0"
                next_step = label in self._calls_in_step if context else True
            elif timestep != self._last_t:
                next_step = True
                direction = 1.0 if timestep > self._last_t else -1.0
                if self._direction == 0.0:
                    self._direction = direction
                elif direction != self._direction:
                    new_generation = True
            if next_step and not new_generation and self.num_steps is not None:
                new_generation = self.step + 1 >= self.num_steps
        if new_generation:
            self._start_generation(None)
        if next_step or new_generation:
            self.step += 1
            self._calls_in_step = []
        self._last_t = timestep
        return self._place(context, new_generation)

    def _stop_following(
        self, why: str, read_timestep: Callable[[], float | None], context: str | None, misplaced: int
    ) -> CallPosition:
        """The scheduler does not step this run: track by each call's timestep from here on, and say so once.

        Falling back costs one device→host read per call, but a scheduler that stands still puts every call
        on one step (each taken for another CFG branch), so nothing would ever be skipped.
        """
        logger.warning(
            "magsdk: the scheduler magsdk follows is not the one stepping this run: %s. Until that scheduler sets up "
            "a run again, steps are told apart by each call's timestep (one device→host read per call)%s. If you "
            "passed scheduler= to magsdk.enable, pass the one your loop calls set_timesteps and step on (or leave "
            "it out); on a pipeline magsdk follows pipe.scheduler, so a run stepped by another scheduler (a "
            "pipeline made with from_pipe whose scheduler was replaced since) is tracked this way",
            why,
            f"; the {misplaced} calls before were all placed on one step and computed" if misplaced > 1 else "",
        )
        self.probe = None
        self._pending_new = True
        return self.observe_timestep(read_timestep(), context)

    def _start_generation(self, probed_steps: int | None) -> None:
        self.generation += 1
        self.step = -1
        self._direction = 0.0
        self._last_t = None
        self._pending_new = False
        self._run_timesteps, self._run_timesteps_read = None, False
        # The scheduler knows this run; a config's fixed count is a guess made before it (docs/user-guide.md).
        self.num_steps = probed_steps or self.fixed_num_steps
        if probed_steps and self.fixed_num_steps and probed_steps != self.fixed_num_steps and not self._told_steps:
            self._told_steps = True
            logger.warning(
                "magsdk: this run has %d steps (its scheduler's timesteps) but MagCacheConfig(num_inference_steps=%d); "
                "the run's %d steps are followed. With a pipeline or scheduler= leave num_inference_steps unset: "
                "it is taken from each run", probed_steps, self.fixed_num_steps, probed_steps,
            )

    def _place(self, context: str | None, new_generation: bool) -> CallPosition:
        position = len(self._calls_in_step)
        branch = context or f"{DEFAULT_BRANCH_PREFIX}{position}"
        self._calls_in_step.append(branch)
        return CallPosition(self.generation, self.step, branch, position, new_generation, self.num_steps)


def _stood(index: int | None) -> str:
    return "never stepped" if index is None else f"stayed at step {index}"


def _floats(values: Any) -> list[float] | None:
    """A schedule tensor as floats (one read per generation; on a GPU that is one synchronisation)."""
    if values is None:
        return None
    if hasattr(values, "tolist"):
        values = values.tolist()
    try:
        return [float(v) for v in values]
    except TypeError:
        return None


def scheduler_probe(scheduler: object) -> SchedulerProbe:
    """Probe for a diffusers scheduler; img2img pipelines start late (``begin_index``)."""

    def begin() -> int:
        return int(getattr(scheduler, "begin_index", None) or 0)

    def num_steps() -> int | None:
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return None
        return max(1, len(timesteps) - begin())

    def step_index() -> int | None:
        index = getattr(scheduler, "step_index", None)
        if index is None:
            return None
        return int(index) - begin()

    def timesteps() -> list[float] | None:
        values = _floats(getattr(scheduler, "timesteps", None))
        return values[begin():] if values is not None else None

    def was_set() -> bool:
        # diffusers' schedulers set num_inference_steps in set_timesteps (None or absent before); one of another
        # kind is trusted as given
        if getattr(scheduler, "num_inference_steps", None) is not None:
            return True
        return not any(cls.__module__.split(".")[0] == "diffusers" for cls in type(scheduler).__mro__)

    return SchedulerProbe(num_steps=num_steps, step_index=step_index, timesteps=timesteps, was_set=was_set)
