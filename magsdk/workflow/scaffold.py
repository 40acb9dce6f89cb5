"""``magsdk scaffold`` as a function: inspect → render → calibrate → patch → validate → write.

Every check runs before the first byte is written: the options, the template, the model loads
and calibrates, the patched module validates (pydantic, import, registration, ``mypy --strict``).
Only then are the module (and its test) replaced atomically. Re-scaffolding a module keeps every
calibration it does not measure again (the result says which it kept and which it replaced).

``scaffold_from_cache`` takes the curve from the user cache that ``enable(auto_calibrate=True)``
fills instead of calibrating, and goes through the same render / validate / write path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from magsdk.calibration.drivers import LoadedModel
from magsdk.calibration.settings import CalibrationSettings
from magsdk.codegen.patch import upsert_calibration
from magsdk.codegen.render import StrategySpec, check_module_name, render_strategy, render_test, spec_from_report
from magsdk.codegen.validate import isolated_registry, load_strategy, validate_strategy_text
from magsdk.config import CalibrationEntry, CalibrationResult, InspectionReport, atomic_write_text
from magsdk.errors import MagSDKError, UsageError
from magsdk.runtime import distributed
from magsdk.strategy import MagCacheStrategy
from magsdk.workflow.common import (
    CalibrationOptions,
    Existing,
    Log,
    calibrate_loaded,
    check_options,
    check_transformer,
    command_line,
    default_strategy_name,
    existing_module,
    inspect_model,
    kept_and_replaced,
    load,
    merge_calibrations,
    name_note,
    plot,
    quiet,
    relative_model_path,
    stored_entry,
)

COMMAND = "magsdk scaffold"


class ScaffoldOptions(CalibrationOptions):
    """What ``magsdk scaffold`` takes on the command line."""

    name: str | None = None
    out_dir: Path = Path("strategies")
    with_test: bool = True
    #: Replace an existing module even when it differs from what scaffold generates.
    force: bool = False
    #: A cached curve (its id, a prefix of it, or a cache file) instead of calibrating; "" for the only one.
    from_cache: str | None = None


class ScaffoldResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    module_path: Path
    test_path: Path | None
    strategy_class: str
    transformer_cls_name: str
    calibration: CalibrationResult
    report: InspectionReport
    entry: CalibrationEntry
    settings: CalibrationSettings | None = None
    threshold: float
    max_skip_steps: int
    retention_ratio: float
    #: Step counts of entries already in the module: kept as they were, or measured again.
    kept: list[int] = Field(default_factory=list)
    replaced: list[int] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    mypy: str = "passed"


class _Prepared(BaseModel):
    """Everything decided before the model runs."""

    model_config = ConfigDict(extra="forbid")

    report: InspectionReport
    spec: StrategySpec
    module_path: Path
    test_path: Path | None
    skeleton: str
    test_text: str | None
    existing: Existing
    notes: list[str]


def _prepare(options: ScaffoldOptions, report: InspectionReport, model: str) -> _Prepared:
    notes: list[str] = []
    if options.name is not None:
        check_module_name(options.name)
        note = name_note(options.name)
        name = options.name
    else:
        name, note = default_strategy_name(model, report.transformer)
    if note:
        notes.append(note)
    spec = spec_from_report(report, model=model, module_name=name)
    module_path = options.out_dir / f"{spec.module_name}.py"
    test_path = options.out_dir / "tests" / f"test_{spec.module_name}.py" if options.with_test else None
    skeleton = render_strategy(spec)
    test_text = None
    if test_path is not None:
        test_text = render_test(spec, module_relpath=f"../{module_path.name}",
                                model_relpath=relative_model_path(model, test_path.parent),
                                inputs=options.inputs,
                                inputs_relpath=_relative_inputs_path(options.inputs, test_path.parent))
    rerun = command_line("magsdk", "calibrate", str(module_path), "--model", model, options=options)
    existing = existing_module(module_path, skeleton, report.transformer, force=options.force, rerun=rerun)
    if existing.dropped:
        notes.append(existing.dropped)
    if test_path is not None and test_text is not None and test_path.exists() and not options.force:
        if test_path.read_text(encoding="utf-8") != test_text:
            # The test is the user's to edit too: keep theirs rather than refuse or overwrite.
            notes.append(f"kept {test_path} as it is (it differs from the generated test; --force replaces it)")
            test_text = None
    return _Prepared(report=report, spec=spec, module_path=module_path, test_path=test_path, skeleton=skeleton,
                     test_text=test_text, existing=existing, notes=notes)


def _relative_inputs_path(spec: str | None, test_dir: Path) -> tuple[str, str] | None:
    """An ``--inputs`` file as seen from the test folder (path, ``":FUNC"``), so the test finds it anywhere.

    ``FILE.py:FUNC`` names a file; ``pkg.module:FUNC`` one in the working directory when there is one
    (as ``--inputs`` looks it up), else an importable module, which the test imports by name (None).
    """
    if spec is None:
        return None
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
    elif where and all(part.isidentifier() for part in where.split(".")):
        path = Path.cwd().joinpath(*where.split(".")).with_suffix(".py")
    else:
        return None
    if not path.is_file():
        return None
    return Path(os.path.relpath(path.resolve(), test_dir.resolve())).as_posix(), f":{name}"


def _strategy_from_text(text: str, filename: str, transformer: str) -> type[MagCacheStrategy]:
    """The strategy class in ``text`` (imported from a temporary copy, registry untouched)."""
    with tempfile.TemporaryDirectory(prefix="magsdk-strategy-") as tmp:
        path = Path(tmp) / filename
        path.write_text(text, encoding="utf-8")
        with isolated_registry():
            return load_strategy(path, transformer)


def run_scaffold(
    options: ScaffoldOptions, *, progress: bool = True, log: Log = quiet, loaded: LoadedModel | None = None
) -> ScaffoldResult:
    """Inspect the model, render its strategy, calibrate it, validate, and only then write.

    ``loaded`` reuses a model the caller already loaded (``magsdk demo``).
    """
    if options.from_cache is not None:
        return scaffold_from_cache(options, log=log)
    if options.model is None:
        raise UsageError("give --model TARGET (the model to inspect and calibrate), or --from-cache for a cached curve")
    check_options(options)
    model = options.model
    report = inspect_model(model, options, COMMAND)
    prepared = _prepare(options, report, model)
    if prepared.spec.unsupported_layouts:
        _write_skeleton(prepared, options)

    strategy_cls = _strategy_from_text(prepared.skeleton, prepared.module_path.name, report.transformer)
    loaded = loaded or load(options)
    check_transformer(loaded, report.transformer, f"the inspection of {model}")
    result, entry, settings = calibrate_loaded(
        loaded, strategy_cls(), options, command=COMMAND, log=log, progress=progress,
        timestep_name=report.timestep_argument_name,
    )
    return _finish(prepared, options, strategy_cls, result, entry, settings)


def _finish(
    prepared: _Prepared,
    options: ScaffoldOptions,
    strategy_cls: type[MagCacheStrategy],
    result: CalibrationResult,
    entry: CalibrationEntry,
    settings: CalibrationSettings | None,
) -> ScaffoldResult:
    report, path = prepared.report, prepared.module_path
    if not distributed.is_main_process():  # every rank holds the same result; rank 0 writes it
        return ScaffoldResult(
            module_path=path, test_path=None, strategy_class=prepared.spec.class_name,
            transformer_cls_name=report.transformer, calibration=result, report=report, entry=entry,
            settings=settings, threshold=strategy_cls.threshold, max_skip_steps=strategy_cls.max_skip_steps,
            retention_ratio=strategy_cls.retention_ratio, notes=prepared.notes, mypy="not run on this rank",
        )
    final = merge_calibrations(prepared.skeleton, prepared.existing, entry, path.name)
    check = validate_strategy_text(final, path.name, expected_transformer=report.transformer)
    atomic_write_text(path, final)
    if prepared.test_path is not None and prepared.test_text is not None:
        atomic_write_text(prepared.test_path, prepared.test_text)
    stored = stored_entry(check, entry)
    plot(stored, options.plot, f"{prepared.spec.class_name}: {report.transformer}")
    kept, replaced = kept_and_replaced(prepared.existing, entry)
    return ScaffoldResult(
        module_path=path,
        test_path=prepared.test_path if prepared.test_text is not None else None,
        strategy_class=check.strategy_class,
        transformer_cls_name=report.transformer,
        calibration=result,
        report=report,
        entry=stored,
        settings=settings,
        threshold=strategy_cls.threshold,
        max_skip_steps=strategy_cls.max_skip_steps,
        retention_ratio=strategy_cls.retention_ratio,
        kept=kept,
        replaced=replaced,
        notes=prepared.notes,
        mypy=check.mypy,
    )


def _write_skeleton(prepared: _Prepared, options: ScaffoldOptions) -> None:
    """A layout the runtime cannot take: write the uncalibrated module with its stub and stop."""
    spec, path = prepared.spec, prepared.module_path
    text = prepared.skeleton
    for old in prepared.existing.entries:  # earlier calibrations are never lost
        text = upsert_calibration(text, old, path.name)
    if distributed.is_main_process():
        validate_strategy_text(text, path.name, expected_transformer=spec.transformer_cls_name)
        atomic_write_text(path, text)
        if prepared.test_path is not None and prepared.test_text is not None:
            atomic_write_text(prepared.test_path, prepared.test_text)
    rerun = command_line("magsdk", "calibrate", str(path), "--model", str(options.model), options=options)
    raise MagSDKError(
        f"wrote {path} without a calibration: the inspection reports a block layout the runtime cannot "
        f"take the residual of ({'; '.join(spec.unsupported_layouts)}). Implement "
        f"{spec.class_name}.compute_residual in that file (a stub that raises is there), then run `{rerun}`."
    )


# -- from the cache ---------------------------------------------------------------------------------
def scaffold_from_cache(options: ScaffoldOptions, *, log: Log = quiet) -> ScaffoldResult:
    """A strategy module from a curve ``enable(auto_calibrate=True)`` cached: no generation runs."""
    from magsdk.workflow.cache import entry_from_record, find_cached

    check_options(options)
    ignored = [flag for flag, value in (
        ("--steps", options.steps), ("--prompts", options.prompts), ("--seeds", options.seeds),
        ("--driver", options.driver), ("--height", options.height), ("--width", options.width),
        ("--call-arg", options.call_kwargs or None), ("--device", options.device), ("--dtype", options.dtype),
        ("--probes", options.probes or None),
    ) if value is not None]
    if ignored:
        raise UsageError(
            f"--from-cache takes the curve as it was measured; {', '.join(ignored)} would not be used. Leave "
            f"{'it' if len(ignored) == 1 else 'them'} out, or calibrate anew with `magsdk scaffold --model ...`"
        )
    path, record = find_cached(options.from_cache or "")
    key = record.key
    if options.model is not None:
        target, config = options.model, None
    else:
        module = record.transformer_module
        target = f"{module}:{key.transformer}" if module else key.transformer
        config = dict(record.transformer_config) or None
    log(f"cached curve: {path}")
    report = inspect_model(target, options, COMMAND, config=config, config_from_model=True)
    if report.transformer != key.transformer:
        raise UsageError(
            f"--model {target!r} holds a {report.transformer}, but the cached curve {path.stem} is for "
            f"{key.transformer}; leave --model out or point it at that model"
        )
    prepared = _prepare(options, report, target)
    if prepared.spec.unsupported_layouts:
        _write_skeleton(prepared, options)
    strategy_cls = _strategy_from_text(prepared.skeleton, prepared.module_path.name, report.transformer)
    entry = entry_from_record(path, record)
    return _finish(prepared, options, strategy_cls, record.result, entry, None)


__all__ = ["ScaffoldOptions", "ScaffoldResult", "run_scaffold", "scaffold_from_cache"]
