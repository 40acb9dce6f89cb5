"""One cache session per transformer: per-branch state, the skip decision, and the block hooks.

The transformer's own ``forward`` is wrapped to learn the timestep and cache-context name of
each call (step tracking) and to reset on exceptions. The first block (head) and last block
(tail) do MagCache's work; every other block only passes its inputs through on a skipped call,
so no block runs and the residual is added exactly once (trap 2).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from magsdk.config import DEFAULT_BRANCH, BlockMetadata, BranchCalibration, CalibrationResult, MagCacheConfig
from magsdk.errors import BlockLayoutError
from magsdk.ratios import FRESH, Accumulator, decide, resample_nearest, select_branch_curve
from magsdk.runtime.layout import ArgumentReader, BlockIO, forward_parameters
from magsdk.runtime.stats import CacheStats, CallRecord
from magsdk.runtime.steps import CallPosition, SchedulerProbe, StepTracker
from magsdk.strategy import MagCacheStrategy

logger = logging.getLogger("magsdk")

TIMESTEP_ARGUMENT_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time_step", "noise_level")

CurveProvider = Callable[[str, int, int], list[float]]
"""(branch, branch_position, num_steps) -> the curve for this run, already resampled."""


@dataclass
class BranchCalibrationRecorder:
    """Per-step measurements of one branch during one generation."""

    norm_ratios: list[float] = field(default_factory=list)
    norm_stds: list[float] = field(default_factory=list)
    cos_dists: list[float] = field(default_factory=list)
    timesteps: list[float | None] = field(default_factory=list)

    def add(self, residual: torch.Tensor, previous: torch.Tensor | None, timestep: float | None) -> None:
        self.timesteps.append(timestep)
        if previous is None:
            self.norm_ratios.append(1.0)
            self.norm_stds.append(0.0)
            self.cos_dists.append(0.0)
            return
        cur, prev = residual.float(), previous.float()
        per_token = torch.linalg.norm(cur, dim=-1) / (torch.linalg.norm(prev, dim=-1) + 1e-8)
        cos = torch.nn.functional.cosine_similarity(cur, prev, dim=-1)
        self.norm_ratios.append(per_token.mean().item())
        self.norm_stds.append(per_token.std(correction=0).item())
        self.cos_dists.append((1.0 - cos).mean().item())


@dataclass
class BranchState:
    curve: list[float]
    residual: torch.Tensor | None = None
    acc: Accumulator = FRESH
    recorder: BranchCalibrationRecorder | None = None


@dataclass
class ActiveCall:
    """The transformer call in flight; block hooks read it."""

    position: CallPosition
    state: BranchState
    skip: bool
    timestep: float | None
    head_input: torch.Tensor | None = None


@dataclass
class HookedBlock:
    path: str
    module: torch.nn.Module
    io: BlockIO
    role: str  # "head", "tail", "head+tail" or "middle"


class CacheSession:
    """MagCache on one transformer. Created by ``enable()`` / ``calibrate()``; undone by ``detach()``."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        blocks: list[tuple[str, torch.nn.Module, BlockMetadata]],
        config: MagCacheConfig,
        curves: CurveProvider | None,
        strategy: MagCacheStrategy,
        stats: CacheStats,
        name: str = "transformer",
        probe: SchedulerProbe | None = None,
    ) -> None:
        if not blocks:
            raise BlockLayoutError(f"{type(transformer).__name__}: no transformer blocks to hook")
        self.transformer = transformer
        self.config = config
        self.curves = curves
        self.strategy = strategy
        self.stats = stats
        self.name = name
        self.tracker = StepTracker(probe=probe, fixed_num_steps=config.num_inference_steps)
        self.branches: dict[str, BranchState] = {}
        self.active: ActiveCall | None = None
        self.context_name: str | None = None
        self.calibration_runs: list[dict[str, BranchCalibrationRecorder]] = []
        self._saved: list[tuple[torch.nn.Module, str, Any]] = []
        self.blocks = self._make_hooked_blocks(blocks)
        self._timestep = self._timestep_reader(transformer)
        self._attach()

    # -- attaching ------------------------------------------------------------------------------
    @staticmethod
    def _make_hooked_blocks(blocks: list[tuple[str, torch.nn.Module, BlockMetadata]]) -> list[HookedBlock]:
        hooked = []
        last = len(blocks) - 1
        for i, (path, module, metadata) in enumerate(blocks):
            role = "head+tail" if last == 0 else "head" if i == 0 else "tail" if i == last else "middle"
            hooked.append(HookedBlock(path, module, BlockIO(module, metadata, path), role))
        return hooked

    @staticmethod
    def _timestep_reader(transformer: torch.nn.Module) -> ArgumentReader | None:
        params = forward_parameters(transformer)
        names = {p.name for p in params}
        for candidate in TIMESTEP_ARGUMENT_NAMES:
            if candidate in names:
                return ArgumentReader(params, candidate, type(transformer).__name__)
        logger.info("%s.forward has no timestep argument; counting calls instead", type(transformer).__name__)
        return None

    def _patch(self, obj: Any, attr: str, value: Any) -> None:
        self._saved.append((obj, attr, obj.__dict__.get(attr, _ABSENT)))
        setattr(obj, attr, value)

    def _attach(self) -> None:
        self._patch(self.transformer, "forward", self._wrap_transformer(self.transformer.forward))
        if hasattr(self.transformer, "cache_context"):
            original_context: Callable[..., Any] = self.transformer.cache_context  # type: ignore[assignment]
            self._patch(self.transformer, "cache_context", wrap_cache_context(original_context, self))
        for block in self.blocks:
            self._patch(block.module, "forward", self._wrap_block(block, block.module.forward))

    def detach(self) -> None:
        for obj, attr, previous in reversed(self._saved):
            if previous is _ABSENT:
                obj.__dict__.pop(attr, None)
            else:
                setattr(obj, attr, previous)
        self._saved.clear()
        self.reset()

    def reset(self, discard: bool = False) -> None:
        """Forget all per-generation state: the next call starts a new generation.

        A finished generation's calibration is kept unless ``discard`` (an exception cut it short).
        """
        if not discard:
            self._finish_calibration_run()
        self.branches.clear()
        self.active = None
        self.tracker.begin_generation()

    # -- transformer-level wrapper --------------------------------------------------------------
    def _wrap_transformer(self, original: Callable[..., Any]) -> Callable[..., Any]:
        session = self

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            timestep = session._read_timestep(args, kwargs)
            call = session._begin_call(timestep)
            session.active = call
            try:
                output = original(*args, **kwargs)
            except BaseException:
                session.reset(discard=True)  # trap 5: no state leaks into the next generation
                raise
            finally:
                session.active = None
            session.stats.record(
                CallRecord(
                    generation=call.position.generation,
                    branch=call.position.branch,
                    step=call.position.step,
                    timestep=timestep,
                    computed=not call.skip,
                    module=session.name,
                )
            )
            return output

        return forward

    def _read_timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        if self._timestep is None:
            return None
        value = self._timestep.read(args, kwargs)
        if isinstance(value, torch.Tensor):
            return float(value.reshape(-1)[0]) if value.numel() else None
        return float(value) if isinstance(value, (int, float)) else None

    def _begin_call(self, timestep: float | None) -> ActiveCall:
        position = self.tracker.observe(timestep, self.context_name)
        if position.new_generation:
            self._finish_calibration_run()
            self.branches.clear()
        state = self.branches.get(position.branch)
        num_steps = position.num_steps
        if state is None:
            state = self._new_branch_state(position)
            self.branches[position.branch] = state
        if self.config.calibrate:
            skip = False
        else:
            steps = num_steps if num_steps is not None else len(state.curve)
            skip, state.acc = decide(
                state.acc, position.step, state.curve, self.config, steps, state.residual is not None
            )
        return ActiveCall(position=position, state=state, skip=skip, timestep=timestep)

    def _new_branch_state(self, position: CallPosition) -> BranchState:
        recorder = BranchCalibrationRecorder() if self.config.calibrate else None
        if self.config.calibrate or self.curves is None:
            return BranchState(curve=[], recorder=recorder)
        curve = self.curves(position.branch, position.branch_position, position.num_steps or 0)
        return BranchState(curve=curve, recorder=recorder)

    # -- block wrappers -------------------------------------------------------------------------
    def _wrap_block(self, block: HookedBlock, original: Callable[..., Any]) -> Callable[..., Any]:
        session = self
        io = block.io
        is_head = block.role in ("head", "head+tail")
        is_tail = block.role in ("tail", "head+tail")

        if block.role == "middle":

            @functools.wraps(original)
            def middle_forward(*args: Any, **kwargs: Any) -> Any:
                call = session.active
                if call is None or not call.skip:
                    output = original(*args, **kwargs)
                    if call is not None:
                        io.observe(output)
                    return output
                return io.passthrough(io.read_hidden(args, kwargs), io.read_encoder(args, kwargs))

            return middle_forward

        @functools.wraps(original)
        def edge_forward(*args: Any, **kwargs: Any) -> Any:
            call = session.active
            if call is None:
                return original(*args, **kwargs)
            if is_head:
                hidden_in = io.read_hidden(args, kwargs)
                call.head_input = hidden_in
                if call.skip:
                    residual = call.state.residual
                    assert residual is not None  # decide() only skips when a residual exists
                    hidden_out = session.strategy.apply_residual(hidden_in, residual, io.metadata)
                    return io.passthrough(hidden_out, io.read_encoder(args, kwargs))
            elif call.skip:
                return io.passthrough(io.read_hidden(args, kwargs), io.read_encoder(args, kwargs))
            output = original(*args, **kwargs)
            io.observe(output)  # once: a template per call would pin the last outputs in memory
            if is_tail:
                session._store_residual(call, io, output)
            return output

        return edge_forward

    def _store_residual(self, call: ActiveCall, io: BlockIO, output: Any) -> None:
        if call.head_input is None:
            raise BlockLayoutError(f"{io.label} ran as the last block but the first block never ran in this call")
        residual = self.strategy.compute_residual(io.extract_hidden(output), call.head_input, io.metadata)
        state = call.state
        if state.recorder is not None:
            state.recorder.add(residual, state.residual, call.timestep)
        state.residual = residual

    # -- calibration ----------------------------------------------------------------------------
    def _finish_calibration_run(self) -> None:
        run = {name: s.recorder for name, s in self.branches.items() if s.recorder and s.recorder.norm_ratios}
        if run:
            self.calibration_runs.append(run)
        for state in self.branches.values():
            state.recorder = None  # recorded once, even if reset and a new generation both close it

    def calibration_result(self) -> CalibrationResult:
        """Mean curve per branch over the generations seen, with the spread across them."""
        self._finish_calibration_run()
        self.branches.clear()
        runs = self.calibration_runs
        if not runs:
            raise BlockLayoutError(
                "calibration recorded nothing: no generation ran inside `magsdk.calibrate(...)`"
            )
        names: list[str] = []
        for run in runs:
            names.extend(n for n in run if n not in names)
        branches = {}
        for name in names:
            recs = [run[name] for run in runs if name in run]
            length = min(len(r.norm_ratios) for r in recs)
            ratios = torch.tensor([r.norm_ratios[:length] for r in recs], dtype=torch.float64)
            stds = torch.tensor([r.norm_stds[:length] for r in recs], dtype=torch.float64)
            cos = torch.tensor([r.cos_dists[:length] for r in recs], dtype=torch.float64)
            branches[name] = BranchCalibration(
                norm_ratios=ratios.mean(0).tolist(),
                norm_stds=stds.mean(0).tolist(),
                cos_dists=cos.mean(0).tolist(),
                timesteps=list(recs[0].timesteps[:length]),
                norm_ratio_spread=ratios.std(0, correction=0).tolist(),
                num_runs=len(recs),
            )
        return CalibrationResult(branches=branches, transformer=type(self.transformer).__name__)


_ABSENT = object()


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


def make_curve_provider(
    tables: list[tuple[int, dict[str, list[float]]]], per_branch: bool = False
) -> CurveProvider:
    """Pick the calibration nearest the run's step count, then resample it to that count.

    Curves are resampled per run (trap 6), not at configuration time: the same handle serves a
    28-step and a 50-step generation correctly. Unless ``per_branch``, every branch follows the
    mean of the branch curves, so the CFG passes of one step skip together: true CFG that mixes a
    fresh prediction with a stale one lost up to 4.8 dB on the reference model
    (docs/benchmarks.md).
    """
    if not tables:
        raise ValueError("no curves to provide")
    if not per_branch:
        tables = [(steps, {DEFAULT_BRANCH: _mean_curve(list(curves.values()))}) for steps, curves in tables]

    def provide(branch: str, position: int, num_steps: int) -> list[float]:
        if num_steps:
            _, curves = min(tables, key=lambda t: (abs(t[0] - num_steps), t[0]))
        else:
            curves = tables[0][1]
        curve = select_branch_curve(curves, branch, position)
        return resample_nearest(curve, num_steps) if num_steps else curve

    return provide


def _mean_curve(curves: list[list[float]]) -> list[float]:
    if len(curves) == 1:
        return list(curves[0])
    length = max(len(c) for c in curves)
    resampled = [resample_nearest(c, length) for c in curves]
    return [sum(values) / len(values) for values in zip(*resampled, strict=True)]
