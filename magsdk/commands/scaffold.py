"""``magsdk scaffold`` and ``magsdk calibrate``: a calibrated, validated strategy module from a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from magsdk.calibration.drivers import read_prompts
from magsdk.commands import invocation, make_console, quiet_library_progress
from magsdk.config import BlockMetadata, CalibrationEntry, InspectionReport, MagCacheConfig
from magsdk.conventions import metadata_text
from magsdk.errors import UsageError
from magsdk.ratios import plan
from magsdk.runtime import distributed
from magsdk.workflow.calibrate import CalibrateOutcome, calibrate_file
from magsdk.workflow.common import CalibrationOptions
from magsdk.workflow.scaffold import ScaffoldOptions, ScaffoldResult, run_scaffold

console = make_console()

MODEL_HELP = (
    "A diffusers pipeline folder (model_index.json) or hub id, a transformer folder, a class name, or file.py:Class."
)
DEFAULT_OUT = Path("strategies")
OUT_HELP = "Folder for <name>.py and tests/test_<name>.py."
PLOT_HELP = "Write a PNG of the curves and spread."
DRIVER_HELP = "FILE.py:FUNC that runs one generation: FUNC(transformer, steps, seed)."
INPUTS_HELP = (
    "FILE.py:FUNC returning (args, kwargs) for the transformer's forward (FUNC may take the model), as for "
    "`magsdk inspect`; used to inspect and, without a pipeline, in the synthetic calibration loop."
)
STEPS_HELP = "Denoising steps of the calibration runs (default: the folder's recorded settings, else the pipeline's)."
SEEDS_HELP = "Seeds per prompt, 0 ... K-1 (default: 1 with a pipeline, 2 for a driver or the synthetic loop)."
PROMPTS_HELP = "File with one calibration prompt a line (default: a built-in set of 10 varied prompts)."
SIDE_HELP = "Image {side} of pipeline calibration (default: the folder's recorded settings, else the pipeline's)."
DEVICE_HELP = "Device to calibrate on, e.g. cuda, cuda:1, cpu (default: cuda when available)."
DTYPE_HELP = "Weights dtype: float32, float16 or bfloat16 (default: as saved, usually float32)."
PROBES_HELP = (
    "Also measure the curve at P timesteps between each step and the next (0 to 64; default 0: none). P more "
    "transformer calls per step: the calibration costs about 1+P generations; curves mapped onto other schedules "
    "follow the model between the calibrated steps."
)
CALL_ARG_HELP = (
    "KEY=VALUE passed to every pipeline call during calibration (repeatable; VALUE is JSON when it parses), "
    'e.g. --call-arg true_cfg_scale=4 --call-arg negative_prompt=\'""\' to calibrate both CFG branches.'
)


def _prompts(path: Path | None) -> tuple[list[str] | None, str | None]:
    return (read_prompts(path), f"--prompts {path}") if path is not None else (None, None)


def _call_kwargs(items: list[str] | None) -> dict[str, Any]:
    """Parse repeated ``--call-arg KEY=VALUE``; a malformed item is a usage error."""
    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"--call-arg {item!r}: expected KEY=VALUE with KEY a keyword of the pipeline call")
        try:
            parsed[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw
    return parsed


def scaffold_command(
    model: str | None = typer.Option(None, "--model", "-m", metavar="TARGET", help=MODEL_HELP),
    name: str | None = typer.Option(
        None, "--name", metavar="NAME",
        help="Module name (default: from the model folder or hub id, else the transformer class)."
    ),
    steps: int | None = typer.Option(None, "--steps", "-n", metavar="N", help=STEPS_HELP),
    prompts: Annotated[Path | None, typer.Option("--prompts", metavar="FILE", help=PROMPTS_HELP)] = None,
    seeds: int | None = typer.Option(None, "--seeds", metavar="K", help=SEEDS_HELP),
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help=OUT_HELP)] = DEFAULT_OUT,
    driver: str | None = typer.Option(None, "--driver", metavar="FILE.py:FUNC", help=DRIVER_HELP),
    inputs: str | None = typer.Option(None, "--inputs", metavar="FILE.py:FUNC", help=INPUTS_HELP),
    plot: Annotated[Path | None, typer.Option("--plot", metavar="PNG", help=PLOT_HELP)] = None,
    height: int | None = typer.Option(None, "--height", metavar="H", help=SIDE_HELP.format(side="height")),
    width: int | None = typer.Option(None, "--width", metavar="W", help=SIDE_HELP.format(side="width")),
    device: str | None = typer.Option(None, "--device", metavar="DEVICE", help=DEVICE_HELP),
    dtype: str | None = typer.Option(None, "--dtype", metavar="DTYPE", help=DTYPE_HELP),
    no_test: bool = typer.Option(False, "--no-test", help="Do not write tests/test_<name>.py."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing module even if it was edited (its calibrations are kept)."
    ),
    call_arg: Annotated[list[str] | None, typer.Option("--call-arg", metavar="KEY=VALUE", help=CALL_ARG_HELP)] = None,
    probes: int = typer.Option(0, "--probes", metavar="P", help=PROBES_HELP),
    from_cache: str | None = typer.Option(
        None, "--from-cache", metavar="ID",
        help="Use a curve that enable(auto_calibrate=True) cached (its id, a unique start of "
        "it, or the cache file) instead of calibrating; --model is then optional.",
    ),
) -> None:
    """Inspect a model, generate its strategy module, calibrate it, validate it, and write it.

    Under torchrun the ranks split the calibration runs and rank 0 writes (docs/multi-gpu.md).
    """
    prompt_list, prompt_source = _prompts(prompts)
    options = ScaffoldOptions(
        model=model, name=name, steps=steps, prompts=prompt_list, prompts_source=prompt_source, seeds=seeds,
        out_dir=out, driver=driver, inputs=inputs, plot=plot, height=height, width=width, device=device, dtype=dtype,
        with_test=not no_test, force=force, call_kwargs=_call_kwargs(call_arg), probes=probes, from_cache=from_cache,
        invocation=invocation(),
    )
    quiet_library_progress()
    with distributed.launched_process_group(device):  # torchrun: each rank calibrates its share
        main = distributed.is_main_process()
        result = run_scaffold(options, progress=console.is_terminal and main, log=_log if main else _quiet)
    if main:
        print_scaffold_summary(result, options)


def calibrate_command(
    strategy_file: Annotated[Path, typer.Argument(
        metavar="STRATEGY_FILE", help="A strategy module (made by scaffold or by hand).")],
    model: str = typer.Option(..., "--model", "-m", metavar="TARGET", help=MODEL_HELP),
    steps: int | None = typer.Option(None, "--steps", "-n", metavar="N", help=STEPS_HELP),
    prompts: Annotated[Path | None, typer.Option("--prompts", metavar="FILE", help=PROMPTS_HELP)] = None,
    seeds: int | None = typer.Option(None, "--seeds", metavar="K", help=SEEDS_HELP),
    driver: str | None = typer.Option(None, "--driver", metavar="FILE.py:FUNC", help=DRIVER_HELP),
    inputs: str | None = typer.Option(None, "--inputs", metavar="FILE.py:FUNC", help=INPUTS_HELP),
    plot: Annotated[Path | None, typer.Option("--plot", metavar="PNG", help=PLOT_HELP)] = None,
    height: int | None = typer.Option(None, "--height", metavar="H", help=SIDE_HELP.format(side="height")),
    width: int | None = typer.Option(None, "--width", metavar="W", help=SIDE_HELP.format(side="width")),
    device: str | None = typer.Option(None, "--device", metavar="DEVICE", help=DEVICE_HELP),
    dtype: str | None = typer.Option(None, "--dtype", metavar="DTYPE", help=DTYPE_HELP),
    call_arg: Annotated[list[str] | None, typer.Option("--call-arg", metavar="KEY=VALUE", help=CALL_ARG_HELP)] = None,
    probes: int = typer.Option(0, "--probes", metavar="P", help=PROBES_HELP),
) -> None:
    """Add or refresh the calibration for the run's step count in a strategy file; nothing else in it changes.

    Under torchrun the ranks split the calibration runs and rank 0 writes (docs/multi-gpu.md).
    """
    prompt_list, prompt_source = _prompts(prompts)
    options = CalibrationOptions(
        model=model, steps=steps, prompts=prompt_list, prompts_source=prompt_source, seeds=seeds, driver=driver,
        inputs=inputs, plot=plot, height=height, width=width, device=device, dtype=dtype,
        call_kwargs=_call_kwargs(call_arg), probes=probes, invocation=invocation(),
    )
    quiet_library_progress()
    with distributed.launched_process_group(device):  # torchrun: each rank calibrates its share
        main = distributed.is_main_process()
        outcome = calibrate_file(strategy_file, options, progress=console.is_terminal and main,
                                 log=_log if main else _quiet)
    if main:
        print_calibrate_summary(outcome, options)


def _log(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True, markup=False)


def _quiet(_: str) -> None:
    """The log of ranks other than 0 under torchrun: rank 0 speaks for all."""


# -- summaries --------------------------------------------------------------------------------------
def metadata_summary(metadata: BlockMetadata) -> str:
    """The conventions in one line, as ``magsdk inspect`` shows them."""
    return metadata_text(metadata)


def blocks_table(report: InspectionReport) -> Group:
    heading = Text.from_markup(f"[bold]Blocks of {report.transformer}[/] (in execution order)")
    table = Table()
    for column in ("group", "block class", "count", "conventions"):
        table.add_column(column)
    for group in report.block_groups:
        table.add_row(group.path, group.block_class, str(group.count), metadata_summary(group.metadata))
    return Group(heading, table)


def curve_table(entry: CalibrationEntry) -> Group:
    runs = (entry.num_prompts or 1) * (entry.num_seeds or 1)
    heading = Text.from_markup(
        f"[bold]Calibrated curve[/], {entry.num_steps} steps: mean norm ratio ± spread (std) over {runs} "
        f"generation{'s' if runs != 1 else ''}"
    )
    table = Table()
    table.add_column("step", justify="right")
    if entry.timesteps:
        table.add_column("timestep", justify="right")
    for branch in entry.branches:
        table.add_column(branch, justify="right")
    for step in range(entry.num_steps):
        row = [str(step)]
        if entry.timesteps:
            t = entry.timesteps[step]
            row.append("-" if t is None else f"{t:.4g}")
        for branch, curve in entry.branches.items():
            spread = entry.spread.get(branch)
            row.append(f"{curve[step]:.5f}" + (f" ± {spread[step]:.5f}" if spread else ""))
        table.add_row(*row)
    return Group(heading, table)


def plan_table(entry: CalibrationEntry, threshold: float, max_skip_steps: int, retention_ratio: float) -> Group:
    config = MagCacheConfig(
        mag_ratios=entry.branches, threshold=threshold, max_skip_steps=max_skip_steps, retention_ratio=retention_ratio
    )
    heading = Text.from_markup(
        f"[bold]Skip plan[/] at the strategy's defaults (threshold={threshold}, K={max_skip_steps}, "
        f"retention={retention_ratio}), {entry.num_steps} steps"
    )
    table = Table()
    for column in ("branch", "computed", "skipped", "ideal speedup", "schedule (C = compute, . = skip)"):
        table.add_column(column)
    for branch in entry.branches:
        p = plan(entry.branches, config, entry.num_steps, branch=branch)  # as the runtime plans this branch
        table.add_row(branch, str(len(p.computed_steps)), str(len(p.skipped_steps)), f"{p.ideal_speedup:.2f}x",
                      p.schedule_string())
    return Group(heading, table)


def _entry_notes(entry: CalibrationEntry) -> None:
    console.print(f"source: {entry.source}", highlight=False, soft_wrap=True, markup=False)
    if entry.probes:
        per = len(next(iter(entry.probes.values()))) // (entry.num_steps - 1)
        console.print(
            f"probes: {per} per step between the calibrated steps; on another schedule (step count, shift) the curve "
            "is mapped through them instead of a straight line between its steps",
            highlight=False, soft_wrap=True, markup=False,
        )
    if entry.settings:
        shown = ", ".join(f"{k}={v!r}" for k, v in entry.settings.items())
        console.print(f"recorded settings: {shown}", highlight=False, soft_wrap=True, markup=False)
    if entry.synthetic:
        console.print(
            "[bold yellow]warning:[/] this curve is synthetic: it was measured on synthesized inputs"
            " (random weights unless a folder held weights), not on real generations. Recalibrate with a pipeline"
            " or --driver before relying on it.",
            soft_wrap=True,
        )


def print_scaffold_summary(result: ScaffoldResult, options: ScaffoldOptions) -> None:
    console.print(blocks_table(result.report))
    for warning in result.report.warnings:
        console.print(f"[yellow]inspect warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    console.print(curve_table(result.entry))
    _entry_notes(result.entry)
    console.print(plan_table(result.entry, result.threshold, result.max_skip_steps, result.retention_ratio))
    for note in result.notes:
        console.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    steps = result.entry.num_steps
    if result.kept or result.replaced:
        kept = ", ".join(f"{n}-step" for n in result.kept)
        console.print(
            f"calibrations already in {result.module_path}: "
            + (f"kept {kept}" if kept else "none kept")
            + (f"; replaced the {steps}-step entry with the new one" if result.replaced else ""),
            highlight=False, soft_wrap=True,
        )
    console.print(
        f"[bold green]wrote[/] {escape(str(result.module_path))} ({result.strategy_class} for "
        f"{result.transformer_cls_name}; "
        f"checked: calibration re-read, imports, registers, mypy --strict {result.mypy})",
        highlight=False,
        soft_wrap=True,
    )
    if result.test_path is not None:
        console.print(f"[bold green]wrote[/] {escape(str(result.test_path))}", highlight=False)
    if options.plot is not None:
        console.print(f"[bold green]wrote[/] {escape(str(options.plot))}", highlight=False)


def print_calibrate_summary(outcome: CalibrateOutcome, options: CalibrationOptions) -> None:
    console.print(curve_table(outcome.entry))
    _entry_notes(outcome.entry)
    console.print(plan_table(outcome.entry, outcome.threshold, outcome.max_skip_steps, outcome.retention_ratio))
    verb = "refreshed" if outcome.replaced else "added"
    console.print(
        f"[bold green]{verb}[/] the {outcome.entry.num_steps}-step calibration of {outcome.strategy_class} in "
        f"{escape(str(outcome.path))} (checked: calibration re-read, imports, registers, mypy --strict {outcome.mypy})",
        highlight=False,
        soft_wrap=True,
    )
    if options.plot is not None:
        console.print(f"[bold green]wrote[/] {escape(str(options.plot))}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("scaffold")(scaffold_command)
    app.command("calibrate")(calibrate_command)

