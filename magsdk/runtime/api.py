"""``magsdk.enable`` and ``magsdk.calibrate``: attach a cache session to a pipeline or transformer."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch

from magsdk.config import BlockMetadata, CalibrationResult, InspectionReport, MagCacheConfig
from magsdk.errors import BlockLayoutError, UsageError
from magsdk.ratios import SkipPlan, plan
from magsdk.registry import StrategyRegistry
from magsdk.runtime.session import CacheSession, CurveProvider, make_curve_provider
from magsdk.runtime.stats import CacheStats
from magsdk.runtime.steps import scheduler_probe
from magsdk.strategy import MagCacheStrategy

logger = logging.getLogger("magsdk")

_SESSION_ATTR = "_magsdk_session"
_ABSENT = object()

MetadataSource = InspectionReport | Mapping[str, BlockMetadata]
StrategySource = MagCacheStrategy | type[MagCacheStrategy] | str


class MagCacheHandle:
    """What ``enable`` returns: statistics, ``disable()``, and a context manager that disables on exit."""

    def __init__(
        self,
        sessions: list[CacheSession],
        stats: CacheStats,
        config: MagCacheConfig,
        strategy: MagCacheStrategy,
        restore: list[tuple[Any, str, Any]],
    ) -> None:
        self.sessions = sessions
        self.stats = stats
        self.config = config
        self.strategy = strategy
        self._restore = restore
        self.active = True
        self.scheduler: Any = None

    @property
    def blocks(self) -> list[str]:
        """Paths of the hooked blocks, with their role (head, tail, middle)."""
        return [f"{b.path} ({b.role})" for s in self.sessions for b in s.blocks]

    def plan(self, num_steps: int, branch: str = "default") -> SkipPlan:
        """The schedule this handle will follow for a ``num_steps`` run of ``branch``."""
        curves = self.sessions[0].curves if self.sessions else _curves_of(self.config)
        if curves is None:
            raise UsageError("a calibration handle does not skip; it has no plan")
        curve = curves(branch, 0, num_steps)
        return plan(curve, self.config, num_steps)

    def reset(self) -> None:
        for session in self.sessions:
            session.reset()

    def disable(self) -> None:
        if not self.active:
            return
        for session in self.sessions:
            session.detach()
            session.transformer.__dict__.pop(_SESSION_ATTR, None)
        _undo(self._restore)
        self.active = False

    def __enter__(self) -> MagCacheHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disable()


class CalibrationHandle(MagCacheHandle):
    """``with magsdk.calibrate(pipe) as cal: pipe(...)``; then ``cal.result`` is a ``CalibrationResult``."""

    result: CalibrationResult | None = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self.result = self.collect()
        finally:
            self.disable()

    def collect(self) -> CalibrationResult:
        if not self.sessions:  # a traced transformer gets its session at its first call: there was none
            raise BlockLayoutError("calibration recorded nothing: no generation ran inside `magsdk.calibrate(...)`")
        results = [s.calibration_result() for s in self.sessions]
        result = results[0]
        for extra, session in zip(results[1:], self.sessions[1:], strict=True):
            for name, branch in extra.branches.items():
                result.branches[f"{session.name}:{name}"] = branch
        result.num_steps = max(len(b.norm_ratios) for b in result.branches.values())
        if self.scheduler is not None:
            result.scheduler = type(self.scheduler).__name__
        return result


def enable(
    target: Any,
    config: MagCacheConfig | None = None,
    *,
    strategy: StrategySource | None = None,
    metadata: MetadataSource | None = None,
    scheduler: Any = None,
) -> MagCacheHandle:
    """Attach MagCache to a pipeline (anything with ``.transformer``) or a transformer module.

    With no config and no strategy, the strategy registered for the transformer's class is used.
    Enabling twice replaces the first session (never stacks hooks).
    """
    return _attach(target, config, strategy, metadata, scheduler, MagCacheHandle)


def calibrate(
    target: Any,
    *,
    strategy: StrategySource | None = None,
    metadata: MetadataSource | None = None,
    scheduler: Any = None,
) -> CalibrationHandle:
    """Record norm ratios, stds, cosine distances and timesteps per branch and step; never skips."""
    handle = _attach(target, MagCacheConfig(calibrate=True), strategy, metadata, scheduler, CalibrationHandle)
    assert isinstance(handle, CalibrationHandle)
    return handle


# -- helpers ----------------------------------------------------------------------------------------
def _transformers_of(target: Any) -> tuple[list[tuple[str, torch.nn.Module]], Any]:
    if isinstance(target, torch.nn.Module) and not hasattr(target, "transformer"):
        return [("transformer", target)], None
    found = []
    for name in ("transformer", "transformer_2"):
        module = getattr(target, name, None)
        if isinstance(module, torch.nn.Module):
            found.append((name, module))
    if not found:
        raise UsageError(
            f"magsdk.enable() needs a diffusers pipeline with a `.transformer` or a transformer nn.Module; "
            f"got {type(target).__name__}"
        )
    return found, getattr(target, "scheduler", None)


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
        return strategy.for_target(target)
    if isinstance(strategy, str):
        from magsdk.variants import resolve_name

        cls, variant = resolve_name(strategy)
        return cls.for_target(target, variant)
    registered = StrategyRegistry.get(type(transformer).__name__)
    if registered is not None:
        return registered.for_target(target)
    if metadata is not None:
        return MagCacheStrategy()
    return StrategyRegistry.require(type(transformer).__name__)()


def _metadata_lookup(strategy: MagCacheStrategy, metadata: MetadataSource | None) -> dict[str, BlockMetadata]:
    lookup = dict(strategy.block_metadata)
    if isinstance(metadata, InspectionReport):
        lookup.update(metadata.metadata_by_class())
        lookup.update({group.path: group.metadata for group in metadata.block_groups})
    elif metadata is not None:
        lookup.update(metadata)
    return lookup


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
                    "was made for another model. Run `magsdk inspect` on this one."
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
                    f"(known: {', '.join(sorted(lookup)) or 'none'}). Run `magsdk inspect` on the transformer."
                )
            blocks.append((f"{path}.{index}", block, meta))
    if not blocks:
        raise BlockLayoutError(
            f"no transformer blocks found in {type(transformer).__name__} for the block classes "
            f"{', '.join(sorted(lookup)) or '(none)'}; run `magsdk inspect {type(transformer).__name__}` "
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
) -> MagCacheHandle:
    transformers, pipe_scheduler = _transformers_of(target)
    scheduler = scheduler if scheduler is not None else pipe_scheduler
    stats = CacheStats()
    sessions: list[CacheSession] = []
    restore: list[tuple[Any, str, Any]] = []
    strategy: MagCacheStrategy | None = None
    resolved_config: MagCacheConfig | None = None
    try:
        for name, transformer in transformers:
            previous = transformer.__dict__.get(_SESSION_ATTR)
            if previous is not None:
                previous.disable()
            meta = metadata
            if strategy_source is None and meta is None and config is not None and (
                StrategyRegistry.get(type(transformer).__name__) is None
            ):
                # No strategy and no metadata: infer the block conventions from the first real call.
                from magsdk.runtime import autotrace

                meta = autotrace.known_report(transformer)
                if meta is None:
                    strategy, resolved_config = MagCacheStrategy(), config
                    factory = functools.partial(
                        _new_session, transformer, name, strategy, config, stats=stats, scheduler=scheduler
                    )
                    autotrace.trace_first_call(transformer, factory, sessions, restore, _ABSENT)
                    continue
            strategy = _resolve_strategy(transformer, strategy_source, meta, pipeline=target)
            session = _new_session(transformer, name, strategy, config, meta, stats=stats, scheduler=scheduler)
            resolved_config = session.config
            sessions.append(session)
    except BaseException:
        for session in sessions:
            session.detach()
        _undo(restore)
        raise
    assert strategy is not None and resolved_config is not None
    if scheduler is not None and hasattr(scheduler, "set_timesteps"):
        restore.append((scheduler, "set_timesteps", scheduler.__dict__.get("set_timesteps", _ABSENT)))
        scheduler.set_timesteps = _new_generation_on(scheduler.set_timesteps, sessions)
    handle = handle_cls(sessions, stats, resolved_config, strategy, restore)
    handle.scheduler = scheduler
    for _, transformer in transformers:
        transformer.__dict__[_SESSION_ATTR] = handle
        restore.append((transformer, _SESSION_ATTR, _ABSENT))
    logger.info("magsdk: MagCache on %s", ", ".join(handle.blocks[:1] + handle.blocks[-1:]))
    return handle


def _new_session(
    transformer: torch.nn.Module,
    name: str,
    strategy: MagCacheStrategy,
    config: MagCacheConfig | None,
    metadata: MetadataSource | None,
    *,
    stats: CacheStats,
    scheduler: Any,
) -> CacheSession:
    if config is None:
        resolved_config = strategy.run_config()
        tables = [(e.num_steps, e.branches) for e in strategy.calibration_entries()]
    else:
        resolved_config = config
        tables = _tables_of(config)
    paths: tuple[str, ...] = strategy.block_groups
    if isinstance(metadata, InspectionReport):
        paths = tuple(group.path for group in metadata.block_groups)
    blocks = find_block_groups(transformer, _metadata_lookup(strategy, metadata), paths)
    return CacheSession(
        transformer,
        blocks,
        resolved_config,
        make_curve_provider(tables, resolved_config.per_branch_curves) if tables else None,
        strategy,
        stats,
        name=name,
        probe=scheduler_probe(scheduler) if scheduler is not None else None,
    )


def _tables_of(config: MagCacheConfig) -> list[tuple[int, dict[str, list[float]]]]:
    """A config's curves as a one-entry calibration table, keyed by their step count."""
    ratios = config.mag_ratios
    return [(max(len(c) for c in ratios.values()), ratios)] if ratios else []


def _curves_of(config: MagCacheConfig) -> CurveProvider | None:
    tables = _tables_of(config)
    return make_curve_provider(tables, config.per_branch_curves) if tables else None


def _undo(restore: list[tuple[Any, str, Any]]) -> None:
    """Put back every patched attribute, last patched first."""
    for obj, attr, previous in reversed(restore):
        if previous is _ABSENT:
            obj.__dict__.pop(attr, None)
        else:
            setattr(obj, attr, previous)
    restore.clear()


def _new_generation_on(set_timesteps: Any, sessions: list[CacheSession]) -> Any:
    """A pipeline that sets new timesteps is starting a generation: say so to every session."""

    @functools.wraps(set_timesteps)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for session in sessions:
            session.reset()
        return set_timesteps(*args, **kwargs)

    return wrapper
