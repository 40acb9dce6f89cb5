"""Typed objects passed between magsdk's stages (inspect → scaffold → calibrate → codegen → runtime).

Everything here is a pydantic v2 model so that every stage can be saved to JSON, loaded and
tested on its own. This module knows nothing about torch or diffusers.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Branch name used when a curve applies to every branch (a plain list of ratios).
DEFAULT_BRANCH = "default"

OutputKind = Literal["tensor", "tuple", "list", "dict", "dataclass"]
FusedOrder = Literal["text_image", "image_text"]


def _check_curve(field: str, values: list[float]) -> list[float]:
    """Ratios multiply into an accumulated error, so a NaN, inf or non-positive value poisons it."""
    if len(values) < 2:
        raise ValueError(f"{field} needs at least 2 values (one per step), got {len(values)}: {values!r}")
    for index, value in enumerate(values):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"{field}[{index}] = {value!r} is not a finite positive number; "
                "magnitude ratios are ‖r_t‖/‖r_t-1‖ and must be > 0. Re-run calibration or fix the value."
            )
    return [float(v) for v in values]


class BlockMetadata(BaseModel):
    """How to read a block's hidden state from its inputs and outputs.

    Mirrors diffusers' ``TransformerBlockMetadata`` field names (so the same facts can be
    compared), and adds what diffusers leaves implicit: the output container kind, dict /
    dataclass keys, and fused text+image sequences.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_states_argument_name: str = "hidden_states"
    encoder_hidden_states_argument_name: str | None = None
    return_hidden_states_index: int = Field(0, ge=0)
    return_encoder_hidden_states_index: int | None = Field(None, ge=0)
    output_kind: OutputKind = "tuple"
    return_hidden_states_key: str | None = None
    return_encoder_hidden_states_key: str | None = None
    #: When the block's hidden output holds text and image tokens in one sequence: their order.
    fused_sequence_order: FusedOrder | None = None
    #: True when the block fuses separate (encoder, hidden) inputs into one output sequence.
    fuses_inputs: bool = False

    @model_validator(mode="after")
    def _indices_differ(self) -> BlockMetadata:
        if self.return_encoder_hidden_states_index == self.return_hidden_states_index and (
            self.output_kind in ("tuple", "list")
        ):
            raise ValueError(
                "return_encoder_hidden_states_index equals return_hidden_states_index "
                f"({self.return_hidden_states_index}); a block cannot return both states at one index"
            )
        if self.output_kind in ("dict", "dataclass") and self.return_hidden_states_key is None:
            raise ValueError(f"output_kind={self.output_kind!r} needs return_hidden_states_key")
        return self


class BranchCalibration(BaseModel):
    """One branch's per-step measurements (index i = step i)."""

    model_config = ConfigDict(extra="forbid")

    norm_ratios: list[float]
    norm_stds: list[float] = Field(default_factory=list)
    cos_dists: list[float] = Field(default_factory=list)
    timesteps: list[float | None] = Field(default_factory=list)
    #: Standard deviation of each norm ratio across the calibration runs (prompts × seeds).
    norm_ratio_spread: list[float] = Field(default_factory=list)
    num_runs: int = 1

    @model_validator(mode="after")
    def _lengths_match(self) -> BranchCalibration:
        n = len(self.norm_ratios)
        for name in ("norm_stds", "cos_dists", "timesteps", "norm_ratio_spread"):
            values = getattr(self, name)
            if values and len(values) != n:
                raise ValueError(f"{name} has {len(values)} values but norm_ratios has {n}")
        return self


class CalibrationResult(BaseModel):
    """What a calibration run measured, per branch. Saved as JSON, never copied from stdout."""

    model_config = ConfigDict(extra="forbid")

    branches: dict[str, BranchCalibration]
    num_steps: int = 0
    transformer: str | None = None
    scheduler: str | None = None
    synthetic: bool = False
    info: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fill_num_steps(self) -> CalibrationResult:
        if not self.num_steps and self.branches:
            self.num_steps = max(len(b.norm_ratios) for b in self.branches.values())
        return self

    def curves(self) -> dict[str, list[float]]:
        return {name: list(b.norm_ratios) for name, b in self.branches.items()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        atomic_write_text(target, self.model_dump_json(indent=2) + "\n")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationResult:
        return cls.model_validate(json.loads(Path(path).read_text()))


class MagCacheConfig(BaseModel):
    """User-facing settings. ``mag_ratios`` is normalised to ``{branch: curve}``.

    A plain list applies to every branch (stored under ``"default"``); a dict maps branch names
    (diffusers' ``cache_context`` names, or ``pass0``/``pass1`` for unnamed CFG passes) to their
    own curves; a ``CalibrationResult`` contributes its ``norm_ratios`` per branch.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    mag_ratios: dict[str, list[float]] | None = None
    threshold: float = Field(0.06, ge=0)
    max_skip_steps: int = Field(3, ge=0)
    retention_ratio: float = Field(0.2, ge=0, lt=1)
    num_inference_steps: int | None = Field(None, ge=1)
    calibrate: bool = False
    #: False (default): all branches of a step follow the mean curve and skip together, so true CFG
    #: never mixes a fresh prediction with a stale one. True: each branch follows its own curve.
    per_branch_curves: bool = False

    @field_validator("mag_ratios", mode="before")
    @classmethod
    def _normalise_ratios(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, CalibrationResult):
            return value.curves()
        if hasattr(value, "tolist") and not isinstance(value, (list, dict)):
            value = value.tolist()  # torch / numpy arrays
        if isinstance(value, (list, tuple)):
            return {DEFAULT_BRANCH: list(value)}
        if isinstance(value, dict):
            return {str(k): (v.tolist() if hasattr(v, "tolist") else v) for k, v in value.items()}
        raise ValueError(
            f"mag_ratios must be a list of floats, a dict branch -> list, or a CalibrationResult; "
            f"got {type(value).__name__}"
        )

    @field_validator("mag_ratios", mode="after")
    @classmethod
    def _check_ratios(cls, value: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("mag_ratios is an empty dict; give at least one branch curve")
        return {name: _check_curve(f"mag_ratios[{name!r}]", curve) for name, curve in value.items()}

    @model_validator(mode="after")
    def _ratios_or_calibrate(self) -> MagCacheConfig:
        if self.mag_ratios is None and not self.calibrate:
            raise ValueError(
                "mag_ratios is required unless calibrate=True; run `magsdk.calibrate(model)` "
                "or use a registered strategy (magsdk.enable(pipe) with no config)"
            )
        return self


class CalibrationEntry(BaseModel):
    """One calibration stored in a strategy module (the literal that codegen rewrites)."""

    model_config = ConfigDict(extra="forbid")

    num_steps: int = Field(ge=2)
    branches: dict[str, list[float]]
    spread: dict[str, list[float]] = Field(default_factory=dict)
    timesteps: list[float | None] = Field(default_factory=list)
    source: str = ""
    scheduler: str | None = None
    shape: str | None = None
    num_prompts: int | None = None
    num_seeds: int | None = None
    diffusers_version: str | None = None
    synthetic: bool = False

    @model_validator(mode="after")
    def _check(self) -> CalibrationEntry:
        if not self.branches:
            raise ValueError("a calibration entry needs at least one branch curve")
        for name, curve in self.branches.items():
            _check_curve(f"branches[{name!r}]", curve)
            if len(curve) != self.num_steps:
                raise ValueError(
                    f"branches[{name!r}] has {len(curve)} values but num_steps is {self.num_steps}"
                )
        return self


class BlockGroupReport(BaseModel):
    """One list of repeated blocks found in a transformer, with the conventions inferred for it."""

    model_config = ConfigDict(extra="forbid")

    path: str
    block_class: str
    count: int = Field(ge=1)
    metadata: BlockMetadata


class InspectionReport(BaseModel):
    """What ``magsdk inspect`` found; the runtime can enable a cache from it directly."""

    model_config = ConfigDict(extra="forbid")

    transformer: str
    block_groups: list[BlockGroupReport]
    head: str
    tail: str
    warnings: list[str] = Field(default_factory=list)
    timestep_argument_name: str | None = None
    shrunk: dict[str, Any] = Field(default_factory=dict)
    inputs: str = "synthesized"
    seconds: float | None = None

    def metadata_by_class(self) -> dict[str, BlockMetadata]:
        return {group.block_class: group.metadata for group in self.block_groups}

    def save(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        atomic_write_text(target, self.model_dump_json(indent=2) + "\n")
        return target


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written user file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        # mkstemp makes the file private (0600): keep the old file's mode, or the usual umask one.
        if path.exists():
            mode = path.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: A variant name: lower-case letters, digits, dots and dashes (``wan2.1-t2v-14b``), unique across strategies.
VARIANT_NAME_PATTERN = r"^[a-z0-9][a-z0-9.\-]*$"


class StrategyVariant(BaseModel):
    """One model served by a strategy: its published curves, its settings and how a pipeline is recognised.

    Several models share one transformer class (FLUX.1-dev and FLUX.1-Kontext on
    ``FluxTransformer2DModel``; four Wan2.1 and three Wan2.2 models on ``WanTransformer3DModel``), so
    the class alone cannot pick a curve. Each rule is evidence for or against this variant: the
    pipeline's class name, values of the transformer's (or the pipeline's) config, and substrings of
    the folder or hub id the model was loaded from. ``magsdk.variants.select_variant`` weighs them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=VARIANT_NAME_PATTERN)
    #: The model as its authors name it (``Wan2.1-T2V-14B``).
    model: str
    #: Chosen when nothing observed tells this strategy's variants apart (a bare transformer).
    default: bool = False
    #: Pipeline class names this model runs in.
    pipelines: list[str] = Field(default_factory=list)
    #: Transformer config values of this model (``num_layers``, ``in_channels``...); None means absent or None.
    config: dict[str, Any] = Field(default_factory=dict)
    #: Pipeline config values of this model (``boundary_ratio`` of Wan2.2's two-expert pipelines...).
    pipeline_config: dict[str, Any] = Field(default_factory=dict)
    #: Case-insensitive substrings of the folder or hub id the pipeline or transformer was loaded from.
    name_or_path: list[str] = Field(default_factory=list)
    threshold: float = Field(0.06, ge=0)
    max_skip_steps: int = Field(3, ge=0)
    retention_ratio: float = Field(0.2, ge=0, lt=1)
    #: Where the settings come from.
    settings_source: str = ""
    notes: str = ""
    calibrations: list[CalibrationEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_step_counts(self) -> StrategyVariant:
        steps = [entry.num_steps for entry in self.calibrations]
        if len(set(steps)) != len(steps):
            raise ValueError(f"variant {self.name!r} has two calibrations with the same step count: {steps}")
        return self

    def recognition(self) -> list[str]:
        """How this variant is recognised, one rule a line (for errors and ``magsdk list``)."""
        rules: list[str] = []
        if self.pipelines:
            rules.append("pipeline " + " | ".join(self.pipelines))
        for key, value in {**self.config, **{f"pipeline.{k}": v for k, v in self.pipeline_config.items()}}.items():
            rules.append(f"{key}={value!r}")
        if self.name_or_path:
            rules.append("path contains " + " | ".join(repr(s) for s in self.name_or_path))
        if self.default:
            rules.append("default when nothing tells the variants apart")
        return rules or ["only by name (strategy=" + repr(self.name) + ")"]
