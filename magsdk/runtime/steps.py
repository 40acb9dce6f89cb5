"""Step tracking by timestep value (DESIGN.md §2, traps 1, 6 and 7).

Counting transformer calls gets CFG wrong (two calls per step) and breaks when two
transformers share one schedule. The timestep of each call says where the loop is: the same
timestep again is another branch of the same step, a new one is the next step, and one that
goes back against the schedule's direction starts a new generation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_BRANCH_PREFIX = "pass"


@dataclass(frozen=True)
class CallPosition:
    """Where one transformer call sits: generation, step, branch."""

    generation: int
    step: int
    branch: str
    branch_position: int
    new_generation: bool
    num_steps: int | None


@dataclass
class SchedulerProbe:
    """Reads a diffusers scheduler's state: the run's step count and the current step index."""

    num_steps: Callable[[], int | None]
    step_index: Callable[[], int | None]


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

    def begin_generation(self) -> None:
        """An explicit boundary (a pipeline set new timesteps, an exception, a reset)."""
        self._pending_new = True

    def observe(self, timestep: float | None, context: str | None) -> CallPosition:
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
            self.generation += 1
            self.step = -1
            self._direction = 0.0
            self._pending_new = False
            self.num_steps = self.fixed_num_steps or (self.probe.num_steps() if self.probe else None)
        if next_step or new_generation:
            probed = self.probe.step_index() if self.probe else None
            self.step = probed if probed is not None else self.step + 1
            self._calls_in_step = []
        position = len(self._calls_in_step)
        branch = context or f"{DEFAULT_BRANCH_PREFIX}{position}"
        self._calls_in_step.append(branch)
        self._last_t = timestep
        return CallPosition(self.generation, self.step, branch, position, new_generation, self.num_steps)


def scheduler_probe(scheduler: object) -> SchedulerProbe:
    """Probe for a diffusers scheduler; img2img pipelines start late (``begin_index``)."""

    def num_steps() -> int | None:
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return None
        begin = getattr(scheduler, "begin_index", None) or 0
        return max(1, len(timesteps) - int(begin))

    def step_index() -> int | None:
        index = getattr(scheduler, "step_index", None)
        if index is None:
            return None
        begin = getattr(scheduler, "begin_index", None) or 0
        return int(index) - int(begin)

    return SchedulerProbe(num_steps=num_steps, step_index=step_index)
