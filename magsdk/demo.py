"""``magsdk demo``: the whole path on one model, end to end, with the figures that matter.

inspect → scaffold (a strategy module in a folder) → calibrate → generate the same prompts with
and without the cache → a table (calls computed, wall-clock speedup, PSNR / SSIM against the
uncached images, class accuracy on the bundled digits model) and a PNG grid of the pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from magsdk.config import atomic_write_text
from magsdk.errors import UsageError


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


class DemoRow(BaseModel):
    method: str
    transformer_calls: int
    computed_calls: int
    seconds: float
    speedup: float
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


def run_demo(options: DemoOptions, log: Callable[[str], None] = print) -> DemoResult:
    from magsdk import reference
    from magsdk.codegen.scaffold import ScaffoldOptions, run_scaffold
    from magsdk.codegen.validate import isolated_registry, load_strategy
    from magsdk.reference.classifier import digit_classifier
    from magsdk.reference.digits import prompt_label
    from magsdk.reference.metrics import psnr, ssim
    from magsdk.runtime import enable

    if options.seeds < 1 or options.calibration_seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {options.seeds} / {options.calibration_seeds}")
    if options.steps is not None and options.steps < 2:
        raise UsageError(f"--steps must be at least 2, got {options.steps}")
    folder = Path(options.model) if options.model else reference.reference_model_path()
    if not (folder / "model_index.json").is_file():
        raise UsageError(
            f"--model {folder}: `magsdk demo` needs a diffusers pipeline folder (with model_index.json); "
            "for a bare transformer use `magsdk scaffold --model ...`"
        )
    settings = reference.reference_settings(folder)
    steps = options.steps or settings.num_inference_steps
    prompts = list(options.prompts or reference.DEFAULT_PROMPTS)
    cfg_kwargs: dict[str, Any] = {"max_sequence_length": settings.max_sequence_length}
    if settings.true_cfg_scale > 1.0:
        cfg_kwargs.update(true_cfg_scale=settings.true_cfg_scale, negative_prompt=settings.negative_prompt)

    # 1-3. inspect, scaffold and calibrate: a real strategy module, the way a user gets one.
    started = time.perf_counter()
    log(f"[1/4] inspect + scaffold + calibrate {folder} ({steps} steps) -> {options.out_dir / 'strategies'}")
    scaffold = run_scaffold(
        ScaffoldOptions(
            model=str(folder), name="demo_strategy", steps=steps, seeds=options.calibration_seeds,
            prompts=prompts, out_dir=options.out_dir / "strategies", height=settings.height, width=settings.width,
            with_test=False, force=True, call_kwargs=cfg_kwargs,
        ),
        progress=False,
    )
    scaffold_seconds = time.perf_counter() - started
    with isolated_registry():
        strategy_cls = load_strategy(scaffold.module_path, scaffold.transformer_cls_name)
    threshold = strategy_cls.threshold if options.threshold is None else options.threshold
    max_skip = strategy_cls.max_skip_steps if options.max_skip_steps is None else options.max_skip_steps
    retention = strategy_cls.retention_ratio if options.retention_ratio is None else options.retention_ratio
    config = strategy_cls.default_config(
        steps, threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention
    )

    log("[2/4] load the pipeline")
    pipe = reference.load_reference_pipeline(folder)
    seeds = list(range(options.seeds))

    def run() -> tuple[torch.Tensor, float]:
        begin = time.perf_counter()
        images = reference.generate(pipe, prompts, seeds, num_inference_steps=steps, settings=settings)
        return images, time.perf_counter() - begin

    log("[3/4] generate without the cache, then with it")
    reference.generate(pipe, prompts[:1], [0], num_inference_steps=2, settings=settings)  # warm-up
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    counter = pipe.transformer.register_forward_pre_hook(count)
    plain_images, plain_s = run()
    plain_calls, calls = calls, 0
    with enable(pipe, config, strategy=strategy_cls()) as handle:
        cached_images, cached_s = run()
    counter.remove()

    labels_known = all(prompt_label(p) is not None for p in prompts)
    classifier = digit_classifier(settings.height) if labels_known else None
    prompt_per_image = [p for p in prompts for _ in seeds]
    rows = [
        DemoRow(
            method="uncached", transformer_calls=plain_calls, computed_calls=plain_calls, seconds=plain_s,
            speedup=1.0,
            class_accuracy=classifier.prompt_accuracy(plain_images, prompt_per_image) if classifier else None,
        ),
        DemoRow(
            method=f"magsdk ({threshold}/{max_skip}/{retention})",
            transformer_calls=handle.stats.total_calls, computed_calls=handle.stats.computed_calls,
            seconds=cached_s, speedup=plain_s / cached_s,
            psnr_db=float(psnr(cached_images, plain_images).mean()),
            ssim=float(ssim(cached_images, plain_images).mean()),
            class_accuracy=classifier.prompt_accuracy(cached_images, prompt_per_image) if classifier else None,
        ),
    ]

    log("[4/4] write the image grid")
    pairs = torch.stack([plain_images, cached_images], dim=1).flatten(0, 1)  # uncached, cached, uncached, ...
    grid_path = options.out_dir / "demo-grid.png"
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    columns = 2 * len(seeds) * (2 if len(prompts) * len(seeds) >= 8 else 1)
    reference.image_grid(pairs, columns=columns, scale=3).save(grid_path)
    result = DemoResult(
        model=str(folder), transformer=scaffold.transformer_cls_name, strategy_module=scaffold.module_path,
        steps=steps, prompts=prompts, seeds=options.seeds, threshold=threshold, max_skip_steps=max_skip,
        retention_ratio=retention, rows=rows, grid=grid_path, scaffold_seconds=scaffold_seconds,
    )
    atomic_write_text(options.out_dir / "demo-result.json", result.model_dump_json(indent=2) + "\n")
    return result
