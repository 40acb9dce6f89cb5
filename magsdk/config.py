"""Typed objects passed between magsdk's stages (inspect → scaffold → calibrate → codegen → runtime).

Everything here is a pydantic v2 model so that every stage can be saved to JSON, loaded and
tested on its own. This module knows nothing about torch or diffusers.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from magsdk.errors import UsageError
from magsdk.planner import (
    PLANNER_RETENTION_RATIO,
    budget_bounds,
    budget_from_speedup,
    config_constraints,
    largest_speedup,
)

#: Branch name used when a curve applies to every branch (a plain list of ratios).
DEFAULT_BRANCH = "default"

OutputKind = Literal["tensor", "tuple", "list", "dict", "dataclass"]
ResampleMode = Literal["auto", "timesteps", "index"]
ReuseMode = Literal["auto", "residual", "scaled", "forecast"]
FusedOrder = Literal["text_image", "image_text"]


#: Probes per step at most: more cost more than a calibration on a schedule that many times denser.
MAX_PROBES = 64


def check_probes(field: str, values: Sequence[float], num_steps: int) -> None:
    """Between-step probes: P finite log growths per step but the last (P >= 1), flattened."""
    if not values:
        return
    intervals = num_steps - 1
    if intervals < 1 or len(values) % intervals:
        raise ValueError(
            f"{field} has {len(values)} values, not a multiple of the curve's {intervals} steps between its "
            f"{num_steps} steps (P probes per step but the last); give the probes of the same calibration"
        )
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{field}[{bad[0]}] = {values[bad[0]]!r} is not a finite number")


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


class ScheduleInfo(BaseModel):
    """The denoising schedule a calibration was measured on, so its curve can be mapped onto others.

    ``timesteps`` are the scheduler's (one per step of the run, from the pipeline's begin index);
    ``set_timesteps`` holds the non-list arguments the pipeline passed (e.g. ``mu`` for dynamic
    shifting) and ``input_sigmas`` the sigmas it passed, if any, before the scheduler shifted them.
    """

    model_config = ConfigDict(extra="forbid")

    timesteps: list[float]
    sigmas: list[float] | None = None
    scheduler: str | None = None
    #: The scheduler config values that shape the schedule (shift, dynamic shifting, terminal shift, ...).
    config: dict[str, Any] = Field(default_factory=dict)
    set_timesteps: dict[str, Any] = Field(default_factory=dict)
    input_sigmas: list[float] | None = None
    #: Image tokens the transformer's first block saw (the resolution, in the model's own units).
    image_tokens: int | None = None
    resolution: str | None = None
    note: str | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


class BranchCalibration(BaseModel):
    """One branch's per-step measurements (index i = step i)."""

    model_config = ConfigDict(extra="forbid")

    norm_ratios: list[float]
    norm_stds: list[float] = Field(default_factory=list)
    cos_dists: list[float] = Field(default_factory=list)
    timesteps: list[float | None] = Field(default_factory=list)
    #: Standard deviation of each norm ratio across the calibration runs (prompts × seeds), population (÷ n).
    norm_ratio_spread: list[float] = Field(default_factory=list)
    num_runs: int = 1
    #: Between-step probes (``magsdk.calibrate(..., probes=P)``): for each step i but the last, the log growth of the
    #: residual norm from step i's timestep to P evenly spaced timesteps up to step i+1's, measured on step i's
    #: latent; flattened, P values per step. Empty when not probed (docs/design.md, "Probes").
    probes: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _lengths_match(self) -> BranchCalibration:
        n = len(self.norm_ratios)
        for name in ("norm_stds", "cos_dists", "timesteps", "norm_ratio_spread"):
            values = getattr(self, name)
            if values and len(values) != n:
                raise ValueError(f"{name} has {len(values)} values but norm_ratios has {n}")
        check_probes("probes", self.probes, n)
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
    #: The schedule the calibration ran on (absent when no scheduler was attached).
    schedule: ScheduleInfo | None = None

    @model_validator(mode="after")
    def _fill_num_steps(self) -> CalibrationResult:
        if not self.num_steps and self.branches:
            self.num_steps = max(len(b.norm_ratios) for b in self.branches.values())
        return self

    def curves(self) -> dict[str, list[float]]:
        return {name: list(b.norm_ratios) for name, b in self.branches.items()}

    def probe_curves(self) -> dict[str, list[float]] | None:
        """Every branch's between-step probes, or None unless all branches were probed."""
        if not self.branches or not all(b.probes for b in self.branches.values()):
            return None
        return {name: list(b.probes) for name, b in self.branches.items()}

    def argument_timesteps(self) -> list[float] | None:
        """The transformer's timestep argument per step (the first branch that recorded them all)."""
        for branch in self.branches.values():
            if branch.timesteps and all(t is not None for t in branch.timesteps):
                return [float(t) for t in branch.timesteps if t is not None]
        return None

    def too_short(self) -> str | None:
        """Why this result cannot serve as a curve (None: it can): a branch of fewer than 2 steps.

        A ratio compares a step's residual with the previous step's, so a 1-step run measures no change, and
        ``MagCacheConfig`` refuses a curve of one value. A 1-step calibration saved and loaded fine and only
        failed there, far from the run that made it; ``save`` and ``load`` say so instead.
        """
        short = {name: len(b.norm_ratios) for name, b in self.branches.items() if len(b.norm_ratios) < 2}
        if not short:
            return None
        shown = ", ".join(f"{name!r}: {n}" for name, n in short.items())
        return (
            f"the calibration has fewer than 2 steps ({shown}); a calibration needs a run of at least 2 steps (a "
            "ratio compares each step with the one before). Calibrate on the step count you run, e.g. "
            "`with magsdk.calibrate(pipe) as cal: pipe(..., num_inference_steps=28)`"
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result as JSON (atomically); ``UsageError`` for a result no run can use or a path that is
        not a file's."""
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(
                f"save(path) takes a file path (str or pathlib.Path), got {type(path).__name__} {path!r}; e.g. "
                "cal.result.save('calibration.json')"
            )
        target = Path(path)
        problem = self.too_short()
        if problem is not None:
            raise UsageError(f"not saving {target}: {problem}")
        atomic_write_text(target, self.model_dump_json(indent=2) + "\n", example="calibration.json")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationResult:
        """Read a file ``save`` wrote; ``UsageError`` names the file, what is wrong with it and what to do."""
        source = Path(path)
        calibrate = "write one with `with magsdk.calibrate(pipe) as cal: pipe(...)`, then `cal.result.save({})`"
        write = calibrate.format("path")
        if source.is_dir():
            raise UsageError(
                f"{source} is a folder, not a calibration file; give the path of the JSON file "
                "`result.save(path)` wrote"
            )
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise UsageError(
                f"calibration file {source} does not exist; check the path, or {calibrate.format(repr(str(source)))}"
            ) from exc
        except OSError as exc:
            raise UsageError(f"cannot read the calibration file {source}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{source} is not a calibration file: byte {exc.start} is not UTF-8 text, and a calibration is the "
                f"JSON `result.save(path)` writes; {write}"
            ) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{source} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}), so not a calibration "
                f"file; {write}"
            ) from exc
        other = _other_file_kind(data, source)
        if other is not None:
            what, use = other
            raise UsageError(f"{source} holds {what}, not a CalibrationResult; {use + ', or ' if use else ''}{write}")
        try:
            result = cls.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors()
            shown = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}" for e in errors[:3])
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise UsageError(
                f"{source} is not a valid CalibrationResult: {shown}{more}; fix those values, or {write}"
            ) from exc
        problem = result.too_short()
        if problem is not None:
            raise UsageError(f"{source} cannot be used: {problem}, then `cal.result.save({str(source)!r})`")
        return result


def _is_curve(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )


def _other_file_kind(data: Any, source: Path) -> tuple[str, str] | None:
    """What a JSON file that is no ``CalibrationResult`` holds and how to use it (or ""); None: it may be one."""
    read = f"json.load(open({str(source)!r}))"
    if _is_curve(data) or (isinstance(data, dict) and data and all(_is_curve(v) for v in data.values())):
        return (
            "a curve (norm ratios, as `MagCacheConfig.mag_ratios` takes them)",
            f"use it as `magsdk.MagCacheConfig(mag_ratios={read})`",
        )
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__} (a CalibrationResult is a JSON object with `branches`)", ""
    if "block_groups" in data and "transformer" in data:
        return (
            "an InspectionReport (what `magsdk inspect --json` prints)",
            f"read it with `magsdk.InspectionReport.model_validate({read})`",
        )
    if "key" in data and isinstance(data.get("result"), dict):
        return (
            "a curve cached by magsdk's auto-calibration",
            f"its `result` is a CalibrationResult: `magsdk.CalibrationResult.model_validate({read}['result'])`",
        )
    branches = data.get("branches")
    if isinstance(branches, dict) and branches and all(_is_curve(v) for v in branches.values()):
        return (
            "a strategy's calibration entry (a CalibrationEntry: one plain curve per branch)",
            f"use its curves as `magsdk.MagCacheConfig(mag_ratios={read}['branches'])`",
        )
    if "branches" not in data:
        keys = ", ".join(map(str, list(data)[:8])) + (", ..." if len(data) > 8 else "")
        return f"a JSON object without `branches` (its keys: {keys or 'none'})", ""
    return None

class MagCacheConfig(BaseModel):
    """User-facing settings. ``mag_ratios`` is normalised to ``{branch: curve}``.

    Without ``mag_ratios`` the config holds settings only: ``magsdk.enable`` then takes the curves of the
    transformer's strategy (its variant's defaults fill the settings left unset).

    A plain list applies to every branch (stored under ``"default"``); a dict maps branch names
    (diffusers' ``cache_context`` names, or ``pass0``/``pass1`` for unnamed CFG passes) to their
    own curves; a ``CalibrationResult`` contributes its ``norm_ratios`` per branch.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    mag_ratios: dict[str, list[float]] | None = None
    threshold: float = Field(0.06, ge=0, allow_inf_nan=False)
    max_skip_steps: int = Field(3, ge=0)
    retention_ratio: float = Field(0.2, ge=0, lt=1, allow_inf_nan=False)
    num_inference_steps: int | None = Field(None, ge=1)
    calibrate: bool = False
    #: No curve yet: measure it on the first generation at each (steps, resolution, schedule), cache with it from
    #: the next, and keep it in the user cache folder for later processes (``magsdk scaffold --from-cache``).
    auto_calibrate: bool = False
    #: False (default): all branches of a step follow the mean curve and skip together, so true CFG
    #: never mixes a fresh prediction with a stale one. True: each branch follows its own curve.
    per_branch_curves: bool = False
    #: How a curve is mapped onto a run's schedule: ``"auto"`` through the recorded timesteps when the
    #: curve has them (else by index), ``"timesteps"`` the same but an error when it cannot,
    #: ``"index"`` nearest-index resampling (the original's and diffusers' rule; parity mode).
    resample: ResampleMode = "auto"
    #: The transformer's timestep argument at each step of the curve (filled from a CalibrationResult).
    timesteps: list[float] | None = None
    #: The schedule the curve was measured on (filled from a CalibrationResult).
    schedule: ScheduleInfo | None = None
    #: Between-step probes per branch (filled from a CalibrationResult calibrated with ``probes=P``): the curve's
    #: shape between its steps, used when it is mapped through timesteps.
    probes: dict[str, list[float]] | None = None
    #: Budget mode: compute exactly this many steps per branch in every run (the threshold is unused).
    compute_steps: int | None = None
    #: Budget mode: compute ``N / speedup`` of a run's N steps (rounded half up, clamped to [1, N]).
    speedup: float | None = None
    #: What a skipped step adds to the first block's input: ``"residual"`` the last computed residual (MagCache as
    #: published, diffusers' parity), ``"scaled"`` that residual times the curve's accumulated ratio, ``"forecast"``
    #: a first-order extrapolation from the last two computed residuals (two residuals kept per branch).
    #: ``"auto"``: forecast in budget mode (its planner is tuned for it), the plain residual with a threshold.
    reuse: ReuseMode = "auto"

    def effective_reuse(self) -> str:
        """The reuse mode a run follows (``"auto"`` resolved)."""
        if self.reuse != "auto":
            return self.reuse
        return "forecast" if self.compute_steps is not None or self.speedup is not None else "residual"

    @model_validator(mode="before")
    @classmethod
    def _unpack_calibration(cls, data: Any) -> Any:
        """A CalibrationResult brings its timesteps and schedule along, so its curve can be mapped."""
        if isinstance(data, dict) and isinstance(data.get("mag_ratios"), CalibrationResult):
            result = data["mag_ratios"]
            data = dict(data)
            data.setdefault("timesteps", result.argument_timesteps())
            data.setdefault("schedule", result.schedule)
            data.setdefault("probes", result.probe_curves())
        return data

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
        checked = {name: _check_curve(f"mag_ratios[{name!r}]", curve) for name, curve in value.items()}
        lengths = {name: len(curve) for name, curve in checked.items()}
        if len(set(lengths.values())) > 1:
            # every curve is indexed by the run's step (a second transformer's ``transformer_2:`` curves too: a
            # calibration joins each expert's part into one curve over the run), so unequal lengths were silently
            # averaged or resampled by index onto each other: steps matched up wrongly
            shown = ", ".join(f"{name!r}: {n}" for name, n in lengths.items())
            first = next(iter(checked))
            raise ValueError(
                f"mag_ratios' branches have different lengths ({shown}); each curve has one ratio per step of the "
                "calibrated run, so all of them must cover the same steps. Give the curves of one calibration, or "
                f"only the branches that cover the whole run (e.g. mag_ratios={{{first!r}: <its "
                f"{lengths[first]} values>}})"
            )
        return checked

    @field_validator("compute_steps", mode="after")
    @classmethod
    def _check_compute_steps(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(
                f"compute_steps={value} must be >= 1: it counts the steps computed per branch (step 0 always is)"
            )
        return value

    @field_validator("speedup", mode="after")
    @classmethod
    def _check_speedup(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value >= 1.0):
            raise ValueError(
                f"speedup={value!r} is not a finite number >= 1; it is N / (steps computed), so 1 computes every "
                "step and 2 computes half of them (or use compute_steps=B for an exact count)"
            )
        return value

    @model_validator(mode="after")
    def _check_timesteps(self) -> MagCacheConfig:
        """``timesteps`` name each step of the curve: of another length they were silently dropped (the curve
        was then followed by step index, not by noise level)."""
        if self.timesteps is None or self.mag_ratios is None:
            return self
        steps = len(next(iter(self.mag_ratios.values())))
        if len(self.timesteps) != steps:
            raise ValueError(
                f"timesteps has {len(self.timesteps)} values but the mag_ratios curves have {steps} (one per "
                f"step); give the transformer's timestep argument at each of the {steps} calibrated steps, or "
                "leave timesteps out (the curve is then followed by step index)"
            )
        for index, value in enumerate(self.timesteps):
            if not math.isfinite(value):
                raise ValueError(f"timesteps[{index}] = {value!r} is not a finite number; give one timestep per step")
        return self

    @model_validator(mode="after")
    def _check_probes(self) -> MagCacheConfig:
        if not self.probes:
            return self
        if self.mag_ratios is None or set(self.probes) != set(self.mag_ratios):
            raise ValueError(
                f"probes are given for branches {sorted(self.probes)} but mag_ratios has "
                f"{sorted(self.mag_ratios or {})}; pass a CalibrationResult as mag_ratios (it brings its own probes) "
                "or leave probes out"
            )
        for name, values in self.probes.items():
            check_probes(f"probes[{name!r}]", values, len(self.mag_ratios[name]))
        return self

    @model_validator(mode="after")
    def _check_budget(self) -> MagCacheConfig:
        """Budget settings exclude each other and calibration; an explicit step count is checked now.

        ``max_skip_steps`` / ``retention_ratio`` count as constraints only when the user set them
        (``model_fields_set``); otherwise the planner chooses them. The feasibility of a budget
        depends on the run's step count, so without ``num_inference_steps`` it is checked per run
        by ``magsdk.planner.plan_budget``.
        """
        if self.compute_steps is None and self.speedup is None:
            return self
        if self.compute_steps is not None and self.speedup is not None:
            raise ValueError(
                f"compute_steps={self.compute_steps} and speedup={self.speedup:g} both set a budget; "
                "give only one of them"
            )
        field = "compute_steps" if self.compute_steps is not None else "speedup"
        if self.calibrate:
            raise ValueError(f"{field} sets a compute budget, but calibrate=True runs every step; drop one of them")
        n = self.num_inference_steps
        if n is None:
            return self
        if self.compute_steps is not None and self.compute_steps > n:
            raise ValueError(
                f"compute_steps={self.compute_steps} is more than num_inference_steps={n}; use at most {n}"
            )
        budget = self.compute_steps if self.compute_steps is not None else budget_from_speedup(n, self.speedup or 1.0)
        k, r = config_constraints(self)
        # with max_skip_steps unset the planner may skip runs of any length: only the retention bounds the budget
        least = budget_bounds(n, n if k is None else k, PLANNER_RETENTION_RATIO if r is None else r)[0]
        if budget < least:
            named = (("max_skip_steps", k), ("retention_ratio", r))
            given = [f"{name}={value:g}" for name, value in named if value is not None]
            under = " and ".join(given) if given else "the planner's own constraints"
            if field == "compute_steps":
                ask, fix = f"compute_steps={budget}", f"use compute_steps >= {least}"
            else:
                ask = f"speedup={self.speedup:g} ({budget} of {n} steps)"
                fix = f"use speedup <= {largest_speedup(n, least)}"
            loosen = ", or loosen or unset " + " / ".join(name for name, value in named if value is not None)
            raise ValueError(
                f"{ask} cannot be met in num_inference_steps={n} under {under}: the smallest feasible budget is "
                f"{least} computed steps; {fix}" + (loosen if given else "")
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
    #: How the generations were made: the pipeline call's keyword arguments (height, width,
    #: num_inference_steps, guidance and CFG settings...), device and dtype, or the synthetic
    #: loop's inputs. Empty in entries written before magsdk recorded it.
    settings: dict[str, Any] = Field(default_factory=dict)
    #: The schedule the curve was measured on (scheduler timesteps, shift, resolution); absent in old entries.
    schedule: ScheduleInfo | None = None
    #: Between-step probes per branch (``BranchCalibration.probes``); absent unless calibrated with probes.
    probes: dict[str, list[float]] = Field(default_factory=dict)

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
        if self.probes and set(self.probes) != set(self.branches):
            raise ValueError(f"probes name branches {sorted(self.probes)}, the curves {sorted(self.branches)}")
        for name, values in self.probes.items():
            check_probes(f"probes[{name!r}]", values, self.num_steps)
        return self


class BlockGroupReport(BaseModel):
    """One list of repeated blocks found in a transformer, with the conventions inferred for it."""

    model_config = ConfigDict(extra="forbid")

    path: str
    block_class: str
    count: int = Field(ge=1)
    metadata: BlockMetadata
    #: Where ``magsdk.enable`` takes this group's conventions from, in its order of precedence: a strategy
    #: registered for the transformer class, the ``TransformerBlockRegistry`` entry of the block class, or
    #: (neither exists) the inference above, made again from the first real call.
    source: Literal["strategy", "registry", "inferred"] = "inferred"
    #: With a strategy or registry source: whether its metadata equals the inferred one (None: inferred).
    agrees_with_inferred: bool | None = None


#: What an inspection note is about. Consumers (codegen, the zoo, the runtime) decide from the code,
#: never from the wording of the message.
NoteCode = Literal[
    "separate-stack",  # a block list the hidden state reaches only through work outside any block: not cached
    "interleaved-group",  # an uncached block list runs between cached blocks
    "side-groups",  # block lists beside the stack (text refiners …): not cached, run on every step
    "mixed-output-kinds",  # the blocks of one list return different kinds of output
    "no-latent-lineage",  # no block argument derives from the latents: the hidden state was chosen by order
    "fused-image-in-middle",  # image tokens neither first nor last in a fused sequence: no residual
    "between-block-work",  # the hidden state is changed outside any block between two cached blocks
    "in-place-change",  # a block output is changed in place between blocks
    "residual-undefined",  # the last block's hidden output cannot be compared with the first block's input
    "stale-second-stream",  # the transformer also returns a stream the cache passes through unchanged
    "repeated-block-calls",  # a block runs more than once per forward
    "block-order",  # blocks ran out of order or not at all
    "argument-through-varargs",  # a state reaches forward through *args (no name to find it by)
    "mixed-argument-forms",  # a state is passed positionally in some calls and by keyword in others
    "argument-through-kwargs",  # a state reaches forward through **kwargs only
    "tuple-subclass",  # blocks return a tuple subclass; skipped steps return a plain tuple
    "hidden-not-tensor",  # the hidden output slot does not hold a tensor
    "class-conventions-differ",  # one block class used with two conventions
    "inconsistent-flows",  # not every block passed its states through the same slots
    "ambiguous-output-slot",  # two assignments of arguments to output slots explain the trace equally well
]


class InspectionNote(BaseModel):
    """One inspection warning with its code (``InspectionReport.warnings`` keeps the messages alone)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: NoteCode
    message: str
    #: The block group (path) the note is about, when it is about one.
    group: str | None = None


class AmbiguousSlots(BaseModel):
    """Arguments of one block group whose output slots the traced forward does not decide.

    The arguments and the slots have equal shapes and no slot is the very tensor (or equal values) of an
    argument, so every pairing explains the trace equally well; ``chosen`` is what the value distance
    would have picked, a guess that neither the runtime nor codegen accepts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str
    block_class: str
    arguments: list[str]
    slots: list[int | str | None]
    chosen: dict[str, int | str | None] = Field(default_factory=dict)


class InspectionReport(BaseModel):
    """What ``magsdk inspect`` found; the runtime can enable a cache from it directly."""

    model_config = ConfigDict(extra="forbid")

    transformer: str
    block_groups: list[BlockGroupReport]
    head: str
    tail: str
    #: The messages of ``notes``, in the same order (kept for readers of the original JSON schema).
    warnings: list[str] = Field(default_factory=list)
    notes: list[InspectionNote] = Field(default_factory=list)
    #: Non-empty when the trace does not decide a cached group's output slots: the metadata is a guess.
    ambiguities: list[AmbiguousSlots] = Field(default_factory=list)
    timestep_argument_name: str | None = None
    shrunk: dict[str, Any] = Field(default_factory=dict)
    inputs: str = "synthesized"
    seconds: float | None = None

    @model_validator(mode="after")
    def _warnings_follow_notes(self) -> InspectionReport:
        if self.notes and not self.warnings:
            self.warnings = [note.message for note in self.notes]
        return self

    @property
    def ambiguous(self) -> bool:
        return bool(self.ambiguities)

    def codes(self) -> set[str]:
        return {note.code for note in self.notes}

    def metadata_by_class(self) -> dict[str, BlockMetadata]:
        return {group.block_class: group.metadata for group in self.block_groups}

    def save(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        atomic_write_text(target, self.model_dump_json(indent=2) + "\n")
        return target


def written_file_mode(path: Path) -> int:
    """The mode a file written over ``path`` gets: the old file's, else the usual one (0666 & ~umask)."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a folder (so ``path`` cannot be created)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def atomic_write_text(path: Path, text: str, example: str | None = None) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written user file.

    A path that cannot be a file is refused first with a ``UsageError`` naming it: an existing folder (the
    rename failed as IsADirectoryError naming the temporary file) or a path below a file (``mkdir`` said "File
    exists"). ``example``: a file name to suggest inside a folder that was given.
    """
    if path.is_dir():
        inside = path / (example or path.name or "out")
        raise UsageError(f"cannot write {path}: it is a folder; give the name of a file to write, e.g. {inside}")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise UsageError(
            f"cannot write {path}: {blocker} is a file, not a folder, so nothing can be written below it; choose "
            f"a path in a folder you can write to (e.g. {blocker.parent / path.name})"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file asked for, not the temporary one beside it
        raise UsageError(
            f"cannot write {path}: {exc.strerror or exc} in its folder {path.parent}; choose a path in a folder you "
            "can write to"
        ) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, written_file_mode(path))  # mkstemp makes the file private (0600)
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
    threshold: float = Field(0.06, ge=0, allow_inf_nan=False)
    max_skip_steps: int = Field(3, ge=0)
    retention_ratio: float = Field(0.2, ge=0, lt=1, allow_inf_nan=False)
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
