"""Inspect every transformer diffusers exports, then cache it: the proof that ``magsdk inspect`` generalises.

For each class whose name contains ``Transformer`` and ``Model`` in ``dir(diffusers)``:

1. build it small (``magsdk.inspect.shrink.build_small``) from its ``__init__`` defaults;
2. synthesize forward inputs (``magsdk.inspect.inputs.synthesize_inputs``);
3. inspect it (``magsdk.inspect.inspect_module``: one traced forward, metadata inferred from data flow);
4. ``magsdk.enable(model, MagCacheConfig(<flat curve>), metadata=report)`` with settings that force a skip at
   step 1, and call the transformer twice with two timesteps, as a 2-step denoising loop would;
5. check that step 0 computed exactly what the uncached model computes, that step 1 was skipped, and that the
   skipped step's output equals an independent reference (``tools/skip_reference.py``: an unhooked copy of the
   model run with its cached blocks replaced by "first block's input + the residual of step 0", built with plain
   torch hooks and no magsdk runtime code), which must itself differ from computing step 1.

Usage: ``python tools/zoo.py --out docs/zoo.md`` (``--classes A,B`` for a subset). Tests call ``run_zoo``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import magsdk
from magsdk.config import InspectionNote, InspectionReport, MagCacheConfig, NoteCode, atomic_write_text
from magsdk.conventions import LATENT_ARGUMENT_NAMES, TIMESTEP_ARGUMENT_NAMES, metadata_text
from magsdk.inspect import inspect_module, inspect_target
from magsdk.inspect.inputs import synthesize_inputs
from magsdk.inspect.shrink import build_small
from tools.skip_reference import skip_reference

#: The published FLUX.1-dev transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

#: A flat curve with no retention and a generous threshold: step 0 computes, step 1 must skip.
SKIP_CONFIG = MagCacheConfig(
    mag_ratios=[1.0, 1.0], threshold=10.0, max_skip_steps=1, retention_ratio=0.0, num_inference_steps=2
)

#: The skipped output must equal the reference within this (both add the same float32 residual to the same
#: input, so they agree to rounding); the computed step must equal the uncached forward within the same.
RTOL, ATOL = 1e-5, 1e-6

#: Notes that mean a skipped step cannot reproduce what computing would (work between or beside the cached blocks).
INEXACT_CODES: frozenset[NoteCode] = frozenset(
    {"between-block-work", "in-place-change", "separate-stack", "interleaved-group"}
)


class ZooResult(BaseModel):
    """What happened to one transformer class in the zoo."""

    transformer: str
    passed: bool = False
    #: The stage that failed (build, inputs, inspect, enable, denoise, check), or "done".
    stage: str = "build"
    reason: str = ""
    groups: list[str] = Field(default_factory=list)
    metadata: list[str] = Field(default_factory=list)
    head: str = ""
    tail: str = ""
    warnings: list[str] = Field(default_factory=list)
    shrunk: dict[str, Any] = Field(default_factory=dict)
    parameters: int = 0
    cached: bool = False
    computed_steps: list[int] = Field(default_factory=list)
    skipped_steps: list[int] = Field(default_factory=list)
    output_shape: list[int] | None = None
    #: max |skipped output − reference| and max |reference| (the scale it is measured against).
    skip_max_diff: float | None = None
    reference_scale: float | None = None
    #: max |reference − computing step 1|: how far a skip is from a compute (must not be 0 for the check to tell).
    skip_vs_compute: float | None = None
    #: max |computed step 0 − uncached forward|.
    computed_max_diff: float | None = None
    notes: list[InspectionNote] = Field(default_factory=list)
    seconds: float = 0.0


def transformer_classes() -> list[str]:
    """Every class ``diffusers`` exports whose name contains ``Transformer`` and ``Model``."""
    import diffusers

    return sorted(name for name in dir(diffusers) if "Transformer" in name and "Model" in name)


# -- one class --------------------------------------------------------------------------------------------
def _first_tensor(output: Any) -> torch.Tensor | None:
    """The prediction in whatever container the transformer returned (tuple, output dataclass, list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    sample = getattr(output, "sample", None)
    if sample is not None:
        return _first_tensor(sample)
    if isinstance(output, dict) and output:
        return _first_tensor(next(iter(output.values())))
    return None


def _timestep_name(kwargs: dict[str, Any]) -> str | None:
    """The argument the runtime's step tracker reads (same candidates, same order)."""
    for name in TIMESTEP_ARGUMENT_NAMES:
        if name in kwargs:
            return name
    return None


def _later_timestep(value: Any) -> Any:
    """The timestep of the next denoising step: smaller, never equal."""
    if isinstance(value, torch.Tensor):
        return value * 0.5 if bool(value.abs().sum() > 0) else value + 0.25
    if isinstance(value, (int, float)):
        return value * 0.5 if value else 0.25
    return value


def _describe_metadata(report: InspectionReport) -> list[str]:
    return [f"{group.path}: {metadata_text(group.metadata)}" for group in report.block_groups]


def _step_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], step: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Fresh copies of the inputs of denoising step ``step`` (0 or 1).

    Step 1 has a later timestep and slightly moved latents, as in a denoising loop. Both matter
    to the check: with the latents unchanged, a block stack that ignores the timestep computes at
    step 1 exactly "step-1 input + step-0 residual", and a skip could not be told from a compute.
    """
    step_args, step_kwargs = copy.deepcopy((args, kwargs))
    if step == 1:
        name = _timestep_name(step_kwargs)
        if name is not None:
            step_kwargs[name] = _later_timestep(step_kwargs[name])
        latent = next((n for n in LATENT_ARGUMENT_NAMES if n in step_kwargs), None)
        if latent is not None:
            step_kwargs[latent] = _moved(step_kwargs[latent], torch.Generator().manual_seed(1))
    return step_args, step_kwargs


def _moved(value: Any, generator: torch.Generator) -> Any:
    """Latents one small denoising move later (tensors inside lists too)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value + 0.1 * torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, generator) for v in value)
    return value


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=RTOL, atol=ATOL))


def largest_block_lists(model: torch.nn.Module) -> tuple[list[str], int]:
    """The outermost lists of same-class blocks holding the most parameters (ties kept): the main stack.

    Every group is shrunk to the same depth, so the main stack (double-stream / DiT blocks) outweighs
    side stacks (text refiners, caption projections, noise refiners). Caching a side stack would pass
    every other check while saving almost nothing, so the zoo requires the main stack to be cached.
    """
    sizes: dict[str, int] = {}
    taken: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) or len(module) == 0:
            continue
        if any(path.startswith(prefix + ".") for prefix in taken):
            continue
        members = list(module.children())
        if len({type(m) for m in members}) != 1 or type(members[0]).__module__.startswith("torch."):
            continue
        count = sum(p.numel() for p in module.parameters())
        if count == 0:
            continue
        taken.append(path)
        sizes[path] = count
    if not sizes:
        return [], 0
    top = max(sizes.values())
    return [path for path, count in sizes.items() if count == top], top


def _reason(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = ""
    if tb:
        frame = tb[-1]
        where = f" (at {Path(frame.filename).name}:{frame.lineno})"
    message = " ".join(str(exc).split())
    if len(message) > 400:
        message = message[:400] + " …"
    return f"{type(exc).__name__}: {message}{where}"


def run_one(name: str) -> ZooResult:
    """Build, inspect, enable and run one class; every failure is caught and explained."""
    import diffusers

    result = ZooResult(transformer=name)
    start = time.perf_counter()
    try:
        cls = getattr(diffusers, name)
        model, shrunk = build_small(cls)
        result.shrunk = shrunk
        result.parameters = sum(p.numel() for p in model.parameters())

        result.stage = "inputs"
        args, kwargs = synthesize_inputs(model)

        result.stage = "inspect"
        report = inspect_module(model, *copy.deepcopy((args, kwargs)), inputs="synthesized")
        result.groups = [f"{g.path} × {g.count} ({g.block_class})" for g in report.block_groups]
        result.metadata = _describe_metadata(report)
        result.head, result.tail = report.head, report.tail
        result.warnings = list(report.warnings)

        result.notes = list(report.notes)
        step0_args, step0_kwargs = _step_inputs(args, kwargs, 0)
        with torch.no_grad():
            uncached = _first_tensor(model(*step0_args, **step0_kwargs))

        result.stage = "reference"  # before enable: the copy must be of the unhooked model
        reference = skip_reference(model, report, _step_inputs(args, kwargs, 0), _step_inputs(args, kwargs, 1))

        result.stage = "enable"
        handle = magsdk.enable(model, SKIP_CONFIG, metadata=report)
        try:
            result.stage = "denoise"
            outputs = []
            for step in range(2):
                step_args, step_kwargs = _step_inputs(args, kwargs, step)
                with torch.no_grad():
                    outputs.append(_first_tensor(model(*step_args, **step_kwargs)))
            stats = handle.stats
            result.computed_steps = stats.computed_steps()
            result.skipped_steps = stats.skipped_steps()
        finally:
            handle.disable()

        result.stage = "check"
        result.cached = 1 in result.skipped_steps
        main_paths, main_size = largest_block_lists(model)
        computed, skipped = outputs
        expected = _first_tensor(reference.skipped_next)
        compute_next = _first_tensor(reference.uncached_next)
        if skipped is not None:
            result.output_shape = list(skipped.shape)
        problems = []
        if result.computed_steps != [0]:
            problems.append(f"computed steps {result.computed_steps}, expected [0]")
        if not result.cached:
            problems.append(f"step 1 was not skipped (skipped steps: {result.skipped_steps})")
        if computed is None or skipped is None or uncached is None or expected is None or compute_next is None:
            problems.append("the transformer returned no tensor")
        else:
            result.computed_max_diff = _max_diff(computed, uncached) if computed.shape == uncached.shape else None
            if not _close(computed, uncached):
                problems.append(
                    f"the computed step 0 differs from the uncached forward (max |Δ| {result.computed_max_diff})"
                )
            result.reference_scale = float(expected.abs().max())
            result.skip_vs_compute = _max_diff(expected, compute_next) if expected.shape == compute_next.shape else None
            if _close(expected, compute_next):
                problems.append(
                    "the reference skip equals computing step 1 (max |Δ| "
                    f"{result.skip_vs_compute:.3g}), so this check cannot tell a skip from a compute"
                )
            if skipped.shape != expected.shape:
                problems.append(f"skipped-step output {tuple(skipped.shape)} != reference {tuple(expected.shape)}")
            else:
                result.skip_max_diff = _max_diff(skipped, expected)
                if not _close(skipped, expected):
                    problems.append(
                        f"the skipped step's output differs from the reference (max |Δ| {result.skip_max_diff:.3g}, "
                        f"max |reference| {result.reference_scale:.3g}, rtol {RTOL}, atol {ATOL})"
                    )
        cached_paths = [g.path for g in report.block_groups]
        if main_paths and not set(main_paths) & set(cached_paths):
            problems.append(
                f"the main block list {' / '.join(f'`{p}`' for p in main_paths)} ({main_size} parameters, the "
                f"largest) is not among the cached groups {cached_paths}: inspection picked a side stack"
            )
        if problems:
            raise AssertionError("; ".join(problems))
        result.stage = "done"
        result.passed = True
    except Exception as exc:
        result.reason = _reason(exc)
    result.seconds = round(time.perf_counter() - start, 3)
    return result


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers warns about deprecations and dtypes on every tiny build; the zoo reports its own findings."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "magsdk", "transformers")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def run_zoo(classes: Sequence[str] | None = None) -> list[ZooResult]:
    """Run the zoo over ``classes`` (default: every exported transformer class)."""
    names = list(classes) if classes is not None else transformer_classes()
    results = []
    with _quiet():
        for name in names:
            results.append(run_one(name))
    return results


# -- FLUX.1-dev timing ------------------------------------------------------------------------------
class FluxTiming(BaseModel):
    build_seconds: float
    inspect_seconds: float
    #: A fresh ``python`` process that imports magsdk, inspects, and exits (what ``magsdk inspect`` costs).
    cold_seconds: float | None = None
    cold_import_seconds: float | None = None
    shrunk: dict[str, Any]
    groups: list[str]
    load_average: float | None = None


_COLD_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import torch, diffusers
from diffusers import FluxTransformer2DModel
from magsdk.inspect import inspect_target
imported = time.perf_counter()
report = inspect_target("FluxTransformer2DModel", config=json.loads(sys.argv[1]))
assert len(report.block_groups) == 2, report
print(json.dumps({"imports": imported - start, "inspect": time.perf_counter() - imported}))
"""


def _cold_inspect_seconds() -> tuple[float, float] | None:
    """(whole process, imports of torch + diffusers + magsdk) for a fresh interpreter inspecting FLUX.1-dev."""
    import json
    import subprocess

    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _COLD_SCRIPT, json.dumps(FLUX_DEV_CONFIG)], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(f"cold FLUX.1-dev inspection failed: {done.stderr[-2000:]}", file=sys.stderr)
        return None
    parts = json.loads(done.stdout.strip().splitlines()[-1])
    return round(seconds, 2), round(float(parts["imports"]), 2)


def time_flux_dev() -> FluxTiming:
    """Inspect the FLUX.1-dev architecture from its published config, the way ``magsdk inspect`` does."""
    from diffusers import FluxTransformer2DModel

    with _quiet():
        start = time.perf_counter()
        build_small(FluxTransformer2DModel, FLUX_DEV_CONFIG)
        build = time.perf_counter() - start
        start = time.perf_counter()
        report = inspect_target(FluxTransformer2DModel, config=FLUX_DEV_CONFIG)
        total = time.perf_counter() - start
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cold = _cold_inspect_seconds()
    return FluxTiming(
        build_seconds=round(build, 3),
        inspect_seconds=round(total, 3),
        cold_seconds=cold[0] if cold else None,
        cold_import_seconds=cold[1] if cold else None,
        shrunk=report.shrunk,
        groups=[f"{g.path} × {g.count} ({g.block_class})" for g in report.block_groups],
        load_average=round(load, 1) if load is not None else None,
    )


# -- report -----------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: list[ZooResult], found: int, flux: FluxTiming | None, command: str, seconds: float) -> str:
    passed = sum(r.passed for r in results)
    lines = [
        "# The transformer zoo",
        "",
        "Every transformer model class that `diffusers` exports (names containing `Transformer` and `Model`), "
        "built small from its `__init__` defaults, inspected from synthesized inputs, then cached with "
        "`magsdk.enable(model, MagCacheConfig(...), metadata=report)`: a flat curve (`[1.0, 1.0]`, threshold 10, "
        "retention 0, K=1) forces a skip at step 1 of a 2-step run (two transformer calls with two timesteps). "
        "A class passes when step 0 computed exactly what the uncached model computes, step 1 was skipped, and "
        "the skipped step's output equals a reference built without magsdk's runtime (`tools/skip_reference.py`): "
        "an unhooked copy of the model, its step-0 residual (last cached block's hidden output minus the first "
        "block's hidden input) captured with plain torch hooks, then step 1 run with every cached block replaced "
        "by a pass-through that returns, in the block's own output container, its hidden input — plus that "
        f"residual for the first block. Equal means `torch.allclose` with rtol {RTOL}, atol {ATOL}; the reference "
        "must also differ from computing step 1, or the check could not tell a skip from a compute.",
        "",
        f"Generated by `{command}` with diffusers {_version('diffusers')}, torch {torch.__version__}, "
        f"Python {platform.python_version()} on {platform.machine()} (CPU); the run took {seconds:.1f} s.",
        "",
        f"**{passed}/{len(results)} pass** ({found} classes found in `dir(diffusers)`).",
        "",
    ]
    inexact = [r.transformer for r in results if r.passed and INEXACT_CODES & {n.code for n in r.notes}]
    if inexact:
        lines += [
            f"{len(inexact)} of the passing classes run work between their blocks that a skipped step cannot "
            "reproduce (ControlNet-style residuals, face adapters, interleaved temporal blocks); caching runs, "
            "and inspection says so in its warnings (listed below): "
            + ", ".join(f"`{n}`" for n in inexact)
            + ".",
            "",
        ]
    if flux is not None:
        lines += [
            "## FLUX.1-dev inspection time",
            "",
            "The published FLUX.1-dev transformer config (`in_channels` 64, 19 double + 38 single blocks, 24 heads "
            "× 128, `joint_attention_dim` 4096, `pooled_projection_dim` 768, `guidance_embeds`, rope axes "
            "[16, 56, 56]) shrunk and inspected with `magsdk.inspect.inspect_target` (build + inputs + traced "
            "forward + inference), goal < 10 s:",
            "",
            f"- inspect, in process (imports done): **{flux.inspect_seconds:.2f} s** (of which building small: "
            f"{flux.build_seconds:.2f} s)",
            "- inspect, fresh process (`python -c` importing torch, diffusers and magsdk, inspecting, exiting): "
            + (
                f"**{flux.cold_seconds:.2f} s**, of which {flux.cold_import_seconds:.2f} s importing torch, diffusers "
                "and magsdk"
                if flux.cold_seconds is not None
                else "failed (see stderr)"
            )
            + (f" (1-minute load average {flux.load_average} on this shared machine)" if flux.load_average else ""),
            f"- shrunk: {', '.join(f'`{k}` {v[0]}→{v[1]}' for k, v in flux.shrunk.items())}",
            f"- blocks found: {'; '.join(flux.groups)}",
            "",
        ]
    lines += [
        "## Results",
        "",
        "| # | Class | Block groups (path × count, block class) | Inferred metadata | Cached | Skipped output vs "
        "reference: max \\|Δ\\| (reference vs computing) | Result |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, r in enumerate(results, 1):
        groups = "<br>".join(_cell(g) for g in r.groups) or "—"
        meta = "<br>".join(_cell(m) for m in r.metadata) or "—"
        cached = f"yes (computed {r.computed_steps}, skipped {r.skipped_steps})" if r.cached else "no"
        outcome = f"pass ({r.seconds:.2f} s)" if r.passed else f"**fail at {r.stage}**: {_cell(r.reason)}"
        versus = "—" if r.skip_max_diff is None else f"{r.skip_max_diff:.3g} ({_num(r.skip_vs_compute)})"
        lines.append(f"| {index} | `{r.transformer}` | {groups} | {meta} | {cached} | {versus} | {outcome} |")
    warned = [r for r in results if r.notes]
    if warned:
        lines += ["", "## Inspection warnings", ""]
        for r in warned:
            for note in r.notes:
                lines.append(f"- `{r.transformer}` `{note.code}`: {_cell(note.message)}")
    failed = [r for r in results if not r.passed]
    lines += ["", "## Failures", ""]
    if failed:
        for r in failed:
            lines.append(f"- `{r.transformer}` (stage {r.stage}): {_cell(r.reason)}")
    else:
        lines.append("None.")
    lines += ["", "## What was shrunk", ""]
    for r in results:
        if r.shrunk:
            changes = ", ".join(f"`{k}` {_short(v[0])}→{_short(v[1])}" for k, v in r.shrunk.items())
            lines.append(f"- `{r.transformer}` ({r.parameters / 1e6:.2f}M parameters): {changes}")
    return "\n".join(lines) + "\n"



def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--classes", default=None, help="comma-separated subset of class names")
    parser.add_argument("--no-flux-timing", action="store_true",
                        help="skip the FLUX.1-dev timing (a timing: run it on a quiet machine)")
    ns = parser.parse_args(argv)
    found = transformer_classes()
    classes = ns.classes.split(",") if ns.classes else found
    print(f"found {len(found)} transformer classes in dir(diffusers); running {len(classes)}", file=sys.stderr)
    start = time.perf_counter()
    flux = None if ns.no_flux_timing else time_flux_dev()
    results = []
    with _quiet():
        for name in classes:
            result = run_one(name)
            results.append(result)
            status = "pass" if result.passed else f"FAIL at {result.stage}: {result.reason}"
            print(f"{name}: {status} ({result.seconds:.2f} s)", file=sys.stderr)
    seconds = time.perf_counter() - start
    command = "python tools/zoo.py" + (f" --out {ns.out}" if ns.out else "")
    if ns.classes:
        command += f" --classes {ns.classes}"
    if ns.no_flux_timing:
        command += " --no-flux-timing"
    text = render(results, len(found), flux, command, seconds)
    if ns.out:
        atomic_write_text(ns.out, text)
    else:
        print(text)
    passed = sum(r.passed for r in results)
    print(f"{passed}/{len(results)} pass", file=sys.stderr)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
