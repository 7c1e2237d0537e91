"""User-chosen units: ``accelerate(pipe, schedule, units="blocks.*")`` for denoisers no adapter knows.

Patterns are shell globs (``fnmatch``, so ``*`` also crosses dots) matched against the names of
``denoiser.named_modules()``. Only the outermost matches become units (``blocks.*`` selects ``blocks.0``, not
also ``blocks.0.attn``). Each unit is cached at block level: its output minus its first input is stored, so
it must return a tensor of the same shape as its first argument (or be a known diffusers block class).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch

from ..errors import UnsupportedModelError
from .dit import TransformerAdapter, make_unit


class PatternAdapter(TransformerAdapter):
    """Block-level units selected by glob patterns over module names."""

    def __init__(self, denoiser: torch.nn.Module, patterns: str | Sequence[str]) -> None:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise UnsupportedModelError(f"units= takes glob pattern strings, got {patterns!r}")
        chosen: list[str] = []
        for name, _ in denoiser.named_modules():
            if name and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                if not any(name.startswith(parent + ".") for parent in chosen):
                    chosen.append(name)
        if not chosen:
            top = [n for n, _ in denoiser.named_modules() if n and n.count(".") <= 1][:15]
            raise UnsupportedModelError(
                f"units={patterns} matched no module of {type(denoiser).__name__}; patterns are globs over "
                f"module names such as {top}"
            )
        modules = dict(denoiser.named_modules())
        # Component caching needs per-class knowledge of gates; user-chosen units are cached as whole blocks.
        super().__init__(denoiser, [make_unit(name, modules[name], with_components=False) for name in chosen])
