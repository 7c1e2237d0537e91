"""Search budgets: how much of the full model's cost a searched schedule may spend.

A budget is written the way users think of it: ``"2x"`` (MACs speedup 2, i.e. at most half the MACs),
``"latency:3x"`` (the measured per-module latency profile of this machine), ``"recompute:0.4"`` (at most 40 % of
the cache slots recompute), or a plain fraction ``0.5`` of the full MACs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import SearchError
from ..eval.cost import CostProfile, profile_latency, profile_macs
from ..schedule import Schedule

MEASURES = ("macs", "latency", "recompute")


@dataclass(frozen=True)
class Budget:
    """At most ``fraction`` of the full model's cost, in ``measure`` (``macs``, ``latency`` or ``recompute``)."""

    measure: str
    fraction: float

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise SearchError(f"unknown budget measure {self.measure!r}; choose from {list(MEASURES)}")
        if not 0 < self.fraction <= 1:
            raise SearchError(f"a budget fraction must be in (0, 1], got {self.fraction}")

    @classmethod
    def parse(cls, value: Budget | str | float) -> Budget:
        """``"2x"``, ``"macs:2x"``, ``"latency:2.5x"``, ``"recompute:0.4"``, ``"macs:0.5"`` or ``0.5``."""
        if isinstance(value, Budget):
            return value
        text = str(value).strip().lower()
        measure, _, amount = text.rpartition(":")
        try:
            if amount.endswith("x"):
                speedup = float(amount[:-1])
                if speedup < 1:
                    raise ValueError
                fraction = 1.0 / speedup
            else:
                fraction = float(amount)
        except ValueError:
            raise SearchError(
                f"cannot read budget {value!r}; write a speedup like '2x' or 'latency:3x', or a cost fraction like "
                "'recompute:0.4' or 0.5"
            ) from None
        return cls(measure or "macs", fraction)

    def __str__(self) -> str:
        return f"{self.measure}:{1 / self.fraction:.3g}x"


class CostModel:
    """Predicts a schedule's cost as a fraction of the full model's, in one measure."""

    def __init__(self, measure: str, profile: CostProfile | None = None) -> None:
        if measure != "recompute" and profile is None:
            raise SearchError(f"a {measure} cost model needs a cost profile")
        self.measure, self.profile = measure, profile

    @classmethod
    def measure_on(cls, pipe: Any, call_kwargs: dict[str, Any], measure: str, granularity: str) -> CostModel:
        """Profile ``pipe`` (unaccelerated) on ``call_kwargs`` for ``measure``."""
        if measure == "macs":
            return cls(measure, profile_macs(pipe, call_kwargs | {"num_inference_steps": 1}, granularity))
        if measure == "latency":
            pipe(**call_kwargs)  # warm-up, so the profile is not the first (slow) call
            return cls(measure, profile_latency(pipe, call_kwargs, granularity))
        return cls(measure)

    def fraction(self, schedule: Schedule) -> float:
        """Cost of ``schedule`` over the cost of running every slot at every step."""
        if self.profile is None:
            return schedule.recompute_fraction
        return float(self.profile.step_cost(schedule).sum() / (self.profile.total * schedule.num_steps))

    def fits(self, schedule: Schedule, budget: Budget) -> bool:
        return self.fraction(schedule) <= budget.fraction + 1e-9


__all__ = ["MEASURES", "Budget", "CostModel"]
