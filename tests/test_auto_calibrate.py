"""Zero-config start (``auto_calibrate``) and block metadata found by block class (``TransformerBlockRegistry``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tiny_models import denoise, fresh_copy, tiny_flux

import magsdk
from magsdk.calibration import curve_store
from magsdk.errors import StrategyNotFoundError
from magsdk.runtime import autotrace

STEPS = 8


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MAGSDK_CACHE_DIR", str(folder))
    return folder


def saved_pipeline(folder: Path) -> Path:
    from magsdk.reference.components import build_pipeline

    build_pipeline(seed=0).save_pretrained(folder)
    return folder


def generate(pipe: Any, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        out = pipe("a cat", num_inference_steps=STEPS, height=32, width=32, max_sequence_length=16,
                   output_type="latent", generator=torch.Generator().manual_seed(seed))
    return out.images  # type: ignore[no-any-return]


SECOND_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    import magsdk
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
    pipe.set_progress_bar_config(disable=True)
    if sys.argv[2] != "same":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=float(sys.argv[2]))
    handle = magsdk.enable(pipe, auto_calibrate=True)
    with torch.no_grad():
        pipe("a cat", num_inference_steps=8, height=32, width=32, max_sequence_length=16, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    print(json.dumps({"computed": handle.stats.computed_calls, "skipped": handle.stats.skipped_calls,
                      "steps": handle.stats.computed_steps("cond")}))
    """
)


def test_auto_calibrate_measures_then_caches_and_later_processes_reuse_the_curve(tmp_path, cache_dir):
    from diffusers import DiffusionPipeline

    folder = saved_pipeline(tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    handle = magsdk.enable(pipe, auto_calibrate=True)
    with pytest.raises(magsdk.UsageError, match=r"learns at its first generation: run one, then call handle\.plan"):
        handle.plan(STEPS, "cond")
    generate(pipe)
    assert handle.stats.computed_calls == STEPS and handle.stats.skipped_calls == 0  # generation 1: measured
    with pytest.raises(magsdk.UsageError, match=f"no curve for {STEPS + 2} steps at 64 image tokens yet"):
        handle.plan(STEPS + 2, "cond")
    planned = handle.plan(STEPS, "cond").computed_steps  # the hint, followed: the measured curve's plan
    generate(pipe, seed=1)
    assert handle.stats.skipped_calls > 0  # generation 2: cached with the measured curve
    records = curve_store.records()
    assert len(records) == 1
    path, record = records[0]
    assert path.parent == cache_dir / "curves"
    assert record.key.num_steps == STEPS and record.key.transformer == "FluxTransformer2DModel"
    assert record.result.schedule is not None and len(record.result.schedule.timesteps) == STEPS
    # generation 2 followed the measured curve's own plan (same settings), not the bundled FLUX.1-dev curve's
    assert handle.stats.branches() == ["cond"]
    ran = handle.stats.computed_steps("cond", generation=1)
    measured = magsdk.plan(record.result, handle.config, STEPS, "cond").computed_steps
    assert ran == measured == planned
    handle.disable()
    settings = {name: getattr(handle.config, name) for name in ("threshold", "max_skip_steps", "retention_ratio")}
    with magsdk.enable(pipe, magsdk.MagCacheConfig(**settings)) as bundled:  # the strategy's published curve
        assert bundled.config.mag_ratios is not None and bundled.curves is not None
        assert bundled.plan(STEPS, "cond").computed_steps != measured  # the check above tells the two curves apart

    def second_process(shift: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(folder), shift], capture_output=True,
                              text=True, timeout=300, env=None)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    reused = second_process("same")
    assert reused["skipped"] > 0 and reused["computed"] + reused["skipped"] == STEPS  # found the cached curve
    assert reused["steps"] == measured  # and followed it
    other = second_process("3.0")
    assert other == {"computed": STEPS, "skipped": 0, "steps": list(range(STEPS))}  # another shift: measured anew
    assert len(curve_store.records()) == 2


def test_auto_calibrate_keys_a_generation_by_the_scheduler_it_runs_with(cache_dir):
    """A scheduler swapped in after enable (``pipe.scheduler = ...from_config(..., shift=3)``) is another schedule:
    its first generation measures anew instead of caching with the curve measured on the old one."""
    from magsdk.reference.components import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    with magsdk.enable(pipe, auto_calibrate=True) as handle:
        generate(pipe)
        generate(pipe)
        assert handle.stats.skipped_calls > 0  # shift 1: measured, then cached
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)
        generate(pipe)
        assert handle.stats.computed_steps("cond", generation=2) == list(range(STEPS))  # shift 3: measured
        generate(pipe)
        assert handle.stats.skipped_steps("cond", generation=3)  # and cached with its own curve
    shifts = sorted(record.key.shift.get("shift") for _, record in curve_store.records())
    assert shifts == [1.0, 3.0]


def test_auto_calibrate_on_a_bare_transformer_needs_the_step_count(cache_dir):
    model = tiny_flux(layers=1, single_layers=1)
    with pytest.raises(magsdk.UsageError, match="auto_calibrate keys each curve by the run's step count"):
        magsdk.enable(model, auto_calibrate=True)
    assert "forward" not in model.__dict__  # nothing left half-attached
    with magsdk.enable(model, magsdk.MagCacheConfig(auto_calibrate=True, num_inference_steps=STEPS)) as handle:
        denoise(model, STEPS)
        denoise(model, STEPS)
        assert handle.stats.computed_steps(generation=0) == list(range(STEPS))
        assert handle.stats.skipped_steps(generation=1)


def test_auto_calibrate_announces_a_measured_curve_once(cache_dir, caplog):
    """The file is rewritten as each branch ends (a process may stop right after); the user is told once."""
    model = tiny_flux(layers=1, single_layers=1)
    caplog.set_level(logging.INFO, logger="magsdk")
    with magsdk.enable(model, magsdk.MagCacheConfig(auto_calibrate=True, num_inference_steps=STEPS)):
        denoise(model, STEPS, cfg=True)
    said = [r.getMessage() for r in caplog.records if "measured the curve" in r.getMessage()]
    assert len(said) == 1, said
    [(_, record)] = curve_store.records()
    assert sorted(record.result.branches) == ["pass0", "pass1"]  # both branches in the one file


def test_no_strategy_and_no_curve_names_auto_calibrate_and_scaffold():
    class Unknown(FluxTransformer2DModel):
        pass

    model = tiny_flux(layers=1, single_layers=1)
    model.__class__ = Unknown
    with pytest.raises(StrategyNotFoundError) as error:
        magsdk.enable(model)
    assert "auto_calibrate=True" in str(error.value) and "magsdk scaffold" in str(error.value)


def test_registered_block_classes_serve_a_transformer_without_strategy(caplog):
    """A Flux subclass nobody wrote a strategy for: its blocks are registered by class, so no tracing."""

    class MyFlux(FluxTransformer2DModel):
        pass

    autotrace.forget()
    base = tiny_flux()
    known, unknown = fresh_copy(base), fresh_copy(base)
    unknown.__class__ = MyFlux
    config = magsdk.MagCacheConfig(mag_ratios=[1.0] * 10, threshold=0.5, max_skip_steps=2, retention_ratio=0.1)
    with caplog.at_level(logging.INFO, logger="magsdk"):
        with magsdk.enable(known, config) as a, magsdk.enable(unknown, config) as b:
            assert b.blocks[0] == "transformer_blocks.0 (head)"  # attached at once: nothing to trace
            assert b.metadata_sources == {"transformer": "registry"}
            assert a.metadata_sources == {"transformer": "strategy"}
            assert torch.equal(denoise(known, 10, cfg=True), denoise(unknown, 10, cfg=True))
            assert a.stats.per_branch() == b.stats.per_branch() and b.stats.skipped_calls > 0
    assert not any("inferred from its first call" in r.message for r in caplog.records)
    assert autotrace.known_report(unknown) is None


def test_a_user_registration_by_block_class_is_used(monkeypatch):
    """Registering one block class serves every transformer built from it (as in diffusers)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    class OwnDouble(FluxTransformerBlock):
        pass

    class OwnSingle(FluxSingleTransformerBlock):
        pass

    class OwnFlux(FluxTransformer2DModel):
        pass

    model = tiny_flux()
    model.__class__ = OwnFlux
    for block in model.transformer_blocks:
        block.__class__ = OwnDouble
    for block in model.single_transformer_blocks:
        block.__class__ = OwnSingle
    snapshot = magsdk.TransformerBlockRegistry.snapshot()
    try:
        flux_meta = magsdk.StrategyRegistry.require("FluxTransformer2DModel").block_metadata
        magsdk.TransformerBlockRegistry.register("OwnDouble", flux_meta["FluxTransformerBlock"])
        magsdk.TransformerBlockRegistry.register("OwnSingle", flux_meta["FluxSingleTransformerBlock"])
        config = magsdk.MagCacheConfig(mag_ratios=[1.0] * 10, threshold=0.5, max_skip_steps=2, retention_ratio=0.1)
        with magsdk.enable(model, config, scheduler=FlowMatchEulerDiscreteScheduler()) as handle:
            assert handle.metadata_sources == {"transformer": "registry"}
            assert handle.blocks[-1] == "single_transformer_blocks.1 (tail)"
    finally:
        magsdk.TransformerBlockRegistry.restore(snapshot)


def test_inspect_reports_where_enable_takes_each_groups_conventions_from():
    from tiny_models import flux_inputs

    from magsdk.inspect import inspect_module

    def report_of(model: torch.nn.Module) -> magsdk.InspectionReport:
        inputs = flux_inputs(model)
        inputs.update(hidden_states=torch.randn(1, 16, 4), timestep=torch.tensor([0.5]))
        return inspect_module(model, (), inputs)

    flux = report_of(tiny_flux())
    assert [(g.source, g.agrees_with_inferred) for g in flux.block_groups] == [("strategy", True)] * 2

    class Unregistered(FluxTransformer2DModel):
        pass

    model = tiny_flux()
    model.__class__ = Unregistered
    assert [(g.source, g.agrees_with_inferred) for g in report_of(model).block_groups] == [("registry", True)] * 2
    snapshot = magsdk.TransformerBlockRegistry.snapshot()
    try:
        for name in ("FluxTransformerBlock", "FluxSingleTransformerBlock"):
            magsdk.TransformerBlockRegistry._registry.pop(name, None)
        assert [g.source for g in report_of(model).block_groups] == ["inferred", "inferred"]
    finally:
        magsdk.TransformerBlockRegistry.restore(snapshot)
