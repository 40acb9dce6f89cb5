"""``magsdk demo``: the whole path on one model, end to end, with the figures that matter.

inspect → scaffold (a strategy module in a folder) → calibrate → generate the same prompts with
and without the cache → a table (calls computed, wall-clock speedup, PSNR / SSIM against the
uncached images, class accuracy on the bundled digits model) and a labelled PNG grid of the pairs.

Timing is paired and repeated, because one unpaired run of each method measures mostly noise (a
cold first run made the cache look 6x faster where 1.75x is the most its skipped calls allow):
one warm-up generation of each method, then ``rounds`` rounds that each time both methods, in
alternating order; the table reports medians. The speedup cannot honestly exceed the ratio of
transformer calls to computed calls, so a median above it is reported as noise, not as a result.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from magsdk.calibration.drivers import LoadedModel, load_model
from magsdk.calibration.settings import call_parameters, parse_device, parse_dtype
from magsdk.config import atomic_write_text
from magsdk.errors import UsageError
from magsdk.workflow.checks import check_cache_settings, check_steps
from magsdk.workflow.scaffold import ScaffoldOptions, run_scaffold


class DemoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None: the bundled reference pipeline
    out_dir: Path = Path("magsdk-demo")
    steps: int | None = None
    seeds: int = 1
    calibration_seeds: int = 2
    prompts: list[str] | None = None
    threshold: float | None = None
    max_skip_steps: int | None = None
    retention_ratio: float | None = None
    #: Timed rounds; each round times one uncached and one cached generation of every prompt.
    rounds: int = 5
    device: str | None = None
    dtype: str | None = None


class DemoRow(BaseModel):
    method: str
    transformer_calls: int
    computed_calls: int
    #: Median over the rounds.
    seconds: float
    rounds_seconds: list[float] = Field(default_factory=list)
    speedup: float
    #: transformer calls / computed calls: the most a skip can save.
    call_ratio: float = 1.0
    #: True when the measured speedup exceeds the call ratio, i.e. the timing is noise.
    speedup_is_noise: bool = False
    psnr_db: float | None = None
    ssim: float | None = None
    class_accuracy: float | None = None


class DemoResult(BaseModel):
    model: str
    transformer: str
    strategy_module: Path
    steps: int
    prompts: list[str]
    seeds: int
    threshold: float
    max_skip_steps: int
    retention_ratio: float
    rows: list[DemoRow]
    grid: Path
    scaffold_seconds: float
    rounds: int = 0
    warmup: str = ""
    #: The pipeline call of every generation (calibration and comparison alike).
    call_settings: dict[str, Any] = Field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"


def check_demo_options(options: DemoOptions) -> None:
    """Every usage error before anything runs or is written."""
    if options.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {options.seeds}")
    if options.calibration_seeds < 1:
        raise UsageError(f"calibration_seeds must be at least 1, got {options.calibration_seeds}")
    check_steps(options.steps)
    if options.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {options.rounds}")
    if options.prompts is not None and not [p for p in options.prompts if p.strip()]:
        raise UsageError("the prompt list is empty; give at least one prompt, or leave --prompts out for the defaults")
    given = {
        name: value
        for name, value in (("threshold", options.threshold), ("max_skip_steps", options.max_skip_steps),
                            ("retention_ratio", options.retention_ratio))
        if value is not None
    }
    check_cache_settings(given)
    options.device = parse_device(options.device)
    options.dtype = parse_dtype(options.dtype)


def _folder(options: DemoOptions) -> tuple[Path, bool]:
    from magsdk import reference

    bundled = reference.reference_model_path()
    folder = Path(options.model) if options.model else bundled
    if not (folder / "model_index.json").is_file():
        raise UsageError(
            f"--model {folder}: `magsdk demo` needs a diffusers pipeline folder (with model_index.json); "
            "for a bare transformer use `magsdk scaffold --model ...`"
        )
    return folder, folder.resolve() == bundled.resolve()


def _batch_call(pipe: Any, call: dict[str, Any], prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """One pipeline call for every prompt × seed (generators are added per call: they are used up)."""
    pairs = [(p, s) for p in prompts for s in seeds]
    kwargs = dict(call)
    kwargs["prompt"] = [p for p, _ in pairs]
    for name in ("negative_prompt", "negative_prompt_2"):
        if isinstance(kwargs.get(name), str):
            kwargs[name] = [kwargs[name]] * len(pairs)  # one per prompt of the batch
    if "output_type" not in call_parameters(pipe):
        raise UsageError(f"{type(pipe).__name__} takes no output_type; `magsdk demo` compares images as tensors")
    kwargs["output_type"] = "pt"
    return kwargs


def run_demo(options: DemoOptions, log: Callable[[str], None] = print) -> DemoResult:
    from magsdk.codegen.validate import isolated_registry, load_strategy
    from magsdk.reference import DEFAULT_PROMPTS as DIGIT_PROMPTS
    from magsdk.reference.classifier import digit_classifier
    from magsdk.reference.digits import prompt_label
    from magsdk.reference.metrics import psnr, ssim
    from magsdk.runtime import enable
    from magsdk.workflow.grid import labelled_grid

    check_demo_options(options)
    folder, bundled = _folder(options)
    prompts = options.prompts or (list(DIGIT_PROMPTS) if bundled else None)

    # 1-3. inspect, scaffold and calibrate: a real strategy module, the way a user gets one.
    started = time.perf_counter()
    log(f"[1/4] load {folder}, then inspect + scaffold + calibrate -> {options.out_dir / 'strategies'}")
    loaded: LoadedModel = load_model(str(folder), device=options.device, dtype=options.dtype)
    pipe = loaded.pipeline
    scaffold = run_scaffold(
        ScaffoldOptions(
            model=str(folder), name="demo_strategy", steps=options.steps, seeds=options.calibration_seeds,
            prompts=prompts, prompts_source="the demo's digit prompts" if bundled and not options.prompts else None,
            out_dir=options.out_dir / "strategies", with_test=False, force=True,
        ),
        progress=False, log=lambda line: log(f"      {line}"), loaded=loaded,
    )
    scaffold_seconds = time.perf_counter() - started
    assert scaffold.settings is not None
    settings = scaffold.settings
    steps, prompts = settings.steps, list(settings.prompts)
    with isolated_registry():
        strategy_cls = load_strategy(scaffold.module_path, scaffold.transformer_cls_name)
    threshold = strategy_cls.threshold if options.threshold is None else options.threshold
    max_skip = strategy_cls.max_skip_steps if options.max_skip_steps is None else options.max_skip_steps
    retention = strategy_cls.retention_ratio if options.retention_ratio is None else options.retention_ratio
    config = strategy_cls.default_config(steps, threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention)

    seeds = list(range(options.seeds))
    call = _batch_call(pipe, settings.call_kwargs, prompts, seeds)
    seed_per_image = [s for _ in prompts for s in seeds]

    def generate() -> tuple[torch.Tensor, float]:
        generators = [torch.Generator("cpu").manual_seed(s) for s in seed_per_image]
        begin = time.perf_counter()
        with torch.no_grad():
            images = pipe(**call, generator=generators).images
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return images.float().cpu(), time.perf_counter() - begin

    def cached() -> tuple[torch.Tensor, float, Any]:
        with enable(pipe, config, strategy=strategy_cls()) as handle:
            images, seconds = generate()
        return images, seconds, handle.stats

    log(f"[2/4] warm up: one generation of each method ({len(prompts)} prompts x {len(seeds)} seed(s), "
        f"{steps} steps)")
    generate()
    cached()

    log(f"[3/4] time {options.rounds} rounds, each round one uncached and one cached generation, order alternating")
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    plain_times: list[float] = []
    cached_times: list[float] = []
    plain_images: torch.Tensor | None = None
    cached_images: torch.Tensor | None = None
    stats: Any = None
    plain_calls = 0
    for index in range(options.rounds):
        for method in (("plain", "cached") if index % 2 == 0 else ("cached", "plain")):
            if method == "plain":
                counter = pipe.transformer.register_forward_pre_hook(count)
                calls = 0
                images, seconds = generate()
                counter.remove()
                plain_calls = calls
                plain_times.append(seconds)
                plain_images = images if plain_images is None else plain_images
            else:
                images, seconds, round_stats = cached()
                cached_times.append(seconds)
                if cached_images is None:
                    cached_images, stats = images, round_stats
    assert plain_images is not None and cached_images is not None and stats is not None

    labels_known = all(prompt_label(p) is not None for p in prompts)
    height = settings.call_kwargs.get("height")
    classifier = digit_classifier(height) if labels_known and isinstance(height, int) else None
    prompt_per_image = [p for p in prompts for _ in seeds]
    plain_median, cached_median = statistics.median(plain_times), statistics.median(cached_times)
    call_ratio = stats.total_calls / max(1, stats.computed_calls)
    speedup = plain_median / cached_median
    per_image_psnr = psnr(cached_images, plain_images)
    rows = [
        DemoRow(
            method="uncached", transformer_calls=plain_calls, computed_calls=plain_calls, seconds=plain_median,
            rounds_seconds=plain_times, speedup=1.0, call_ratio=1.0,
            class_accuracy=classifier.prompt_accuracy(plain_images, prompt_per_image) if classifier else None,
        ),
        DemoRow(
            method=f"magsdk ({threshold}/{max_skip}/{retention})",
            transformer_calls=stats.total_calls, computed_calls=stats.computed_calls, seconds=cached_median,
            rounds_seconds=cached_times, speedup=speedup, call_ratio=call_ratio,
            speedup_is_noise=speedup > call_ratio,
            psnr_db=float(per_image_psnr.mean()),
            ssim=float(ssim(cached_images, plain_images).mean()),
            class_accuracy=classifier.prompt_accuracy(cached_images, prompt_per_image) if classifier else None,
        ),
    ]

    log("[4/4] write the labelled image grid")
    grid_path = options.out_dir / "demo-grid.png"
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    cached_label = f"magsdk cached ({threshold}/{max_skip}/{retention})"
    grid = labelled_grid(
        plain_images, cached_images,
        [f"{p} (seed {s})" for p in prompts for s in seeds],
        [float(v) for v in per_image_psnr],
        title=[
            f"magsdk demo: {scaffold.transformer_cls_name}, {steps} steps, {_call_line(settings.call_kwargs)}",
            f"left: uncached; right: {cached_label}, {stats.computed_calls} of {stats.total_calls} transformer "
            f"calls computed; PSNR of each cached image against its uncached pair",
        ],
        headers=("uncached", "cached"),
    )
    grid.save(grid_path)
    result = DemoResult(
        model=str(folder), transformer=scaffold.transformer_cls_name, strategy_module=scaffold.module_path,
        steps=steps, prompts=prompts, seeds=options.seeds, threshold=threshold, max_skip_steps=max_skip,
        retention_ratio=retention, rows=rows, grid=grid_path, scaffold_seconds=scaffold_seconds,
        rounds=options.rounds, warmup="one uncached and one cached generation before timing",
        call_settings=dict(settings.call_kwargs), device=settings.device, dtype=settings.dtype,
    )
    atomic_write_text(options.out_dir / "demo-result.json", result.model_dump_json(indent=2) + "\n")
    return result


def _call_line(call: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in call.items() if k != "num_inference_steps")
