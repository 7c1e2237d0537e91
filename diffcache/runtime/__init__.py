"""The executor: hooks, per-generation state, step counter and cache store (ARCHITECTURE section 3).

A model family's runtime (`FamilyRuntime`, registered per adapter class) owns its hooks and per-call decisions;
a reuse mechanism (`Mechanism`, registered by name) owns how a reused slot is served; observers watch computed
values through `recording`. Importing this package registers the built-in families and mechanisms.
"""

from . import transformer, unet  # noqa: F401  (registers the built-in family runtimes)
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
from .family import FamilyRuntime, register_runtime, runtime_for
from .manual import Generation, generation
from .mechanisms import Mechanism, mechanism_names, register_mechanism
from .observe import Observer, recording
from .stats import CacheSummary

__all__ = [
    "QUANT_HOOK",
    "CacheSummary",
    "Executor",
    "FamilyRuntime",
    "Generation",
    "Mechanism",
    "Observer",
    "add_hooks",
    "attach",
    "bind",
    "check_detachable",
    "detach",
    "find_attachment",
    "generation",
    "mechanism_names",
    "planned",
    "recording",
    "register_mechanism",
    "register_runtime",
    "runtime_for",
    "suspended",
]
