"""Validate a strategy module before it replaces the user's file.

Every check runs on a temporary copy: the calibration literal is re-read through the pydantic
models, the module is imported from its path into a fresh namespace, its strategy must register,
and ``mypy --strict`` must pass. Only then is the file written, atomically; any failure leaves
the previous file as it was and says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import magsdk
from magsdk.codegen.patch import CALIBRATIONS_NAME, read_calibrations
from magsdk.config import MAX_PROBES, CalibrationEntry, atomic_write_text
from magsdk.errors import MagSDKError
from magsdk.registry import StrategyRegistry, strategies_of_module
from magsdk.strategy import MagCacheStrategy

#: Seconds one mypy run may take (a cold cache over magsdk's imports takes the longest).
MYPY_TIMEOUT = 300
MYPY_ENV = "MAGSDK_SKIP_MYPY"


class StrategyValidationError(MagSDKError):
    """A generated or patched strategy module failed a check; nothing was written."""


class ModuleCheck(BaseModel):
    """What validation established about a strategy module."""

    model_config = ConfigDict(extra="forbid")

    strategy_class: str
    transformer_cls_name: str
    calibrations: list[CalibrationEntry] = Field(default_factory=list)
    mypy: str = "passed"  # "passed" or why it was skipped


# -- calibration literal ----------------------------------------------------------------------------
def check_calibrations(raw: list[dict[str, object]], filename: str) -> list[CalibrationEntry]:
    """Re-read the literal through ``CalibrationEntry``, plus what the model alone does not enforce."""
    entries: list[CalibrationEntry] = []
    problems: list[str] = []
    seen: dict[int, int] = {}
    for index, item in enumerate(raw):
        label = f"{CALIBRATIONS_NAME}[{index}]"
        try:
            entry = CalibrationEntry.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            problems.append(f"{label}{'.' + where if where else ''}: {first['msg']}")
            continue
        label = f"{label} (num_steps={entry.num_steps})"
        if entry.num_steps in seen:
            other = f"{CALIBRATIONS_NAME}[{seen[entry.num_steps]}]"
            problems.append(f"{label}: another entry ({other}) has the same step count")
        seen.setdefault(entry.num_steps, index)
        for branch, curve in entry.branches.items():
            if curve[0] != 1.0:
                problems.append(f"{label}: branches[{branch!r}][0] is {curve[0]!r}; the first ratio must be 1.0")
        for branch, values in entry.spread.items():
            if branch not in entry.branches:
                problems.append(f"{label}: spread[{branch!r}] has no curve in branches")
            if len(values) != entry.num_steps:
                problems.append(f"{label}: spread[{branch!r}] has {len(values)} values, expected {entry.num_steps}")
            if any(not math.isfinite(v) or v < 0 for v in values):
                problems.append(f"{label}: spread[{branch!r}] holds a negative or non-finite value")
        problems += _probe_problems(entry, label)
        if entry.timesteps and len(entry.timesteps) != entry.num_steps:
            problems.append(f"{label}: timesteps has {len(entry.timesteps)} values, expected {entry.num_steps}")
        entries.append(entry)
    if problems:
        raise StrategyValidationError(f"{filename}: invalid calibration: " + "; ".join(problems))
    return entries


def _probe_problems(entry: CalibrationEntry, label: str) -> list[str]:
    """What ``CalibrationEntry`` lets through (it checks the probes' branches and lengths) but no
    ``magsdk.calibrate`` writes: a branch with no probes, or branches probed unlike each other, whose probes the
    runtime cannot average where it follows the curves' mean (it would drop them)."""
    if not entry.probes:
        return []
    problems: list[str] = []
    per_step = {branch: len(values) // (entry.num_steps - 1) for branch, values in entry.probes.items()}
    for branch, per in per_step.items():
        if not 1 <= per <= MAX_PROBES:
            problems.append(f"{label}: probes[{branch!r}] has {per} probes per step, expected 1 to {MAX_PROBES}")
    if len(set(per_step.values())) > 1:
        counts = ", ".join(f"{branch!r}: {per}" for branch, per in per_step.items())
        problems.append(f"{label}: the branches have different probe counts per step ({counts}); one calibration "
                        "probes every branch alike")
    return problems


# -- importing --------------------------------------------------------------------------------------
@contextlib.contextmanager
def isolated_registry() -> Iterator[None]:
    """Let a module register strategies, then put both registries back as they were."""
    with StrategyRegistry.isolated():
        yield


def import_from_path(path: Path) -> ModuleType:
    """Execute a module file in a fresh namespace (never the cached module of the same name)."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"_magsdk_strategy_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise StrategyValidationError(f"cannot import {path}: not a Python module file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses / pydantic look their module up while the body runs
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise StrategyValidationError(f"{path.name} does not import: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.modules.pop(name, None)
    return module


def strategies_in(module: ModuleType) -> list[type[MagCacheStrategy]]:
    return strategies_of_module(module)


def load_strategy(path: Path, expected_transformer: str | None = None) -> type[MagCacheStrategy]:
    """Import a strategy file and return its strategy class. Call inside ``isolated_registry()``."""
    module = import_from_path(path)
    found = strategies_in(module)
    if not found:
        raise StrategyValidationError(
            f"{path.name} defines no MagCacheStrategy subclass with a transformer_cls_name; nothing would register"
        )
    if expected_transformer is not None:
        found = [c for c in found if c.transformer_cls_name == expected_transformer] or found
    strategy = found[0]
    if StrategyRegistry.get(strategy.transformer_cls_name) is not strategy:
        raise StrategyValidationError(
            f"{path.name}: {strategy.__name__} did not register for {strategy.transformer_cls_name!r}"
        )
    if expected_transformer is not None and strategy.transformer_cls_name != expected_transformer:
        raise StrategyValidationError(
            f"{path.name}: {strategy.__name__} is for {strategy.transformer_cls_name!r}, but the model's "
            f"transformer is {expected_transformer!r}"
        )
    return strategy


# -- mypy -------------------------------------------------------------------------------------------
def _mypy_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "magsdk" / "mypy"


_MYPY_CONFIG = """[mypy]
strict = True
ignore_missing_imports = True
follow_imports = silent
warn_unused_configs = False
{plugins}
{mypy_path}
[mypy-torch.*]
follow_imports = skip
[mypy-diffusers.*]
follow_imports = skip
[mypy-transformers.*]
follow_imports = skip
"""


def _source_root_setting() -> str:
    """Point mypy at magsdk's sources when it is not in site-packages (an editable install uses an
    import hook that mypy cannot follow; mypy refuses site-packages itself on its path)."""
    root = Path(magsdk.__file__).resolve().parent.parent
    if {"site-packages", "dist-packages"} & set(root.parts):
        return ""
    return f"mypy_path = {root}"


def run_mypy(path: Path) -> str:
    """``mypy --strict`` on one file; returns "passed" or why it was skipped, raises on errors."""
    if os.environ.get(MYPY_ENV):
        return f"skipped (${MYPY_ENV} is set)"
    if importlib.util.find_spec("mypy") is None:
        return "skipped (mypy is not installed; `pip install mypy` to check generated modules)"
    plugins = "plugins = pydantic.mypy" if importlib.util.find_spec("pydantic.mypy") else ""
    config = path.parent / "magsdk-mypy.ini"
    config.write_text(_MYPY_CONFIG.format(plugins=plugins, mypy_path=_source_root_setting()))
    command = [
        sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(_mypy_cache_dir()),
        "--no-error-summary", "--hide-error-context", "--no-color-output", str(path),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=MYPY_TIMEOUT, cwd=path.parent)
    except subprocess.TimeoutExpired as exc:
        raise StrategyValidationError(f"mypy --strict on {path.name} took over {MYPY_TIMEOUT} s") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().replace(str(path), path.name)
        raise StrategyValidationError(f"mypy --strict fails on {path.name}:\n{output}")
    return "passed"


# -- the whole check, then the write ----------------------------------------------------------------
def validate_strategy_text(
    text: str,
    filename: str,
    *,
    expected_transformer: str | None = None,
    mypy: bool = True,
) -> ModuleCheck:
    """Run every check on a temporary copy named like the target file; nothing is written elsewhere."""
    entries = check_calibrations(read_calibrations(text, filename), filename)
    with tempfile.TemporaryDirectory(prefix="magsdk-validate-") as tmp:
        copy = Path(tmp) / filename
        copy.write_text(text, encoding="utf-8")
        with isolated_registry():
            strategy = load_strategy(copy, expected_transformer)
            loaded = list(strategy.calibrations)
        if sorted(e.model_dump_json() for e in loaded) != sorted(e.model_dump_json() for e in entries):
            raise StrategyValidationError(
                f"{filename}: {strategy.__name__}.calibrations does not hold the {CALIBRATIONS_NAME} literal; "
                f"keep `calibrations = load_calibrations({CALIBRATIONS_NAME})` in the class"
            )
        mypy_status = run_mypy(copy) if mypy else "skipped"
    return ModuleCheck(
        strategy_class=strategy.__name__,
        transformer_cls_name=strategy.transformer_cls_name,
        calibrations=entries,
        mypy=mypy_status,
    )


def write_validated(
    path: Path, text: str, *, expected_transformer: str | None = None, mypy: bool = True
) -> ModuleCheck:
    """Validate ``text`` as ``path`` would be, then replace ``path`` atomically."""
    check = validate_strategy_text(text, path.name, expected_transformer=expected_transformer, mypy=mypy)
    atomic_write_text(path, text)
    return check
