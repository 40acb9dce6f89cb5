"""What each of the 2 gloo processes of ``tests/test_distributed.py`` runs, and the single-process references.

Every process is started with ``spawn``, pinned to one thread, and bounded by the parent's
deadline, after which it is killed.

On a CPU-only machine diffusers' ``enable_parallelism`` divides by ``torch.accelerator.device_count()``
(0); the workers, and only they, patch it to return 1 so that diffusers' context parallelism runs on gloo.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pickle
import runpy
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers_features import CONTEXT_PARALLEL, HAS_CONTEXT_PARALLEL, lacks
from tiny_models import denoise, tiny_flux

import magsdk

STEPS = 8
SEEDS = (0, 1)
#: The curve the cached runs follow: fixed, so that every process takes the same decisions by construction.
CURVE = [1.0, 0.98, 0.97, 0.96, 0.95, 0.94, 0.92, 0.9]
THRESHOLD = 0.1
PROMPTS = ["a red circle", "a blue square", "two green lines", "a yellow star"]
DP_SEEDS = 2
DP_STEPS = 4


# -- the single-process side (the references) ------------------------------------------------------
def calibrate_tiny(model: torch.nn.Module, **calibrate: Any) -> magsdk.CalibrationResult:
    """Two CFG generations under ``magsdk.calibrate`` with the scheduler known (as a pipeline would)."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    with magsdk.calibrate(model, scheduler=scheduler, **calibrate) as cal:
        for seed in SEEDS:
            denoise(model, STEPS, cfg=True, seed=seed, scheduler=scheduler)
    assert cal.result is not None
    return cal.result


def run_cached(model: torch.nn.Module, threshold: float = THRESHOLD, steps: int = STEPS,
               **enable: Any) -> dict[str, Any]:
    """Two cached CFG generations; the outputs, the call records and the guard's count."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    config = magsdk.MagCacheConfig(mag_ratios=CURVE, threshold=threshold, max_skip_steps=3, retention_ratio=0.2)
    with magsdk.enable(model, config, scheduler=scheduler, **enable) as handle:
        outputs = [denoise(model, steps, cfg=True, seed=seed, scheduler=scheduler) for seed in SEEDS]
        guard = handle.sessions[0].plan_guard
        checks = guard.checks if guard is not None else None
    records = [(r.generation, r.branch, r.step, r.computed) for r in handle.stats.calls]
    return {"outputs": outputs, "computed": handle.stats.computed_calls, "skipped": handle.stats.skipped_calls,
            "records": records, "guard_checks": checks}


def pipeline_calibration(prompts: list[str]) -> magsdk.CalibrationResult:
    """``magsdk``'s pipeline driver over ``prompts`` × ``DP_SEEDS`` on the tiny FluxPipeline (split across
    ranks when a process group is initialised)."""
    from magsdk.calibration.drivers import LoadedModel, resolve_settings, run_calibration
    from magsdk.calibration.settings import CalibrationRequest
    from magsdk.reference.components import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedModel(target="tiny FluxPipeline", transformer=pipe.transformer, pipeline=pipe)
    request = CalibrationRequest(steps=DP_STEPS, prompts=prompts, seeds=DP_SEEDS, height=32, width=32)
    settings = resolve_settings(request, loaded)
    strategy = magsdk.StrategyRegistry.require("FluxTransformer2DModel")()
    result, _ = run_calibration(loaded, strategy, settings, progress=False)
    return result


def references() -> dict[str, Any]:
    """Every scenario's single-process result (run before any process group exists)."""
    return {
        "calibration": calibrate_tiny(tiny_flux()).model_dump(mode="json"),
        "calibration_probed": calibrate_tiny(tiny_flux(), probes=2).model_dump(mode="json"),
        "runtime": run_cached(tiny_flux()),
        "dp_calibration": pipeline_calibration(PROMPTS).model_dump(mode="json"),
    }


# -- the ranks ---------------------------------------------------------------------------------------
def torchrun_environment(rank: int, world: int, port: int) -> dict[str, str]:
    """What ``torchrun --nproc-per-node WORLD`` sets for each worker (rank 0 hosts the store here)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank),
            "LOCAL_RANK": str(rank)}


def run_cli(args: list[str]) -> dict[str, Any]:
    """``python -m magsdk ARGS`` in this process (its output captured), as a torchrun worker runs it."""
    argv, sys.argv = sys.argv, ["magsdk", *args]
    os.environ["MAGSDK_SKIP_MYPY"] = "1"  # mypy on generated modules is tested elsewhere
    stdout = io.StringIO()
    started = time.monotonic()
    code: Any = None
    try:
        with contextlib.redirect_stdout(stdout):
            runpy.run_module("magsdk", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
        del os.environ["MAGSDK_SKIP_MYPY"]
    return {"code": code, "stdout": stdout.getvalue(), "seconds": time.monotonic() - started}


def _scenarios(rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    out: dict[str, Any] = {}
    if HAS_CONTEXT_PARALLEL:
        out.update(_context_parallel_scenarios(rank))
    else:
        out["cp_lacking"] = lacks(CONTEXT_PARALLEL)
    out.update(_data_parallel_scenarios(rank, dist.group.WORLD))
    return out


def _context_parallel_scenarios(rank: int) -> dict[str, Any]:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from magsdk.runtime.distributed import PlanMismatchError

    out: dict[str, Any] = {}
    model = tiny_flux()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))

    # 1. calibration under context parallelism: no argument, the group comes from diffusers
    out["cp_calibration"] = calibrate_tiny(model).model_dump(mode="json")
    # ... with between-step probes: their sums are reduced like the steps'
    out["cp_calibration_probed"] = calibrate_tiny(model, probes=2).model_dump(mode="json")
    # ... what each rank would measure alone from its slice of the tokens (detection off)
    out["cp_unreduced"] = calibrate_tiny(model, parallel_group=None).model_dump(mode="json")
    # ... and with a data group over the same ranks: they hold one sequence, so their runs count once
    out["cp_dp_calibration"] = calibrate_tiny(model, data_group=dist.group.WORLD).model_dump(mode="json")

    # 2. the cache under context parallelism, guarded once per generation
    out["cp_runtime"] = run_cached(model)

    # 3. ranks with different plans: both raise, none hangs
    started = time.monotonic()
    try:
        run_cached(model, threshold=0.1 if rank == 0 else 0.3)
        out["cp_mismatch"] = {"error": None}
    except PlanMismatchError as exc:
        out["cp_mismatch"] = {"error": str(exc), "seconds": time.monotonic() - started}

    return out


def _data_parallel_scenarios(rank: int, world: Any) -> dict[str, Any]:
    """What needs only a process group, so it runs on any diffusers."""
    import torch.distributed as dist

    from magsdk.runtime.distributed import PlanMismatchError

    out: dict[str, Any] = {}
    # 4. an explicit group (another engine) with different step counts
    plain = tiny_flux()
    started = time.monotonic()
    try:
        run_cached(plain, steps=STEPS + 2 * rank, parallel_group=world)
        out["explicit_mismatch"] = {"error": None}
    except PlanMismatchError as exc:
        out["explicit_mismatch"] = {"error": str(exc), "seconds": time.monotonic() - started}

    # 5. plain data-parallel inference: independent ranks, different numbers of generations, no collective
    config = magsdk.MagCacheConfig(mag_ratios=CURVE, threshold=THRESHOLD)
    with magsdk.enable(plain, config) as handle:
        for seed in range(1 + rank):
            denoise(plain, STEPS, seed=seed)
        out["dp_inference"] = {"guard": handle.sessions[0].plan_guard is not None,
                               "computed": handle.stats.computed_calls, "skipped": handle.stats.skipped_calls}
    dist.barrier()  # both ranks are still in step

    # 6. data-parallel calibration with more ranks than runs: rank 1 runs nothing and gets rank 0's curve
    with magsdk.calibrate(plain, data_group=world) as cal:
        if rank == 0:
            denoise(plain, STEPS, seed=0)
    assert cal.result is not None
    out["dp_idle_rank"] = cal.result.model_dump(mode="json")

    # 7. one rank fails inside the block: the other stops with an error instead of waiting for it
    started = time.monotonic()
    try:
        with magsdk.calibrate(plain, data_group=world):
            denoise(plain, STEPS, seed=0, raise_at=3 if rank == 1 else None)
        out["dp_failure"] = {"error": None}
    except Exception as exc:
        out["dp_failure"] = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}

    # 8. data-parallel calibration through magsdk's pipeline driver: each rank runs half the prompts × seeds
    started = time.monotonic()
    out["dp_calibration"] = pipeline_calibration(PROMPTS).model_dump(mode="json")
    out["dp_calibration_seconds"] = time.monotonic() - started
    return out


def worker(rank: int, world: int, out_dir: str, port: int, cli_args: list[str]) -> None:
    """One rank: the references alone, then, in the process group the CLI sets up from torchrun's
    environment (one group for the process's life: gloo dislikes a group torn down while its peer
    still holds one), the CLI and every scenario."""
    import torch.distributed as dist

    from magsdk.runtime.distributed import launched_process_group

    torch.set_num_threads(1)
    if hasattr(torch, "accelerator"):  # torch >= 2.6; older torch has no diffusers context parallelism to feed
        torch.accelerator.device_count = lambda: 1  # CPU-only: see the module docstring (tests only)
    path = Path(out_dir) / f"rank{rank}.pkl"
    out: dict[str, Any] = {"seconds": {"started": time.time()}}
    seconds = out["seconds"]
    try:
        out["reference"] = references()  # this process alone: no group yet
        seconds["references"] = time.time()
        os.environ.update(torchrun_environment(rank, world, port))
        with launched_process_group("cpu") as size:
            out["group"] = {"size": size, "backend": str(dist.get_backend())}
            out["cli"] = run_cli(cli_args)  # the command finds the group and uses it as it is
            seconds["cli"] = time.time()
            out.update(_scenarios(rank))
            seconds["scenarios"] = time.time()
        out["group"]["destroyed"] = not dist.is_initialized()
    except BaseException:
        out["failed"] = traceback.format_exc()
    path.write_bytes(pickle.dumps(out))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(world: int, tmp: Path, deadline_s: float, cli_args: list[str]) -> list[dict[str, Any]]:
    """Start ``world`` processes on ``worker`` and wait at most ``deadline_s``; kill whatever is left."""
    return run_ranks_of(worker, world, tmp, deadline_s, cli_args)


# -- tests/test_doc_promises.py: the plan guard's curves and schedule, the drivers' split and refusal ----------
#: Seeds and steps of the driver and synthetic-loop calibrations split across the ranks.
SPLIT_SEEDS = 6
SPLIT_STEPS = 4
#: A curve of the same length as CURVE that differs from it (the guard must see the difference).
OTHER_CURVE = [1.0, 0.97, 0.95, 0.93, 0.91, 0.9, 0.89, 0.88]


def _guarded(model: torch.nn.Module, config: magsdk.MagCacheConfig, shift: float, world: Any) -> dict[str, Any]:
    """Two cached CFG generations under ``parallel_group=world``: counts, or the error every rank raised."""
    from magsdk.runtime.distributed import PlanMismatchError

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    started = time.monotonic()
    try:
        with magsdk.enable(model, config, scheduler=scheduler, parallel_group=world) as handle:
            for seed in SEEDS:
                denoise(model, STEPS, cfg=True, seed=seed, scheduler=scheduler)
            guard = handle.sessions[0].plan_guard
        return {"error": None, "computed": handle.stats.computed_calls, "skipped": handle.stats.skipped_calls,
                "checks": guard.checks if guard is not None else None}
    except PlanMismatchError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - started}


def _split_calibration(kind: str, driver: str | None) -> dict[str, Any]:
    """``run_calibration`` (what ``magsdk calibrate --driver`` / the synthetic loop run) on a tiny Flux under the
    process group: the seeds this rank ran and the merged result."""
    from magsdk.calibration.drivers import LoadedModel, run_calibration
    from magsdk.calibration.settings import CalibrationSettings

    model = tiny_flux()
    first_latents: list[torch.Tensor] = []

    def record(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = kwargs.get("timestep")
        if isinstance(timestep, torch.Tensor) and float(timestep.max()) == 1.0:  # sigma 1: a generation's first call
            first_latents.append(kwargs["hidden_states"].detach().clone())

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    loaded = LoadedModel(target="tiny FluxTransformer2DModel", transformer=model, weights="random weights")
    settings = CalibrationSettings(kind=kind, steps=SPLIT_STEPS, seeds=SPLIT_SEEDS, driver=driver)
    strategy = magsdk.StrategyRegistry.require("FluxTransformer2DModel")()
    result, _ = run_calibration(loaded, strategy, settings, progress=False)
    hook.remove()
    if kind == "driver":
        seeds = list(model.__dict__.get("seeds_run", []))
    else:  # which seed's noise each generation started from
        seeds = [s for latents in first_latents for s in range(SPLIT_SEEDS)
                 if torch.equal(latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(s)))]
    return {"seeds": seeds, "generations": len(first_latents), "result": result.model_dump(mode="json")}


def _partial_context_parallel_refusals(driver: str) -> dict[str, Any]:
    """Context parallelism over 2 of 4 ranks (2 data-parallel x 2 ulysses): every driver refuses before running."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from magsdk.calibration.drivers import LoadedModel, resolve_settings, run_calibration
    from magsdk.calibration.settings import CalibrationRequest, CalibrationSettings
    from magsdk.reference.components import build_pipeline

    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("dp", "ring", "ulysses"))
    strategy = magsdk.StrategyRegistry.require("FluxTransformer2DModel")()
    out: dict[str, Any] = {}
    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, mesh=mesh))
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    pipe.transformer.register_forward_pre_hook(count)
    loaded = LoadedModel(target="tiny FluxPipeline", transformer=pipe.transformer, pipeline=pipe)
    request = CalibrationRequest(steps=SPLIT_STEPS, prompts=PROMPTS, seeds=1, height=32, width=32)
    cases: list[tuple[str, LoadedModel, CalibrationSettings]] = [
        ("pipeline", loaded, resolve_settings(request, loaded)),
        ("driver", LoadedModel(target="tiny FluxPipeline", transformer=pipe.transformer),
         CalibrationSettings(kind="driver", steps=SPLIT_STEPS, seeds=SPLIT_SEEDS, driver=driver)),
    ]
    for name, target, settings in cases:
        calls = 0
        try:
            run_calibration(target, strategy, settings, progress=False)
            out[name] = {"error": None}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        out[name]["transformer_calls"] = calls
    out["driver"]["seeds_run"] = list(pipe.transformer.__dict__.get("seeds_run", []))

    model = tiny_flux()  # the synthetic loop on a bare context-parallel transformer
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, mesh=mesh))
    generations = 0

    def first_calls(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal generations
        timestep = kwargs.get("timestep")
        generations += int(isinstance(timestep, torch.Tensor) and float(timestep.max()) == 1.0)

    model.register_forward_pre_hook(first_calls, with_kwargs=True)
    try:
        run_calibration(LoadedModel(target="tiny FluxTransformer2DModel", transformer=model, weights="random weights"),
                        strategy, CalibrationSettings(kind="synthetic", steps=SPLIT_STEPS, seeds=SPLIT_SEEDS),
                        progress=False)
        out["synthetic"] = {"error": None}
    except Exception as exc:
        out["synthetic"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["synthetic"]["euler_generations"] = generations
    return out


def promises_worker(rank: int, world: int, out_dir: str, port: int, calibration: str, driver: str) -> None:
    """One rank of ``tests/test_doc_promises.py``: in the process group the CLI sets up from torchrun's
    environment, plans that differ in their curves or their scheduler's shift, the driver and synthetic-loop
    calibrations split across the ranks and, where diffusers has context parallelism, the drivers' refusal of
    context parallelism over part of the world."""
    import torch.distributed as dist

    from magsdk.config import CalibrationResult
    from magsdk.runtime.distributed import launched_process_group

    torch.set_num_threads(1)
    if hasattr(torch, "accelerator"):
        torch.accelerator.device_count = lambda: 1  # CPU-only: see the module docstring (tests only)
    path = Path(out_dir) / f"rank{rank}.pkl"
    out: dict[str, Any] = {}
    try:
        os.environ.update(torchrun_environment(rank, world, port))
        with launched_process_group("cpu") as size:
            out["size"] = size
            group = dist.group.WORLD
            settings = {"threshold": THRESHOLD, "max_skip_steps": 3, "retention_ratio": 0.2}
            curve = CURVE if rank % 2 == 0 else OTHER_CURVE
            out["curves_mismatch"] = _guarded(tiny_flux(), magsdk.MagCacheConfig(mag_ratios=curve, **settings), 1.0,
                                              group)
            measured = magsdk.MagCacheConfig(mag_ratios=CalibrationResult.model_validate_json(calibration), **settings)
            out["shift_mismatch"] = _guarded(tiny_flux(), measured, 1.0 if rank % 2 == 0 else 3.0, group)
            out["same_plan"] = _guarded(tiny_flux(), measured, 3.0, group)
            out["driver_split"] = _split_calibration("driver", driver)
            out["synthetic_split"] = _split_calibration("synthetic", None)
            if HAS_CONTEXT_PARALLEL:
                out["partial_cp"] = _partial_context_parallel_refusals(driver)
            else:
                out["cp_lacking"] = lacks(CONTEXT_PARALLEL)
    except BaseException:
        out["failed"] = traceback.format_exc()
    path.write_bytes(pickle.dumps(out))


def run_ranks_of(target: Any, world: int, tmp: Path, deadline_s: float, *args: Any) -> list[dict[str, Any]]:
    """Any worker ``target(rank, world, out_dir, port, *args)`` in ``world`` spawned
    processes, each writing ``rankR.pkl``; whatever still runs after ``deadline_s`` is killed (a hang)."""
    ctx = multiprocessing.get_context("spawn")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, str(tmp), port, *args), daemon=True) for r in range(world)]
    for proc in procs:
        proc.start()
    end = time.monotonic() + deadline_s
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))
    hung = [r for r, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    results = []
    for r in range(world):
        path = tmp / f"rank{r}.pkl"
        if r in hung:
            results.append({"failed": f"rank {r} still running after {deadline_s:.0f} s: killed (a hang)"})
        elif not path.exists():
            results.append({"failed": f"rank {r} exited with code {procs[r].exitcode} and wrote nothing"})
        else:
            results.append(pickle.loads(path.read_bytes()))
    return results
