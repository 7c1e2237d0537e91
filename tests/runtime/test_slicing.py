"""Memory slicing (`accelerate(..., memory="sliced")`) on every tiny video pipeline: the output equals the unsliced
run within float tolerance, every layer the adapter names really runs in chunks, cache plans still hold, restore
is exact, and bad options fail before anything changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffcache
from diffcache import SliceConfig, SliceError
from diffcache.adapters import resolve_adapter
from diffcache.errors import UnsupportedModelError
from diffcache.runtime import find_attachment
from diffcache.testing import build_pipeline
from diffcache.testing.video import VIDEO_PIPELINE_NAMES, VIDEO_UNETS, build_video_pipeline, video_call_kwargs

from ..conftest import WeightCalls, first_weight_leaf

FACTORISED = (*VIDEO_UNETS, "latte")  # per-frame and temporal layers to cut; the rest are full-attention transformers
FINE = {name: "sliced:frames=1,tokens=3" if name in FACTORISED else "sliced:tokens=3" for name in VIDEO_PIPELINE_NAMES}


def run(pipe, name: str) -> np.ndarray:
    return np.asarray(pipe(**video_call_kwargs(name)).frames, dtype=np.float64)


def denoiser(pipe) -> torch.nn.Module:
    return getattr(pipe, "transformer", None) or pipe.unet


@pytest.fixture(scope="module", params=VIDEO_PIPELINE_NAMES)
def case(request):
    pipe = build_video_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe  # references are made in the tests: the fixture runs before the 1-thread setting


def test_sliced_equals_unsliced_and_every_target_is_cut(case):
    name, pipe = case
    reference = run(pipe, name)
    targets = resolve_adapter(denoiser(pipe)).slice_targets()
    assert targets, name
    leaves = [first_weight_leaf(module) for module, _ in targets]
    with WeightCalls(leaves) as whole:
        run(pipe, name)
    diffcache.accelerate(pipe, "none", memory=FINE[name])
    try:
        with WeightCalls(leaves) as cut:
            sliced = run(pipe, name)
        np.testing.assert_allclose(sliced, reference, rtol=0, atol=1e-4)
        assert all(c > w > 0 for c, w in zip(cut.counts, whole.counts)), (cut.counts, whole.counts)
        assert np.array_equal(run(pipe, name), sliced)  # a second generation: nothing kept from the first
        summary = diffcache.summary(pipe)
        assert summary.memory.startswith("sliced: ")
        assert summary.peak_rss_bytes is not None and summary.peak_rss_bytes >= summary.start_rss_bytes > 0
        assert "peak RSS" in str(summary)
    finally:
        diffcache.restore(pipe)
    assert np.array_equal(run(pipe, name), reference)
    assert find_attachment(denoiser(pipe)) is None


def test_sliced_with_a_cache_plan_equals_the_plan_alone(case):
    name, pipe = case
    tag = "deepcache:interval=2,branch=1" if name in VIDEO_UNETS else "fora:interval=2"
    with diffcache.accelerated(pipe, tag):
        cached = run(pipe, name)
    with diffcache.accelerated(pipe, tag, memory=FINE[name]):
        both = run(pipe, name)
        assert diffcache.summary(pipe).hits > 0
    np.testing.assert_allclose(both, cached, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in VIDEO_PIPELINE_NAMES if n not in FACTORISED][:2])
def test_frames_on_full_attention_is_refused_and_nothing_changes(name):
    pipe = build_video_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    before = run(pipe, name)
    with pytest.raises(SliceError, match="full 3-D attention"):
        diffcache.accelerate(pipe, "fora:interval=2", memory="sliced:frames=2")
    assert find_attachment(denoiser(pipe)) is None
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in denoiser(pipe).modules())
    assert np.array_equal(run(pipe, name), before)


def test_image_models_and_malformed_options_are_refused():
    pipe = build_pipeline("dit")
    with pytest.raises(UnsupportedModelError, match="not a video model"):
        diffcache.accelerate(pipe, "none", memory="sliced")
    assert find_attachment(pipe.transformer) is None
    video = build_video_pipeline("animatediff")
    for bad in ("chunked", "sliced:frames=two", "sliced:width=2", "sliced:frames=0,tokens=0", 3):
        with pytest.raises(SliceError):
            diffcache.accelerate(video, "none", memory=bad)
    assert find_attachment(video.unet) is None
    assert SliceConfig.parse("sliced: frames = 3") == SliceConfig(frames=3)
    with pytest.raises(SliceError, match=">= 0"):
        SliceConfig(tokens=-1)
