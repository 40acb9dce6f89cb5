"""``magsdk plan``: the skip schedule and the ideal speedup before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.table import Table

from magsdk.commands import make_console
from magsdk.config import MagCacheConfig
from magsdk.errors import UsageError
from magsdk.ratios import plan as make_plan
from magsdk.strategy import MagCacheStrategy
from magsdk.variants import resolve_name


def _load_curves(strategy: str | None, ratios: str | None, steps: int) -> tuple[dict[str, list[float]], str]:
    if (strategy is None) == (ratios is None):
        raise UsageError("give exactly one of --strategy NAME or --ratios FILE.json (or a comma-separated list)")
    if strategy is not None:
        config, label = _strategy_config(strategy, steps)
        assert config.mag_ratios is not None
        return config.mag_ratios, label
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


def _strategy_config(name: str, steps: int) -> tuple[MagCacheConfig, str]:
    """The default config of a strategy or variant name (``flux``, ``wan2.1-t2v-14b``...) and its label."""
    cls, variant = resolve_name(name)
    config = cls.default_config(steps, variant=variant)
    return config, cls.__name__ if variant is None else f"{cls.__name__} {variant.name}"


def plan_command(
    strategy: str | None = typer.Option(None, "--strategy", "-s", help="Strategy module or transformer class."),
    ratios: str | None = typer.Option(None, "--ratios", help="JSON file (list, dict or calibration) or a,b,c."),
    steps: int = typer.Option(28, "--steps", "-n", help="Number of inference steps of the run."),
    threshold: float | None = typer.Option(None, help="Accumulated-error threshold (default: strategy's)."),
    max_skip_steps: int | None = typer.Option(None, "--max-skip-steps", "-k", help="K: max consecutive skips."),
    retention_ratio: float | None = typer.Option(None, "--retention-ratio", help="Fraction of first steps kept."),
    as_json: bool = typer.Option(False, "--json", help="Print the SkipPlan(s) as JSON."),
) -> None:
    """Print the skip schedule and the ideal speedup for a curve, before anything runs."""
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    curves, source = _load_curves(strategy, ratios, steps)
    defaults: Any = _strategy_config(strategy, steps)[0] if strategy else MagCacheStrategy
    settings = {
        "threshold": defaults.threshold if threshold is None else threshold,
        "max_skip_steps": defaults.max_skip_steps if max_skip_steps is None else max_skip_steps,
        "retention_ratio": defaults.retention_ratio if retention_ratio is None else retention_ratio,
    }
    try:
        config = MagCacheConfig(mag_ratios=curves, **settings)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UsageError(f"invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}") from exc
    plans = {branch: make_plan(curve, config, steps) for branch, curve in curves.items()}
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


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
