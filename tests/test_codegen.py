"""Rendering, patching and validating strategy modules (no model runs here, except the runtime test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import denoise, tiny_flux

import magsdk
from magsdk import BlockGroupReport, CalibrationEntry, InspectionReport
from magsdk.codegen import (
    StrategyFileError,
    StrategyValidationError,
    TemplateRenderError,
    format_calibrations,
    import_from_path,
    isolated_registry,
    read_calibrations,
    render_strategy,
    spec_from_report,
    spec_from_strategy,
    strategies_in,
    upsert_calibration,
    validate_strategy_text,
    write_validated,
)
from magsdk.codegen.patch import strip_calibrations
from magsdk.codegen.render import class_name_for, default_module_name
from magsdk.config import InspectionNote
from magsdk.registry import StrategyRegistry, discover_strategies
from strategies.flux import FluxStrategy
from strategies.flux2_klein import Flux2KleinStrategy

ROOT = Path(__file__).resolve().parent.parent


def flux_report(warnings: list[str] | None = None) -> InspectionReport:
    groups = [("transformer_blocks", "FluxTransformerBlock"),
              ("single_transformer_blocks", "FluxSingleTransformerBlock")]
    return InspectionReport(
        transformer="FluxTransformer2DModel",
        block_groups=[
            BlockGroupReport(path=path, block_class=cls, count=2, metadata=FluxStrategy.block_metadata[cls])
            for path, cls in groups
        ],
        head="transformer_blocks.0",
        tail="single_transformer_blocks.1",
        warnings=warnings or [],
    )


def entry(steps: int, first: float = 1.0, value: float = 1.01, source: str = "test") -> CalibrationEntry:
    return CalibrationEntry(
        num_steps=steps,
        branches={"cond": [first] + [value] * (steps - 1)},
        spread={"cond": [0.0] + [0.001] * (steps - 1)},
        timesteps=[1.0 - i / steps for i in range(steps)],
        source=source,
        num_prompts=1,
        num_seeds=1,
    )


# -- names and rendering ----------------------------------------------------------------------------
def test_names_from_transformer_classes() -> None:
    assert default_module_name("FluxTransformer2DModel") == "flux"
    assert default_module_name("QwenImageTransformer2DModel") == "qwen_image"
    assert default_module_name("SD3Transformer2DModel") == "sd3"
    assert default_module_name("WanTransformer3DModel") == "wan"
    assert class_name_for("flux2_klein") == "Flux2KleinStrategy"


@pytest.mark.parametrize("module_name, strategy", [("flux", FluxStrategy), ("flux2_klein", Flux2KleinStrategy)])
def test_bundled_strategies_are_the_template_rendered(module_name: str, strategy: type) -> None:
    """tools/regen_strategies.py has been run: each bundled module is exactly the template's output."""
    path = ROOT / "strategies" / f"{module_name}.py"
    module = __import__(f"strategies.{module_name}", fromlist=["_"])
    spec = spec_from_strategy(strategy, module_name=module_name, model=strategy.transformer_cls_name,
                              docstring=module.__doc__)
    assert render_strategy(spec) == path.read_text()
    assert "curve" in (module.__doc__ or "")  # the docstring still names where the curve comes from


def test_rendered_module_validates_and_is_byte_stable(tmp_path: Path) -> None:
    spec = spec_from_report(flux_report(), model="FluxTransformer2DModel", module_name="my_flux",
                            calibrations=[entry(6)])
    text = render_strategy(spec)
    assert text == render_strategy(spec)
    assert "class MyFluxStrategy(MagCacheStrategy):" in text
    check = validate_strategy_text(text, "my_flux.py", expected_transformer="FluxTransformer2DModel")
    assert check.mypy == "passed"
    assert check.calibrations[0].branches["cond"] == [1.0] + [1.01] * 5
    # Rendering empty and patching the entry in gives the same bytes as rendering with the entry.
    empty = render_strategy(spec.model_copy(update={"calibrations": []}))
    assert "CALIBRATIONS: list[dict[str, Any]] = []" in empty
    assert upsert_calibration(empty, entry(6)) == text


def test_validation_leaves_the_registry_as_it_was() -> None:
    discover_strategies()
    before = StrategyRegistry.get("FluxTransformer2DModel")
    text = render_strategy(spec_from_report(flux_report(), model="m", module_name="other", calibrations=[entry(4)]))
    validate_strategy_text(text, "other.py", mypy=False)
    assert StrategyRegistry.get("FluxTransformer2DModel") is before is FluxStrategy


def test_template_error_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "strategy.py.j2").write_text('"""{{ docstring }}"""\nx = {{ no_such_variable }}\n')
    monkeypatch.setenv("MAGSDK_TEMPLATE_DIR", str(tmp_path))
    with pytest.raises(TemplateRenderError, match="no_such_variable"):
        render_strategy(spec_from_report(flux_report(), model="m"))
    (tmp_path / "strategy.py.j2").write_text("{% for x in %}\n")
    with pytest.raises(TemplateRenderError, match="syntax error at line 1"):
        render_strategy(spec_from_report(flux_report(), model="m"))
    (tmp_path / "strategy.py.j2").write_text("def broken(:\n")
    with pytest.raises(TemplateRenderError, match="invalid Python"):
        render_strategy(spec_from_report(flux_report(), model="m"))


def test_unsupported_layout_renders_a_stub_that_raises(tmp_path: Path) -> None:
    warning = "single_transformer_blocks: the last block returns a layout the runtime cannot handle (packed tokens)"
    report = flux_report([warning]).model_copy(
        update={"notes": [InspectionNote(code="residual-undefined", message=warning)]}
    )
    spec = spec_from_report(report, model="m", module_name="stubbed", calibrations=[entry(4)])
    text = render_strategy(spec)
    assert "def compute_residual(" in text and "raise BlockLayoutError(" in text
    assert "packed tokens" in text
    path = tmp_path / "stubbed.py"
    write_validated(path, text, expected_transformer="FluxTransformer2DModel")  # parses, imports, mypy --strict
    with isolated_registry():
        (cls,) = strategies_in(import_from_path(path))
        with pytest.raises(magsdk.BlockLayoutError, match="compute_residual is a stub"):
            cls().compute_residual(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), FluxStrategy.block_metadata[
                "FluxTransformerBlock"])


# -- patching ---------------------------------------------------------------------------------------
def test_patch_replaces_one_entry_and_keeps_every_other_byte() -> None:
    source = (ROOT / "strategies" / "flux.py").read_text()
    edited = source.replace("class FluxStrategy", "# my own note\nclass FluxStrategy").replace(
        "threshold = 0.06", "threshold = 0.1  # tuned by hand")
    with_28 = upsert_calibration(edited, entry(28))  # the bundled module's own CALIBRATIONS start empty
    with_4 = upsert_calibration(with_28, entry(4))
    with_50 = upsert_calibration(with_4, entry(50))
    assert strip_calibrations(with_50) == strip_calibrations(edited)
    assert "# my own note" in with_50 and "threshold = 0.1  # tuned by hand" in with_50
    assert [e["num_steps"] for e in read_calibrations(with_50)] == [4, 28, 50]
    start = source.index("VARIANTS: list")
    published = source[start:source.index("\n]\n", start)]
    assert published in with_50  # the published curves (VARIANTS) are untouched, byte for byte
    refreshed = upsert_calibration(with_50, entry(4, value=1.2))
    assert read_calibrations(refreshed)[0]["branches"]["cond"][1] == 1.2
    assert refreshed.replace("1.2,", "1.01,") == with_50
    assert upsert_calibration(refreshed, entry(4)) == with_50


def test_patch_rounds_to_five_decimals_and_handles_odd_layouts() -> None:
    value = entry(3).model_copy(update={"branches": {"cond": [1.0, 1.123456789, 0.98765432]}})
    single_line = 'CALIBRATIONS = [{"num_steps": 8, "branches": {"a": [1.0] * 8}}]  # keep\n'
    with pytest.raises(StrategyFileError, match="not a plain literal"):
        upsert_calibration(single_line, value)
    single_line = 'CALIBRATIONS = [{"num_steps": 8, "branches": {"a": [1.0, 1.0]}}]  # keep\n'
    patched = upsert_calibration(single_line, value)
    assert patched.endswith("]  # keep\n")
    assert [e["num_steps"] for e in read_calibrations(patched)] == [3, 8]
    assert read_calibrations(patched)[0]["branches"]["cond"] == [1.0, 1.12346, 0.98765]
    assert format_calibrations([]) == "[]"


def test_patch_reports_files_it_cannot_rewrite() -> None:
    with pytest.raises(StrategyFileError, match=r"not valid Python \(line 2"):
        upsert_calibration("CALIBRATIONS = []\nclass Broken(:\n", entry(4))
    with pytest.raises(StrategyFileError, match="no module-level"):
        upsert_calibration("x = 1\n", entry(4))
    with pytest.raises(StrategyFileError, match="must be a list literal"):
        upsert_calibration("CALIBRATIONS = load()\n", entry(4))


# -- validation -------------------------------------------------------------------------------------
def _flux_text(**changes: str) -> str:
    text = render_strategy(spec_from_report(flux_report(), model="m", module_name="checked", calibrations=[entry(4)]))
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('"cond": [\n                1.0,', '"cond": [\n                1.5,', r"first ratio must be 1\.0"),
        ("1.01, 1.01, 1.01,", "1.01, -1.01, 1.01,", "finite positive"),
        ("1.01, 1.01, 1.01,", "1.01, 1.01,", "has 3 values but num_steps is 4"),
        ('"num_steps": 4', '"num_steps": float("nan")', "not a plain literal"),
        ("calibrations = load_calibrations(CALIBRATIONS)", "calibrations = []", "does not hold the CALIBRATIONS"),
        ("threshold = 0.06", 'threshold = "high"', r"mypy --strict fails"),
        ("from magsdk import", "import nothing_here_at_all\nfrom magsdk import", "does not import"),
    ],
)
def test_validation_failures_say_why(old: str, new: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "checked.py"
    good = _flux_text()
    path.write_text(good)
    with pytest.raises((StrategyValidationError, StrategyFileError), match=message):
        write_validated(path, _flux_text(**{old: new}))
    assert path.read_text() == good  # the previous file is untouched


def test_two_entries_with_one_step_count_are_rejected() -> None:
    text = _flux_text()
    literal = format_calibrations([entry(4)])
    body = literal[2:-2]  # "    {...},"
    doubled = text.replace(literal, f"[\n{body}\n{body}\n]")
    with pytest.raises(StrategyValidationError, match="same step count"):
        validate_strategy_text(doubled, "checked.py", mypy=False)


# -- runtime use of several calibrations ------------------------------------------------------------
def test_runtime_uses_the_entry_calibrated_at_the_runs_step_count() -> None:
    """A 50-step entry next to a 28-step one: a 50-step run follows the 50-step curve, not a resampled 28."""
    never_skip = CalibrationEntry(num_steps=28, branches={"default": [1.0] + [1.5] * 27})
    skip_often = CalibrationEntry(num_steps=50, branches={"default": [1.0] + [1.001] * 49})
    with isolated_registry():

        class TwoCurves(FluxStrategy):
            calibrations = [never_skip, skip_often]

        model = tiny_flux()
        scheduler = FlowMatchEulerDiscreteScheduler()  # the pipeline's scheduler tells the run's step count
        with magsdk.enable(model, strategy=TwoCurves, scheduler=scheduler) as handle:
            denoise(model, 50, scheduler=scheduler)
            expected = magsdk.plan(skip_often.branches["default"], TwoCurves.default_config(50), 50)
            assert handle.stats.computed_steps() == expected.computed_steps
            assert handle.stats.skipped_calls == len(expected.skipped_steps) > 0
            handle.stats.reset()
            denoise(model, 28, scheduler=scheduler)
            assert handle.stats.skipped_calls == 0  # the 28-step curve never skips
            assert handle.stats.computed_steps() == list(range(28))


def test_atomic_write_keeps_the_file_mode(tmp_path):
    import os
    import stat

    from magsdk.config import atomic_write_text

    fresh = tmp_path / "fresh.py"
    atomic_write_text(fresh, "x = 1\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    fresh.chmod(0o640)
    atomic_write_text(fresh, "x = 2\n")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and fresh.read_text() == "x = 2\n"
