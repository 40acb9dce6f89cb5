"""``magsdk demo``: inspect → scaffold → calibrate → generate with and without the cache, on one model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from magsdk.calibration.drivers import read_prompts
from magsdk.commands import make_console
from magsdk.demo import DemoOptions, DemoResult, run_demo


def demo_command(
    model: Annotated[str | None, typer.Option("--model", "-m", help="A diffusers pipeline folder "
                                              "(default: the bundled, trained digits FluxPipeline).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the strategy module, grid PNG and JSON.")] = Path(
        "magsdk-demo"),
    steps: Annotated[int | None, typer.Option("--steps", "-n", help="Inference steps (default: the model's).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per prompt for the comparison.")] = 1,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="File with one prompt a line.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Override the strategy's threshold.")] = None,
    max_skip_steps: Annotated[int | None, typer.Option("--max-skip-steps", "-k", help="Override K.")] = None,
    retention_ratio: Annotated[float | None, typer.Option("--retention-ratio", help="Override retention.")] = None,
) -> None:
    """Run the whole magsdk path on a model and print what the cache bought and what it cost."""
    console = make_console()
    _quiet_loading()
    options = DemoOptions(
        model=model, out_dir=out, steps=steps, seeds=seeds, prompts=read_prompts(prompts) if prompts else None,
        threshold=threshold, max_skip_steps=max_skip_steps, retention_ratio=retention_ratio,
    )
    result = run_demo(options, log=lambda line: console.print(line, highlight=False))
    console.print(result_table(result))
    console.print(f"strategy module: {result.strategy_module}")
    console.print(f"image grid (uncached | cached pairs): {result.grid}")


def _quiet_loading() -> None:
    """The demo prints its own progress; the libraries' loading bars would drown it."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def result_table(result: DemoResult) -> Table:
    table = Table(title=f"magsdk demo: {result.transformer}, {len(result.prompts)} prompts x {result.seeds} seed(s), "
                  f"{result.steps} steps")
    for column in ("method", "transformer calls computed", "time (s)", "speedup", "PSNR (dB)", "SSIM",
                   "class accuracy"):
        table.add_column(column)
    for row in result.rows:
        table.add_row(
            row.method, f"{row.computed_calls} / {row.transformer_calls}", f"{row.seconds:.2f}",
            f"{row.speedup:.2f}x", "-" if row.psnr_db is None else f"{row.psnr_db:.2f}",
            "-" if row.ssim is None else f"{row.ssim:.4f}",
            "-" if row.class_accuracy is None else f"{row.class_accuracy:.0%}",
        )
    return table


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
