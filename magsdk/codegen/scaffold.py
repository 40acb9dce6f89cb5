"""``scaffold`` and ``calibrate`` as functions: inspect → render → calibrate → patch → validate → write.

Every check runs before the first byte is written: the template renders, the model loads and
calibrates, the patched module validates (pydantic, import, registration, ``mypy --strict``).
Only then are the module (and its test) replaced atomically. ``magsdk demo`` and the CLI call
these functions.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from magsdk.calibration.drivers import (
    LoadedModel,
    check_pipeline_folder,
    is_pipeline_target,
    load_driver,
    load_model,
    run_calibration,
)
from magsdk.codegen.literal import round_entry
from magsdk.codegen.patch import (
    StrategyFileError,
    parse_strategy_source,
    read_calibrations,
    strip_calibrations,
    upsert_calibration,
)
from magsdk.codegen.render import (
    StrategySpec,
    check_module_name,
    render_strategy,
    render_test,
    spec_from_report,
)
from magsdk.codegen.validate import (
    ModuleCheck,
    import_from_path,
    isolated_registry,
    load_strategy,
    strategies_in,
    validate_strategy_text,
)
from magsdk.config import CalibrationEntry, CalibrationResult, InspectionReport, atomic_write_text
from magsdk.errors import MagSDKError, UsageError
from magsdk.strategy import MagCacheStrategy


class ScaffoldOptions(BaseModel):
    """What ``magsdk scaffold`` / ``magsdk calibrate`` take on the command line."""

    model_config = ConfigDict(extra="forbid")

    model: str
    name: str | None = None
    steps: int = 28
    prompts: list[str] | None = None
    seeds: int = 2
    out_dir: Path = Path("strategies")
    driver: str | None = None
    plot: Path | None = None
    height: int | None = None
    width: int | None = None
    with_test: bool = True
    #: Replace an existing module even when it differs from what scaffold generates.
    force: bool = False
    #: Extra keyword arguments for every pipeline call (e.g. ``true_cfg_scale``, ``negative_prompt``).
    call_kwargs: dict[str, Any] = {}


class ScaffoldResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    module_path: Path
    test_path: Path | None
    strategy_class: str
    transformer_cls_name: str
    calibration: CalibrationResult
    report: InspectionReport
    entry: CalibrationEntry
    mypy: str = "passed"


class CalibrateOutcome(BaseModel):
    """What ``calibrate`` did to a strategy file (the CLI prints it)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    path: Path
    strategy_class: str
    transformer_cls_name: str
    calibration: CalibrationResult
    entry: CalibrationEntry
    replaced: bool
    threshold: float
    max_skip_steps: int
    retention_ratio: float
    mypy: str = "passed"


# -- checks of the options --------------------------------------------------------------------------
def check_options(options: ScaffoldOptions) -> None:
    """Usage errors that need no model: raised before anything loads."""
    if options.steps < 2:
        raise UsageError(f"--steps must be at least 2 (a ratio curve needs two steps), got {options.steps}")
    if options.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {options.seeds}")
    if options.prompts is not None and not [p for p in options.prompts if p.strip()]:
        raise UsageError("the prompt list is empty; give at least one prompt, or leave --prompts out for the defaults")
    for label, value in (("--height", options.height), ("--width", options.width)):
        if value is not None and value < 1:
            raise UsageError(f"{label} must be a positive number of pixels, got {value}")
    if options.name is not None:
        check_module_name(options.name)
    if options.driver is not None:
        load_driver(options.driver)  # a bad path or signature fails now, not after inspection
    if options.plot is not None and options.plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {options.plot}: give a .png file name")
    if is_pipeline_target(options.model):
        check_pipeline_folder(options.model)
    elif not Path(options.model).exists() and ("/" in options.model or os.sep in options.model):
        head = options.model.split(":")[0]
        if not Path(head).exists():
            raise UsageError(
                f"--model {options.model!r}: no such file or folder; give a diffusers pipeline folder "
                "(model_index.json), a transformer folder (config.json), a class name or file.py:Class"
            )


def _calibrate(
    loaded: LoadedModel, strategy: MagCacheStrategy, options: ScaffoldOptions, progress: bool
) -> tuple[CalibrationResult, CalibrationEntry]:
    return run_calibration(
        loaded,
        strategy,
        steps=options.steps,
        prompts=[p.strip() for p in options.prompts if p.strip()] if options.prompts is not None else None,
        seeds=options.seeds,
        driver=options.driver,
        height=options.height,
        width=options.width,
        progress=progress,
        call_kwargs=options.call_kwargs,
    )


def _check_transformer(loaded: LoadedModel, expected: str, where: str) -> None:
    if loaded.transformer_cls_name != expected:
        raise UsageError(
            f"--model {loaded.target!r} holds a {loaded.transformer_cls_name}, but {where} is for {expected}; "
            "point --model at the model the strategy was made for"
        )


def _strategy_from_text(text: str, filename: str, transformer: str) -> MagCacheStrategy:
    """An instance of the strategy in ``text`` (imported from a temporary copy, registry untouched)."""
    with tempfile.TemporaryDirectory(prefix="magsdk-strategy-") as tmp:
        path = Path(tmp) / filename
        path.write_text(text, encoding="utf-8")
        with isolated_registry():
            return load_strategy(path, transformer)()


def _guard_existing(path: Path, new_text: str, options: ScaffoldOptions, compare_calibrations: bool) -> None:
    """Refuse to replace a file that has edits scaffold would lose (unless ``force``)."""
    if options.force or not path.exists():
        return
    old = path.read_text(encoding="utf-8")
    if old == new_text:
        return
    if compare_calibrations:
        try:
            if strip_calibrations(old, path.name) == strip_calibrations(new_text, path.name):
                return
        except StrategyFileError:
            pass
    raise UsageError(
        f"{path} exists and differs from what scaffold generates (edited by hand, or made for another model). "
        f"To add or refresh a calibration in it run `magsdk calibrate {path} --model {options.model} --steps "
        f"{options.steps}`; to replace it, pass --force or choose another --name / --out. Nothing was written."
    )


# -- scaffold ---------------------------------------------------------------------------------------
def run_scaffold(options: ScaffoldOptions, *, progress: bool = True) -> ScaffoldResult:
    """Inspect the model, render its strategy, calibrate it, validate, and only then write."""
    from magsdk.inspect import inspect_target

    check_options(options)
    report = inspect_target(options.model)
    spec = spec_from_report(report, model=options.model, module_name=options.name)
    module_path = options.out_dir / f"{spec.module_name}.py"
    test_path = options.out_dir / "tests" / f"test_{spec.module_name}.py" if options.with_test else None
    skeleton = render_strategy(spec)
    test_text = None
    if test_path is not None:
        test_text = render_test(spec, module_relpath=f"../{module_path.name}",
                                model_relpath=_relative_model_path(options.model, test_path.parent))
    _guard_existing(module_path, skeleton, options, compare_calibrations=True)
    if test_path is not None and test_text is not None:
        _guard_existing(test_path, test_text, options, compare_calibrations=False)
    if spec.unsupported_layouts:
        _write_skeleton(spec, skeleton, module_path, test_path, test_text, options)

    strategy = _strategy_from_text(skeleton, module_path.name, report.transformer)
    loaded = load_model(options.model)
    _check_transformer(loaded, report.transformer, f"the inspection of {options.model}")
    result, entry = _calibrate(loaded, strategy, options, progress)
    final = upsert_calibration(skeleton, entry, module_path.name)
    check = validate_strategy_text(final, module_path.name, expected_transformer=report.transformer)

    atomic_write_text(module_path, final)
    if test_path is not None and test_text is not None:
        atomic_write_text(test_path, test_text)
    stored = _stored_entry(check, entry)
    if options.plot is not None:
        from magsdk.calibration.plot import plot_calibration

        plot_calibration(stored, options.plot, title=f"{spec.class_name}: {report.transformer}")
    return ScaffoldResult(
        module_path=module_path,
        test_path=test_path,
        strategy_class=check.strategy_class,
        transformer_cls_name=report.transformer,
        calibration=result,
        report=report,
        entry=stored,
        mypy=check.mypy,
    )


def _relative_model_path(model: str, test_dir: Path) -> tuple[str, str] | None:
    """A local model's path as seen from the test folder, so the test finds it from any working directory."""
    head, sep, tail = model.rpartition(":") if ".py:" in model else (model, "", "")
    path = Path(head)
    if not path.exists():
        return None
    return Path(os.path.relpath(path.resolve(), test_dir.resolve())).as_posix(), sep + tail


def _stored_entry(check: ModuleCheck, entry: CalibrationEntry) -> CalibrationEntry:
    """The entry as it reads back from the written file (rounded floats)."""
    for stored in check.calibrations:
        if stored.num_steps == entry.num_steps:
            return stored
    return round_entry(entry)


def _write_skeleton(
    spec: StrategySpec,
    skeleton: str,
    module_path: Path,
    test_path: Path | None,
    test_text: str | None,
    options: ScaffoldOptions,
) -> None:
    """A layout the runtime cannot take: write the uncalibrated module with its stub and stop."""
    validate_strategy_text(skeleton, module_path.name, expected_transformer=spec.transformer_cls_name)
    atomic_write_text(module_path, skeleton)
    if test_path is not None and test_text is not None:
        atomic_write_text(test_path, test_text)
    raise MagSDKError(
        f"wrote {module_path} without a calibration: the inspection reports a block layout the runtime cannot "
        f"take the residual of ({'; '.join(spec.unsupported_layouts)}). Implement "
        f"{spec.class_name}.compute_residual in that file (a stub that raises is there), then run "
        f"`magsdk calibrate {module_path} --model {options.model} --steps {options.steps}`."
    )


# -- calibrate --------------------------------------------------------------------------------------
def calibrate_file(strategy_file: Path, options: ScaffoldOptions, *, progress: bool = True) -> CalibrateOutcome:
    """Add or refresh the ``options.steps`` entry of an existing strategy file; nothing else changes."""
    check_options(options)
    path = Path(strategy_file)
    if not path.is_file():
        raise UsageError(f"{path}: no such strategy file; create one with `magsdk scaffold --model {options.model}`")
    original = path.read_text(encoding="utf-8")
    parse_strategy_source(original, path.name)
    read_calibrations(original, path.name)  # the literal must be rewritable before any work starts
    with isolated_registry():
        module = import_from_path(path)
        found = strategies_in(module)
    if not found:
        raise StrategyFileError(f"{path} defines no MagCacheStrategy subclass with a transformer_cls_name")
    strategy_cls = found[0]
    loaded = load_model(options.model)
    _check_transformer(loaded, strategy_cls.transformer_cls_name, f"{path.name} ({strategy_cls.__name__})")
    result, entry = _calibrate(loaded, strategy_cls(), options, progress)

    current = path.read_text(encoding="utf-8")  # the user may have saved edits while we calibrated
    replaced = any(e.get("num_steps") == entry.num_steps for e in read_calibrations(current, path.name))
    patched = upsert_calibration(current, entry, path.name)
    check = validate_strategy_text(patched, path.name, expected_transformer=strategy_cls.transformer_cls_name)
    atomic_write_text(path, patched)
    stored = _stored_entry(check, entry)
    if options.plot is not None:
        from magsdk.calibration.plot import plot_calibration

        plot_calibration(stored, options.plot, title=f"{strategy_cls.__name__}: {strategy_cls.transformer_cls_name}")
    return CalibrateOutcome(
        path=path,
        strategy_class=strategy_cls.__name__,
        transformer_cls_name=strategy_cls.transformer_cls_name,
        calibration=result,
        entry=stored,
        replaced=replaced,
        threshold=strategy_cls.threshold,
        max_skip_steps=strategy_cls.max_skip_steps,
        retention_ratio=strategy_cls.retention_ratio,
        mypy=check.mypy,
    )


def run_calibrate(strategy_file: Path, options: ScaffoldOptions, *, progress: bool = True) -> CalibrationEntry:
    """``magsdk calibrate`` as a function; returns the entry as written (floats rounded)."""
    return calibrate_file(strategy_file, options, progress=progress).entry


def strategy_defaults(module_path: Path) -> dict[str, Any]:
    """threshold / max_skip_steps / retention_ratio of the strategy in a written module."""
    with isolated_registry():
        found = strategies_in(import_from_path(module_path))
    if not found:
        raise MagSDKError(f"{module_path} defines no strategy")
    cls = found[0]
    return {"threshold": cls.threshold, "max_skip_steps": cls.max_skip_steps, "retention_ratio": cls.retention_ratio}
