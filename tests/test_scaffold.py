"""`magsdk scaffold` / `magsdk calibrate` end to end on a real FluxPipeline saved to a folder.

The pipeline is built from real diffusers / transformers classes with random weights
(``magsdk.reference.components``), saved with ``save_pretrained`` and loaded back by the CLI.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import MagCacheConfig as DiffusersMagCacheConfig
from diffusers.hooks import apply_mag_cache

import magsdk
from magsdk.calibration import pipeline_call_kwargs
from magsdk.cli import main
from magsdk.codegen import import_from_path, isolated_registry, read_calibrations
from magsdk.codegen.patch import strip_calibrations
from magsdk.reference.components import build_pipeline
from magsdk.registry import discover_strategies

PROMPT = "a handwritten digit seven"
STEPS = 6


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline")
    build_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(f"# calibration prompts\n{PROMPT}\n")
    return path


def scaffold_args(folder: Path, out: Path, prompts: Path, *extra: str) -> list[str]:
    return ["scaffold", "--model", str(folder), "--out", str(out), "--steps", str(STEPS), "--seeds", "1",
            "--prompts", str(prompts), *extra]


@pytest.fixture(scope="module")
def scaffolded(pipeline_folder: Path, prompts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("strategies")
    assert main(scaffold_args(pipeline_folder, out, prompts_file, "--plot", str(out / "curve.png"))) == 0
    return out


def diffusers_calibration(folder: Path, capsys: pytest.CaptureFixture[str]) -> list[float]:
    """The ratios diffusers' own MagCacheConfig(calibrate=True) prints for the same call."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    apply_mag_cache(pipe.transformer, DiffusersMagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    capsys.readouterr()
    with torch.no_grad():
        pipe(**pipeline_call_kwargs(pipe, PROMPT, 0, STEPS, None, None))
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if "[MagCache] Calibration Complete" in line)
    values = ast.literal_eval(lines[header + 1])
    assert isinstance(values, list) and len(values) == STEPS
    return [float(v) for v in values]


def test_scaffold_writes_a_module_that_enables_and_matches_diffusers_calibration(
    scaffolded: Path, pipeline_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module_path = scaffolded / "flux.py"
    assert (scaffolded / "tests" / "test_flux.py").is_file()
    assert (scaffolded / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    discover_strategies()
    with isolated_registry():
        module = import_from_path(module_path)
        entry = module.FluxStrategy.calibrations[0]
        assert entry.num_steps == STEPS and entry.num_prompts == 1 and entry.num_seeds == 1
        assert entry.scheduler == "FlowMatchEulerDiscreteScheduler" and entry.shape == "32x32"
        assert not entry.synthetic and entry.diffusers_version is not None
        assert list(entry.branches) == ["cond"]  # FluxPipeline names its context "cond"
        assert len(entry.timesteps) == STEPS and entry.spread["cond"] == [0.0] * STEPS

        pipe = DiffusionPipeline.from_pretrained(pipeline_folder)
        pipe.set_progress_bar_config(disable=True)
        with magsdk.enable(pipe) as handle, torch.no_grad():
            assert type(handle.strategy) is module.FluxStrategy  # enable(pipe) picked the generated strategy
            pipe(**pipeline_call_kwargs(pipe, PROMPT, 0, STEPS, None, None))
            assert handle.stats.total_calls == STEPS

    theirs = diffusers_calibration(pipeline_folder, capsys)
    ours = entry.branches["cond"]
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-4, (ours, theirs)


@pytest.mark.slow
def test_generated_test_passes(scaffolded: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(scaffolded / "tests" / "test_flux.py")],
        capture_output=True, text=True, timeout=300, cwd=scaffolded,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_scaffold_twice_gives_identical_files(scaffolded: Path, pipeline_folder: Path, prompts_file: Path) -> None:
    module, test = scaffolded / "flux.py", scaffolded / "tests" / "test_flux.py"
    before = module.read_bytes(), test.read_bytes()
    assert main(scaffold_args(pipeline_folder, scaffolded, prompts_file)) == 0
    assert (module.read_bytes(), test.read_bytes()) == before


def test_scaffold_refuses_to_overwrite_an_edited_module(
    scaffolded: Path, pipeline_folder: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(scaffolded, out)
    edited = (out / "flux.py").read_text().replace("threshold = 0.06", "threshold = 0.1")
    (out / "flux.py").write_text(edited)
    assert main(scaffold_args(pipeline_folder, out, prompts_file)) == 2
    assert "magsdk calibrate" in capsys.readouterr().err
    assert (out / "flux.py").read_text() == edited


def test_calibrate_adds_an_entry_and_keeps_hand_edits(
    scaffolded: Path, pipeline_folder: Path, prompts_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "flux.py"
    original = (scaffolded / "flux.py").read_text()
    edited = original.replace("class FluxStrategy", "# tuned for our renders\nclass FluxStrategy").replace(
        "threshold = 0.06", "threshold = 0.12")
    path.write_text(edited)
    args = ["calibrate", str(path), "--model", str(pipeline_folder), "--steps", "4", "--seeds", "1",
            "--prompts", str(prompts_file)]
    assert main(args) == 0
    patched = path.read_text()
    assert "# tuned for our renders\nclass FluxStrategy" in patched and "threshold = 0.12" in patched
    assert strip_calibrations(patched) == strip_calibrations(edited)
    entries = read_calibrations(patched)
    assert [e["num_steps"] for e in entries] == [4, STEPS]
    six = original[original.index('    {\n        "num_steps": 6'):original.index("\n]\n")]
    assert six in patched  # the existing entry is kept byte for byte
    assert main(args) == 0  # refreshing the same step count changes nothing when nothing changed
    assert path.read_text() == patched


def test_calibrate_reports_invalid_python_and_leaves_the_file(
    pipeline_folder: Path, tmp_path: Path, scaffolded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "flux.py"
    broken = (scaffolded / "flux.py").read_text().replace("class FluxStrategy(MagCacheStrategy):", "class Flux(:")
    path.write_text(broken)
    assert main(["calibrate", str(path), "--model", str(pipeline_folder), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "not valid Python" in err and "Traceback" not in err
    assert path.read_text() == broken


# -- bad input: a clear message, an exit code, and no file written ---------------------------------
def _no_files(folder: Path) -> bool:
    return not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))


def test_bad_inputs(
    pipeline_folder: Path, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    no_transformer = tmp_path / "no_transformer"
    no_transformer.mkdir()
    index = (pipeline_folder / "model_index.json").read_text().replace('"transformer"', '"not_a_transformer"')
    (no_transformer / "model_index.json").write_text(index)
    empty_prompts = tmp_path / "empty.txt"
    empty_prompts.write_text("\n# only a comment\n")
    cases = [
        (scaffold_args(no_transformer, out, prompts_file), 2, "has no transformer"),
        (scaffold_args(tmp_path / "missing", out, prompts_file), 2, "no such file or folder"),
        ([*scaffold_args(pipeline_folder, out, prompts_file), "--steps", "0"], 2, "--steps must be at least 2"),
        (scaffold_args(pipeline_folder, out, empty_prompts), 2, "holds no prompt"),
        ([*scaffold_args(pipeline_folder, out, prompts_file), "--name", "not-a-module"], 2, "not usable"),
        ([*scaffold_args(pipeline_folder, out, prompts_file), "--driver", "nofile.py:run"], 2, "does not exist"),
    ]
    for args, code, message in cases:
        assert main(args) == code, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
        assert _no_files(out)


def test_a_driver_that_raises_writes_nothing(
    pipeline_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text("def run(transformer, steps, seed):\n    raise RuntimeError('out of paint')\n")
    out = tmp_path / "out"
    args = ["scaffold", "--model", str(pipeline_folder), "--out", str(out), "--steps", "4",
            "--driver", f"{driver}:run"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "out of paint" in err and "nothing was written" in err and "Traceback" not in err
    assert _no_files(out)


def test_a_template_error_writes_nothing(
    pipeline_folder: Path, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "strategy.py.j2").write_text('"""{{ docstring }}"""\n{{ missing_value }}\n')
    monkeypatch.setenv("MAGSDK_TEMPLATE_DIR", str(templates))
    out = tmp_path / "out"
    assert main(scaffold_args(pipeline_folder, out, prompts_file)) == 1
    err = capsys.readouterr().err
    assert "missing_value" in err and "nothing was written" in err
    assert _no_files(out)


# -- other drivers ----------------------------------------------------------------------------------
DRIVER = '''
import torch
from magsdk.inspect.inputs import synthesize_inputs


def generate(transformer, steps, seed):
    """A plain flow-matching Euler loop written by the user."""
    torch.manual_seed(seed)
    _, kwargs = synthesize_inputs(transformer)
    latents = torch.randn_like(kwargs["hidden_states"])
    with torch.no_grad():
        for i in range(steps):
            sigma = 1.0 - i / steps
            kwargs.update(hidden_states=latents, timestep=torch.full((1,), sigma), return_dict=False)
            latents = latents - (1.0 / steps) * transformer(**kwargs)[0]
'''


def test_driver_and_synthetic_calibration_of_a_bare_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    driver = tmp_path / "my_loop.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    args = ["scaffold", "--model", "FluxTransformer2DModel", "--out", str(out), "--steps", "5", "--seeds", "2",
            "--no-test"]
    assert main([*args, "--name", "driven", "--driver", f"{driver}:generate"]) == 0
    driven = read_calibrations((out / "driven.py").read_text())[0]
    assert driven["synthetic"] is False and "--driver" in driven["source"] and driven["num_seeds"] == 2
    assert len(driven["branches"]["pass0"]) == 5 and any(s > 0 for s in driven["spread"]["pass0"])

    assert main([*args, "--name", "synthetic"]) == 0
    assert "curve is synthetic" in capsys.readouterr().out
    synthetic = read_calibrations((out / "synthetic.py").read_text())[0]
    assert synthetic["synthetic"] is True and "synthesized inputs" in synthetic["source"]
    assert not (out / "tests").exists()


def test_a_layout_the_runtime_cannot_take_gets_a_stub_then_calibrates_once_implemented(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = f"{Path(__file__).parent / 'odd_model.py'}:OddTransformer"
    out = tmp_path / "out"
    assert main(["scaffold", "--model", model, "--out", str(out), "--steps", "4", "--seeds", "1"]) == 1
    err = capsys.readouterr().err
    assert "without a calibration" in err and "compute_residual" in err
    path = out / "odd.py"
    text = path.read_text()
    assert read_calibrations(text) == [] and "raise BlockLayoutError(" in text
    # The user implements the residual (here: over the tokens the last block kept) ...
    start = text.index("        # `magsdk inspect` reported")
    body = "        return out_hidden - in_hidden[:, -out_hidden.shape[1] :]\n"
    path.write_text(text[:start] + body)
    # ... and calibrate measures the curve with it.
    assert main(["calibrate", str(path), "--model", model, "--steps", "4", "--seeds", "1"]) == 0
    (entry,) = read_calibrations(path.read_text())
    assert entry["num_steps"] == 4 and entry["synthetic"] is True
    assert path.read_text().endswith(body)
