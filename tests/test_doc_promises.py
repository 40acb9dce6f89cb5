"""Promises of docs/multi-gpu.md, docs/cli.md and docs/user-guide.md that no other test checks.

- multi-gpu.md, "What magsdk communicates": the plan guard's fingerprint covers the curves and the
  scheduler's timesteps, not only the settings and the step count (tests/test_distributed.py);
- multi-gpu.md, "Calibrating on N GPUs" / "Not supported": `--driver` functions and the synthetic loop
  split their seeds across the ranks like the pipeline driver, and every driver refuses context
  parallelism over part of the world;
- cli.md: `magsdk calibrate` refuses a model of another transformer class; `--call-arg` values are
  JSON (true CFG calibrates both branches); a malformed `--call-arg` is a usage error; `magsdk list`
  shows a module's own calibrations; `magsdk demo` reports digit-class accuracy on the bundled model;
- user-guide.md: `per_branch_curves=True` falls back to the "default" curve; the curve cache falls
  back to `~/.cache/magsdk/curves`.

The multi-process scenarios run in 4 gloo processes on CPU (``distributed_workers.promises_worker``),
each killed at a deadline, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_toys import isolated_cli_logging  # noqa: F401  (autouse fixture)
from diffusers import FlowMatchEulerDiscreteScheduler
from distributed_workers import (
    CURVE,
    OTHER_CURVE,
    SPLIT_SEEDS,
    STEPS,
    _split_calibration,
    calibrate_tiny,
    promises_worker,
    run_ranks_of,
)
from tiny_models import denoise, tiny_flux

import magsdk
from magsdk.calibration import curve_store
from magsdk.cli import main
from magsdk.codegen import read_calibrations
from magsdk.registry import StrategyRegistry

REPO = Path(__file__).resolve().parents[1]
WORLD = 4
DEADLINE_S = 150
TOLERANCE = 1e-5
SMALL = ("--height", "32", "--width", "32", "--device", "cpu")

#: A ``--driver`` function: one generation of the tiny loop, noting on the transformer which seed it ran.
DRIVER = textwrap.dedent(
    '''
    from tiny_models import denoise


    def generate(transformer, steps, seed):
        transformer.__dict__.setdefault("seeds_run", []).append(seed)
        denoise(transformer, steps, seed=seed)
    '''
)

needs_distributed = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available in this build"
)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())  # rich may wrap a long error


def curves_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest |difference| over every branch's norm ratios, stds and cosine distances (same branches)."""
    assert set(a["branches"]) == set(b["branches"])
    return max(abs(x - y) for name, branch in a["branches"].items()
               for key in ("norm_ratios", "norm_stds", "cos_dists")
               for x, y in zip(branch[key], b["branches"][name][key], strict=True))


# -- 1, 2. docs/multi-gpu.md: 4 gloo processes ---------------------------------------------------------
@pytest.fixture(scope="module")
def driver_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("driver") / "seed_driver.py"
    path.write_text(DRIVER)
    return f"{path}:generate"


@pytest.fixture(scope="module")
def measured() -> magsdk.CalibrationResult:
    """A curve from ``magsdk.calibrate`` with the scheduler known: it records its schedule (shift 1)."""
    result = calibrate_tiny(tiny_flux())
    assert result.schedule is not None and result.schedule.timesteps
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory, measured: magsdk.CalibrationResult,
          driver_spec: str) -> list[dict[str, Any]]:
    started = time.monotonic()
    results = run_ranks_of(promises_worker, WORLD, tmp_path_factory.mktemp("ranks"), DEADLINE_S,
                           measured.model_dump_json(), driver_spec)
    print(f"{WORLD} ranks ran every scenario in {time.monotonic() - started:.1f} s")
    for rank, result in enumerate(results):
        assert "failed" not in result, f"rank {rank}: {result['failed']}"
        assert result["size"] == WORLD
    return results


def assert_every_rank_raised(ranks: list[dict[str, Any]], scenario: str) -> str:
    """Every rank raised PlanMismatchError with the same message (none hung: DEADLINE_S); that message."""
    for rank, result in enumerate(ranks):
        assert result[scenario]["error"] is not None, f"rank {rank} did not raise: {result[scenario]}"
    message = ranks[0][scenario]["error"]
    assert all(r[scenario]["error"] == message for r in ranks)
    assert (f"the {WORLD} ranks that run transformer together (ranks [0, 1, 2, 3]) hold different cache plans "
            "for generation 0: ") in message
    assert "nothing was skipped" in message
    print(f"{scenario}: {message}")
    return message.split("generation 0: ")[1].split(". They would skip")[0]  # what differs


@needs_distributed
def test_ranks_with_different_curves_raise_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    # same threshold, K, retention and step count; only mag_ratios differ (even ranks CURVE, odd OTHER_CURVE)
    assert CURVE != OTHER_CURVE and len(CURVE) == len(OTHER_CURVE)
    differs = assert_every_rank_raised(ranks, "curves_mismatch")
    shown = [f"rank {r}: 1 calibration(s) (8 steps: default), digest " for r in range(WORLD)]
    assert differs.startswith(f"curves differ ({shown[0]}") and all(s in differs for s in shown)
    assert ";" not in differs  # nothing else differs
    digests = [part.split("digest ")[1].split(",")[0].rstrip(")") for part in differs.split("rank ")[1:]]
    assert digests[0] == digests[2] != digests[1] == digests[3]  # even ranks agree, odd ranks agree


@needs_distributed
def test_ranks_whose_schedulers_differ_in_shift_raise(ranks: list[dict[str, Any]]) -> None:
    # the same measured curve (it records its schedule) on every rank; shift 1 on even ranks, 3 on odd ones
    differs = assert_every_rank_raised(ranks, "shift_mismatch")
    assert differs.startswith("schedule differ (rank 0: 8 timesteps 1000 .. ")
    assert ";" not in differs  # nothing else differs: not the curves, the settings or the step count
    shown = [part.split(": ", 1)[1].rstrip(", )") for part in differs.split("rank ")[1:]]
    assert shown[0] == shown[2] == "8 timesteps 1000 .. 1" != shown[1] == shown[3]  # shift 1 / shift 3
    # the same plan (shift 3 everywhere) passes the guard: one check per generation, and the cache skips
    for result in ranks:
        same = result["same_plan"]
        assert same["error"] is None and same["checks"] == 2
        assert same["skipped"] > 0 and same["computed"] + same["skipped"] == 2 * 2 * STEPS  # 2 generations x CFG


@needs_distributed
@pytest.mark.parametrize("kind", ["driver", "synthetic"])
def test_driver_and_synthetic_loop_split_their_seeds_across_ranks(
    ranks: list[dict[str, Any]], driver_spec: str, kind: str
) -> None:
    """Rank r of N runs seeds r, r + N, ...; every rank gets the curve one process measures over all seeds."""
    scenario = f"{kind}_split"
    for rank, result in enumerate(ranks):
        assert result[scenario]["seeds"] == list(range(rank, SPLIT_SEEDS, WORLD)), rank
    alone = _split_calibration(kind, driver_spec if kind == "driver" else None)  # this process, no group
    assert alone["seeds"] == list(range(SPLIT_SEEDS))
    for rank, result in enumerate(ranks):
        merged = result[scenario]["result"]
        diff = curves_diff(merged, alone["result"])
        print(f"rank {rank}: {kind} calibration split over {WORLD} ranks vs one process, max |diff| {diff:.2e}")
        assert diff <= TOLERANCE
        assert {b["num_runs"] for b in merged["branches"].values()} == {SPLIT_SEEDS}
        assert curves_diff(merged, ranks[0][scenario]["result"]) == 0.0  # every rank holds the same result


@needs_distributed
@pytest.mark.parametrize("driver", ["pipeline", "driver", "synthetic"])
def test_drivers_refuse_context_parallelism_over_part_of_the_world(ranks: list[dict[str, Any]], driver: str) -> None:
    if "cp_lacking" in ranks[0]:
        pytest.skip(ranks[0]["cp_lacking"])
    for rank, result in enumerate(ranks):
        outcome = result["partial_cp"][driver]
        assert outcome["error"] is not None, f"rank {rank}: {driver} ran instead of refusing"
        assert outcome["error"].startswith(
            "UsageError: the transformer is context-parallel over 2 of 4 ranks; magsdk's calibration drivers split "
            "runs across the whole world only."), outcome["error"]
        assert "drive `magsdk.calibrate(pipe, data_group=...)` yourself" in outcome["error"]
        # refused before any generation ran
        if driver == "synthetic":
            assert outcome["euler_generations"] == 0
        else:
            assert outcome["transformer_calls"] == 0
        if driver == "driver":
            assert outcome["seeds_run"] == []


# -- 3, 4, 6. docs/cli.md: calibrate, --call-arg, list -------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from magsdk.reference.components import build_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-flux-pipeline"
    build_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a handwritten digit seven\n")
    return path


@pytest.fixture(autouse=True)
def _no_mypy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGSDK_SKIP_MYPY", "1")  # tests/test_scaffold.py checks generated modules with mypy


@pytest.fixture(scope="module")
def true_cfg_module(tmp_path_factory: pytest.TempPathFactory, pipeline_folder: Path,
                    prompts_file: Path) -> Iterator[tuple[Path, int]]:
    """A copy of the bundled Flux strategy in a project's ``strategies/`` folder, calibrated by the CLI with
    ``--call-arg true_cfg_scale=4 --call-arg negative_prompt='""'`` (as docs/cli.md writes it)."""
    project = tmp_path_factory.mktemp("project")
    module = project / "strategies" / "my_flux.py"
    module.parent.mkdir()
    shutil.copyfile(REPO / "strategies" / "flux.py", module)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAGSDK_SKIP_MYPY", "1")
        code = main(["calibrate", str(module), "--model", str(pipeline_folder), "--steps", "3", "--seeds", "1",
                     "--prompts", str(prompts_file), *SMALL,
                     "--call-arg", "true_cfg_scale=4", "--call-arg", 'negative_prompt=""'])
    yield module, code


def test_calibrate_refuses_a_model_of_another_transformer_class(
    pipeline_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "wan_copy.py"
    shutil.copyfile(REPO / "strategies" / "wan.py", module)
    before = module.read_bytes()
    code, out, err = run(capsys, "calibrate", str(module), "--model", str(pipeline_folder), "--steps", "3", *SMALL)
    assert code == 2 and out == "", err  # refused before calibration started (it prints its settings first)
    assert "holds a FluxTransformer2DModel, but wan_copy.py (WanStrategy) is for WanTransformer3DModel" in err
    assert "point --model at the model the strategy was made for" in err
    assert module.read_bytes() == before


def test_call_arg_values_are_json_and_calibrate_both_cfg_branches(true_cfg_module: tuple[Path, int]) -> None:
    module, code = true_cfg_module
    assert code == 0
    (entry,) = read_calibrations(module.read_text())
    assert entry["num_steps"] == 3
    assert set(entry["branches"]) == {"cond", "uncond"}  # true CFG: both branches measured
    assert all(len(curve) == 3 and curve[0] == 1.0 for curve in entry["branches"].values())
    settings = entry["settings"]
    assert settings["true_cfg_scale"] == 4 and type(settings["true_cfg_scale"]) is int  # JSON 4, not the string "4"
    assert settings["negative_prompt"] == ""  # JSON "" (the shell's '""'), not two quote characters


def test_a_malformed_call_arg_is_a_usage_error(
    pipeline_folder: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "flux_copy.py"
    shutil.copyfile(REPO / "strategies" / "flux.py", module)
    before = module.read_bytes()
    base = ["calibrate", str(module), "--model", str(pipeline_folder), "--steps", "3", "--prompts", str(prompts_file),
            *SMALL]
    for item in ("true_cfg_scale", "=4", "two words=1"):
        code, out, err = run(capsys, *base, "--call-arg", item)
        assert code == 2 and out == "", (item, err)
        assert f"--call-arg {item!r}: expected KEY=VALUE with KEY a keyword of the pipeline call" in err
    code, out, err = run(capsys, *base, "--call-arg", "no_such_argument=1")
    assert code == 2 and out == "", err
    assert "--call-arg no_such_argument: FluxPipeline.__call__ has no parameter 'no_such_argument'" in err
    assert module.read_bytes() == before


def test_list_shows_a_modules_calibrations_as_own_calibrations(
    true_cfg_module: tuple[Path, int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module, code = true_cfg_module
    assert code == 0
    monkeypatch.chdir(module.parent.parent)  # ./strategies/ of the working directory holds the calibrated copy
    with StrategyRegistry.isolated():
        assert main(["list"]) == 0
        out = capsys.readouterr().out
        assert main(["list", "--json"]) == 0
        rows = {r["transformer_cls_name"]: r for r in json.loads(capsys.readouterr().out) if not r["shadowed_by"]}
    own = [line for line in out.splitlines() if "(own calibrations)" in line]
    assert len(own) == 1, out
    cells = [cell.strip() for cell in own[0].split("│")]
    assert cells[1:5] == ["(own calibrations)", "-", "3", "cond, uncond"]
    assert cells[5].startswith("magsdk.calibrate on ") and "used before any variant" in own[0]
    flux = rows["FluxTransformer2DModel"]
    assert flux["module"].endswith("my_flux.py")  # the file, not its internal module name
    assert [(c["num_steps"], c["branches"]) for c in flux["calibrations"]] == [(3, ["cond", "uncond"])]
    assert "flux.1-dev" in [v["name"] for v in flux["variants"]]  # the variants are still listed after them

    monkeypatch.chdir(module.parent)  # no ./strategies/ here: the bundled module, which has no own calibrations
    with StrategyRegistry.isolated():
        assert main(["list"]) == 0
    assert "(own calibrations)" not in capsys.readouterr().out


# -- 5. docs/cli.md: magsdk demo -----------------------------------------------------------------------
def test_demo_reports_digit_class_accuracy_on_the_bundled_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "digits.txt"
    prompts.write_text("a handwritten digit three\na handwritten digit seven\na handwritten digit zero\n")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "10", "--rounds", "1", "--prompts", str(prompts),
                 "--threshold", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "class accuracy" in printed
    result = json.loads((out / "demo-result.json").read_text())
    assert result["model"].endswith("flux-digits")
    uncached, cached = result["rows"]
    assert cached["computed_calls"] < cached["transformer_calls"]  # the cache skipped: two different image sets
    for row in (uncached, cached):
        accuracy = row["class_accuracy"]
        assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
        assert accuracy * 3 == pytest.approx(round(accuracy * 3))  # a share of the 3 images
        assert f"{accuracy:.0%}" in printed
    # the bundled, trained model draws the prompted digits (its training run measured 100% at CFG 2-6)
    assert uncached["class_accuracy"] >= 2 / 3


# -- 6. docs/user-guide.md ----------------------------------------------------------------------------
def test_per_branch_curves_fall_back_to_the_default_curve() -> None:
    """pass0 has its own curve; pass1 has none and follows "default" (not the curve at its position, pass0's)."""
    steps = 12
    own = [1.0] + [0.9] * (steps - 1)
    default = [1.0] * steps
    model = tiny_flux(layers=1, single_layers=1)
    scheduler = FlowMatchEulerDiscreteScheduler()
    config = magsdk.MagCacheConfig(mag_ratios={"default": default, "pass0": own}, per_branch_curves=True,
                                   threshold=0.24, max_skip_steps=5, retention_ratio=0.1)
    with magsdk.enable(model, config, scheduler=scheduler) as handle:
        denoise(model, steps, cfg=True, scheduler=scheduler)
    expected = {name: magsdk.plan(curve, config, steps).computed_steps for name, curve in
                (("own", own), ("default", default))}
    assert expected["own"] != expected["default"]
    assert handle.stats.computed_steps("pass0") == expected["own"]
    assert handle.stats.computed_steps("pass1") == expected["default"]
    assert "taken by call position" not in handle.stats.curves["transformer:pass1"]


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="~/.cache is the user cache folder on Linux")
def test_curve_cache_falls_back_to_dot_cache_in_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.delenv(curve_store.CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    steps = 6
    model = tiny_flux(layers=1, single_layers=1)
    with magsdk.enable(model, magsdk.MagCacheConfig(auto_calibrate=True, num_inference_steps=steps)):
        denoise(model, steps)
    folder = home / ".cache" / "magsdk" / "curves"
    assert curve_store.curves_dir() == folder
    (path,) = folder.iterdir()
    assert path.name.startswith(f"FluxTransformer2DModel-{steps}steps-16tok-") and path.suffix == ".json"
    [(found, record)] = curve_store.records()
    assert found == path and len(record.result.branches["pass0"].norm_ratios) == steps
