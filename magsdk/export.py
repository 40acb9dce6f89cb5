"""Hand magsdk's curves, plans and block metadata to users who stay on another engine.

- ``to_diffusers_config``: a ``diffusers.hooks.MagCacheConfig`` whose curve is already the one magsdk
  follows at the run's step count (taken from ``magsdk.plan``, the one place that maps a curve onto
  a run), so diffusers' own MagCache makes the same decisions.
- ``register_with_diffusers``: magsdk's block metadata (from a strategy or an ``InspectionReport``)
  written into diffusers' own ``TransformerBlockRegistry``, so diffusers' MagCache and
  FirstBlockCache run on transformers its hand-kept table lacks.
- ``to_cache_dit``: the skip plan as cache-dit's steps computation mask (one 0/1 per step) with the
  settings that make cache-dit follow the mask and nothing else.

diffusers and cache-dit are imported only when an export is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from magsdk.config import DEFAULT_BRANCH, BlockMetadata, InspectionReport, MagCacheConfig
from magsdk.errors import UsageError
from magsdk.ratios import SkipPlan, plan
from magsdk.strategy import MagCacheStrategy

StrategyOrConfig = MagCacheConfig | MagCacheStrategy | type[MagCacheStrategy] | str
MetadataSource = InspectionReport | MagCacheStrategy | type[MagCacheStrategy] | str | Mapping[str, BlockMetadata]

#: Child names under which diffusers' hooks look for block lists (diffusers.hooks._common).
DIFFUSERS_BLOCK_LIST_NAMES = ("blocks", "transformer_blocks", "single_transformer_blocks", "layers",
                              "temporal_transformer_blocks")


# -- configs and plans ------------------------------------------------------------------------------
def resolve_config(source: StrategyOrConfig, num_inference_steps: int) -> MagCacheConfig:
    """The config a run of ``num_inference_steps`` uses: as given, or the strategy's (variant's) default."""
    if num_inference_steps < 1:
        raise UsageError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if isinstance(source, MagCacheConfig):
        config = source
    elif isinstance(source, MagCacheStrategy):
        config = source.run_config(num_inference_steps)
    elif isinstance(source, type) and issubclass(source, MagCacheStrategy):
        config = source.default_config(num_inference_steps)
    elif isinstance(source, str):
        from magsdk.variants import resolve_name

        cls, variant = resolve_name(source)
        config = cls.default_config(num_inference_steps, variant=variant)
    else:
        raise UsageError(
            "export needs a MagCacheConfig, a strategy (class, instance or name) or a variant name; "
            f"got {type(source).__name__}"
        )
    if config.mag_ratios is None:
        raise UsageError("a calibration config (calibrate=True) has no curve to export; pass mag_ratios")
    return config


def export_plan(
    source: StrategyOrConfig, num_inference_steps: int, branch: str = DEFAULT_BRANCH,
    timesteps: Sequence[float] | None = None,
) -> SkipPlan:
    """The plan magsdk follows for ``branch`` of a ``num_inference_steps`` run of ``source``.

    ``timesteps``: the run's scheduler timesteps, when they differ from the calibration's own schedule
    rebuilt at that step count (another shift or resolution).
    """
    config = resolve_config(source, num_inference_steps)
    return plan(None, config, num_inference_steps, branch=branch, timesteps=timesteps)


def to_diffusers_config(
    strategy_or_config: StrategyOrConfig, num_inference_steps: int, *, branch: str = DEFAULT_BRANCH,
    timesteps: Sequence[float] | None = None,
) -> Any:
    """A ``diffusers.hooks.MagCacheConfig`` that makes diffusers skip exactly the steps magsdk skips.

    Its ``mag_ratios`` are ``magsdk.plan(...).curve``: the curve already mapped to the run (its step
    count and, with ``timesteps``, its schedule; diffusers does not resample a curve of the right
    length). Use it for that run only; diffusers keeps one state per ``cache_context``, so each CFG
    branch follows this curve. diffusers' retention counts the run's steps, as magsdk's does whenever
    the run's step count is known, so diffusers computes the steps magsdk's plan computes.
    """
    DiffusersMagCacheConfig = _diffusers_mag_cache_config()
    config = resolve_config(strategy_or_config, num_inference_steps)
    skip_plan = plan(None, config, num_inference_steps, branch=branch, timesteps=timesteps)
    return DiffusersMagCacheConfig(
        threshold=config.threshold,
        max_skip_steps=config.max_skip_steps,
        retention_ratio=_index_retention(skip_plan, config.retention_ratio),
        num_inference_steps=num_inference_steps,
        mag_ratios=list(skip_plan.curve),
    )


def _diffusers_mag_cache_config() -> Any:
    """diffusers' ``MagCacheConfig`` class: diffusers added its MagCache in 0.37.0, magsdk supports older releases."""
    try:
        from diffusers.hooks import MagCacheConfig
    except ImportError:
        import diffusers

        raise UsageError(
            f"diffusers {diffusers.__version__} has no MagCache to export to (diffusers.hooks.MagCacheConfig "
            "arrived in diffusers 0.37.0): pip install 'diffusers>=0.37', or run the cache with magsdk.enable(), "
            "which works on this diffusers"
        ) from None
    return MagCacheConfig


def _index_retention(skip_plan: SkipPlan, ratio: float) -> float:
    """A retention ratio that makes diffusers (``int(r·n + 0.5)`` steps) keep the steps magsdk's plan keeps."""
    retained, steps = skip_plan.retained_steps, skip_plan.num_steps
    if retained is None or int(ratio * steps + 0.5) == retained:
        return ratio
    return min(max(0.0, (retained - 0.25) / steps), 0.999)


# -- diffusers' TransformerBlockRegistry ------------------------------------------------------------
class DiffusersRegistration(BaseModel):
    """What ``register_with_diffusers`` did, per block class."""

    model_config = ConfigDict(extra="forbid")

    registered: list[str] = Field(default_factory=list)
    #: Block classes diffusers already had an entry for (kept unless ``replace=True``).
    kept: list[str] = Field(default_factory=list)
    #: Block groups diffusers' hooks will not find (not a direct child named like diffusers expects).
    unreachable_groups: list[str] = Field(default_factory=list)


def _metadata_of(source: MetadataSource) -> tuple[dict[str, BlockMetadata], str | None, list[str]]:
    """(block class → metadata, transformer class name, block group paths) of any metadata source."""
    if isinstance(source, InspectionReport):
        return source.metadata_by_class(), source.transformer, [g.path for g in source.block_groups]
    if isinstance(source, str):
        from magsdk.variants import resolve_name

        source, _ = resolve_name(source)
    if isinstance(source, MagCacheStrategy) or (isinstance(source, type) and issubclass(source, MagCacheStrategy)):
        return dict(source.block_metadata), source.transformer_cls_name or None, list(source.block_groups)
    if isinstance(source, Mapping):
        return dict(source), None, []
    raise UsageError(
        "register_with_diffusers needs an InspectionReport, a strategy (class, instance or name) or a "
        f"mapping block class -> BlockMetadata; got {type(source).__name__}"
    )


def _diffusers_metadata(name: str, meta: BlockMetadata) -> Any:
    from diffusers.hooks._helpers import TransformerBlockMetadata

    if meta.output_kind in ("dict", "dataclass"):
        raise UsageError(
            f"{name} returns a {meta.output_kind}; diffusers' hooks read tuple or tensor block outputs only, "
            "so its MagCache cannot run on this block. Use magsdk.enable() instead."
        )
    if meta.fused_sequence_order == "image_text":
        raise UsageError(
            f"{name} returns one fused [image; text] sequence; diffusers' hooks assume the image tokens come "
            "last and would cache the wrong slice. Use magsdk.enable() instead."
        )
    values: dict[str, Any] = {
        "return_hidden_states_index": meta.return_hidden_states_index,
        "return_encoder_hidden_states_index": meta.return_encoder_hidden_states_index,
        "hidden_states_argument_name": meta.hidden_states_argument_name,
    }
    if meta.encoder_hidden_states_argument_name is not None:
        values["encoder_hidden_states_argument_name"] = meta.encoder_hidden_states_argument_name
    # diffusers < 0.37 has no argument-name fields: its hooks read the arguments named `hidden_states` and
    # `encoder_hidden_states`, so a block that calls them that needs no field, and any other block cannot run there
    fields = {f.name for f in dataclasses.fields(TransformerBlockMetadata)}
    for key in [k for k in values if k.endswith("_argument_name") and k not in fields]:
        given, expected = values.pop(key), key.removesuffix("_argument_name")
        if given != expected:
            import diffusers

            raise UsageError(
                f"{name} takes its {expected.replace('_', ' ')} as the argument {given!r}, but diffusers "
                f"{diffusers.__version__}'s hooks only read one named {expected!r} ({key} arrived in diffusers "
                "0.37.0): pip install 'diffusers>=0.37', or use magsdk.enable()"
            )
    return TransformerBlockMetadata(**values)


def _block_classes(names: list[str], transformer: str | None, model: Any) -> dict[str, type]:
    """Block class name → class: from the model's modules, else from the transformer's diffusers module."""
    found: dict[str, type] = {}
    if model is not None:
        root = getattr(model, "transformer", None) or model
        roots = [root, getattr(model, "transformer_2", None)]
        for module in (m for r in roots if r is not None for m in r.modules()):
            if type(module).__name__ in names:
                found.setdefault(type(module).__name__, type(module))
    missing = [n for n in names if n not in found]
    if missing and transformer:
        import diffusers

        cls = getattr(diffusers, transformer, None)
        home = sys.modules.get(cls.__module__) if isinstance(cls, type) else None
        for name in missing:
            candidate = getattr(home, name, None) if home is not None else None
            if isinstance(candidate, type):
                found[name] = candidate
    missing = [n for n in names if n not in found]
    if missing:
        where = f"the module of diffusers.{transformer}" if transformer else "the given metadata"
        raise UsageError(
            f"cannot find the block class(es) {', '.join(missing)} in {where}; pass the model, "
            "register_with_diffusers(source, model=pipe_or_transformer), so they are read from its modules"
        )
    return found


def register_with_diffusers(
    report_or_strategy: MetadataSource, model: Any = None, *, replace: bool = False
) -> DiffusersRegistration:
    """Write magsdk's block metadata into ``diffusers.hooks._helpers.TransformerBlockRegistry``.

    diffusers keys its table by block class, so one registration serves every transformer that
    uses the class. Classes diffusers already knows are kept unless ``replace`` (magsdk's inferred
    entries differ from diffusers' where diffusers' table is wrong, see docs/inspect.md).
    """
    from diffusers.hooks._helpers import TransformerBlockRegistry as DiffusersRegistry

    metadata, transformer, groups = _metadata_of(report_or_strategy)
    if not metadata:
        raise UsageError("no block metadata to register (the strategy or report has no block classes)")
    converted = {name: _diffusers_metadata(name, meta) for name, meta in metadata.items()}
    classes = _block_classes(list(metadata), transformer, model)
    DiffusersRegistry._register()  # diffusers fills its own table lazily; fill it first so ours is not overwritten
    result = DiffusersRegistration(
        unreachable_groups=[g for g in groups if g not in DIFFUSERS_BLOCK_LIST_NAMES],
    )
    for name, cls in classes.items():
        if cls in DiffusersRegistry._registry and not replace:
            result.kept.append(name)
            continue
        DiffusersRegistry.register(model_class=cls, metadata=converted[name])
        result.registered.append(name)
    return result


# -- cache-dit --------------------------------------------------------------------------------------
class CacheDitExport(BaseModel):
    """The skip plan as cache-dit's steps computation mask, with the settings that make cache-dit obey it.

    ``steps_computation_policy="static"`` makes every 0 of the mask reuse the cache whatever the
    measured difference, and every 1 compute; warmup and the cached-step limits are set so they
    never overrule the mask. cache-dit always runs its first ``Fn_compute_blocks`` block(s) (at
    least 1) even on a cached step: the rest of the stack follows the mask.
    """

    model_config = ConfigDict(extra="forbid")

    num_inference_steps: int
    steps_computation_mask: list[int]
    settings: dict[str, Any]

    def config(self, **overrides: Any) -> Any:
        """A ``cache_dit.DBCacheConfig`` (cache-dit must be installed: ``pip install cache-dit``)."""
        try:
            cache_dit = importlib.import_module("cache_dit")
        except ImportError as exc:
            raise UsageError("cache-dit is not installed; `pip install cache-dit` (or magsdk[bench])") from exc
        return cache_dit.DBCacheConfig(**{**self.settings, **overrides})


def to_cache_dit(
    strategy_or_config: StrategyOrConfig, num_inference_steps: int, *, branch: str = DEFAULT_BRANCH,
    timesteps: Sequence[float] | None = None,
) -> CacheDitExport:
    """cache-dit settings that compute exactly the steps magsdk's plan computes."""
    skip_plan = export_plan(strategy_or_config, num_inference_steps, branch, timesteps)
    computed = set(skip_plan.computed_steps)
    mask = [1 if step in computed else 0 for step in range(num_inference_steps)]
    leading = next((i for i, m in enumerate(mask) if m == 0), len(mask))
    settings = {
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 0,
        "max_warmup_steps": leading,
        "warmup_interval": 1,
        "max_cached_steps": -1,
        "max_continuous_cached_steps": -1,
        "num_inference_steps": num_inference_steps,
        "steps_computation_mask": mask,
        "steps_computation_policy": "static",
    }
    return CacheDitExport(num_inference_steps=num_inference_steps, steps_computation_mask=mask, settings=settings)
