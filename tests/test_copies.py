"""Deep copies of objects magsdk patched are plain copies of the unpatched objects.

diffusers' LTX2 pipelines deep-copy their scheduler inside ``__call__`` for the audio stream, and users
deep-copy pipelines. magsdk's wrappers are closures over the original objects: a copy that carried them
set up the *original* scheduler (the LTX2 audio scheduler stayed on its 1000 training timesteps, then an
IndexError in the next generation) and ran the *original* transformer (its own weights never used).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import magsdk
from magsdk.patching import patch_owner
from strategies.flux import VARIANTS

FLUX_RATIOS = VARIANTS[0]["calibrations"][0]["branches"]["default"]
CONFIG = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, threshold=0.24, max_skip_steps=5, retention_ratio=0.1)


@pytest.fixture()
def pipe() -> Any:
    from magsdk.reference.components import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, steps: int = 12) -> torch.Tensor:
    with torch.no_grad():
        out = pipe("a cat", num_inference_steps=steps, height=32, width=32, max_sequence_length=16,
                   output_type="latent", generator=torch.Generator().manual_seed(0))
    return out.images  # type: ignore[no-any-return]


def magsdk_attrs(obj: Any) -> list[str]:
    """The instance attributes that are magsdk's: patched-in calls, and the marker of the handle."""
    return [name for name, value in obj.__dict__.items()
            if patch_owner(value) is not None or (name == "_magsdk_session" and value is not None)]


def test_a_deep_copy_of_an_enabled_pipeline_is_a_plain_pipeline_with_its_own_weights(pipe):
    plain_output = generate(copy.deepcopy(pipe))
    handle = magsdk.enable(pipe, CONFIG)
    cached_output = generate(pipe)
    twin = copy.deepcopy(pipe)
    assert magsdk_attrs(twin.transformer) == [] and magsdk_attrs(twin.scheduler) == []
    assert torch.equal(generate(twin), plain_output)  # every step computed, by the copy's own modules
    with torch.no_grad():
        for parameter in twin.transformer.transformer_blocks.parameters():
            parameter.mul_(1.5)
    assert not torch.equal(generate(twin), plain_output)  # the copy's weights are the ones that run
    assert len(handle.stats.generations()) == 1  # the original's handle saw none of the copy's calls
    assert torch.equal(generate(pipe), cached_output)  # and the original is cached as before
    assert handle.stats.computed_steps(generation=1) == handle.stats.computed_steps(generation=0)
    assert handle.sessions[0].tracker.probe is not None  # still steps by the scheduler, no tensor reads
    handle.disable()
    assert not {"forward", "cache_context", "_magsdk_session"} & pipe.transformer.__dict__.keys()
    assert "set_timesteps" not in pipe.scheduler.__dict__


def test_a_deep_copy_made_after_accelerate_wrapped_magsdk_runs_its_own_weights(pipe):
    """accelerate's offload hook, added after enable, keeps magsdk's forward as ``_old_forward``: the copy's hook
    called the original transformer through the original's cache."""
    captured: list[dict[str, Any]] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: captured.append(dict(kwargs)) if not captured else None, with_kwargs=True
    )
    handle = magsdk.enable(pipe, CONFIG)
    pipe.enable_model_cpu_offload(device="cpu")
    generate(pipe)
    hook.remove()
    twin = copy.deepcopy(pipe.transformer)
    assert patch_owner(twin.__dict__.get("_old_forward")) is None
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.zero_()
    calls = handle.stats.total_calls
    with torch.no_grad():
        out = twin(**captured[0])[0]
    assert float(out.abs().sum()) == 0.0  # zeroed weights: the copy's own ran
    assert handle.stats.total_calls == calls  # and the original's cache saw nothing
    handle.disable()


def test_a_scheduler_deep_copied_during_a_run_is_its_own(pipe):
    """What LTX2Pipeline does: ``audio_scheduler = copy.deepcopy(self.scheduler)``, then sets both up."""
    with magsdk.enable(pipe, CONFIG) as handle:
        expected = generate(pipe)
        audio = copy.deepcopy(pipe.scheduler)
        audio.set_timesteps(8)
        assert len(audio.timesteps) == 8 and len(pipe.scheduler.timesteps) == 12  # the copy set itself up
        assert magsdk_attrs(audio) == []
        assert torch.equal(generate(pipe), expected)
        assert handle.stats.computed_steps(generation=1) == handle.stats.computed_steps(generation=0)


def test_a_disabled_handle_kept_for_its_statistics_does_not_keep_the_pipeline_alive():
    """The handle follows ``pipe.scheduler`` while enabled; once disabled it must not hold the pipeline (and its
    weights) for as long as the user keeps the handle around for its numbers."""
    import gc
    import weakref

    from magsdk.reference.components import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    handle = magsdk.enable(pipe, CONFIG)
    generate(pipe)
    handle.disable()
    alive = weakref.ref(pipe)
    del pipe
    gc.collect()
    assert alive() is None
    assert handle.stats.computed_calls > 0 and handle.scheduler is not None  # what was measured stays readable


def test_an_enabled_pipeline_given_a_scheduler_another_handle_follows_keeps_running():
    """Two enabled pipelines, then one's scheduler given to the other: following it raised DoublePatchError
    from inside the transformer call (the other handle had wrapped its set_timesteps)."""
    from magsdk.reference.components import build_pipeline

    first, second = build_pipeline(seed=0), build_pipeline(seed=1)
    for each in (first, second):
        each.set_progress_bar_config(disable=True)
    with magsdk.enable(first, CONFIG) as handle, magsdk.enable(second, CONFIG):
        generate(first)
        expected = handle.stats.computed_steps(generation=0)
        first.scheduler = second.scheduler
        generate(first)
        generate(first)
        assert handle.stats.computed_steps(generation=1) == handle.stats.computed_steps(generation=2) == expected
        assert handle.sessions[0].tracker.probe is not None  # still steps by the scheduler: no tensor reads
