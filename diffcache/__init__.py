"""diffcache: training-free acceleration of diffusers pipelines.

    import diffcache
    pipe = diffcache.accelerate(pipe, "deepcache:interval=3")   # in place; returns the same pipeline
    image = pipe("a red car").images[0]
    print(diffcache.summary(pipe))
    diffcache.restore(pipe)                                       # bit-exact original

    schedule = diffcache.search(pipe, prompts, method="ecad", budget="2.5x")   # for this model and these prompts
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AccelerationStateError,
    DiffcacheError,
    ScheduleError,
    SearchError,
    SliceError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from .api import accelerate, accelerated, restore, summary
    from .runtime.slicing import SliceConfig
    from .schedule import Schedule
    from .schedules.search import search

__version__ = "0.1.0"

# Imported on first use, so `import diffcache` (and the command line's --help) does not load torch.
_LAZY = {"accelerate": "api", "accelerated": "api", "restore": "api", "summary": "api", "Schedule": "schedule",
         "SliceConfig": "runtime.slicing",
         "search": "schedules.search"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffcache' has no attribute {name!r}")

__all__ = [
    "AccelerationStateError",
    "DiffcacheError",
    "Schedule",
    "ScheduleError",
    "SearchError",
    "SliceConfig",
    "SliceError",
    "UnsupportedModelError",
    "__version__",
    "accelerate",
    "accelerated",
    "restore",
    "search",
    "summary",
]
