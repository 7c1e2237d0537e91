"""diffcache: training-free acceleration of diffusers pipelines.

    import diffcache
    pipe = diffcache.accelerate(pipe, "deepcache:interval=3")   # in place; returns the same pipeline
    image = pipe("a red car").images[0]
    print(diffcache.summary(pipe))
    diffcache.restore(pipe)                                       # bit-exact original

    schedule = diffcache.search(pipe, prompts, method="ecad", budget="2.5x")   # for this model and these prompts
"""

from .api import accelerate, accelerated, restore, summary
from .errors import AccelerationStateError, DiffcacheError, ScheduleError, SearchError, UnsupportedModelError
from .schedule import Schedule
from .schedules.search import search

__version__ = "0.1.0"

__all__ = [
    "AccelerationStateError",
    "DiffcacheError",
    "Schedule",
    "ScheduleError",
    "SearchError",
    "UnsupportedModelError",
    "__version__",
    "accelerate",
    "accelerated",
    "restore",
    "search",
    "summary",
]
