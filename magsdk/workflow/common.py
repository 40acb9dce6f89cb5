"""What ``scaffold`` and ``calibrate`` share: their options, the checks that need no model, the
inspection with the user's ``--inputs``, the module name, and the guard that keeps calibrations.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from magsdk.calibration.drivers import (
    LoadedModel,
    check_pipeline_folder,
    is_pipeline_target,
    load_driver,
    load_model,
    resolve_settings,
    run_calibration,
)
from magsdk.calibration.settings import CalibrationRequest, CalibrationSettings, parse_device, parse_dtype
from magsdk.codegen.literal import round_entry
from magsdk.codegen.patch import StrategyFileError, read_calibrations, strip_calibrations, upsert_calibration
from magsdk.codegen.render import check_module_name, default_module_name
from magsdk.codegen.validate import ModuleCheck, StrategyValidationError, check_calibrations
from magsdk.config import MAX_PROBES, CalibrationEntry, CalibrationResult, InspectionReport
from magsdk.errors import MagSDKError, UsageError
from magsdk.registry import bundled_module_names
from magsdk.strategy import MagCacheStrategy
from magsdk.workflow.checks import (
    check_steps,
    command_name,
    download_command,
    download_note,
    local_folder_name,
    looks_like_hub_id,
    missing_path_error,
    with_model,
)

Log = Callable[[str], None]


def quiet(_: str) -> None:
    """A ``log`` that prints nothing."""


class CalibrationOptions(BaseModel):
    """The options ``scaffold`` and ``calibrate`` share (``None``: take it from the model)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    steps: int | None = None
    prompts: list[str] | None = None
    #: Where the prompts came from, for the summary (e.g. "--prompts my_prompts.txt").
    prompts_source: str | None = None
    seeds: int | None = None
    driver: str | None = None
    inputs: str | None = None
    plot: Path | None = None
    height: int | None = None
    width: int | None = None
    #: Extra keyword arguments for every pipeline call (e.g. ``true_cfg_scale``, ``negative_prompt``).
    call_kwargs: dict[str, Any] = Field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    #: Between-step probes per step (``--probes P``; 0: none): P more transformer calls per step.
    probes: int = 0
    #: The command as the user typed it; hints that add an option repeat it.
    invocation: str | None = None

    def request(self) -> CalibrationRequest:
        return CalibrationRequest(
            steps=self.steps, prompts=self.prompts, prompts_source=self.prompts_source, seeds=self.seeds,
            height=self.height, width=self.width, call_kwargs=dict(self.call_kwargs), device=self.device,
            dtype=self.dtype, driver=self.driver, inputs=self.inputs, probes=self.probes,
        )


def option_args(options: CalibrationOptions) -> str:
    """The calibration options the user gave, as command-line text: hints that suggest another
    command carry them over, so following a hint calibrates the same way."""
    parts: list[str] = []
    for flag, value in (("--steps", options.steps), ("--seeds", options.seeds), ("--height", options.height),
                        ("--width", options.width), ("--device", options.device), ("--dtype", options.dtype),
                        ("--driver", options.driver), ("--inputs", options.inputs),
                        ("--probes", options.probes or None)):
        if value is not None:
            parts += [flag, str(value)]
    if options.prompts_source and options.prompts_source.startswith("--prompts "):
        parts += ["--prompts", options.prompts_source.removeprefix("--prompts ")]
    for key, value in options.call_kwargs.items():
        parts += ["--call-arg", f"{key}={json.dumps(value)}"]
    return shlex.join(parts)


def command_line(*words: str, options: CalibrationOptions) -> str:
    """``words`` plus the user's calibration options, quoted for a shell."""
    extra = option_args(options)
    return shlex.join(words) + (f" {extra}" if extra else "")


# -- checks that need no model ----------------------------------------------------------------------
def check_options(options: CalibrationOptions) -> None:
    """Usage errors that need no model: raised before anything loads."""
    check_steps(options.steps)
    check_probes_option(options.probes)
    if options.seeds is not None and options.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {options.seeds}")
    if options.prompts is not None and not [p for p in options.prompts if p.strip()]:
        raise UsageError("the prompt list is empty; give at least one prompt, or leave --prompts out for the defaults")
    for label, value in (("--height", options.height), ("--width", options.width)):
        if value is not None and value < 1:
            raise UsageError(f"{label} must be a positive number of pixels, got {value}")
    options.device = parse_device(options.device)
    options.dtype = parse_dtype(options.dtype)
    if options.driver is not None:
        load_driver(options.driver)  # a bad path or signature fails now, not after inspection
    if options.inputs is not None:
        check_inputs_spec(options.inputs)
    if options.plot is not None and options.plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {options.plot}: give a .png file name")
    if options.model is not None:
        # scaffold --from-cache only inspects the model: its config is enough
        weights = getattr(options, "from_cache", None) is None
        check_model(options.model, weights=weights, invocation=options.invocation)


def check_probes_option(probes: int) -> None:
    """``--probes`` out of range fails here, before a model loads, in the option's own terms."""
    if not 0 <= probes <= MAX_PROBES:
        raise UsageError(
            f"--probes must be a whole number from 0 (no probes) to {MAX_PROBES}, got {probes}: it is how many "
            "timesteps between two steps calibration measures the curve at, e.g. --probes 4"
        )


def check_inputs_spec(spec: str) -> None:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UsageError(f"--inputs {spec!r}: expected FILE.py:FUNC, a function returning (args, kwargs)")
    if where.endswith(".py") and not Path(where).is_file():
        raise UsageError(f"--inputs {spec!r}: file {where} does not exist")


def check_model(model: str, *, weights: bool = True, invocation: str | None = None) -> None:
    """``--model`` problems found without loading anything.

    A local path that does not exist is reported as such before the value is taken for a Hub id
    (``./nope`` is shaped like ``org/name``); a Hub id that is neither in the local cache nor reachable
    gets a download hint for this command (``weights``: the command runs the pipeline, so it needs the
    whole model, not only its config); a pipeline folder must have a transformer.
    """
    head = model.rpartition(":")[0] if ".py:" in model else model
    if Path(head).exists():
        if is_pipeline_target(model):
            check_pipeline_folder(model)
        return
    if looks_like_hub_id(model):
        check_hub_model(model, weights=weights, invocation=invocation)
    elif "/" in head or os.sep in head:
        raise missing_path_error(model)


def check_hub_model(repo_id: str, *, weights: bool, invocation: str | None) -> None:
    """A Hub id that ``from_pretrained`` cannot get here (not cached, Hub unreachable) is a usage error
    saying how to bring the model over, and what a config-only folder gives this command."""
    from huggingface_hub import try_to_load_from_cache

    from magsdk.inspect.targets import _hub_reachable

    needed = ["model_index.json"] if weights else ["transformer/config.json", "config.json"]
    try:
        cached = any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in needed)
    except ValueError:  # huggingface_hub's HFValidationError: not a repo id after all ("a--b/c"), so a missing path
        raise missing_path_error(repo_id) from None
    if cached or _hub_reachable():
        return
    command = command_name(invocation) or "scaffold"
    local = local_folder_name(repo_id)
    start = (
        f"--model {repo_id!r} looks like a Hugging Face Hub id (there is no local folder {Path(repo_id).resolve()}), "
        f"but {'the pipeline' if weights else 'its config'} is not in the local Hugging Face cache and the Hub "
        "cannot be reached (offline?). "
    )
    config_only = with_model(invocation, f"{local}/transformer", f"magsdk {command}")
    if not weights:
        raise UsageError(
            start + f"`--from-cache` takes the curve from the cache and only inspects the model, so its config is "
            f"enough: on a machine with network run `{download_command(repo_id, 'transformer/config.json')}`, "
            f"bring the folder here and run `{config_only}`"
        )
    raise UsageError(
        start + f"`magsdk {command}` calibrates on the pipeline's own generations, so it needs the whole pipeline "
        f"with its weights: {download_note(repo_id)}, bring the folder here and run "
        f"`{with_model(invocation, local, f'magsdk {command}')}`. A folder with only the transformer's config "
        f"(`{download_command(repo_id, 'transformer/config.json')}`, then `{config_only}`) gives a synthetic "
        "calibration: random weights on synthesized inputs, a curve of the architecture, not of the trained model"
    )


# -- inspection -------------------------------------------------------------------------------------
def inspect_model(
    target: str, options: CalibrationOptions, command: str, config: dict[str, Any] | None = None,
    config_from_model: bool = False,
) -> InspectionReport:
    """``inspect_target`` with the user's ``--inputs``; a synthesis error says how to pass them here."""
    from magsdk.inspect import inspect_target
    from magsdk.inspect.inputs import InputSynthesisError

    try:
        return inspect_target(target, config=config, inputs=options.inputs, config_from_model=config_from_model)
    except InputSynthesisError as exc:
        raise inputs_hint(exc, target, options, command) from None


def inputs_hint(exc: Any, target: str, options: CalibrationOptions, command: str) -> UsageError:
    """The synthesis error rewritten for the command that was run: its own ``--inputs`` option."""
    names = [exc.parameter]
    try:
        from magsdk.inspect import resolve_target

        forward = inspect.signature(resolve_target(target).cls.forward)
        names = [
            p.name for p in list(forward.parameters.values())[1:]
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ] or names
    except Exception:  # the hint still names the parameter that failed
        pass
    body = "".join(f"            {name!r}: ...,  # a tensor for {exc.model}.forward({name}=...)\n" for name in names)
    again = options.invocation or f"{command} --model {target}"
    return UsageError(
        f"cannot synthesize the {exc.parameter!r} argument of {exc.model}.forward: {exc.reason}. Write a function "
        "that returns example inputs and pass it with --inputs FILE.py:FUNC, e.g.\n\n"
        "    # my_inputs.py\n"
        "    import torch\n\n"
        "    def make_inputs(model):  # optional argument: the model being inspected or calibrated\n"
        "        args = ()\n"
        "        kwargs = {\n"
        f"{body}"
        "        }\n"
        "        return args, kwargs\n\n"
        "then run the command again with the option added:\n\n"
        f"    {again} --inputs my_inputs.py:make_inputs"
    )


# -- the module name --------------------------------------------------------------------------------
def _slug(text: str) -> str:
    snake = re.sub(r"[^0-9a-z_]+", "_", text.lower()).strip("_") or "model"
    return f"model_{snake}" if snake[0].isdigit() else snake


def default_strategy_name(model: str, transformer_cls_name: str) -> tuple[str, str | None]:
    """A module name for a scaffold, and a note when it had to change.

    A local folder or hub id names the model better than its class (many models share
    ``FluxTransformer2DModel``); a class gives ``flux``. A name that a bundled strategy module
    already has gets a ``my_`` prefix, so ``--strategy flux`` keeps meaning the bundled one.
    """
    head = model.split(":")[0] if ".py:" in model else model
    path = Path(head)
    if ".py:" not in model and path.is_dir():
        folder = path.resolve()
        name = _slug(folder.parent.name if folder.name.startswith("transformer") else folder.name)
    elif ".py:" not in model and is_pipeline_target(model):
        name = _slug(model.rsplit("/", 1)[-1])
    else:
        name = default_module_name(transformer_cls_name)
    bundled = bundled_module_names()
    if name in bundled:
        return f"my_{name}", (
            f"the module name {name!r} is taken by the bundled strategies/{name}.py; this one is called my_{name} "
            "(choose another with --name)"
        )
    return name, None


def name_note(name: str) -> str | None:
    """A warning when the user's --name shadows a bundled module in ``--strategy NAME`` lookups."""
    if name in bundled_module_names():
        return (
            f"--name {name} is also the name of the bundled strategies/{name}.py; `--strategy {name}` finds the one "
            "loaded last. Give a path (`--strategy DIR/{name}.py`) to be sure"
        )
    check_module_name(name)
    return None


# -- calibrations already in a module ---------------------------------------------------------------
class Existing(BaseModel):
    """What an existing module holds that the new one must keep."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    #: True: the old file is the new skeleton plus calibrations, so it can be patched in place.
    same_skeleton: bool = False
    entries: list[CalibrationEntry] = Field(default_factory=list)
    dropped: str | None = None


def transformer_of_source(source: str) -> str | None:
    """The ``transformer_cls_name = "..."`` a strategy module declares, read without running it."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "transformer_cls_name" for t in targets):
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    return node.value.value
    return None


def existing_module(path: Path, skeleton: str, transformer: str, *, force: bool, rerun: str) -> Existing:
    """Read the module a scaffold would replace; refuse to lose edits (unless ``force``), keep calibrations."""
    if not path.exists():
        return Existing()
    old = path.read_text(encoding="utf-8")
    try:
        same = strip_calibrations(old, path.name) == strip_calibrations(skeleton, path.name)
    except StrategyFileError:
        same = False
    if not same and not force:
        raise UsageError(
            f"{path} exists and differs from what scaffold generates (edited by hand, or made for another model). "
            f"To add or refresh a calibration in it run `{rerun}`; to replace it (its calibrations of "
            f"{transformer} are kept), pass --force, or choose another --name / --out. Nothing was written."
        )
    old_transformer = transformer_of_source(old)
    if old_transformer is not None and old_transformer != transformer:
        return Existing(text=old, dropped=f"{path} was made for {old_transformer}; its calibrations are not kept")
    try:
        entries = check_calibrations(read_calibrations(old, path.name), path.name)
    except (StrategyFileError, StrategyValidationError) as exc:
        if same and not force:
            raise UsageError(f"{exc}. Fix the entry, or pass --force to replace the module without it.") from exc
        return Existing(text=old, dropped=f"the calibrations of {path} cannot be read ({exc}); they are not kept")
    return Existing(text=old, same_skeleton=same, entries=entries)


def merge_calibrations(skeleton: str, existing: Existing, entry: CalibrationEntry, filename: str) -> str:
    """The new module: every kept entry, and ``entry`` added or replacing the one with its step count."""
    if existing.same_skeleton and existing.text is not None:
        return upsert_calibration(existing.text, entry, filename)  # kept entries stay byte for byte
    text = skeleton
    for old in existing.entries:
        if old.num_steps != entry.num_steps:
            text = upsert_calibration(text, old, filename)
    return upsert_calibration(text, entry, filename)


def kept_and_replaced(existing: Existing, entry: CalibrationEntry) -> tuple[list[int], list[int]]:
    kept = sorted(e.num_steps for e in existing.entries if e.num_steps != entry.num_steps)
    replaced = sorted(e.num_steps for e in existing.entries if e.num_steps == entry.num_steps)
    return kept, replaced


# -- calibration ------------------------------------------------------------------------------------
def check_transformer(loaded: LoadedModel, expected: str, where: str) -> None:
    if loaded.transformer_cls_name != expected:
        raise UsageError(
            f"--model {loaded.target!r} holds a {loaded.transformer_cls_name}, but {where} is for {expected}; "
            "point --model at the model the strategy was made for"
        )


def calibrate_loaded(
    loaded: LoadedModel,
    strategy: MagCacheStrategy,
    options: CalibrationOptions,
    *,
    command: str,
    log: Log,
    progress: bool,
    timestep_name: str | None = None,
) -> tuple[CalibrationResult, CalibrationEntry, CalibrationSettings]:
    """Resolve the settings (say which), run the generations, return the result and its entry."""
    from magsdk.inspect.inputs import InputSynthesisError

    settings = resolve_settings(options.request(), loaded)
    log(f"calibration settings: {settings.describe()}")
    try:
        result, entry = run_calibration(
            loaded, strategy, settings, progress=progress, timestep_name=timestep_name, command=command
        )
    except InputSynthesisError as exc:
        raise inputs_hint(exc, loaded.target, options, command) from None
    return result, entry, settings


def load(options: CalibrationOptions) -> LoadedModel:
    assert options.model is not None
    return load_model(options.model, device=options.device, dtype=options.dtype)


def stored_entry(check: ModuleCheck, entry: CalibrationEntry) -> CalibrationEntry:
    """The entry as it reads back from the written file (rounded floats)."""
    for stored in check.calibrations:
        if stored.num_steps == entry.num_steps:
            return stored
    return round_entry(entry)


def plot(entry: CalibrationEntry, path: Path | None, title: str) -> None:
    if path is not None:
        from magsdk.calibration.plot import plot_calibration

        plot_calibration(entry, path, title=title)


def relative_model_path(model: str, test_dir: Path) -> tuple[str, str] | None:
    """A local model's path as seen from the test folder, so the test finds it from any working directory."""
    head, sep, tail = model.rpartition(":") if ".py:" in model else (model, "", "")
    path = Path(head)
    if not path.exists():
        return None
    return Path(os.path.relpath(path.resolve(), test_dir.resolve())).as_posix(), sep + tail


def no_strategy_in(path: Path) -> MagSDKError:
    return StrategyFileError(f"{path} defines no MagCacheStrategy subclass with a transformer_cls_name")
