"""``magsdk.enable`` and ``magsdk.calibrate``: attach a cache session to a pipeline or transformer."""

from __future__ import annotations

import functools
import logging
import numbers
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import torch

from magsdk.config import MAX_PROBES, BlockMetadata, CalibrationResult, InspectionReport, MagCacheConfig
from magsdk.curves import CurveSource, probes_fit_schedule
from magsdk.errors import BlockLayoutError, MagSDKError, UsageError
from magsdk.patching import Patches
from magsdk.planner import config_constraints
from magsdk.ratios import Constraints, SkipPlan, plan_source
from magsdk.registry import StrategyRegistry, TransformerBlockRegistry
from magsdk.runtime import distributed
from magsdk.runtime.autocal import AutoCalibration
from magsdk.runtime.distributed import GroupOption, Parallelism, ProcessGroup
from magsdk.runtime.recorder import join_modules
from magsdk.runtime.scheduler_link import SchedulerLink
from magsdk.runtime.session import CacheSession, eager, schedule_info
from magsdk.runtime.stats import DEFAULT_KEEP_GENERATIONS, CacheStats
from magsdk.schedules import recorded_set_timesteps, timesteps_from_scheduler
from magsdk.strategy import MagCacheStrategy, NoCalibrationError, _inspect_target

logger = logging.getLogger("magsdk")

_SESSION_ATTR = "_magsdk_session"

MetadataSource = InspectionReport | Mapping[str, BlockMetadata]


class _HandleMarker:
    """``transformer._magsdk_session``: the handle caching it, found again by the next ``enable`` (which replaces
    it). A deep copy of the transformer is a plain model (its patched attributes come back unpatched,
    magsdk.patching.PatchedCall), so its marker copies to None instead of dragging a copy of the handle along."""

    __slots__ = ("handle",)

    def __init__(self, handle: MagCacheHandle) -> None:
        self.handle = handle

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None
StrategySource = MagCacheStrategy | type[MagCacheStrategy] | str


class MagCacheHandle:
    """What ``enable`` returns: statistics, ``plan``, ``disable()``, and a context manager that disables on exit."""

    def __init__(
        self,
        sessions: list[CacheSession],
        stats: CacheStats,
        config: MagCacheConfig,
        strategy: MagCacheStrategy,
        patches: Patches,
        curves: CurveSource | None,
    ) -> None:
        self.sessions = sessions
        self.stats = stats
        self.config = config
        self.strategy = strategy
        self.curves = curves
        self._patches = patches
        self.active = True
        #: The scheduler this handle steps by (a pipeline's is followed when it is replaced); None without one.
        self.link: SchedulerLink | None = None
        #: First-call tracers still waiting (``enable`` on a transformer nobody described).
        self.pending: list[Any] = []
        #: Per transformer: where its block metadata came from (strategy, given, registry or inferred).
        self.metadata_sources: dict[str, str] = {}
        #: The budget planner's constraints as the user set them (None: from the config's own fields).
        self.constraints: Constraints | None = None

    @property
    def scheduler(self) -> Any:
        """The scheduler runs step by: the pipeline's as it is now (it may have been replaced), or ``scheduler=``."""
        return self.link.current() if self.link is not None else None

    @property
    def blocks(self) -> list[str]:
        """Paths of the hooked blocks, with their role (head, tail, middle)."""
        return [f"{path} ({role})" for s in self.sessions for path, role in s.blocks]

    def plan(
        self,
        num_steps: int,
        branch: str = "default",
        *,
        position: int = 0,
        timesteps: Sequence[float] | None = None,
        module: str = "transformer",
        first_step: int = 0,
    ) -> SkipPlan:
        """The schedule this handle follows for a ``num_steps`` run of ``branch`` (the runtime's own rule).

        ``module`` names the pipeline's transformer (``transformer_2`` for Wan 2.2's second expert) and
        ``first_step`` the first step it runs. Without ``timesteps``, a curve that recorded its schedule is
        mapped onto what the handle's scheduler gives a ``num_steps`` run. A handle that cannot learn its
        run's step count (a bare transformer given neither ``scheduler=`` nor ``num_inference_steps``)
        follows the curve as it is, one ratio per call; its plan of ``num_steps`` calls says the same.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise UsageError(
                "handle.plan(num_steps) takes the run's number of denoising steps, a whole number >= 1; "
                f"got {num_steps!r}"
            )
        num_steps = int(num_steps)
        curves = self.curves if self.curves is not None else self._auto_curves(num_steps)
        scheduler = self.scheduler
        count_known = scheduler is not None or self.config.num_inference_steps is not None
        if timesteps is None and scheduler is not None and curves.uses_schedules():
            assert self.link is not None
            # what this handle's own scheduler gives a num_steps run: the run it last set up, when that had
            # num_steps steps (custom sigmas, an img2img run's later start: only the scheduler knows them); else
            # set up as the pipeline did last time; else, before a pipeline's first run, as the calibrating
            # pipeline set it up (FLUX-style pipelines pass sigmas that the scheduler's own defaults do not give)
            current = self.link.probe.timesteps()
            if current is not None and len(current) == num_steps:
                timesteps = current
            else:
                passed = self.sessions[0].set_timesteps_kwargs if self.sessions else {}
                if not passed:
                    passed = recorded_set_timesteps(curves.table_for(num_steps).schedule)
                timesteps = timesteps_from_scheduler(scheduler, num_steps, passed)
        return plan_source(
            curves, self.config, num_steps, branch, position=position, timesteps=timesteps, module=module,
            first_step=first_step, constraints=self.constraints, count_known=count_known,
        )

    def _auto_curves(self, num_steps: int) -> CurveSource:
        """An auto-calibrating handle plans with the curve it measured for this step count and resolution."""
        session = next((s for s in self.sessions if s.auto is not None), None)
        if session is None or session.auto is None:
            raise UsageError("a calibration handle does not skip; it has no plan")
        if session.image_tokens is None:
            raise UsageError(
                "auto-calibration keys its curves by resolution, which this handle learns at its first generation: "
                "run one, then call handle.plan"
            )
        found = session.auto.find(session.auto.key(num_steps, session.image_tokens))
        if found is None:
            raise UsageError(
                f"auto-calibration has no curve for {num_steps} steps at {session.image_tokens} image tokens yet: the "
                f"first generation at {num_steps} steps measures it (computing every step); run it, then call "
                "handle.plan"
            )
        return found

    def reset(self) -> None:
        for session in self.sessions:
            session.reset()

    def disable(self) -> None:
        """Remove every hook and drop every cached tensor; statistics and results stay readable."""
        if not self.active:
            return
        for tracer in self.pending:
            tracer.cancel()
        for session in self.sessions:
            session.detach()
        self._patches.restore()
        self.sessions.clear()
        if self.link is not None:
            self.link.release()
        self._release_target()
        self.active = False

    def _release_target(self) -> None:
        """A handle kept for its statistics must not keep the pipeline (and its weights) alive: the strategy
        recognises its variant from the pipeline, so it settles that now and lets the pipeline go."""
        try:
            self.strategy.resolved_variant()
        except MagSDKError:  # nothing to recognise it from any more than before: it stays unresolved
            pass
        self.strategy.target = None

    def __enter__(self) -> MagCacheHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disable()


class CalibrationHandle(MagCacheHandle):
    """``with magsdk.calibrate(pipe) as cal: pipe(...)``; then ``cal.result`` is a ``CalibrationResult``."""

    #: The process groups it was given (data-parallel ranks gather their records in ``collect``).
    parallelism: Parallelism | None = None
    _result: CalibrationResult | None = None
    _failed: BaseException | None = None

    @property
    def result(self) -> CalibrationResult:
        """The curves, once the ``with`` block has ended; before that (or after a failed block) a clear error
        rather than ``None``, which would only fail later as an AttributeError far from the cause."""
        if self._result is not None:
            return self._result
        if self._failed is not None:
            raise UsageError(
                f"the `with magsdk.calibrate(...)` block ended with {type(self._failed).__name__}: {self._failed}; "
                "so it has no result. Fix that error and run the calibration again"
            )
        raise UsageError(
            "cal.result is ready when the `with magsdk.calibrate(...) as cal:` block ends (it averages every "
            "generation the block ran); read it after the block, or call cal.collect() for the curves so far"
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                try:
                    self._result = self.collect()
                except BaseException as error:  # e.g. no generation ran: .result repeats why
                    self._failed = error
                    raise
            elif exc is not None:
                self._failed = exc
                distributed.abandon(self.parallelism, exc)  # the other ranks stop instead of waiting
        finally:
            self.disable()

    def collect(self) -> CalibrationResult:
        if not self.active:  # replaced or disabled inside its block: what it recorded went with its sessions
            distributed.abandon(self.parallelism, "this rank's calibration was ended inside its block")
            raise UsageError(
                "the calibration was ended inside its `with magsdk.calibrate(...)` block: a magsdk.enable or "
                "magsdk.calibrate on the same transformer (or cal.disable()) replaced it, so it has no result. "
                "Enable the cache after the block, and give each calibration a block of its own"
            )
        if not self.sessions:  # a traced transformer gets its session at its first call: there was none
            distributed.abandon(self.parallelism, "this rank recorded no generation")
            raise NoCalibrationError(
                "calibration recorded nothing: no generation ran inside `magsdk.calibrate(...)`. Run the pipeline "
                "(or your loop over the transformer) inside the `with` block: `with magsdk.calibrate(pipe) as cal: "
                "pipe(...)`, then read cal.result after it"
            )
        results = [s.calibration_result() for s in self.sessions]
        result = results[0]
        if len(results) > 1:  # transformers sharing one schedule: each one's curve covers the whole run
            schedule = self.sessions[0].calibrated_schedule
            result.branches = join_modules(
                [(s.name, r.branches, s.calibration_first_steps) for s, r in zip(self.sessions, results, strict=True)],
                len(schedule) if schedule else None,
            )
        result.num_steps = max(len(b.norm_ratios) for b in result.branches.values())
        if result.num_steps < 2:  # a ratio compares a step with the one before: one step gives no curve
            raise UsageError(
                f"a calibration needs a run of at least 2 steps; the generations in this `with magsdk.calibrate(...)` "
                f"block ran {result.num_steps}. Run the pipeline at the step count you will use (num_inference_steps)"
            )
        if self.link is not None:
            scheduler = self.link.scheduler  # the one the calibrated generations ran with (not looked up again)
            result.scheduler = type(scheduler).__name__
            first = self.sessions[0]
            if first.calibrated_schedule:
                result.schedule = schedule_info(
                    first.calibrated_schedule, scheduler, first.calibrated_set_timesteps_kwargs, first.image_tokens
                )
        _check_probe_units(result)
        return result


def _check_probe_units(result: CalibrationResult) -> None:
    """Probes are spaced evenly in the transformer's timestep argument; a pipeline whose argument is not an affine
    function of its scheduler's timesteps (Cosmos: σ/(σ+1) against 1000σ) places them elsewhere in the scheduler's,
    so the map does not use them there (``probes_fit_schedule``): say so once, with the numbers."""
    arguments = result.argument_timesteps()
    if result.probe_curves() is None or result.schedule is None or arguments is None:
        return
    if not probes_fit_schedule(result.schedule.timesteps, arguments):
        logger.warning(
            "magsdk: the transformer's timestep argument (%s ...) is not proportional to the scheduler's timesteps "
            "(%s ...), and probes are spaced evenly in the argument: runs mapped through the scheduler's timesteps "
            "will not use them (a bare transformer's loop, mapped through the argument, does). Calibrate without "
            "probes, or on the schedule you run",
            ", ".join(f"{t:.4g}" for t in arguments[:3]), ", ".join(f"{t:.4g}" for t in result.schedule.timesteps[:3]),
        )


def enable(
    target: Any,
    config: MagCacheConfig | None = None,
    *,
    strategy: StrategySource | None = None,
    metadata: MetadataSource | None = None,
    scheduler: Any = None,
    keep_generations: int = DEFAULT_KEEP_GENERATIONS,
    auto_calibrate: bool = False,
    parallel_group: GroupOption = "auto",
) -> MagCacheHandle:
    """Attach MagCache to a pipeline (anything with ``.transformer``) or a transformer module.

    With no config and no strategy, the strategy registered for the transformer's class is used;
    a transformer whose block classes are registered (``TransformerBlockRegistry``) needs only a
    config; any other is traced on its first call. ``auto_calibrate=True`` (or
    ``MagCacheConfig(auto_calibrate=True, ...)``) starts a model with no curve at all: its first
    generation at each step count and resolution is measured, later ones are cached.
    Enabling twice replaces the first session (never stacks hooks). ``keep_generations`` bounds the
    per-call records in ``handle.stats`` (counters cover every generation). ``parallel_group``: the
    ranks that run the transformer together; they check once per generation that they hold the same
    plan ("auto": diffusers' context-parallel group, if any; docs/multi-gpu.md).
    """
    if isinstance(config, MagCacheConfig) and config.calibrate:  # the handle enable() returns has no result to read
        raise UsageError(
            "MagCacheConfig(calibrate=True) is what magsdk.calibrate uses: `with magsdk.calibrate(pipe) as cal: "
            "pipe(...)`, then read cal.result (magsdk.enable would record every step into nothing you can read)"
        )
    if isinstance(keep_generations, bool) or not isinstance(keep_generations, numbers.Integral) or keep_generations < 1:
        raise UsageError(
            "keep_generations= is how many recent generations handle.stats keeps per-call records of (counters "
            f"cover all of them): a whole number >= 1, got {_kind(keep_generations)}"
        )
    if auto_calibrate and config is not None and not config.auto_calibrate:
        config = config.model_copy(update={"auto_calibrate": True})
    parallelism = Parallelism.of(parallel_group)
    return _attach(
        target, config, strategy, metadata, scheduler, MagCacheHandle, int(keep_generations), auto_calibrate,
        parallelism,
    )


def calibrate(
    target: Any,
    *,
    strategy: StrategySource | None = None,
    metadata: MetadataSource | None = None,
    scheduler: Any = None,
    parallel_group: GroupOption = "auto",
    data_group: ProcessGroup | None = None,
    probes: int = 0,
) -> CalibrationHandle:
    """Record norm ratios, stds, cosine distances and timesteps per branch and step; never skips.

    ``probes=P`` also measures the curve between its steps: after each step, the step's latent runs again
    at P timesteps evenly spaced up to the next step's (P more transformer calls per step, so the
    calibration costs about 1 + P generations). A curve mapped onto another schedule (more steps, another
    shift) then follows the model's growth between the calibrated steps instead of a straight line
    (docs/design.md, "Probes"; docs/benchmarks.md measures both). 0 (default): no probes.

    ``parallel_group``: the ranks that shard one sequence; their sums are reduced, so each gets the
    whole sequence's curve ("auto": diffusers' context-parallel group, if any). ``data_group``: ranks
    that run different prompts × seeds; every one of them gets the curve of all their generations.
    Every rank of both groups must enter and leave the block (docs/multi-gpu.md).
    """
    if isinstance(probes, bool) or not isinstance(probes, numbers.Integral) or not 0 <= probes <= MAX_PROBES:
        raise UsageError(
            f"probes= is how many timesteps between two steps calibration measures the curve at: a whole number "
            f"from 0 (none) to {MAX_PROBES}, got {_kind(probes)}; e.g. magsdk.calibrate(pipe, probes=8)"
        )
    config = MagCacheConfig(calibrate=True)
    parallelism = Parallelism.of(parallel_group, data_group)
    handle = _attach(
        target, config, strategy, metadata, scheduler, CalibrationHandle, DEFAULT_KEEP_GENERATIONS, False, parallelism,
        int(probes),
    )
    assert isinstance(handle, CalibrationHandle)
    handle.parallelism = parallelism
    return handle


# -- helpers ----------------------------------------------------------------------------------------
def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile(module)`` wraps, so that the cache attaches to the real transformer."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else module


def _transformers_of(target: Any, caller: str = "magsdk.enable") -> tuple[list[tuple[str, torch.nn.Module]], Any]:
    if isinstance(target, torch.nn.Module) and not hasattr(target, "transformer"):
        bare = unwrap_compiled(target)
        _refuse_other_components(bare, caller)
        return [("transformer", bare)], None
    found = []
    for name in ("transformer", "transformer_2"):
        module = getattr(target, name, None)
        if isinstance(module, torch.nn.Module):
            found.append((name, unwrap_compiled(module)))
    if not found:
        raise UsageError(
            f"{caller}() needs a diffusers pipeline with a `.transformer` or a transformer nn.Module; "
            f"got {_kind(target)}"
            + (" (a hub id or folder: load it first, e.g. DiffusionPipeline.from_pretrained(...))"
               if isinstance(target, str) else "")
        )
    return found, getattr(target, "scheduler", None)


def _refuse_other_components(module: torch.nn.Module, caller: str) -> None:
    """A pipeline's VAE or text encoder runs once per generation, not once per step: nothing to skip. Attached,
    it would fail at its first call ("no blocks") or, with a first-call trace, cache a model that never repeats."""
    origin = type(module).__module__
    kind = None
    if origin.startswith("diffusers.models.autoencoders"):
        kind = "a VAE (it encodes or decodes latents once per generation)"
    elif origin.split(".")[0] == "transformers":
        kind = "a text or image encoder (it runs once per prompt)"
    if kind is not None:
        raise UsageError(
            f"{caller}() got {type(module).__name__}, {kind}; MagCache skips denoising steps of the diffusion "
            "transformer: pass the pipeline, or pipe.transformer"
        )


def _resolve_strategy(
    transformer: torch.nn.Module,
    strategy: StrategySource | None,
    metadata: MetadataSource | None,
    pipeline: Any = None,
) -> MagCacheStrategy:
    # The instance recognises its variant (which published model this is) from the pipeline when it
    # needs a curve; `strategy="wan2.1-t2v-14b"` names the variant itself (magsdk/variants.py).
    target = transformer if pipeline is None else pipeline
    if isinstance(strategy, MagCacheStrategy):
        return strategy
    if isinstance(strategy, type) and issubclass(strategy, MagCacheStrategy):
        _check_strategy_class(strategy, transformer, strategy.__name__)
        return strategy.for_target(target)
    if isinstance(strategy, str):
        from magsdk.variants import resolve_name

        cls, variant = resolve_name(strategy)
        _check_strategy_class(cls, transformer, repr(strategy))
        return cls.for_target(target, variant)
    registered = StrategyRegistry.get(type(transformer).__name__)
    if registered is not None:
        return registered.for_target(target)
    if metadata is not None:
        return MagCacheStrategy()
    return StrategyRegistry.require(type(transformer).__name__)()


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _check_arguments(config: Any, strategy: Any, metadata: Any) -> None:
    """Wrong types fail here, with what to pass, instead of deep inside (or, for ``strategy``, being ignored)."""
    if config is not None and not isinstance(config, MagCacheConfig):
        hint = " (a dict: magsdk.MagCacheConfig(**settings))" if isinstance(config, Mapping) else ""
        raise UsageError(f"config must be a magsdk.MagCacheConfig, got {_kind(config)}{hint}")
    if strategy is not None and not (
        isinstance(strategy, (MagCacheStrategy, str))
        or (isinstance(strategy, type) and issubclass(strategy, MagCacheStrategy))
    ):
        raise UsageError(
            f"strategy must be a variant or strategy name, a path/to/module.py, a MagCacheStrategy subclass or an "
            f"instance of one, got {_kind(strategy)}; `magsdk list` shows the names"
        )
    if metadata is None or isinstance(metadata, InspectionReport):
        return
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, BlockMetadata) for k, v in metadata.items()
    ):
        raise UsageError(
            "metadata must be an InspectionReport (magsdk.inspect.inspect_target(...), or `magsdk inspect ... "
            "--json` loaded with InspectionReport.model_validate_json) or a dict of block class name or group "
            f"path -> magsdk.BlockMetadata, got {_kind(metadata)}"
        )


def _check_strategy_class(cls: type[MagCacheStrategy], transformer: torch.nn.Module, named: str) -> None:
    """A strategy written for another transformer class finds no blocks, or the wrong ones: say which is which.

    Subclasses of its class are accepted; an instance (``strategy=SomeStrategy()``) is trusted as given, for a
    class that is built like the strategy's without being a subclass of it.
    """
    expected = cls.transformer_cls_name
    if not expected or any(base.__name__ == expected for base in type(transformer).__mro__):
        return
    actual = type(transformer).__name__
    own = StrategyRegistry.get(actual)
    fix = (f"leave strategy= out ({own.__name__} is registered for {actual})" if own is not None
           else f"run `magsdk scaffold --model <your model>` to make a strategy for {actual}")
    raise UsageError(
        f"strategy {named} is {cls.__name__}, written for {expected}, but this transformer is a {actual}: {fix}. "
        f"If {actual} is built like {expected} without being a subclass of it, pass an instance, "
        f"strategy={cls.__name__}(), to use it anyway"
    )


def _metadata_lookup(
    strategy: MagCacheStrategy, metadata: MetadataSource | None, transformer: torch.nn.Module
) -> dict[str, BlockMetadata]:
    # the strategy's metadata, registered block classes for those it lacks; given metadata wins
    lookup = strategy.metadata_lookup(transformer, check=metadata is None)
    if isinstance(metadata, InspectionReport):
        lookup.update(metadata.metadata_by_class())
        lookup.update({group.path: group.metadata for group in metadata.block_groups})
    elif metadata is not None:
        _check_metadata_keys(metadata, transformer)
        lookup.update(metadata)
    return lookup


def _check_metadata_keys(metadata: Mapping[str, BlockMetadata], transformer: torch.nn.Module) -> None:
    """A key that names no block class and no block list of this model would be ignored: a typo, or metadata
    written for another model, must not leave the strategy's conventions silently in charge."""
    classes = {type(m).__name__ for m in transformer.modules()}
    lists = (torch.nn.ModuleList, torch.nn.Sequential)
    paths = {name for name, m in transformer.named_modules() if isinstance(m, lists)}
    unknown = sorted(key for key in metadata if key not in classes and key not in paths)
    if unknown:
        named = ", ".join(sorted(p for p in paths if p)) or "none"
        raise UsageError(
            f"metadata names {', '.join(unknown)}: neither a block class nor a block list of "
            f"{type(transformer).__name__} (its block lists: {named}); key it by block class name or list path, "
            f"as `magsdk inspect {_inspect_target(type(transformer))} --json` reports them"
        )


def find_block_groups(
    transformer: torch.nn.Module, lookup: Mapping[str, BlockMetadata], paths: tuple[str, ...] = ()
) -> list[tuple[str, torch.nn.Module, BlockMetadata]]:
    """Blocks of the stack in execution order, with their metadata.

    ``paths`` (from a strategy or an inspection report) fixes the groups and their order;
    otherwise every ModuleList / Sequential whose members all have metadata is a group, in
    registration order. ``lookup`` is keyed by block class name or by group path (the path wins,
    for a block class used with two conventions).
    """
    containers: list[tuple[str, torch.nn.Module]] = []
    if paths:
        for path in paths:
            try:
                containers.append((path, transformer.get_submodule(path)))
            except AttributeError as exc:
                raise BlockLayoutError(
                    f"{type(transformer).__name__} has no block list at {path!r}; the strategy or report "
                    f"was made for another model. Run `magsdk inspect {_inspect_target(type(transformer))}` "
                    "on this one."
                ) from exc
    else:
        taken: list[str] = []
        for path, module in transformer.named_modules():
            if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) or len(module) == 0:
                continue
            if any(path.startswith(prefix + ".") for prefix in taken):
                continue
            if all(type(child).__name__ in lookup for child in module):
                containers.append((path, module))
                taken.append(path)
    blocks: list[tuple[str, torch.nn.Module, BlockMetadata]] = []
    for path, container in containers:
        members: list[torch.nn.Module] = list(container.children())
        for index, block in enumerate(members):
            meta = lookup.get(path) or lookup.get(type(block).__name__)  # per group first, then per class
            if meta is None:
                raise BlockLayoutError(
                    f"block {path}.{index} is a {type(block).__name__}, for which no metadata is known "
                    f"(known: {', '.join(sorted(lookup)) or 'none'}). Run "
                    f"`magsdk inspect {_inspect_target(type(transformer))}` for its conventions"
                )
            blocks.append((f"{path}.{index}", block, meta))
    if not blocks:
        raise BlockLayoutError(
            f"no transformer blocks found in {type(transformer).__name__} for the block classes "
            f"{', '.join(sorted(lookup)) or '(none)'}; run `magsdk inspect {_inspect_target(type(transformer))}` "
            "to find its blocks and their conventions"
        )
    return blocks


def _attach(
    target: Any,
    config: MagCacheConfig | None,
    strategy_source: StrategySource | None,
    metadata: MetadataSource | None,
    scheduler: Any,
    handle_cls: type[MagCacheHandle],
    keep_generations: int,
    auto_calibrate: bool = False,
    parallelism: Parallelism | None = None,
    probes: int = 0,
) -> MagCacheHandle:
    _check_arguments(config, strategy_source, metadata)
    caller = "magsdk.calibrate" if issubclass(handle_cls, CalibrationHandle) else "magsdk.enable"
    if scheduler is not None and not callable(getattr(scheduler, "set_timesteps", None)):
        raise UsageError(
            "scheduler= takes the diffusers scheduler your loop calls set_timesteps and step on (e.g. "
            f"pipe.scheduler), got {_kind(scheduler)}"
        )
    transformers, pipe_scheduler = _transformers_of(target, caller)
    followed = scheduler is None and pipe_scheduler is not None  # the pipeline's: followed when replaced
    scheduler = scheduler if scheduler is not None else pipe_scheduler
    if len(transformers) > 1 and (auto_calibrate or (config is not None and config.auto_calibrate)):
        # each transformer measures only its part of the run, and both key their curve alike (same class and
        # config): neither would ever find a curve to cache with
        raise UsageError(
            f"auto_calibrate does not support a pipeline with two transformers ({', '.join(n for n, _ in transformers)}"
            "): each runs part of the steps. Calibrate once instead: `with magsdk.calibrate(pipe) as cal: pipe(...)`, "
            "then `magsdk.enable(pipe, magsdk.MagCacheConfig(mag_ratios=cal.result))`"
        )
    stats = CacheStats(keep_generations=keep_generations)
    sessions: list[CacheSession] = []
    patches = Patches("magsdk.enable")
    link: SchedulerLink | None = None
    pending: list[Any] = []  # first-call tracers waiting for their call
    sources: dict[str, str] = {}
    # the budget planner's constraints as the user set them, before strategy defaults fill the config
    constraints = config_constraints(config) if config is not None else None
    strategy: MagCacheStrategy | None = None
    resolved_config: MagCacheConfig | None = None
    curves: CurveSource | None = None
    # Resolve everything first (no side effects): a bad strategy, variant or config then fails before a
    # handle already on these transformers is disabled, and the user keeps the cache they had.
    attachments: list[tuple[str, torch.nn.Module, MagCacheStrategy, MagCacheConfig, CurveSource | None,
                            MetadataSource | None, bool]] = []
    for name, transformer in transformers:
        meta = metadata
        registered = StrategyRegistry.get(type(transformer).__name__) if strategy_source is None else None
        unknown = strategy_source is None and registered is None
        if config is None and auto_calibrate:
            # measure the curve even where a strategy ships one (a fine-tune, another schedule): asked for
            defaults = registered or MagCacheStrategy
            config = MagCacheConfig(auto_calibrate=True, threshold=defaults.threshold,
                                    max_skip_steps=defaults.max_skip_steps,
                                    retention_ratio=defaults.retention_ratio)
        if unknown and meta is None and config is not None:
            # No strategy and no metadata: blocks registered by class, else inferred from the first call.
            meta = registry_metadata(transformer)
            sources[name] = "registry" if meta is not None else "inferred"
            if meta is None:
                from magsdk.runtime import autotrace

                meta = autotrace.known_report(transformer)
            if meta is None:
                attachments.append((name, transformer, MagCacheStrategy(), config, CurveSource.from_config(config),
                                    None, True))
                continue
        else:
            sources[name] = "given" if meta is not None else "strategy"
        resolved = _resolve_strategy(transformer, strategy_source, meta, pipeline=target)
        attachments.append((name, transformer, resolved, *_config_and_curves(resolved, config), meta, False))
    try:
        for _, transformer, *_ in attachments:  # a handle already here goes first (it patched the scheduler too)
            marker = transformer.__dict__.get(_SESSION_ATTR)
            if isinstance(marker, _HandleMarker):
                marker.handle.disable()
        if scheduler is not None and hasattr(scheduler, "set_timesteps"):
            link = SchedulerLink(scheduler, target if followed else None, patches)
        for name, transformer, strategy, resolved_config, curves, meta, traced in attachments:
            if traced:
                from magsdk.runtime import autotrace

                factory = functools.partial(
                    _new_session, transformer, name, strategy, resolved_config, curves, stats=stats,
                    link=link, parallelism=parallelism, probes=probes,
                )
                autotrace.trace_first_call(transformer, factory, sessions, pending)
                continue
            session = _new_session(
                transformer, name, strategy, resolved_config, curves, meta, stats=stats, link=link,
                constraints=constraints, parallelism=parallelism, probes=probes,
            )
            sessions.append(session)
    except BaseException:
        for session in sessions:
            session.detach()
        for tracer in pending:
            tracer.cancel()
        patches.restore()
        raise
    assert strategy is not None and resolved_config is not None
    handle = handle_cls(sessions, stats, resolved_config, strategy, patches, curves)
    handle.constraints = constraints
    handle.pending = pending
    handle.metadata_sources = sources
    handle.link = link
    if link is not None:
        link.subscribe(functools.partial(_start_generation, handle))
    for _, transformer in transformers:
        patches.set_value(transformer, _SESSION_ATTR, _HandleMarker(handle))
    if handle.blocks:
        logger.info("magsdk: MagCache on %s", ", ".join(handle.blocks[:1] + handle.blocks[-1:]))
    else:
        logger.info("magsdk: MagCache on %s; its blocks are found on its first call",
                    ", ".join(type(t).__name__ for _, t in transformers))
    return handle


def _config_and_curves(
    strategy: MagCacheStrategy, config: MagCacheConfig | None
) -> tuple[MagCacheConfig, CurveSource | None]:
    """The settings a session runs with, and every calibration it may choose a curve from.

    A config without ``mag_ratios`` (settings only, e.g. ``MagCacheConfig(speedup=2)``) runs on the strategy's
    curves; the strategy's (variant's) defaults fill the settings it leaves unset.
    """
    if config is None or (config.mag_ratios is None and not config.calibrate and not config.auto_calibrate):
        if config is not None and not strategy.calibrations and not strategy.variants:
            return config, None
        given = {} if config is None else {name: getattr(config, name) for name in config.model_fields_set}
        resolved = strategy.run_config(**given)  # the recognised variant's settings and curves
        entries = strategy.calibration_entries()
        return resolved, (CurveSource.from_entries(entries, resolved) if entries else None)
    return config, CurveSource.from_config(config)


def _new_session(
    transformer: torch.nn.Module,
    name: str,
    strategy: MagCacheStrategy,
    config: MagCacheConfig,
    curves: CurveSource | None,
    metadata: MetadataSource | None,
    *,
    stats: CacheStats,
    link: SchedulerLink | None,
    constraints: Constraints | None = None,
    parallelism: Parallelism | None = None,
    probes: int = 0,
) -> CacheSession:
    paths: tuple[str, ...] = strategy.block_groups
    if isinstance(metadata, InspectionReport):
        if metadata.ambiguous:  # never cache with guessed conventions
            from magsdk.inspect.infer import ambiguity_error

            raise BlockLayoutError(ambiguity_error(metadata))
        paths = tuple(group.path for group in metadata.block_groups)
    blocks = find_block_groups(transformer, _metadata_lookup(strategy, metadata, transformer), paths)
    auto = None
    if curves is None and config.auto_calibrate and not config.calibrate:
        if link is None and config.num_inference_steps is None:
            raise UsageError(
                f"auto_calibrate keys each curve by the run's step count, which a bare {type(transformer).__name__} "
                "does not tell: enable it on the pipeline (its scheduler says), or pass scheduler=pipe.scheduler or "
                "MagCacheConfig(auto_calibrate=True, num_inference_steps=N)"
            )
        auto = AutoCalibration(transformer, link, config)
    elif curves is None and not config.calibrate:
        raise BlockLayoutError(
            f"{type(transformer).__name__}: no curve to decide with; pass MagCacheConfig(mag_ratios=...), a calibrated "
            "strategy, or auto_calibrate=True"
        )
    session = CacheSession(
        transformer,
        blocks,
        config,
        curves,
        strategy,
        stats,
        name=name,
        link=link,
        auto=auto,
        constraints=constraints,
    )
    if probes and session._timestep is None:
        session.detach()  # nothing of it is kept: the handle is never made
        raise UsageError(
            f"probes={probes}: {type(transformer).__name__}.forward has no timestep argument to move between steps; "
            "calibrate without probes (probes=0)"
        )
    session.probes = probes
    distributed.link(session, parallelism)
    return session


def registry_metadata(transformer: torch.nn.Module) -> dict[str, BlockMetadata] | None:
    """Metadata of the transformer's block lists whose classes are registered (one registration per block class
    serves every transformer built from it), or None when none is."""
    from magsdk.inspect.trace import find_block_containers

    known = {}
    for container in find_block_containers(transformer):
        metadata = TransformerBlockRegistry.get(container.block_class)
        if metadata is not None:
            known[container.block_class] = metadata
    return known or None


@eager
def _start_generation(handle: MagCacheHandle, passed: dict[str, Any], swapped: bool) -> None:
    """A pipeline set new timesteps (or was given a new scheduler): every session starts a generation."""
    for session in handle.sessions:
        session.reset()
        session.set_timesteps_kwargs = passed
        if handle.link is not None:  # the scheduler runs are set up on: followed again after a fallback
            session.tracker.probe = handle.link.probe
