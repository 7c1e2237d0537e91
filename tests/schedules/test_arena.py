"""The final round of `diffcache.search`: the result is never worse than a preset on the calibration set, and it
is scored on a held-out set disjoint from it."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import diffcache
from diffcache.data import CalibrationData
from diffcache.eval.metrics import psnr
from diffcache.schedules.arena import split

from .test_search import images

LABELS = [207, 360, 387, 974]
STEPS = 8


def test_search_is_at_least_as_good_as_every_fitting_preset_on_the_calibration_set(dit):
    budget = 0.6  # recompute fraction
    schedule = diffcache.search(dit, LABELS, "dp", f"recompute:{budget}", num_inference_steps=STEPS,
                                guidance_scale=4.0, batch_size=2, validation=False, progress=False)
    data = CalibrationData(LABELS, STEPS, 4.0, 0, 2)
    full = images(dit, data)

    def quality(plan) -> float:
        with diffcache.accelerated(dit, plan):
            return float(np.mean(psnr(images(dit, data), full)))

    ours = quality(schedule)
    assert ours == pytest.approx(schedule.meta["arena"]["calibration_quality"], abs=1e-3)
    # The presets a user could have picked instead, listed here independently of the search's own list.
    tried = 0
    for n in range(2, STEPS):
        for warmup in (1, 2):
            for forecast in (0, 1, 2):
                tag = f"uniform:interval={n},warmup={warmup}" + (f",forecast={forecast}" if forecast else "")
                plan = diffcache.schedules.presets.from_tag(tag, dit.transformer, STEPS)
                if plan.recompute_fraction <= budget:
                    tried += 1
                    assert ours >= quality(plan) - 1e-6, tag
    assert tried >= 10
    assert schedule.recompute_fraction <= budget + 1e-9
    # Without the final round the method's own pick is returned: at most as good.
    own = diffcache.search(dit, LABELS, "dp", f"recompute:{budget}", num_inference_steps=STEPS,
                           guidance_scale=4.0, batch_size=2, presets=False, progress=False)
    assert own.method == "dp" and "arena" not in own.meta and quality(own) <= ours + 1e-6


def test_held_out_set_is_disjoint_and_reported(dit, caplog):
    labels = list(range(10))
    calibration, held = split(labels, None)
    assert calibration == labels[:8] and held == labels[8:] and not set(calibration) & set(held)
    assert split(labels[:9], None) == (labels[:9], []) and split(labels, False) == (labels, [])
    with caplog.at_level(logging.WARNING):
        schedule = diffcache.search(dit, labels, "dp", "recompute:0.6", num_inference_steps=STEPS,
                                    guidance_scale=4.0, batch_size=4, progress=False)
    report = schedule.meta["arena"]["held_out"]
    assert schedule.meta["calibration"]["conditions"] == 8 and report["conditions"] == 2
    assert report["seed"] == 2  # calibration batches used seeds 0 and 1
    diff = report["psnr_difference"]
    assert diff["low"] <= diff["mean"] <= diff["high"]
    lost = report["chosen_quality"] < report["best_preset_quality"]
    assert lost == ("loses to the preset" in caplog.text)


def test_validation_that_overlaps_calibration_is_flagged(dit, caplog):
    with caplog.at_level(logging.WARNING):
        schedule = diffcache.search(dit, LABELS, "dp", "recompute:0.6", num_inference_steps=STEPS,
                                    guidance_scale=4.0, batch_size=2, validation=[207, 1], progress=False)
    assert "shares 1 conditions with the calibration set (207)" in caplog.text
    assert f"calibrating on {len(LABELS)} image(s); below 8" in caplog.text  # too few to rank near-ties
    assert schedule.meta["arena"]["held_out"]["conditions"] == 2
    with pytest.raises(diffcache.SearchError, match="below the cheapest"):
        diffcache.search(dit, LABELS, "dp", "50x", num_inference_steps=STEPS, guidance_scale=4.0, batch_size=2,
                         validation=False, progress=False)


def test_ecad_picks_from_its_front_by_the_held_out_score(dit):
    schedule = diffcache.search(dit, LABELS, "ecad", "recompute:0.7", num_inference_steps=STEPS, guidance_scale=4.0,
                                batch_size=2, validation=[1, 2], generations=1, population=8, key_steps=1,
                                progress=False)
    report = schedule.meta["arena"]
    assert report["method_pick"].startswith("best of ") and report["method_pick"].endswith("on the held-out set")
    assert report["candidates"] > 3 and "held_out" in report


def test_a_registered_quality_is_resolved_once_per_final_round(dit):
    from diffcache.eval.quality import register_quality

    made = []

    @register_quality("test-arena-counted")
    def _counted():  # a factory may load a model: the final round must not call it per candidate
        made.append(1)
        return lambda outputs, full, conditions: -float(np.abs(outputs - full).mean())

    schedule = diffcache.search(dit, LABELS, "dp", "recompute:0.6", num_inference_steps=STEPS, guidance_scale=4.0,
                                batch_size=2, quality="test-arena-counted", validation=[1, 2], progress=False)
    assert schedule.meta["arena"]["candidates"] > 5 and len(made) == 1


@pytest.mark.parametrize("budget", ["100x", "latency:200x"])
def test_an_unreachable_budget_is_refused_before_any_calibration(dit, tmp_path, budget):
    calls = []
    handle = dit.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(diffcache.SearchError, match="below the cheapest schedule there is"):
            diffcache.search(dit, LABELS, "dp", budget, num_inference_steps=STEPS, guidance_scale=4.0, batch_size=2,
                             out_dir=tmp_path / "work", progress=False)
    finally:
        handle.remove()
    # Only the cost profile ran (MACs: one step per CFG branch; latency: a warm-up and a timed generation).
    assert len(calls) <= (2 if budget == "100x" else 4 * STEPS)  # a calibration runs ~STEPS^2 calls
    assert not any((tmp_path / "work").rglob("*")) if (tmp_path / "work").exists() else True
