"""Strategies from anywhere: a file path, a module name, ./strategies/ and $MAGSDK_STRATEGY_PATH, for
`magsdk plan`, `magsdk list` and `magsdk.enable`; and the registries' snapshot / restore."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from bare_model import BareNet

import magsdk
from magsdk.cli import main
from magsdk.errors import StrategyNotFoundError
from magsdk.registry import STRATEGY_PATH_ENV, StrategyRegistry, TransformerBlockRegistry, discover_strategies
from strategies.flux import FluxStrategy

ROOT = Path(__file__).resolve().parent.parent

STRATEGY = '''"""A user's strategy for LookupNet, kept outside the bundled strategies/ package."""

from __future__ import annotations

from magsdk import BlockMetadata, MagCacheStrategy, load_calibrations


class LookupNetStrategy(MagCacheStrategy):
    transformer_cls_name = "LookupNet"
    block_groups = ("blocks",)
    block_metadata = {"Block": BlockMetadata(hidden_states_argument_name="x", output_kind="tensor")}
    threshold = 0.5
    max_skip_steps = 2
    retention_ratio = 0.0
    calibrations = load_calibrations([{"num_steps": 6, "branches": {"default": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}}])
'''


class LookupNet(BareNet):
    """BareNet under the class name the user strategy is for."""


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(STRATEGY_PATH_ENV, raising=False)
    with StrategyRegistry.isolated():
        yield


def write_strategy(folder: Path, name: str = "lookup_net") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(STRATEGY)
    return path


def generation(model: torch.nn.Module, steps: int = 6) -> None:
    """Six calls with falling timesteps: one generation as the runtime tracks it."""
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 16, 4, generator=g), torch.randn(1, 6, 8, generator=g)
    with torch.no_grad():
        for i in range(steps):
            model(latents, context, torch.tensor([1.0 - i / steps]))


def test_plan_and_list_find_a_strategy_by_path_module_name_and_strategy_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = write_strategy(tmp_path / "elsewhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(["plan", "--strategy", "lookup_net", "--steps", "6"]) == 2  # not found yet
    assert "MAGSDK_STRATEGY_PATH" in capsys.readouterr().err

    assert main(["plan", "--strategy", str(elsewhere), "--steps", "6"]) == 0  # a file path
    assert "LookupNetStrategy" in capsys.readouterr().out

    monkeypatch.setenv(STRATEGY_PATH_ENV, str(elsewhere.parent))  # a folder on $MAGSDK_STRATEGY_PATH
    for spec in ("lookup_net", "LookupNet", "LookupNetStrategy"):
        assert main(["plan", "--strategy", spec, "--steps", "6"]) == 0, spec
        assert "LookupNetStrategy" in capsys.readouterr().out
    assert main(["list"]) == 0
    assert "LookupNet" in capsys.readouterr().out
    monkeypatch.delenv(STRATEGY_PATH_ENV)

    project = tmp_path / "project"
    write_strategy(project / "strategies")  # ./strategies/ of the working directory
    write_strategy(project / "my_strategies", "other_net")
    monkeypatch.chdir(project)
    with StrategyRegistry.isolated():
        assert main(["plan", "--strategy", "lookup_net", "--steps", "6"]) == 0
        assert main(["list"]) == 0
        assert "LookupNet" in capsys.readouterr().out
    assert main(["plan", "--strategy", "my_strategies.other_net", "--steps", "6"]) == 0  # a dotted module
    assert "LookupNetStrategy" in capsys.readouterr().out


def test_enable_finds_a_strategy_by_path_module_name_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_strategy(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    model = LookupNet().eval()
    for strategy in (str(path), "mine.lookup_net"):
        with magsdk.enable(model, strategy=strategy) as handle:
            generation(model)
        assert type(handle.strategy).__name__ == "LookupNetStrategy", strategy
        assert handle.stats.total_calls == 6 and handle.stats.skipped_calls > 0

    with StrategyRegistry.isolated():
        monkeypatch.setenv(STRATEGY_PATH_ENV, str(path.parent))
        with magsdk.enable(model, strategy="lookup_net") as handle:
            generation(model)
        assert handle.stats.skipped_calls > 0

    with StrategyRegistry.isolated():
        monkeypatch.delenv(STRATEGY_PATH_ENV)
        write_strategy(tmp_path / "strategies")
        with magsdk.enable(model) as handle:  # no strategy named: found in ./strategies/ for the class
            generation(model)
        assert type(handle.strategy).__name__ == "LookupNetStrategy" and handle.stats.skipped_calls > 0


def test_without_a_strategy_the_error_names_auto_calibrate_and_scaffold(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StrategyNotFoundError) as info:
        magsdk.enable(LookupNet())
    message = str(info.value)
    assert "'LookupNet'" in message and "auto_calibrate=True" in message and "magsdk scaffold --model" in message
    with pytest.raises(StrategyNotFoundError, match="does not exist"):
        StrategyRegistry.resolve(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(StrategyNotFoundError, match="defines no MagCacheStrategy"):
        StrategyRegistry.resolve(str(tmp_path / "empty.py"))


def test_a_folder_strategy_wins_over_the_bundled_one_and_an_explicit_one_over_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (ROOT / "strategies" / "flux.py").read_text().replace("class FluxStrategy", "class FolderFluxStrategy")
    (tmp_path / "strategies").mkdir()
    (tmp_path / "strategies" / "folder_flux.py").write_text(text)
    monkeypatch.chdir(tmp_path)
    discover_strategies()
    registered = StrategyRegistry.get("FluxTransformer2DModel")
    assert registered is not None and registered.__name__ == "FolderFluxStrategy"
    assert StrategyRegistry.origin("FluxTransformer2DModel") == "folder"
    assert StrategyRegistry.resolve("flux") is FluxStrategy  # the shadowed bundled module is still found by name

    class ExplicitFlux(FluxStrategy):
        threshold = 0.3

    discover_strategies()  # rediscovery never replaces what the user defined
    assert StrategyRegistry.get("FluxTransformer2DModel") is ExplicitFlux


def test_snapshot_and_restore_put_both_registries_back() -> None:
    discover_strategies()
    before = StrategyRegistry.snapshot()
    with StrategyRegistry.isolated():

        class Temporary(FluxStrategy):
            transformer_cls_name = "TemporaryTransformer"
            block_metadata = {"TemporaryBlock": FluxStrategy.block_metadata["FluxTransformerBlock"]}

        assert StrategyRegistry.get("TemporaryTransformer") is Temporary
        assert TransformerBlockRegistry.get("TemporaryBlock") is not None
    assert StrategyRegistry.get("TemporaryTransformer") is None
    assert TransformerBlockRegistry.get("TemporaryBlock") is None
    after = StrategyRegistry.snapshot()
    assert after.strategies == before.strategies and after.blocks == before.blocks and after.known == before.known


def test_a_strategies_folder_in_the_working_directory_does_not_hide_the_bundled_ones(tmp_path: Path) -> None:
    """``magsdk scaffold`` writes ``./strategies/<name>.py`` (no ``__init__.py``). In a fresh process whose working
    directory holds it, Python took that folder for the ``strategies`` package (a namespace package found before an
    editable install's finder): no bundled strategy was registered and ``import strategies.flux`` failed."""
    write_strategy(tmp_path / "strategies")
    script = (
        "import json, magsdk\n"
        "magsdk.discover_strategies()\n"
        "registry = magsdk.StrategyRegistry\n"
        "found = {c: registry.origin(c) for c in ('FluxTransformer2DModel', 'WanTransformer3DModel', 'LookupNet')}\n"
        "from strategies.flux import FluxStrategy\n"  # the docs' way to import a bundled strategy
        "from strategies.lookup_net import LookupNetStrategy\n"  # and the user's own, from the same folder name
        "print(json.dumps(found | {'flux': registry.resolve('flux').__name__}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"FluxTransformer2DModel": "bundled", "WanTransformer3DModel": "bundled", "LookupNet": "folder",
                     "flux": "FluxStrategy"}


def test_a_folder_strategy_for_flux_keeps_the_bundled_flux_variant_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Your own FLUX strategy wins for FluxTransformer2DModel; ``flux.1-kontext`` used to vanish with it."""
    text = STRATEGY.replace('"LookupNet"', '"FluxTransformer2DModel"').replace("LookupNetStrategy", "MyFluxStrategy")
    (tmp_path / "strategies").mkdir()
    (tmp_path / "strategies" / "my_flux.py").write_text(text)
    monkeypatch.chdir(tmp_path)
    discover_strategies()
    assert StrategyRegistry.get("FluxTransformer2DModel").__name__ == "MyFluxStrategy"  # type: ignore[union-attr]
    from magsdk.variants import resolve_name

    strategy, variant = resolve_name("flux.1-kontext")
    assert strategy is FluxStrategy and variant is not None and variant.name == "flux.1-kontext"
    plans = {}
    for name in ("flux.1-kontext", "flux.1-dev"):  # both bundled variants still plan from the command line
        assert main(["plan", "--strategy", name, "--steps", "28", "--json"]) == 0
        plans[name] = json.loads(capsys.readouterr().out)
    assert plans["flux.1-kontext"] != plans["flux.1-dev"]  # each its own curve and settings
    assert main(["list", "--json"]) == 0  # both listed: the one enable uses, then the shadowed bundled one
    rows = [(r["module"], r["strategy_class"], r["shadowed_by"]) for r in json.loads(capsys.readouterr().out)
            if r["transformer_cls_name"] == "FluxTransformer2DModel"]
    assert rows == [("strategies/my_flux.py", "MyFluxStrategy", None),
                    ("strategies.flux", "FluxStrategy", "MyFluxStrategy in strategies/my_flux.py")]
