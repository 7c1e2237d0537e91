"""Caller-driven steps, for a denoiser outside any diffusers pipeline (a diffusion policy, a video model
stepping frames, a hand-written sampling loop)::

    model = diffcache.accelerate(model, "uniform:interval=3", units="blocks.*")
    with diffcache.runtime.generation(model, num_steps=50) as gen:
        for t in timesteps:
            eps = model(x, t)        # several calls in one step are CFG branches, each with its own cache
            x = update(x, eps, t)
            gen.step()               # this step is over

A pipeline's scheduler does this bookkeeping by itself; here the loop says where generations and steps are.
Calls outside a ``with`` block run without caching (and warn once).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..adapters import denoiser_of, uncompiled
from ..errors import AccelerationStateError, DiffcacheError
from .attach import find_attachment
from .executor import Executor


class Generation:
    """One caller-driven generation of an accelerated denoiser; :meth:`step` ends each step."""

    def __init__(self, executor: Executor, num_steps: int) -> None:
        self._executor = executor
        self.num_steps = num_steps

    @property
    def index(self) -> int:
        """The current step (0 = the first, noisiest)."""
        return self._executor.step

    def step(self) -> None:
        """End the current step; the next denoiser calls belong to the next one.

        Raises:
            AccelerationStateError: the generation already ran ``num_steps`` steps.
        """
        if self._executor.step >= self.num_steps:
            raise AccelerationStateError(
                f"step() called after all {self.num_steps} steps of this generation; open a new "
                "`diffcache.runtime.generation(model, num_steps)` for the next one"
            )
        self._executor.end_step()


@contextmanager
def generation(model: Any, num_steps: int) -> Iterator[Generation]:
    """Mark one generation of ``num_steps`` steps of an accelerated denoiser (or pipeline).

    The schedule is taken at ``num_steps`` (a preset exactly, a searched plan resampled with a warning); caches
    start empty and are freed when the block ends.

    Raises:
        DiffcacheError: ``model`` is not accelerated.
        ValueError: ``num_steps`` is not positive.
    """
    denoiser = uncompiled(model) if isinstance(model, torch.nn.Module) else denoiser_of(model)
    attachment = find_attachment(denoiser)
    if attachment is None:
        raise DiffcacheError(
            f"{type(denoiser).__name__} is not accelerated; call diffcache.accelerate(model, schedule, units=...) "
            "before opening a generation"
        )
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    executor = attachment.executor
    executor.start_generation(num_steps)
    try:
        yield Generation(executor, num_steps)
    finally:
        executor.close_generation()


__all__ = ["Generation", "generation"]
