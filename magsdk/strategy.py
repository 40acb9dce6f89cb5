"""``MagCacheStrategy``: everything magsdk needs to know about one transformer class.

A strategy is plain data (block metadata, default settings, calibrated curves) plus two small
overridable methods for models whose residual is not simply ``x_out - x_in``. Defining a
subclass with a ``transformer_cls_name`` registers it; ``strategies/`` holds one module each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from magsdk.config import BlockMetadata, CalibrationEntry, MagCacheConfig
from magsdk.errors import BlockLayoutError
from magsdk.ratios import select_calibration
from magsdk.registry import StrategyRegistry


def load_calibrations(raw: Sequence[Mapping[str, Any]]) -> list[CalibrationEntry]:
    """Validate the calibration literal of a strategy module (the part codegen rewrites)."""
    return [CalibrationEntry.model_validate(dict(entry)) for entry in raw]


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.transformer_cls_name:
            StrategyRegistry.register(cls)

    # -- settings -------------------------------------------------------------------------------
    @classmethod
    def default_config(cls, num_steps: int | None = None, **overrides: Any) -> MagCacheConfig:
        """A config holding the calibration closest to ``num_steps`` and the default settings."""
        if not cls.calibrations:
            raise BlockLayoutError(
                f"strategy {cls.__name__} has no calibration yet; run "
                f"`magsdk calibrate <file> --model <model> --steps N` or pass mag_ratios explicitly"
            )
        entry = select_calibration(cls.calibrations, num_steps)
        values: dict[str, Any] = {
            "mag_ratios": entry.branches,
            "threshold": cls.threshold,
            "max_skip_steps": cls.max_skip_steps,
            "retention_ratio": cls.retention_ratio,
        }
        values.update(overrides)
        return MagCacheConfig(**values)

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
        raise BlockLayoutError(
            f"the last block returned a hidden state of shape {tuple(out_hidden.shape)} but the first block "
            f"received {tuple(in_hidden.shape)}, and the block metadata declares no fused text+image layout "
            f"(fused_sequence_order={tail.fused_sequence_order!r}). Run `magsdk inspect` on the transformer "
            "and use its metadata, or override compute_residual in the strategy."
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
