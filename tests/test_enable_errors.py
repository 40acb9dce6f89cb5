"""``magsdk.enable`` refuses what it cannot use, with a hint that works when followed, and leaves nothing attached."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from tiny_models import fresh_copy, tiny_flux

import magsdk
from magsdk.cli import main
from strategies.flux import VARIANTS

FLUX_RATIOS = VARIANTS[0]["calibrations"][0]["branches"]["default"]
CONFIG = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, threshold=0.24, max_skip_steps=5, retention_ratio=0.1)

USER_NET = textwrap.dedent(
    """
    import torch

    class Blk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    class MyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Blk(), Blk()])

        def forward(self, x, t=None):
            for block in self.blocks:
                x = block(x)
            return x
    """
)


@pytest.fixture(scope="module")
def pipe() -> Any:
    from magsdk.reference.components import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def user_net(tmp_path: Path) -> tuple[Path, Any]:
    path = tmp_path / "mynet.py"
    path.write_text(USER_NET)
    spec = importlib.util.spec_from_file_location(f"mynet_{tmp_path.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return path, module.MyNet()


def test_no_blocks_in_a_users_own_class_names_the_inspect_command_that_works(tmp_path: Path, capsys):
    """It said `magsdk inspect MyNet`, which answers "diffusers has no class named 'MyNet'"."""
    path, net = user_net(tmp_path)
    other = magsdk.BlockMetadata(return_hidden_states_index=0)
    with pytest.raises(magsdk.UsageError, match="metadata names Other") as refused:
        magsdk.enable(net, magsdk.MagCacheConfig(mag_ratios=[1.0, 0.9, 0.9]), metadata={"Other": other})
    command = f"magsdk inspect {path}:MyNet"
    assert command in str(refused.value)
    assert "forward" not in net.__dict__
    assert main(command.split()[1:]) == 0  # the hint, followed
    assert "head block: blocks.0" in capsys.readouterr().out


def test_a_vae_or_text_encoder_is_refused_with_what_to_pass(pipe):
    for component in (pipe.vae, pipe.text_encoder):
        with pytest.raises(magsdk.UsageError, match=r"pass the pipeline, or pipe\.transformer"):
            magsdk.enable(component, CONFIG)
        with pytest.raises(magsdk.UsageError, match=type(component).__name__):
            magsdk.enable(component, auto_calibrate=True)
        assert "forward" not in component.__dict__


def test_a_scheduler_that_is_not_one_is_refused():
    model = fresh_copy(tiny_flux())
    for value in ("euler", object()):
        with pytest.raises(magsdk.UsageError, match="scheduler= takes the diffusers scheduler"):
            magsdk.enable(model, CONFIG, scheduler=value)
    assert "forward" not in model.__dict__


def test_a_calibrating_config_is_sent_to_magsdk_calibrate(pipe):
    with pytest.raises(magsdk.UsageError, match=r"with magsdk\.calibrate\(pipe\) as cal"):
        magsdk.enable(pipe, magsdk.MagCacheConfig(calibrate=True))
    assert "forward" not in pipe.transformer.__dict__


def test_metadata_for_a_block_class_the_model_lacks_is_refused(pipe):
    """It was ignored: the strategy's conventions stayed in charge, whatever the user meant to say."""
    meta = magsdk.BlockMetadata(return_hidden_states_index=1, return_encoder_hidden_states_index=0)
    with pytest.raises(magsdk.UsageError, match="metadata names NoSuchBlock") as refused:
        magsdk.enable(pipe, CONFIG, metadata={"NoSuchBlock": meta})
    assert "transformer_blocks" in str(refused.value) and "magsdk inspect FluxTransformer2DModel" in str(refused.value)
    assert "forward" not in pipe.transformer.__dict__
    # keyed by the model's own block class, the same metadata is taken
    with magsdk.enable(pipe, CONFIG, metadata={"FluxSingleTransformerBlock": meta}) as handle:
        assert handle.blocks
    assert "forward" not in pipe.transformer.__dict__


def test_a_calibration_of_a_traced_model_that_ran_nothing_says_what_to_run(tmp_path: Path):
    _, net = user_net(tmp_path)
    with pytest.raises(magsdk.UsageError, match=r"Run the pipeline \(or your loop over the transformer\) inside"):
        with magsdk.calibrate(net):
            pass
    assert "forward" not in net.__dict__


def test_a_one_step_run_is_no_calibration_and_auto_calibration_lets_it_run(tmp_path: Path, monkeypatch):
    from tiny_models import denoise

    model = fresh_copy(tiny_flux())
    with pytest.raises(magsdk.UsageError, match="a calibration needs a run of at least 2 steps"):
        with magsdk.calibrate(model):
            denoise(model, 1)
    monkeypatch.setenv("MAGSDK_CACHE_DIR", str(tmp_path / "cache"))
    config = magsdk.MagCacheConfig(auto_calibrate=True, num_inference_steps=1)
    with magsdk.enable(model, config) as handle:  # it raised a pydantic error from the curve key (steps >= 2)
        denoise(model, 1)
        denoise(model, 1)
        assert handle.stats.computed_calls == 2
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))


@pytest.mark.parametrize("bad", [0, -1, 2.5, "16"])
def test_keep_generations_that_is_not_a_count_is_refused_with_what_it_means(bad):
    model = fresh_copy(tiny_flux())
    with pytest.raises(magsdk.UsageError, match="keep_generations= is how many recent generations"):
        magsdk.enable(model, CONFIG, keep_generations=bad)
    assert "forward" not in model.__dict__


def test_keep_generations_takes_a_numpy_int():
    import numpy as np

    model = fresh_copy(tiny_flux())
    with magsdk.enable(model, CONFIG, keep_generations=np.int64(4)) as handle:
        assert handle.stats.keep_generations == 4
