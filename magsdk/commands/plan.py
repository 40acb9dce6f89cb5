"""``magsdk plan`` and ``magsdk list``: the skip schedule before anything runs, and the strategies."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.table import Table

from magsdk.commands import make_console
from magsdk.config import MagCacheConfig
from magsdk.errors import UsageError
from magsdk.ratios import plan as make_plan
from magsdk.registry import StrategyRegistry
from magsdk.strategy import MagCacheStrategy
from magsdk.workflow.checks import check_cache_settings


def _load_curves(strategy: str | None, ratios: str | None, steps: int) -> tuple[dict[str, list[float]], str]:
    if (strategy is None) == (ratios is None):
        raise UsageError("give exactly one of --strategy NAME or --ratios FILE.json (or a comma-separated list)")
    if strategy is not None:
        cls = _strategy_by_name(strategy)
        config = cls.default_config(steps)
        assert config.mag_ratios is not None
        return config.mag_ratios, cls.__name__
    assert ratios is not None
    path = Path(ratios)
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"--ratios {ratios}: not valid JSON ({exc})") from exc
        if isinstance(data, dict) and "branches" in data:
            data = {k: v["norm_ratios"] if isinstance(v, dict) else v for k, v in data["branches"].items()}
        return _validated(data), str(path)
    try:
        values = [float(v) for v in ratios.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"--ratios {ratios!r} is neither a file nor a comma-separated list of numbers") from exc
    return _validated(values), "command line"


def _validated(data: object) -> dict[str, list[float]]:
    try:
        curves = MagCacheConfig(mag_ratios=data).mag_ratios
    except ValidationError as exc:
        raise UsageError(f"invalid ratios: {exc.errors()[0]['msg']}") from exc
    assert curves is not None
    return curves


def _strategy_by_name(name: str) -> type[MagCacheStrategy]:
    """A transformer class, strategy class or module name, a dotted module, or a strategy file's path."""
    return StrategyRegistry.resolve(name)



def plan_command(
    strategy: str | None = typer.Option(
        None, "--strategy", "-s",
        help="Strategy module name, transformer class, dotted module or path/to/module.py "
        "(also found in ./strategies/ and $MAGSDK_STRATEGY_PATH).",
    ),
    ratios: str | None = typer.Option(None, "--ratios", help="JSON file (list, dict or calibration) or a,b,c."),
    steps: int = typer.Option(28, "--steps", "-n", help="Number of inference steps of the run."),
    threshold: float | None = typer.Option(None, help="Accumulated-error threshold (default: strategy's)."),
    max_skip_steps: int | None = typer.Option(None, "--max-skip-steps", "-k", help="K: max consecutive skips."),
    retention_ratio: float | None = typer.Option(None, "--retention-ratio", help="Fraction of first steps kept."),
    as_json: bool = typer.Option(False, "--json", help="Print the SkipPlan(s) as JSON."),
) -> None:
    """Print the skip schedule and the ideal speedup for a curve, before anything runs."""
    if steps < 2:
        raise UsageError(f"--steps {steps}: a plan needs at least 2 steps (step 0 always computes)")
    given = {
        name: value
        for name, value in (("threshold", threshold), ("max_skip_steps", max_skip_steps),
                            ("retention_ratio", retention_ratio))
        if value is not None
    }
    check_cache_settings(given)  # before any strategy loads
    curves, source = _load_curves(strategy, ratios, steps)
    defaults = _strategy_by_name(strategy) if strategy else MagCacheStrategy
    settings = {
        "threshold": defaults.threshold,
        "max_skip_steps": defaults.max_skip_steps,
        "retention_ratio": defaults.retention_ratio,
        **given,
    }
    config = MagCacheConfig(mag_ratios=curves, **settings)
    plans = {branch: make_plan(curves, config, steps, branch=branch) for branch in curves}
    if as_json:
        typer.echo(json.dumps({b: p.model_dump() for b, p in plans.items()}, indent=2))
        return
    table = Table(title=f"MagCache plan: {source}, {steps} steps, threshold={config.threshold}, "
                  f"K={config.max_skip_steps}, retention={config.retention_ratio}")
    for column in ("branch", "computed", "skipped", "ideal speedup", "schedule (C = compute, . = skip)"):
        table.add_column(column)
    for branch, p in plans.items():
        table.add_row(branch, str(len(p.computed_steps)), str(len(p.skipped_steps)),
                      f"{p.ideal_speedup:.2f}x", p.schedule_string())
    make_console().print(table)


def list_command() -> None:
    """List the registered strategies (every module in strategies/)."""
    table = Table(title="magsdk strategies")
    for column in ("module", "transformer class", "block classes", "calibrations", "defaults (thr/K/ret)"):
        table.add_column(column)
    for name, cls in sorted(StrategyRegistry.all().items()):
        cal = ", ".join(f"{e.num_steps} steps [{'/'.join(e.branches)}]" for e in cls.calibrations) or "none"
        table.add_row(cls.__module__, name, ", ".join(cls.block_metadata), cal,
                      f"{cls.threshold}/{cls.max_skip_steps}/{cls.retention_ratio}")
    make_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
    app.command("list")(list_command)
