"""The bundled reference model: a small, really trained FLUX pipeline on handwritten digits.

``load_reference_pipeline()`` returns a plain diffusers ``FluxPipeline`` loaded from the folder
that ships with the package (``tools/train_reference.py`` made it). ``generate`` runs it the way
it was trained to be run (resolution, step count, true CFG against the empty prompt, 16 text
tokens), so that every benchmark and demo compares like with like.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, FluxPipeline
from pydantic import BaseModel, ConfigDict, Field

from magsdk.errors import MagSDKError
from magsdk.reference.components import DIGIT_WORDS
from magsdk.reference.digits import PROMPT_TEMPLATE

REFERENCE_FOLDER = "flux-digits"
SETTINGS_FILE = "reference.json"

DEFAULT_PROMPTS: list[str] = [PROMPT_TEMPLATE.format(word=word) for word in DIGIT_WORDS]


class ReferenceSettings(BaseModel):
    """How the reference is meant to be sampled, and how it was trained (``reference.json``)."""

    model_config = ConfigDict(extra="allow")

    height: int = 32
    width: int = 32
    num_inference_steps: int = 28
    true_cfg_scale: float = 4.0
    negative_prompt: str = ""
    max_sequence_length: int = 16
    prompt_template: str = PROMPT_TEMPLATE
    training: dict[str, Any] = Field(default_factory=dict)


def reference_model_path() -> Path:
    """The folder of the bundled pipeline; raises if the package was installed without it."""
    folder = Path(str(resources.files("magsdk.reference") / REFERENCE_FOLDER))
    if not (folder / "model_index.json").is_file():
        raise MagSDKError(
            f"the bundled reference model is missing: no model_index.json in {folder}; reinstall magsdk with its "
            "package data, or rebuild it with `python tools/train_reference.py`"
        )
    return folder


def reference_settings(path: str | Path | None = None) -> ReferenceSettings:
    folder = Path(path) if path is not None else reference_model_path()
    settings_file = folder / SETTINGS_FILE
    if not settings_file.is_file():
        return ReferenceSettings()
    return ReferenceSettings.model_validate(json.loads(settings_file.read_text()))


def load_reference_pipeline(path: str | Path | None = None, *, progress_bar: bool = False) -> FluxPipeline:
    """The trained reference as a ``diffusers.FluxPipeline`` (float32, CPU)."""
    folder = Path(path) if path is not None else reference_model_path()
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder))
    except Exception as exc:
        from magsdk.calibration.drivers import pipeline_load_error

        raise pipeline_load_error(str(path if path is not None else folder), exc) from exc
    if not isinstance(pipe, FluxPipeline):
        raise MagSDKError(
            f"{folder} holds a {type(pipe).__name__}, not a FluxPipeline; point at a folder written by "
            "tools/train_reference.py"
        )
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


def _settings_for(pipe: Any) -> ReferenceSettings:
    """The settings saved next to the folder ``pipe`` was loaded from, else the defaults."""
    source = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if source and (Path(str(source)) / SETTINGS_FILE).is_file():
        return reference_settings(Path(str(source)))
    return ReferenceSettings()


def generate(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    *,
    num_inference_steps: int | None = None,
    true_cfg_scale: float | None = None,
    settings: ReferenceSettings | None = None,
    batch_size: int | None = None,
    **call_kwargs: Any,
) -> torch.Tensor:
    """Images (len(prompts) * len(seeds), 3, H, W) in [0, 1], prompt-major: every seed of prompt 0 first.

    Each image draws its starting noise from its own seeded generator, so an image does not
    depend on which others share its batch. ``call_kwargs`` go to the pipeline call unchanged.
    """
    s = settings or _settings_for(pipe)
    prompts = list(prompts if prompts is not None else DEFAULT_PROMPTS)
    pairs = [(p, seed) for p in prompts for seed in seeds]
    step = batch_size or len(pairs)
    cfg = s.true_cfg_scale if true_cfg_scale is None else true_cfg_scale
    out: list[torch.Tensor] = []
    for start in range(0, len(pairs), step):
        chunk = pairs[start : start + step]
        kwargs: dict[str, Any] = {
            "prompt": [p for p, _ in chunk],
            "num_inference_steps": num_inference_steps or s.num_inference_steps,
            "height": s.height,
            "width": s.width,
            "max_sequence_length": s.max_sequence_length,
            "generator": [torch.Generator().manual_seed(seed) for _, seed in chunk],
            "output_type": "pt",
        }
        if cfg > 1.0:
            kwargs["negative_prompt"] = [s.negative_prompt] * len(chunk)
            kwargs["true_cfg_scale"] = cfg
        kwargs.update(call_kwargs)
        with torch.no_grad():
            out.append(pipe(**kwargs).images.float().cpu())
    return torch.cat(out)


def image_grid(images: torch.Tensor, columns: int, scale: int = 2, pad: int = 2) -> Any:
    """A PIL image of ``images`` (N, 3, H, W in [0, 1]) in rows of ``columns``, upscaled ``scale`` times."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    hh, ww = h * scale, w * scale
    canvas = torch.full((3, rows * (hh + pad) + pad, columns * (ww + pad) + pad), 0.5)
    big = images.clamp(0, 1).repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = pad + r * (hh + pad), pad + c * (ww + pad)
        canvas[:, y : y + hh, x : x + ww] = big[i]
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


__all__ = [
    "DEFAULT_PROMPTS",
    "REFERENCE_FOLDER",
    "ReferenceSettings",
    "generate",
    "image_grid",
    "load_reference_pipeline",
    "reference_model_path",
    "reference_settings",
]
