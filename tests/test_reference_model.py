"""The shipped reference pipeline is a plain diffusers FluxPipeline that draws the digit it is asked for."""

from __future__ import annotations

import json

import pytest
import sklearn  # noqa: F401  (a core dependency: the classifier needs it; missing, the tests fail, not skip)
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from magsdk.reference import (
    DEFAULT_PROMPTS,
    SETTINGS_FILE,
    generate,
    image_grid,
    load_reference_pipeline,
    reference_model_path,
    reference_settings,
)
from magsdk.reference.classifier import digit_classifier
from magsdk.reference.digits import load_digits_data, prompt_label, render
from magsdk.reference.metrics import PSNR_CAP_DB, psnr, ssim

SEEDS = (0, 1, 2)
MIN_ACCURACY = 0.7


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    torch.set_num_threads(2)
    return load_reference_pipeline()


def test_every_component_loads_the_saved_weights() -> None:
    """transformers 5.0-5.5 load this folder's CLIPTextModel with fresh random weights (and no error): two
    loads then differ, the prompts mean nothing and the demo's curve changes per load. This is why
    pyproject.toml asks for transformers >= 5.6."""
    first, second = load_reference_pipeline(), load_reference_pipeline()
    for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        differing = [key for key in a if not torch.equal(a[key], b[key])]
        assert not differing, f"{name} loads different weights each time: {differing[:3]}"


def test_folder_is_a_plain_diffusers_pipeline() -> None:
    folder = reference_model_path()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert not list(folder.rglob("*.py")), "the reference must load without custom code"
    assert not list(folder.rglob("*.bin")), "weights are stored as safetensors"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 8 * 2**20, f"reference folder is {size / 2**20:.1f} MiB; keep it a few MB"
    loaded = DiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(loaded, FluxPipeline)
    assert loaded.transformer.config.guidance_embeds is False


def test_settings_record_training() -> None:
    settings = reference_settings()
    assert (reference_model_path() / SETTINGS_FILE).is_file()
    assert settings.height % 16 == 0 and settings.num_inference_steps > 0
    assert settings.training["flow_steps"] > 0
    assert settings.training["flow_loss_last100"] < 1.0


def test_classifier_reads_real_digits() -> None:
    clf = digit_classifier(reference_settings().height)
    assert clf.holdout_accuracy > 0.95
    ink, labels = load_digits_data()
    images = render(ink[:200], reference_settings().height) * 0.5 + 0.5
    assert clf.accuracy(images, labels[:200]) > 0.95


def test_samples_are_the_prompted_digit(pipe: FluxPipeline) -> None:
    images = generate(pipe, DEFAULT_PROMPTS, SEEDS)
    prompts = [p for p in DEFAULT_PROMPTS for _ in SEEDS]
    assert images.shape == (len(prompts), 3, reference_settings().height, reference_settings().width)
    accuracy = digit_classifier(images.shape[-1]).prompt_accuracy(images, prompts)
    print(f"classifier accuracy on {len(prompts)} generated samples: {accuracy:.3f}")
    assert accuracy >= MIN_ACCURACY
    # a batch is the same images as one at a time (per-image generators)
    single = generate(pipe, DEFAULT_PROMPTS[3:4], SEEDS[1:2])
    torch.testing.assert_close(single[0], images[3 * len(SEEDS) + 1], atol=1e-4, rtol=0)


def test_prompts_change_the_image(pipe: FluxPipeline) -> None:
    images = generate(pipe, DEFAULT_PROMPTS[:2], (5,), num_inference_steps=8)
    assert (images[0] - images[1]).abs().mean() > 0.02
    grid = image_grid(images, columns=2, scale=2)
    assert grid.size[0] > 2 * images.shape[-1]


def test_metrics() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    assert torch.all(psnr(a, a) == PSNR_CAP_DB)
    assert torch.allclose(ssim(a, a), torch.ones(2))
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert 15 < float(psnr(b, a).mean()) < 25
    assert 0 < float(ssim(b, a).mean()) < 1
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1])


def test_prompt_label() -> None:
    assert prompt_label("a handwritten digit seven") == 7
    assert prompt_label("a photo") is None
