"""diffcache: training-free acceleration of diffusers pipelines.

    import diffcache
    pipe = diffcache.accelerate(pipe, "deepcache:interval=3")   # in place; returns the same pipeline
    image = pipe("a red car").images[0]
    print(diffcache.summary(pipe))
    diffcache.restore(pipe)                                       # bit-exact original
"""

from .api import accelerate, accelerated, restore, summary
from .errors import AccelerationStateError, DiffcacheError, ScheduleError, UnsupportedModelError
from .schedule import Schedule

__version__ = "0.1.0"

__all__ = [
    "AccelerationStateError",
    "DiffcacheError",
    "Schedule",
    "ScheduleError",
    "UnsupportedModelError",
    "__version__",
    "accelerate",
    "accelerated",
    "restore",
    "summary",
]
