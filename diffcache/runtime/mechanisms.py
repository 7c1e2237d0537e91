"""Reuse mechanisms: how a reused slot is served. One registered object each.

A mechanism decides what is kept when a slot is computed (:meth:`Mechanism.keep`) and what a reuse step gets
(:meth:`Mechanism.serve`). ``"copy"`` serves the cached value (DeepCache, FORA, ...); ``"taylor"`` keeps
finite-difference derivatives up to the plan's ``forecast`` order and serves the Taylor forecast to the current
step (TaylorSeer). A plan names its mechanism (`Schedule.reuse`, or ``forecast`` for ``"taylor"``); wrappers such
as CacheQuant's correction (`diffcache.quant.correction`) apply on top of it.

Both methods run inside the denoiser's forward, which may be compiled: tensor math, dictionary reads and
integers that repeat across steps only, so they add no graph break.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ScheduleError
from ..registry import Registry

if TYPE_CHECKING:
    from ..schedule import Schedule
    from .executor import Executor


class Mechanism:
    """Base class. ``keep(value, entry, steps)`` returns the store entry for a fresh ``value`` (``entry``: the
    slot's previous entry, computed ``steps`` steps ago, or ``None``); ``serve(entry, steps)`` returns what a
    reuse ``steps`` steps after the entry was computed gets. Values are tensors or tuples of them (``None``
    entries allowed). :meth:`begin_call` may prepare per-call tensors (it runs outside compiled code).
    ``needs_steps``: ``keep`` gets the previous entry and ``serve`` the step distance (otherwise ``None`` and 0:
    compiled code then never reads the distances, which change every step)."""

    needs_steps: bool = False

    def __init__(self, executor: Executor, plan: Schedule) -> None:
        self.executor = executor

    def keep(self, value: Any, entry: Any, steps: int | None) -> Any:
        return value

    def serve(self, entry: Any, steps: int) -> Any:
        return entry

    def begin_call(self, like: torch.Tensor | None) -> None:  # noqa: B027 - most need nothing per call
        """Called before each planned denoiser call (``like``: one of its tensor inputs, for device/dtype)."""


MECHANISMS: Registry[type[Mechanism]] = Registry(
    "reuse mechanism", ScheduleError, " (a mechanism registers with @diffcache.runtime.register_mechanism)")
register_mechanism = MECHANISMS.register
"""Class decorator: make a `Mechanism` available to plans as ``reuse=name``."""


def mechanism_names() -> list[str]:
    return MECHANISMS.names()


def mechanism_class(plan: Schedule) -> type[Mechanism]:
    """The mechanism class ``plan`` names (``reuse``, else ``"taylor"`` with a forecast, else ``"copy"``).

    Raises:
        ScheduleError: the plan names a mechanism nobody registered.
    """
    name = plan.reuse or ("taylor" if plan.forecast else "copy")
    if name not in MECHANISMS:
        raise ScheduleError(
            f"the schedule serves reuse steps with {name!r}, which is not a registered reuse mechanism; known: "
            f"{mechanism_names()} (a mechanism registers with @diffcache.runtime.register_mechanism)"
        )
    return MECHANISMS.get(name)


def mechanism_for(executor: Executor, plan: Schedule) -> Mechanism:
    """The mechanism ``plan`` names, bound to ``executor`` (see `mechanism_class`)."""
    return mechanism_class(plan)(executor, plan)


register_mechanism("copy")(Mechanism)


@register_mechanism("taylor")
class TaylorForecast(Mechanism):
    """TaylorSeer: keep ``d_i = (d_{i-1} - previous d_{i-1}) / gap`` up to the plan's ``forecast`` order and serve
    ``value + sum_i d_i * steps^i / i!``."""

    needs_steps = True

    def __init__(self, executor: Executor, plan: Schedule) -> None:
        super().__init__(executor, plan)
        self.order = plan.forecast

    def keep(self, value: Any, entry: Any, steps: int | None) -> Any:
        derivatives: list[Any] = []
        if steps is not None:  # as far as the previous value had derivatives
            last, previous = entry
            current = value
            for before in (last, *previous)[: self.order]:
                current = _slope(current, before, steps)
                derivatives.append(current)
        return value, tuple(derivatives)

    def serve(self, entry: Any, steps: int) -> Any:
        value, derivatives = entry
        for i, derivative in enumerate(derivatives, start=1):
            value = _forecast(value, derivative, steps**i / math.factorial(i))
        return value


def _slope(value: Any, previous: Any, steps: int) -> Any:
    """``(value - previous) / steps`` for tensors, element-wise through tuples; anything else is ``None``."""
    if isinstance(value, torch.Tensor):
        return (value - previous) / steps
    if isinstance(value, tuple):
        return tuple(_slope(a, b, steps) for a, b in zip(value, previous))
    return None


def _forecast(value: Any, slope: Any, steps: float) -> Any:
    """``value + steps * slope`` (one fused op per tensor); non-tensors are kept as they are."""
    if isinstance(value, torch.Tensor):
        return torch.add(value, slope, alpha=steps)
    if isinstance(value, tuple):
        return tuple(_forecast(a, b, steps) for a, b in zip(value, slope))
    return value
