"""``magsdk inspect TARGET``: the block conventions of a transformer, inferred by tracing one forward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from magsdk.commands import invocation
from magsdk.config import InspectionReport
from magsdk.conventions import metadata_text
from magsdk.errors import UsageError

console = Console()
if not console.is_terminal:  # piped or captured: no terminal width to respect, keep rows on one line
    console = Console(width=160)


def _parse_config(raw: str | None) -> dict[str, Any] | None:
    """``--config``: a JSON object, or the path of a JSON file holding one."""
    if raw is None:
        return None
    text = raw
    path = Path(raw)
    if not raw.lstrip().startswith("{") and path.is_file():
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text is raw and (raw.endswith(".json") or "/" in raw or "\\" in raw):  # meant as a file
            raise UsageError(
                f"--config {raw!r}: no such file ({path.expanduser().resolve()} does not exist); give a JSON file "
                "of the transformer's constructor arguments (its config.json) or a JSON object"
            ) from exc
        raise UsageError(
            f"--config is not valid JSON ({exc}); give a JSON object such as "
            "'{\"num_layers\": 19, \"in_channels\": 64}' or the path of a JSON file"
        ) from exc
    if not isinstance(data, dict):
        raise UsageError(f"--config must be a JSON object of constructor arguments, got {type(data).__name__}")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def print_report(report: InspectionReport) -> None:
    title = f"{report.transformer}: {sum(g.count for g in report.block_groups)} cached blocks"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("group, in execution order", overflow="fold")
    table.add_column("conventions: argument → output (output kind)", overflow="fold")
    table.add_column("magsdk.enable takes them from", overflow="fold")
    for group in report.block_groups:
        source = {"strategy": "its strategy", "registry": "TransformerBlockRegistry", "inferred": "the first call"}[
            group.source]
        if group.agrees_with_inferred is not None:
            source += " (agrees)" if group.agrees_with_inferred else " ([bold red]differs from the trace[/])"
        table.add_row(f"{group.path}\n  {group.count} × {group.block_class}", metadata_text(group.metadata), source)
    console.print(table)
    console.print(f"head block: [bold]{report.head}[/]   tail block: [bold]{report.tail}[/]   "
                  f"timestep argument: {report.timestep_argument_name or '-'}", highlight=False)
    if report.shrunk:
        shrunk = ", ".join(f"{k} {v[0]}→{v[1]}" if isinstance(v, (list, tuple)) and len(v) == 2 else f"{k}={v}"
                           for k, v in report.shrunk.items())
        console.print(f"built small: {shrunk}", highlight=False, soft_wrap=True)
    seconds = f" in {report.seconds:.2f} s" if report.seconds is not None else ""
    console.print(f"traced one forward with {report.inputs} inputs{seconds}", highlight=False)
    if report.ambiguous:
        groups = ", ".join(a.group for a in report.ambiguities)
        console.print(f"[bold red]ambiguous[/]: the trace does not decide the output slots of {groups}; the metadata "
                      "above is a guess that magsdk.enable() and scaffold refuse (see the note below)",
                      highlight=False, soft_wrap=True)
    if report.notes:
        console.print("[bold yellow]warnings[/] (read them before caching):")
        for note in report.notes:
            console.print(f"  • [{note.code}] {note.message}", highlight=False, soft_wrap=True, markup=False)
    elif report.warnings:  # a report made before notes had codes
        console.print("[bold yellow]warnings[/] (read them before caching):")
        for warning in report.warnings:
            console.print(f"  • {warning}", highlight=False, soft_wrap=True, markup=False)
    else:
        console.print("[green]no warnings[/]: the block stack can be cached with head/tail hooks")


def inspect_command(
    target: str = typer.Argument(
        ...,
        metavar="TARGET",
        help="Diffusers class name, pkg.module:Class, path/file.py:Class, a model or pipeline folder, or a Hub id.",
    ),
    config: str | None = typer.Option(
        None, "--config", metavar="JSON",
        help="JSON object (or JSON file) of constructor arguments; overrides the folder's config."
    ),
    inputs: str | None = typer.Option(
        None, "--inputs", metavar="FILE.py:FUNC",
        help="FILE.py:FUNC returning (args, kwargs) for forward; FUNC may take the built model."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the InspectionReport as JSON."),
    out: str | None = typer.Option(None, "--out", metavar="FILE", help="Write the InspectionReport JSON to this file."),
) -> None:
    """Infer the block conventions of a transformer by tracing one forward of a small build of it."""
    from magsdk.inspect import inspect_target
    from magsdk.inspect.inputs import InputSynthesisError

    try:
        report = inspect_target(target, config=_parse_config(config), inputs=inputs)
    except InputSynthesisError as exc:
        again = invocation()  # the whole command as typed (--config and all), not only its TARGET
        if again is None:
            raise
        raise exc.for_command(again) from None
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        print_report(report)
    if out is not None:
        report.save(Path(out))
        if not as_json:
            console.print(f"wrote {out}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
