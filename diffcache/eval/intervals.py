"""95% intervals for quality claims: a percentile bootstrap over images, and its paired version for "A beats B".

A claim that method A beats method B is made only when the paired interval of ``A - B`` on the same seeds
(the same images, generated from the same noise) excludes zero; independent intervals that merely overlap or
not say little, because per-image quality varies far more between images than between methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval (``low``, ``high``) at ``confidence``, over ``n`` values."""

    mean: float
    low: float
    high: float
    confidence: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def bootstrap(values: Sequence[float] | np.ndarray, confidence: float = 0.95, resamples: int = 2000,
              seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (seeded: the same values give the same interval).

    Raises:
        ValueError: fewer than two values, non-finite values, or a confidence outside (0, 1).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"an interval needs at least two values, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite (a PSNR of identical images is infinite: cap it first)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(x.mean()), float(low), float(high), confidence, int(x.size))


def paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = 0.95,
           resamples: int = 2000, seed: int = 0) -> Interval:
    """Interval of the mean of ``a - b`` over the same items (A's and B's metric on the same seeds).

    Raises:
        ValueError: ``a`` and ``b`` have different lengths (they must score the same images).
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a paired interval needs the same items on both sides, got {a.size} and {b.size}")
    return bootstrap(a - b, confidence, resamples, seed)


__all__ = ["Interval", "bootstrap", "paired"]
