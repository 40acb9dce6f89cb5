"""``magsdk list``: every strategy, its variants, their calibrations and how each variant is recognised.

Names, sources and rules are what a user copies into ``strategy=...`` or looks up, so the tables
never truncate them: in a terminal long cells fold onto more lines, and when stdout is a file or a
pipe the console is as wide as the widest row (no wrapping at all).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from magsdk.config import CalibrationEntry
from magsdk.registry import USER_NAMESPACE, StrategyRegistry
from magsdk.strategy import MagCacheStrategy

#: Console width when stdout is not a terminal: wide enough that no row of the tables wraps.
UNWRAPPED_WIDTH = 10_000


class CalibrationRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_steps: int
    branches: list[str]
    source: str
    scheduler: str | None = None
    shape: str | None = None


class VariantRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    model: str
    default: bool
    threshold: float
    max_skip_steps: int
    retention_ratio: float
    recognised_by: list[str]
    calibrations: list[CalibrationRow]
    notes: str = ""


class StrategyRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    module: str
    strategy_class: str
    transformer_cls_name: str
    block_classes: list[str]
    #: The strategy's own calibrations (``magsdk calibrate``), used before any variant.
    calibrations: list[CalibrationRow] = Field(default_factory=list)
    threshold: float
    max_skip_steps: int
    retention_ratio: float
    variants: list[VariantRow] = Field(default_factory=list)
    #: A more specific strategy that ``enable`` uses for this transformer class instead (your own over the
    #: bundled one); this one's variant names still work where the other does not use them.
    shadowed_by: str | None = None


def _calibration(entry: CalibrationEntry) -> CalibrationRow:
    return CalibrationRow(num_steps=entry.num_steps, branches=list(entry.branches), source=entry.source,
                          scheduler=entry.scheduler, shape=entry.shape)


def strategy_rows() -> list[StrategyRow]:
    """Every strategy found (the modules of ``strategies/`` and the user's), by transformer class; one shadowed by
    a more specific strategy for its class follows the one ``enable`` uses, marked."""
    winners = StrategyRegistry.all()
    rows = []
    for name, cls in sorted(winners.items()):
        rows.append(_strategy_row(name, cls))
        for other in StrategyRegistry.known():
            if other.transformer_cls_name == name and other is not cls:
                rows.append(_strategy_row(name, other, shadowed_by=f"{cls.__name__} in {_module_name(cls)}"))
    return rows


def _module_name(cls: type[MagCacheStrategy]) -> str:
    """The module as the user knows it: a strategy file imported from a folder by its path, not its internal name."""
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if cls.__module__.startswith(f"{USER_NAMESPACE}.") and path:
        with contextlib.suppress(ValueError):
            return str(Path(path).resolve().relative_to(Path.cwd()))
        return str(path)
    return cls.__module__


def _strategy_row(name: str, cls: type[MagCacheStrategy], shadowed_by: str | None = None) -> StrategyRow:
    return StrategyRow(
        shadowed_by=shadowed_by,
        module=_module_name(cls),
        strategy_class=cls.__name__,
        transformer_cls_name=name,
        block_classes=list(cls.block_metadata),
        calibrations=[_calibration(e) for e in cls.calibrations],
        threshold=cls.threshold,
        max_skip_steps=cls.max_skip_steps,
        retention_ratio=cls.retention_ratio,
        variants=[
            VariantRow(
                name=v.name,
                model=v.model,
                default=v.default,
                threshold=v.threshold,
                max_skip_steps=v.max_skip_steps,
                retention_ratio=v.retention_ratio,
                recognised_by=v.recognition(),
                calibrations=[_calibration(e) for e in v.calibrations],
                notes=v.notes,
            )
            for v in cls.variants
        ],
    )


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else UNWRAPPED_WIDTH)


def _settings(threshold: float, k: int, retention: float) -> str:
    return f"{threshold}/{k}/{retention}"


def _calibration_cells(cal: CalibrationRow) -> tuple[str, str, str]:
    return str(cal.num_steps), ", ".join(cal.branches), cal.source or "-"


def list_command(
    as_json: bool = typer.Option(False, "--json", help="Print strategies, variants and calibrations as JSON."),
) -> None:
    """List the strategies, their variants, calibrations (steps, branches, source) and how variants are recognised."""
    rows = strategy_rows()
    if as_json:
        typer.echo(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    console = _console()
    overview = Table(title="magsdk strategies")
    for column in ("module", "strategy", "transformer class", "block classes", "variants"):
        overview.add_column(column, overflow="fold")
    for row in rows:
        variants = ", ".join(v.name for v in row.variants) or "-"
        strategy = row.strategy_class + (f" (shadowed by {row.shadowed_by})" if row.shadowed_by else "")
        overview.add_row(row.module, strategy, row.transformer_cls_name, ", ".join(row.block_classes), variants)
    console.print(overview)
    for row in rows:
        console.print(_detail_table(row))


def _detail_table(row: StrategyRow) -> Table:
    table = Table(title=f"{row.strategy_class} ({row.transformer_cls_name}, {row.module})")
    for column in ("variant", "model", "steps", "branches", "source", "defaults (thr/K/ret)", "recognised by"):
        table.add_column(column, overflow="fold")
    for cal in row.calibrations:
        table.add_row("(own calibrations)", "-", *_calibration_cells(cal),
                      _settings(row.threshold, row.max_skip_steps, row.retention_ratio),
                      "used before any variant")
    for variant in row.variants:
        for index, cal in enumerate(variant.calibrations):
            first = index == 0
            table.add_row(
                variant.name + (" (default)" if variant.default and first else "") if first else "",
                variant.model if first else "",
                *_calibration_cells(cal),
                _settings(variant.threshold, variant.max_skip_steps, variant.retention_ratio) if first else "",
                "; ".join(variant.recognised_by) if first else "",
            )
    if not row.calibrations and not row.variants:
        table.add_row("-", "-", "-", "-", "no calibration yet: run `magsdk calibrate`",
                      _settings(row.threshold, row.max_skip_steps, row.retention_ratio), "-")
    return table


def register(app: typer.Typer) -> None:
    app.command("list")(list_command)

