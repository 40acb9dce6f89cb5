"""A digit classifier for judging generated images: an RBF SVM on the reference's own training data.

It reads images exactly as ``digits.ink_8x8`` reduces them, after the images went through the
same ``render`` as the model's training set, so a correct sample of the prompted digit scores
like a training image. Training is deterministic and takes well under a second.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from magsdk.reference.digits import ink_8x8, load_digits_data, prompt_label, render


class DigitClassifier:
    """``predict(images)`` -> digit labels for RGB images in [0, 1] (N, 3, H, W)."""

    def __init__(self, image_size: int = 32, holdout: float = 0.25) -> None:
        try:
            from sklearn.svm import SVC
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the digit classifier needs scikit-learn; run `pip install scikit-learn`") from exc
        ink, labels = load_digits_data()
        features = ink_8x8(render(ink, image_size), value_range=(-1.0, 1.0))
        order = np.random.default_rng(0).permutation(len(labels))
        cut = int(len(labels) * (1.0 - holdout))
        train, test = order[:cut], order[cut:]
        probe: Any = SVC(gamma="scale", C=10.0).fit(features[train], labels[train])
        self.holdout_accuracy = float((probe.predict(features[test]) == labels[test]).mean())
        self.model: Any = SVC(gamma="scale", C=10.0).fit(features, labels)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return np.asarray(self.model.predict(ink_8x8(images)), dtype=np.int64)

    def accuracy(self, images: torch.Tensor, labels: Sequence[int]) -> float:
        predicted = self.predict(images)
        return float((predicted == np.asarray(labels, dtype=np.int64)).mean())

    def prompt_accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """Share of images classified as the digit their prompt names (prompts without a digit are skipped)."""
        pairs = [(i, prompt_label(p)) for i, p in enumerate(prompts)]
        kept = [(i, label) for i, label in pairs if label is not None]
        if not kept:
            raise ValueError(f"none of the prompts names a digit (zero..nine): {list(prompts)[:3]}...")
        index = torch.tensor([i for i, _ in kept])
        return self.accuracy(images[index], [label for _, label in kept])


@functools.lru_cache(maxsize=2)
def digit_classifier(image_size: int = 32) -> DigitClassifier:
    """A shared classifier (training it again would give the same one)."""
    return DigitClassifier(image_size)
