"""How one model family runs a plan: its hooks and its per-call decisions (one `FamilyRuntime` per family).

The executor (`runtime.executor`) keeps what every family shares: steps, CFG branches, cache stores, the reuse
mechanism and statistics. What differs between families lives in a `FamilyRuntime` subclass registered for the
family's adapter class, next to the hooks it installs (`runtime/unet.py`, `runtime/transformer.py`). The
executor finds it by the adapter's class (its nearest registered base), so no code outside a family's two
modules asks which family a model is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..adapters.base import Adapter
from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from ..schedule import Schedule
    from .executor import Executor

UNIT_HOOK = "diffcache.unit"
COMPONENT_HOOK = "diffcache.component"
Hooked = tuple[torch.nn.Module, Any, str]
"""A hook to register: (module, diffusers ``ModelHook``, hook name)."""


class FamilyRuntime(ABC):
    """Base class: the hooks a family installs and the decisions it makes for each denoiser call.

    Subclasses implement :meth:`hooks`; they may override :meth:`needed` (which slots a plan must keep cached),
    :meth:`begin_call` (turn the step's row of bits into what the hooks obey) and :meth:`end_call`.
    """

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.adapter = executor.adapter

    @abstractmethod
    def hooks(self, granularity: str) -> list[Hooked]:
        """The follower hooks for ``granularity`` (the executor adds the leader on the denoiser itself)."""

    def use_plan(self, plan: Schedule) -> list[list[bool]]:
        """Called once per plan; returns, per (unit, component), whether any step reuses that slot's cache."""
        return (~plan.recompute).any(axis=0).tolist()

    def begin_call(self, args: tuple, kwargs: dict) -> None:
        """Make ``executor.row`` the bits the hooks follow in this call (reuses of uncached slots turned into
        recomputes) and record the counts; the default serves each slot on its own."""
        self.executor.row = self.executor.available_row()

    def end_call(self) -> None:
        """After the denoiser call (its hooks wrote their values)."""


_RUNTIMES: dict[type[Adapter], type[FamilyRuntime]] = {}


def register_runtime(adapter_class: type[Adapter]) -> Callable[[type[FamilyRuntime]], type[FamilyRuntime]]:
    """Class decorator: run denoisers described by ``adapter_class`` (and its subclasses) with this runtime."""

    def decorate(cls: type[FamilyRuntime]) -> type[FamilyRuntime]:
        if adapter_class in _RUNTIMES:
            raise ValueError(f"a runtime for {adapter_class.__name__} is already registered")
        _RUNTIMES[adapter_class] = cls
        return cls

    return decorate


def runtime_for(adapter: Adapter) -> type[FamilyRuntime]:
    """The runtime registered for ``adapter``'s class or its nearest base.

    Raises:
        UnsupportedModelError: no runtime is registered for it.
    """
    for cls in type(adapter).__mro__:
        if cls in _RUNTIMES:
            return _RUNTIMES[cls]
    raise UnsupportedModelError(
        f"no diffcache runtime for {type(adapter).__name__}; a model family registers one with "
        "@diffcache.runtime.register_runtime(ItsAdapter) (docs/ARCHITECTURE.md, 'add a model family')"
    )
