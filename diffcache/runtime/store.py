"""Cached tensors of one CFG branch (call position or ``cache_context`` name) in one generation."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch


def nbytes(value: Any) -> int:
    """Bytes held by a tensor, or by the tensors of a tuple/list (``None`` entries count 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


class CacheStore:
    """Key -> cached value, plus the input signature the values were computed under.

    ``signature`` describes the denoiser inputs (shapes, dtypes, devices); a call with another signature
    must not read these values (a batch size or resolution change), so the executor clears the store.
    """

    def __init__(self) -> None:
        self.values: dict[Hashable, Any] = {}
        self.signature: tuple | None = None
        self.bytes = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self.values

    def get(self, key: Hashable) -> Any:
        return self.values[key]

    def put(self, key: Hashable, value: Any) -> int:
        """Store ``value``; returns the change in bytes held."""
        delta = nbytes(value) - nbytes(self.values.get(key))
        self.values[key] = value
        self.bytes += delta
        return delta

    def clear(self) -> int:
        """Drop everything; returns the bytes freed."""
        freed, self.bytes = self.bytes, 0
        self.values.clear()
        return freed
