"""Runtime cost and memory: plain vs magsdk vs diffusers' MagCache, side by side in one process.

Every method runs the same denoising loop (FlowMatchEulerDiscreteScheduler, one transformer call per
step) on one model (eager; attached and detached outside the timing). After a warm-up generation per
method, the methods are timed in interleaved rounds of single generations: per setting, one plain
generation, then magsdk's and diffusers' back to back (which of the two goes first alternates, and
every other round the settings run in reverse order). Every figure is a **median of paired
ratios**: a method's generation divided by the plain one timed just before it (``time / ideal``,
``speedup``), and magsdk's divided by diffusers' of the same pair (with a 95 % bootstrap interval).
A shared machine's speed drifts over seconds, in CPU time as much as in wall time (the findings
print the plain generations' spread in each run); neighbours in time share that drift, so their
ratio cancels it where separate medians cannot. A generation shorter
than ``--sample-seconds`` gets more rounds instead (``--rounds`` × about ``sample-seconds / its
time``, at most 10×). ``ideal`` is ``plain × computed / total``: what a skip would cost if everything
outside the block stack were free; ``time / ideal`` above 1 is overhead. A speedup above the call
ratio cannot be true and is flagged as noise, not printed as fact.

Retained memory is what a method keeps alive between generations: on the CPU the bytes of tensors
that are not parameters or buffers (a ``gc`` walk), on CUDA ``torch.cuda.memory_allocated()``; on
CUDA the peak (``max_memory_allocated``) of one generation is reported too.

    python tools/bench_overhead.py --threads 1                        # tiny and mid-size CPU tables
    python tools/bench_overhead.py --sizes mid --rounds 9             # one size, more rounds
    python tools/bench_overhead.py --full --device cuda --dtype bfloat16   # FLUX.1-dev architecture,
                                                                           # eager and compile_repeated_blocks
    python tools/bench_overhead.py --count                             # work per call, counted (no timing)

``--count`` measures what timing cannot settle on a noisy machine: per transformer call, the Python
function calls (``cProfile``) and the torch operators (``torch.profiler``) each method executes in
one generation. Both are deterministic, so a difference of a few per cent is real, not noise.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.hooks import MagCacheConfig as DiffusersMagCacheConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import write_section

import magsdk
from strategies.flux import VARIANTS

FLUX_RATIOS: list[float] = VARIANTS[0]["calibrations"][0]["branches"]["default"]  # flux.1-dev, 28 steps

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)),
    "mid": dict(in_channels=16, num_layers=4, num_single_layers=8, attention_head_dim=32, num_attention_heads=4,
                joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)),
    "full": dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
}
TOKENS = {"tiny": (16, 6), "mid": (1024, 64), "full": (4096, 512)}
COMPILED_NOTE = (
    " *compiled*: `compile_repeated_blocks()` on one copy of the model per method (plain, magsdk, diffusers); a "
    "setting is attached to its copy for that setting's rounds, so the settings run one after another, each after "
    "an untimed warm-up generation (where a re-attach would make the compiler specialise again; the findings count "
    "the graphs compiled inside the timed rounds), each round still plain, then magsdk and diffusers back to back."
)
PEAK_NOTE = (
    " *peak*: `torch.cuda.max_memory_allocated()` during one generation, less the weights of the model copies "
    "that generation does not use (compiled mode holds three), so every row reads as one model's weights plus "
    "what its run allocates."
)
SECTION = "## Runtime cost and memory: plain vs magsdk vs diffusers' MagCache"
SECTION_GPU = "## GPU: FLUX.1-dev architecture"
SECTION_COUNTS = "## Runtime work per call, counted: plain vs magsdk vs diffusers' MagCache"
DESCRIPTION = (
    "The same FLUX denoising loop (FlowMatchEulerDiscreteScheduler, one transformer call per step) with no cache, "
    "with magsdk and with diffusers' `apply_mag_cache`, for three settings of the published FLUX.1-dev curve: one "
    "that skips nothing (K = 0: every decision is made, no step skipped — pure overhead), diffusers' defaults "
    "0.06/3/0.2 and the MagCache repository's 0.24/5/0.1. *tiny*: 2 + 2 blocks on 16 image tokens (the blocks "
    "cost little, so the table shows the per-call overhead); *mid*: 4 + 8 blocks, 128 wide, 1024 image + 64 "
    "text tokens. In eager mode every method runs on the same model (attached before its run, detached after it, "
    "outside the timing), so no method is helped or hurt by where its copy of the weights sits. After a warm-up, "
    "each round times single generations: per setting one plain, then magsdk and diffusers back to back (which "
    "goes first alternates; every other round the settings run in reverse order); short generations get more "
    "rounds (the header says how many). A shared machine's speed drifts over seconds (the findings give the spread "
    "of the plain generations in this run), so each figure is a **median of paired ratios** between generations "
    "timed next to each other: *speedup* and *time / ideal* against the plain generation just before, *magsdk / "
    "diffusers* between the two caches of the same pair, with a 95 % bootstrap interval (one containing 1.000 "
    "means the two are not told apart at this precision; a machine that slows down in bursts makes rounds not "
    "fully independent, so an interval from few rounds is a guide, not a guarantee). *median time* is the plain "
    "median of each method's own samples, for scale. "
    "*ideal* is `plain × computed / total`. A skipped step still runs the embeddings, final layer and scheduler, "
    "so `time / ideal` above 1 is expected; the goal is magsdk's no larger than diffusers', that is (the ideal "
    "being shared) magsdk / diffusers <= 1, which the findings check on the back-to-back pairs. *retained*: memory "
    "held between generations (tensors that are not parameters or buffers); *peak*: CUDA only."
)
SETTINGS = {
    "K=0 (skips nothing)": dict(threshold=0.06, max_skip_steps=0, retention_ratio=0.2),
    "0.06/3/0.2": dict(threshold=0.06, max_skip_steps=3, retention_ratio=0.2),
    "0.24/5/0.1": dict(threshold=0.24, max_skip_steps=5, retention_ratio=0.1),
}


@dataclass
class Row:
    size: str
    mode: str
    method: str
    setting: str
    computed: int
    total: int
    median_s: float
    rounds: list[float]
    ideal_s: float
    retained_mb: float
    peak_mb: float | None

    @property
    def speedup(self) -> float:
        return 0.0 if not self.paired_ratio else 1.0 / self.paired_ratio

    plain_s: float = 0.0
    #: Timed rounds (one generation per method per round).
    round_count: int = 1
    #: Median over rounds of this generation / the plain generation timed just before it.
    paired_ratio: float = 1.0
    #: magsdk rows: median of magsdk / diffusers over pairs timed back to back, and its 95 % bootstrap interval.
    vs_diffusers: float | None = None
    vs_diffusers_ci: tuple[float, float] | None = None
    #: Compiled mode: graphs dynamo compiled while this row's rounds were timed (0: only compiled code was timed).
    compiled_in_rounds: int | None = None
    #: Plain rows: a further measured finding of this size and mode (the cost of reading the timestep per call).
    note: str | None = None

    @property
    def time_over_ideal(self) -> float:
        return self.paired_ratio * self.total / self.computed if self.computed else 0.0


def build(size: str, device: str, dtype: torch.dtype) -> FluxTransformer2DModel:
    """Random weights made on the device itself: FLUX.1-dev's 12 B parameters would take minutes and 48 GB of host
    memory to initialise on the CPU first."""
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(patch_size=1, **SIZES[size])
    return model.to(dtype=dtype).eval()


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def make_loop(model: torch.nn.Module, steps: int, image_tokens: int, text_tokens: int, device: str,
              dtype: torch.dtype, scheduler: FlowMatchEulerDiscreteScheduler | None = None,
              ) -> Callable[[], torch.Tensor]:
    """A hand-written FLUX denoising loop on ``scheduler`` (set up anew each generation, as a pipeline does)."""
    cfg = model.config
    scheduler = scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler()
    # set up once here too, so that the retained-memory walk sees the scheduler's tensors at their run size before
    # and after a generation (a fresh scheduler holds its 1000-step tables until the first set_timesteps)
    scheduler.set_timesteps(steps, device=device)
    g = torch.Generator().manual_seed(0)
    side = int(image_tokens ** 0.5)
    img_ids = torch.zeros(side * side, 3)
    img_ids[:, 1] = torch.arange(side * side) // side
    img_ids[:, 2] = torch.arange(side * side) % side
    inputs = {
        "encoder_hidden_states": torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids")
                      else v.dtype) for k, v in inputs.items()}
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
    start = torch.randn(1, side * side, cfg.in_channels, generator=g).to(device=device, dtype=dtype)

    def loop() -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        latents = start
        with torch.no_grad():
            for t in scheduler.timesteps:
                timestep = t.expand(1).to(dtype) / 1000
                pred = model(hidden_states=latents, timestep=timestep, return_dict=False, **inputs)[0]
                latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return latents

    return loop


def held_bytes(device: str, models: list[torch.nn.Module]) -> int:
    """Tensors kept alive that are not any model's parameters or buffers."""
    gc.collect()
    if device == "cuda":
        return int(torch.cuda.memory_allocated())
    owned = {t.untyped_storage().data_ptr() for m in models for t in [*m.parameters(), *m.buffers()]}
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                pointer = storage.data_ptr()
            except (RuntimeError, NotImplementedError):
                continue
            if pointer not in owned:
                storages[pointer] = storage.nbytes()
    return sum(storages.values())


def measure_memory(
    device: str, loop: Callable[[], torch.Tensor], models: list[torch.nn.Module], idle: int = 0
) -> tuple[float, float | None]:
    """(MB retained after one generation, peak MB during it on CUDA, less ``idle`` bytes: the weights of model
    copies this run does not use, so that compiled rows, which hold one copy per method, read as one model)."""
    before = held_bytes(device, models)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = loop()
    del out
    peak = (torch.cuda.max_memory_allocated() - idle) / 2**20 if device == "cuda" else None
    return (held_bytes(device, models) - before) / 2**20, peak


#: Attach a cache to a model driven by a hand loop on the given scheduler; returns the detach.
Attach = Callable[[torch.nn.Module, FlowMatchEulerDiscreteScheduler], Callable[[], None]]


def attach_magsdk(settings: dict[str, Any]) -> Attach:
    def attach(model: torch.nn.Module, scheduler: FlowMatchEulerDiscreteScheduler) -> Callable[[], None]:
        # a hand loop passes its scheduler, as the user guide says: steps are then known without reading the
        # timestep tensor (no device→host read per call), as diffusers knows them from num_inference_steps
        handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, resample="index", **settings),
                               scheduler=scheduler)
        return handle.disable

    return attach


def attach_diffusers(settings: dict[str, Any], steps: int) -> Attach:
    def attach(model: torch.nn.Module, scheduler: FlowMatchEulerDiscreteScheduler) -> Callable[[], None]:
        model.enable_cache(DiffusersMagCacheConfig(mag_ratios=FLUX_RATIOS, num_inference_steps=steps,
                                                   **settings))
        return model.disable_cache

    return attach


def time_group(
    labels: list[str],
    runs: dict[str, tuple[Callable[[], torch.Tensor], Callable[[], Callable[[], None]] | None]],
    rounds: int,
    plain: Callable[[], torch.Tensor],
    device: str,
    models: list[torch.nn.Module],
    idle: int,
    memory: dict[str, tuple[float, float | None]],
    times: dict[str, list[float]],
    ratios: dict[str, list[float]],
    head_to_head: dict[str, list[float]],
) -> int:
    """Memory (also each method's warm-up), then ``rounds`` interleaved rounds of these settings' generations.

    Returns the graphs dynamo compiled during the rounds: in compiled mode anything but 0 means compiling was timed.
    """

    def run(name: str, measure: Callable[[Callable[[], torch.Tensor]], Any]) -> Any:
        loop, attach = runs[name]
        detach = attach() if attach is not None else None
        try:
            return measure(loop)
        finally:
            if detach is not None:
                detach()

    for name in runs:
        memory[name] = run(name, lambda loop: measure_memory(device, loop, models, idle))
    graphs_before = compiled_graphs()
    for index in range(rounds):
        for position, label in enumerate(labels if index % 2 == 0 else labels[::-1]):
            before = timed(plain)
            times["plain"].append(before)
            pair = [f"magsdk | {label}", f"diffusers | {label}"]
            sample: dict[str, float] = {}
            for name in pair if (index + position) % 2 == 0 else pair[::-1]:
                sample[name] = run(name, timed)
                times[name].append(sample[name])
                ratios[name].append(sample[name] / before)
            head_to_head[label].append(sample[pair[0]] / sample[pair[1]])
    return compiled_graphs() - graphs_before


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_size(size: str, args: argparse.Namespace, mode: str) -> list[Row]:
    """One size: every method timed in interleaved rounds, medians reported.

    Eager: every method runs on the *same* model, attached before its run and detached after it (outside the
    timing), so no method gets a copy of the weights that happens to sit better in memory: with a deep copy per
    method, the mid-size K=0 rows differed by 3-7 % between methods doing the same arithmetic. Compiled: one
    compiled copy per method (plain, magsdk, diffusers: three copies of the weights, which is what fits a
    FLUX.1-dev-sized model on one GPU; one per method and setting would not), a setting attached to its copy for
    that setting's rounds: the settings run one after another, each re-attach followed by an untimed warm-up
    generation (on the tiny model a re-attach compiles nothing new; the findings count what the rounds compiled).
    """
    dtype = getattr(torch, args.dtype)
    image_tokens, text_tokens = TOKENS[size]
    base = build(size, args.device, dtype)
    attachers: dict[str, tuple[str, str, Attach]] = {}
    computed: dict[str, int] = {}
    for label, settings in SETTINGS.items():
        probe = magsdk.enable(base, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, resample="index", **settings))
        computed[label] = len(probe.plan(args.steps).computed_steps)
        probe.disable()
        attachers[f"magsdk | {label}"] = ("magsdk", label, attach_magsdk(settings))
        attachers[f"diffusers | {label}"] = ("diffusers", label, attach_diffusers(settings, args.steps))
    weights = model_bytes(base)
    copies: dict[str, torch.nn.Module] = {}
    if mode == "compiled":
        copies = {method: copy.deepcopy(base) for method in ("magsdk", "diffusers")}
        groups = [[label] for label in SETTINGS]
    else:
        groups = [list(SETTINGS)]
    models = [base, *copies.values()]
    for model in models if mode == "compiled" else []:
        model.compile_repeated_blocks()
    idle = weights * (len(models) - 1)  # the copies a run does not use: not part of its peak
    plain = make_loop(base, args.steps, image_tokens, text_tokens, args.device, dtype)
    eager_scheduler = FlowMatchEulerDiscreteScheduler()
    shared = None if copies else make_loop(base, args.steps, image_tokens, text_tokens, args.device, dtype,
                                           eager_scheduler)

    memory = {"plain": measure_memory(args.device, plain, models, idle)}  # also the warm-up
    rounds = args.rounds * rounds_factor(plain, args.sample_seconds)
    times: dict[str, list[float]] = {"plain": [], **{name: [] for name in attachers}}
    ratios: dict[str, list[float]] = {name: [] for name in attachers}
    head_to_head: dict[str, list[float]] = {label: [] for label in SETTINGS}
    compiled_in_rounds: dict[str, int] = {}
    for labels in groups:
        runs: dict[str, tuple[Callable[[], torch.Tensor], Callable[[], Callable[[], None]] | None]] = {}
        detach_all: list[Callable[[], None]] = []
        for label in labels:
            for method in ("magsdk", "diffusers"):
                name = f"{method} | {label}"
                attach = attachers[name][2]
                if copies:
                    scheduler = FlowMatchEulerDiscreteScheduler()
                    detach_all.append(attach(copies[method], scheduler))
                    runs[name] = (make_loop(copies[method], args.steps, image_tokens, text_tokens, args.device,
                                            dtype, scheduler), None)
                else:
                    assert shared is not None
                    runs[name] = (shared, (lambda attach=attach: attach(base, eager_scheduler)))
        try:
            graphs = time_group(labels, runs, rounds, plain, args.device, models, idle, memory, times, ratios,
                                head_to_head)
            compiled_in_rounds.update(dict.fromkeys(labels, graphs))
        finally:
            for detach in detach_all:
                detach()
    note = None
    if mode == "eager" and (args.device == "cuda" or args.sync_cost):
        note = sync_cost(base, args, rounds, image_tokens, text_tokens, dtype)
    plain_s = statistics.median(times["plain"])
    print(f"# {size}/{mode}: {rounds} rounds of single generations", flush=True)
    rows = [Row(size, mode, "plain", "-", args.steps, args.steps, plain_s, times["plain"], plain_s,
                *memory["plain"], plain_s=plain_s, round_count=rounds, note=note)]
    for name, (method, label, _) in attachers.items():
        ideal = plain_s * computed[label] / args.steps
        row = Row(size, mode, method, label, computed[label], args.steps, statistics.median(times[name]),
                  times[name], ideal, *memory[name], plain_s=plain_s, round_count=rounds,
                  paired_ratio=statistics.median(ratios[name]),
                  compiled_in_rounds=compiled_in_rounds[label] if mode == "compiled" else None)
        if method == "magsdk":
            row.vs_diffusers = statistics.median(head_to_head[label])
            row.vs_diffusers_ci = median_interval(head_to_head[label])
        rows.append(row)
    return rows


def sync_cost(base: torch.nn.Module, args: argparse.Namespace, rounds: int, image_tokens: int, text_tokens: int,
              dtype: torch.dtype) -> str:
    """What a bare transformer pays when magsdk is not given the loop's scheduler: it then reads each call's
    timestep (on a GPU, one device→host synchronisation per call, which stops the host from queueing the next
    call's kernels). magsdk at 0.06/3/0.2 with ``scheduler=`` and without it (``num_inference_steps`` instead),
    timed back to back in alternating order."""
    settings = SETTINGS["0.06/3/0.2"]
    told, untold = FlowMatchEulerDiscreteScheduler(), FlowMatchEulerDiscreteScheduler()

    def without_scheduler(model: torch.nn.Module, _: FlowMatchEulerDiscreteScheduler) -> Callable[[], None]:
        config = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, resample="index", num_inference_steps=args.steps,
                                       **settings)
        return magsdk.enable(model, config).disable

    runs = {"scheduler": (make_loop(base, args.steps, image_tokens, text_tokens, args.device, dtype, told),
                          attach_magsdk(settings), told),
            "timestep": (make_loop(base, args.steps, image_tokens, text_tokens, args.device, dtype, untold),
                         without_scheduler, untold)}

    def run(name: str) -> float:
        loop, attach, scheduler = runs[name]
        detach = attach(base, scheduler)
        try:
            return timed(loop)
        finally:
            detach()

    for name in runs:  # warm-up
        run(name)
    ratios, differences = [], []
    for index in range(rounds):
        order = ["scheduler", "timestep"] if index % 2 == 0 else ["timestep", "scheduler"]
        sample = {name: run(name) for name in order}
        ratios.append(sample["timestep"] / sample["scheduler"])
        differences.append(sample["timestep"] - sample["scheduler"])
    low, high = median_interval(ratios)
    per_call_ms = statistics.median(differences) / args.steps * 1e3
    sync = ": one device→host sync per call" if args.device == "cuda" else ""
    return (f"magsdk without `scheduler=` (it reads each call's timestep{sync}) "
            f"/ with it, 0.06/3/0.2: {statistics.median(ratios):.3f} ({low:.3f}-{high:.3f}), "
            f"{per_call_ms:+.3f} ms per call (median of {rounds} back-to-back pairs)")


def median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the median (seeded: the same samples always print the same interval)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def count_work(size: str, steps: int) -> list[dict[str, Any]]:
    """Per method and setting: Python function calls and torch operators per transformer call (one generation)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    image_tokens, text_tokens = TOKENS[size]
    model = build(size, "cpu", torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler()
    loop = make_loop(model, steps, image_tokens, text_tokens, "cpu", torch.float32, scheduler)
    loop()
    rows = []
    methods: list[tuple[str, str, Attach | None, int]] = [("plain", "-", None, steps)]
    for label, settings in SETTINGS.items():
        probe = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, resample="index", **settings))
        computed = len(probe.plan(steps).computed_steps)
        probe.disable()
        methods += [("magsdk", label, attach_magsdk(settings), computed),
                    ("diffusers", label, attach_diffusers(settings, steps), computed)]
    for method, label, attach, computed in methods:
        detach = attach(model, scheduler) if attach is not None else None
        try:
            loop()  # warm: first-call work is not per-call work
            profiler = cProfile.Profile()
            profiler.enable()
            loop()
            profiler.disable()
            python_calls = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                loop()
            ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        finally:
            if detach is not None:
                detach()
        rows.append({"size": size, "method": method, "setting": label, "computed": computed, "total": steps,
                     "python_calls": python_calls / steps, "aten_ops": ops / steps})
    return rows


def count_table(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    lines = ["| size | setting | method | computed / total | Python calls per call | vs diffusers | torch ops per call "
             "| vs diffusers |", "|---|---|---|---|---:|---:|---:|---:|"]
    verdicts = []
    for r in rows:
        theirs = next((d for d in rows if d["method"] == "diffusers" and d["size"] == r["size"]
                       and d["setting"] == r["setting"]), None)
        vs_py = vs_ops = "-"
        if r["method"] == "magsdk" and theirs is not None:
            vs_py = f"{r['python_calls'] / theirs['python_calls'] - 1:+.1%}"
            vs_ops = f"{r['aten_ops'] / theirs['aten_ops'] - 1:+.1%}"
            verdicts.append(f"{r['size']} {r['setting']}: Python calls {vs_py}, torch ops {vs_ops}")
        lines.append(f"| {r['size']} | {r['setting']} | {r['method']} | {r['computed']} / {r['total']} | "
                     f"{r['python_calls']:.0f} | {vs_py} | {r['aten_ops']:.0f} | {vs_ops} |")
    return "\n".join(lines), verdicts


def timed(fn: Callable[[], torch.Tensor]) -> float:
    """Seconds of one generation."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rounds_factor(plain: Callable[[], torch.Tensor], seconds: float) -> int:
    """How many generations add up to about ``seconds`` (1 to 10): the factor short generations get more rounds by."""
    once = timed(plain)
    return max(1, min(10, round(seconds / max(once, 1e-6))))


def table(rows: list[Row]) -> str:
    lines = [
        "| size | mode | method | setting | computed / total | median time (s) | speedup | ideal (s) | time / ideal "
        "| magsdk / diffusers (95 % interval) | retained (MB) | peak (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{r.speedup:.2f}x"
        if r.computed and r.speedup > r.total / r.computed * 1.001:
            speedup += " (noise: above the call ratio)"
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
        versus = "-"
        if r.vs_diffusers is not None and r.vs_diffusers_ci is not None:
            versus = f"{r.vs_diffusers:.3f} ({r.vs_diffusers_ci[0]:.3f}-{r.vs_diffusers_ci[1]:.3f})"
        lines.append(f"| {r.size} | {r.mode} | {r.method} | {r.setting} | {r.computed} / {r.total} | "
                     f"{r.median_s:.4f} | {speedup} | {r.ideal_s:.4f} | {r.time_over_ideal:.3f} | {versus} | "
                     f"{r.retained_mb:.3f} | {peak} |")
    return "\n".join(lines)


def verdict(sub: list[Row]) -> str:
    """The goal per size and mode: magsdk's time / ideal no larger than diffusers'.

    Both rows share ``ideal``, so the goal is magsdk's time <= diffusers'; the direct estimate of that is the
    median of magsdk / diffusers over generations timed back to back. The time / ideal columns divide each method
    by its own plain generation, which adds that generation's noise; where they disagree with the pairs, it says so.
    """
    worse, unresolved, columns_disagree = [], [], []
    for r in sub:
        d = next((d for d in sub if d.method == "diffusers" and d.setting == r.setting), None)
        if r.method != "magsdk" or d is None or r.vs_diffusers is None:
            continue
        if r.vs_diffusers > 1.0:
            worse.append(f"{r.setting}: {r.vs_diffusers:.3f}")
        if (r.vs_diffusers > 1.0) != (r.time_over_ideal > d.time_over_ideal):
            columns_disagree.append(f"{r.setting}: time / ideal {r.time_over_ideal:.3f} vs {d.time_over_ideal:.3f}")
        if r.vs_diffusers_ci is not None and r.vs_diffusers_ci[0] <= 1.0 <= r.vs_diffusers_ci[1]:
            unresolved.append(r.setting)
    settings = sum(1 for r in sub if r.method == "magsdk")
    plain = next(r for r in sub if r.method == "plain")
    spread = f"{min(plain.rounds) / plain.median_s:.2f}-{max(plain.rounds) / plain.median_s:.2f}"
    text = (f"{sub[0].size}/{sub[0].mode} (plain generations took {spread} × their median over the run): magsdk / "
            f"diffusers <= 1 on {settings - len(worse)} of {settings} settings"
            + (f" (not on {'; '.join(worse)})" if worse else ""))
    if columns_disagree:
        text += f"; the time / ideal columns say the opposite on {'; '.join(columns_disagree)}"
    if unresolved:
        text += (f"; 1.000 lies inside the 95 % interval on {len(unresolved)} of {settings} "
                 f"({', '.join(unresolved)}): there the two are not told apart on this machine")
    plain_row = next((r for r in sub if r.method == "plain"), None)
    if plain_row is not None and plain_row.note:
        text += "; " + plain_row.note
    peaks = [(r, next(d for d in sub if d.method == "diffusers" and d.setting == r.setting)) for r in sub
             if r.method == "magsdk" and r.peak_mb is not None]
    if peaks:
        over = [f"{r.setting}: {r.peak_mb:.0f} vs {d.peak_mb:.0f} MB" for r, d in peaks
                if d.peak_mb is not None and r.peak_mb is not None and r.peak_mb > d.peak_mb * 1.01]
        text += (f"; peak memory within diffusers' + 1 % on {len(peaks) - len(over)} of {len(peaks)} settings"
                 + (f" (not on {'; '.join(over)})" if over else ""))
    if any(r.compiled_in_rounds is not None for r in sub):
        recompiled = sum(r.compiled_in_rounds or 0 for r in sub if r.method == "magsdk")  # one count per setting
        text += f"; graphs compiled during the timed rounds: {recompiled}" + (
            " (the rounds timed compiled code only)" if recompiled == 0 else " (**timings include compiling**)")
    return text


def compiled_against_eager(rows: list[Row]) -> str | None:
    """The compile goal: magsdk compiled faster than magsdk eager, per size and setting (medians of separate runs)."""
    parts = []
    for r in rows:
        e = next((e for e in rows if (e.size, e.method, e.setting, e.mode) == (r.size, r.method, r.setting, "eager")),
                 None)
        if r.mode == "compiled" and r.method == "magsdk" and e is not None:
            parts.append(f"{r.size} {r.setting}: {r.median_s / e.median_s:.3f}")
    if not parts:
        return None
    faster = sum(float(p.rsplit(": ", 1)[1]) < 1.0 for p in parts)
    return (f"magsdk compiled / magsdk eager median time (separate runs, not interleaved): {'; '.join(parts)} — "
            f"compiled faster on {faster} of {len(parts)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated: tiny, mid (CPU), full (GPU)")
    parser.add_argument("--full", action="store_true", help="the FLUX.1-dev architecture, eager and compiled")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved timing rounds (medians of paired ratios reported; >= 5)")
    parser.add_argument("--sample-seconds", type=float, default=1.0,
                        help="generations shorter than this get proportionally more rounds (at most 10x)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU); fewer = steadier timings")
    parser.add_argument("--modes", default=None, help="eager,compiled (default: eager; with --full both)")
    parser.add_argument("--json", type=Path, default=None, help="write every round's timings here")
    parser.add_argument("--sync-cost", action="store_true",
                        help="also time magsdk without scheduler= (reading each call's timestep); always on CUDA")
    parser.add_argument("--out", type=Path, default=None, help="write the tables as their section of a markdown file")
    parser.add_argument("--count", action="store_true",
                        help="count Python calls and torch operators per transformer call instead of timing")
    args = parser.parse_args(argv)
    if args.count:
        return main_count(args, argv)
    if args.rounds < 5:
        parser.error(f"--rounds {args.rounds}: medians need at least 5 rounds")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = ["full"] if args.full else [s.strip() for s in args.sizes.split(",") if s.strip()]
    modes = (args.modes or ("eager,compiled" if args.full else "eager")).split(",")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    started = time.perf_counter()
    header = (f"device={args.device} ({device_name}) dtype={args.dtype} steps={args.steps} rounds={args.rounds} "
              f"threads={torch.get_num_threads()} torch={torch.__version__} magsdk={magsdk.__version__}")
    print("# " + header)
    rows: list[Row] = []
    runs = [(size, mode) for size in sizes for mode in modes]
    for number, (size, mode) in enumerate(runs, start=1):
        rows.extend(run_size(size, args, mode))
        gc.collect()  # the run's model copies go before the next run builds its own (FLUX.1-dev: 24 GB each)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        # written after every size and mode: a run stopped at a time limit still leaves what it measured
        done = runs[:number]
        per_size = {f"{r.size}/{r.mode} {r.round_count}": None for r in rows}
        body = table(rows)
        verdicts = [verdict([r for r in rows if (r.size, r.mode) == key]) for key in done]
        compile_goal = compiled_against_eager(rows)
        verdicts += [compile_goal] if compile_goal else []
        print(body)
        print("\n".join("# " + v for v in verdicts))
        if args.out is not None:
            command = "python tools/bench_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
            title = SECTION_GPU if args.device == "cuda" else SECTION
            missing = [f"{s}/{m}" for s, m in runs[number:]]
            section = (
                f"{title}\n\nCommand: `{command.strip()}` ({time.perf_counter() - started:.0f} s, "
                f"{time.strftime('%Y-%m-%d')}; {header} rounds of single generations: {', '.join(per_size)})."
                + (f" **Incomplete: the run had not yet measured {', '.join(missing)}.**" if missing else "")
                + f"\n\n{DESCRIPTION}{COMPILED_NOTE if 'compiled' in modes else ''}"
                + f"{PEAK_NOTE if args.device == 'cuda' else ''}\n\n{body}\n\n**Findings (computed from the table "
                "above).** "
                + "; ".join(verdicts) + ".\n"
            )
            write_section(args.out, title, section)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


def main_count(args: argparse.Namespace, argv: list[str] | None) -> int:
    started = time.perf_counter()
    torch.set_num_threads(args.threads or 1)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    rows = [row for size in sizes for row in count_work(size, args.steps)]
    body, verdicts = count_table(rows)
    print(body)
    if args.out is not None:
        command = "python tools/bench_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        section = (
            f"{SECTION_COUNTS}\n\nCommand: `{command.strip()}` ({time.perf_counter() - started:.0f} s, "
            f"{time.strftime('%Y-%m-%d')}; torch={torch.__version__} magsdk={magsdk.__version__}).\n\n"
            "The loop of the table above, one generation per method after a warm-up one: Python function calls "
            "(`cProfile`) and torch operators (`torch.profiler`, `aten::` events) per transformer call. Counts do not "
            "depend on the machine's load, so they show what the timings cannot separate from noise: the work each "
            f"method adds per call.\n\n{body}\n\n**Magsdk against diffusers (computed from the table above).** "
            + "; ".join(verdicts) + ".\n"
        )
        write_section(args.out, SECTION_COUNTS, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
