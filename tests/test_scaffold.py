"""`magsdk scaffold` / `magsdk calibrate` end to end on a real FluxPipeline saved to a folder.

The pipeline is built from real diffusers / transformers classes with random weights
(``magsdk.reference.components``), saved with ``save_pretrained`` and loaded back by the CLI. Its
``__call__`` defaults are FluxPipeline's own (256x256 here, 28 steps, guidance 3.5); most tests
pass ``--height 32 --width 32`` to stay cheap, one calibrates at the defaults.

Every hint an error gives is followed here as written, and the command is run again.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import reference_runs
import torch
from diffusers import DiffusionPipeline
from diffusers_features import MAG_CACHE, require
from reference_runs import saved_reference_pipeline

import magsdk
import strategies
from magsdk.calibration.drivers import load_model, pipeline_call_kwargs, resolve_settings
from magsdk.calibration.settings import GENERAL_PROMPTS, CalibrationRequest, replay_kwargs
from magsdk.cli import main
from magsdk.codegen import import_from_path, isolated_registry, read_calibrations
from magsdk.codegen.patch import strip_calibrations
from magsdk.errors import UsageError
from magsdk.registry import StrategyRegistry, discover_strategies
from magsdk.workflow.common import default_strategy_name

PROMPT = "a handwritten digit seven"
STEPS = 6
SMALL = ("--height", "32", "--width", "32")
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_reference_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_runs.prompts_file(tmp_path_factory, "# calibration prompts", PROMPT)


def scaffold_args(folder: Path, out: Path, prompts: Path, *extra: str) -> list[str]:
    return ["scaffold", "--model", str(folder), "--out", str(out), "--steps", str(STEPS), "--seeds", "1",
            "--prompts", str(prompts), *SMALL, *extra]


@pytest.fixture(scope="module")
def scaffolded(pipeline_folder: Path, prompts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("strategies")
    assert main(scaffold_args(pipeline_folder, out, prompts_file, "--plot", str(out / "curve.png"))) == 0
    return out


@pytest.fixture
def no_mypy(monkeypatch: pytest.MonkeyPatch) -> None:
    """mypy on generated modules is covered by the module fixture and a few tests; the rest skip it."""
    monkeypatch.setenv("MAGSDK_SKIP_MYPY", "1")


def hinted_command(message: str) -> list[str]:
    """The last `magsdk ...` command a message suggests (in backticks or on its own indented line)."""
    found = re.findall(r"`(magsdk [^`]+)`", message) + re.findall(r"^ {4}(magsdk .+)$", message, re.MULTILINE)
    assert found, message
    words = shlex.split(found[-1])
    assert words[0] == "magsdk"
    return words[1:]


def calibrate_like_diffusers(
    folder: Path, settings: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> list[float]:
    """The ratios diffusers' own MagCacheConfig(calibrate=True) prints for the recorded call (skips without it)."""
    apply_mag_cache = require("diffusers.hooks.apply_mag_cache", MAG_CACHE)
    DiffusersMagCacheConfig = require("diffusers.hooks.MagCacheConfig", MAG_CACHE)
    steps = int(settings["num_inference_steps"])  # type: ignore[call-overload]
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    apply_mag_cache(pipe.transformer, DiffusersMagCacheConfig(calibrate=True, num_inference_steps=steps))
    capsys.readouterr()
    with torch.no_grad():
        pipe(**pipeline_call_kwargs(pipe, PROMPT, 0, replay_kwargs(settings)))
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if "[MagCache] Calibration Complete" in line)
    values = ast.literal_eval(lines[header + 1])
    assert isinstance(values, list) and len(values) == steps
    return [float(v) for v in values]


def test_scaffold_writes_a_module_that_enables_and_matches_diffusers_calibration(
    scaffolded: Path, pipeline_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module_path = scaffolded / "digits_pipeline.py"  # named after the model folder, not the class
    assert (scaffolded / "tests" / "test_digits_pipeline.py").is_file()
    assert (scaffolded / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    discover_strategies()
    with isolated_registry():
        module = import_from_path(module_path)
        entry = module.DigitsPipelineStrategy.calibrations[0]
        assert entry.num_steps == STEPS and entry.num_prompts == 1 and entry.num_seeds == 1
        assert entry.scheduler == "FlowMatchEulerDiscreteScheduler" and entry.shape == "32x32"
        assert not entry.synthetic and entry.diffusers_version is not None
        assert entry.settings == {"height": 32, "width": 32, "num_inference_steps": STEPS, "guidance_scale": 3.5,
                                  "device": "cpu", "dtype": "float32"}
        assert list(entry.branches) == ["cond"]  # FluxPipeline names its context "cond"
        assert len(entry.timesteps) == STEPS and entry.spread["cond"] == [0.0] * STEPS

        pipe = DiffusionPipeline.from_pretrained(pipeline_folder)
        pipe.set_progress_bar_config(disable=True)
        with magsdk.enable(pipe) as handle, torch.no_grad():
            assert type(handle.strategy) is module.DigitsPipelineStrategy  # enable(pipe) picked the generated one
            pipe(**pipeline_call_kwargs(pipe, PROMPT, 0, replay_kwargs(entry.settings)))
            assert handle.stats.total_calls == STEPS

    theirs = calibrate_like_diffusers(pipeline_folder, entry.settings, capsys)
    ours = entry.branches["cond"]
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-4, (ours, theirs)


@pytest.mark.slow
def test_generated_test_passes(scaffolded: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(scaffolded / "tests" / "test_digits_pipeline.py")],
        capture_output=True, text=True, timeout=300, cwd=scaffolded,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_scaffold_twice_gives_identical_files(
    scaffolded: Path, pipeline_folder: Path, prompts_file: Path, no_mypy: None
) -> None:
    module, test = scaffolded / "digits_pipeline.py", scaffolded / "tests" / "test_digits_pipeline.py"
    before = module.read_bytes(), test.read_bytes()
    assert main(scaffold_args(pipeline_folder, scaffolded, prompts_file)) == 0
    assert (module.read_bytes(), test.read_bytes()) == before


# -- settings come from the model -------------------------------------------------------------------
def test_calibration_settings_come_from_the_pipeline_and_the_folder(pipeline_folder: Path, tmp_path: Path) -> None:
    loaded = load_model(str(pipeline_folder))
    settings = resolve_settings(CalibrationRequest(), loaded)
    # FluxPipeline.__call__: height/width from default_sample_size (128) x vae_scale_factor (2), 28 steps, 3.5.
    assert settings.call_kwargs == {"height": 256, "width": 256, "num_inference_steps": 28, "guidance_scale": 3.5}
    assert set(settings.origins.values()) == {"pipeline default"}
    assert settings.prompts == list(GENERAL_PROMPTS) and len(set(settings.prompts)) >= 8
    assert not any("digit" in p for p in settings.prompts)  # the digit prompts belong to the demo alone
    assert settings.seeds == 1 and settings.device == "cpu" and settings.dtype == "float32"

    folder = tmp_path / "recorded"
    shutil.copytree(pipeline_folder, folder)
    (folder / "magsdk.json").write_text(
        '{"height": 64, "width": 64, "num_inference_steps": 12, "true_cfg_scale": 2.0, "negative_prompt": "",'
        ' "prompt_template": "not a call argument", "training": {}}'
    )
    loaded.target = str(folder)
    recorded = resolve_settings(CalibrationRequest(width=48, call_kwargs={"max_sequence_length": 16}), loaded)
    assert recorded.call_kwargs == {"height": 64, "width": 48, "num_inference_steps": 12, "guidance_scale": 3.5,
                                    "true_cfg_scale": 2.0, "negative_prompt": "", "max_sequence_length": 16}
    assert recorded.origins["height"] == "magsdk.json in the model folder" and recorded.origins["width"] == "--width"
    assert "true_cfg_scale=2.0" in recorded.describe() and "--call-arg" in recorded.describe()
    with pytest.raises(UsageError, match="has no parameter 'no_such_argument'"):
        resolve_settings(CalibrationRequest(call_kwargs={"no_such_argument": 1}), loaded)


def test_scaffold_calibrates_at_the_pipeline_defaults_and_records_them(
    pipeline_folder: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_mypy: None
) -> None:
    out = tmp_path / "out"
    args = ["scaffold", "--model", str(pipeline_folder), "--out", str(out), "--steps", "3", "--prompts",
            str(prompts_file), "--no-test"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "calibration settings: 3 steps (--steps); height=256, width=256, guidance_scale=3.5 (pipeline default)" in (
        printed)
    (entry,) = read_calibrations((out / "digits_pipeline.py").read_text())
    assert entry["shape"] == "256x256"
    assert entry["settings"] == {"height": 256, "width": 256, "num_inference_steps": 3, "guidance_scale": 3.5,
                                 "device": "cpu", "dtype": "float32"}
    theirs = calibrate_like_diffusers(pipeline_folder, entry["settings"], capsys)  # replays the recorded call
    assert max(abs(a - b) for a, b in zip(entry["branches"]["cond"], theirs, strict=True)) < 1e-4


def test_default_module_names_never_shadow_a_bundled_strategy(tmp_path: Path) -> None:
    folder = tmp_path / "FLUX.1-dev"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    assert default_strategy_name(str(folder), "FluxTransformer2DModel") == ("flux_1_dev", None)
    assert default_strategy_name(str(folder / "transformer"), "FluxTransformer2DModel")[0] == "flux_1_dev"
    assert default_strategy_name("black-forest-labs/FLUX.1-dev", "FluxTransformer2DModel")[0] == "flux_1_dev"
    name, note = default_strategy_name("FluxTransformer2DModel", "FluxTransformer2DModel")
    assert name == "my_flux" and note is not None and "strategies/flux.py" in note
    name, note = default_strategy_name("WanTransformer3DModel", "WanTransformer3DModel")
    assert name == "my_wan" and note is not None and "strategies/wan.py" in note  # Wan ships a strategy too
    name, note = default_strategy_name("SD3Transformer2DModel", "SD3Transformer2DModel")
    assert note is None and not (Path(strategies.__file__).parent / f"{name}.py").exists()


# -- no calibration is lost -------------------------------------------------------------------------
def test_scaffold_calibrate_scaffold_keeps_the_second_entry(
    scaffolded: Path, pipeline_folder: Path, prompts_file: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], no_mypy: None,
) -> None:
    out = tmp_path / "out"
    shutil.copytree(scaffolded, out)
    module = out / "digits_pipeline.py"
    assert main(["calibrate", str(module), "--model", str(pipeline_folder), "--steps", "4", "--seeds", "1",
                 "--prompts", str(prompts_file), *SMALL]) == 0
    calibrated = module.read_text()
    start, end = calibrated.index('    {\n        "num_steps": 4'), calibrated.index('    {\n        "num_steps": 6')
    four = calibrated[start:end]
    capsys.readouterr()
    assert main(scaffold_args(pipeline_folder, out, prompts_file)) == 0
    assert "kept 4-step; replaced the 6-step entry with the new one" in capsys.readouterr().out
    assert [e["num_steps"] for e in read_calibrations(module.read_text())] == [4, STEPS]
    assert four in module.read_text()  # byte for byte


def test_an_edited_module_is_refused_naming_force_and_both_hints_work(
    scaffolded: Path, pipeline_folder: Path, prompts_file: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], no_mypy: None,
) -> None:
    out = tmp_path / "out"
    shutil.copytree(scaffolded, out)
    module = out / "digits_pipeline.py"
    edited = module.read_text().replace("threshold = 0.06", "threshold = 0.1")
    module.write_text(edited)
    assert main(scaffold_args(pipeline_folder, out, prompts_file, "--steps", "4")) == 2
    err = capsys.readouterr().err
    assert "--force" in err and module.read_text() == edited
    # The hint: `magsdk calibrate <module> --model ... (the same calibration options)`, as written.
    assert main(hinted_command(err)) == 0
    assert [e["num_steps"] for e in read_calibrations(module.read_text())] == [4, STEPS]
    assert "threshold = 0.1" in module.read_text()
    # --force replaces the edits and keeps both calibrations.
    assert main(scaffold_args(pipeline_folder, out, prompts_file, "--force")) == 0
    assert "threshold = 0.06" in module.read_text()
    assert [e["num_steps"] for e in read_calibrations(module.read_text())] == [4, STEPS]


def test_calibrate_adds_an_entry_and_keeps_hand_edits(
    scaffolded: Path, pipeline_folder: Path, prompts_file: Path, tmp_path: Path, no_mypy: None
) -> None:
    path = tmp_path / "digits_pipeline.py"
    original = (scaffolded / "digits_pipeline.py").read_text()
    edited = original.replace("class DigitsPipelineStrategy", "# tuned for our renders\nclass DigitsPipelineStrategy")
    edited = edited.replace("threshold = 0.06", "threshold = 0.12")
    path.write_text(edited)
    args = ["calibrate", str(path), "--model", str(pipeline_folder), "--steps", "4", "--seeds", "1",
            "--prompts", str(prompts_file), *SMALL]
    assert main(args) == 0
    patched = path.read_text()
    assert "# tuned for our renders\nclass DigitsPipelineStrategy" in patched and "threshold = 0.12" in patched
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
    path = tmp_path / "digits_pipeline.py"
    broken = (scaffolded / "digits_pipeline.py").read_text().replace(
        "class DigitsPipelineStrategy(MagCacheStrategy):", "class Flux(:")
    path.write_text(broken)
    assert main(["calibrate", str(path), "--model", str(pipeline_folder), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "not valid Python" in err and "Traceback" not in err
    assert path.read_text() == broken


HAND_WRITTEN = '''"""A strategy written by hand, without a CALIBRATIONS literal."""

from __future__ import annotations

from magsdk import BlockMetadata, MagCacheStrategy

META = BlockMetadata(hidden_states_argument_name="hidden_states",
                     encoder_hidden_states_argument_name="encoder_hidden_states",
                     return_hidden_states_index=1, return_encoder_hidden_states_index=0)


class HandStrategy(MagCacheStrategy):
    transformer_cls_name = "FluxTransformer2DModel"
    block_groups = ("transformer_blocks", "single_transformer_blocks")
    block_metadata = {"FluxTransformerBlock": META, "FluxSingleTransformerBlock": META}
    threshold = 0.1
'''


def test_the_hint_for_a_module_without_calibrations_works_as_written(
    pipeline_folder: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "hand.py"
    path.write_text(HAND_WRITTEN)
    args = ["calibrate", str(path), "--model", str(pipeline_folder), "--steps", "3", "--seeds", "1",
            "--prompts", str(prompts_file), *SMALL]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert path.read_text() == HAND_WRITTEN
    module_lines = re.search(r"after its imports:\n\n((?: {4}.+\n)+)", err)
    class_line = re.search(r"strategy class .*:\n\n {4}(.+)\n", err)
    assert module_lines and class_line, err
    # Add the lines exactly as the message gives them: after the imports, and in the class body.
    added = "".join(line[4:] + "\n" for line in module_lines.group(1).splitlines())
    text = HAND_WRITTEN.replace("\nMETA = ", f"\n{added}\nMETA = ").replace(
        "    threshold = 0.1\n", f"    threshold = 0.1\n    {class_line.group(1)}\n")
    path.write_text(text)
    assert main(args) == 0  # the validation includes mypy --strict
    (entry,) = read_calibrations(path.read_text())
    assert entry["num_steps"] == 3


NO_METADATA = '''"""A strategy written by hand: the transformer class and its block lists, no block_metadata."""

from magsdk import MagCacheStrategy


class HandmadeStrategy(MagCacheStrategy):
    transformer_cls_name = "FluxTransformer2DModel"
    block_groups = ("transformer_blocks", "single_transformer_blocks")
'''


def test_a_hand_written_strategy_without_block_metadata_uses_the_registered_blocks(
    pipeline_folder: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_mypy: None
) -> None:
    """Its block classes are registered (the bundled Flux strategy registers them): calibrate and enable use them."""
    path = tmp_path / "handmade.py"
    path.write_text(NO_METADATA)
    args = ["calibrate", str(path), "--model", str(pipeline_folder), "--steps", str(STEPS), "--seeds", "1",
            "--prompts", str(prompts_file), *SMALL]
    assert main(args) == 2
    err = capsys.readouterr().err
    module_lines = re.search(r"after its imports:\n\n((?: {4}.+\n)+)", err)
    class_line = re.search(r"strategy class .*:\n\n {4}(.+)\n", err)
    assert module_lines and class_line, err
    # Exactly the lines the CALIBRATIONS hint asks for, nothing else.
    added = "".join(line[4:] + "\n" for line in module_lines.group(1).splitlines())
    imports = "from magsdk import MagCacheStrategy\n"
    path.write_text(NO_METADATA.replace(imports, imports + added) + f"    {class_line.group(1)}\n")
    assert main(args) == 0, capsys.readouterr().err
    (entry,) = read_calibrations(path.read_text())
    assert entry["num_steps"] == STEPS and list(entry["branches"]) == ["cond"]
    assert len(entry["branches"]["cond"]) == STEPS

    from strategies.flux import FluxStrategy

    pipe = DiffusionPipeline.from_pretrained(pipeline_folder)
    pipe.set_progress_bar_config(disable=True)

    def generate() -> torch.Tensor:
        with torch.no_grad():
            images: torch.Tensor = pipe(**pipeline_call_kwargs(pipe, PROMPT, 0, replay_kwargs(entry["settings"])))[0]
        return images

    with isolated_registry():
        with magsdk.enable(pipe, strategy=str(path)) as handle:
            assert type(handle.strategy).__name__ == "HandmadeStrategy"
            ours = generate()
            computed, skipped = handle.stats.computed_steps("cond"), handle.stats.skipped_steps("cond")
            config = type(handle.strategy).default_config(STEPS)
        assert skipped and len(computed) + len(skipped) == STEPS
        with magsdk.enable(pipe, config, strategy=FluxStrategy) as bundled:  # the same curve and settings
            theirs = generate()
            assert bundled.stats.computed_steps("cond") == computed
        assert torch.equal(ours, theirs)

    # Defined before any strategy was discovered: it shadows the bundled Flux strategy, whose blocks still count.
    with isolated_registry():
        StrategyRegistry.reset()
        import_from_path(path)
        with magsdk.enable(pipe) as handle:
            assert type(handle.strategy).__name__ == "HandmadeStrategy"
            assert torch.equal(generate(), ours) and handle.stats.computed_steps("cond") == computed


TOY_STRATEGY = '''from magsdk import MagCacheStrategy


class ToyStrategy(MagCacheStrategy):
    transformer_cls_name = "ToyTransformer"
    block_groups = ("stack",)
'''


def test_a_block_class_nobody_registered_gets_an_error_saying_which_block_metadata_to_add(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli_toys import TOY_TRANSFORMER

    from magsdk import MagCacheConfig
    from magsdk.errors import BlockLayoutError

    (tmp_path / "toy_model.py").write_text(TOY_TRANSFORMER)
    path = tmp_path / "toy_strategy.py"
    path.write_text(TOY_STRATEGY)
    torch.manual_seed(0)
    toy = import_from_path(tmp_path / "toy_model.py").ToyTransformer()
    config = MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=4)
    with isolated_registry(), pytest.raises(BlockLayoutError) as failed:
        magsdk.enable(toy, config, strategy=str(path))
    message = str(failed.value)
    assert "ToyStrategy" in message and str(path) in message and "has no block_metadata for Block" in message
    assert "stack" in message and "no metadata is registered" in message

    # Follow it: the inspect command it names, then the block_metadata it shows with each `...` filled in.
    assert main(hinted_command(message)) == 0
    report = json.loads(capsys.readouterr().out)
    (group,) = [g for g in report["block_groups"] if g["block_class"] == "Block"]
    code = re.search(r"\n\n((?: {4}.+\n)+)\n", message)
    assert code and code.group(1).startswith("    block_metadata = {"), message
    filled = re.sub(r"(\w+)=\.\.\.,", lambda m: f"{m.group(1)}={group['metadata'][m.group(1)]!r},", code.group(1))
    import_line = re.search(r"`(from magsdk import \w+)`", message)
    assert import_line and "..." not in filled, message
    path.write_text(f"{import_line.group(1)}\n{TOY_STRATEGY}{filled}")

    with isolated_registry(), magsdk.enable(toy, config, strategy=str(path)) as handle, torch.no_grad():
        hidden = torch.randn(1, 5, 4)
        for i in range(4):
            toy(hidden, torch.tensor([1.0 - i / 4]))
        assert type(handle.strategy).__name__ == "ToyStrategy"
        assert handle.stats.computed_steps() == [0] and handle.stats.skipped_steps() == [1, 2, 3]


def test_the_hint_for_a_missing_strategy_file_works_as_written(
    pipeline_folder: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_mypy: None
) -> None:
    path = tmp_path / "mine" / "digits.py"
    args = ["calibrate", str(path), "--model", str(pipeline_folder), "--steps", "3", "--seeds", "1",
            "--prompts", str(prompts_file), *SMALL]
    assert main(args) == 2
    assert main(hinted_command(capsys.readouterr().err)) == 0
    (entry,) = read_calibrations(path.read_text())
    assert entry["num_steps"] == 3 and entry["settings"]["height"] == 32


# -- bad input: a clear message, an exit code, and no file written ---------------------------------
def _no_files(folder: Path) -> bool:
    return not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))


def test_bad_inputs(
    pipeline_folder: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    no_transformer = tmp_path / "no_transformer"
    no_transformer.mkdir()
    index = (pipeline_folder / "model_index.json").read_text().replace('"transformer"', '"not_a_transformer"')
    (no_transformer / "model_index.json").write_text(index)
    empty_prompts = tmp_path / "empty.txt"
    empty_prompts.write_text("\n# only a comment\n")
    base = scaffold_args(pipeline_folder, out, prompts_file)
    cases = [
        (scaffold_args(no_transformer, out, prompts_file), 2, "has no transformer"),
        (scaffold_args(tmp_path / "missing", out, prompts_file), 2, "no such file or folder"),
        ([*base, "--steps", "0"], 2, "--steps must be at least 2"),
        (scaffold_args(pipeline_folder, out, empty_prompts), 2, "holds no prompt"),
        ([*base, "--name", "not-a-module"], 2, "not usable"),
        ([*base, "--driver", "nofile.py:run"], 2, "does not exist"),
        ([*base, "--inputs", "nofile.py:make"], 2, "does not exist"),
        ([*base, "--dtype", "int8"], 2, "--dtype 'int8'"),
        ([*base, "--device", "cuda:9" if torch.cuda.is_available() else "cuda"], 2, "--device"),
        ([*base, "--device", "toaster"], 2, "not a device"),
        (["scaffold", "--out", str(out)], 2, "--model"),
        ([*base, "--steps"], 2, "--steps"),  # click's own usage error: exit 2, not 1
    ]
    for args, code, message in cases:
        assert main(args) == code, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
        assert _no_files(out)
    assert main(["--debug", *base, "--steps", "0"]) == 2  # --debug adds a traceback, never changes the code
    assert "Traceback" in capsys.readouterr().err


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


def test_driver_and_synthetic_calibration_of_a_bare_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_mypy: None
) -> None:
    driver = tmp_path / "my_loop.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    args = ["scaffold", "--model", "FluxTransformer2DModel", "--out", str(out), "--steps", "5", "--no-test"]
    assert main([*args, "--name", "driven", "--driver", f"{driver}:generate"]) == 0
    driven = read_calibrations((out / "driven.py").read_text())[0]
    assert driven["synthetic"] is False and "--driver" in driven["source"] and driven["num_seeds"] == 2
    assert driven["settings"]["driver"] == f"{driver}:generate"
    assert len(driven["branches"]["pass0"]) == 5 and any(s > 0 for s in driven["spread"]["pass0"])

    assert main(args) == 0  # no --name: the class gives `flux`, taken by the bundled module
    printed = capsys.readouterr().out
    assert "curve is synthetic" in printed and "my_flux" in printed
    synthetic = read_calibrations((out / "my_flux.py").read_text())[0]
    assert synthetic["synthetic"] is True and "synthesized inputs" in synthetic["source"]
    assert synthetic["settings"]["inputs"] == "synthesized"
    assert not (out / "tests").exists()


def test_inputs_for_a_class_with_uninformative_argument_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """forward(latents, context, timestep): the hint names scaffold's --inputs; following it works."""
    monkeypatch.chdir(tmp_path)
    model = f"{TESTS / 'bare_model.py'}:BareNet"
    assert main(["scaffold", "--model", model, "--out", "out", "--steps", "4", "--no-test"]) == 2
    err = capsys.readouterr().err
    assert "'context'" in err and "magsdk inspect" not in err and _no_files(tmp_path / "out")
    command = hinted_command(err)
    assert command[:3] == ["scaffold", "--model", model] and command[-2:] == ["--inputs", "my_inputs.py:make_inputs"]
    assert all(f"'{name}': ...," in err for name in ("latents", "context", "timestep"))
    # The function the hint asks for, with tensors where it shows `...`.
    Path("my_inputs.py").write_text(
        "import torch\n\n"
        "def make_inputs(model):\n"
        "    args = ()\n"
        "    kwargs = {\n"
        "        'latents': torch.randn(1, 16, 4),\n"
        "        'context': torch.randn(1, 6, 8),\n"
        "        'timestep': torch.tensor([0.5]),\n"
        "    }\n"
        "    return args, kwargs\n"
    )
    assert main(command) == 0  # validated, mypy --strict included
    module = tmp_path / "out" / "bare_net.py"
    (entry,) = read_calibrations(module.read_text())
    assert entry["synthetic"] is True and "--inputs my_inputs.py:make_inputs" in entry["source"]
    assert entry["settings"]["inputs"] == "my_inputs.py:make_inputs" and entry["shape"] == "1x16x4"
    assert '"synthetic": True' in module.read_text()

    # calibrate --inputs adds an entry and keeps a comment added by hand.
    monkeypatch.setenv("MAGSDK_SKIP_MYPY", "1")
    module.write_text(module.read_text().replace("class BareNetStrategy", "# ours: keep me\nclass BareNetStrategy"))
    assert main(["calibrate", str(module), "--model", model, "--inputs", "my_inputs.py:make_inputs",
                 "--steps", "3"]) == 0
    text = module.read_text()
    assert "# ours: keep me\nclass BareNetStrategy" in text
    assert [e["num_steps"] for e in read_calibrations(text)] == [3, 4]


def test_a_layout_the_runtime_cannot_take_gets_a_stub_then_calibrates_once_implemented(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_mypy: None
) -> None:
    model = f"{TESTS / 'odd_model.py'}:OddTransformer"
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
    # ... and runs the command the message gave.
    assert main(hinted_command(err)) == 0
    (entry,) = read_calibrations(path.read_text())
    assert entry["num_steps"] == 4 and entry["synthetic"] is True
    assert path.read_text().endswith(body)


def test_the_progress_bar_counts_generations_and_shows_the_time_left() -> None:
    import io

    from rich.console import Console

    from magsdk.calibration.drivers import progress_bar

    stream = io.StringIO()
    with progress_bar(True, "calibrating", 3, console=Console(file=stream, force_terminal=True, width=200)) as advance:
        for i in range(3):
            advance(f"prompt {i}")
    shown = stream.getvalue()
    assert "calibrating" in shown and "3/3" in shown and "generations" in shown and "ETA" in shown


def test_dtype_is_applied_and_recorded(
    pipeline_folder: Path, prompts_file: Path, tmp_path: Path, no_mypy: None
) -> None:
    out = tmp_path / "out"
    args = ["scaffold", "--model", str(pipeline_folder), "--out", str(out), "--steps", "3", "--prompts",
            str(prompts_file), "--no-test", "--dtype", "bf16", "--device", "cpu", *SMALL]
    assert main(args) == 0
    (entry,) = read_calibrations((out / "digits_pipeline.py").read_text())
    assert entry["settings"]["dtype"] == "bfloat16" and entry["settings"]["device"] == "cpu"


def test_loading_a_transformer_casts_only_when_the_dtype_changes(caplog) -> None:
    """diffusers logs "modules ... should be kept in float32: []" for every ``.to(dtype=...)``, even a no-op one,
    so ``magsdk scaffold --model FluxTransformer2DModel`` printed it on every float32 run."""
    import logging

    from magsdk.calibration.drivers import load_model

    with caplog.at_level(logging.INFO):
        same = load_model("FluxTransformer2DModel", device="cpu", dtype="float32")
    assert same.dtype == "float32" and not [r for r in caplog.records if "kept in float32" in r.getMessage()]
    assert load_model("FluxTransformer2DModel", device="cpu", dtype="bfloat16").dtype == "bfloat16"


AMBIGUOUS_MODEL = '''
import torch
from torch import nn


class B(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return hidden_states * 2, encoder_hidden_states * 3


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([B()])

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        for b in self.blocks:
            hidden_states, encoder_hidden_states = b(hidden_states, encoder_hidden_states, timestep)
        return hidden_states


def inputs(model):
    one = torch.ones(1, 1, 1)  # the same shape for both streams: the trace cannot tell the slots apart
    return (), {"hidden_states": one, "encoder_hidden_states": one, "timestep": torch.tensor([0.5])}
'''


def test_an_ambiguous_scaffold_suggests_inspect_on_the_target_as_given(tmp_path, monkeypatch, capsys) -> None:
    """The hint said `magsdk inspect M --inputs ...`, which fails: M is no diffusers class."""
    (tmp_path / "ambm.py").write_text(AMBIGUOUS_MODEL)
    monkeypatch.chdir(tmp_path)
    assert main(["scaffold", "--model", "ambm.py:M", "--inputs", "ambm.py:inputs"]) == 1
    err = capsys.readouterr().err
    assert "so no strategy is written. Run `magsdk inspect ambm.py:M --inputs FILE.py:FUNC`" in " ".join(err.split())
    assert not (tmp_path / "strategies").exists()
    assert main(["inspect", "ambm.py:M", "--inputs", "ambm.py:inputs"]) == 0  # the hint's command runs
    assert "ambiguous" in capsys.readouterr().out.lower()
