"""Export to other engines: diffusers' MagCache (and its block registry) and cache-dit follow magsdk's plan.

Computed steps are observed the same way for every engine: a forward hook on a module inside a
block fires only when that block's own code runs (tests/tiny_models.py ComputeRecorder).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
from diffusers.hooks._helpers import TransformerBlockRegistry as DiffusersRegistry
from diffusers_features import HAS_MAG_CACHE, MAG_CACHE, VERSION, has, needs_mag_cache, require
from library_models import flux as flux_pipeline
from tiny_models import ComputeRecorder, denoise, fresh_copy, tiny_flux

import magsdk
from magsdk.cli import main
from magsdk.inspect import inspect_module
from magsdk.inspect.inputs import synthesize_inputs
from magsdk.inspect.shrink import build_small

HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and the CI machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def diffusers_registry() -> Iterator[None]:
    """Put diffusers' own block table back as it was after a test registers into it."""
    DiffusersRegistry._register()
    saved = dict(DiffusersRegistry._registry)
    yield
    DiffusersRegistry._registry.clear()
    DiffusersRegistry._registry.update(saved)


def _computed_by_diffusers(model: torch.nn.Module, config: Any, steps: int, head: torch.nn.Module) -> list[int]:
    require("diffusers.hooks.apply_mag_cache", MAG_CACHE)(model, config)
    recorder = ComputeRecorder(model, head)
    denoise(model, steps)
    recorder.remove()
    return recorder.computed_steps()


# -- diffusers --------------------------------------------------------------------------------------
@needs_mag_cache
@pytest.mark.parametrize("steps", [20, 28])
def test_diffusers_with_the_exported_config_computes_magsdk_steps_on_flux(steps: int) -> None:
    model = tiny_flux()
    scheduler = FlowMatchEulerDiscreteScheduler()  # tells magsdk the run's step count, as a pipeline's does
    scheduler.set_timesteps(steps)
    run_timesteps = [float(t) for t in scheduler.timesteps]  # not FLUX.1-dev's own schedule: the curve is mapped
    exported = magsdk.to_diffusers_config("flux.1-dev", num_inference_steps=steps, timesteps=run_timesteps)
    assert len(exported.mag_ratios) == steps  # already mapped to the run: diffusers resamples nothing
    diffusers_model = fresh_copy(model)
    theirs = _computed_by_diffusers(diffusers_model, exported, steps, diffusers_model.transformer_blocks[0])

    ours_model = fresh_copy(model)
    recorder = ComputeRecorder(ours_model, ours_model.transformer_blocks[0])
    with magsdk.enable(ours_model, strategy="flux.1-dev", scheduler=scheduler) as handle:
        denoise(ours_model, steps, scheduler=scheduler)
        expected = handle.plan(steps).computed_steps
    assert recorder.computed_steps() == handle.stats.computed_steps() == expected == theirs
    assert len(theirs) < steps  # it skips


@needs_mag_cache
def test_exported_config_follows_overridden_settings_and_configs() -> None:
    config = magsdk.MagCacheConfig(mag_ratios=[1.0, 1.02, 1.01, 0.99, 0.98, 0.97], threshold=0.3,
                                   max_skip_steps=2, retention_ratio=0.0)
    exported = magsdk.to_diffusers_config(config, num_inference_steps=12)
    assert exported.threshold == 0.3 and exported.max_skip_steps == 2 and exported.retention_ratio == 0.0
    assert exported.mag_ratios.tolist() == pytest.approx(magsdk.plan(None, config, 12).curve)
    with pytest.raises(magsdk.UsageError, match="calibrate=True"):
        magsdk.to_diffusers_config(magsdk.MagCacheConfig(calibrate=True), num_inference_steps=12)
    with pytest.raises(magsdk.UsageError, match="no MagCache strategy found for 'nope'"):
        magsdk.to_diffusers_config("nope", num_inference_steps=12)


def _tiny(class_name: str) -> tuple[torch.nn.Module, dict[str, Any], magsdk.InspectionReport]:
    """A tiny transformer of a diffusers class, synthesized inputs, and what magsdk inspect infers for it."""
    import diffusers

    model, _ = build_small(getattr(diffusers, class_name))
    args, kwargs = synthesize_inputs(model)
    assert not args
    return model, kwargs, inspect_module(model, args, kwargs)


def _run(model: torch.nn.Module, kwargs: dict[str, Any], steps: int, context: str | None = None) -> None:
    with torch.no_grad():
        for i in range(steps):
            t = kwargs["timestep"] * (1.0 - i / steps)  # a new, smaller timestep per step
            with model.cache_context(context) if context else contextlib.nullcontext():  # type: ignore[operator]
                model(**{**kwargs, "timestep": t})


def _not_in_diffusers_table(report: magsdk.InspectionReport) -> set[str]:
    classes = {g.block_class for g in report.block_groups}
    assert classes and not any(c.__name__ in classes for c in DiffusersRegistry._registry)
    return classes


@needs_mag_cache
def test_register_with_diffusers_runs_its_magcache_on_a_class_its_table_lacks(diffusers_registry: None) -> None:
    # ChromaTransformer2DModel: dual-stream blocks returning a tuple, single-stream blocks returning a tensor.
    apply_mag_cache = require("diffusers.hooks.apply_mag_cache", MAG_CACHE)
    model, kwargs, report = _tiny("ChromaTransformer2DModel")
    classes = _not_in_diffusers_table(report)
    steps = 12
    config = magsdk.MagCacheConfig(mag_ratios=[1.0, 1.05, 1.02, 1.01, 1.0, 0.99, 0.99, 0.98, 0.97, 0.95],
                                   threshold=0.1, max_skip_steps=3, retention_ratio=0.2)
    exported = magsdk.to_diffusers_config(config, num_inference_steps=steps)
    with pytest.raises(ValueError, match="not registered"):
        apply_mag_cache(fresh_copy(model), exported)

    result = magsdk.register_with_diffusers(report, model=model)
    assert sorted(result.registered) == sorted(classes) and not result.kept and not result.unreachable_groups

    theirs_model = fresh_copy(model)
    apply_mag_cache(theirs_model, exported)
    theirs = ComputeRecorder(theirs_model, theirs_model.get_submodule(report.head))
    _run(theirs_model, kwargs, steps)

    ours_model = fresh_copy(model)
    ours = ComputeRecorder(ours_model, ours_model.get_submodule(report.head))
    # A bare loop has no scheduler to tell magsdk the step count: the config says it.
    with magsdk.enable(ours_model, config.model_copy(update={"num_inference_steps": steps}), metadata=report):
        _run(ours_model, kwargs, steps)
    expected = magsdk.plan(None, config, steps).computed_steps
    assert ours.computed_steps() == theirs.computed_steps() == expected
    assert len(expected) < steps


def test_register_with_diffusers_runs_its_first_block_cache_on_a_class_its_table_lacks(
    diffusers_registry: None,
) -> None:
    # SkyReelsV2Transformer3DModel: one block list, tensor outputs (FirstBlockCache wants one output form).
    require("diffusers.SkyReelsV2Transformer3DModel")
    model, kwargs, report = _tiny("SkyReelsV2Transformer3DModel")
    _not_in_diffusers_table(report)
    with pytest.raises(ValueError, match="not registered"):
        apply_first_block_cache(fresh_copy(model), FirstBlockCacheConfig(threshold=0.05))
    magsdk.register_with_diffusers(report, model=model)
    fbc_model = fresh_copy(model)
    apply_first_block_cache(fbc_model, FirstBlockCacheConfig(threshold=10.0))  # a huge threshold: reuse after step 0
    first = ComputeRecorder(fbc_model, fbc_model.get_submodule(report.head))
    last = ComputeRecorder(fbc_model, fbc_model.get_submodule(report.tail))
    _run(fbc_model, kwargs, 6, context="cond")  # FirstBlockCache keeps its state per named cache context
    assert first.computed_steps() == list(range(6))  # it always runs the first block
    assert last.computed_steps() == [0]  # and reused the rest of the stack afterwards


def test_register_with_diffusers_keeps_diffusers_entries_and_finds_classes_by_name(diffusers_registry: None) -> None:
    before = {cls: meta for cls, meta in DiffusersRegistry._registry.items() if cls.__name__.startswith("Flux")}
    result = magsdk.register_with_diffusers("flux")  # no model: block classes found in diffusers' module
    assert sorted(result.kept) == ["FluxSingleTransformerBlock", "FluxTransformerBlock"] and not result.registered
    assert all(DiffusersRegistry._registry[cls] is meta for cls, meta in before.items())
    replaced = magsdk.register_with_diffusers("flux", replace=True)
    assert sorted(replaced.registered) == ["FluxSingleTransformerBlock", "FluxTransformerBlock"]
    with pytest.raises(magsdk.UsageError, match="model=pipe_or_transformer"):
        magsdk.register_with_diffusers({"NoSuchBlock": magsdk.BlockMetadata()})


def test_register_with_diffusers_writes_argument_names_only_where_diffusers_has_the_fields(
    diffusers_registry: None,
) -> None:
    """diffusers < 0.37 reads `hidden_states` / `encoder_hidden_states` by name; another name cannot go there."""
    model = tiny_flux()
    renamed = {"FluxSingleTransformerBlock": magsdk.BlockMetadata(hidden_states_argument_name="x")}
    plain = {"FluxSingleTransformerBlock": magsdk.BlockMetadata()}
    assert magsdk.register_with_diffusers(plain, model=model, replace=True).registered == ["FluxSingleTransformerBlock"]
    single = next(c for c in DiffusersRegistry._registry if c.__name__ == "FluxSingleTransformerBlock")
    if has("diffusers.hooks.MagCacheConfig"):  # the release that added MagCache added the argument names
        magsdk.register_with_diffusers(renamed, model=model, replace=True)
        assert DiffusersRegistry._registry[single].hidden_states_argument_name == "x"
    else:
        with pytest.raises(magsdk.UsageError, match=rf"diffusers {VERSION}'s hooks only read one named 'hidden_states'"
                           r".*diffusers>=0\.37"):
            magsdk.register_with_diffusers(renamed, model=model, replace=True)


def test_exporting_to_a_diffusers_without_magcache_says_which_release_has_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """On diffusers < 0.37 (for real in CI's oldest environment; here by removing the name) export exits 2."""
    import diffusers.hooks

    monkeypatch.delattr(diffusers.hooks, "MagCacheConfig", raising=False)
    with pytest.raises(magsdk.UsageError, match=r"no MagCache to export to .*diffusers>=0\.37.*magsdk\.enable"):
        magsdk.to_diffusers_config("flux.1-dev", num_inference_steps=20)
    assert main(["export", "--strategy", "flux.1-dev", "--steps", "20"]) == 2
    assert "pip install 'diffusers>=0.37'" in capsys.readouterr().err
    assert main(["export", "--strategy", "flux.1-dev", "--to", "cache-dit", "--steps", "20", "--json"]) == 0


# -- cache-dit --------------------------------------------------------------------------------------
def test_cache_dit_mask_is_the_plan() -> None:
    exported = magsdk.to_cache_dit("wan2.1-t2v-1.3b", num_inference_steps=30)
    computed = magsdk.plan(None, magsdk.MagCacheStrategy.default_config(
        30, variant=magsdk.StrategyRegistry.require("WanTransformer3DModel").variant_named("wan2.1-t2v-1.3b")), 30)
    assert [i for i, m in enumerate(exported.steps_computation_mask) if m] == computed.computed_steps
    assert exported.settings["steps_computation_policy"] == "static"
    assert exported.settings["steps_computation_mask"] == exported.steps_computation_mask


@pytest.mark.skipif(not HAS_CACHE_DIT, reason="cache-dit is not installed (pip install cache-dit, or magsdk[bench])")
def test_cache_dit_with_the_exported_mask_computes_magsdk_steps() -> None:
    import cache_dit

    steps = 12
    exported = magsdk.to_cache_dit("flux.1-dev", num_inference_steps=steps)
    pipe, call = flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # cache-dit always runs its first block (Fn_compute_blocks >= 1): observe the last block of the stack.
    tail = pipe.transformer.single_transformer_blocks[-1]
    recorder = ComputeRecorder(pipe.transformer, tail)
    cache_dit.enable_cache(pipe, cache_config=exported.config(enable_separate_cfg=False))
    try:
        pipe(num_inference_steps=steps, **call)
    finally:
        cache_dit.disable_cache(pipe)
    expected = [i for i, m in enumerate(exported.steps_computation_mask) if m]
    assert recorder.computed_steps() == expected == magsdk.plan(
        None, magsdk.StrategyRegistry.require("FluxTransformer2DModel").default_config(steps, variant="flux.1-dev"),
        steps).computed_steps
    assert len(expected) < steps


# -- the command ------------------------------------------------------------------------------------
def test_export_command(capsys: pytest.CaptureFixture[str]) -> None:
    if HAS_MAG_CACHE:
        assert main(["export", "--strategy", "flux.1-dev", "--steps", "20", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["num_inference_steps"] == 20 and len(data["mag_ratios"]) == 20 and data["threshold"] == 0.24
        assert data["register_with_diffusers"] == []  # diffusers knows Flux's blocks
        assert main(["export", "--strategy", "flux.1-dev", "--steps", "20"]) == 0
        assert "apply_mag_cache(pipe.transformer, MagCacheConfig(" in capsys.readouterr().out
    else:  # a diffusers without MagCache: the diffusers target says which release has one
        assert main(["export", "--strategy", "flux.1-dev", "--steps", "20"]) == 2
        assert "diffusers>=0.37" in capsys.readouterr().err
    assert main(["export", "--strategy", "wan2.1-t2v-1.3b", "--to", "cache-dit", "--steps", "30", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps_computation_mask"] == magsdk.to_cache_dit("wan2.1-t2v-1.3b", 30).steps_computation_mask
    assert main(["export", "--strategy", "flux.1-dev", "--to", "tensorrt"]) == 2
    assert "--to 'tensorrt'" in capsys.readouterr().err
    assert main(["export", "--strategy", "wan", "--steps", "30"]) == 2  # which Wan? the error lists them
    assert "wan2.1-t2v-14b" in capsys.readouterr().err
