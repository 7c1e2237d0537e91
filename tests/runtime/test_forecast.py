"""``forecast=1`` / ``2``: reuse steps serve a Taylor forecast of the cached feature (TaylorSeer, order 1 / 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffcache
from diffcache import Schedule, ScheduleError
from diffcache.models import load_pipeline
from diffcache.testing import build_pipeline
from diffcache.schedules.presets import from_tag, resample, tag_of

from ..conftest import psnr, run


def test_forecast_extrapolates_from_the_last_two_computed_values():
    pipe = build_pipeline("dit")
    ff = pipe.transformer.transformer_blocks[0].ff
    values = iter([1.0, 3.0, 100.0, 100.0])  # what ff computes at the steps it runs
    ff.forward = lambda hidden_states, *args, **kwargs: torch.full_like(hidden_states, next(values))
    seen = []
    ff.register_forward_hook(lambda _m, _a, out: seen.append(float(out.flatten()[0])))
    plan = from_tag("fora:interval=1", pipe.transformer, 5)
    bits = plan.recompute.copy()
    bits[2:4, 0, plan.components.index("ff")] = False  # ff runs at steps 0, 1, 4; reused at 2 and 3
    for forecast, expected in ((1, [1.0, 3.0, 5.0, 7.0, 100.0]), (0, [1.0, 3.0, 3.0, 3.0, 100.0])):
        values = iter([1.0, 3.0, 100.0])
        seen.clear()
        diffcache.accelerate(pipe, Schedule(bits, plan.units, plan.components, forecast=forecast))
        run(pipe, "dit", steps=5)
        assert seen == expected


def test_second_order_forecast_uses_the_last_three_computed_values():
    pipe = build_pipeline("dit")
    ff = pipe.transformer.transformer_blocks[0].ff
    feed = {}
    ff.forward = lambda hidden_states, *args, **kwargs: torch.full_like(hidden_states, next(feed["values"]))
    seen = []
    ff.register_forward_hook(lambda _m, _a, out: seen.append(float(out.flatten()[0])))
    plan = from_tag("fora:interval=1", pipe.transformer, 6)
    bits = plan.recompute.copy()
    bits[[2, 4, 5], 0, plan.components.index("ff")] = False  # ff runs at steps 0, 1, 3: k^2 + 1 = 1, 2, 10
    # at step 3: d1 = (10 - 2) / 2 = 4, d2 = (4 - 1) / 2 = 1.5; step 4: 10 + 4 + 1.5 / 2, step 5: 10 + 8 + 1.5 * 2
    for forecast, expected in ((2, [1, 2, 3, 10, 14.75, 21]), (1, [1, 2, 3, 10, 14, 18]), (0, [1, 2, 2, 10, 10, 10])):
        feed["values"] = iter([1.0, 2.0, 10.0])
        seen.clear()
        diffcache.accelerate(pipe, Schedule(bits, plan.units, plan.components, forecast=forecast))
        run(pipe, "dit", steps=6)
        assert seen == expected, forecast


@pytest.mark.parametrize("name", ["sd", "dit"])
def test_forecast_keeps_the_identities(name):
    pipe = build_pipeline(name)
    ref = run(pipe, name)
    diffcache.accelerate(pipe, "uniform:interval=1,forecast=1")
    assert np.array_equal(run(pipe, name), ref)
    tag = "deepcache:interval=2,forecast=1" if name == "sd" else "fora:interval=2,forecast=1"
    diffcache.accelerate(pipe, tag)
    first = run(pipe, name)
    assert not np.array_equal(first, ref)
    assert np.array_equal(run(pipe, name), first)  # no history leaks into the next generation
    diffcache.accelerate(pipe, tag.replace(",forecast=1", ""))
    assert not np.array_equal(run(pipe, name), first)
    diffcache.restore(pipe)
    assert np.array_equal(run(pipe, name), ref)


@pytest.mark.parametrize("name, tag", [("digits-unet", "deepcache:interval=3"), ("digits-dit", "uniform:interval=3")])
def test_forecast_is_closer_to_full_on_the_trained_models(name, tag):
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"class_labels": [1, 4, 7], "num_inference_steps": 25, "guidance_scale": 2.0, "output_type": "np"}

    def images():
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images

    full = images()
    quality, memory = {}, {}
    for forecast in (0, 1, 2):
        with diffcache.accelerated(pipe, f"{tag},forecast={forecast}"):
            quality[forecast] = psnr(images(), full)
            memory[forecast] = diffcache.summary(pipe).peak_cache_bytes
    assert quality[1] > quality[0] + 3, quality  # measured: about +9 dB (UNet) and +5 dB (DiT) at 25 steps
    assert quality[2] > quality[0] + 3, quality
    assert memory[1] == 2 * memory[0] and memory[2] == 3 * memory[0]  # one tensor per derivative beside the feature


def test_forecast_in_json_tags_and_resampling(tmp_path):
    pipe = build_pipeline("dit")
    schedule = from_tag("uniform:interval=3,forecast=1", pipe.transformer, 9)
    assert schedule.forecast == 1 and tag_of(schedule) == "uniform:interval=3,forecast=1"
    assert resample(schedule, 12).forecast == 1
    path = tmp_path / "s.json"
    schedule.save(path)
    assert Schedule.load(path).forecast == 1 and Schedule.load(path) == schedule
    plain = from_tag("uniform:interval=3", pipe.transformer, 9)
    assert "forecast" not in plain.to_dict()  # files without forecasting stay as before
    searched = Schedule(plain.recompute, plain.units, plain.components, "dp", forecast=1)
    assert resample(searched, 12).forecast == 1
    assert resample(from_tag("uniform:interval=3,forecast=2", pipe.transformer, 9), 12).forecast == 2
    for bad in (3, -1, True, "1"):
        with pytest.raises(ScheduleError, match="forecast must be 0"):
            Schedule(plain.recompute, plain.units, plain.components, forecast=bad)


def test_warmup_computes_the_first_steps_then_counts_the_interval():
    pipe = build_pipeline("dit")
    schedule = from_tag("uniform:interval=4,warmup=2,forecast=1", pipe.transformer, 12)
    assert np.flatnonzero(schedule.recompute.all(axis=(1, 2))).tolist() == [0, 1, 5, 9]
    assert np.flatnonzero(from_tag("fora:interval=3", pipe.transformer, 12).recompute.all(axis=(1, 2))
                          ).tolist() == [0, 3, 6, 9]
    unet = build_pipeline("sd").unet
    deepcache = from_tag("deepcache:interval=3,warmup=3", unet, 10)
    assert np.flatnonzero(deepcache.recompute.all(axis=(1, 2))).tolist() == [0, 1, 2, 5, 8]
    with pytest.raises(ScheduleError, match="warmup must be >= 1"):
        from_tag("uniform:interval=2,warmup=0", pipe.transformer, 12)
