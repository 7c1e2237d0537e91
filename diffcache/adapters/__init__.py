"""Adapters: which modules of a denoiser are cache units and components (ARCHITECTURE section 4).

Importing this package registers the built-in adapters; the video ones register before the image adapter they
specialise (``before=``).
"""

from . import dit, unet, video_transformers, video_unets  # noqa: F401  (importing registers them)
from .base import BLOCK, Adapter, Layout, denoiser_of, register_adapter, uncompiled
from .dit import TransformerAdapter, TransformerUnit
from .generic import PatternAdapter
from .resolve import resolve_adapter
from .unet import UNetAdapter, UNetLayer
from .video_transformers import VideoTransformerAdapter
from .video_unets import VideoUNetAdapter

__all__ = [
    "BLOCK",
    "Adapter",
    "Layout",
    "PatternAdapter",
    "TransformerAdapter",
    "TransformerUnit",
    "UNetAdapter",
    "UNetLayer",
    "VideoTransformerAdapter",
    "VideoUNetAdapter",
    "denoiser_of",
    "register_adapter",
    "resolve_adapter",
    "uncompiled",
]
