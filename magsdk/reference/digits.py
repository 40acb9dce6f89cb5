"""The reference model's data: scikit-learn's bundled 8x8 digits, drawn as black ink on white.

Training (``tools/train_reference.py``) and the classifier that checks generated images both go
through these two functions, so a generated image and a training image are compared on the same
footing: ``render`` makes the RGB image the model learns, ``ink_8x8`` turns any image of that
kind back into the 8x8 ink grid the classifier reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from magsdk.reference.components import DIGIT_WORDS

PROMPT_TEMPLATE = "a handwritten digit {word}"
# Other phrasings seen in training, so that nearby prompts also work; the template above is the default.
EXTRA_TEMPLATES = ("the number {word}", "a drawing of the digit {word}", "a handwritten number {word}")


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """``(ink, labels)``: ink in [0, 1], shape (N, 8, 8); 1797 images from scikit-learn (no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the reference digits come from scikit-learn, which is not installed; run `pip install scikit-learn`"
        ) from exc
    data: Any = load_digits()
    ink = np.asarray(data.images, dtype=np.float32) / 16.0
    return ink, np.asarray(data.target, dtype=np.int64)


def render(ink: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """8x8 ink grids -> RGB images (N, 3, size, size) in [-1, 1], black ink on a white page."""
    grid = torch.as_tensor(np.asarray(ink, dtype=np.float32)).reshape(-1, 1, 8, 8)
    up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return (1.0 - 2.0 * up).expand(-1, 3, -1, -1).contiguous()


def ink_8x8(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """RGB images (N, 3, H, W) -> flat 8x8 ink grids (N, 64) in [0, 1], by area averaging."""
    lo, hi = value_range
    x = (images.detach().float().cpu() - lo) / (hi - lo)
    ink = 1.0 - x.clamp(0.0, 1.0).mean(dim=1, keepdim=True)
    small = F.adaptive_avg_pool2d(ink, (8, 8))
    return small.reshape(small.shape[0], 64).numpy()


def caption(label: int, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(word=DIGIT_WORDS[label])


def prompt_label(prompt: str) -> int | None:
    """The digit a prompt asks for (the last digit word in it), or None."""
    found = None
    for word in prompt.lower().split():
        if word in DIGIT_WORDS:
            found = DIGIT_WORDS.index(word)
    return found
