"""Quality objectives for searches: ``fn(outputs, full_outputs, conditions) -> float``, higher is better.

Registered by name (``"psnr"``, and with a digit classifier ``"accuracy"`` and ``"fid"``), so a search's
``quality=`` and the CLI's ``--quality`` choices come from one table. Any function of that shape works too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import SearchError
from .metrics import accuracy, fid, psnr

QualityFn = Callable[[np.ndarray, np.ndarray, Sequence[Any]], float]
_QUALITIES: dict[str, Callable[[], QualityFn]] = {}


def register_quality(name: str) -> Callable[[Callable[[], QualityFn]], Callable[[], QualityFn]]:
    """Register a factory ``() -> QualityFn`` under ``name`` (a factory, so models load only when used)."""

    def decorate(factory: Callable[[], QualityFn]) -> Callable[[], QualityFn]:
        if name in _QUALITIES:
            raise ValueError(f"a quality named {name!r} is already registered")
        _QUALITIES[name] = factory
        return factory

    return decorate


def quality_names() -> list[str]:
    return list(_QUALITIES)


def quality_function(name: str) -> QualityFn:
    """The registered quality objective ``name`` (its ``__name__`` is ``name``).

    Raises:
        SearchError: no such quality.
    """
    if name not in _QUALITIES:
        raise SearchError(f"unknown quality {name!r}; choose from {quality_names()} or pass a function")
    quality = _QUALITIES[name]()
    quality.__name__ = name
    return quality


@register_quality("psnr")
def _psnr() -> QualityFn:
    def quality(outputs: np.ndarray, full: np.ndarray, conditions: Sequence[Any]) -> float:
        return float(np.mean(psnr(outputs, full)))

    return quality


def _default_classifier() -> Any:
    # The embedded digits classifier: the one quality model that ships (the eval layer's one arrow up to models).
    from ..models import load_classifier

    return load_classifier()


@register_quality("accuracy")
def _accuracy() -> QualityFn:
    classifier = _default_classifier()

    def quality(outputs: np.ndarray, full: np.ndarray, conditions: Sequence[Any]) -> float:
        return accuracy(outputs, [int(c) for c in conditions], classifier)

    return quality


@register_quality("fid")
def _fid() -> QualityFn:
    classifier = _default_classifier()

    def quality(outputs: np.ndarray, full: np.ndarray, conditions: Sequence[Any]) -> float:
        return -fid(outputs, full, classifier)

    return quality


__all__ = ["QualityFn", "quality_function", "quality_names", "register_quality"]
