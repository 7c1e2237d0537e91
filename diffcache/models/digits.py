"""The digits data set behind the embedded models: scikit-learn's 8x8 handwritten digits at 32x32.

``sklearn.datasets.load_digits()`` ships 1,797 grayscale 8x8 images (ink 0..16, white digit on black) with
labels 0-9. They are scaled to [0, 1] and upsampled bilinearly to 32x32, one channel. The held-out split is
fixed and stratified: 20 % of each class, drawn with numpy's legacy ``RandomState(SPLIT_SEED)`` (its stream
is frozen across numpy versions), so ``real_digits("test")`` is the same 359 images on every machine.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..optional import require

IMAGE_SIZE = 32
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLITS = ("train", "test", "all")


def upsample(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` images to ``size`` x ``size``, clamped to [0, 1]."""
    if images.shape[-2:] == (size, size):
        return images.clamp(0, 1)
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


@lru_cache(maxsize=1)
def _dataset() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    datasets = require("sklearn.datasets", "eval", "the digits data set")
    digits = datasets.load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return upsample(images), labels, _test_mask(digits.target)


def _test_mask(labels: np.ndarray) -> np.ndarray:
    rng = np.random.RandomState(SPLIT_SEED)
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        n_test = round(TEST_FRACTION * len(idx))
        mask[rng.permutation(idx)[:n_test]] = True
    return mask


def real_digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits with the exact preprocessing and split the embedded models were trained with.

    Args:
        split: ``"train"`` (1,438 images), ``"test"`` (the 359 held-out images) or ``"all"`` (1,797).

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 32, 32)`` in [0, 1] and int64 ``(N,)``, in data set order.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    images, labels, test = _dataset()
    if split == "all":
        keep = torch.ones(len(labels), dtype=torch.bool)
    else:
        keep = torch.from_numpy(test if split == "test" else ~test)
    return images[keep].clone(), labels[keep].clone()
