"""``magsdk export``: a strategy's plan as settings for diffusers' MagCache or cache-dit.

Prints a Python snippet to paste (or ``--json``), computed by ``magsdk.export`` for one step count:
the diffusers config carries the curve already mapped to that count, the cache-dit settings carry
the plan as a steps computation mask.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from pydantic import ValidationError

from magsdk.config import MagCacheConfig
from magsdk.errors import UsageError
from magsdk.export import resolve_config, to_cache_dit, to_diffusers_config
from magsdk.variants import resolve_name
from magsdk.workflow.checks import check_cache_settings, check_steps

TARGETS = ("diffusers", "cache-dit")


def _numbers(values: list[float]) -> str:
    return "[" + ", ".join(repr(round(float(v), 6)) for v in values) + "]"


def _missing_from_diffusers(strategy: str) -> list[str]:
    """Block classes of the strategy that diffusers' own table lacks (they need register_with_diffusers)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    cls, _ = resolve_name(strategy)
    TransformerBlockRegistry._register()
    known = {c.__name__ for c in TransformerBlockRegistry._registry}
    return [name for name in cls.block_metadata if name not in known]


def export_command(
    strategy: str = typer.Option(
        ..., "--strategy", "-s", metavar="NAME", help="Strategy module, transformer class or variant."
    ),
    to: str = typer.Option(
        "diffusers", "--to", metavar="diffusers|cache-dit",
        help="diffusers (MagCacheConfig) or cache-dit (DBCacheConfig)."
    ),
    steps: int = typer.Option(28, "--steps", "-n", metavar="N", help="Number of inference steps of the run."),
    threshold: float | None = typer.Option(
        None, "--threshold", metavar="T", help="Accumulated-error threshold (default: the strategy's)."
    ),
    max_skip_steps: int | None = typer.Option(
        None, "--max-skip-steps", "-k", metavar="K", help="K: max consecutive skips."
    ),
    retention_ratio: float | None = typer.Option(
        None, "--retention-ratio", metavar="R", help="Fraction of first steps kept."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the settings as JSON instead of Python."),
) -> None:
    """Print diffusers' MagCacheConfig or cache-dit's DBCacheConfig that skips exactly magsdk's steps."""
    if to not in TARGETS:
        raise UsageError(f"--to {to!r} is not one of {', '.join(TARGETS)}")
    check_steps(steps)
    overrides: dict[str, Any] = {k: v for k, v in (("threshold", threshold), ("max_skip_steps", max_skip_steps),
                                                   ("retention_ratio", retention_ratio)) if v is not None}
    check_cache_settings(overrides)  # names the flag, the value and the range, before the strategy loads
    base = resolve_config(strategy, steps)
    try:
        config = MagCacheConfig(**{**base.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UsageError(f"invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}") from exc
    if to == "diffusers":
        _print_diffusers(strategy, config, steps, as_json)
    else:
        _print_cache_dit(config, steps, as_json)


def _print_diffusers(strategy: str, config: MagCacheConfig, steps: int, as_json: bool) -> None:
    exported = to_diffusers_config(config, steps)
    values = {
        "threshold": exported.threshold,
        "max_skip_steps": exported.max_skip_steps,
        "retention_ratio": exported.retention_ratio,
        "num_inference_steps": exported.num_inference_steps,
        "mag_ratios": [float(v) for v in exported.mag_ratios.tolist()],
    }
    missing = _missing_from_diffusers(strategy)
    if as_json:
        typer.echo(json.dumps({**values, "register_with_diffusers": missing}, indent=2))
        return
    lines = ["from diffusers.hooks import MagCacheConfig, apply_mag_cache", ""]
    if missing:
        lines[1:1] = ["import magsdk", "",
                      f"# diffusers' TransformerBlockRegistry lacks {', '.join(missing)}: register magsdk's metadata",
                      f"magsdk.register_with_diffusers({strategy!r}, model=pipe)"]
    lines += [
        f"# {steps} steps; the curve is already mapped to this step count (magsdk.plan)",
        "apply_mag_cache(pipe.transformer, MagCacheConfig(",
        f"    threshold={values['threshold']!r}, max_skip_steps={values['max_skip_steps']!r}, "
        f"retention_ratio={values['retention_ratio']!r}, num_inference_steps={steps},",
        f"    mag_ratios={_numbers(values['mag_ratios'])},",
        "))",
    ]
    typer.echo("\n".join(lines))


def _print_cache_dit(config: MagCacheConfig, steps: int, as_json: bool) -> None:
    exported = to_cache_dit(config, steps)
    if as_json:
        typer.echo(json.dumps(exported.model_dump(), indent=2))
        return
    args = ", ".join(f"{k}={v!r}" for k, v in exported.settings.items())
    typer.echo("\n".join([
        "import cache_dit",
        "",
        f"# {steps} steps: 1 = compute, 0 = reuse the cache (cache-dit still runs its first block)",
        f"cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig({args}))",
    ]))


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
