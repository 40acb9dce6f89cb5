"""``magsdk plan`` and ``magsdk list``: the skip schedule before anything runs, and the strategies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.table import Table

from magsdk.commands import make_console
from magsdk.config import CalibrationResult, MagCacheConfig
from magsdk.curves import CurveSource, CurveTable
from magsdk.errors import UsageError
from magsdk.ratios import plan_source
from magsdk.schedules import timesteps_for
from magsdk.strategy import MagCacheStrategy
from magsdk.variants import resolve_name
from magsdk.workflow.checks import check_cache_settings


def _load_curves(
    strategy: str | None, ratios: str | None
) -> tuple[MagCacheStrategy | CalibrationResult | dict[str, list[float]], str]:
    """The curve input: a strategy (its variant's calibrations, all of them), or a config-like value."""
    if (strategy is None) == (ratios is None):
        raise UsageError("give exactly one of --strategy NAME or --ratios FILE.json (or a comma-separated list)")
    if strategy is not None:
        cls, variant = resolve_name(strategy)
        instance = cls.for_target(None, variant)
        if not instance.calibration_entries():
            raise UsageError(
                f"strategy {cls.__name__} has no calibration yet; run `magsdk calibrate <its file> --model <model> "
                "--steps N` first, or pass --ratios"
            )
        chosen = instance.resolved_variant()
        return instance, cls.__name__ if chosen is None else f"{cls.__name__} {chosen.name}"
    assert ratios is not None
    path = Path(ratios)
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"--ratios {ratios}: not valid JSON ({exc})") from exc
        if isinstance(data, dict) and "branches" in data:
            try:
                return CalibrationResult.model_validate(data), str(path)
            except ValidationError:
                data = {k: v["norm_ratios"] if isinstance(v, dict) else v for k, v in data["branches"].items()}
        return _validated(data), str(path)
    if path.suffix.lower() == ".json" or "/" in ratios or os.sep in ratios:
        raise UsageError(
            f"--ratios {ratios}: no such file ({path.expanduser().resolve()} does not exist); give the path of a "
            "JSON file (a list, a dict branch -> list, or a saved calibration) or a comma-separated list such as "
            "1.0,0.98,0.95"
        )
    try:
        values = [float(v) for v in ratios.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(
            f"--ratios {ratios!r} is neither a file nor a comma-separated list of numbers; give the path of a JSON "
            "file or numbers such as 1.0,0.98,0.95"
        ) from exc
    return _validated(values), "command line"


def _validated(data: object) -> dict[str, list[float]]:
    try:
        curves = MagCacheConfig(mag_ratios=data).mag_ratios
    except ValidationError as exc:
        raise UsageError(f"invalid ratios: {exc.errors()[0]['msg']}") from exc
    assert curves is not None
    return curves


def plan_command(
    strategy: str | None = typer.Option(
        None, "--strategy", "-s", metavar="STRATEGY",
        help="Variant name (e.g. wan2.1-t2v-14b), strategy module name, transformer class, dotted module or "
        "path/to/module.py (also found in ./strategies/ and $MAGSDK_STRATEGY_PATH).",
    ),
    ratios: str | None = typer.Option(
        None, "--ratios", metavar="FILE|a,b,c", help="JSON file (list, dict or calibration) or a,b,c."
    ),
    steps: int = typer.Option(28, "--steps", "-n", metavar="N", help="Number of inference steps of the run."),
    threshold: float | None = typer.Option(
        None, "--threshold", metavar="T", help="Accumulated-error threshold (default: strategy's)."
    ),
    max_skip_steps: int | None = typer.Option(
        None, "--max-skip-steps", "-k", metavar="K", help="K: max consecutive skips."
    ),
    retention_ratio: float | None = typer.Option(
        None, "--retention-ratio", metavar="R", help="Fraction of first steps kept."
    ),
    compute_steps: int | None = typer.Option(
        None, "--compute-steps", metavar="B",
        help="Budget mode: compute exactly this many steps (the threshold is unused).",
    ),
    speedup: float | None = typer.Option(
        None, "--speedup", metavar="S", help="Budget mode: compute steps / SPEEDUP of the steps."
    ),
    reuse: str | None = typer.Option(
        None, "--reuse", metavar="MODE", help="What a skip reuses: auto, residual, scaled, forecast."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the SkipPlan(s) as JSON."),
    resample: str = typer.Option(
        "auto", "--resample", metavar="auto|timesteps|index",
        help="Curve mapping: auto (through recorded timesteps when present), timesteps, index.",
    ),
) -> None:
    """Print the skip schedule and the ideal speedup for a curve, before anything runs."""
    if steps < 2:
        raise UsageError(f"--steps {steps}: a plan needs at least 2 steps (step 0 always computes)")
    given = {
        name: value
        for name, value in (("threshold", threshold), ("max_skip_steps", max_skip_steps),
                            ("retention_ratio", retention_ratio), ("compute_steps", compute_steps),
                            ("speedup", speedup), ("reuse", reuse))
        if value is not None
    }
    check_cache_settings(given)  # before any strategy loads
    if resample not in ("auto", "timesteps", "index"):
        raise UsageError(f"--resample {resample!r}: choose auto, timesteps or index")
    curves, source = _load_curves(strategy, ratios)
    if isinstance(curves, MagCacheStrategy):
        config = curves.run_config(steps, resample=resample, **given)  # the variant's settings, then the flags
        curve_source = CurveSource.from_entries(curves.calibration_entries(), config)
        branches = list(curve_source.table_for(steps).branches)
    else:
        settings = {
            "threshold": MagCacheStrategy.threshold,
            "max_skip_steps": MagCacheStrategy.max_skip_steps,
            "retention_ratio": MagCacheStrategy.retention_ratio,
            "resample": resample,
            **given,
        }
        config = MagCacheConfig(mag_ratios=curves, **settings)
        found = CurveSource.from_config(config)
        assert found is not None and config.mag_ratios is not None
        curve_source, branches = found, list(config.mag_ratios)
    table = curve_source.table_for(steps)
    run_timesteps = None
    if resample != "index" and table.schedule is not None:
        run_timesteps = timesteps_for(table.schedule, steps)  # as plan_source would rebuild them
    shown = branches if config.per_branch_curves else branches[:1]
    plans = {
        branch: plan_source(curve_source, config, steps, branch, position=i, timesteps=run_timesteps,
                            constraints=(max_skip_steps, retention_ratio))
        for i, branch in enumerate(shown)
    }
    if as_json:
        typer.echo(json.dumps({b: p.model_dump() for b, p in plans.items()}, indent=2))
        return
    console = make_console()
    head = next(iter(plans.values()))
    rule = (f"threshold={config.threshold}, K={config.max_skip_steps}, retention={config.retention_ratio}"
            if head.budget is None else
            f"budget {head.budget} computed steps (K={head.max_skip_steps}, retention={head.retention_ratio:g})")
    table_view = Table(title=f"MagCache plan: {source}, {steps} steps, {rule}, reuse {head.reuse}")
    for column in ("branch", "computed", "skipped", "ideal speedup", "schedule (C = compute, . = skip)"):
        table_view.add_column(column, no_wrap=column.startswith("schedule"))
    for branch, p in plans.items():
        label = branch if config.per_branch_curves or len(branches) == 1 else f"all ({', '.join(branches)})"
        table_view.add_row(label, str(len(p.computed_steps)), str(len(p.skipped_steps)),
                           f"{p.ideal_speedup:.2f}x", p.schedule_string())
    console.print(table_view)
    first = next(iter(plans.values()))
    note = first.mapping
    if resample != "index" and table.schedule is not None and run_timesteps is None:
        note += f" (the recorded {table.schedule.scheduler} schedule could not be rebuilt for {steps} steps here)"
    console.print(f"curve: {note}", highlight=False)
    if len(branches) > 1 and not config.per_branch_curves:
        console.print("branches share one schedule (the mean of their curves), as the runtime runs them",
                      highlight=False)
    if first.out_of_range:
        console.print(f"warning: {_out_of_range(first.out_of_range, steps, table)}", highlight=False, soft_wrap=True)


def _out_of_range(outside: list[float], steps: int, table: CurveTable) -> str:
    """The run's timesteps beyond the calibrated ones, with both ranges (as the runtime's warning gives them)."""
    shown = ", ".join(f"{t:g}" for t in outside[:8]) + (", ..." if len(outside) > 8 else "")
    count = f"{len(outside)} of this run's {steps} timesteps ({shown}) " + ("lies" if len(outside) == 1 else "lie")
    calibrated = table.schedule.timesteps if table.schedule is not None else table.timesteps
    where = f"the calibrated range {min(calibrated):g}..{max(calibrated):g}" if calibrated else "the calibrated range"
    return (f"{count} outside {where} of the {table.num_steps}-step calibration; the curve is held flat (ratio 1) "
            f"there. A calibration at {steps} steps covers them")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
