"""Picking the adapter for a denoiser: the registered ones in order, or user-chosen units (``units=``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UnsupportedModelError
from .base import Adapter, registered_adapters
from .generic import PatternAdapter


def resolve_adapter(denoiser: torch.nn.Module, units: str | Sequence[str] | None = None) -> Adapter:
    """Pick the adapter for ``denoiser``; ``units`` (glob patterns) forces the generic block adapter.

    Raises:
        UnsupportedModelError: no registered adapter applies; the message names the model's top-level children.
    """
    if units is not None:
        return PatternAdapter(denoiser, units)
    for _name, matches, cls in registered_adapters():
        if matches(denoiser):
            return cls(denoiser)
    children = [f"{n} ({type(m).__name__})" for n, m in denoiser.named_children()]
    raise UnsupportedModelError(
        f"no diffcache adapter for {type(denoiser).__name__}: expected a UNet2DConditionModel/UNet2DModel or a "
        f"transformer with a ModuleList of blocks (transformer_blocks, single_transformer_blocks, blocks, layers); "
        f"found children {children[:12]}. Pass units='<glob>' (e.g. units='blocks.*') to cache those modules"
    )
