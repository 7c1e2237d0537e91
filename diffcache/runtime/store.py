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
    """Key -> cached value, the step each value was computed at, and the input signature they are valid for.

    ``signature`` describes the denoiser inputs (shapes, dtypes, devices); a call with another signature must not
    read these values (a batch size or resolution change), so the executor clears the store. Hooks write
    ``values`` inside the (possibly compiled) forward; ``steps`` is kept by the executor outside it. ``notes`` are
    facts a family keeps beside a value that are not tensors (a UNet feature's memory format).
    """

    def __init__(self) -> None:
        self.values: dict[Hashable, Any] = {}
        self.steps: dict[Hashable, int] = {}
        self.notes: dict[Hashable, Any] = {}
        self.signature: tuple | None = None

    def __contains__(self, key: Hashable) -> bool:
        return key in self.values

    @property
    def bytes(self) -> int:
        return sum(nbytes(v) for v in self.values.values())

    def clear(self) -> None:
        self.values.clear()
        self.steps.clear()
        self.notes.clear()
