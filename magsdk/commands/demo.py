"""``magsdk demo``: inspect → scaffold → calibrate → generate with and without the cache, on one model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from magsdk.calibration.drivers import read_prompts
from magsdk.commands import invocation, make_console, quiet_library_progress
from magsdk.workflow.checks import check_demo_model
from magsdk.workflow.demo import DemoOptions, DemoResult, run_demo


def demo_command(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", metavar="PIPELINE_FOLDER",
        help="A diffusers pipeline folder (default: the bundled, trained digits FluxPipeline).")] = None,
    out: Annotated[Path, typer.Option(
        "--out", metavar="DIR", help="Folder for the strategy module, grid PNG and JSON.")] = Path("magsdk-demo"),
    steps: Annotated[int | None, typer.Option(
        "--steps", "-n", metavar="N", help="Inference steps (default: the model's).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", metavar="K", help="Seeds per prompt for the comparison.")] = 1,
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", metavar="FILE", help="File with one prompt a line.")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", metavar="T", help="Override the strategy's threshold.")] = None,
    max_skip_steps: Annotated[int | None, typer.Option(
        "--max-skip-steps", "-k", metavar="K", help="Override K.")] = None,
    retention_ratio: Annotated[float | None, typer.Option(
        "--retention-ratio", metavar="R", help="Override retention.")] = None,
    rounds: Annotated[int, typer.Option(
        "--rounds", metavar="R", help="Timed rounds, each one uncached and one cached generation (alternating "
        "order); medians are reported.")] = 5,
    device: Annotated[str | None, typer.Option(
        "--device", metavar="DEVICE", help="e.g. cuda, cpu (default: cuda when available).")] = None,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", metavar="DTYPE", help="float32, float16 or bfloat16 (default: as saved).")] = None,
) -> None:
    """Run the whole magsdk path on a model and print what the cache bought and what it cost."""
    check_demo_model(model, invocation())  # a missing folder or a Hub id, named as given, before anything loads
    console = make_console()
    quiet_library_progress()
    options = DemoOptions(
        model=model, out_dir=out, steps=steps, seeds=seeds, prompts=read_prompts(prompts) if prompts else None,
        threshold=threshold, max_skip_steps=max_skip_steps, retention_ratio=retention_ratio, rounds=rounds,
        device=device, dtype=dtype,
    )
    result = run_demo(options, log=lambda line: console.print(line, highlight=False, markup=False))
    console.print(result_table(result))
    for row in result.rows:
        if row.speedup_is_noise:
            console.print(
                f"[bold yellow]note:[/] the measured {row.speedup:.2f}x is above the {row.call_ratio:.2f}x that "
                f"computing {row.computed_calls} of {row.transformer_calls} calls allows: timing noise on this "
                "machine, not a result. Run with more --rounds on a quiet machine.",
                highlight=False, soft_wrap=True,
            )
    console.print(f"strategy module: {result.strategy_module}", highlight=False, markup=False)
    console.print(f"labelled image grid (uncached | cached pairs, PSNR per pair): {result.grid}", highlight=False,
                  markup=False)


def result_table(result: DemoResult) -> Table:
    table = Table(title=f"magsdk demo: {result.transformer}, {len(result.prompts)} prompts x {result.seeds} seed(s), "
                  f"{result.steps} steps; times are medians of {result.rounds} interleaved rounds after a warm-up")
    for column in ("method", "transformer calls computed", "time (s)", "speedup", "PSNR (dB)", "SSIM",
                   "class accuracy"):
        table.add_column(column)
    for row in result.rows:
        speedup = f"{row.speedup:.2f}x" + (f" (noise: above the {row.call_ratio:.2f}x call ratio)"
                                          if row.speedup_is_noise else "")
        table.add_row(
            row.method, f"{row.computed_calls} / {row.transformer_calls}", f"{row.seconds:.2f}",
            speedup, "-" if row.psnr_db is None else f"{row.psnr_db:.2f}",
            "-" if row.ssim is None else f"{row.ssim:.4f}",
            "-" if row.class_accuracy is None else f"{row.class_accuracy:.0%}",
        )
    return table


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
