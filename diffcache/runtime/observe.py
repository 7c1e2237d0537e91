"""Observers: code that needs the values a model computes for its slots (calibration statistics, recorded
features, correction fits) watches an executor instead of subclassing it.

    with runtime.recording(pipe, adapter, [observer], granularity="block"):
        pipe(**kwargs)          # every slot computed; observer.observe(executor, key, value) sees each value

Keys are ``(unit, component)``; values are what the family caches for that slot (a UNet branch feature, a
transformer block's residual per stream, a component's output): tensors or tuples of tensors (``None`` allowed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..adapters.base import BLOCK, Adapter
from ..schedule import Schedule
from .attach import planned

if TYPE_CHECKING:
    from .executor import Executor


class Observer:
    """Base class: sees every value computed for the slots :meth:`slots` asks for (default: all of them)."""

    def slots(self, executor: Executor) -> list[list[bool]]:
        """Per (unit, component): hand this slot's values to :meth:`observe`."""
        return executor.plan.present_mask.tolist()

    def start(self, executor: Executor, num_steps: int) -> None:  # noqa: B027 - most observers keep no state
        """A generation of ``num_steps`` steps starts."""

    def observe(self, executor: Executor, key: tuple[int, int], value: Any) -> None:  # noqa: B027
        """``value`` was computed for slot ``key`` at ``executor.step``."""


@contextmanager
def recording(pipe: Any, adapter: Adapter, observers: Sequence[Observer], granularity: str = BLOCK,
              extra: Sequence[tuple[torch.nn.Module, Any]] = ()) -> Iterator[Executor]:
    """Run ``pipe``'s denoiser in full (every slot computed, nothing reused) inside the block, with ``observers``
    seeing the values of ``granularity``'s slots; ``extra`` hooks (quantized layers) run too. The pipeline's own
    plan, if any, comes back after."""
    layout = adapter.layout(granularity)
    present = layout.present if layout.present is not None else np.ones((len(layout.units),
                                                                           len(layout.components)), bool)

    def full(num_steps: int) -> Schedule:
        return Schedule(np.ones((num_steps, *present.shape), bool), layout.units, layout.components, "none",
                        present=layout.present)

    with planned(pipe, adapter, full, extra, observers) as executor:
        yield executor


__all__ = ["Observer", "recording"]
