"""What a run says and does when the first calls show that something given to ``enable`` does not fit.

Metadata that does not fit the model's blocks stops the cache (the model runs plainly, the handle
still disables); a scheduler that is not the one stepping the loop is noticed at once, without a
tensor read per call; and each message names the cause and a next step that works as written.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import torch
from cli_toys import TOY_TRANSFORMER
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import denoise, tiny_flux

import magsdk
from magsdk.cli import main
from magsdk.codegen import import_from_path
from magsdk.errors import BlockLayoutError, UsageError
from magsdk.inspect import inspect_target
from magsdk.registry import StrategyRegistry
from strategies.flux import FluxStrategy

CURVE = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.9, 0.85]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "magsdk"]


def hinted_target(message: str) -> str:
    """The TARGET of ``metadata=inspect_target('TARGET')`` in an error's hint."""
    found = re.search(r"metadata=inspect_target\('([^']+)'\)", message)
    assert found is not None, message
    return found.group(1)


# -- 1. metadata that does not fit: the cache stops, the model runs plainly -----------------------------------
def test_metadata_that_does_not_fit_stops_the_cache_and_its_hint_works() -> None:
    model = tiny_flux()
    plain = copy.deepcopy(model)
    good = FluxStrategy().metadata_lookup(model)
    bad = {k: v.model_copy(update={"output_kind": "tensor"}) for k, v in good.items()}
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=CURVE[:4]), metadata=bad)
    with pytest.raises(BlockLayoutError, match="does not match its metadata") as failed:
        denoise(model, 4)
    message = str(failed.value)
    assert ") ." not in message and "it is not a tensor" in message
    assert "magsdk stopped caching FluxTransformer2DModel" in message and "handle.disable()" in message
    assert "`magsdk inspect FluxTransformer2DModel`" in message

    # nothing half-attached: the model's calls run its own forward, as before enable
    assert "forward" not in model.__dict__
    assert torch.equal(denoise(model, 4), denoise(plain, 4))
    assert torch.equal(denoise(model, 4), denoise(plain, 4))  # and again: no call raises any more
    handle.disable()
    assert "_magsdk_session" not in model.__dict__ and "forward" not in model.__dict__

    # the hint, followed: the conventions inspect infers for the class cache the model
    target = hinted_target(message)
    assert target == "FluxTransformer2DModel"
    with magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=CURVE[:4]), metadata=inspect_target(target)) as fixed:
        denoise(model, 4)
        assert fixed.stats.skipped_calls > 0


def test_a_users_own_class_is_named_by_its_file_in_the_hint(tmp_path: Path) -> None:
    (tmp_path / "toy_model.py").write_text(TOY_TRANSFORMER)
    torch.manual_seed(0)
    toy = import_from_path(tmp_path / "toy_model.py").ToyTransformer()
    bad = {"Block": magsdk.BlockMetadata(hidden_states_argument_name="x", output_kind="tuple")}  # returns a tensor

    def loop(steps: int) -> torch.Tensor:
        x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in torch.linspace(1.0, 0.0, steps + 1)[:-1]:
                x = x - toy(x, t.reshape(1)) / steps
        return x

    handle = magsdk.enable(toy, magsdk.MagCacheConfig(mag_ratios=CURVE), metadata=bad)
    with pytest.raises(BlockLayoutError, match="magsdk stopped caching ToyTransformer") as failed:
        loop(8)
    target = hinted_target(str(failed.value))
    assert target == f"{tmp_path / 'toy_model.py'}:ToyTransformer"
    assert f"`magsdk inspect {target}`" in str(failed.value)
    assert loop(8).shape == (1, 8, 4)  # runs plainly now
    handle.disable()

    assert main(["inspect", target]) == 0  # the command it names works as written
    with magsdk.enable(toy, magsdk.MagCacheConfig(mag_ratios=CURVE), metadata=inspect_target(target)) as fixed:
        loop(8)
        assert fixed.stats.skipped_calls > 0


# -- 2. first-call tracing says in words what it did not find --------------------------------------------------
def test_tracing_a_net_without_sequence_inputs_warns_in_words(caplog: pytest.LogCaptureFixture) -> None:
    class Blk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    class FlatNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Blk(), Blk()])

        def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    net = FlatNet()
    with caplog.at_level(logging.WARNING, logger="magsdk"):
        with magsdk.enable(net, magsdk.MagCacheConfig(mag_ratios=CURVE[:3])):
            net(torch.randn(1, 4))
    (warning,) = [w for w in warnings_of(caplog) if "latents" in w]
    assert "None" not in warning and "[]" not in warning
    assert "no tensor of 3 or more dimensions" in warning and "x of shape (1, 4)" in warning


# -- 3. scheduler= that is not the one the loop steps ----------------------------------------------------------
def test_a_scheduler_nobody_set_is_dropped_at_the_first_call(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_flux()
    ours = FlowMatchEulerDiscreteScheduler()  # the loop sets and steps a scheduler of its own
    with caplog.at_level(logging.WARNING, logger="magsdk"):
        with magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=CURVE), scheduler=ours) as handle:
            denoise(model, 8)
            stats = handle.stats
    assert stats.skipped_calls > 0 and list(stats.curves) == ["transformer:pass0"]  # no fake branches
    (warning,) = warnings_of(caplog)
    assert "not the one stepping this run" in warning and "set_timesteps was never called" in warning
    assert "scheduler=" in warning

    caplog.clear()  # the fix it names: the scheduler the loop steps
    theirs = FlowMatchEulerDiscreteScheduler()
    with caplog.at_level(logging.WARNING, logger="magsdk"):
        with magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=CURVE), scheduler=theirs) as handle:
            denoise(model, 8, scheduler=theirs)
            assert handle.stats.skipped_calls > 0
    assert not warnings_of(caplog)


def test_a_branch_called_twice_at_one_scheduler_step_drops_the_scheduler(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_flux()
    stale = FlowMatchEulerDiscreteScheduler()
    stale.set_timesteps(8)  # set once, never stepped: the loop steps its own
    with caplog.at_level(logging.WARNING, logger="magsdk"):
        with magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=CURVE), scheduler=stale) as handle:
            denoise(model, 8, cfg=True, named_contexts=True)
            stats = handle.stats
    assert sorted(stats.curves) == ["transformer:cond", "transformer:uncond"]
    assert stats.skipped_calls > 0
    (warning,) = warnings_of(caplog)
    assert "not the one stepping this run" in warning and "'cond'" in warning and "None" not in warning


# -- 4. messages: categories and next steps ---------------------------------------------------------------------
def test_a_calibration_with_no_generation_is_a_usage_error_saying_what_to_run() -> None:
    model = tiny_flux()
    with pytest.raises(UsageError, match="recorded nothing") as failed:
        with magsdk.calibrate(model, scheduler=FlowMatchEulerDiscreteScheduler()):
            pass
    assert isinstance(failed.value, BlockLayoutError)  # as it was raised before
    assert "inside the `with` block" in str(failed.value)
    with magsdk.calibrate(model) as cal:  # followed
        denoise(model, 4)
    assert cal.result.num_steps == 4


NO_CALIBRATION = '''
from magsdk import MagCacheStrategy


class NoCalStrategy(MagCacheStrategy):
    transformer_cls_name = "FluxTransformer2DModel"
    block_groups = ("transformer_blocks", "single_transformer_blocks")
'''


def test_a_strategy_without_calibration_is_a_usage_error_whose_hints_work(tmp_path: Path) -> None:
    path = tmp_path / "nocal.py"
    path.write_text(NO_CALIBRATION)
    model = tiny_flux()
    with StrategyRegistry.isolated():
        with pytest.raises(UsageError, match="has no calibration yet") as failed:
            magsdk.enable(model, strategy=str(path))
        message = str(failed.value)
        assert "<file>" not in message and f"magsdk calibrate {path} --model MODEL --steps N" in message
        assert "forward" not in model.__dict__
        with magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=CURVE[:4]), strategy=str(path)) as handle:
            denoise(model, 4)  # hint: pass a curve
            assert handle.stats.skipped_calls > 0
        scheduler = FlowMatchEulerDiscreteScheduler()
        with magsdk.enable(model, strategy=str(path), auto_calibrate=True, scheduler=scheduler) as handle:
            denoise(model, 4, scheduler=scheduler)  # hint: auto_calibrate=True measures one
            denoise(model, 4, scheduler=scheduler)
            assert handle.stats.computed_calls >= 4


def test_the_out_of_range_warning_gives_a_calibration_that_works_as_written(caplog: pytest.LogCaptureFixture) -> None:
    from magsdk.reference.components import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)

    def run(steps: int) -> None:
        pipe("a cat", num_inference_steps=steps, height=32, width=32, max_sequence_length=16, output_type="latent")

    with magsdk.calibrate(pipe) as four:
        run(4)
    with caplog.at_level(logging.WARNING, logger="magsdk"):
        with magsdk.enable(pipe, magsdk.MagCacheConfig(mag_ratios=four.result)):
            run(12)
    (warning,) = [w for w in warnings_of(caplog) if "outside the calibrated" in w]
    assert "magsdk calibrate ..." not in warning  # no placeholder command
    assert "`with magsdk.calibrate(pipe) as cal: pipe(..., num_inference_steps=12)`" in warning
    assert "magsdk.enable(pipe, magsdk.MagCacheConfig(mag_ratios=cal.result))" in warning

    caplog.clear()  # followed
    with magsdk.calibrate(pipe) as cal:
        run(12)
    with caplog.at_level(logging.WARNING, logger="magsdk"):
        with magsdk.enable(pipe, magsdk.MagCacheConfig(mag_ratios=cal.result)):
            run(12)
    assert not [w for w in warnings_of(caplog) if "outside the calibrated" in w]
