"""The shared segmentation DP against brute force, and the dp/bac schedules against their budgets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffcache.errors import SearchError
from diffcache.schedules.budget import Budget, CostModel
from diffcache.schedules.calibrate import Calibration
from diffcache.schedules.dp import bac_schedule, dp_schedule, optimal_segmentation, segment_cost


def brute_force(distance: np.ndarray, segments: int, min_len: int = 1, max_len: int | None = None):
    steps = distance.shape[0]
    best = (np.inf, None)
    for inner in itertools.combinations(range(1, steps), segments - 1):
        starts = [0, *inner]
        bounds = [*starts[1:], steps]
        lengths = [b - a for a, b in zip(starts, bounds)]
        if min(lengths) < min_len or (max_len is not None and max(lengths) > max_len):
            continue
        total = sum(distance[a, t] for a, b in zip(starts, bounds) for t in range(a + 1, b))
        if total < best[0] - 1e-12:
            best = (total, starts)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_segmentation_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    steps = 8
    distance = rng.random((steps, steps)) * (1 + np.arange(steps))[None, :]  # not symmetric: the DP must not care
    cost = segment_cost(distance)
    for segments in range(1, steps + 1):
        for bounds in ((1, None), (2, 4)):
            expected = brute_force(distance, segments, *bounds)
            if expected[1] is None:
                with pytest.raises(SearchError, match="no split"):
                    optimal_segmentation(cost, segments, *bounds)
                continue
            total, starts = optimal_segmentation(cost, segments, *bounds)
            assert total == pytest.approx(expected[0])
            assert starts[0] == 0 and sorted(starts) == starts


def test_segmentation_hand_checked():
    # Features change a lot at step 3: the best two segments start at 0 and 3.
    distance = np.ones((6, 6)) * 0.1
    distance[:3, 3:] = 5.0
    assert optimal_segmentation(segment_cost(distance), 2) == (pytest.approx(0.1 * 2 + 0.1 * 2), [0, 3])


def fake_calibration(family: str, units: int = 4, components: int = 2, steps: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    comps = ["block"] if family == "unet" else ["attn1", "ff"][:components]
    shape = (units, len(comps), steps, steps)
    gaps = np.abs(np.arange(steps)[:, None] - np.arange(steps)[None, :])
    distances = {m: rng.random(shape) * 0.1 + gaps * rng.random((units, len(comps), 1, 1)) for m in ("l1", "cosine")}
    return Calibration([f"u{i}" for i in range(units)], comps, np.ones((units, len(comps)), bool), family == "unet",
                       {"class": "Fake", "fingerprint": "0"}, "data", distances, np.ones((units, len(comps))),
                       rng.random(steps) + 0.5)


@pytest.mark.parametrize("family", ["transformer", "unet"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.7])
def test_schedules_respect_the_budget(family, fraction):
    calibration = fake_calibration(family)
    model = CostModel("recompute")
    budget = Budget("recompute", fraction)
    whole = {"branch": -1} if family == "unet" else {}  # branch 0 always runs units[0]: above 25% of the slots
    for method, options in ((dp_schedule, whole), (bac_schedule, {})):
        schedule = method(calibration, model, budget, **options)
        assert schedule.recompute[0].all()
        assert model.fraction(schedule) <= fraction + 1e-9
        if family == "unet":  # shells: a step's bits are 1..10..0
            bits = schedule.recompute[:, :, 0]
            assert (np.diff(bits.astype(int), axis=1) <= 0).all()


def test_dp_picks_the_most_key_steps_that_fit():
    calibration = fake_calibration("transformer")
    model = CostModel("recompute")
    schedule = dp_schedule(calibration, model, Budget("recompute", 0.5))
    assert schedule.params["key_steps"] == 6  # 6 full steps of 12 = exactly half the slots
    assert schedule.recompute.all(axis=(1, 2)).sum() == 6


def test_bac_bubbling_union_refreshes_upstream_slots_with_deeper_ffn():
    calibration = fake_calibration("transformer")
    model = CostModel("recompute")
    plain = bac_schedule(calibration, model, Budget("recompute", 1.0), upstream=1)
    assert plain.recompute.all()
    schedule = bac_schedule(calibration, model, Budget("recompute", 0.4), upstream=2)
    updates = schedule.params["updates"]
    per_slot = schedule.recompute.sum(axis=0)
    assert (per_slot >= updates).all()
    assert (per_slot > updates).any()  # the bubbled slots got extra refreshes


def test_budget_too_small_and_bad_options():
    calibration = fake_calibration("unet")
    with pytest.raises(SearchError, match="below the cheapest"):
        dp_schedule(calibration, CostModel("recompute"), Budget("recompute", 0.05))
    with pytest.raises(SearchError, match="branch must be in"):
        dp_schedule(calibration, CostModel("recompute"), Budget("recompute", 0.5), branch=9)
    with pytest.raises(SearchError, match="unknown feature metric"):
        dp_schedule(calibration, CostModel("recompute"), Budget("recompute", 0.5), metric="l7")


@pytest.mark.parametrize(
    "text, measure, fraction",
    [("2x", "macs", 0.5), ("latency:4x", "latency", 0.25), ("recompute:0.4", "recompute", 0.4), (0.5, "macs", 0.5),
     ("MACS:2.5X", "macs", 0.4)],
)
def test_budget_parse(text, measure, fraction):
    budget = Budget.parse(text)
    assert (budget.measure, budget.fraction) == (measure, pytest.approx(fraction))


@pytest.mark.parametrize("text", ["fast", "0.5x", "speed:2x", "recompute:1.5", "0"])
def test_budget_parse_rejects(text):
    with pytest.raises(SearchError):
        Budget.parse(text)
