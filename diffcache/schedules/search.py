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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters import BLOCK, Adapter, Layout, denoiser_of, resolve_adapter
from ..errors import SearchError
from ..files import write_atomic
from ..runtime import suspended
from ..schedule import FORECAST_ORDERS, Schedule
from .budget import Budget, CostModel
from .calibrate import Calibration, CalibrationData, calibrate, conditions_from
from .dp import bac_schedule, dp_schedule
from .evolution import EvolutionConfig, Genome, QualityFn, evolve
from .presets import build_from_tag, search_branch

logger = logging.getLogger(__name__)

METHODS = ("dp", "bac", "ecad", "router")
QUALITY_NAMES = ("psnr", "accuracy", "fid")
_DP_SEED_SPEEDUPS = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)


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
    forecast: int = 0,
    quant: Any = None,
    cost_model: CostModel | None = None,
    progress: bool = True,
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
        forecast: ``1`` or ``2`` makes reuse steps serve a Taylor forecast of that order (see `Schedule`); ECAD
            then judges every candidate with forecasting.
        quant: search for the quantized model (what ``accelerate(..., quant=)`` takes): calibration features
            and ECAD candidates come from it, quality is still measured against the float model (dp, bac, ecad).
        cost_model: price schedules with this model (``CostModel.measure_on(pipe, call_kwargs, measure,
            granularity)``) instead of profiling one on the first calibration batch: one profile for several
            searches, or for pricing another method at exactly the price the search sees.
        options: method settings: ``dp``: ``branch`` (UNet), ``metric``, ``bounded``, ``weighted``; ``bac``:
            ``metric``, ``upstream``, ``weighted``; ``ecad``: `EvolutionConfig` fields; ``router``: `RouterConfig`
            fields.

    Raises:
        SearchError: unknown method or quality, an unreadable budget, a budget no schedule meets, or a
            ``cost_model`` of another measure or layout.
    """
    if method not in METHODS:
        raise SearchError(f"unknown search method {method!r}; choose from {list(METHODS)}")
    if forecast not in FORECAST_ORDERS or isinstance(forecast, bool):
        raise SearchError(f"forecast must be one of {list(FORECAST_ORDERS)} (0: reuse the cached feature, 1 or 2: "
                          f"Taylor forecast of that order), got {forecast!r}")
    budget = Budget.parse(budget)
    denoiser = denoiser_of(pipe)
    adapter = resolve_adapter(denoiser)
    granularity = granularity or default_granularity(method, adapter, bool(options.get("key_steps")))
    _check_cost_model(cost_model, budget, adapter.layout(granularity))
    data = CalibrationData(conditions_from(prompts, pipe), num_inference_steps, guidance_scale, seed, batch_size)
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
            job = _Job(pipe, adapter, data, budget, cost_model, granularity, quality, out, resume, progress, forecast,
                       extra, extra_key)
            schedule = _METHODS[method](job, options)
    finally:
        if bars is None:
            vars(pipe).pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = bars
    fraction = cost_model.fraction(schedule)
    meta = {
        **schedule.meta, "budget": str(budget), "predicted_cost": round(fraction, 6),
        "predicted_speedup": round(1 / fraction, 4), "search_seconds": round(time.perf_counter() - start, 1),
        "calibration": {"conditions": len(data.conditions), "num_inference_steps": data.steps(pipe),
                        "guidance_scale": guidance_scale, "seed": seed},
    }
    result = replace(schedule, method=method, model=adapter.model_info, meta=meta, forecast=forecast)
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


@dataclass
class _Job:
    """One search: what every method needs."""

    pipe: Any
    adapter: Adapter
    data: CalibrationData
    budget: Budget
    cost_model: CostModel
    granularity: str
    quality: str | QualityFn
    out: Path | None
    resume: bool
    progress: bool
    forecast: int
    extra: list = field(default_factory=list)  # hooks every run carries (quantized layers)
    extra_key: str = ""

    def calibration(self) -> Calibration:
        cache_dir = self.out / "calibration" if self.out is not None else None
        return calibrate(self.pipe, self.data, self.granularity, cache_dir=cache_dir, progress=self.progress,
                         extra=self.extra, extra_key=self.extra_key)


def _dp(job: _Job, options: dict[str, Any]) -> Schedule:
    return dp_schedule(job.calibration(), job.cost_model, job.budget, **options)


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


def _bac(job: _Job, options: dict[str, Any]) -> Schedule:
    return bac_schedule(job.calibration(), job.cost_model, job.budget, **options)


def _ecad(job: _Job, options: dict[str, Any]) -> Schedule:
    options = dict(options)
    key_steps, branch = bool(options.pop("key_steps", False)), int(options.pop("branch", 0))
    search_branch(job.adapter.family, job.adapter.unit_names, branch)
    try:
        config = EvolutionConfig(**options)
    except TypeError as err:
        raise SearchError(f"ecad options: {err}; see diffcache.schedules.evolution.EvolutionConfig "
                          "(and key_steps=1, branch=B for the key-step genome)") from None
    steps, adapter = job.data.steps(job.pipe), job.adapter
    layout = adapter.layout(job.granularity)
    template = Schedule(np.ones((steps, len(layout.units), len(layout.components)), dtype=bool), layout.units,
                        layout.components, "none", {}, adapter.model_info, present=layout.present,
                        forecast=job.forecast)
    genome = Genome(template, adapter.family == "unet", key_steps, branch)
    # Candidates are judged as they will run: with the search's forecast setting.
    seeds = [replace(seed, forecast=job.forecast) for seed in _seed_schedules(job, steps)]
    score = job.quality if callable(job.quality) else quality_function(job.quality)
    genome_kind = [("key_steps", branch)] if key_steps else []  # (the full genome's keys predate this option)
    key = repr([adapter.model_info, job.data.key(), job.granularity, job.budget.measure, job.forecast,
                getattr(score, "__name__", "custom"), *genome_kind, *([job.extra_key] if job.extra_key else [])])
    result = evolve(job.pipe, job.data, genome, job.cost_model, score, seeds, config, key=key,
                    progress=job.progress, resume=job.resume, extra=job.extra, budget=job.budget,
                    checkpoint=job.out / "ecad-checkpoint.json" if job.out is not None else None)
    if job.out is not None:
        name = job.quality if isinstance(job.quality, str) else "quality"
        _write_front(result.front, job.out, name, job.cost_model.measure)
    chosen = result.pick(job.budget)
    meta = {"quality": chosen.meta["quality"], "front_size": len(result.front),
            "evaluated": result.history[-1]["evaluated"]}
    params = _config_params(config) | ({"key_steps": 1, "branch": branch} if key_steps else {})
    return replace(chosen, params=params, meta=meta)


def _router(job: _Job, options: dict[str, Any]) -> Schedule:
    from .router import RouterConfig, train_router

    try:
        config = RouterConfig(**options)
    except TypeError as err:
        raise SearchError(f"router options: {err}; see diffcache.schedules.router.RouterConfig") from None
    router = train_router(job.pipe, job.adapter, job.data, job.granularity, config, progress=job.progress)
    if job.out is not None:
        router.save(job.out / "router.npz")
    return router.schedule(job.cost_model, job.budget)


_METHODS: dict[str, Callable[[_Job, dict[str, Any]], Schedule]] = {
    "dp": _dp, "bac": _bac, "ecad": _ecad, "router": _router,
}


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


def _config_params(config: EvolutionConfig) -> dict[str, Any]:
    return {"population": config.population, "generations": config.generations, "seed": config.seed}


def _seed_schedules(job: _Job, steps: int) -> list[Schedule]:
    """ECAD's seed population: uniform presets at several intervals (DeepCache branches on UNets, FORA on
    transformers; with a forecast also after two warm-up steps, and TaylorSeer's key steps), and DP schedules at
    several budgets; those whose predicted cost is closest to the budget first, since the pick is made there."""
    adapter, cost_model = job.adapter, job.cost_model
    intervals = range(2, min(steps, 8) + 1)
    warmups = (1, 2) if job.forecast else (1,)  # a forecast wants its two points early (TaylorSeer's warm-up)
    if adapter.family == "unet":
        deepest = len(adapter.unit_names) - 2  # DeepCache's deepest branch id: the mid block alone
        tags = [f"deepcache:interval={n},branch={b},warmup={w}"
                for n in intervals for b in sorted({-1, 0, deepest // 2}) for w in warmups]
    elif job.granularity == BLOCK:
        tags = [f"uniform:interval={n},warmup={w}" for n in intervals for w in warmups]
    else:
        tags = [f"fora:interval={n},warmup={w}" for n in intervals for w in warmups]
    seeds = [build_from_tag(tag, adapter, steps) for tag in tags]
    if job.forecast:
        seeds += [_with_key_steps(seeds[0], taylorseer_key_steps(steps, n)) for n in intervals]
    calibration = job.calibration()
    for speedup in _DP_SEED_SPEEDUPS:
        try:
            seeds.append(dp_schedule(calibration, cost_model, Budget(cost_model.measure, 1 / speedup)))
        except SearchError:
            break
    return sorted(seeds, key=lambda s: abs(cost_model.fraction(s) - job.budget.fraction))


def taylorseer_key_steps(steps: int, interval: int, warmup: int = 2) -> np.ndarray:
    """The steps diffusers' TaylorSeerCache computes (``cache_interval``, ``disable_cache_before_step``): the
    warm-up, then one step after it and every ``interval`` from there."""
    k = np.arange(steps)
    return (k < warmup) | ((k - warmup - 1) % interval == 0)


def _with_key_steps(schedule: Schedule, key: np.ndarray) -> Schedule:
    """``schedule``'s reuse pattern (what a non-key step reuses: its first reuse row) on other key steps."""
    reuse_row = schedule.recompute[~schedule.recompute.all(axis=(1, 2))][0]
    grid = np.where(key[:, None, None], True, reuse_row[None])
    return replace(schedule, recompute=grid, method="taylorseer", params={})


def quality_function(name: str) -> QualityFn:
    """The built-in ECAD quality objectives (higher is better)."""
    from ..eval.metrics import accuracy, fid, psnr

    if name == "psnr":
        def quality(images: np.ndarray, full: np.ndarray, conditions: Sequence[Any]) -> float:
            return float(np.mean(psnr(images, full)))
    elif name in ("accuracy", "fid"):
        from ..models import load_classifier

        classifier = load_classifier()

        def quality(images: np.ndarray, full: np.ndarray, conditions: Sequence[Any]) -> float:
            if name == "accuracy":
                return accuracy(images, [int(c) for c in conditions], classifier)
            return -fid(images, full, classifier)
    else:
        raise SearchError(f"unknown quality {name!r}; choose from {list(QUALITY_NAMES)} or pass a function")
    quality.__name__ = name
    return quality


def _write_front(front: list[Schedule], out: Path, quality_name: str, measure: str) -> None:
    """``ecad-front.json`` (every front schedule with its quality and predicted cost) and ``ecad-pareto.png``."""
    import json

    from ..eval.plots import pareto_plot

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "ecad-front.json", json.dumps([s.to_dict() for s in front], indent=1))
    points = [("", 1 / s.meta["cost"], s.meta["quality"]) for s in front]  # values are on the axes
    pareto_plot({"ECAD front": points}, out / "ecad-pareto.png", quality_name, lower_is_better=False,
                speedup_label=f"predicted speedup ({measure} cost model, x)")


__all__ = ["METHODS", "QUALITY_NAMES", "quality_function", "search"]
