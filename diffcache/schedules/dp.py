"""Dynamic-programming schedules: CacheQuant's segmentation (DPS) and BAC's block-wise adaptive caching.

Both reduce to one primitive (specs/algorithms.md sections 5, 7 and 11): split the steps ``0..T-1`` into
``K`` contiguous segments, each recomputing at its first step and reusing that cache until the next, so that
the summed reuse error ``sum over segments [a, b) of sum_{t=a+1}^{b-1} d[a, t]`` is minimal (``d[a, t]`` is the
calibrated distance between a feature at step ``a`` and at step ``t``).

* ``dp`` (CacheQuant DPS): one segmentation for the whole model; key steps recompute everything, the steps in
  between reuse every slot (a UNet: from branch ``branch`` down). The distance is the summed, scale-normalized
  L1 of the reused slots; segment lengths stay within ``[ceil(N/2), 2N]`` of the nominal interval ``N = T/K``
  unless that is infeasible.
* ``bac`` (BAC): a separate segmentation per slot (cosine distance, ``M`` updates each), then the Bubbling Union:
  the ``upstream`` slots with the largest reuse error also refresh whenever a feed-forward slot at the same or a
  deeper layer refreshes, since an FFN recomputed on stale inputs amplifies their error. On a UNet a deeper
  branch can only run inside its shallower shells, so a unit's updates bubble up to every shallower unit.

The budget picks ``K`` (or ``M``): the most recomputation whose predicted cost still fits.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..adapters.base import Layout
from ..errors import SearchError
from ..schedule import Schedule
from .budget import Budget, CostModel
from .calibrate import Calibration
from .methods import SearchJob, register_search
from .presets import search_branch

logger = logging.getLogger(__name__)

FEED_FORWARD = ("ff", "ff_context", "proj_mlp", "proj_out", "block")  # components BAC treats as FFN branches


def segment_cost(distance: np.ndarray) -> np.ndarray:
    """``cost[a, b]`` (``a < b <= T``): error of recomputing at ``a`` and reusing for ``a+1..b-1``; else ``inf``."""
    steps = distance.shape[-1]
    cumulative = np.cumsum(np.triu(distance, 1), axis=1)
    cost = np.full((steps, steps + 1), np.inf)
    for a in range(steps):
        cost[a, a + 1 :] = cumulative[a, a:]
    return cost


def segment_tables(cost: np.ndarray, max_segments: int, min_len: int = 1, max_len: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The DP: ``best[k, n]`` = least error covering steps ``0..n-1`` with ``k`` segments, ``back[k, n]`` = the start of
    the last of them. Segment lengths are limited to ``[min_len, max_len]``."""
    steps = cost.shape[0]
    lengths = np.arange(steps + 1)[None, :] - np.arange(steps)[:, None]  # lengths[j, n] = n - j
    allowed = (lengths >= min_len) & (lengths <= (max_len or steps))
    bounded = np.where(allowed, cost, np.inf)
    best = np.full((max_segments + 1, steps + 1), np.inf)
    back = np.zeros((max_segments + 1, steps + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, max_segments + 1):
        total = best[k - 1, :steps, None] + bounded  # (j, n): k-1 segments up to j, then [j, n)
        back[k] = np.argmin(total, axis=0)
        best[k] = total[back[k], np.arange(steps + 1)]
    return best, back


def segment_starts(back: np.ndarray, num_segments: int) -> list[int]:
    """Backtrack the start steps of the optimal ``num_segments`` segmentation of all steps."""
    starts, n = [], back.shape[1] - 1
    for k in range(num_segments, 0, -1):
        n = int(back[k, n])
        starts.append(n)
    return starts[::-1]


def optimal_segmentation(cost: np.ndarray, num_segments: int, min_len: int = 1, max_len: int | None = None
                         ) -> tuple[float, list[int]]:
    """Least total error and segment starts for exactly ``num_segments`` segments.

    Raises:
        SearchError: no segmentation satisfies the length bounds.
    """
    steps = cost.shape[0]
    if not 1 <= num_segments <= steps:
        raise SearchError(f"num_segments must be in 1..{steps}, got {num_segments}")
    best, back = segment_tables(cost, num_segments, min_len, max_len)
    if not np.isfinite(best[num_segments, steps]):
        raise SearchError(f"no split of {steps} steps into {num_segments} segments of length {min_len}..{max_len}")
    return float(best[num_segments, steps]), segment_starts(back, num_segments)


def dp_schedule(calibration: Calibration, cost_model: CostModel, budget: Budget, *, branch: int = 0,
                metric: str = "l1", bounded: bool = True, weighted: bool = True) -> Schedule:
    """CacheQuant DPS under ``budget``: the most key steps that fit, placed where reuse hurts least.

    ``weighted`` scales each step's feature error by the calibrated output sensitivity (when measured);
    ``weighted=False, bounded=True`` is CacheQuant as published."""
    steps = calibration.num_steps
    reuse = calibration.present.copy()
    reuse[:search_branch(_layout(calibration), branch)] = False
    weights = calibration.step_weights(metric) if weighted else np.ones(steps)
    distance = (calibration.normalized(metric) * reuse[:, :, None, None]).sum(axis=(0, 1)) * weights
    cost = segment_cost(distance)
    for count in range(steps, 0, -1):
        starts = _dps_starts(cost, count, bounded)
        grid = np.broadcast_to(~reuse, (steps, *reuse.shape)).copy()
        grid[starts] = True
        params = {"branch": branch, "metric": metric, "key_steps": count, "weighted": weighted}
        schedule = _schedule(calibration, grid, "dp", params)
        if cost_model.fits(schedule, budget):
            return schedule
    raise _too_small(budget, cost_model, schedule)


def _dps_starts(cost: np.ndarray, count: int, bounded: bool) -> list[int]:
    if bounded:
        interval = cost.shape[0] / count
        try:
            return optimal_segmentation(cost, count, max(1, math.ceil(interval / 2)), math.floor(2 * interval))[1]
        except SearchError:
            logger.debug("DPS length bounds infeasible for %d key steps; using the unbounded DP", count)
    return optimal_segmentation(cost, count)[1]


def bac_schedule(calibration: Calibration, cost_model: CostModel, budget: Budget, *, metric: str = "cosine",
                 upstream: int | None = None, weighted: bool = True) -> Schedule:
    """BAC under ``budget``: per-slot optimal update steps (the same count ``M`` per slot, the largest that fits
    after the Bubbling Union) and ``upstream`` slots bubbled (default: a fifth of the slots).

    ``weighted`` scales feature errors by the calibrated per-step output sensitivity (``False``: BAC as
    published)."""
    steps = calibration.num_steps
    weights = calibration.step_weights(metric) if weighted else np.ones(steps)
    distance = calibration.normalized(metric) * weights
    slots = [tuple(s) for s in np.argwhere(calibration.present)]
    backs = {s: segment_tables(segment_cost(distance[s]), steps)[1] for s in slots}
    if upstream is None:
        upstream = max(1, round(len(slots) / 5))
    chosen = _upstream_slots(calibration, slots, upstream)
    for count in range(steps, 0, -1):
        updates = np.zeros((steps, *calibration.present.shape), dtype=bool)
        for s in slots:
            updates[(segment_starts(backs[s], count), *s)] = True
        grid = _bubble(calibration, updates, chosen) | ~calibration.present[None]
        params = {"metric": metric, "updates": count, "upstream": upstream, "weighted": weighted}
        schedule = _schedule(calibration, grid, "bac", params)
        if cost_model.fits(schedule, budget):
            return schedule
    raise _too_small(budget, cost_model, schedule)


def _upstream_slots(calibration: Calibration, slots: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """The ``count`` slots whose features change most across steps (mean pairwise normalized L1)."""
    if calibration.nested:
        return []
    distance = calibration.normalized("l1")
    upper = np.triu_indices(calibration.num_steps, 1)
    error = {s: float(distance[s][upper].mean()) for s in slots}
    return sorted(slots, key=lambda s: -error[s])[:count]


def _layout(calibration: Calibration) -> Layout:
    return Layout("", calibration.units, calibration.components, calibration.present, calibration.nested)


def _bubble(calibration: Calibration, updates: np.ndarray, chosen: list[tuple[int, int]]) -> np.ndarray:
    """Bubbling Union (transformers) or shell repair (UNets) of per-slot update steps."""
    if calibration.nested:  # a unit that runs forces every shallower unit to run
        return np.flip(np.logical_or.accumulate(np.flip(updates, axis=1), axis=1), axis=1)
    grid = updates.copy()
    ffn = [c for c, name in enumerate(calibration.components) if name in FEED_FORWARD]
    for unit, component in chosen:
        deeper = updates[:, unit:, :][:, :, ffn].any(axis=(1, 2))
        grid[:, unit, component] |= deeper
    return grid


def _schedule(calibration: Calibration, grid: np.ndarray, method: str, params: dict) -> Schedule:
    present = calibration.present if not calibration.present.all() else None
    return Schedule(grid, calibration.units, calibration.components, method, params, calibration.model,
                    {"calibration": calibration.data_key}, present)


def _too_small(budget: Budget, cost_model: CostModel, cheapest: Schedule) -> SearchError:
    return SearchError(
        f"budget {budget} is below the cheapest {cheapest.method} schedule, which costs "
        f"{cost_model.fraction(cheapest):.1%} of the full model in {budget.measure}; raise the budget"
    )


__all__ = ["FEED_FORWARD", "bac_schedule", "dp_schedule", "optimal_segmentation", "segment_cost",
           "segment_starts", "segment_tables"]


@register_search("dp")
def _dp(job: SearchJob, options: dict[str, Any]) -> Schedule:
    return dp_schedule(job.calibration(), job.cost_model, job.budget, **options)


@register_search("bac")
def _bac(job: SearchJob, options: dict[str, Any]) -> Schedule:
    return bac_schedule(job.calibration(), job.cost_model, job.budget, **options)
