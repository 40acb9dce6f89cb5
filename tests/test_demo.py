"""`magsdk demo` end to end: on a small real FluxPipeline folder (random weights, so quality is not
judged) and on the bundled, trained reference (whose scaffold must give the demo's curve)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from magsdk.cli import main
from magsdk.codegen import read_calibrations
from magsdk.reference import DEFAULT_PROMPTS, reference_model_path

#: Recorded call settings for the test pipeline, as a model folder may carry them.
CALL_SETTINGS = {"height": 32, "width": 32, "true_cfg_scale": 4.0, "negative_prompt": "", "max_sequence_length": 16}


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from magsdk.reference.components import build_pipeline

    folder = tmp_path_factory.mktemp("pipe")
    build_pipeline(seed=0).save_pretrained(folder)
    (folder / "magsdk.json").write_text(json.dumps(CALL_SETTINGS))
    return folder


@pytest.fixture(autouse=True)
def _no_mypy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGSDK_SKIP_MYPY", "1")  # tests/test_scaffold.py checks generated modules with mypy


def test_demo_times_interleaved_rounds_and_writes_a_labelled_grid(
    pipeline_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit seven\na handwritten digit one\n")
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(pipeline_folder), "--out", str(out), "--steps", "8",
                 "--prompts", str(prompts), "--rounds", "5"]) == 0
    printed = capsys.readouterr().out
    assert "uncached" in printed and "medians of 5 interleaved rounds after a warm-up" in printed
    result = json.loads((out / "demo-result.json").read_text())
    assert result["rounds"] == 5 and result["warmup"]
    assert result["call_settings"] == {**CALL_SETTINGS, "num_inference_steps": 8, "guidance_scale": 3.5}
    uncached, cached = result["rows"]
    assert uncached["computed_calls"] == uncached["transformer_calls"] == 16  # 8 steps x (cond, uncond)
    assert cached["transformer_calls"] == 16 and cached["computed_calls"] < 16
    for row in (uncached, cached):
        assert len(row["rounds_seconds"]) == 5 and row["seconds"] == statistics.median(row["rounds_seconds"])
    assert cached["speedup"] == pytest.approx(uncached["seconds"] / cached["seconds"])
    assert cached["call_ratio"] == pytest.approx(16 / cached["computed_calls"])
    assert cached["speedup_is_noise"] == (cached["speedup"] > cached["call_ratio"])
    if cached["speedup_is_noise"]:
        assert "noise" in printed
    assert cached["psnr_db"] > 20 and 0 < cached["ssim"] <= 1
    assert (out / "strategies" / "demo_strategy.py").exists()

    grid = Image.open(out / "demo-grid.png").convert("L")
    # A title, a header row and one row per prompt: taller than the two images alone, with text
    # (dark pixels) in the label column left of the first image.
    assert grid.height > 2 * 128 and grid.width > 3 * 128
    label_column = grid.crop((0, 0, 200, grid.height))
    assert min(label_column.getdata()) < 100


def test_bad_settings_are_refused_before_anything_runs_or_is_written(
    pipeline_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    cases = [
        (["--threshold", "-1"], "--threshold -1.0"),
        (["-k", "-2"], "--max-skip-steps/-k -2"),
        (["--retention-ratio", "1.5"], "--retention-ratio 1.5"),
        (["--rounds", "0"], "--rounds"),
        (["--steps", "1"], "--steps"),
    ]
    for extra, message in cases:
        for debug in ([], ["--debug"]):
            assert main([*debug, "demo", "--model", str(pipeline_folder), "--out", str(out), *extra]) == 2, extra
            err = capsys.readouterr().err
            assert message in err, err
            assert ("Traceback" in err) == bool(debug)
    assert not out.exists()


def test_demo_rejects_a_folder_that_is_not_a_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_scaffold_on_the_bundled_reference_gives_the_demos_curve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both read the folder's recorded settings (16 text tokens, true CFG, 32x32): same calls, same curve."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--rounds", "1"]) == 0
    demo_entry = read_calibrations((tmp_path / "demo" / "strategies" / "demo_strategy.py").read_text())[0]
    prompts = tmp_path / "digits.txt"
    prompts.write_text("\n".join(DEFAULT_PROMPTS) + "\n")
    capsys.readouterr()
    assert main(["scaffold", "--model", str(reference_model_path()), "--out", str(tmp_path / "mine"), "--steps", "4",
                 "--seeds", "2", "--prompts", str(prompts), "--no-test"]) == 0
    printed = capsys.readouterr().out
    assert "max_sequence_length=16" in printed and "reference.json in the model folder" in printed
    (entry,) = read_calibrations((tmp_path / "mine" / "flux_digits.py").read_text())
    assert entry["settings"]["max_sequence_length"] == 16 and entry["settings"]["true_cfg_scale"] == 3.0
    assert entry["settings"]["height"] == entry["settings"]["width"] == 32
    assert set(entry["branches"]) == {"cond", "uncond"}  # true CFG: both branches calibrated
    assert entry["branches"] == demo_entry["branches"] and entry["settings"] == demo_entry["settings"]
