"""The user cache of curves (magsdk.calibration.curve_store) and `magsdk scaffold --from-cache`."""

from __future__ import annotations

import ast
import re
import shlex
import sys
from pathlib import Path

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import denoise, tiny_flux

import magsdk
from magsdk.calibration import curve_store
from magsdk.calibration.curve_store import CurveKey
from magsdk.cli import main
from magsdk.codegen import read_calibrations
from magsdk.config import CalibrationResult

STEPS = 6
TOKENS = 16  # denoise() uses 4x4 latents


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(curve_store.CACHE_DIR_ENV, str(folder))
    monkeypatch.setenv("MAGSDK_SKIP_MYPY", "1")  # tests/test_scaffold.py covers mypy on generated modules
    return folder


def calibrated(steps: int = STEPS, shift: float = 1.0) -> tuple[CurveKey, CalibrationResult, dict[str, object]]:
    model = tiny_flux()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    with magsdk.calibrate(model, scheduler=scheduler) as cal:
        denoise(model, steps, scheduler=scheduler)
    assert cal.result is not None
    key = CurveKey.for_objects(model, scheduler, image_tokens=TOKENS, num_steps=steps)
    return key, cal.result, {"transformer_module": type(model).__module__, "transformer_config": dict(model.config)}


def test_the_key_holds_what_a_curve_depends_on() -> None:
    model = tiny_flux()
    shift1, shift3 = FlowMatchEulerDiscreteScheduler(shift=1.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    key = CurveKey.for_objects(model, shift1, image_tokens=TOKENS, num_steps=STEPS)
    assert key == CurveKey.for_objects(tiny_flux(seed=5), shift1, image_tokens=TOKENS, num_steps=STEPS)  # weights aside
    assert key.transformer == "FluxTransformer2DModel" and key.scheduler == "FlowMatchEulerDiscreteScheduler"
    assert key.shift["shift"] == 1.0 and key.shift["use_dynamic_shifting"] is False
    others = [
        CurveKey.for_objects(model, shift3, image_tokens=TOKENS, num_steps=STEPS),
        CurveKey.for_objects(model, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), image_tokens=TOKENS,
                             num_steps=STEPS),
        CurveKey.for_objects(tiny_flux(layers=3), shift1, image_tokens=TOKENS, num_steps=STEPS),
        CurveKey.for_objects(model, shift1, image_tokens=4 * TOKENS, num_steps=STEPS),
        CurveKey.for_objects(model, shift1, image_tokens=TOKENS, num_steps=STEPS + 1),
    ]
    assert len({key.id(), *(k.id() for k in others)}) == 1 + len(others)
    assert re.fullmatch(r"FluxTransformer2DModel-6steps-16tok-[0-9a-f]{16}", key.id())


def test_save_and_find(cache: Path) -> None:
    key, result, extra = calibrated()
    path = curve_store.save(key, result, source="test", **extra)
    assert path.parent == cache / "curves" and path.name == f"{key.id()}.json"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically: no temporary left
    found = curve_store.find(key)
    assert found is not None and found.curves() == result.curves()
    other = key.model_copy(update={"shift": {**key.shift, "shift": 3.0}})
    assert curve_store.find(other) is None  # another shift does not reuse the curve
    path.write_text("{not json")
    assert curve_store.find(key) is None  # a broken file is ignored, not raised


def test_the_default_location_is_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(curve_store.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = {"win32": None, "darwin": tmp_path / "home" / "Library" / "Caches" / "magsdk"}.get(
        sys.platform, tmp_path / "xdg" / "magsdk")
    if expected is not None:
        assert curve_store.cache_dir() == expected


def test_the_store_imports_only_the_standard_library_pydantic_and_config() -> None:
    """The runtime imports it: no torch, no codegen, nothing heavy."""
    tree = ast.parse(Path(curve_store.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    allowed = set(sys.stdlib_module_names) | {"__future__", "pydantic", "magsdk.config"}
    assert {m for m in modules if m.split(".")[0] not in allowed and m not in allowed} == set()
    package_init = Path(curve_store.__file__).with_name("__init__.py").read_text()
    assert not [n for n in ast.parse(package_init).body if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_scaffold_from_cache_writes_a_validated_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["scaffold", "--from-cache", "Flux", "--out", str(out)]) == 2
    assert "auto_calibrate=True" in capsys.readouterr().err and not out.exists()

    key, result, extra = calibrated()
    curve_store.save(key, result, source="1 generation", **extra)
    assert main(["scaffold", "--from-cache", key.id()[:30], "--out", str(out), "--no-test"]) == 0
    module = out / "my_flux.py"  # `flux` is the bundled module's name
    (entry,) = read_calibrations(module.read_text())
    assert entry["num_steps"] == STEPS and key.id() in entry["source"] and entry["shape"] == "16 image tokens"
    assert entry["settings"]["cache_key"] == key.id() and entry["settings"]["shift"] == 1.0
    assert entry["branches"] == {k: [round(v, 5) for v in c] for k, c in result.curves().items()}

    # Two cached curves: the error lists them (newest first) and its example command works as written; the
    # module keeps both entries.
    key8, result8, extra8 = calibrated(steps=8)
    curve_store.save(key8, result8, **extra8)
    capsys.readouterr()
    assert main(["scaffold", "--from-cache", "FluxTransformer2DModel", "--out", str(out), "--no-test"]) == 2
    err = capsys.readouterr().err
    assert key.id() in err and key8.id() in err
    command = shlex.split(re.findall(r"`(magsdk [^`]+)`", err)[-1])[1:]
    assert main([*command, "--out", str(out), "--no-test"]) == 0
    assert sorted(e["num_steps"] for e in read_calibrations(module.read_text())) == [STEPS, 8]


def test_scaffold_from_cache_drops_config_keys_of_another_diffusers_release(tmp_path: Path) -> None:
    """A cached record keeps the model's own config, which (like a folder's config.json) may hold keys the
    installed release's __init__ no longer takes: they are dropped, not refused as a user's --config typo."""
    key, result, extra = calibrated()
    stale = {**extra, "transformer_config": {**extra["transformer_config"], "a_key_of_another_release": 1}}
    curve_store.save(key, result, source="1 generation", **stale)
    assert main(["scaffold", "--from-cache", key.id(), "--out", str(tmp_path / "out"), "--no-test"]) == 0
    assert (tmp_path / "out" / "my_flux.py").is_file()
