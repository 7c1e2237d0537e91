"""`diffcache.search`: find the schedule for *this* model on *these* prompts under a budget.

Every method writes the same `Schedule`, so `accelerate`, eval and the CLI run its result unchanged:

* ``"dp"``: CacheQuant's dynamic-programming segmentation (key steps where reuse hurts most), block level.
* ``"bac"``: BAC, per-slot update steps by DP plus the Bubbling Union, component level on transformers.
* ``"ecad"``: NSGA-II over all bits, quality measured on generated images; seeded with presets and DP results.
* ``"router"``: HarmoniCa's learned router (transformers), thresholded to the budget.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters import BLOCK, Adapter, Layout, denoiser_of, resolve_adapter
from ..data import CalibrationData, Compare, Generate, conditions_from
from ..errors import SearchError
from ..eval.quality import QualityFn
from ..runtime import suspended
from ..schedule import FORECAST_ORDERS, Schedule
from . import dp, evolution, router  # noqa: F401  (they register the built-in methods)
from .arena import best_of, split
from .budget import Budget, CostModel
from .methods import SearchJob, search_method
from .presets import whole_steps

logger = logging.getLogger(__name__)

MIN_CALIBRATION = 8  # calibration images from which the final round ranks near-tied schedules reliably (bench_proxy)



def search(
    pipe: Any,
    prompts: Sequence[str | int] | str | os.PathLike,
    method: str = "dp",
    budget: Budget | str | float = "2x",
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    granularity: str | None = None,
    quality: str | QualityFn = "psnr",
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    forecast: int | None = None,
    quant: Any = None,
    cost_model: CostModel | None = None,
    progress: bool = True,
    generate: Generate | None = None,
    compare: Compare | None = None,
    validation: Sequence[str | int] | bool | None = None,
    presets: bool = True,
    **options: Any,
) -> Schedule:
    """Search a cache schedule for ``pipe`` on calibration ``prompts`` (text prompts or class ids, or a prompt
    file) that fits ``budget``; returns a `Schedule` for ``diffcache.accelerate(pipe, schedule)``.

    Args:
        method: ``"dp"``, ``"bac"``, ``"ecad"`` or ``"router"``.
        budget: ``"2x"`` (MACs speedup), ``"latency:2x"`` (this machine's per-module latency), ``"recompute:0.4"``
            (fraction of slots) or a MACs fraction such as ``0.5``.
        num_inference_steps, guidance_scale: the sampler setting to search for (default: the pipeline's).
        seed, batch_size: calibration batch ``i`` uses seed ``seed + i``; every candidate sees the same noise.
        granularity: ``"block"`` or ``"component"`` (default: component for ``bac``/``ecad``/``router`` on
            transformers, block otherwise).
        quality: ECAD's quality objective: ``"psnr"`` vs the full model, ``"accuracy"`` / ``"fid"`` with the
            digits classifier (default models), or ``fn(images, full_images, conditions) -> higher is better``.
        out_dir: keeps the calibration, the ECAD checkpoint, its Pareto front (``ecad-front.json``,
            ``ecad-pareto.png``) and router logits; needed for ``resume``.
        resume: continue an interrupted ECAD run from ``out_dir``.
        forecast: ``0``, ``1`` or ``2`` fixes what reuse steps serve (the cached feature, or its Taylor forecast of
            that order, see `Schedule`); ECAD then judges every candidate with it. Default ``None``: the method
            searches without a forecast and the final round measures its pick at every order.
        validation: held-out conditions (scored with other seeds): the pick and the best preset are reported on
            them (``meta["arena"]["held_out"]``, with a paired 95% PSNR interval) and a warning says when the pick
            loses there. Default ``None`` holds out the last fifth of ten or more calibration conditions;
            ``False`` none.
        presets: end with the final round (default): the method's pick against every preset that fits the budget
            (uniform / DeepCache / FORA, warm-ups, forecasts, TaylorSeer's key steps), all measured on the
            calibration set with ``quality``; the best is returned, so it is never worse there than a preset.
            ``False`` returns the method's own pick (to study a method).
        quant: search for the quantized model (what ``accelerate(..., quant=)`` takes): calibration features
            and ECAD candidates come from it, quality is still measured against the float model (dp, bac, ecad).
        cost_model: price schedules with this model (``CostModel.measure_on(pipe, call_kwargs, measure,
            granularity)``) instead of profiling one on the first calibration batch: one profile for several
            searches, or for pricing another method at exactly the price the search sees.
        generate, compare: how one calibration batch is run (``fn(pipe, call_kwargs) -> array``; default: the
            pipeline's ``.images``/``.frames``/``.actions``/``.sequences``) and how far two outputs are apart
            (``fn(a, b) -> float``; default RMS), for models whose outputs are not images.
        options: method settings: ``dp``: ``branch`` (UNet), ``metric``, ``bounded``, ``weighted``; ``bac``:
            ``metric``, ``upstream``, ``weighted``; ``ecad``: `EvolutionConfig` fields; ``router``: `RouterConfig`
            fields.

    Raises:
        SearchError: unknown method or quality, an unreadable budget, a budget no schedule meets, or a
            ``cost_model`` of another measure or layout.
    """
    run = search_method(method)
    if forecast is not None and (forecast not in FORECAST_ORDERS or isinstance(forecast, bool)):
        raise SearchError(f"forecast must be one of {list(FORECAST_ORDERS)} (0: reuse the cached feature, 1 or 2: "
                          f"Taylor forecast of that order), got {forecast!r}")
    budget = Budget.parse(budget)
    denoiser = denoiser_of(pipe)
    adapter = resolve_adapter(denoiser)
    granularity = granularity or default_granularity(method, adapter, bool(options.get("key_steps")))
    _check_cost_model(cost_model, budget, adapter.layout(granularity))
    outputs = ({"generate": generate} if generate is not None else {}) | (
        {"compare": compare} if compare is not None else {})
    conditions, held = split(conditions_from(prompts, pipe), validation)
    if held and validation not in (None, True):
        held = conditions_from(held, pipe)
        shared = sorted({str(c) for c in held} & {str(c) for c in conditions})
        if shared:
            logger.warning("diffcache: the validation set shares %d conditions with the calibration set (%s); it is "
                           "held out by its seeds only", len(shared), ", ".join(shared[:5]))
    if len(conditions) < MIN_CALIBRATION:
        logger.warning("diffcache: calibrating on %d image(s); below %d, near-tied schedules are ranked by chance "
                       "(scripts/bench_proxy.py: rank correlation with held-out PSNR among each cost band's best "
                       "0.74-0.95 at 4 images, 0.88-0.99 at 8). Pass at least 10 prompts (8 calibrate, 2 are held "
                       "out).", len(conditions), MIN_CALIBRATION)
    data = CalibrationData(conditions, num_inference_steps, guidance_scale, seed, batch_size, **outputs)
    # Held-out generations use seeds after every calibration batch's, so no noise is shared.
    held_data = CalibrationData(held, num_inference_steps, guidance_scale, seed + len(data.batches(pipe)),
                                batch_size, **outputs) if held else None
    extra, extra_key = _quant_hooks(quant, method, adapter)
    out = Path(out_dir) if out_dir is not None else None
    start = time.perf_counter()
    bars = getattr(pipe, "_progress_bar_config", None)  # diffusers' per-pipeline tqdm settings, put back after
    try:
        with suspended(denoiser):
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            if cost_model is None:
                cost_model = CostModel.measure_on(pipe, data.batches(pipe)[0], budget.measure, granularity)
            _check_reachable(budget, cost_model, adapter.layout(granularity), data.steps(pipe))  # before calibrating
            job = SearchJob(pipe, adapter, data, budget, cost_model, granularity, quality, out, resume, progress,
                            forecast or 0, extra, extra_key)
            schedule = replace(run(job, options), forecast=forecast or 0)
            arena = None
            if presets:
                forecasts = FORECAST_ORDERS if forecast is None else (forecast,)
                schedule, arena = best_of(job, replace(schedule, method=method), forecasts, held_data)
    finally:
        if bars is None:
            vars(pipe).pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = bars
    fraction = cost_model.fraction(schedule)
    meta = {
        **schedule.meta, "search_method": method, "budget": str(budget), "predicted_cost": round(fraction, 6),
        "predicted_speedup": round(1 / fraction, 4), "search_seconds": round(time.perf_counter() - start, 1),
        "calibration": {"conditions": len(data.conditions), "num_inference_steps": data.steps(pipe),
                        "guidance_scale": guidance_scale, "seed": seed},
    } | ({"arena": arena} if arena is not None else {})
    # A preset that won keeps its name and parameters (its tag regenerates it at any step count).
    won = arena is not None and not arena["chosen"].startswith(f"{method} pick")
    result = replace(schedule, method=schedule.method if won else method, model=adapter.model_info, meta=meta)
    logger.info("diffcache: %s search found a schedule at %.2fx predicted %s speedup (CUR %.1f%%) in %.0f s",
                method, 1 / fraction, budget.measure, 100 * result.cache_usage_ratio, meta["search_seconds"])
    return result


def default_granularity(method: str, adapter: Adapter, key_steps: bool = False) -> str:
    """What `search` caches when not told: transformer components for bac/ecad/router, else whole blocks."""
    # A key-step genome reuses whole steps: block residuals are the cheapest way to do that, and the latency
    # model prices them closest to the clock (it under-predicts component caching's savings).
    if method in ("bac", "ecad", "router") and "component" in adapter.granularities and not key_steps:
        return "component"
    return BLOCK


def _check_cost_model(cost_model: CostModel | None, budget: Budget, layout: Layout) -> None:
    if cost_model is None:
        return
    if cost_model.measure != budget.measure:
        raise SearchError(f"the cost model measures {cost_model.measure}, the budget {budget} {budget.measure}; "
                          "give both the same measure")
    profile = cost_model.profile
    if profile is not None and (profile.units, profile.components) != (layout.units, layout.components):
        raise SearchError(f"the cost model was profiled for {len(profile.units)} units x {profile.components}, the "
                          f"search runs on {len(layout.units)} units x {layout.components}; profile it at the "
                          "search's granularity (CostModel.measure_on(..., granularity))")


def _check_reachable(budget: Budget, cost_model: CostModel, layout: Layout, steps: int) -> None:
    """Refuse at once a budget below the cheapest plan there is: step 0 computes, every later step reuses all."""
    fraction = cost_model.fraction(whole_steps(layout, np.arange(steps) == 0, "cheapest"))
    if fraction > budget.fraction + 1e-9:
        raise SearchError(f"budget {budget} is below the cheapest schedule there is (every step after the first "
                          f"reusing everything costs {fraction:.1%} of the full model in {budget.measure}, "
                          f"{1 / fraction:.1f}x); raise the budget")


def _quant_hooks(quant: Any, method: str, adapter: Adapter) -> tuple[list, str]:
    """Quantized-layer hooks built once for the whole search, and a key naming them (empty without quant)."""
    if quant is None:
        return [], ""
    if method == "router":
        raise SearchError("a quantization-aware search runs dp, bac or ecad; the router trains its own hooks")
    from ..quant import QuantCalibration, resolve_quant
    from ..quant.hooks import quant_hooks

    quant = resolve_quant(quant)
    hooks, note = quant_hooks(adapter, quant, None)
    return hooks, note + (f" {quant.data_key}" if isinstance(quant, QuantCalibration) else "")


__all__ = ["default_granularity", "search"]
