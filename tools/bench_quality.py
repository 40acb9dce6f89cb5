"""Quality against speed of every caching method on the bundled reference FluxPipeline.

    python tools/bench_quality.py                            # quality sweep: rewrites its section of docs/benchmarks.md
    python tools/bench_quality.py --transfer                 # schedule transfer: its own section
    python tools/bench_quality.py --budget                   # compute budgets: planner vs threshold rule
    python tools/bench_quality.py --quick --out /tmp/b.md    # CI-sized run (a few points per method)

Every method generates the same prompts and seeds, in one process, as one batched pipeline call
per point. For each point: transformer calls computed (a call counts as computed when the last
block's attention ran), wall-clock speedup against the uncached run (median of ``--repeats``
paired rounds, the uncached run measured just before the cached one in each), PSNR and SSIM
against the uncached images, and the share of images that the digit classifier reads as the
prompted digit.

Methods: magsdk (calibrated with ``magsdk.calibrate`` on the default prompts, with a seed kept
out of the evaluation), diffusers' MagCache (calibrated with its own ``calibrate=True`` mode; the
printed "cond" list is what a user would copy), diffusers' FirstBlockCache and TaylorSeer (via
``pipe.transformer.enable_cache``), and cache-dit's DBCache when ``cache_dit`` is installed.
Each cache is attached fresh for every run, so that no state carries over between generations.

Schedule transfer (``--transfer``): magsdk calibrated once at 28 steps and run at 10, 14, 20 and
50 steps and on a shift-3 scheduler, with the runtime's default mapping (through the recorded
timesteps) and with nearest-index resampling, against a calibration made on each target schedule.
Where mapped and native compute different calls, each curve is rerun at the other's call count, so the
two curves are also compared at equal cost.
A second table compares the same calibration with native ones on 17 schedules by ``magsdk.plan``
(computed steps only, no images), and checks the plans against the measured runs where both exist;
a third repeats the PSNR table's points by plan with four calibration seeds.

Every sentence of findings in the sections is computed from the points of the run that wrote
them; nothing in those sections is written by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import re
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from docsection import write_section  # noqa: E402

import magsdk  # noqa: E402
from magsdk.config import atomic_write_text  # noqa: E402
from magsdk.reference import DEFAULT_PROMPTS, generate, load_reference_pipeline, reference_settings  # noqa: E402
from magsdk.reference.classifier import digit_classifier  # noqa: E402
from magsdk.reference.metrics import psnr, ssim  # noqa: E402

Attach = Callable[[], Callable[[], None]]  # attaches a cache, returns the function that removes it
SECTION_QUALITY = "## Quality vs speed on the reference model"
SECTION_TRANSFER = "## Calibrate once, run on any schedule: transfer on the reference model"
SECTION_BUDGET = "## Compute budgets: the planner against the threshold rule"
CALIBRATION_SEED = 1000  # not among the evaluation seeds


@dataclass
class Point:
    method: str
    knob: str
    value: float
    steps: int
    computed_calls: int
    total_calls: int
    seconds: float
    speedup: float
    psnr_db: float
    ssim: float
    accuracy: float

    @property
    def call_speedup(self) -> float:
        return self.total_calls / max(1, self.computed_calls)

    @property
    def credible_speedup(self) -> float:
        """The wall speedup, capped at the call ratio: more than that is timing noise, not speed."""
        return min(self.speedup, self.call_speedup)


@dataclass
class Bench:
    pipe: Any
    prompts: list[str]
    seeds: list[int]
    repeats: int
    baselines: dict[tuple[int, str], tuple[torch.Tensor, float]] = field(default_factory=dict)
    #: Which scheduler the pipeline runs with now (baselines are kept per step count and scheduler).
    schedule: str = "default"
    calls: list[int] = field(default_factory=lambda: [0])
    warmed: set[str] = field(default_factory=set)
    #: magsdk calibrations by (steps, shift, seed): deterministic, so the transfer tables share them.
    calibrations: dict[tuple[int, float | None, int, int], magsdk.CalibrationResult] = field(default_factory=dict)
    #: The transformer calls each of them made (counted; probes add ``probes`` calls per step but the last).
    calibration_calls: dict[tuple[int, float | None, int, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Count transformer calls in which the last block's attention actually ran.
        probe = self.pipe.transformer.single_transformer_blocks[-1].attn.to_q
        probe.register_forward_hook(lambda *_: self.calls.__setitem__(0, self.calls[0] + 1))

    @property
    def labels(self) -> list[str]:
        return [p for p in self.prompts for _ in self.seeds]

    def timed(self, steps: int, attach: Attach | None = None) -> tuple[torch.Tensor, float, int]:
        """One generation of every prompt and seed: images, wall-clock seconds, computed calls."""
        detach = attach() if attach is not None else None
        try:
            self.calls[0] = 0
            start = time.perf_counter()
            images = generate(self.pipe, self.prompts, self.seeds, num_inference_steps=steps)
            return images, time.perf_counter() - start, self.calls[0]
        finally:
            if detach is not None:
                detach()

    def baseline(self, steps: int) -> tuple[torch.Tensor, float]:
        key = (steps, self.schedule)
        if key not in self.baselines:
            images, seconds, _ = self.timed(steps)
            self.baselines[key] = (images, seconds)
        return self.baselines[key]

    def point(self, method: str, knob: str, value: float, steps: int, attach: Attach, repeats: int | None = None
              ) -> Point:
        """Paired rounds (uncached, then cached) so that load drift on a shared machine cancels in each ratio."""
        reference, _ = self.baseline(steps)
        if method not in self.warmed:
            # The first attach of a method pays one-off costs (imports, torch.compiler.disable setup).
            self.warmed.add(method)
            detach = attach()
            try:
                generate(self.pipe, self.prompts[:1], self.seeds[:1], num_inference_steps=steps)
            finally:
                detach()
        ratios, times = [], []
        images, computed = reference, 0
        key = (steps, self.schedule)
        for _ in range(repeats or self.repeats):
            _, base_seconds, _ = self.timed(steps)
            images, seconds, computed = self.timed(steps, attach)
            self.baselines[key] = (reference, min(self.baselines[key][1], base_seconds))
            ratios.append(base_seconds / seconds)
            times.append(seconds)
        p = Point(
            method=method, knob=knob, value=value, steps=steps, computed_calls=computed,
            total_calls=2 * steps, seconds=min(times), speedup=statistics.median(ratios),
            psnr_db=float(psnr(images, reference).mean()), ssim=float(ssim(images, reference).mean()),
            accuracy=digit_classifier(images.shape[-1]).prompt_accuracy(images, self.labels),
        )
        print(f"  {method:<22} {knob}={value:<8g} calls {computed:>3}/{2 * steps:<3} speedup {p.speedup:5.2f}x "
              f"PSNR {p.psnr_db:6.2f} SSIM {p.ssim:.4f} acc {p.accuracy:.3f}", flush=True)
        return p


# -- methods ---------------------------------------------------------------------------------------
def magsdk_calibration(pipe: Any, steps: int, prompts: list[str], seed: int = CALIBRATION_SEED, probes: int = 0
                       ) -> magsdk.CalibrationResult:
    with magsdk.calibrate(pipe, probes=probes) as cal:
        generate(pipe, prompts, [seed], num_inference_steps=steps)
    assert cal.result is not None
    return cal.result


def calibration_on(bench: Bench, steps: int, shift: float | None, seed: int = CALIBRATION_SEED, probes: int = 0
                   ) -> magsdk.CalibrationResult:
    """``magsdk_calibration`` on the pipeline's scheduler (``shift``: a FlowMatch one with that shift), made once."""
    key = (steps, shift, seed, probes)
    if key not in bench.calibrations:
        with scheduler_shift(bench, shift):
            bench.calls[0] = 0
            bench.calibrations[key] = magsdk_calibration(bench.pipe, steps, bench.prompts, seed, probes)
            bench.calibration_calls[key] = bench.calls[0]
    return bench.calibrations[key]


def attach_magsdk(
    pipe: Any, ratios: Any, threshold: float, k: int, retention: float, per_branch: bool = False,
    resample: str = "auto", reuse: str = "auto",
) -> Attach:
    def attach() -> Callable[[], None]:
        handle = magsdk.enable(pipe, magsdk.MagCacheConfig(mag_ratios=ratios, threshold=threshold,
                                                          max_skip_steps=k, retention_ratio=retention,
                                                          per_branch_curves=per_branch, resample=resample,
                                                          reuse=reuse))
        return handle.disable

    return attach


def attach_budget(pipe: Any, ratios: Any, budget: int, reuse: str = "auto") -> Attach:
    """magsdk's budget planner: exactly ``budget`` computed steps per branch (K and retention its own choice)."""
    def attach() -> Callable[[], None]:
        handle = magsdk.enable(pipe, magsdk.MagCacheConfig(mag_ratios=ratios, compute_steps=budget, reuse=reuse))
        return handle.disable

    return attach


def diffusers_calibration(pipe: Any, steps: int, prompts: list[str]) -> list[float]:
    """Run diffusers' calibrate mode and parse the list it prints (the first one: the "cond" context)."""
    from diffusers import MagCacheConfig as DiffusersMagCacheConfig

    pipe.transformer.enable_cache(DiffusersMagCacheConfig(calibrate=True, num_inference_steps=steps))
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            generate(pipe, prompts, [CALIBRATION_SEED], num_inference_steps=steps)
    finally:
        pipe.transformer.disable_cache()
    lists = re.findall(r"\[([0-9eE+\-.,\s]+)\]", buffer.getvalue())
    if not lists:
        raise RuntimeError(f"diffusers' MagCache calibration printed no ratio list:\n{buffer.getvalue()[:500]}")
    return [float(v) for v in lists[0].split(",")]


def attach_diffusers(pipe: Any, make_config: Callable[[], Any]) -> Attach:
    def attach() -> Callable[[], None]:
        pipe.transformer.enable_cache(make_config())
        return pipe.transformer.disable_cache

    return attach


def cache_dit_status() -> str | None:
    """None when cache-dit can run on FluxPipeline here, else the reason it cannot."""
    try:
        import cache_dit
    except ImportError:
        return "cache-dit is not installed (`pip install cache-dit`)"
    supported = cache_dit.supported_pipelines()[1]
    if not any(name.startswith("Flux") for name in supported):
        return f"cache-dit {cache_dit.__version__} has no FluxPipeline adapter"
    return None


def attach_cache_dit(pipe: Any, threshold: float, steps: int, warmup: int) -> Attach:
    import cache_dit

    def attach() -> Callable[[], None]:
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
            max_warmup_steps=warmup, enable_separate_cfg=True, num_inference_steps=steps,
        ))
        return lambda: cache_dit.disable_cache(pipe)

    return attach


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """cache-dit and diffusers log every attach; keep the benchmark's own lines readable."""
    names = ("cache_dit", "diffusers")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


# -- the quality sweep ---------------------------------------------------------------------------------
@dataclass
class Sweep:
    magsdk_thresholds: list[float]
    #: (max_skip_steps K, retention_ratio) pairs; each is swept over the thresholds, for magsdk and diffusers alike
    mag_series: list[tuple[int, float]]
    fbc_thresholds: list[float]
    taylor_intervals: list[int]
    dbcache_thresholds: list[float]
    #: Also run magsdk with one curve per CFG branch (``per_branch_curves=True``), to show why the default shares one.
    per_branch_rows: bool = True
    #: Budgets (computed steps per branch) for magsdk's planner with forecast reuse (its "auto" in budget mode).
    planner_budgets: list[int] = field(default_factory=list)
    #: Thresholds for magsdk with forecast reuse at (K=3, r=0.2): the best reuse mode on the threshold rule.
    forecast_thresholds: list[float] = field(default_factory=list)


FULL = Sweep(
    magsdk_thresholds=[0.02, 0.04, 0.06, 0.1, 0.15, 0.24, 0.4, 0.7, 1.0],
    # diffusers' defaults; a long retention (fills the range below 1.5x); an aggressive setting
    mag_series=[(3, 0.2), (3, 0.5), (6, 0.1)],
    fbc_thresholds=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8],
    taylor_intervals=[2, 3, 4, 6, 8, 12],
    dbcache_thresholds=[0.05, 0.1, 0.2, 0.3, 0.5, 0.8],
    # every even budget from 26 down to 8 and 27 (one skip per branch), the step counts where peers sit (TaylorSeer
    # 15 and 7, FirstBlockCache 5, 3 and 2) and 4
    planner_budgets=[27, 26, 24, 22, 20, 18, 16, 15, 14, 12, 10, 8, 7, 5, 4, 3, 2],
    forecast_thresholds=[0.02, 0.06, 0.15, 0.4, 1.0],
)
QUICK = Sweep(
    magsdk_thresholds=[0.06, 0.24], mag_series=[(3, 0.2)], fbc_thresholds=[0.1], taylor_intervals=[3],
    dbcache_thresholds=[0.1], per_branch_rows=False, planner_budgets=[6],
)


def sweep(bench: Bench, plan: Sweep, steps: int) -> tuple[list[Point], str | None]:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig
    from diffusers import MagCacheConfig as DiffusersMagCacheConfig

    pipe = bench.pipe
    points: list[Point] = []
    print(f"uncached: {bench.baseline(steps)[1]:.2f} s for {len(bench.labels)} images at {steps} steps", flush=True)

    calibration = magsdk_calibration(pipe, steps, bench.prompts)
    d_ratios = diffusers_calibration(pipe, steps, bench.prompts)
    for k, retention in plan.mag_series:
        series = f"(K={k}, r={retention:g})"
        for th in plan.magsdk_thresholds:
            # the default: every CFG branch follows the mean of the branch curves
            points.append(bench.point(f"magsdk {series}", "threshold", th, steps,
                                      attach_magsdk(pipe, calibration, th, k, retention)))
        if plan.per_branch_rows:
            for th in plan.magsdk_thresholds:
                points.append(bench.point(f"magsdk per-branch curves {series}", "threshold", th, steps,
                                          attach_magsdk(pipe, calibration, th, k, retention, per_branch=True)))
        for th in plan.magsdk_thresholds:
            points.append(bench.point(f"diffusers MagCache {series}", "threshold", th, steps, attach_diffusers(
                pipe, lambda th=th, k=k, r=retention: DiffusersMagCacheConfig(
                    mag_ratios=d_ratios, threshold=th, max_skip_steps=k, retention_ratio=r, num_inference_steps=steps,
                ))))
    for budget in plan.planner_budgets:
        points.append(bench.point("magsdk planner (forecast)", "compute_steps", budget, steps,
                                  attach_budget(pipe, calibration, budget)))
    for th in plan.forecast_thresholds:
        points.append(bench.point("magsdk forecast (K=3, r=0.2)", "threshold", th, steps,
                                  attach_magsdk(pipe, calibration, th, 3, 0.2, reuse="forecast")))
    for th in plan.fbc_thresholds:
        points.append(bench.point("diffusers FirstBlockCache", "threshold", th, steps,
                                  attach_diffusers(pipe, lambda th=th: FirstBlockCacheConfig(threshold=th))))
    for n in plan.taylor_intervals:
        points.append(bench.point("diffusers TaylorSeer", "cache_interval", n, steps, attach_diffusers(
            pipe, lambda n=n: TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=3, max_order=1,
                                                    taylor_factors_dtype=torch.float32))))
    dit_reason = cache_dit_status()
    if dit_reason is None:
        try:
            for th in plan.dbcache_thresholds:
                points.append(bench.point("cache-dit DBCache F1B0", "residual_diff_threshold", th, steps,
                                          attach_cache_dit(pipe, th, steps, warmup=max(1, int(0.2 * steps + 0.5)))))
        except Exception as exc:  # report, do not hide: the doc says why the row is missing
            dit_reason = f"cache-dit failed on this pipeline: {type(exc).__name__}: {exc}"
            print(f"  {dit_reason}", flush=True)
    return points, dit_reason


# -- schedule transfer --------------------------------------------------------------------------------
TRANSFER_TARGETS: list[tuple[str, int, float | None]] = [
    ("10 steps", 10, None), ("14 steps", 14, None), ("20 steps", 20, None), ("50 steps", 50, None),
    ("28 steps, shift 3", 28, 3.0),
]
TRANSFER_SETTINGS: list[tuple[float, int, float]] = [(0.06, 3, 0.2), (0.12, 4, 0.2), (0.24, 5, 0.1)]
#: Between-step probes of the *probed* calibration (``magsdk.calibrate(pipe, probes=16)``).
TRANSFER_PROBES = 16
QUICK_TRANSFER_TARGETS = TRANSFER_TARGETS[1:2] + TRANSFER_TARGETS[-1:]
QUICK_TRANSFER_SETTINGS = TRANSFER_SETTINGS[:1]


@contextlib.contextmanager
def scheduler_shift(bench: Bench, shift: float | None) -> Iterator[None]:
    """Run the pipeline on a FlowMatchEulerDiscreteScheduler with another shift, then put the original back."""
    if shift is None:
        yield
        return
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = bench.pipe
    original, label = pipe.scheduler, bench.schedule
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(original.config, shift=shift)
    bench.schedule = f"shift {shift:g}"
    try:
        yield
    finally:
        pipe.scheduler, bench.schedule = original, label


def sweep_transfer(bench: Bench, steps: int, quick: bool
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """One calibration at ``steps``; every target schedule run with it (mapped, and by index) and natively;
    then the schedule-level grid with the same calibration, then the PSNR table's points by plan with other
    calibration seeds."""
    pipe = bench.pipe
    calibration = calibration_on(bench, steps, None)
    probed = calibration_on(bench, steps, None, probes=TRANSFER_PROBES)
    rows: list[dict[str, Any]] = []
    for label, target, shift in QUICK_TRANSFER_TARGETS if quick else TRANSFER_TARGETS:
        native = calibration_on(bench, target, shift)
        with scheduler_shift(bench, shift):
            print(f"transfer target {label}: uncached {bench.baseline(target)[1]:.2f} s", flush=True)
            for th, k, retention in QUICK_TRANSFER_SETTINGS if quick else TRANSFER_SETTINGS:
                row: dict[str, Any] = {"target": label, "steps": target, "setting": f"{th:g}/{k}/{retention:g}"}
                for name, ratios, resample in (("mapped", calibration, "auto"), ("probed", probed, "auto"),
                                               ("index", calibration, "index"), ("native", native, "auto")):
                    row[name] = bench.point(f"magsdk {name} ({label})", "threshold", th, target,
                                            attach_magsdk(pipe, ratios, th, k, retention, resample=resample), repeats=1)
                row["meets_goal"] = transfer_goal(row["mapped"], row["native"])
                row["probed_meets_goal"] = transfer_goal(row["probed"], row["native"])
                row["equal_calls"] = equal_calls_runs(bench, row, calibration, native, (th, k, retention))
                rows.append(row)
    return (rows, sweep_transfer_grid(bench, calibration, probed, quick),
            sweep_transfer_seeds(bench, steps, quick))


def equal_calls_runs(bench: Bench, row: dict[str, Any], calibration: magsdk.CalibrationResult,
                     native: magsdk.CalibrationResult, setting: tuple[float, int, float]) -> list[dict[str, Any]]:
    """Where mapped and native compute different calls, each curve run at the other's call count (at the threshold
    nearest the setting's that gives it): a PSNR gap at equal cost is the curve's, one at unequal cost may be no more
    than where a threshold boundary falls."""
    if row["mapped"].computed_calls == row["native"].computed_calls:
        return []
    assert native.schedule is not None, "the reference pipeline has a scheduler: its schedule is recorded"
    th, k, retention = setting
    runs: list[dict[str, Any]] = []
    for curve, ratios, other in (("native", native, "mapped"), ("mapped", calibration, "native")):
        calls = row[other].computed_calls
        found = threshold_for_calls(ratios, (th, k, retention), row["steps"], calls, native.schedule.timesteps)
        entry: dict[str, Any] = {"curve": curve, "calls": calls, "threshold": found, "point": None}
        if found is not None:
            entry["point"] = bench.point(f"magsdk {curve} at {calls} calls ({row['target']})", "threshold", found,
                                         row["steps"], attach_magsdk(bench.pipe, ratios, found, k, retention),
                                         repeats=1)
        runs.append(entry)
    return runs


def threshold_for_calls(calibration: magsdk.CalibrationResult, setting: tuple[float, int, float], steps: int,
                        calls: int, timesteps: list[float]) -> float | None:
    """The threshold nearest the setting's (relative steps of 0.25 %, up to ±50 %) at which the plan computes
    ``calls`` calls over all branches; None where no threshold in that range does (K and retention kept)."""
    th, k, retention = setting
    for i in range(201):
        for candidate in dict.fromkeys((round(th * (1 + 0.0025 * i), 5), round(th * (1 - 0.0025 * i), 5))):
            config = magsdk.MagCacheConfig(threshold=candidate, max_skip_steps=k, retention_ratio=retention)
            planned = sum(len(magsdk.plan(calibration, config, steps, b, timesteps=timesteps).computed_steps)
                          for b in calibration.branches)
            if planned == calls:
                return candidate
    return None


# The schedule-level grid: every target schedule calibrated natively, compared by plan (no images are made
# for it, so it covers many more schedules than the PSNR table). ``magsdk.plan`` is what the runtime computes
# (tests/test_schedule_transfer.py asserts plan == runtime per branch), so computed steps are exact here.
GRID_TARGETS: list[tuple[int, float | None]] = [
    (8, None), (10, None), (12, None), (14, None), (16, None), (20, None), (24, None), (32, None), (40, None),
    (50, None), (14, 2.0), (28, 2.0), (20, 3.0), (28, 3.0), (40, 3.0), (50, 3.0), (28, 5.0),
]
GRID_SETTINGS = [*TRANSFER_SETTINGS, (0.03, 2, 0.2), (0.18, 4, 0.1), (0.4, 6, 0.1)]
QUICK_GRID_TARGETS = [(14, None), (28, 3.0)]
QUICK_GRID_SETTINGS = GRID_SETTINGS[:2]


def grid_label(steps: int, shift: float | None) -> str:
    return f"{steps} steps" + ("" if shift is None else f", shift {shift:g}")


def sweep_transfer_grid(bench: Bench, calibration: magsdk.CalibrationResult, probed: magsdk.CalibrationResult,
                        quick: bool) -> list[dict[str, Any]]:
    """Per target schedule and setting: computed steps per branch, mapped (without and with probes) and by index,
    minus a native calibration's."""
    rows: list[dict[str, Any]] = []
    for target, shift in QUICK_GRID_TARGETS if quick else GRID_TARGETS:
        if shift is None and target == calibration.num_steps:
            continue  # the calibrated schedule itself: the mapping is the identity there
        native = calibration_on(bench, target, shift)
        assert native.schedule is not None, "the reference pipeline has a scheduler: its schedule is recorded"
        timesteps = native.schedule.timesteps
        row: dict[str, Any] = {"target": grid_label(target, shift), "steps": target, "settings": []}
        for th, k, retention in QUICK_GRID_SETTINGS if quick else GRID_SETTINGS:
            config = magsdk.MagCacheConfig(threshold=th, max_skip_steps=k, retention_ratio=retention)
            by_index = config.model_copy(update={"resample": "index"})
            cell: dict[str, Any] = {"setting": f"{th:g}/{k}/{retention:g}", "mapped": [], "probed": [], "index": [],
                                    "native": []}
            for branch in native.branches:
                native_steps = len(magsdk.plan(native, config, target, branch, timesteps=timesteps).computed_steps)
                mapped = magsdk.plan(calibration, config, target, branch, timesteps=timesteps)
                index = magsdk.plan(calibration, by_index, target, branch, timesteps=timesteps)
                cell["native"].append(native_steps)
                cell["mapped"].append(len(mapped.computed_steps) - native_steps)
                with_probes = magsdk.plan(probed, config, target, branch, timesteps=timesteps)
                cell["probed"].append(len(with_probes.computed_steps) - native_steps)
                cell["index"].append(len(index.computed_steps) - native_steps)
            row["settings"].append(cell)
        print(f"transfer grid {row['target']}: mapped − native "
              f"{[max(c['mapped'], key=abs) for c in row['settings']]}", flush=True)
        rows.append(row)
    return rows


TRANSFER_SEEDS = [CALIBRATION_SEED, 1001, 1002, 1003]  # calibration seeds: none is an evaluation seed


def sweep_transfer_seeds(bench: Bench, steps: int, quick: bool) -> list[dict[str, Any]]:
    """The PSNR table's points by plan, calibrating source and native with each of ``TRANSFER_SEEDS``: how much of a
    difference between mapped and native is one calibration's luck at a threshold decision."""
    seeds = TRANSFER_SEEDS[:2] if quick else TRANSFER_SEEDS
    sources = {seed: calibration_on(bench, steps, None, seed) for seed in seeds}
    probed = {seed: calibration_on(bench, steps, None, seed, TRANSFER_PROBES) for seed in seeds}
    rows: list[dict[str, Any]] = []
    for label, target, shift in QUICK_TRANSFER_TARGETS if quick else TRANSFER_TARGETS:
        natives = {seed: calibration_on(bench, target, shift, seed) for seed in seeds}
        for th, k, retention in QUICK_TRANSFER_SETTINGS if quick else TRANSFER_SETTINGS:
            config = magsdk.MagCacheConfig(threshold=th, max_skip_steps=k, retention_ratio=retention)
            row: dict[str, Any] = {"target": label, "setting": f"{th:g}/{k}/{retention:g}", "seeds": seeds,
                                   "native": [], "mapped": [], "probed": []}
            for seed in seeds:
                native = natives[seed]
                assert native.schedule is not None
                timesteps = native.schedule.timesteps
                # per branch the largest count (the branches follow one shared curve by default)
                row["native"].append(max(len(magsdk.plan(native, config, target, b, timesteps=timesteps)
                                             .computed_steps) for b in native.branches))
                row["mapped"].append(max(len(magsdk.plan(sources[seed], config, target, b, timesteps=timesteps)
                                             .computed_steps) for b in native.branches))
                row["probed"].append(max(len(magsdk.plan(probed[seed], config, target, b, timesteps=timesteps)
                                             .computed_steps) for b in native.branches))
            rows.append(row)
    return rows


def worst(diffs: list[int]) -> int:
    """The branch farthest from the native calibration (signed)."""
    return max(diffs, key=abs)


def transfer_goal(mapped: Point, native: Point) -> bool:
    """Within one step per branch of the native calibration and within 0.5 dB of it (or better at no more calls)."""
    branches = max(1, mapped.total_calls // mapped.steps)
    close_calls = abs(mapped.computed_calls - native.computed_calls) <= branches
    close_quality = mapped.psnr_db >= native.psnr_db - 0.5
    better = mapped.psnr_db >= native.psnr_db and mapped.computed_calls <= native.computed_calls
    return (close_calls and close_quality) or better


# -- budgets -----------------------------------------------------------------------------------------
BUDGETS = [18, 14, 10, 8]
QUICK_BUDGETS = [6]
THRESHOLD_GRID = [round(0.005 * 1.2 ** i, 5) for i in range(40)]  # 0.005 .. ~6.6, geometric
K_GRID, R_GRID = (2, 3, 4, 5, 6), (0.1, 0.2)


def threshold_schedules(calibration: magsdk.CalibrationResult, steps: int) -> list[tuple[float, int, float, int]]:
    """Every distinct schedule the threshold rule makes on this curve: (threshold, K, retention, computed steps)."""
    seen: dict[str, tuple[float, int, float, int]] = {}
    for k in K_GRID:
        for r in R_GRID:
            for th in THRESHOLD_GRID:
                config = magsdk.MagCacheConfig(mag_ratios=calibration, threshold=th, max_skip_steps=k,
                                               retention_ratio=r)
                p = magsdk.plan(None, config, steps)
                seen.setdefault(p.schedule_string(), (th, k, r, len(p.computed_steps)))
    return list(seen.values())


@contextlib.contextmanager
def forecast_reach(reach: float) -> Iterator[None]:
    """Run with another forecast reach than the runtime's (a research row of the budget table, not a setting)."""
    from magsdk.runtime import session

    kept = session.FORECAST_REACH
    session.FORECAST_REACH = reach
    try:
        yield
    finally:
        session.FORECAST_REACH = kept


def sweep_budget(bench: Bench, steps: int, quick: bool) -> list[dict[str, Any]]:
    """Per budget B: the planner with each reuse mode, against the best threshold setting computing <= B steps."""
    pipe = bench.pipe
    calibration = magsdk_calibration(pipe, steps, bench.prompts)
    schedules = threshold_schedules(calibration, steps)
    print(f"{len(schedules)} distinct threshold schedules; uncached {bench.baseline(steps)[1]:.2f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for budget in QUICK_BUDGETS if quick else BUDGETS:
        row: dict[str, Any] = {"budget": budget}
        for reuse in ("residual", "scaled", "forecast"):
            row[f"planner {reuse}"] = bench.point(f"magsdk planner ({reuse})", "compute_steps", budget, steps,
                                                  attach_budget(pipe, calibration, budget, reuse))
        with forecast_reach(math.inf):  # why the runtime limits its reach: the same run extrapolating all the way
            row["planner forecast full"] = bench.point("magsdk planner (forecast, full reach)", "compute_steps",
                                                       budget, steps, attach_budget(pipe, calibration, budget))
        fitting = sorted((c for c in schedules if c[3] <= budget), key=lambda c: -c[3])
        near = fitting[:1] if quick else ([c for c in fitting if c[3] >= budget - 2] or fitting[:1])
        for reuse in ("residual", "forecast"):
            searched = [(c, bench.point(f"threshold search ({reuse})", "threshold", c[0], steps,
                                        attach_magsdk(pipe, calibration, c[0], c[1], c[2], reuse=reuse), repeats=1))
                        for c in near]
            (th, k, r, _), _ = max(searched, key=lambda item: item[1].psnr_db)
            row[f"threshold {reuse}"] = bench.point(f"magsdk threshold {th:g}/{k}/{r:g} ({reuse})", "threshold", th,
                                                    steps, attach_magsdk(pipe, calibration, th, k, r, reuse=reuse))
            row[f"threshold {reuse} setting"] = f"{th:g}/{k}/{r:g}"
            row[f"threshold {reuse} searched"] = len(near)
        rows.append(row)
    return rows


def render_budget(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [SECTION_BUDGET, ""]
    lines.append(f"Command: `{meta['command']}` ({meta['seconds']:.0f} s on {meta['machine']}, {meta['date']}).")
    lines.append("")
    lines.append(
        f"Reference model, {meta['steps']} steps, true CFG, {meta['images']} images. *planner*: "
        "`MagCacheConfig(compute_steps=B)` — exactly B computed steps per branch, chosen by magsdk's planner "
        "(dynamic programming over the calibrated curve; K and retention its own choice), with each reuse mode. "
        "*best threshold*: MagCache's threshold rule, the best PSNR among the distinct schedules that compute at "
        f"most B steps and at least B − 2 (thresholds {THRESHOLD_GRID[0]:g}–{THRESHOLD_GRID[-1]:g}, K "
        f"{K_GRID[0]}–{K_GRID[-1]}, retention {' / '.join(f'{r:g}' for r in R_GRID)}), with plain and forecast "
        "reuse. Wall speedup: median of paired rounds; one above the call ratio is marked *(noise)*."
    )
    lines.append("")
    lines.append("| budget | method | calls | wall speedup | PSNR dB | SSIM |")
    lines.append("|---:|---|---:|---:|---:|---:|")
    verdicts = []
    for row in rows:
        for key, label in (("planner residual", "planner, plain reuse"), ("planner scaled", "planner, scaled reuse"),
                           ("planner forecast", "planner, forecast reuse (default in budget mode)"),
                           ("planner forecast full", "planner, forecast extrapolating the whole run (research)"),
                           ("threshold residual", f"best threshold {row['threshold residual setting']}, plain reuse"),
                           ("threshold forecast", f"best threshold {row['threshold forecast setting']}, forecast")):
            if key not in row:  # rows from a run before the reach row existed
                continue
            p = row[key]
            lines.append(f"| {row['budget']} | {label} | {p.computed_calls}/{p.total_calls} | "
                         f"{p.speedup:.2f}x{noise_flag(p)} | {p.psnr_db:.2f} | {p.ssim:.4f} |")
        exact = all(row[f"planner {m}"].computed_calls == 2 * row["budget"] for m in ("residual", "scaled", "forecast"))
        plain = row["planner residual"].psnr_db - row["threshold residual"].psnr_db
        best = row["planner forecast"].psnr_db - row["threshold residual"].psnr_db
        verdicts.append(f"B={row['budget']}: {'exact' if exact else '**not exact**'}; planner vs best threshold "
                        f"(both plain) {plain:+.2f} dB, planner+forecast vs best threshold {best:+.2f} dB")
    lines.append("")
    met = sum(1 for row in rows if row["planner forecast"].psnr_db >= row["threshold residual"].psnr_db)
    met_plain = sum(1 for row in rows if row["planner residual"].psnr_db >= row["threshold residual"].psnr_db)
    reach = "; ".join(
        f"B={row['budget']} {row['planner forecast'].psnr_db - row['planner forecast full'].psnr_db:+.2f} dB"
        for row in rows if "planner forecast full" in row)
    lines.append(f"**Findings (computed from the table above).** The planner computed exactly its budget at "
                 f"{sum('exact;' in v for v in verdicts)} of {len(rows)} budgets. With its default (forecast) reuse "
                 f"its PSNR is at or above the best threshold setting's at {met} of {len(rows)} budgets; with plain "
                 f"reuse on both sides at {met_plain} of {len(rows)}. " + "; ".join(verdicts) + "."
                 + (" The forecast's reach (it extrapolates at most half the interval its slope spans, then holds) "
                    f"against extrapolating the whole run: {reach}." if reach else ""))
    lines.append("")
    return "\n".join(lines) + "\n"


# -- report ------------------------------------------------------------------------------------------
def is_ours(p: Point) -> bool:
    return p.method.startswith("magsdk") and "per-branch" not in p.method


def pareto_rows(points: list[Point]) -> tuple[list[str], list[str]]:
    """For each peer point faster than uncached: the best magsdk point at least as fast (wall-clock, each capped
    at its call ratio so that no point wins by timing noise).

    Returns the table rows and the peer points magsdk's default does not beat.
    """
    families = {
        "magsdk (default: shared curve)": [p for p in points if is_ours(p)],
        "magsdk, per-branch curves": [p for p in points if p.method.startswith("magsdk") and "per-branch" in p.method],
    }
    families = {k: v for k, v in families.items() if v}
    rows = ["| peer point | PSNR @ wall speedup | " + " | ".join(families) + " |",
            "|---|---|" + "---|" * len(families)]
    not_beaten: list[str] = []
    for p in points:
        if p.method.startswith("magsdk") or p.credible_speedup <= 1.0 or p.computed_calls == p.total_calls:
            continue  # slower than uncached, or skipped nothing (its "speedup" is timing noise)
        cells = []
        for family, ours in families.items():
            faster = [q for q in ours if q.credible_speedup >= p.credible_speedup]
            if not faster:
                top = max(ours, key=lambda q: q.credible_speedup)
                cells.append(f"beyond magsdk's fastest ({top.credible_speedup:.2f}x)")
                if family.startswith("magsdk (default"):
                    not_beaten.append(
                        f"{p.method} {p.knob}={p.value:g} ({p.credible_speedup:.2f}x, beyond magsdk's fastest)")
                continue
            best = max(faster, key=lambda q: q.psnr_db)
            beaten = best.psnr_db >= p.psnr_db
            verdict = "beaten" if beaten else "**not beaten**"
            cells.append(f"{verdict}: {best.psnr_db:.2f} dB @ {best.credible_speedup:.2f}x "
                         f"({best.knob}={best.value:g})")
            if not beaten and family.startswith("magsdk (default"):
                not_beaten.append(f"{p.method} {p.knob}={p.value:g} ({p.psnr_db:.2f} dB @ {p.credible_speedup:.2f}x; "
                                  f"magsdk {best.psnr_db:.2f} dB @ {best.credible_speedup:.2f}x)")
        rows.append(f"| {p.method} {p.knob}={p.value:g} | {p.psnr_db:.2f} dB @ {p.credible_speedup:.2f}x | "
                    + " | ".join(cells) + " |")
    return rows, not_beaten


def not_beaten_by_calls(points: list[Point]) -> list[str]:
    """Peer points (faster than uncached) that no magsdk default point matches in PSNR at no more calls."""
    ours = [p for p in points if is_ours(p)]
    missed = []
    for p in points:
        if p.method.startswith("magsdk") or p.credible_speedup <= 1.0 or p.computed_calls == p.total_calls:
            continue
        fewer = [q for q in ours if q.computed_calls <= p.computed_calls]
        best = max(fewer, key=lambda q: q.psnr_db) if fewer else None
        if best is None or best.psnr_db < p.psnr_db:
            magsdk = f"magsdk {best.psnr_db:.2f} dB at {best.computed_calls}" if best else "no magsdk point that few"
            missed.append(f"{p.method} {p.knob}={p.value:g} ({p.psnr_db:.2f} dB at {p.computed_calls} calls; {magsdk})")
    return missed


def noise_flag(p: Point) -> str:
    """A wall-clock speedup above the call ratio cannot be true: say so instead of printing it as fact."""
    return " (noise)" if p.speedup > p.call_speedup * 1.001 else ""


def render_quality(points: list[Point], dit_reason: str | None, meta: dict[str, Any], plot: str | None) -> str:
    lines = [SECTION_QUALITY, ""]
    lines.append(f"Command: `{meta['command']}` ({meta['seconds']:.0f} s on {meta['machine']}, {meta['date']}).")
    lines.append("")
    lines.append(
        f"{meta['images']} images ({meta['prompts']} prompts x {meta['seeds']} seeds), {meta['steps']} steps, true CFG "
        f"{meta['cfg']} (2 transformer calls per step), {meta['size']}x{meta['size']}; uncached run "
        f"{meta['base_seconds']:.2f} s. Wall speedup: median over {meta['repeats']} paired rounds (uncached run, then "
        "cached run) of the time ratio, same process; one above the call ratio is marked *(noise)*. Calls: "
        "transformer calls in which the last block's attention ran. PSNR/SSIM: against the uncached images. "
        f"Accuracy: share of images the digit classifier reads as the prompted digit (uncached: "
        f"{meta['base_accuracy']:.3f}). magsdk runs with its defaults: both CFG branches follow the mean of the "
        "branch curves; *per-branch curves* rows give each branch its own curve."
    )
    lines.append("")
    lines.append("| method | knob | calls | call speedup | wall speedup | PSNR dB | SSIM | accuracy |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for p in points:
        lines.append(f"| {p.method} | {p.knob}={p.value:g} | {p.computed_calls}/{p.total_calls} "
                     f"| {p.call_speedup:.2f}x | {p.speedup:.2f}x{noise_flag(p)} | {p.psnr_db:.2f} | {p.ssim:.4f} "
                     f"| {p.accuracy:.3f} |")
    lines.append("")
    if plot:
        lines.append(f"![PSNR against speedup]({plot})")
        lines.append("")
    rows, not_beaten = pareto_rows(points)
    lines.append("**Pareto check, wall-clock** (a peer point is beaten when some magsdk point is at least as fast "
                 "and at least as close to the uncached images; every speedup here is the wall speedup capped at its "
                 "call ratio, so a point marked *(noise)* counts only as fast as its calls allow; peer points slower "
                 "than uncached, or that skip nothing, are left out):")
    lines.append("")
    lines.extend(rows)
    lines.append("")
    peers = sum(1 for r in rows[2:])
    by_calls = not_beaten_by_calls(points)
    lines.append(f"**Findings (computed from the table above).** magsdk's default beats {peers - len(not_beaten)} of "
                 f"{peers} peer points faster than uncached."
                 + (" Not beaten: " + "; ".join(not_beaten) + "." if not_beaten else "")
                 + f" Counted in transformer calls instead of seconds (no timing noise; a peer that runs its first "
                 f"block on a skipped call is counted as skipping it), it beats {peers - len(by_calls)} of {peers}"
                 + (": not beaten " + "; ".join(by_calls) + "." if by_calls else "."))
    lines.append("")
    if dit_reason:
        lines.append(f"cache-dit: no rows — {dit_reason}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def render_transfer(rows: list[dict[str, Any]], grid: list[dict[str, Any]], seeds: list[dict[str, Any]],
                    meta: dict[str, Any]) -> str:
    lines = [SECTION_TRANSFER, ""]
    lines.append(f"Command: `{meta['command']}` ({meta['seconds']:.0f} s on {meta['machine']}, {meta['date']}).")
    lines.append("")
    lines.append(
        f"The reference model calibrated once at {meta['steps']} steps on its own scheduler (shift 1), then run on "
        "other schedules. *mapped*: the runtime's default (`resample=\"auto\"`: the curve mapped through the "
        "recorded timesteps); *probed*: the same, from a calibration of the same run made with "
        f"`magsdk.calibrate(pipe, probes={meta.get('probes', TRANSFER_PROBES)})`, which also measures the curve "
        "between its steps; *index*: nearest-index resampling (diffusers' and the original's rule); *native*: a "
        f"calibration made on the target schedule itself. {meta['images']} images, true CFG (calls = 2 per step). "
        "Goal: within ±1 step per branch of *native* and within 0.5 dB PSNR of it (or better at no more calls)."
        + (f" Cost of the calibration run (10 prompts in one batch, counted transformer calls): plain "
           f"{meta['calibration_calls'][0]}, probed {meta['calibration_calls'][1]} "
           f"({meta['calibration_calls'][1] / meta['calibration_calls'][0]:.1f}x)."
           if meta.get("calibration_calls") else "")
    )
    lines.append("")
    lines.append("| target schedule | threshold/K/retention | mapped calls / PSNR | probed calls / PSNR "
                 "| index calls / PSNR | native calls / PSNR | mapped − native | goal | probed − native | goal "
                 "| mapped − native at equal calls |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---|---:|---|---|")
    met = probed_met = 0
    for row in rows:
        cells = [f"{row[k].computed_calls}/{row[k].total_calls} / {row[k].psnr_db:.2f}"
                 for k in ("mapped", "probed", "index", "native")]
        gaps = []
        for name, goal in (("mapped", "meets_goal"), ("probed", "probed_meets_goal")):
            diff = row[name].psnr_db - row["native"].psnr_db
            calls = row[name].computed_calls - row["native"].computed_calls
            gaps.append(f"{calls:+d} calls, {diff:+.2f} dB | {'met' if row[goal] else '**not met**'}")
        met += bool(row["meets_goal"])
        probed_met += bool(row["probed_meets_goal"])
        lines.append(f"| {row['target']} | {row['setting']} | {' | '.join(cells)} | {' | '.join(gaps)} | "
                     f"{equal_calls_cell(row)} |")
    lines.append("")
    index_gaps = [row["index"].psnr_db - row["native"].psnr_db for row in rows]
    mapped_gaps = [row["mapped"].psnr_db - row["native"].psnr_db for row in rows]
    probed_gaps = [row["probed"].psnr_db - row["native"].psnr_db for row in rows]
    same_steps = sum(row["probed"].computed_calls == row["native"].computed_calls
                     and row["probed"].psnr_db == row["native"].psnr_db for row in rows)
    lines.append(f"**Findings (computed from the table above).** The goal is met at {met} of {len(rows)} points by "
                 f"the mapped curve and at {probed_met} of {len(rows)} by the probed one; PSNR against the native "
                 f"calibration: mapped {min(mapped_gaps):+.2f} to {max(mapped_gaps):+.2f} dB, probed "
                 f"{min(probed_gaps):+.2f} to {max(probed_gaps):+.2f} dB (the native run's calls and PSNR exactly at "
                 f"{same_steps} of {len(rows)}), index resampling {min(index_gaps):+.2f} to "
                 f"{max(index_gaps):+.2f} dB.")
    lines.append("")
    lines.extend(equal_calls_findings(rows))
    if grid:
        lines.extend(render_transfer_grid(grid, meta))
        lines.extend(cross_check(rows, grid))
    if seeds:
        lines.extend(render_transfer_seeds(seeds))
    return "\n".join(lines) + "\n"


def equal_calls_gap(row: dict[str, Any], run: dict[str, Any]) -> float:
    """Mapped − native PSNR at the run's call count: the rerun curve's PSNR against the other's original run."""
    psnr = run["point"].psnr_db
    return float(psnr - row["native"].psnr_db if run["curve"] == "mapped" else row["mapped"].psnr_db - psnr)


def equal_calls_cell(row: dict[str, Any]) -> str:
    if not row.get("equal_calls"):
        return "same calls"
    return "; ".join(f"at {run['calls']}: no {run['curve']} threshold gives it" if run["point"] is None else
                     f"at {run['calls']}: {equal_calls_gap(row, run):+.2f} dB ({run['curve']} at {run['threshold']:g})"
                     for run in row["equal_calls"])


def equal_calls_findings(rows: list[dict[str, Any]]) -> list[str]:
    differ = [row for row in rows if row.get("equal_calls")]
    if not differ:
        return []
    gaps = [equal_calls_gap(row, run) for row in differ for run in row["equal_calls"] if run["point"] is not None]
    good = sum(gap >= -0.5 for gap in gaps)
    better = sum(gap >= 0 for gap in gaps)
    text = (f"*At equal calls.* Mapped and native compute different calls at {len(differ)} of {len(rows)} points. "
            "There each curve was also run at the other's call count, at the threshold nearest the setting's that "
            "gives it (found by plan, the other settings kept), so the two curves are compared at equal cost: ")
    planned = [run for row in differ for run in row["equal_calls"] if run["point"] is not None]
    hit = sum(run["point"].computed_calls == run["calls"] for run in planned)
    if gaps:
        text += (f"mapped − native {min(gaps):+.2f} to {max(gaps):+.2f} dB "
                 f"over {len(gaps)} comparisons, within 0.5 dB at {good} and at least as good at {better} (the runs "
                 f"computed the planned calls at {hit} of {len(planned)}). ")
    text += ("A gap at unequal calls that closes at equal calls is where the setting's threshold falls between two "
             "call counts, not a worse curve; the goal column above still judges each point at the setting as given.")
    return [text, ""]


def cross_check(rows: list[dict[str, Any]], grid: list[dict[str, Any]]) -> list[str]:
    """Where both tables have a point, the plan's computed calls against the measured run's."""
    cells = {(row["target"], cell["setting"]): cell for row in grid for cell in row["settings"]}
    agree = checked = 0
    for row in rows:
        cell = cells.get((row["target"], row["setting"]))
        if cell is None:
            continue
        native = sum(cell["native"])
        mapped = native + sum(cell["mapped"])
        index = native + sum(cell["index"])
        checked += 1
        agree += (row["native"].computed_calls, row["mapped"].computed_calls, row["index"].computed_calls) == (
            native, mapped, index)
    if not checked:
        return []
    return [f"Cross-check: at the {checked} points both tables share, the plans' computed calls (native, mapped, "
            f"index) equal the measured runs' at {agree} of {checked}.", ""]


def render_transfer_seeds(rows: list[dict[str, Any]]) -> list[str]:
    seeds = rows[0]["seeds"]
    lines = ["### The same points with other calibration seeds, by plan", ""]
    lines.append(
        f"The PSNR table's points again, source and native each calibrated with seed {', '.join(map(str, seeds))} "
        "(the same prompts; none is an evaluation seed): computed steps per branch, *native*, *mapped* and *probed* "
        "per seed. "
        "It separates what the mapping does from one calibration's luck at a threshold decision."
    )
    lines.append("")
    lines.append("| target schedule | threshold/K/retention | native, per seed | mapped, per seed | probed, per seed "
                 "| within ±1 (mapped / probed) |")
    lines.append("|---|---|---|---|---|---:|")
    within = equal = total = 0
    within_probed = equal_probed = 0
    native_spread = 0
    for row in rows:
        pairs = list(zip(row["mapped"], row["native"], strict=True))
        probed_pairs = list(zip(row["probed"], row["native"], strict=True))
        close = sum(abs(m - n) <= 1 for m, n in pairs)
        close_probed = sum(abs(m - n) <= 1 for m, n in probed_pairs)
        within += close
        within_probed += close_probed
        equal += sum(m == n for m, n in pairs)
        equal_probed += sum(m == n for m, n in probed_pairs)
        total += len(pairs)
        native_spread += max(row["native"]) != min(row["native"])
        lines.append(f"| {row['target']} | {row['setting']} | {', '.join(map(str, row['native']))} | "
                     f"{', '.join(map(str, row['mapped']))} | {', '.join(map(str, row['probed']))} | "
                     f"{close} / {close_probed} of {len(pairs)} |")
    lines.append("")
    lines.append(
        f"**Findings (computed from the table above).** Within ±1 computed step per branch of the same seed's native "
        f"calibration: mapped at {within} of {total} (point, seed) pairs, equal at {equal}; probed at {within_probed}, "
        f"equal at {equal_probed}; the native calibrations themselves differ between seeds at {native_spread} of "
        f"{len(rows)} points."
    )
    lines.append("")
    return lines


def render_transfer_grid(grid: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    settings = [cell["setting"] for cell in grid[0]["settings"]]
    lines = ["### More schedules, by plan", ""]
    lines.append(
        f"The same {meta['steps']}-step calibration against a native calibration on each of {len(grid)} target "
        "schedules (the scheduler's shift and step count changed), compared by `magsdk.plan`, which computes exactly "
        "the steps the runtime computes (a test asserts it): no images, so no PSNR; each cell is computed steps per "
        "branch, *mapped − native* / *probed − native* / *index − native* (the branch farthest from native); in "
        "brackets the native calibration's computed steps per branch."
    )
    lines.append("")
    lines.append("| target schedule | " + " | ".join(settings) + " |")
    lines.append("|---|" + "---:|" * len(settings))
    mapped_hist: Counter[int] = Counter()
    probed_hist: Counter[int] = Counter()
    index_hist: Counter[int] = Counter()
    misses: list[tuple[str, int]] = []  # (where, mapped − native) beyond ±1
    probed_misses: list[tuple[str, int]] = []
    for row in grid:
        cells = []
        for cell in row["settings"]:
            m, p, i = worst(cell["mapped"]), worst(cell["probed"]), worst(cell["index"])
            mapped_hist[m] += 1
            probed_hist[p] += 1
            index_hist[i] += 1
            if abs(m) > 1:
                misses.append((f"{row['target']} at {cell['setting']}", m))
            if abs(p) > 1:
                probed_misses.append((f"{row['target']} at {cell['setting']}", p))

            def marked(d: int) -> str:
                return f"**{d:+d}**" if abs(d) > 1 else f"{d:+d}"

            cells.append(f"{marked(m)} / {marked(p)} / {i:+d} ({max(cell['native'])})")
        lines.append(f"| {row['target']} | " + " | ".join(cells) + " |")
    lines.append("")
    total = sum(mapped_hist.values())
    within_mapped = sum(n for d, n in mapped_hist.items() if abs(d) <= 1)
    within_probed = sum(n for d, n in probed_hist.items() if abs(d) <= 1)
    within_index = sum(n for d, n in index_hist.items() if abs(d) <= 1)

    def histogram(hist: Counter[int]) -> str:
        return ", ".join(f"{d:+d}: {n}" for d, n in sorted(hist.items()))

    lines.append(
        f"**Findings (computed from the table above).** Within ±1 computed step per branch of the native calibration: "
        f"mapped at {within_mapped} of {total} points, probed at {within_probed} of {total}, index resampling at "
        f"{within_index} of {total}. Mapped − native {{{histogram(mapped_hist)}}}; probed − native "
        f"{{{histogram(probed_hist)}}}; index − native {{{histogram(index_hist)}}}."
        + (f" Beyond ±1 (mapped): {'; '.join(f'{where} ({m:+d})' for where, m in misses)}; "
           f"{sum(m > 0 for _, m in misses)} of {len(misses)} compute more steps than native (they skip less: a "
           "speed cost, not a quality one)." if misses else "")
        + (f" Beyond ±1 (probed): {'; '.join(f'{where} ({m:+d})' for where, m in probed_misses)}."
           if probed_misses else "")
    )
    lines.append("")
    return lines


def frontier(points: list[Point], speed: Callable[[Point], float]) -> list[Point]:
    """The points of one method that no other point of it beats in both speed and PSNR, by speed."""
    keep = [p for p in points
            if not any(speed(q) >= speed(p) and q.psnr_db >= p.psnr_db and q is not p
                       and (speed(q), q.psnr_db) != (speed(p), p.psnr_db) for q in points)]
    return sorted(keep, key=speed)


def plot_points(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    methods = list(dict.fromkeys(p.method for p in points))
    top = 75.0  # identical images are reported as 100 dB; keep the interesting range readable
    for ax, (label, speed) in zip(axes, (("wall-clock speedup (median of paired rounds)", lambda q: q.speedup),
                                         ("call speedup (total / computed calls)", lambda q: q.call_speedup)),
                                  strict=True):
        for i, method in enumerate(methods):
            pts = [p for p in points if p.method == method]
            ours = method.startswith("magsdk")
            color = plt.get_cmap("tab20")(i % 20)
            ax.scatter([speed(p) for p in pts], [min(p.psnr_db, top) for p in pts], s=14, color=color, alpha=0.5,
                       marker="o" if ours else "s")
            edge = frontier(pts, speed)
            ax.plot([speed(p) for p in edge], [min(p.psnr_db, top) for p in edge], "-" if ours else "--",
                    color=color, label=method, linewidth=2.0 if ours else 1.3)
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_ylim(top=top + 2)
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR vs uncached (dB)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7.5)
    fig.suptitle("Reference FluxPipeline (digits, 28 steps, true CFG): quality vs speed; lines join each "
                 "method's best points")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size: few prompts, one point per peer")
    parser.add_argument("--transfer", action="store_true", help="the schedule-transfer table instead of the sweep")
    parser.add_argument("--budget", action="store_true", help="the compute-budget table instead of the sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG (default: docs/img/bench-quality.png; none with --quick)")
    parser.add_argument("--json", type=Path, default=None, help="also write every point as JSON")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default 4, quick 1)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="how many of the 10 digit prompts (default 10, quick 4)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="paired timing rounds per point (default 5: medians of at least 5 rounds; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps (default: the reference's, 28)")
    parser.add_argument("--model", type=Path, default=None, help="a reference-style folder (default: the bundled one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: timings hold up best on a shared machine)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render the sweep's section from a --json file of an earlier run (nothing is "
                             "measured; the section names the run that measured it)")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        return render_from_json(args.from_json, args.out, args.plot)

    torch.set_num_threads(args.threads)
    settings = reference_settings(args.model)
    steps = args.steps or settings.num_inference_steps
    n_prompts = args.prompts or (4 if args.quick else 10)
    seeds = list(range(args.seeds or (1 if args.quick else 4)))
    repeats = args.repeats or (1 if args.quick else 5)
    started = time.perf_counter()
    points: list[Point] = []
    transfer: list[dict[str, Any]] = []
    grid: list[dict[str, Any]] = []
    transfer_seeds: list[dict[str, Any]] = []
    budgets: list[dict[str, Any]] = []
    dit_reason: str | None = None
    with quiet():
        pipe = load_reference_pipeline(args.model)
        bench = Bench(pipe, DEFAULT_PROMPTS[:n_prompts], seeds, repeats)
        if args.transfer:
            transfer, grid, transfer_seeds = sweep_transfer(bench, steps, args.quick)
        elif args.budget:
            budgets = sweep_budget(bench, steps, args.quick)
        else:
            points, dit_reason = sweep(bench, QUICK if args.quick else FULL, steps)
    reference, base_seconds = bench.baseline(steps)
    meta = {
        "command": "python tools/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": time.perf_counter() - started, "machine": f"CPU, {args.threads} threads",
        "date": time.strftime("%Y-%m-%d"),
        "images": len(bench.labels), "prompts": n_prompts, "seeds": len(seeds), "steps": steps,
        "cfg": settings.true_cfg_scale, "size": settings.height, "base_seconds": base_seconds, "repeats": repeats,
        "base_accuracy": digit_classifier(settings.height).prompt_accuracy(reference, bench.labels),
    }
    if args.transfer:
        counted = [bench.calibration_calls.get((steps, None, CALIBRATION_SEED, probes))
                   for probes in (0, TRANSFER_PROBES)]
        meta["probes"] = TRANSFER_PROBES
        if all(counted):
            meta["calibration_calls"] = counted
        section = render_transfer(transfer, grid, transfer_seeds, meta)
        write_section(args.out, SECTION_TRANSFER, section)
    elif args.budget:
        section = render_budget(budgets, meta)
        write_section(args.out, SECTION_BUDGET, section)
    else:
        plot_path = args.plot
        if plot_path is None and not args.quick:
            plot_path = ROOT / "docs" / "img" / "bench-quality.png"
        plot_ref = None
        if plot_path is not None:
            plot_points(points, plot_path)
            try:
                plot_ref = str(plot_path.resolve().relative_to(args.out.resolve().parent))
            except ValueError:
                plot_ref = str(plot_path)
        section = render_quality(points, dit_reason, meta, plot_ref)
        write_section(args.out, SECTION_QUALITY, section)
    if args.json is not None:
        def plain(value: Any) -> Any:
            if isinstance(value, Point):
                return asdict(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list):
                return [plain(v) for v in value]
            return value

        payload = {"meta": meta, "points": [asdict(p) for p in points], "transfer": plain(transfer),
                   "transfer_grid": grid, "transfer_seeds": transfer_seeds, "budget": plain(budgets),
                   "cache_dit": dit_reason}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    print(section)
    return 0


def render_from_json(path: Path, out: Path, plot: Path | None) -> int:
    """The sweep's section from measured points kept with ``--json``: the report can change (its checks,
    its wording) without spending 40 minutes measuring again, and every figure is still a measured one."""
    payload = json.loads(path.read_text())
    points = [Point(**p) for p in payload["points"]]
    if not points:
        print(f"--from-json {path}: it holds no sweep points (was it written by --transfer or --budget?)",
              file=sys.stderr)
        return 2
    meta = dict(payload["meta"])
    meta["command"] = (f"{meta['command']}`, rendered from its points by "
                       f"`python tools/bench_quality.py --from-json {path}")
    plot_path = plot or ROOT / "docs" / "img" / "bench-quality.png"
    plot_points(points, plot_path)
    try:
        plot_ref = str(plot_path.resolve().relative_to(out.resolve().parent))
    except ValueError:
        plot_ref = str(plot_path)
    write_section(out, SECTION_QUALITY, render_quality(points, payload.get("cache_dit"), meta, plot_ref))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
