"""An installed wheel (not only an editable checkout) carries the templates, strategies and reference model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    return next(out.glob("magsdk-*.whl"))


def test_wheel_lists_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("magsdk", "magsdk/runtime", "magsdk/inspect", "magsdk/codegen", "magsdk/calibration",
                    "magsdk/commands", "magsdk/reference", "magsdk/templates", "magsdk/workflow", "strategies"):
        assert f"{package}/__init__.py" in names, package
    for data in ("magsdk/templates/strategy.py.j2", "magsdk/templates/test_strategy.py.j2",
                 "strategies/flux.py", "strategies/flux2_klein.py", "magsdk/py.typed",
                 "magsdk/reference/flux-digits/model_index.json", "magsdk/reference/flux-digits/reference.json",
                 "magsdk/reference/flux-digits/transformer/diffusion_pytorch_model.safetensors",
                 "magsdk/reference/flux-digits/tokenizer/tokenizer.json"):
        assert data in names, data
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "magsdk").rglob("*.py")}
    missing = sorted(p for p in on_disk if p not in names)
    assert not missing, f"modules left out of the wheel: {missing}"


def test_installed_wheel_finds_its_resources(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = (
        "import magsdk, magsdk.codegen.render as r, importlib.resources as ir;"
        "from magsdk.reference import reference_model_path;"
        f"assert magsdk.__file__.startswith({str(target)!r}), magsdk.__file__;"
        "assert (ir.files('magsdk.templates') / 'strategy.py.j2').is_file();"
        "assert (reference_model_path() / 'model_index.json').is_file();"
        "print(sorted(magsdk.StrategyRegistry.all()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FluxTransformer2DModel" in proc.stdout and "Flux2Transformer2DModel" in proc.stdout
