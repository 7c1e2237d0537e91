"""Quality objectives for searches: ``fn(outputs, full_outputs, conditions) -> float``, higher is better.

Registered by name, so a search's ``quality=`` and the CLI's ``--quality`` choices come from one table:
``"psnr"`` (against the full model) here; ``"accuracy"`` and ``"fid"`` with the digit classifier are registered by
`diffcache.models` (they only mean something for the digits models, and search never loads a model). Any
function of that shape works too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import SearchError
from ..registry import Registry
from .metrics import psnr

QualityFn = Callable[[np.ndarray, np.ndarray, Sequence[Any]], float]
QUALITIES: Registry[Callable[[], QualityFn]] = Registry(
    "quality", SearchError, " or pass a function (the digits classifier's 'accuracy' and 'fid' register when "
    "diffcache.models is imported)")
register_quality = QUALITIES.register
"""Decorator: register a factory ``() -> QualityFn`` under ``name`` (a factory, so models load only when used)."""


def quality_names() -> list[str]:
    return QUALITIES.names()


def quality_function(name: str) -> QualityFn:
    """The registered quality objective ``name`` (its ``__name__`` is ``name``). Raises `SearchError` for an
    unknown one."""
    quality = QUALITIES.get(name)()
    quality.__name__ = name
    return quality


@register_quality("psnr")
def _psnr() -> QualityFn:
    def quality(outputs: np.ndarray, full: np.ndarray, conditions: Sequence[Any]) -> float:
        return float(np.mean(psnr(outputs, full)))

    return quality


__all__ = ["QualityFn", "quality_function", "quality_names", "register_quality"]
