"""``MagCacheStrategy``: everything magsdk needs to know about one transformer class.

A strategy is plain data (block metadata, default settings, calibrated curves) plus two small
overridable methods for models whose residual is not simply ``x_out - x_in``. Defining a
subclass with a ``transformer_cls_name`` registers it; ``strategies/`` holds one module each.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from magsdk.config import BlockMetadata, CalibrationEntry, MagCacheConfig, StrategyVariant
from magsdk.errors import BlockLayoutError, UsageError
from magsdk.ratios import select_calibration
from magsdk.registry import StrategyRegistry


class NoCalibrationError(UsageError, BlockLayoutError):
    """Nothing to decide skips with: no calibration was shipped, or none was recorded.

    A ``UsageError`` (the user's next step fixes it: calibrate, or pass a curve); also a
    ``BlockLayoutError``, which it was raised as before, so that code catching that keeps working.
    """


def load_calibrations(raw: Sequence[Mapping[str, Any]]) -> list[CalibrationEntry]:
    """Validate the calibration literal of a strategy module (the part codegen rewrites)."""
    return [CalibrationEntry.model_validate(dict(entry)) for entry in raw]


def load_variants(raw: Sequence[Mapping[str, Any]]) -> list[StrategyVariant]:
    """Validate the ``VARIANTS`` literal of a strategy module (published models, their curves and rules)."""
    return [StrategyVariant.model_validate(dict(entry)) for entry in raw]


def _registered_block_metadata(block_class: str) -> BlockMetadata | None:
    """``TransformerBlockRegistry``'s metadata for a block class, after discovering the strategies if needed."""
    from magsdk.registry import TransformerBlockRegistry, discover_strategies

    found = TransformerBlockRegistry.get(block_class)
    if found is None:
        discover_strategies()
        found = TransformerBlockRegistry.get(block_class)
    return found


def _registered_block_classes() -> list[str]:
    from magsdk.registry import TransformerBlockRegistry

    return TransformerBlockRegistry.names()


def _source_of(cls: type) -> str | None:
    """The file that defines ``cls`` (also for a module imported from a path and gone from sys.modules)."""
    try:
        found = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        found = None
    if found is None:
        for value in vars(cls).values():
            code = getattr(value, "__code__", None)
            if code is not None and Path(code.co_filename).is_file():
                return str(code.co_filename)
    return found


def _inspect_target(transformer_cls: type) -> str:
    """A ``magsdk inspect`` target for a transformer class: its name for diffusers', else FILE.py:Class."""
    if transformer_cls.__module__.split(".")[0] == "diffusers":
        return transformer_cls.__name__
    where = _source_of(transformer_cls)
    return f"{where}:{transformer_cls.__qualname__}" if where else transformer_cls.__name__


class MagCacheStrategy:
    """Base class; subclasses set the class attributes below and are registered on definition."""

    #: ``type(transformer).__name__`` this strategy applies to.
    transformer_cls_name: ClassVar[str] = ""
    #: Block class name → metadata, for every block class in the block stack.
    block_metadata: ClassVar[dict[str, BlockMetadata]] = {}
    #: Attribute paths of the block lists in execution order; empty means "find them".
    block_groups: ClassVar[tuple[str, ...]] = ()
    threshold: ClassVar[float] = 0.06
    max_skip_steps: ClassVar[int] = 3
    retention_ratio: ClassVar[float] = 0.2
    #: Calibrated curves, several step counts and branches allowed.
    calibrations: ClassVar[list[CalibrationEntry]] = []
    #: Published models served by this strategy, each with its own curves and settings. A strategy's
    #: own ``calibrations`` (``magsdk calibrate``) win over its variants unless a variant is asked for.
    variants: ClassVar[list[StrategyVariant]] = []

    #: The variant this instance runs with (None: not chosen yet, or the class's own calibrations).
    variant: StrategyVariant | None = None
    #: The pipeline or transformer the variant is recognised from (``for_target``).
    target: Any = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.transformer_cls_name:
            StrategyRegistry.register(cls)

    # -- variants -------------------------------------------------------------------------------
    @classmethod
    def for_target(cls, target: Any, variant: str | StrategyVariant | None = None) -> MagCacheStrategy:
        """An instance that recognises its variant from ``target`` (a pipeline or transformer) when needed."""
        instance = cls()
        instance.target = target
        if variant is not None:
            instance.variant = cls.variant_named(variant)
        return instance

    @classmethod
    def variant_named(cls, name: str | StrategyVariant) -> StrategyVariant:
        if isinstance(name, StrategyVariant):
            return name
        for variant in cls.variants:
            if variant.name == name:
                return variant
        known = ", ".join(v.name for v in cls.variants) or "(none)"
        raise UsageError(
            f"{cls.__name__} has no variant {name!r}; its variants are: {known}. `magsdk list` shows them "
            "with how each is recognised."
        )

    def resolved_variant(self) -> StrategyVariant | None:
        """The variant this instance runs with; recognised from ``target`` on first use.

        None when the strategy has no variants or carries calibrations of its own (they win unless a
        variant was asked for by name).
        """
        if self.variant is None and self.variants and not self.calibrations:
            from magsdk.variants import select_variant  # variants.py imports this module

            self.variant = select_variant(type(self), self.target)
        return self.variant

    def calibration_entries(self) -> list[CalibrationEntry]:
        """The calibrations a run of this instance follows: its variant's, else the class's own."""
        variant = self.resolved_variant()
        return list(variant.calibrations if variant is not None else self.calibrations)

    def run_config(self, num_steps: int | None = None, **overrides: Any) -> MagCacheConfig:
        """``default_config`` for this instance's variant."""
        return type(self).default_config(num_steps, variant=self.resolved_variant(), **overrides)

    # -- settings -------------------------------------------------------------------------------
    @classmethod
    def default_config(
        cls, num_steps: int | None = None, *, variant: str | StrategyVariant | None = None, **overrides: Any
    ) -> MagCacheConfig:
        """A config holding the calibration closest to ``num_steps`` and the default settings.

        With ``variant`` (a name or object), that variant's curves and settings. Without, the class's
        own calibrations; a strategy that has none but has variants uses the one that needs no
        recognising (its only variant, or its default) and otherwise says which to choose.
        """
        chosen = cls.variant_named(variant) if variant is not None else None
        if chosen is None and not cls.calibrations and cls.variants:
            from magsdk.variants import select_variant  # variants.py imports this module

            chosen = select_variant(cls, None)
        entries = chosen.calibrations if chosen is not None else cls.calibrations
        if not entries:
            where = _source_of(cls)
            command = (
                f"`magsdk calibrate {where} --model MODEL --steps N` (MODEL: your pipeline folder or hub id, N: "
                f"your run's steps) writes one into {where}; "
                if where else ""
            )
            raise NoCalibrationError(
                f"strategy {cls.__name__} has no calibration yet, so it has no curve to decide skips with. "
                f"{command}or pass a curve: magsdk.MagCacheConfig(mag_ratios=...), e.g. the result of "
                "`with magsdk.calibrate(pipe) as cal: pipe(...)` (cal.result); or enable with auto_calibrate=True "
                "to measure one during the first generation"
            )
        entry = select_calibration(entries, num_steps)
        stamps = entry.timesteps if entry.timesteps and None not in entry.timesteps else None
        values: dict[str, Any] = {
            "mag_ratios": entry.branches,
            "timesteps": stamps,
            "schedule": entry.schedule,
            "probes": entry.probes or None,
            "threshold": cls.threshold if chosen is None else chosen.threshold,
            "max_skip_steps": cls.max_skip_steps if chosen is None else chosen.max_skip_steps,
            "retention_ratio": cls.retention_ratio if chosen is None else chosen.retention_ratio,
        }
        values.update(overrides)
        return MagCacheConfig(**values)

    # -- block metadata -------------------------------------------------------------------------
    def metadata_lookup(self, transformer: torch.nn.Module, *, check: bool = True) -> dict[str, BlockMetadata]:
        """Block class (or group path) → metadata for the blocks of ``transformer`` this strategy caches.

        The strategy's own ``block_metadata`` first; a block class it has none for takes the metadata
        registered for that class (``TransformerBlockRegistry``: every bundled strategy registers its
        blocks), as for a transformer that has no strategy. The blocks are those of ``block_groups``, or
        with none given and no ``block_metadata`` either, the block lists found in the transformer.
        ``check``: a block class with neither raises ``BlockLayoutError`` saying what to add.
        """
        lookup = dict(self.block_metadata)
        unknown: set[str] = set()  # looked up once per class, not once per block (a lookup may run discovery)
        for path, block_class in self._block_classes(transformer):
            if path in lookup or block_class in lookup or block_class in unknown:
                continue
            registered = _registered_block_metadata(block_class)
            if registered is not None:
                lookup[block_class] = registered
            elif check:
                raise BlockLayoutError(self._no_metadata_message(transformer, path, block_class))
            else:
                unknown.add(block_class)
        return lookup

    def _block_classes(self, transformer: torch.nn.Module) -> list[tuple[str, str]]:
        """(block path, block class name) of each block in the groups the strategy caches."""
        found: list[tuple[str, str]] = []
        if self.block_groups:
            for path in self.block_groups:
                try:
                    container = transformer.get_submodule(path)
                except AttributeError:
                    continue  # find_block_groups says the path is missing
                found.extend((path, type(block).__name__) for block in container.children())
        elif not self.block_metadata:
            from magsdk.inspect.trace import find_block_containers

            found.extend((c.path, c.block_class) for c in find_block_containers(transformer))
        return found

    def _no_metadata_message(self, transformer: torch.nn.Module, path: str, block_class: str) -> str:
        cls = type(self)
        where = _source_of(cls)
        model = _inspect_target(type(transformer))
        fields = "".join(f"            {name}=...,\n" for name in BlockMetadata.model_fields)
        return (
            f"strategy {cls.__name__} has no block_metadata for {block_class} (the blocks of "
            f"{type(transformer).__name__}.{path}), and no metadata is registered for that block class either "
            f"(registered: {', '.join(_registered_block_classes()) or 'none'}). Add this to the body of "
            f"{cls.__name__}{f' in {where}' if where else ''}:\n\n"
            f"    block_metadata = {{\n"
            f"        {json.dumps(block_class)}: BlockMetadata(\n"
            f"{fields}"
            f"        ),\n"
            f"    }}\n\n"
            f"with `from magsdk import BlockMetadata` among its imports, and each `...` replaced by the value "
            f"`magsdk inspect {model} --json` prints for that field under block_groups[].metadata of the group "
            f"whose block_class is {json.dumps(block_class)} (null is None, true/false are True/False)."
        )

    # -- residual handling ----------------------------------------------------------------------
    def compute_residual(
        self, out_hidden: torch.Tensor, in_hidden: torch.Tensor, tail: BlockMetadata
    ) -> torch.Tensor:
        """Residual of the block stack over the image tokens, ``x_out - x_in``."""
        if out_hidden.shape == in_hidden.shape:
            return out_hidden - in_hidden
        n = in_hidden.shape[1] if in_hidden.ndim >= 2 else -1
        fused = (
            out_hidden.ndim == in_hidden.ndim >= 3
            and out_hidden.shape[0] == in_hidden.shape[0]
            and out_hidden.shape[2:] == in_hidden.shape[2:]
            and out_hidden.shape[1] > n
        )
        if fused and tail.fused_sequence_order == "text_image":
            return out_hidden[:, -n:] - in_hidden
        if fused and tail.fused_sequence_order == "image_text":
            return out_hidden[:, :n] - in_hidden
        from magsdk.runtime.layout import MetadataMismatchError  # the runtime package imports this module

        raise MetadataMismatchError(
            f"the last block returned a hidden state of shape {tuple(out_hidden.shape)} but the first block "
            f"received {tuple(in_hidden.shape)}, and the block metadata declares no fused text+image layout "
            f"(fused_sequence_order={tail.fused_sequence_order!r}); the metadata must declare it, or the strategy "
            "override compute_residual"
        )

    def apply_residual(
        self, in_hidden: torch.Tensor, residual: torch.Tensor, head: BlockMetadata
    ) -> torch.Tensor:
        """Skipped step: the block stack's output is its input plus the last residual, once."""
        if residual.device != in_hidden.device:
            residual = residual.to(in_hidden.device)
        if residual.shape != in_hidden.shape:
            raise BlockLayoutError(
                f"cannot apply a cached residual of shape {tuple(residual.shape)} to a first-block input of "
                f"shape {tuple(in_hidden.shape)}; the input size changed between steps (different resolution "
                "or batch within one generation?) or the metadata is wrong"
            )
        return in_hidden + residual
