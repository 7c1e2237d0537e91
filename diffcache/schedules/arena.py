"""The last round of every search: the method's pick against every preset that fits the budget.

A searched schedule is only worth having if it beats the one-line presets. So `diffcache.search` ends here:
the candidates are the method's pick (with and without a Taylor forecast, unless the user fixed one) and every
preset of the search's layout that fits the budget under the same cost model (uniform / DeepCache / FORA at
intervals 2..8, one or two warm-up steps, each forecast order, and TaylorSeer's key steps). Each is run on the
calibration set and scored with the search's quality objective against the full model; the best is returned.
So on the calibration set the result is at least as good as every such preset (tested). With a held-out set
(other conditions and other seeds), the pick and the best preset are scored there too, with a paired 95%
interval of their per-output PSNR difference, and a warning when the pick loses there (the proxy overfit).
A method that leaves a front (ECAD) has its pick made on the held-out set first (`front_pick`); its held-out
report is then optimistic (the set chose it), so judge ECAD on images neither set saw (scripts/bench_defaults.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..adapters import BLOCK
from ..data import CalibrationData
from ..errors import ScheduleError
from ..eval.intervals import paired
from ..eval.metrics import psnr_per_image
from ..eval.quality import quality_function
from ..runtime import planned
from ..schedule import FORECAST_ORDERS, Schedule
from .evolution import taylorseer_key_steps, with_key_steps
from .methods import SearchJob
from .presets import build_from_tag

logger = logging.getLogger(__name__)

INTERVALS = range(2, 9)
WARMUPS = (1, 2)


@dataclass
class Entry:
    """One candidate: its label (a preset tag, or ``"<method> pick"``), plan and calibration quality."""

    label: str
    schedule: Schedule
    quality: float = float("nan")


def preset_candidates(job: SearchJob, steps: int, forecasts: Sequence[int]) -> list[Entry]:
    """Every preset of the search's layout (and TaylorSeer's key steps) that fits the budget, per forecast."""
    layout = job.adapter.layout(job.granularity)
    if layout.nested:
        shapes = [f"deepcache:interval={{n}},branch={b},warmup={{w}}" for b in (-1, 0)]  # TaylorSeer's cut, DeepCache's
    elif job.granularity == BLOCK:
        shapes = ["uniform:interval={n},warmup={w}"]
    else:
        shapes = ["fora:interval={n},warmup={w}"]
    entries, seen = [], set()
    for forecast in forecasts:
        for shape in shapes:
            for n in INTERVALS:
                if n >= steps:
                    continue
                for w in WARMUPS:
                    tag = shape.format(n=n, w=w) + (f",forecast={forecast}" if forecast else "")
                    try:
                        entries.append(Entry(tag, build_from_tag(tag, job.adapter, steps)))
                    except ScheduleError:  # e.g. a warm-up as long as the generation
                        continue
            # TaylorSeer's key steps (two warm-up steps, then every n), reusing what this shape reuses
            base = build_from_tag(shape.format(n=2, w=1), job.adapter, steps)
            for n in INTERVALS:
                if n < steps:
                    keyed = replace(with_key_steps(base, taylorseer_key_steps(steps, n)), forecast=forecast)
                    entries.append(Entry(f"taylorseer:interval={n} ({shape.split(':')[0]}"
                                         f"{', forecast=' + str(forecast) if forecast else ''})", keyed))
    fitting = []
    for entry in entries:
        key = (entry.schedule.recompute.tobytes(), entry.schedule.forecast)
        if key not in seen and job.cost_model.fits(entry.schedule, job.budget):
            seen.add(key)
            fitting.append(entry)
    return fitting


def outputs_of(job: SearchJob, data: CalibrationData, schedule: Schedule | None) -> np.ndarray:
    """All of ``data``'s outputs, under ``schedule`` (``None``: the full model), concatenated."""
    batches = data.batches(job.pipe)
    if schedule is None:
        return np.concatenate([data.generate(job.pipe, kwargs) for kwargs in batches])
    with planned(job.pipe, job.adapter, schedule, job.extra):
        return np.concatenate([data.generate(job.pipe, kwargs) for kwargs in batches])


Judge = Callable[[np.ndarray, np.ndarray, CalibrationData], float]


def judge(job: SearchJob) -> Judge:
    """The search's quality of outputs against the full model's (higher is better), resolved once (a registered
    objective may load a model). The default PSNR is for images and frames; other outputs (actions, tokens) are
    scored by minus the calibration data's ``compare`` distance to the full model's."""
    fn = job.quality if callable(job.quality) else quality_function(job.quality)

    def quality(outputs: np.ndarray, full: np.ndarray, data: CalibrationData) -> float:
        if job.quality == "psnr" and outputs.ndim != 4:
            return -float(data.compare(outputs, full))
        return float(fn(outputs, full, data.conditions))

    return quality


def best_of(job: SearchJob, pick: Schedule, forecasts: Sequence[int], validation: CalibrationData | None
            ) -> tuple[Schedule, dict[str, Any]]:
    """The best of ``pick`` (at each of ``forecasts``) and every fitting preset on the calibration set, and a
    report (calibration qualities; held-out ones with ``validation``)."""
    steps = pick.num_steps
    score = judge(job)
    picked_from_front = held_full = None
    if validation is not None:
        held_full = outputs_of(job, validation, None)
        pick, picked_from_front = front_pick(job, pick, validation, held_full, score)
    entries = [Entry(f"{pick.method} pick" + (f", forecast={f}" if f else ""), replace(pick, forecast=f))
               for f in forecasts]
    entries = [e for e in entries if job.cost_model.fits(e.schedule, job.budget)]
    presets = preset_candidates(job, steps, forecasts)
    full = outputs_of(job, job.data, None)
    for entry in tqdm(entries + presets, desc="search vs presets", disable=not job.progress):
        entry.quality = score(outputs_of(job, job.data, entry.schedule), full, job.data)
    best = max(entries + presets, key=lambda e: e.quality)  # the pick first: it wins ties
    best_preset = max(presets, key=lambda e: e.quality) if presets else None
    report: dict[str, Any] = {
        "chosen": best.label, "calibration_quality": round(best.quality, 4), "candidates": len(entries + presets),
        "method_pick_quality": round(max(e.quality for e in entries), 4) if entries else None,
        "best_preset": None if best_preset is None else {"label": best_preset.label,
                                                         "calibration_quality": round(best_preset.quality, 4),
                                                         "schedule": best_preset.schedule.to_dict()},
    }
    if picked_from_front is not None:
        report["method_pick"] = picked_from_front
    if validation is not None and best_preset is not None:
        report["held_out"] = held_out(job, best, best_preset, validation, held_full, score)
    return best.schedule, report


def front_pick(job: SearchJob, pick: Schedule, validation: CalibrationData, full: np.ndarray, score: Judge
               ) -> tuple[Schedule, str | None]:
    """A method that left a front (ECAD) has its pick made there by the held-out score, not the training one:
    the front's schedules that fit the budget are run on ``validation`` (``full``: the full model's outputs
    there) and the best replaces ``pick``."""
    fitting = [s for s in job.front if job.cost_model.fits(s, job.budget)]
    if len(fitting) < 2:
        return pick, None
    scored = [(score(outputs_of(job, validation, s), full, validation), i) for i, s in enumerate(fitting)]
    best_score, best = max(scored)
    chosen = fitting[best]
    meta = {**pick.meta, "quality": chosen.meta.get("quality", pick.meta.get("quality")),
            "held_out_quality": round(best_score, 4)}
    schedule = replace(chosen, method=pick.method, params=pick.params, meta=meta, forecast=pick.forecast)
    return schedule, f"best of {len(fitting)} front schedules on the held-out set"


def held_out(job: SearchJob, chosen: Entry, preset: Entry, validation: CalibrationData, full: np.ndarray,
             score: Judge) -> dict[str, Any]:
    """Quality of the chosen schedule and of the best preset on other conditions and seeds (``full``: the full
    model's outputs there), and the paired 95% interval of their per-output PSNR difference; warns when the
    chosen one loses there."""
    ours = outputs_of(job, validation, chosen.schedule)
    theirs = outputs_of(job, validation, preset.schedule)
    q_ours, q_theirs = score(ours, full, validation), score(theirs, full, validation)
    report: dict[str, Any] = {"conditions": len(validation.conditions), "seed": validation.seed,
                              "chosen_quality": round(q_ours, 4), "best_preset_quality": round(q_theirs, 4)}
    if ours.ndim == 4 and len(ours) >= 2:  # images (or frames): per-output PSNR, capped like the metric
        diff = paired(psnr_per_image(ours, full), psnr_per_image(theirs, full))
        report["psnr_difference"] = {"mean": round(diff.mean, 3), "low": round(diff.low, 3),
                                     "high": round(diff.high, 3)}
    if q_ours < q_theirs:
        logger.warning("diffcache: on the held-out set the searched schedule (%s, quality %.3f) loses to the preset "
                       "%s (%.3f), though it won on the calibration set: calibrate on more conditions, or use the "
                       "preset", chosen.label, q_ours, preset.label, q_theirs)
    return report


def split(conditions: list[Any], validation: Sequence[Any] | bool | None) -> tuple[list[Any], list[Any]]:
    """Calibration and held-out conditions: ``validation`` given as a list is the held-out set; ``None`` holds
    out the last fifth of ten or more conditions (fewer: no held-out set); ``False`` none."""
    if validation is False or (validation is None and len(conditions) < 10):
        return conditions, []
    if validation is None:
        held = max(1, len(conditions) // 5)
        return conditions[:-held], conditions[-held:]
    if validation is True:
        return split(conditions, None)
    return conditions, list(validation)


__all__ = ["FORECAST_ORDERS", "Entry", "best_of", "held_out", "preset_candidates", "split"]
