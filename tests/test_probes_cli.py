"""`--probes P` of `magsdk scaffold` / `magsdk calibrate`: the strategy file carries the probes and reads back.

On the same saved FluxPipeline as tests/test_scaffold.py (random weights, 32x32, a few steps), and on
the toy transformer of tests/cli_toys.py for the driver and synthetic loops. mypy on the generated
modules is skipped here: the probes only add a dict to a ``list[dict[str, Any]]`` literal, and
tests/test_scaffold.py runs mypy on a generated module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import reference_runs
from cli_toys import TOY_TRANSFORMER, isolated_cli_logging  # noqa: F401  (an autouse fixture)
from reference_runs import saved_reference_pipeline

import magsdk
from magsdk.cli import main
from magsdk.codegen import import_from_path, isolated_registry, read_calibrations
from magsdk.codegen.literal import format_entry
from magsdk.codegen.validate import StrategyValidationError, check_calibrations
from magsdk.config import CalibrationEntry

PROMPT = "a handwritten digit seven"
SMALL = ("--height", "32", "--width", "32")
MODULE = "digits_pipeline.py"


@pytest.fixture(autouse=True)
def no_mypy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGSDK_SKIP_MYPY", "1")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_reference_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_runs.prompts_file(tmp_path_factory, PROMPT)


def calibration_args(folder: Path, prompts: Path, steps: int, *extra: str) -> list[str]:
    return ["--model", str(folder), "--steps", str(steps), "--seeds", "1", "--prompts", str(prompts), *SMALL, *extra]


@pytest.fixture(scope="module")
def probed(pipeline_folder: Path, prompts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module scaffolded at 4 steps with 2 probes per step."""
    out = tmp_path_factory.mktemp("strategies")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAGSDK_SKIP_MYPY", "1")
        args = ["scaffold", *calibration_args(pipeline_folder, prompts_file, 4, "--probes", "2"), "--out", str(out)]
        assert main([*args, "--no-test"]) == 0
    return out / MODULE


def entry_text(source: str, steps: int) -> str:
    """One entry of the CALIBRATIONS literal as written (up to the next entry or the end of the list)."""
    start = source.index(f'    {{\n        "num_steps": {steps},')
    ends = [i for i in (source.find('    {\n        "num_steps"', start + 1), source.index("\n]\n", start)) if i > 0]
    return source[start : min(ends)]


def test_scaffold_with_probes_writes_them_and_the_module_loads_back(
    probed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (raw,) = read_calibrations(probed.read_text())
    assert list(raw["probes"]) == ["cond"] and len(raw["probes"]["cond"]) == (4 - 1) * 2
    assert raw["settings"]["probes"] == 2
    CalibrationEntry.model_validate(raw)
    with isolated_registry():
        strategy = import_from_path(probed).DigitsPipelineStrategy
        (entry,) = strategy.calibrations
        assert entry.probes == raw["probes"]
        config = strategy.default_config(4)
    assert config.probes == entry.probes
    # a denser run maps the curve through the probes; the plan says so
    mapped = magsdk.plan(config, None, 8, branch="cond")
    assert "shaped by 2 probes per step" in mapped.mapping and len(mapped.schedule_string()) == 8
    with isolated_registry():  # plan registers the module's strategy for FluxTransformer2DModel
        assert main(["plan", "--strategy", str(probed), "--steps", "8"]) == 0
    assert "shaped by 2 probes per step" in " ".join(capsys.readouterr().out.split())


def test_entries_without_probes_have_no_probes_key_and_rewrites_keep_the_probed_one(
    probed: Path, pipeline_folder: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / MODULE
    shutil.copy(probed, module)
    four = entry_text(probed.read_text(), 4)
    # calibrate without --probes: a new entry without "probes"; the probed one is kept byte for byte
    assert main(["calibrate", str(module), *calibration_args(pipeline_folder, prompts_file, 5)]) == 0
    text = module.read_text()
    assert four in text
    five = entry_text(text, 5)
    assert '"probes"' not in five
    entries = {e["num_steps"]: e for e in read_calibrations(text)}
    assert "probes" not in entries[5] and "probes" not in entries[5]["settings"]
    assert format_entry(CalibrationEntry.model_validate(entries[5])) == five.rstrip().removesuffix(",")
    # calibrate --probes adds a probed entry
    assert main(["calibrate", str(module), *calibration_args(pipeline_folder, prompts_file, 3, "--probes", "1")]) == 0
    text = module.read_text()
    entries = {e["num_steps"]: e for e in read_calibrations(text)}
    assert len(entries[3]["probes"]["cond"]) == 2 and entries[3]["settings"]["probes"] == 1
    assert four in text and five in text
    # scaffold --force over an edited module formats the kept entries anew: their probes survive
    module.write_text(text.replace("threshold = 0.06", "threshold = 0.1"))
    capsys.readouterr()
    assert main(["scaffold", *calibration_args(pipeline_folder, prompts_file, 5), "--out", str(tmp_path),
                 "--no-test", "--force"]) == 0
    assert "kept 3-step, 4-step" in capsys.readouterr().out
    rewritten = {e["num_steps"]: e for e in read_calibrations(module.read_text())}
    assert rewritten[3]["probes"] == entries[3]["probes"] and rewritten[4]["probes"] == entries[4]["probes"]
    assert "probes" not in rewritten[5]
    assert four in module.read_text()


@pytest.mark.parametrize("value", ["-1", "65"])
def test_a_bad_probes_value_is_a_usage_error_and_writes_nothing(
    value: str, probed: Path, pipeline_folder: Path, prompts_file: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    args = calibration_args(pipeline_folder, prompts_file, 4, "--probes", value)
    assert main(["scaffold", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--probes must be a whole number from 0 (no probes) to 64, got {value}" in err and "Traceback" not in err
    assert not out.exists()
    module = tmp_path / MODULE
    shutil.copy(probed, module)
    before = module.read_bytes()
    assert main(["calibrate", str(module), *args]) == 2
    assert "--probes must be" in capsys.readouterr().err
    assert module.read_bytes() == before


def test_probes_from_the_cache_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A cached curve was measured as it was: --probes would not be used."""
    assert main(["scaffold", "--from-cache", "anything", "--probes", "2", "--out", str(tmp_path / "out")]) == 2
    assert "--probes would not be used" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


DRIVER = '''
import torch


def generate(transformer, steps, seed):
    torch.manual_seed(seed)
    latents = torch.randn(1, 6, 4)
    with torch.no_grad():
        for i in range(steps):
            sigma = 1.0 - i / steps
            latents = latents - (1.0 / steps) * transformer(latents, TIMESTEP=torch.full((1,), sigma))
'''


@pytest.mark.parametrize("loop", ["driver", "synthetic"])
def test_the_driver_and_the_synthetic_loop_probe_too(loop: str, tmp_path: Path) -> None:
    (tmp_path / "toy.py").write_text(TOY_TRANSFORMER)
    (tmp_path / "loop.py").write_text(DRIVER.replace("TIMESTEP", "timestep"))
    extra = ["--driver", f"{tmp_path / 'loop.py'}:generate"] if loop == "driver" else []
    assert main(["scaffold", "--model", f"{tmp_path / 'toy.py'}:ToyTransformer", "--steps", "3", "--probes", "3",
                 "--out", str(tmp_path / "out"), "--name", "toy", "--no-test", *extra]) == 0
    (raw,) = read_calibrations((tmp_path / "out" / "toy.py").read_text())
    assert raw["synthetic"] is (loop == "synthetic") and raw["settings"]["probes"] == 3
    assert {name: len(values) for name, values in raw["probes"].items()} == {name: 2 * 3 for name in raw["branches"]}


def test_a_forward_without_a_timestep_argument_cannot_be_probed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "toy.py").write_text(TOY_TRANSFORMER.replace("timestep", "noise_amount"))
    (tmp_path / "loop.py").write_text(DRIVER.replace("TIMESTEP", "noise_amount"))
    (tmp_path / "toy_inputs.py").write_text(
        "import torch\n\n\ndef make():\n    return (torch.randn(1, 6, 4),), {'noise_amount': torch.ones(1)}\n"
    )
    out = tmp_path / "out"
    assert main(["scaffold", "--model", f"{tmp_path / 'toy.py'}:ToyTransformer", "--steps", "3", "--probes", "2",
                 "--out", str(out), "--no-test", "--driver", f"{tmp_path / 'loop.py'}:generate",
                 "--inputs", f"{tmp_path / 'toy_inputs.py'}:make"]) == 2
    err = capsys.readouterr().err
    assert "--probes 2: ToyTransformer.forward has no timestep argument" in err and "without --probes" in err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_validation_refuses_probes_no_calibration_writes(probed: Path) -> None:
    (raw,) = read_calibrations(probed.read_text())
    uneven = {**raw, "branches": {**raw["branches"], "uncond": raw["branches"]["cond"]},
              "probes": {"cond": raw["probes"]["cond"], "uncond": raw["probes"]["cond"][:3]}}
    with pytest.raises(StrategyValidationError, match="different probe counts per step"):
        check_calibrations([uneven], MODULE)
    empty = {**uneven, "probes": {"cond": raw["probes"]["cond"], "uncond": []}}
    with pytest.raises(StrategyValidationError, match=r"probes\['uncond'\] has 0 probes per step"):
        check_calibrations([empty], MODULE)
    with pytest.raises(StrategyValidationError, match="probes"):
        check_calibrations([{**raw, "probes": {"uncond": raw["probes"]["cond"]}}], MODULE)
