"""``magsdk calibrate`` as a function: add or refresh one entry of an existing strategy module.

The file is checked before any work starts (it parses, its ``CALIBRATIONS`` literal can be
rewritten, it defines a strategy for the model's transformer); the entry is measured, patched in
with libcst (every other byte kept), validated on a temporary copy and only then written.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from magsdk.calibration.settings import CalibrationSettings
from magsdk.codegen.patch import parse_strategy_source, read_calibrations, upsert_calibration
from magsdk.codegen.render import default_module_name
from magsdk.codegen.validate import import_from_path, isolated_registry, strategies_in, validate_strategy_text
from magsdk.config import CalibrationEntry, CalibrationResult, atomic_write_text
from magsdk.errors import UsageError
from magsdk.runtime import distributed
from magsdk.workflow.common import (
    CalibrationOptions,
    Log,
    calibrate_loaded,
    check_options,
    check_transformer,
    command_line,
    load,
    no_strategy_in,
    plot,
    quiet,
    stored_entry,
)

COMMAND = "magsdk calibrate"


class CalibrateOutcome(BaseModel):
    """What ``calibrate`` did to a strategy file (the CLI prints it)."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    strategy_class: str
    transformer_cls_name: str
    calibration: CalibrationResult
    entry: CalibrationEntry
    settings: CalibrationSettings
    replaced: bool
    threshold: float
    max_skip_steps: int
    retention_ratio: float
    mypy: str = "passed"


def _scaffold_hint(path: Path, options: CalibrationOptions) -> str:
    """The scaffold command that writes ``path`` (when its stem is a module name), calibrated the same way."""
    stem = path.stem
    name = stem if stem.isidentifier() and not stem.startswith("_") else default_module_name(stem)
    out = path.parent.as_posix() or "."
    return command_line("magsdk", "scaffold", "--model", str(options.model), "--out", out, "--name", name,
                        options=options)


def calibrate_file(
    strategy_file: Path, options: CalibrationOptions, *, progress: bool = True, log: Log = quiet
) -> CalibrateOutcome:
    """Add or refresh the entry for the run's step count in an existing strategy file; nothing else changes."""
    if options.model is None:
        raise UsageError("give --model TARGET: the model to calibrate the strategy on")
    check_options(options)
    path = Path(strategy_file)
    if not path.is_file():
        raise UsageError(
            f"{path}: no such strategy file; create it, calibrated the same way, with `{_scaffold_hint(path, options)}`"
        )
    original = path.read_text(encoding="utf-8")
    parse_strategy_source(original, path.name)
    read_calibrations(original, path.name)  # the literal must be rewritable before any work starts
    with isolated_registry():
        found = strategies_in(import_from_path(path))
    if not found:
        raise no_strategy_in(path)
    strategy_cls = found[0]
    loaded = load(options)
    check_transformer(loaded, strategy_cls.transformer_cls_name, f"{path.name} ({strategy_cls.__name__})")
    result, entry, settings = calibrate_loaded(
        loaded, strategy_cls(), options, command=COMMAND, log=log, progress=progress
    )
    if not distributed.is_main_process():  # every rank holds the same result; rank 0 writes it
        return CalibrateOutcome(
            path=path, strategy_class=strategy_cls.__name__, transformer_cls_name=strategy_cls.transformer_cls_name,
            calibration=result, entry=entry, settings=settings, replaced=False, threshold=strategy_cls.threshold,
            max_skip_steps=strategy_cls.max_skip_steps, retention_ratio=strategy_cls.retention_ratio,
            mypy="not run on this rank",
        )

    current = path.read_text(encoding="utf-8")  # the user may have saved edits while we calibrated
    replaced = any(e.get("num_steps") == entry.num_steps for e in read_calibrations(current, path.name))
    patched = upsert_calibration(current, entry, path.name)
    check = validate_strategy_text(patched, path.name, expected_transformer=strategy_cls.transformer_cls_name)
    atomic_write_text(path, patched)
    stored = stored_entry(check, entry)
    plot(stored, options.plot, f"{strategy_cls.__name__}: {strategy_cls.transformer_cls_name}")
    return CalibrateOutcome(
        path=path,
        strategy_class=strategy_cls.__name__,
        transformer_cls_name=strategy_cls.transformer_cls_name,
        calibration=result,
        entry=stored,
        settings=settings,
        replaced=replaced,
        threshold=strategy_cls.threshold,
        max_skip_steps=strategy_cls.max_skip_steps,
        retention_ratio=strategy_cls.retention_ratio,
        mypy=check.mypy,
    )


def run_calibrate(strategy_file: Path, options: CalibrationOptions, *, progress: bool = True) -> CalibrationEntry:
    """``magsdk calibrate`` as a function; returns the entry as written (floats rounded)."""
    return calibrate_file(strategy_file, options, progress=progress).entry
