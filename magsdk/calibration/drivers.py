"""Calibration drivers: what runs generations inside ``magsdk.calibrate`` for a model.

Three ways to run a model, chosen by what the user has:

- a diffusers pipeline (a folder with ``model_index.json`` or a hub id): called with calibration
  prompts × seeds; CFG passes and ``cache_context`` names become branches by themselves;
- ``--driver FILE.py:FUNC``: the user's own ``FUNC(transformer, steps, seed) -> None``;
- a bare transformer class (or transformer folder): a plain flow-matching Euler loop over
  synthesized inputs. Its curve describes synthesized inputs (and, for a class, random weights)
  only, so the entry is marked ``synthetic``.

``magsdk.calibrate`` averages the generations and keeps the spread across them; this module
turns that into the ``CalibrationEntry`` a strategy module stores.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import magsdk
from magsdk.calibration.settings import (
    CalibrationRequest,
    CalibrationSettings,
    default_device,
    resolve_loop_settings,
    resolve_pipeline_settings,
)
from magsdk.config import CalibrationEntry, CalibrationResult
from magsdk.errors import MagSDKError, UsageError
from magsdk.inspect.targets import load_file_module
from magsdk.runtime import distributed
from magsdk.strategy import MagCacheStrategy

logger = logging.getLogger("magsdk")

DriverFn = Callable[[torch.nn.Module, int, int], None]
"""``(transformer, steps, seed) -> None``: run one generation of ``steps`` steps with ``seed``."""


class CalibrationRunError(MagSDKError):
    """A generation failed during calibration; nothing was written."""


# -- inputs the user gives ------------------------------------------------------------------------
def read_prompts(path: Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--prompts {path}: cannot read the file ({exc.strerror or exc})") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompt; write one prompt a line (lines with # are comments)")
    return prompts


def load_driver(spec: str) -> DriverFn:
    """Import ``FUNC`` from ``FILE.py`` (``FILE.py:FUNC``) and check it takes (transformer, steps, seed)."""
    file_part, sep, func_name = spec.rpartition(":")
    if not sep or not file_part.endswith(".py") or not func_name.isidentifier():
        raise UsageError(f"--driver {spec!r}: expected FILE.py:FUNC, e.g. --driver my_loop.py:generate")
    path = Path(file_part)
    if not path.is_file():
        raise UsageError(f"--driver {spec!r}: file {path} does not exist")
    module = load_file_module(path, f"--driver {spec}")
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"--driver {spec!r}: {path} has no function {func_name!r}")
    try:
        inspect.signature(func).bind(None, 0, 0)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"--driver {spec!r}: {func_name} must accept (transformer, steps, seed) and run one generation; "
            f"its signature is {func_name}{inspect.signature(func)}"
        ) from exc
    driver: DriverFn = func
    return driver


# -- loading the model ----------------------------------------------------------------------------
def is_pipeline_target(target: str) -> bool:
    """A folder with ``model_index.json``, or something shaped like a hub id (``org/name``)."""
    path = Path(target)
    if path.is_dir():
        return (path / "model_index.json").is_file()
    if path.exists() or target.endswith(".py") or ":" in target:
        return False
    parts = target.split("/")
    return len(parts) == 2 and all(parts)


def check_pipeline_folder(target: str) -> None:
    """Fail early, before anything loads, when a pipeline folder has no transformer."""
    index = Path(target) / "model_index.json"
    if not index.is_file():
        return
    try:
        components = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{index} is not valid JSON ({exc}); is this a diffusers pipeline folder?") from exc
    names = [k for k, v in components.items() if not k.startswith("_") and isinstance(v, list)]
    transformers = [n for n in names if n.startswith("transformer") and components[n][0] is not None]
    if not transformers:
        raise UsageError(
            f"the pipeline in {target} has no transformer (its components: {', '.join(names) or 'none'}); "
            "magsdk caches diffusion transformers. Point --model at a pipeline with a `transformer` component "
            "or at a transformer folder."
        )


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def pipeline_load_error(target: str, exc: Exception) -> MagSDKError:
    """The error for a pipeline ``from_pretrained`` did not load: a local folder, or a hub id (offline?)."""
    local = Path(target).is_dir()
    hint = (
        "check that the folder was written by `save_pretrained`"
        if local
        else "if this machine is offline, download the model and pass its local folder"
    )
    return MagSDKError(f"could not load the pipeline {target!r}: {type(exc).__name__}: {exc}; {hint}")


def load_pipeline(target: str, *, device: str | None = None, dtype: str | None = None) -> Any:
    """``DiffusionPipeline.from_pretrained`` on ``device`` (CUDA when there is one) in ``dtype``."""
    from diffusers import DiffusionPipeline

    check_pipeline_folder(target)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["torch_dtype"] = _torch_dtype(dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(target, **kwargs)
    except Exception as exc:
        raise pipeline_load_error(target, exc) from exc
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise UsageError(
            f"the pipeline {target!r} ({type(pipe).__name__}) has no transformer; magsdk caches diffusion "
            "transformers"
        )
    pipe.to(device or default_device())
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class LoadedModel:
    """The model calibration runs on, and how it was obtained (for the entry's ``source``)."""

    target: str
    transformer: torch.nn.Module
    pipeline: Any = None
    #: "pipeline", "pretrained transformer" or "random weights".
    weights: str = "pipeline"

    @property
    def transformer_cls_name(self) -> str:
        return type(self.transformer).__name__

    @property
    def folder(self) -> Path | None:
        """The local model folder (where recorded call settings may live)."""
        path = Path(self.target)
        return path if path.is_dir() else None

    @property
    def device(self) -> str:
        param = next(self.transformer.parameters(), None)
        return str(param.device) if param is not None else "cpu"

    @property
    def dtype(self) -> str:
        param = next(self.transformer.parameters(), None)
        return str(param.dtype).removeprefix("torch.") if param is not None else "float32"


def load_model(target: str, *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """A pipeline for pipeline targets, else the transformer (pretrained from a folder, else small)."""
    if is_pipeline_target(target):
        pipe = load_pipeline(target, device=device, dtype=dtype)
        return LoadedModel(target=target, transformer=pipe.transformer, pipeline=pipe, weights="pipeline")
    from magsdk.calibration.synthetic import load_transformer

    transformer, weights = load_transformer(target)
    transformer.to(device or default_device())
    wanted = _torch_dtype(dtype)
    current = next(transformer.parameters(), None)
    if wanted is not None and current is not None and current.dtype != wanted:
        transformer.to(dtype=wanted)  # only when it changes: diffusers logs on every dtype= it is given
    return LoadedModel(target=target, transformer=transformer, weights=weights)


def resolve_settings(request: CalibrationRequest, loaded: LoadedModel) -> CalibrationSettings:
    """What calibration of ``loaded`` will run (see ``magsdk.calibration.settings``)."""
    if loaded.pipeline is not None and request.driver is None:
        return resolve_pipeline_settings(
            request, loaded.pipeline, loaded.folder, device=loaded.device, dtype=loaded.dtype
        )
    return resolve_loop_settings(request, device=loaded.device, dtype=loaded.dtype)


# -- progress ---------------------------------------------------------------------------------------
@contextmanager
def progress_bar(
    enabled: bool, description: str, total: int, console: Console | None = None
) -> Iterator[Callable[[str], None]]:
    """A bar that advances once per generation, with the time left; ``advance(label)`` names the one done."""
    if not enabled:
        yield lambda _label: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("generations"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[label]}"),
        console=console or Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task(description, total=total, label="")
        yield lambda label: progress.update(task, advance=1, label=label)


# -- running ----------------------------------------------------------------------------------------
def seeds_of(count: int) -> list[int]:
    return list(range(count))


def pipeline_call_kwargs(pipe: Any, prompt: str, seed: int, call: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of one calibration generation (tests replay them exactly)."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {"prompt": prompt, "generator": torch.Generator("cpu").manual_seed(seed)}
    if "output_type" in params:
        kwargs["output_type"] = "latent"  # the transformer's calls are all calibration needs
    kwargs.update(call)
    return kwargs


def run_pipeline(
    pipe: Any, strategy: MagCacheStrategy, settings: CalibrationSettings, *, progress: bool = True
) -> CalibrationResult:
    """Every prompt × seed through the pipeline inside one ``magsdk.calibrate`` (averaged there).

    Under an initialised process group each rank runs its share of them and every rank gets the
    curve of all (docs/multi-gpu.md).
    """
    group = distributed.data_parallel_group(pipe.transformer)
    runs = distributed.shard([(p, s) for p in settings.prompts for s in seeds_of(settings.seeds)], group)
    steps = settings.steps
    with progress_bar(progress, f"calibrating {type(pipe.transformer).__name__}", len(runs)) as advance:
        cal = magsdk.calibrate(pipe, strategy=strategy, data_group=group, probes=settings.probes)
        with cal, torch.no_grad():
            for prompt, seed in runs:
                try:
                    pipe(**pipeline_call_kwargs(pipe, prompt, seed, settings.call_kwargs))
                except MagSDKError:
                    raise
                except Exception as exc:
                    raise CalibrationRunError(
                        f"{type(pipe).__name__} failed on prompt {prompt!r}, seed {seed}, {steps} steps: "
                        f"{type(exc).__name__}: {exc}. Nothing was written."
                    ) from exc
                advance(f"{prompt[:40]!r} seed {seed}")
    assert cal.result is not None
    return cal.result


def run_driver(
    transformer: torch.nn.Module,
    driver: DriverFn,
    strategy: MagCacheStrategy,
    *,
    steps: int,
    seeds: int,
    label: str,
    progress: bool = True,
    probes: int = 0,
) -> CalibrationResult:
    """The user's driver once per seed, inside one ``magsdk.calibrate`` (seeds split across ranks)."""
    group = distributed.data_parallel_group(transformer)
    mine = distributed.shard(seeds_of(seeds), group)
    with progress_bar(progress, f"calibrating {type(transformer).__name__}", len(mine)) as advance:
        cal = magsdk.calibrate(transformer, strategy=strategy, data_group=group, probes=probes)
        with cal:
            for seed in mine:
                try:
                    driver(transformer, steps, seed)
                except MagSDKError:
                    raise
                except Exception as exc:
                    raise CalibrationRunError(
                        f"the driver {label} raised {type(exc).__name__}: {exc} (steps={steps}, seed={seed}). "
                        "Fix the driver; nothing was written."
                    ) from exc
                advance(f"seed {seed}")
    assert cal.result is not None
    _check_steps(cal.result, steps, f"the driver {label}")
    return cal.result


def _check_steps(result: CalibrationResult, steps: int, who: str) -> None:
    for name, branch in result.branches.items():
        if len(branch.norm_ratios) != steps:
            raise CalibrationRunError(
                f"{who} ran {len(branch.norm_ratios)} denoising steps on branch {name!r}, but --steps is {steps}. "
                "It must call the transformer once per step (per branch) for `steps` steps."
            )


def run_calibration(
    loaded: LoadedModel,
    strategy: MagCacheStrategy,
    settings: CalibrationSettings,
    *,
    progress: bool = True,
    timestep_name: str | None = None,
    command: str = "magsdk scaffold",
) -> tuple[CalibrationResult, CalibrationEntry]:
    """Run the generations ``settings`` describe on ``loaded`` and return the averaged result and its entry.

    ``timestep_name`` (from the inspection) helps the synthetic loop find the timestep among
    ``--inputs``; ``command`` is named in hints about options.
    """
    import diffusers

    steps, seeds = settings.steps, settings.seeds
    if settings.probes:
        check_probes_target(loaded.transformer, settings.probes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if settings.kind == "driver":
            assert settings.driver is not None
            fn = load_driver(settings.driver)
            result = run_driver(
                loaded.transformer, fn, strategy, steps=steps, seeds=seeds, label=settings.driver, progress=progress,
                probes=settings.probes,
            )
            source = f"magsdk.calibrate on {loaded.target} with --driver {settings.driver}, {_count(seeds, 'seed')}"
            entry = to_entry(result, steps=steps, source=source, num_seeds=seeds)
        elif settings.kind == "pipeline":
            pipe = loaded.pipeline
            result = run_pipeline(pipe, strategy, settings, progress=progress)
            _check_steps(result, steps, type(pipe).__name__)
            call = settings.call_kwargs
            shape = f"{call['height']}x{call['width']}" if "height" in call and "width" in call else None
            source = (
                f"magsdk.calibrate on {loaded.target} ({type(pipe).__name__}), "
                f"{_count(len(settings.prompts), 'prompt')} x {_count(seeds, 'seed')}"
                + (f" at {shape}" if shape else "")
            )
            scheduler = getattr(pipe, "scheduler", None)
            entry = to_entry(
                result, steps=steps, source=source, scheduler=type(scheduler).__name__ if scheduler else None,
                shape=shape, num_prompts=len(settings.prompts), num_seeds=seeds,
            )
        else:
            from magsdk.calibration.synthetic import run_synthetic

            result, shape = run_synthetic(
                loaded.transformer, strategy, steps=steps, seeds=seeds, progress=progress, inputs=settings.inputs,
                timestep_name=timestep_name, command=command, probes=settings.probes,
            )
            _check_steps(result, steps, "the synthetic Euler loop")
            made = f"--inputs {settings.inputs}" if settings.inputs else "synthesized inputs"
            source = (
                f"magsdk.calibrate on {loaded.target}: flow-matching Euler loop over {made}, "
                f"{loaded.weights}, {_count(seeds, 'seed')} (synthetic)"
            )
            entry = to_entry(
                result, steps=steps, source=source, scheduler="flow-matching Euler (magsdk synthetic loop)",
                shape=shape, num_seeds=seeds, synthetic=True,
            )
            logger.warning(
                "%s: no pipeline and no --driver, so the curve was measured on %s (%s); it is "
                "marked synthetic. Recalibrate on real generations before relying on it.",
                loaded.target, made, loaded.weights,
            )
    if settings.probes and not entry.probes:
        raise CalibrationRunError(
            f"--probes {settings.probes}: the calibration did not measure probes on every branch (a branch is probed "
            "between two consecutive steps it computed, each with a timestep argument); nothing was written. Calibrate "
            "without --probes"
        )
    entry = entry.model_copy(update={"diffusers_version": diffusers.__version__, "settings": settings.record()})
    result.synthetic = entry.synthetic
    result.scheduler = entry.scheduler
    result.num_steps = steps
    return result, entry


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def check_probes_target(transformer: torch.nn.Module, probes: int) -> None:
    """A probe moves the transformer's timestep argument, so a forward without one cannot be probed.

    ``magsdk.calibrate`` refuses it too, but in terms of its Python argument; checked here before any
    generation runs, the error names the command's option.
    """
    from magsdk.conventions import TIMESTEP_ARGUMENT_NAMES
    from magsdk.runtime.layout import forward_parameters

    names = {p.name for p in forward_parameters(transformer)}
    if not names & set(TIMESTEP_ARGUMENT_NAMES):
        raise UsageError(
            f"--probes {probes}: {type(transformer).__name__}.forward has no timestep argument "
            f"({', '.join(TIMESTEP_ARGUMENT_NAMES)}) for the probes to move between steps; calibrate without --probes"
        )


def to_entry(
    result: CalibrationResult,
    *,
    steps: int,
    source: str,
    scheduler: str | None = None,
    shape: str | None = None,
    num_prompts: int | None = None,
    num_seeds: int | None = None,
    synthetic: bool = False,
) -> CalibrationEntry:
    """The mean curve and the spread per branch, with the first branch's timesteps."""
    first = next(iter(result.branches.values()))
    for name, branch in result.branches.items():
        bad = [i for i, v in enumerate(branch.norm_ratios) if not math.isfinite(v) or v <= 0]
        if bad:
            raise CalibrationRunError(
                f"calibration measured a non-finite or non-positive norm ratio on branch {name!r} at step(s) {bad} "
                f"({[branch.norm_ratios[i] for i in bad]}): the block stack's residual vanished or overflowed. "
                "Check the model's outputs (NaN/inf, diverging latents) or its compute_residual; nothing was written."
            )
    return CalibrationEntry(
        num_steps=steps,
        branches={name: list(b.norm_ratios) for name, b in result.branches.items()},
        spread={name: list(b.norm_ratio_spread) for name, b in result.branches.items() if b.norm_ratio_spread},
        timesteps=list(first.timesteps) if all(t is not None for t in first.timesteps) else [],
        source=source,
        scheduler=scheduler,
        shape=shape,
        num_prompts=num_prompts,
        num_seeds=num_seeds,
        synthetic=synthetic,
        schedule=result.schedule,
        probes=result.probe_curves() or {},
    )
