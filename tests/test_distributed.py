"""magsdk under torch.distributed: 2 gloo processes on CPU (docs/multi-gpu.md).

One spawn of two ranks runs every scenario in ``distributed_workers`` in turn (starting
processes is the expensive part). Each process first computes the single-process references,
alone, before its process group exists; then it sets the group up from torchrun's environment as
``magsdk calibrate`` does. Each rank is killed at a deadline, so a hang fails the tests within
minutes instead of stalling CI.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_workers import PROMPTS, run_ranks
from tiny_models import tiny_flux

import magsdk
from magsdk.codegen.literal import DECIMALS

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available in this build"
)

WORLD = 2
DEADLINE_S = 150
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny FluxPipeline, 4 prompts and a copy of the bundled Flux strategy to calibrate."""
    from magsdk.reference.components import build_pipeline

    tmp = tmp_path_factory.mktemp("cli")
    folder = tmp / "tiny-pipeline"
    build_pipeline(seed=0).save_pretrained(folder)
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    module = tmp / "flux_copy.py"
    module.write_text((Path(__file__).parents[1] / "strategies" / "flux.py").read_text())
    return {"folder": folder, "prompts": prompts, "module": module}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory, cli_files: dict[str, Path]) -> list[dict[str, Any]]:
    cli_args = ["calibrate", str(cli_files["module"]), "--model", str(cli_files["folder"]), "--steps", "4",
                "--seeds", "2", "--prompts", str(cli_files["prompts"]), "--height", "32", "--width", "32",
                "--device", "cpu"]
    started, spawned = time.monotonic(), time.time()
    results = run_ranks(WORLD, tmp_path_factory.mktemp("ranks"), DEADLINE_S, cli_args)
    print(f"2 ranks ran every scenario in {time.monotonic() - started:.1f} s")
    for rank, result in enumerate(results):
        stamps = result.get("seconds", {})
        phases, last = [f"start and imports {stamps.get('started', spawned) - spawned:.1f} s"], stamps.get("started")
        for name in ("references", "cli", "scenarios"):
            if name in stamps and last is not None:
                phases.append(f"{name} {stamps[name] - last:.1f} s")
                last = stamps[name]
        print(f"rank {rank}: " + ", ".join(phases))
    for rank, result in enumerate(results):
        assert "failed" not in result, f"rank {rank}: {result['failed']}"
    return results


@pytest.fixture(scope="module")
def reference(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The single-process results (each process computed them alone; they agree)."""
    first, second = (r["reference"] for r in ranks)
    assert max_diff(first["calibration"], second["calibration"]) == 0.0
    assert max_diff(first["dp_calibration"], second["dp_calibration"]) == 0.0
    return first


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest |difference| over every branch's norm ratios, stds and cosine distances."""
    assert set(a["branches"]) == set(b["branches"])
    worst = 0.0
    for name, branch in a["branches"].items():
        other = b["branches"][name]
        for key in ("norm_ratios", "norm_stds", "cos_dists", "probes"):
            assert len(branch[key]) == len(other[key]), (name, key)
            if not branch[key]:
                continue
            worst = max(worst, max(abs(x - y) for x, y in zip(branch[key], other[key], strict=True)))
    return worst


def skip_without_context_parallelism(ranks: list[dict[str, Any]]) -> None:
    """The workers ran the context-parallel scenarios only where diffusers has context parallelism."""
    if "cp_lacking" in ranks[0]:
        pytest.skip(ranks[0]["cp_lacking"])


def test_context_parallel_calibration_equals_single_process(
    ranks: list[dict[str, Any]], reference: dict[str, Any]
) -> None:
    skip_without_context_parallelism(ranks)
    single = reference["calibration"]
    assert set(single["branches"]) == {"pass0", "pass1"}  # CFG: two branches, both reduced
    for rank, result in enumerate(ranks):
        cp = result["cp_calibration"]
        diff = max_diff(cp, single)
        print(f"rank {rank}: context-parallel calibration vs single process, max |diff| {diff:.2e}")
        assert diff <= TOLERANCE
        for name, branch in cp["branches"].items():
            assert branch["timesteps"] == single["branches"][name]["timesteps"]
            assert branch["num_runs"] == single["branches"][name]["num_runs"] == 2
        # each rank saw half of the 16 image tokens; the schedule records the whole sequence's size
        assert cp["schedule"] == single["schedule"] and single["schedule"]["image_tokens"] == 16
    assert max_diff(ranks[0]["cp_calibration"], ranks[1]["cp_calibration"]) == 0.0  # reduced: identical
    probed = reference["calibration_probed"]
    assert all(len(b["probes"]) == 2 * (len(b["norm_ratios"]) - 1) for b in probed["branches"].values())
    for rank, result in enumerate(ranks):  # the probes' sums are reduced over the sequence too
        diff = max_diff(result["cp_calibration_probed"], probed)
        print(f"rank {rank}: context-parallel calibration with probes vs single process, max |diff| {diff:.2e}")
        assert diff <= TOLERANCE
    unreduced = [max_diff(r["cp_unreduced"], single) for r in ranks]
    print(f"without the reduction (parallel_group=None), each rank's curve vs single process: max |diff| "
          f"{', '.join(f'{d:.2e}' for d in unreduced)}")
    assert min(unreduced) > 100 * TOLERANCE  # the test would see a missing reduction


def test_ranks_of_one_sequence_count_once_in_a_data_group(ranks: list[dict[str, Any]]) -> None:
    skip_without_context_parallelism(ranks)
    for result in ranks:
        both = result["cp_dp_calibration"]
        assert max_diff(both, result["cp_calibration"]) == 0.0
        assert {b["num_runs"] for b in both["branches"].values()} == {2}  # not 4: one sequence, two ranks


def test_context_parallel_runtime_equals_single_process(
    ranks: list[dict[str, Any]], reference: dict[str, Any]
) -> None:
    skip_without_context_parallelism(ranks)
    alone = reference["runtime"]
    assert alone["skipped"] > 0 and alone["computed"] > 0
    for rank, result in enumerate(ranks):
        run = result["cp_runtime"]
        assert run["records"] == alone["records"]
        assert (run["computed"], run["skipped"]) == (alone["computed"], alone["skipped"])
        diff = max(float((a - b).abs().max()) for a, b in zip(run["outputs"], alone["outputs"], strict=True))
        print(f"rank {rank}: cached output under context parallelism vs single process, max |diff| {diff:.2e}")
        assert diff <= TOLERANCE
        assert run["guard_checks"] == 2  # one check per generation, none per step
        print(f"rank {rank}: {run['computed']} computed / {run['skipped']} skipped calls (one process: "
              f"{alone['computed']} / {alone['skipped']}), {run['guard_checks']} guard checks")
    assert alone["guard_checks"] is None  # one process: no guard, no collective


@pytest.mark.parametrize("scenario", ["cp_mismatch", "explicit_mismatch"])
def test_mismatched_plans_raise_on_every_rank(ranks: list[dict[str, Any]], scenario: str) -> None:
    if scenario.startswith("cp_"):
        skip_without_context_parallelism(ranks)
    for rank, result in enumerate(ranks):
        outcome = result[scenario]
        assert outcome["error"] is not None, f"rank {rank} did not raise"
        print(f"rank {rank}: {scenario} raised after {outcome['seconds']:.1f} s")  # a hang is killed at DEADLINE_S
        message = outcome["error"]
        assert "hold different cache plans for generation 0" in message
        assert "rank 0:" in message and "rank 1:" in message
    if scenario == "cp_mismatch":
        assert "threshold differs (rank 0: 0.1, rank 1: 0.3)" in ranks[0][scenario]["error"]
        assert "steps differ" not in ranks[0][scenario]["error"] and "max_skip_steps" not in ranks[0][scenario]["error"]
    else:
        assert "steps differ (rank 0: 8, rank 1: 10)" in ranks[1][scenario]["error"]
    assert ranks[0][scenario]["error"] == ranks[1][scenario]["error"]


def test_data_parallel_inference_has_no_collective(ranks: list[dict[str, Any]]) -> None:
    # rank 1 ran one generation more than rank 0 and neither hung: no guard without a shared transformer
    assert [r["dp_inference"]["guard"] for r in ranks] == [False, False]
    calls = [r["dp_inference"]["computed"] + r["dp_inference"]["skipped"] for r in ranks]
    assert calls[1] == 2 * calls[0]


def test_data_parallel_calibration_with_an_idle_rank(ranks: list[dict[str, Any]]) -> None:
    first, second = (r["dp_idle_rank"] for r in ranks)
    assert max_diff(first, second) == 0.0 and first["branches"]["pass0"]["num_runs"] == 1


def test_a_failing_rank_stops_the_others(ranks: list[dict[str, Any]]) -> None:
    failed, waiting = ranks[1]["dp_failure"], ranks[0]["dp_failure"]
    assert failed["error"] == "RuntimeError: stopped at step 3"  # its own error, unchanged
    assert waiting["error"] is not None, waiting
    print(f"rank 0 stopped after {waiting['seconds']:.1f} s")  # a hang is killed at DEADLINE_S
    assert waiting["error"].startswith("DistributedCalibrationError: calibration failed on rank 1: RuntimeError: "
                                       "stopped at step 3. Every rank stops; nothing was written.")


def test_data_parallel_calibration_equals_single_process(
    ranks: list[dict[str, Any]], reference: dict[str, Any]
) -> None:
    # the ranks split prompts x seeds as (p0 s0, p1 s0, ...) and (p0 s1, p1 s1, ...): another order of the runs
    alone = reference["dp_calibration"]
    for rank, result in enumerate(ranks):
        dp = result["dp_calibration"]
        diff = max_diff(dp, alone)
        print(f"rank {rank}: data-parallel calibration (4 prompts x 2 seeds on 2 ranks) vs single process, "
              f"max |diff| {diff:.2e}, {result['dp_calibration_seconds']:.1f} s")
        assert diff <= TOLERANCE
        for name, branch in dp["branches"].items():
            ref = alone["branches"][name]
            assert branch["num_runs"] == ref["num_runs"] == 8
            assert max(abs(a - b) for a, b in zip(branch["norm_ratio_spread"], ref["norm_ratio_spread"],
                                                  strict=True)) <= TOLERANCE
        assert dp["schedule"] == alone["schedule"]


def test_torchrun_device_must_leave_the_gpu_choice_to_each_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    from magsdk.runtime.distributed import launched_process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(magsdk.UsageError, match=r"--device cuda:1: under torchrun every rank uses its own GPU"):
        with launched_process_group("cuda:1"):
            pass
    monkeypatch.setenv("WORLD_SIZE", "1")
    with launched_process_group("cuda:1") as size:  # one process: nothing to set up
        assert size == 1 and not torch.distributed.is_initialized()


def test_group_arguments_are_checked() -> None:
    model = tiny_flux()
    with pytest.raises(magsdk.UsageError, match="parallel_group='world'"):
        magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=[1.0] * 4), parallel_group="world")
    with pytest.raises(magsdk.UsageError, match=r"torch\.distributed is not initialised"):
        magsdk.calibrate(model, data_group=object())


def test_torchrun_calibrate_equals_single_process(
    ranks: list[dict[str, Any]], reference: dict[str, Any], cli_files: dict[str, Path]
) -> None:
    """``python -m magsdk calibrate`` in each of 2 processes with torchrun's environment (what
    ``torchrun --nproc-per-node 2 -m magsdk calibrate ...`` runs, without the launcher): the group the
    command sets up (gloo on CPU, torn down at the end), the runs split, and rank 0 alone reporting and
    writing the single-process curve."""
    from magsdk.codegen.patch import read_calibrations

    for rank, result in enumerate(ranks):
        assert result["group"] == {"size": 2, "backend": "gloo", "destroyed": True}
        assert result["cli"]["code"] in (0, None), result["cli"]["stdout"][-3000:]
        print(f"rank {rank}: magsdk calibrate under torchrun's environment, {result['cli']['seconds']:.1f} s")
    assert ranks[0]["cli"]["stdout"].count("added the 4-step calibration") == 1
    assert ranks[1]["cli"]["stdout"] == ""  # rank 0 speaks for all

    [written] = [e for e in read_calibrations(cli_files["module"].read_text()) if e["num_steps"] == 4]
    assert written["num_prompts"] == 4 and written["num_seeds"] == 2
    alone = reference["dp_calibration"]
    assert set(written["branches"]) == set(alone["branches"])
    diff = max(abs(a - b) for name, curve in written["branches"].items()
               for a, b in zip(curve, alone["branches"][name]["norm_ratios"], strict=True))
    print(f"magsdk calibrate on 2 ranks (as written, {DECIMALS} decimals) vs single process, max |diff| {diff:.2e}")
    assert diff <= TOLERANCE
    assert written["schedule"]["image_tokens"] == alone["schedule"]["image_tokens"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_torchrun_with_device_cuda_and_no_gpu_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torchrun --nproc-per-node 2 -m magsdk calibrate ... --device cuda`` on a CPU machine ended in
    ``AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'`` on every rank."""
    from magsdk.runtime.distributed import initialized, launched_process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(magsdk.UsageError, match=r"--device cuda: no CUDA device is available here .* leave --device "
                       r"out to run the ranks on the CPU \(gloo\)"):
        with launched_process_group("cuda"):
            pass
    assert not initialized()  # refused before any process group was started
