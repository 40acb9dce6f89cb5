"""One cache session per transformer: step tracking, per-branch state, the skip decision, the residual.

The transformer's ``forward`` is wrapped (``magsdk.patching``). Around each call the session
decides — before the call, from the precomputed curve only — whether this branch skips, puts the
matching layout into the block lists (``magsdk.runtime.stack``), and after the call stores the new
residual. The decision and bookkeeping run outside ``torch.compile`` (``torch.compiler.disable``);
the blocks and everything else in the forward are compiled as usual.

Between calls a session holds, per branch, the cached residual and a few floats — nothing per
block (docs/design.md, "Memory").
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from magsdk.calibration.curve_store import CurveKey
from magsdk.config import BlockMetadata, CalibrationResult, MagCacheConfig, ScheduleInfo
from magsdk.conventions import TIMESTEP_ARGUMENT_NAMES
from magsdk.curves import CurveSource, RunSchedule
from magsdk.errors import BlockLayoutError
from magsdk.patching import Patches
from magsdk.planner import FORECAST_REACH
from magsdk.ratios import BranchSchedule, Constraints
from magsdk.runtime.autocal import AutoCalibration
from magsdk.runtime.distributed import PlanGuard
from magsdk.runtime.layout import ArgumentReader, MetadataMismatchError, forward_parameters
from magsdk.runtime.recorder import BranchRecorder, BranchRunRecord, Gatherer, Reducer, first_steps, merge_runs
from magsdk.runtime.scheduler_link import SchedulerLink
from magsdk.runtime.stack import BlockStack
from magsdk.runtime.stats import CacheStats
from magsdk.runtime.steps import CallPosition, StepTracker
from magsdk.strategy import MagCacheStrategy, NoCalibrationError, _inspect_target, _source_of

logger = logging.getLogger("magsdk")

F = TypeVar("F", bound=Callable[..., Any])


def eager(fn: F) -> F:
    """Keep ``fn`` out of ``torch.compile`` graphs: the decision is plain Python on plain numbers."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


#: True while dynamo traces (a constant to it); the wrapped forward then calls the ``torch.compiler.disable``
#: versions of the decision code. Outside tracing it calls the plain ones: the disable wrapper costs ~8 Python
#: calls per use, twice per transformer call (docs/benchmarks.md, "Runtime work per call, counted").
_is_compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


@dataclass
class BranchState:
    schedule: BranchSchedule | None
    residual: torch.Tensor | None = None
    recorder: BranchRecorder | None = None
    #: The step ``residual`` was computed at, and (``reuse="forecast"`` only) the residual before it.
    residual_step: int = -1
    previous: torch.Tensor | None = None
    previous_step: int = -1
    #: Calibration with probes: the last computed call's inputs, residual and step, probed once the next
    #: call's timestep is known.
    probe_from: _ProbeStart | None = None


@dataclass
class _ProbeStart:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    residual: torch.Tensor
    step: int


@dataclass(slots=True)
class ActiveCall:
    """The transformer call in flight."""

    position: CallPosition
    state: BranchState
    skip: bool
    timestep: float | None
    argument_timestep: torch.Tensor | float | None = None
    #: The call's arguments, kept only while calibrating with probes.
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None


@dataclass
class _Warnings:
    shown: set[str] = field(default_factory=set)

    def once(self, key: str, message: str, *args: Any) -> None:
        if key not in self.shown:
            self.shown.add(key)
            logger.warning(message, *args)


class CacheSession:
    """MagCache on one transformer. Created by ``enable()`` / ``calibrate()``; undone by ``detach()``."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        blocks: list[tuple[str, torch.nn.Module, BlockMetadata]],
        config: MagCacheConfig,
        curves: CurveSource | None,
        strategy: MagCacheStrategy,
        stats: CacheStats,
        name: str = "transformer",
        link: SchedulerLink | None = None,
        auto: AutoCalibration | None = None,
        constraints: Constraints | None = None,
    ) -> None:
        self.transformer = transformer
        self.config = config
        #: The budget planner's constraints as the user set them (None: read the config's own fields).
        self.constraints = constraints
        self.reuse = config.effective_reuse()
        #: Whether the generation in flight records a calibration instead of skipping.
        self.calibrating = config.calibrate
        #: Between-step probes per step while calibrating (``magsdk.calibrate(..., probes=P)``; 0: none).
        self.probes = 0
        self._original_forward: Callable[..., Any] | None = None
        self.auto = auto
        self._auto_pending = False
        self._auto_key: CurveKey | None = None
        #: Non-list arguments of the pipeline's last ``set_timesteps`` (``mu``) and the sigmas it passed.
        self.set_timesteps_kwargs: dict[str, Any] = {}
        self.curves = curves
        self.strategy = strategy
        self.stats = stats
        self.name = name
        try:
            self.stack = BlockStack(transformer, blocks, strategy)
        except MetadataMismatchError as error:
            error.args = (f"{error}. {self._metadata_hint()}",)
            raise
        #: The scheduler this session steps by (shared with the handle, which follows a pipeline's replacement).
        self.scheduler_link = link
        self.tracker = StepTracker(probe=link.probe if link is not None else None,
                                   fixed_num_steps=config.num_inference_steps)
        self.branches: dict[str, BranchState] = {}
        self.context_name: str | None = None
        self.calibration_runs: list[dict[str, BranchRunRecord]] = []
        #: Reduces calibration sums across the processes that shard one sequence (context parallelism).
        self.sequence_reducer: Reducer | None = None
        #: Gathers the records of the ranks that calibrate other prompts (data parallelism).
        self.run_gatherer: Gatherer | None = None
        #: Checks once per generation that the ranks sharing this transformer hold the same plan.
        self.plan_guard: PlanGuard | None = None
        self.image_tokens: int | None = None
        #: The scheduler's timesteps of the longest calibrated generation, and its set_timesteps arguments.
        self.calibrated_schedule: list[float] | None = None
        self.calibrated_set_timesteps_kwargs: dict[str, Any] = {}
        self.calibration_first_steps: dict[str, int] = {}
        self._generation_schedule: list[float] | None = None
        self._warnings = _Warnings()
        self._timestep = self._timestep_reader(transformer)
        self.patches = Patches(f"magsdk cache session on {name}")
        self.attached = False
        #: Why the session stopped caching (metadata that does not fit the model); None while it caches.
        self.stopped: str | None = None
        self._attach()

    @property
    def blocks(self) -> list[tuple[str, str]]:
        return self.stack.roles

    # -- attaching ------------------------------------------------------------------------------
    @staticmethod
    def _timestep_reader(transformer: torch.nn.Module) -> ArgumentReader | None:
        params = forward_parameters(transformer)
        names = {p.name for p in params}
        for candidate in TIMESTEP_ARGUMENT_NAMES:
            if candidate in names:
                return ArgumentReader(params, candidate, type(transformer).__name__)
        logger.info("%s.forward has no timestep argument; counting calls instead", type(transformer).__name__)
        return None

    def _attach(self) -> None:
        self.patches.patch(self.transformer, "forward", self._wrap_forward(self.transformer.forward))
        context = getattr(self.transformer, "cache_context", None)
        if callable(context):
            self.patches.patch(self.transformer, "cache_context", wrap_cache_context(context, self))
        self.attached = True

    def detach(self) -> None:
        """Remove the patches and every tensor the session holds; a wrapper someone wrapped stays inert."""
        self.patches.restore()
        self.attached = False
        self.stack.leave()
        self.reset(discard=True)
        self.calibration_runs = []  # a calibration handle collected them before it detached

    def reset(self, discard: bool = False) -> None:
        """Forget all per-generation state: the next call starts a new generation.

        A finished generation's calibration is kept unless ``discard`` (an exception cut it short).
        """
        if not discard:
            self._finish_calibration_run()
        self.branches.clear()
        self.tracker.begin_generation()

    # -- the transformer call -------------------------------------------------------------------
    def _wrap_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        session = self
        self._original_forward = original

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not session.attached:
                return original(*args, **kwargs)
            if _is_compiling():
                before, after = session.before_call_outside_graph, session.after_call_outside_graph
            else:
                before, after = session.before_call, session.after_call
            call = before(args, kwargs)
            try:
                output = original(*args, **kwargs)
            except MetadataMismatchError as error:
                session.stop(error)  # no later call can go better: the model runs plainly from now on
                raise
            except BaseException:
                session.abort_call()  # no state leaks into the next generation
                raise
            try:
                after(call)
            except MetadataMismatchError as error:
                session.stop(error)
                raise
            except BaseException:
                session.abort_call()  # e.g. a calibration probe ran out of memory: the generation is discarded
                raise
            return output

        return forward

    def before_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ActiveCall:
        """Place the call, decide it, and put the matching layout into the block lists."""
        observed: list[float | None] = []
        link = self.scheduler_link
        if link is not None and link.pipeline is not None and (
            getattr(link.pipeline, "scheduler", None) is not link.scheduler
        ):
            link.current()  # a scheduler the pipeline was given since its last call starts a generation on it

        def read_timestep() -> float | None:
            value = self._read_timestep(args, kwargs)
            observed.append(value)
            return value

        position = self.tracker.observe(read_timestep, self.context_name)
        if position.new_generation:
            self._finish_calibration_run()
            self.branches.clear()
            if self.auto is not None:  # record until the first call tells whether a curve is known
                self.calibrating, self._auto_pending = True, True
            if self.calibrating and self.tracker.uses_scheduler:
                self._generation_schedule = self.tracker.run_timesteps()
            if self.plan_guard is not None:
                self.plan_guard.check(self, position)  # one small collective (docs/multi-gpu.md)
        state = self.branches.get(position.branch)
        if state is None:
            state = self._new_branch_state(position)
            self.branches[position.branch] = state
        if self.tracker.uses_scheduler:
            run = self.tracker.known_run_timesteps()  # read at most once per generation, when needed
            timestep = run[position.step] if run is not None and position.step < len(run) else None
        else:
            timestep = observed[0] if observed else None
        argument: torch.Tensor | float | None = None
        if self.calibrating:
            argument = self._argument_timestep(args, kwargs)
            skip = False
        elif state.schedule is None:  # a branch that appeared while a curve was being looked up
            skip = False
        else:
            online = state.schedule.curve.online
            decision_t = timestep
            if online is not None:
                decision_t = observed[0] if observed else self._read_timestep(args, kwargs)
                self._check_online_range(online.low, online.high, decision_t)
            skip = state.schedule.should_skip(position.step, decision_t, state.residual is not None)
            if state.schedule.outran_at is not None:
                self._outran_curve(state.schedule)
        call = ActiveCall(position, state, skip, timestep, argument)
        if self.calibrating and self.probes and state.recorder is not None:
            call.inputs = _kept(args), {k: _kept(v) for k, v in kwargs.items()}
        if skip:
            self.stack.gate.residual = self._reused(state, position.step)
        self.stack.enter(skip)
        return call

    def _reused(self, state: BranchState, step: int) -> torch.Tensor | None:
        """What a skipped step adds: the last residual, scaled by the curve, or extrapolated from the last two."""
        residual = state.residual
        if residual is None or self.reuse == "residual":
            return residual
        if self.reuse == "forecast":
            if state.previous is None or state.residual_step <= state.previous_step:
                return residual
            weight = (step - state.residual_step) / (state.residual_step - state.previous_step)
            weight = min(weight, FORECAST_REACH)
            return torch.lerp(state.previous, residual, 1.0 + weight)  # r_c + w · (r_c − r_p)
        assert state.schedule is not None
        return residual * state.schedule.growth(state.residual_step, step)

    def after_call(self, call: ActiveCall) -> None:
        """Put the real blocks back; on a computed call keep the new residual (and calibration sums)."""
        gate = self.stack.gate
        try:
            if not call.skip:
                head_in, head_out, tail_out = gate.head_input, gate.head_output, gate.tail_output
                if head_in is None or tail_out is None:
                    raise MetadataMismatchError(
                        f"{self.name}: the call did not run {self.stack.paths[0]} and {self.stack.paths[-1]} "
                        "as first and last blocks of its stack; the strategy or report does not fit this model"
                    )
                self._store(call, head_in, head_out, tail_out)
                if call.inputs is not None:
                    self._probe(call)
                if self._auto_pending:
                    self._auto_decide(call.position)
                elif self.auto is not None and self.calibrating:
                    self._auto_last_step(call.position)
        finally:
            self.stack.leave()
        position = call.position
        self.stats.note(position.generation, position.branch, position.step, call.timestep, not call.skip, self.name)

    #: What a compiled forward calls: the same code, kept out of the graph (``torch.compiler.disable``).
    before_call_outside_graph = eager(before_call)
    after_call_outside_graph = eager(after_call)

    @eager
    def abort_call(self) -> None:
        self.stack.leave()
        self.reset(discard=True)

    @eager
    def stop(self, error: MetadataMismatchError) -> None:
        """Stop caching for good: the metadata does not fit the model, so every later call would fail alike.

        A session left attached would break each call the same way, and ``enable`` again on the same
        model needs ``disable`` first. So the session detaches its own patches: the model's calls run
        its original ``forward``, as if magsdk were not enabled. What the handle patched (the model's
        ``_magsdk_session`` marker, the scheduler's ``set_timesteps``) is the handle's: it stays until
        ``handle.disable()``, which works as ever. ``error``'s message is extended to say all this.
        """
        self.stopped = str(error)
        self.detach()
        cls = type(self.transformer).__name__
        notice = (
            f"magsdk stopped caching {cls} ({self.name}): from this call on it runs without the cache, as if "
            "magsdk were not enabled; handle.disable() removes what is left"
        )
        if error.metadata_fix:
            notice += f". To cache it, {self._metadata_hint(lowercase=True)}"
        error.args = (f"{error}. {notice}",)

    def _metadata_hint(self, lowercase: bool = False) -> str:
        """What to do about metadata that does not fit: infer it with ``magsdk inspect`` for this class."""
        cls = type(self.transformer)
        target = _inspect_target(cls)
        named = cls.__module__.split(".")[0] == "diffusers" or (
            _source_of(cls) is not None and "<" not in cls.__qualname__
        )
        if not named:  # a class made in a function or typed in at a prompt: no TARGET names it
            hint = (
                "pass the block conventions inferred from a small build of its class: `from magsdk.inspect import "
                "inspect_target`, then magsdk.enable(..., metadata=inspect_target(type(transformer)))"
            )
        else:
            hint = (
                f"run `magsdk inspect {target}` to see the block conventions it infers, and pass them: "
                f"`from magsdk.inspect import inspect_target`, then magsdk.enable(..., "
                f"metadata=inspect_target({target!r}))"
            )
        return hint if lowercase else hint[0].upper() + hint[1:]

    def _store(self, call: ActiveCall, head_in: torch.Tensor, head_out: Any, tail_out: Any) -> None:
        stack = self.stack
        if stack.head_io.shape is None or stack.tail_io.shape is None:
            stack.head_io.observe(head_out)
            stack.tail_io.observe(tail_out)
            stack.share_shapes()
        tail_hidden = stack.tail_io.extract_hidden(tail_out)
        residual = self.strategy.compute_residual(tail_hidden, head_in, stack.tail_io.metadata)
        if head_in.ndim >= 2:
            self.image_tokens = int(head_in.shape[1])
        state = call.state
        if state.recorder is not None:
            state.recorder.add(residual, state.residual, call.argument_timestep, call.position.step)
        if self.reuse == "forecast":
            state.previous, state.previous_step = state.residual, state.residual_step
        state.residual, state.residual_step = residual, call.position.step

    def _probe(self, call: ActiveCall) -> None:
        """Between-step probes: the last step's latent run again at P timesteps up to this call's.

        A curve sampled at a calibration's steps cannot show how the residual norm grows between them,
        and a run on a denser or shifted schedule falls there (docs/design.md, "Probes"). Each probe is
        one more forward of the same inputs with only the timestep argument moved, so its growth is the
        model's response to the noise level at that latent; the mapping spreads the latent's own change
        on top. Calibration only: a cached run never probes.
        """
        state, recorder = call.state, call.state.recorder
        assert call.inputs is not None and recorder is not None and state.residual is not None
        start, here = state.probe_from, call.position.step
        state.probe_from = _ProbeStart(call.inputs[0], call.inputs[1], state.residual, here)
        if start is None or start.step != here - 1 or self._timestep is None or self._original_forward is None:
            return
        begin = self._timestep.read(start.args, start.kwargs)
        end = self._timestep.read(*call.inputs)
        residuals = []
        stack = self.stack
        with torch.no_grad():
            for j in range(1, self.probes + 1):
                args, kwargs = self._timestep.replaced(start.args, start.kwargs, _between(begin, end, j / self.probes))
                stack.gate.clear()
                self._original_forward(*args, **kwargs)
                head_in, tail_out = stack.gate.head_input, stack.gate.tail_output
                if head_in is None or tail_out is None:
                    raise MetadataMismatchError(f"{self.name}: a probe call did not run the block stack")
                hidden = stack.tail_io.extract_hidden(tail_out)
                residuals.append(self.strategy.compute_residual(hidden, head_in, stack.tail_io.metadata))
        stack.gate.clear()
        recorder.add_probes(residuals, start.residual)

    def _auto_decide(self, position: CallPosition) -> None:
        """After a generation's first call: cache with a known curve, or go on measuring this generation."""
        assert self.auto is not None
        self._auto_pending = False
        if position.num_steps is not None and position.num_steps < 2:
            self._auto_key = None  # one step: computed in any case, and a curve needs two (nothing kept)
            return
        key = self.auto.key(position.num_steps, self.image_tokens)
        self._auto_key = key
        source = self.auto.find(key)
        if source is None:
            return
        self.curves, self.calibrating = source, False
        for name, state in self.branches.items():
            state.recorder = None
            state.schedule = self._new_branch_state(CallPosition(
                position.generation, position.step, name, list(self.branches).index(name), False, position.num_steps
            )).schedule

    def _new_branch_state(self, position: CallPosition) -> BranchState:
        if self.calibrating:
            return BranchState(schedule=None, recorder=BranchRecorder())
        if self.curves is None:
            raise BlockLayoutError(f"{self.name}: no curve to decide with; pass mag_ratios or a calibrated strategy")
        stamps = self.tracker.run_timesteps() if self.curves.uses_schedules() else None
        run = RunSchedule.of(position.num_steps, stamps)
        mapped = self.curves.curve_for(position.branch, position.branch_position, run, self.name)
        if mapped.out_of_range:
            lo, hi = mapped.calibrated_range or (None, None)
            self._warnings.once(
                "range",
                "magsdk: %d of this run's timesteps (%s) lie outside the calibrated schedule's range; the curve is "
                "held flat (ratio 1) there. %s.%s For reliable skips, calibrate on this run's schedule: %s",
                len(mapped.out_of_range), ", ".join(f"{t:g}" for t in mapped.out_of_range[:4]), mapped.how,
                "" if lo is None else f" Calibrated range: {lo:g}..{hi:g}.", self._calibrate_hint(position.num_steps),
            )
        logger.debug("magsdk: %s branch %s follows the %s", self.name, position.branch, mapped.how)
        self.stats.note_curve(self.name, position.branch, mapped.how)
        schedule = BranchSchedule(mapped, self.config, start=max(position.step, 0), constraints=self.constraints)
        return BranchState(schedule=schedule)

    def _calibrate_hint(self, num_steps: int | None) -> str:
        """How to calibrate at this run's schedule: in Python always; on the command line where it can be spelled
        out (the curve is a strategy file's and the model's folder or hub id is known)."""
        steps = f"num_inference_steps={num_steps}" if num_steps else "this run's steps and settings"
        on_pipe = self.scheduler_link is not None and self.scheduler_link.pipeline is not None
        if on_pipe:
            hint = (f"`with magsdk.calibrate(pipe) as cal: pipe(..., {steps})`, then "
                    "magsdk.enable(pipe, magsdk.MagCacheConfig(mag_ratios=cal.result))")
        else:
            hint = (f"`with magsdk.calibrate(transformer) as cal:` run your loop ({steps}) inside it, then "
                    "magsdk.enable(transformer, magsdk.MagCacheConfig(mag_ratios=cal.result))")
        strategy_file = _source_of(type(self.strategy)) if type(self.strategy) is not MagCacheStrategy else None
        from_strategy = self.curves is not None and all(t.label != "config" for t in self.curves.tables)
        model = self._model_location()
        if strategy_file and from_strategy and model and num_steps:
            hint += f"; or on the command line: magsdk calibrate {strategy_file} --model {model} --steps {num_steps}"
        return hint

    def _model_location(self) -> str | None:
        """The folder or hub id the pipeline (else the transformer) was loaded from; None for one built in code."""
        link = self.scheduler_link
        owners = ([link.pipeline] if link is not None and link.pipeline is not None else []) + [self.transformer]
        for owner in owners:
            value = getattr(getattr(owner, "config", None), "_name_or_path", None)
            if isinstance(value, str) and value.strip():
                return value
        return None

    def _outran_curve(self, schedule: BranchSchedule) -> None:
        """A run that does not know its step count follows the curve as it is: say so once when it outruns it."""
        self._warnings.once(
            "length",
            "magsdk: %s: this run is past the curve's %d steps (call at step %d) and does not know its step count, "
            "so the curve is held flat (ratio 1) from here on; pass scheduler= (the scheduler your loop steps) or "
            "MagCacheConfig(num_inference_steps=...) to enable() so that the curve is mapped onto the run",
            self.name, len(schedule.curve.values or ()), schedule.outran_at,
        )

    def _check_online_range(self, low: float, high: float, timestep: float | None) -> None:
        if timestep is None:
            return
        span = max(high - low, 1e-12)
        if timestep < low - 1e-3 * span or timestep > high + 1e-3 * span:
            self._warnings.once(
                "online-range",
                "magsdk: timestep %g lies outside the calibrated range %g..%g; the curve is held flat (ratio 1) "
                "there. Calibrate on this schedule for reliable skips.", timestep, low, high,
            )

    def _read_timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        """The call's timestep as a float: a device→host read when it lives on a GPU."""
        if self._timestep is None:
            return None
        value = self._timestep.read(args, kwargs)
        if isinstance(value, torch.Tensor):
            # the largest: per-token timesteps (Wan's expand_timesteps) give clean conditioning frames 0
            count = value.numel()
            if count == 1:  # the usual case: ``item`` reads it without dispatching a reduction first (~6 → 0.3 µs)
                return float(value.item())
            return float(value.detach().amax().item()) if count else None
        return float(value) if isinstance(value, (int, float)) else None

    def _argument_timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | float | None:
        """The timestep argument, kept as a tensor (read once at the end of the generation)."""
        if self._timestep is None:
            return None
        value = self._timestep.read(args, kwargs)
        if isinstance(value, torch.Tensor):
            return value.detach().amax() if value.numel() else None
        return float(value) if isinstance(value, (int, float)) else None

    # -- calibration ----------------------------------------------------------------------------
    def _finish_calibration_run(self) -> None:
        run = {}
        for name, state in self.branches.items():
            if state.recorder is not None and state.recorder.sums:
                run[name] = state.recorder.finish(self.sequence_reducer)
            state.recorder = None  # recorded once, even if reset and a new generation both close it
        if run:
            kept = self.calibrated_schedule
            if self._generation_schedule is not None and (kept is None or len(self._generation_schedule) >= len(kept)):
                # the curve is the mean of the longest generations (merge_runs): their schedule, not the last one's
                self.calibrated_schedule = self._generation_schedule
                self.calibrated_set_timesteps_kwargs = dict(self.set_timesteps_kwargs)
            if self.auto is not None:
                self._auto_save(run)
            else:
                self.calibration_runs.append(run)

    def _auto_save(self, run: dict[str, BranchRunRecord]) -> None:
        """A generation measured under auto-calibration: keep its curve if it reached its last step.

        Called after each branch's last step (a process may end right after its one generation) and
        at the generation's end; the file is rewritten with every branch seen so far.
        """
        assert self.auto is not None
        key = self._auto_key
        if key is None or not self.calibrating:
            return
        complete = {name: record for name, record in run.items() if len(record.norm_ratios) == key.num_steps}
        if not complete:
            logger.info("magsdk: the generation stopped before its last step; its curve is not kept")
            return
        result = CalibrationResult(branches=merge_runs([complete]), transformer=type(self.transformer).__name__)
        if self._generation_schedule and self.auto.scheduler is not None:
            result.scheduler = type(self.auto.scheduler).__name__
            result.schedule = schedule_info(
                self._generation_schedule, self.auto.scheduler, self.set_timesteps_kwargs, self.image_tokens
            )
        self.auto.save(key, result)

    def _auto_last_step(self, position: CallPosition) -> None:
        if position.num_steps is None or position.step != position.num_steps - 1:
            return
        run = {
            name: state.recorder.finish(self.sequence_reducer)
            for name, state in self.branches.items()
            if state.recorder is not None and state.recorder.sums
        }
        self._auto_save(run)

    def calibration_result(self) -> CalibrationResult:
        """Mean curve per branch over the generations seen, with the spread across them."""
        self._finish_calibration_run()
        self.branches.clear()
        runs = self.calibration_runs if self.run_gatherer is None else self.run_gatherer(self.calibration_runs)
        if not runs:
            raise NoCalibrationError(
                "calibration recorded nothing: no generation ran inside `magsdk.calibrate(...)`. Run the pipeline "
                "(or your loop over the transformer) inside the `with` block: `with magsdk.calibrate(pipe) as cal: "
                "pipe(...)`, then read cal.result after it"
            )
        branches = merge_runs(runs)
        self.calibration_first_steps = first_steps(runs)  # a second transformer joins mid-run
        return CalibrationResult(branches=branches, transformer=type(self.transformer).__name__)



def _kept(value: Any) -> Any:
    """A call's argument kept for a later probe: tensors copied (a pipeline may update its latents in place)."""
    if isinstance(value, tuple):
        return tuple(_kept(v) for v in value)
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _between(begin: Any, end: Any, fraction: float) -> Any:
    """The timestep argument ``fraction`` of the way from ``begin`` to ``end`` (tensors element by element)."""
    if isinstance(begin, torch.Tensor) and isinstance(end, torch.Tensor):
        moved = begin.double() + (end.double() - begin.double()) * fraction
        return moved.round().to(begin.dtype) if not begin.is_floating_point() else moved.to(begin.dtype)
    if isinstance(begin, (int, float)) and isinstance(end, (int, float)):
        value = float(begin) + (float(end) - float(begin)) * fraction
        return round(value) if isinstance(begin, int) and isinstance(end, int) else value
    return end


def schedule_info(
    timesteps: list[float], scheduler: Any, set_timesteps_kwargs: dict[str, Any], image_tokens: int | None
) -> ScheduleInfo:
    """Describe a run's schedule: its timesteps and sigmas, and what shaped them (config, ``mu``, sigmas)."""
    config = getattr(scheduler, "config", {}) or {}
    shaping = {
        key: _plain(config[key]) for key in SCHEDULE_CONFIG_KEYS if key in config and _plain(config[key]) is not None
    }
    sigmas = getattr(scheduler, "sigmas", None)
    sigma_values: list[float] | None = None
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() >= len(timesteps):
        begin = int(getattr(scheduler, "begin_index", None) or 0)
        sigma_values = [float(v) for v in sigmas.detach().cpu().tolist()[begin : begin + len(timesteps)]]
    input_sigmas = set_timesteps_kwargs.get("sigmas")
    if input_sigmas is not None and hasattr(input_sigmas, "tolist"):
        input_sigmas = input_sigmas.tolist()
    mu = set_timesteps_kwargs.get("mu")
    return ScheduleInfo(
        timesteps=[float(t) for t in timesteps],
        sigmas=sigma_values,
        scheduler=type(scheduler).__name__,
        config=shaping,
        set_timesteps={"mu": float(mu)} if isinstance(mu, (int, float)) else {},
        input_sigmas=[float(v) for v in input_sigmas] if input_sigmas is not None else None,
        image_tokens=image_tokens,
    )


#: Scheduler config values that change the timesteps a step count gives.
SCHEDULE_CONFIG_KEYS = (
    "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "shift_terminal", "time_shift_type", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "timestep_spacing", "flow_shift", "use_flow_sigmas", "prediction_type", "invert_sigmas",
    "stochastic_sampling",
)


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return None


class HasContextName(Protocol):
    context_name: str | None


def wrap_cache_context(original: Callable[..., Any], holder: HasContextName) -> Callable[..., Any]:
    """Wrap diffusers' ``cache_context(name)`` so that ``holder`` knows the name of the branch in flight."""

    @contextlib.contextmanager
    @functools.wraps(original)
    def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        previous, holder.context_name = holder.context_name, name
        try:
            with original(name, *args, **kwargs):
                yield
        finally:
            holder.context_name = previous

    return cache_context
