"""`magsdk demo` end to end on a small real FluxPipeline folder (random weights, so quality is not judged)."""

from __future__ import annotations

import json

import pytest

from magsdk.cli import main


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    from magsdk.reference.components import build_pipeline

    folder = tmp_path_factory.mktemp("pipe")
    build_pipeline(seed=0).save_pretrained(folder)
    return folder


def test_demo_runs_every_stage_and_writes_the_grid(pipeline_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit seven\na handwritten digit one\n")
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(pipeline_folder), "--out", str(out), "--steps", "8",
                 "--prompts", str(prompts)]) == 0
    printed = capsys.readouterr().out
    assert "uncached" in printed and "magsdk" in printed
    result = json.loads((out / "demo-result.json").read_text())
    uncached, cached = result["rows"]
    assert uncached["computed_calls"] == uncached["transformer_calls"] == 16  # 8 steps x (cond, uncond)
    assert cached["transformer_calls"] == 16 and cached["computed_calls"] < 16
    assert cached["psnr_db"] > 20 and 0 < cached["ssim"] <= 1
    assert (out / "demo-grid.png").stat().st_size > 0
    assert (out / "strategies" / "demo_strategy.py").exists()


def test_demo_rejects_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err
