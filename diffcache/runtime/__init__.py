"""The executor: hooks, per-generation state, step counter and cache store (ARCHITECTURE section 3)."""

from .attach import (
    QUANT_HOOK,
    add_hooks,
    attach,
    bind,
    check_detachable,
    detach,
    find_attachment,
    planned,
    suspended,
)
from .executor import Executor
from .manual import Generation, generation
from .stats import CacheSummary

__all__ = [
    "QUANT_HOOK",
    "CacheSummary",
    "Executor",
    "Generation",
    "add_hooks",
    "attach",
    "bind",
    "check_detachable",
    "detach",
    "find_attachment",
    "generation",
    "planned",
    "suspended",
]
