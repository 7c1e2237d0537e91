"""diffusers' video pipelines (tiny, random weights) against their unaccelerated selves: identities bit for bit,
and caching that runs exactly what the plan says, per video transformer block class and per video UNet."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import diffcache
from diffcache.adapters import VideoTransformerAdapter, VideoUNetAdapter, resolve_adapter
from diffcache.runtime import find_attachment
from diffcache.schedules.presets import from_tag
from diffcache.testing.video import VIDEO_PIPELINE_NAMES, VIDEO_UNETS, build_video_pipeline, video_call_kwargs

from ..conftest import (STEPS, WeightCalls, assert_reuse_reproduces_full, first_call_inputs, first_weight_leaf,
                        full_then_reused, plan_leaves, psnr)

TRANSFORMERS = tuple(n for n in VIDEO_PIPELINE_NAMES if n not in VIDEO_UNETS)
CACHING_TAG = {name: "deepcache:interval=3,branch=1" for name in VIDEO_UNETS} | {
    name: "fora:interval=2" for name in TRANSFORMERS}


def run(pipe, name: str, steps: int = STEPS) -> np.ndarray:
    return np.asarray(pipe(**video_call_kwargs(name, num_inference_steps=steps)).frames)


def denoiser(pipe) -> torch.nn.Module:
    return getattr(pipe, "transformer", None) or pipe.unet


def hooked(pipe) -> list[str]:
    return [n for n, m in denoiser(pipe).named_modules() if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks]


def ran_per_step(pipe, name: str, leaves: list[torch.nn.Module]) -> np.ndarray:
    """(steps, len(leaves)) bool: did each leaf's weight compute in each step (all of a step's denoiser calls,
    e.g. Wan's separate cond / uncond calls, must agree)."""
    model, per_call = denoiser(pipe), []
    executor = find_attachment(model).executor
    with WeightCalls(leaves) as calls:
        before = [0] * len(leaves)

        def note(*_):
            nonlocal before
            per_call.append((executor.step, [a - b for a, b in zip(calls.counts, before)]))
            before = list(calls.counts)

        handle = model.register_forward_hook(note)
        run(pipe, name)
        handle.remove()
    steps: dict[int, list[list[int]]] = {}
    for step, counts in per_call:
        steps.setdefault(step, []).append(counts)
    assert sorted(steps) == list(range(STEPS))
    for rows in steps.values():
        assert all(row == rows[0] for row in rows), rows
        assert max(rows[0]) <= 1
    return np.array([steps[s][0] for s in range(STEPS)], dtype=bool)


@pytest.mark.parametrize("name", VIDEO_PIPELINE_NAMES)
def test_video_adapters_resolve(name):
    adapter = resolve_adapter(denoiser(build_video_pipeline(name)))
    assert isinstance(adapter, VideoUNetAdapter if name in VIDEO_UNETS else VideoTransformerAdapter)
    if name not in VIDEO_UNETS:
        assert adapter.granularities == ("block", "component")
        assert all(unit.components for unit in adapter.units), [u.name for u in adapter.units if not u.components]


def test_video_layouts_follow_the_blocks():
    wan = resolve_adapter(build_video_pipeline("wan").transformer)
    assert wan.layout("component").components == ["attn1", "attn2", "ffn"]
    cog = resolve_adapter(build_video_pipeline("cogvideox").transformer)
    assert cog.layout("component").components == ["attn1", "ff"] and cog.units[0].streams == (
        "hidden_states", "encoder_hidden_states")
    mochi = resolve_adapter(build_video_pipeline("mochi").transformer)
    # The last Mochi block is context_pre_only: no text feed-forward, so that slot is absent.
    assert mochi.layout("component").present[:, 2].tolist() == [True] * (len(mochi.units) - 1) + [False]


@pytest.mark.parametrize("name", VIDEO_PIPELINE_NAMES)
def test_video_none_and_all_recompute_are_bit_identical(name):
    pipe = build_video_pipeline(name)
    ref = run(pipe, name)
    diffcache.accelerate(pipe, "none")
    assert np.array_equal(run(pipe, name), ref)
    if name not in VIDEO_UNETS:
        diffcache.accelerate(pipe, "uniform:interval=1,granularity=component")
        assert np.array_equal(run(pipe, name), ref)
    summary = diffcache.summary(pipe)
    assert summary.hits == 0 and summary.num_steps == STEPS


@pytest.mark.parametrize("name", VIDEO_PIPELINE_NAMES)
def test_video_restore_is_bit_identical_and_removes_everything(name):
    pipe = build_video_pipeline(name)
    ref = run(pipe, name)
    diffcache.accelerate(pipe, CACHING_TAG[name])
    cached = run(pipe, name)
    assert not np.array_equal(cached, ref) and diffcache.summary(pipe).hits > 0
    assert np.array_equal(run(pipe, name), cached)  # nothing stale carried into the second generation
    diffcache.restore(pipe)
    assert np.array_equal(run(pipe, name), ref)
    assert hooked(pipe) == [] and not {"set_timesteps", "step"} & set(vars(pipe.scheduler))


@pytest.mark.parametrize("name", TRANSFORMERS)
@pytest.mark.parametrize("granularity", ["component", "block"])
def test_video_transformer_caching_runs_what_the_plan_says(name, granularity, caplog):
    pipe = build_video_pipeline(name)
    adapter = resolve_adapter(pipe.transformer)
    ref = run(pipe, name)
    tag = "fora:interval=2" if granularity == "component" else "uniform:interval=3"
    plan = from_tag(tag, adapter, STEPS)
    leaves, expected = plan_leaves(adapter, plan)
    diffcache.accelerate(pipe, tag)
    with caplog.at_level(logging.WARNING, logger="diffcache"):
        assert np.array_equal(ran_per_step(pipe, name, leaves), expected)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    quality = psnr(run(pipe, name), ref)
    assert 25 < quality < 200, f"{name} {tag}: PSNR vs full {quality:.1f} dB"


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_video_reuse_with_unchanged_inputs_is_exact(name):
    """A reuse step with the full step's very inputs must reproduce its output: a component served to the wrong
    place, a stale cache or a wrong stream order all change it."""
    pipe = build_video_pipeline(name)
    model = pipe.transformer
    args, kwargs = first_call_inputs(model, lambda: run(pipe, name, steps=2))  # Mochi divides by steps - 1
    assert_reuse_reproduces_full(pipe, model, args, kwargs, ["fora:interval=2", "uniform:interval=2"])


def test_latte_units_interleave_spatial_and_temporal_blocks():
    adapter = resolve_adapter(build_video_pipeline("latte").transformer)
    names = [u.name for u in adapter.units]
    assert names[:4] == ["transformer_blocks.0", "temporal_transformer_blocks.0", "transformer_blocks.1",
                         "temporal_transformer_blocks.1"]


def test_diffusion_forcing_scheduler_copies_step_their_own_state(caplog):
    """SkyReels-V2's diffusion forcing deep-copies the scheduler per frame: each copy must step itself (not the
    wrapped original) and a step ends once per denoiser call, not once per copy."""
    pipe = build_video_pipeline("skyreels-v2-df")
    ref = run(pipe, "skyreels-v2-df")
    diffcache.accelerate(pipe, "fora:interval=2")
    with caplog.at_level(logging.WARNING, logger="diffcache"):
        out = run(pipe, "skyreels-v2-df")
    assert not caplog.records, caplog.text
    summary = diffcache.summary(pipe)
    assert summary.num_steps == STEPS and summary.hits > 0
    assert 25 < psnr(out, ref) < 200


@pytest.mark.parametrize("name", VIDEO_UNETS)
def test_video_unet_reuse_skips_deep_temporal_layers(name):
    """DeepCache on a video UNet: a reuse step runs the shallow shells (conv_in, the first encoder layer with its
    temporal layer) and skips everything deeper, the mid block's temporal layers included."""
    pipe = build_video_pipeline(name)
    unet = pipe.unet
    temporal = "motion_modules" if name == "animatediff" else "attentions"
    shallow = first_weight_leaf(getattr(unet.down_blocks[0], temporal)[0])
    deep = first_weight_leaf(getattr(unet.mid_block, temporal)[0])
    leaves = [first_weight_leaf(unet.conv_in), shallow, deep]
    diffcache.accelerate(pipe, "deepcache:interval=2,branch=1")
    ran = ran_per_step(pipe, name, leaves)
    full_steps = np.arange(STEPS) % 2 == 0
    assert ran[:, 0].all() and ran[:, 1].all()
    assert np.array_equal(ran[:, 2], full_steps)


@pytest.mark.parametrize("name", VIDEO_UNETS)
def test_video_unet_reuse_with_unchanged_inputs_is_exact(name):
    pipe = build_video_pipeline(name)
    model = pipe.unet
    args, kwargs = first_call_inputs(model, lambda: run(pipe, name, steps=2))
    for tag in ("deepcache:interval=2,branch=0", "deepcache:interval=2,branch=2", "deepcache:interval=2,branch=-1"):
        diffcache.accelerate(pipe, tag)
        full, reused = full_then_reused(model, find_attachment(model).executor, args, kwargs)
        assert diffcache.summary(pipe).reused[1].sum() > 0, tag
        assert torch.equal(reused, full), tag
