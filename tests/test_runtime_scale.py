"""The runtime at real scale: retained memory, bounded statistics, no host sync per call, one patching module.

Memory is measured as the issue defines it: after a generation, walk ``gc.get_objects()`` for
tensors that are not the model's parameters or buffers.
"""

from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers_features import needs_mag_cache
from tiny_models import denoise, diffusers_mag_cache, flux_inputs, tiny_flux

import magsdk
from magsdk.patching import DoublePatchError, Patches
from strategies.flux import VARIANTS

FLUX_RATIOS = VARIANTS[0]["calibrations"][0]["branches"]["default"]  # flux.1-dev
FAST = dict(threshold=0.24, max_skip_steps=5, retention_ratio=0.1)
SIDE, TEXT = 32, 64  # 1024 image tokens + 64 text tokens


def held_tensor_bytes(*models: torch.nn.Module) -> int:
    """Bytes of every live CPU tensor storage that is not a parameter or buffer of ``models``."""
    gc.collect()
    owned = {t.untyped_storage().data_ptr() for m in models for t in [*m.parameters(), *m.buffers()]}
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                pointer = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # fake / meta tensors left behind by torch.compile
                continue
            if pointer not in owned:
                storages[pointer] = storage.nbytes()
    return sum(storages.values())


@pytest.fixture(scope="module")
def mid_flux() -> torch.nn.Module:
    return tiny_flux(layers=4, single_layers=8, heads=4, head_dim=16)  # hidden 64


def retained_after(model: torch.nn.Module, run: Any) -> int:
    before = held_tensor_bytes(model)
    out = run()
    del out
    return held_tensor_bytes(model) - before


@needs_mag_cache
def test_retained_memory_is_one_residual_per_branch_like_diffusers(mid_flux):
    residual_bytes = SIDE * SIDE * 64 * 4  # one image hidden state, fp32

    def generate(model: torch.nn.Module, cfg: bool = False, steps: int = 28) -> torch.Tensor:
        return denoise(model, steps, side=SIDE, text=TEXT, cfg=cfg)

    plain = copy.deepcopy(mid_flux)
    assert retained_after(plain, lambda: generate(plain, steps=2)) == 0

    theirs = copy.deepcopy(mid_flux)
    with diffusers_mag_cache(theirs, FLUX_RATIOS, 0.24, 5, 0.1, 28):
        diffusers_bytes = retained_after(theirs, lambda: generate(theirs))

    ours = copy.deepcopy(mid_flux)
    baseline = held_tensor_bytes(ours)
    handle = magsdk.enable(ours, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST))
    magsdk_bytes = retained_after(ours, lambda: generate(ours))
    assert handle.stats.skipped_calls > 0
    assert magsdk_bytes <= diffusers_bytes * 1.05, (magsdk_bytes, diffusers_bytes)
    assert magsdk_bytes <= residual_bytes * 1.05, (magsdk_bytes, residual_bytes)

    # true CFG as two passes: one residual per branch
    two_branches = retained_after(ours, lambda: generate(ours, cfg=True, steps=10))
    assert two_branches <= 2 * residual_bytes * 1.05
    handle.disable()
    assert held_tensor_bytes(ours) - baseline == 0  # nothing, with the handle still referenced
    assert handle.stats.total_calls == 28 + 20  # and the handle stays readable


def test_nothing_is_held_after_disable_or_a_calibration(mid_flux):
    model = copy.deepcopy(mid_flux)
    baseline = held_tensor_bytes(model)
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST))
    denoise(model, 10, side=SIDE, text=TEXT)
    handle.disable()
    assert held_tensor_bytes(model) - baseline == 0  # the handle is still referenced here

    residual_bytes = SIDE * SIDE * 64 * 4
    with magsdk.calibrate(model) as cal:
        denoise(model, 6, side=SIDE, text=TEXT)
        inside = held_tensor_bytes(model) - baseline
        assert inside <= residual_bytes * 1.05, inside  # the residual the next step compares with, and sums
    assert cal.result is not None and len(cal.result.branches["pass0"].norm_ratios) == 6
    assert held_tensor_bytes(model) - baseline == 0


def test_statistics_keep_counters_for_all_and_records_for_recent_generations():
    model = tiny_flux(layers=1, single_layers=0)
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=[1.0, 1.0], threshold=1.0, max_skip_steps=1,
                                                         retention_ratio=0.0), keep_generations=8)
    inputs = flux_inputs(model, side=2, text=2)
    latents = torch.randn(1, 4, 4)
    with torch.no_grad():
        for _ in range(500):  # 500 two-step generations: the timestep going back up starts the next one
            for t in (1.0, 0.5):
                model(hidden_states=latents, timestep=torch.tensor([t]), **inputs)
    stats = handle.stats
    assert stats.total_calls == 1000 and stats.computed_calls == 500 and stats.skipped_calls == 500
    assert stats.generations_seen == 500
    assert stats.generations() == list(range(492, 500))
    assert len(stats.calls) == 8 * 2
    assert stats.computed_steps() == [0] and stats.skipped_steps() == [1]


# -- no device→host synchronisation per call ------------------------------------------------------------
class HostReads:
    """Counts the tensor reads that wait for the device, made from magsdk's own code.

    ``item``, ``tolist`` and ``numpy`` read values; ``cpu`` copies to the host; ``__float__`` /
    ``__int__`` / ``__index__`` / ``__bool__`` are what ``float(t)``, ``int(t)``, ``range(t)`` / ``x[t]``
    and ``if t:`` call. ``by_name`` says which of them were called.
    """

    NAMES = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__index__", "__bool__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.by_name: dict[str, int] = {}
        root = str(Path(magsdk.__file__).parent)
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor: torch.Tensor, *args: Any, _original: Any = original, _name: str = name,
                        **kwargs: Any) -> Any:
                if sys._getframe(1).f_code.co_filename.startswith(root):
                    self.count += 1
                    self.by_name[_name] = self.by_name.get(_name, 0) + 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_the_host_read_counter_sees_every_kind_of_read_from_magsdk_code_only(monkeypatch):
    """The counter below is what the no-sync tests rest on: each kind of read counts, from magsdk's files only."""
    reads = HostReads(monkeypatch)
    source = (
        "def read_all(t, i):\n"
        "    t.item(); t.tolist(); t.numpy(); t.cpu(); float(t); int(i); [0, 1][i]\n"
        "    if t:\n"
        "        pass\n"
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, str(Path(magsdk.__file__).parent / "counted_here.py"), "exec"), namespace)
    value, index = torch.tensor(1.5), torch.tensor(1)
    namespace["read_all"](value, index)
    assert reads.by_name == {name: 1 for name in HostReads.NAMES}
    value.item(), float(value), bool(value), index.cpu()  # from the test's own code: not counted
    assert reads.count == len(HostReads.NAMES)


@pytest.fixture(scope="module")
def flux_pipe() -> Any:
    from magsdk.reference.components import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, steps: int) -> None:
    with torch.no_grad():
        pipe("a cat", num_inference_steps=steps, height=32, width=32, max_sequence_length=16, output_type="latent",
             generator=torch.Generator().manual_seed(0))


def test_a_pipeline_generation_reads_no_tensor_per_call(flux_pipe, monkeypatch):
    reads = HostReads(monkeypatch)
    with magsdk.enable(flux_pipe, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST)) as handle:
        generate(flux_pipe, 28)
        generate(flux_pipe, 50)
    assert handle.stats.skipped_calls > 0
    assert reads.count == 0, reads.by_name


def test_a_curve_with_a_schedule_reads_the_timesteps_once_per_generation(flux_pipe, monkeypatch):
    with magsdk.calibrate(flux_pipe) as cal:
        generate(flux_pipe, 10)
    assert cal.result is not None and cal.result.schedule is not None
    reads = HostReads(monkeypatch)
    with magsdk.enable(flux_pipe, magsdk.MagCacheConfig(mag_ratios=cal.result, **FAST)) as handle:
        generate(flux_pipe, 10)
        generate(flux_pipe, 28)
    assert handle.stats.total_calls == 38
    assert reads.count == 2, reads.by_name  # the scheduler's timesteps, once per generation: not per call


# -- one patching module ----------------------------------------------------------------------------------
def test_patches_restore_exactly_and_refuse_double_patching():
    model = tiny_flux(layers=1, single_layers=1)
    assert "forward" not in model.__dict__
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS))
    with pytest.raises(DoublePatchError, match=r"FluxTransformer2DModel\.forward is already patched by magsdk"):
        Patches("a second cache").patch(model, "forward", lambda *a, **k: None)
    handle.disable()
    assert not {"forward", "cache_context", "_magsdk_session"} & model.__dict__.keys()

    scheduler = FlowMatchEulerDiscreteScheduler()
    own = scheduler.set_timesteps
    scheduler.__dict__["set_timesteps"] = own  # an instance attribute that was there before: kept as it was
    with magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS), scheduler=scheduler):
        assert scheduler.set_timesteps is not own
    assert scheduler.__dict__["set_timesteps"] is own


def test_a_wrapper_added_after_magsdk_survives_disable_and_magsdk_passes_through():
    model = tiny_flux(layers=1, single_layers=1)
    plain = denoise(copy.deepcopy(model), 10)
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST))
    inner = model.forward
    seen: list[int] = []

    def theirs(*args: Any, **kwargs: Any) -> Any:  # e.g. an offloading hook installed after magsdk
        seen.append(1)
        return inner(*args, **kwargs)

    model.forward = theirs
    handle.disable()
    assert model.forward is theirs  # not clobbered
    assert torch.equal(denoise(model, 10), plain)  # magsdk's wrapper inside is inert
    assert len(seen) == 10 and handle.stats.total_calls == 0
