"""Errors of the Python API on bad input: each names the value, says what is wrong and what to do, and its hint
works when followed (the tests follow them)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tiny_models import denoise, flux_inputs, tiny_flux

import magsdk
from magsdk.errors import MagSDKError, StrategyNotFoundError, UsageError
from magsdk.inspect import inspect_module
from magsdk.reference import load_reference_pipeline
from magsdk.registry import STRATEGY_PATH_ENV, StrategyRegistry, discover_strategies
from magsdk.variants import resolve_name
from strategies.flux import FluxStrategy

STRATEGY = '''"""A user's strategy for ErrorsNet."""

from magsdk import BlockMetadata, MagCacheStrategy, load_calibrations


class ErrorsNetStrategy(MagCacheStrategy):
    transformer_cls_name = "ErrorsNet"
    block_groups = ("blocks",)
    block_metadata = {"ErrorsBlock": BlockMetadata(hidden_states_argument_name="x", output_kind="tensor")}
    calibrations = load_calibrations([{"num_steps": 4, "branches": {"default": [1.0, 1.0, 1.0, 1.0]}}])
'''


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.delenv(STRATEGY_PATH_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with StrategyRegistry.isolated():
        yield


@pytest.fixture(scope="module")
def calibration() -> magsdk.CalibrationResult:
    model = tiny_flux()
    with magsdk.calibrate(model) as cal:
        denoise(model, 4)
    assert cal.result is not None
    return cal.result


# -- CalibrationResult.load ----------------------------------------------------------------------------------
def test_load_of_a_missing_file_or_a_folder_names_it_and_how_to_write_one(
    tmp_path: Path, calibration: magsdk.CalibrationResult
) -> None:
    path = tmp_path / "curve-4.json"
    with pytest.raises(UsageError) as info:
        magsdk.CalibrationResult.load(path)
    message = str(info.value)
    assert f"calibration file {path} does not exist" in message
    assert f"cal.result.save({str(path)!r})" in message and "magsdk.calibrate(pipe)" in message
    calibration.save(path)  # the hint, followed
    assert magsdk.CalibrationResult.load(path) == calibration

    with pytest.raises(UsageError, match="is a folder, not a calibration file") as info:
        magsdk.CalibrationResult.load(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_load_of_a_corrupt_or_binary_file_names_the_file(tmp_path: Path, calibration: magsdk.CalibrationResult) -> None:
    path = calibration.save(tmp_path / "cal.json")
    cut = tmp_path / "cut.json"
    cut.write_text(path.read_text()[:40])
    with pytest.raises(UsageError) as info:
        magsdk.CalibrationResult.load(cut)
    message = str(info.value)
    assert message.startswith(f"{cut} is not valid JSON (line ") and "magsdk.calibrate(pipe)" in message

    image = tmp_path / "image.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(UsageError) as info:
        magsdk.CalibrationResult.load(image)
    assert str(info.value).startswith(f"{image} is not a calibration file: byte 0 is not UTF-8 text")


def test_load_of_another_kind_of_json_says_which_kind_and_how_to_use_it(
    tmp_path: Path, calibration: magsdk.CalibrationResult
) -> None:
    model = tiny_flux()
    inputs = flux_inputs(model)
    inputs["hidden_states"] = torch.randn(1, 16, model.config.in_channels, generator=torch.Generator().manual_seed(3))
    inputs["timestep"] = torch.tensor([0.7])
    report_path = inspect_module(model, (), inputs).save(tmp_path / "flux.inspect.json")
    curves_path = tmp_path / "curves.json"
    curves_path.write_text(json.dumps(calibration.curves()))
    entry = FluxStrategy.variants[0].calibrations[0]
    entry_path = tmp_path / "entry.json"
    entry_path.write_text(entry.model_dump_json())

    hints = {
        report_path: "an InspectionReport (what `magsdk inspect --json` prints)",
        curves_path: "a curve (norm ratios",
        entry_path: "a strategy's calibration entry",
    }
    for path, kind in hints.items():
        with pytest.raises(UsageError) as info:
            magsdk.CalibrationResult.load(path)
        message = str(info.value)
        assert message.startswith(f"{path} holds {kind}"), message
        assert "not a CalibrationResult" in message and "Extra inputs" not in message
        hint = next(span for span in message.split("`") if "json.load(" in span)  # how to use it for what it is
        assert eval(hint, {"magsdk": magsdk, "json": json}) is not None, hint  # the hint, followed

    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"branches": {"pass0": {"norm_ratios": [1.0, 0.9], "stds": []}}}))
    with pytest.raises(UsageError, match=r"is not a valid CalibrationResult: branches\.pass0\.stds: Extra inputs"):
        magsdk.CalibrationResult.load(odd)


# -- strategy lookup -----------------------------------------------------------------------------------------
def test_a_missing_strategy_path_folder_is_named_with_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "my_strategies"
    monkeypatch.setenv(STRATEGY_PATH_ENV, str(folder))
    with caplog.at_level(logging.WARNING, logger="magsdk.registry"), pytest.raises(StrategyNotFoundError) as info:
        resolve_name("errors_net")
    message = str(info.value)
    assert f"${STRATEGY_PATH_ENV}={str(folder)!r} (not found: {folder} does not exist" in message
    assert "none exist" not in message
    assert [r.getMessage() for r in caplog.records].count(
        f"${STRATEGY_PATH_ENV}: {folder} does not exist, so no strategy is searched there; fix or remove the entry"
    ) == 1

    folder.mkdir()  # the hint, followed
    (folder / "errors_net.py").write_text(STRATEGY)
    assert resolve_name("errors_net")[0].__name__ == "ErrorsNetStrategy"


def test_variant_names_follow_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(StrategyNotFoundError) as info:
        resolve_name(str(tmp_path / "missing.py"))
    message = str(info.value)
    assert "transformer class name. Variant names: " in message and "name Variant names" not in message
    with pytest.raises(StrategyNotFoundError) as info:
        resolve_name("no_such_strategy")
    message = str(info.value)
    assert "works too. Variant names: " in message and ".. Variant" not in message


def test_a_folder_given_as_strategy_says_it_is_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "errors_net.py").write_text(STRATEGY)
    with pytest.raises(StrategyNotFoundError) as info:
        magsdk.enable(tiny_flux(), strategy=f"{folder}/")
    message = str(info.value)
    assert f"strategy {folder} is a folder" in message and "does not exist" not in message
    assert "path/to/module.py" in message and "a variant name" in message
    monkeypatch.setenv(STRATEGY_PATH_ENV, str(folder))  # the hint, followed
    assert resolve_name("errors_net")[0].__name__ == "ErrorsNetStrategy"


def test_a_broken_module_in_a_strategy_folder_is_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "strategies"  # ./strategies/ of the working directory
    folder.mkdir()
    broken = (folder / "broken.py").resolve()
    broken.write_text("import magsdk_no_such_module\n")
    with caplog.at_level(logging.WARNING, logger="magsdk.registry"):
        discover_strategies()
        discover_strategies()
        with pytest.raises(StrategyNotFoundError):
            resolve_name("no_such_strategy")
    warnings = [r.getMessage() for r in caplog.records if "could not import strategy module" in r.getMessage()]
    assert warnings == [f"could not import strategy module {broken}: No module named 'magsdk_no_such_module'"]


# -- the reference pipeline and exports ------------------------------------------------------------------------
def test_load_reference_pipeline_of_an_unreachable_hub_id_says_to_pass_a_local_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MagSDKError) as info:
        load_reference_pipeline("black-forest-labs/FLUX.1-dev")
    message = str(info.value)
    assert message.startswith("could not load the pipeline 'black-forest-labs/FLUX.1-dev': ")
    assert message.endswith("download the model and pass its local folder")


def test_distributed_calibration_error_is_exported() -> None:
    from magsdk import DistributedCalibrationError
    from magsdk.runtime import distributed

    assert DistributedCalibrationError is distributed.DistributedCalibrationError
    assert "DistributedCalibrationError" in magsdk.__all__ and issubclass(DistributedCalibrationError, MagSDKError)
