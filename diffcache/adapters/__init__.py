"""Adapters: which modules of a denoiser are cache units and components (ARCHITECTURE section 4).

Importing this package registers the built-in adapters, UNets first, then transformers.
"""

from . import dit, unet  # noqa: F401  (registration order: specific UNet adapter before the block-list one)
from .base import BLOCK, Adapter, Layout, denoiser_of, register_adapter, uncompiled
from .dit import TransformerAdapter, TransformerUnit
from .generic import PatternAdapter
from .resolve import resolve_adapter
from .unet import UNetAdapter, UNetLayer

__all__ = [
    "BLOCK",
    "Adapter",
    "Layout",
    "PatternAdapter",
    "TransformerAdapter",
    "TransformerUnit",
    "UNetAdapter",
    "UNetLayer",
    "denoiser_of",
    "register_adapter",
    "resolve_adapter",
    "uncompiled",
]
