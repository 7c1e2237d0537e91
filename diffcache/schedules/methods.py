"""The search-method registry, and the `SearchJob` every registered method gets.

A method is ``fn(job, options) -> Schedule`` registered with ``@register_search("name")`` in the module that
implements it (`dp.py`: dp, bac; `evolution.py`: ecad; `router.py`: router). `diffcache.search` and the CLI
list and dispatch through the registry, so adding a method is a new module and a registration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import Adapter
from ..data import CalibrationData
from ..errors import SearchError
from ..registry import Registry
from ..schedule import Schedule
from .budget import Budget, CostModel
from .calibrate import Calibration, calibrate


@dataclass
class SearchJob:
    """One search: the pipeline, its calibration data, the budget and its cost model, and the settings every
    method shares (``quality`` is a name in `diffcache.eval.quality` or a function; ``extra`` hooks, such as
    quantized layers, run with every candidate)."""

    pipe: Any
    adapter: Adapter
    data: CalibrationData
    budget: Budget
    cost_model: CostModel
    granularity: str
    quality: Any
    out: Path | None
    resume: bool
    progress: bool
    forecast: int
    extra: list = field(default_factory=list)
    extra_key: str = ""
    front: list[Schedule] = field(default_factory=list)
    """Set by methods that end with a front of schedules (ECAD): the final round may pick from it on held-out data."""

    def calibration(self) -> Calibration:
        """The feature-drift calibration of this job's model and data (computed once, then read from disk)."""
        cache_dir = self.out / "calibration" if self.out is not None else None
        return calibrate(self.pipe, self.data, self.granularity, cache_dir=cache_dir, progress=self.progress,
                         extra=self.extra, extra_key=self.extra_key)


SearchFn = Callable[[SearchJob, dict[str, Any]], Schedule]
SEARCHES: Registry[SearchFn] = Registry("search method", SearchError)
register_search = SEARCHES.register
"""Decorator: register ``fn(job, options) -> Schedule`` as search method ``name``."""


def search_methods() -> list[str]:
    """The registered method names, in registration order."""
    return SEARCHES.names()


def search_method(name: str) -> SearchFn:
    """The registered method ``name``. Raises `SearchError` for an unknown one."""
    return SEARCHES.get(name)
