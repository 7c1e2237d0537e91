"""The executor against the unaccelerated pipelines: identities (bit-exact) and approximations (bounded)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import diffcache
from diffcache import Schedule
from diffcache.adapters import resolve_adapter
from diffcache.runtime import find_attachment
from diffcache.testing import PIPELINE_NAMES, build_pipeline
from diffcache.schedules.presets import from_tag, resample

from ..conftest import (STEPS, TRANSFORMER_PIPELINES, UNET_PIPELINES, WeightCalls, assert_reuse_reproduces_full,
                        first_call_inputs, first_weight_leaf, plan_leaves, psnr, run)

CACHING_TAG = {name: "deepcache:interval=3,branch=1" for name in UNET_PIPELINES} | {
    name: "fora:interval=2" for name in TRANSFORMER_PIPELINES
}


def denoiser(pipe) -> torch.nn.Module:
    return getattr(pipe, "transformer", None) or pipe.unet


def hooked_modules(pipe) -> list[str]:
    # Flux's pipeline creates an (empty) registry itself through `cache_context`: count hooks, not registries.
    modules = denoiser(pipe).named_modules()
    return [n for n, m in modules if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks]


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_none_schedule_is_bit_identical(name):
    pipe = build_pipeline(name)
    ref = run(pipe, name)
    diffcache.accelerate(pipe, "none")
    assert np.array_equal(run(pipe, name), ref)
    # An all-recompute Schedule object at the component granularity is also exact.
    if name in TRANSFORMER_PIPELINES:
        diffcache.accelerate(pipe, "uniform:interval=1,granularity=component")
        assert np.array_equal(run(pipe, name), ref)
    assert diffcache.summary(pipe).hits == 0


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_restore_is_bit_identical_and_removes_everything(name):
    pipe = build_pipeline(name)
    ref = run(pipe, name)
    diffcache.accelerate(pipe, CACHING_TAG[name])
    cached = run(pipe, name)
    assert not np.array_equal(cached, ref)
    assert hooked_modules(pipe)
    diffcache.restore(pipe)
    assert np.array_equal(run(pipe, name), ref)
    assert hooked_modules(pipe) == []
    assert not {"set_timesteps", "step"} & set(vars(pipe.scheduler))
    assert not any("forward" in vars(m) for m in denoiser(pipe).modules())
    diffcache.restore(pipe)  # idempotent


@pytest.mark.parametrize("name", ["sd", "dit", "flux"])
def test_accelerate_twice_replaces_the_plan(name):
    other = "uniform:interval=2"
    pipe = build_pipeline(name)
    diffcache.accelerate(pipe, CACHING_TAG[name])
    run(pipe, name)
    hooks_once = len(hooked_modules(pipe))
    diffcache.accelerate(pipe, other)
    replaced = run(pipe, name)
    fresh = diffcache.accelerate(build_pipeline(name), other)
    assert np.array_equal(replaced, run(fresh, name))
    assert diffcache.summary(pipe).tag == other
    # Re-applying the same plan does not stack hooks.
    diffcache.accelerate(pipe, other)
    assert len(hooked_modules(pipe)) == len(hooked_modules(fresh))
    assert hooks_once > 0


def test_two_pipes_do_not_share_state():
    tag_a, tag_b = "deepcache:interval=2,branch=0", "deepcache:interval=3,branch=2"
    a = diffcache.accelerate(build_pipeline("sd"), tag_a)
    b = diffcache.accelerate(build_pipeline("sd"), tag_b)
    alone_a = run(diffcache.accelerate(build_pipeline("sd"), tag_a), "sd")
    alone_b = run(diffcache.accelerate(build_pipeline("sd"), tag_b), "sd")
    inner = {}

    def run_a_inside_b(_pipe, i, _t, tensors):
        if i == 1:  # a whole generation of `a` in the middle of `b`'s generation
            inner["a"] = run(a, "sd")
        return tensors

    nested_b = run(b, "sd", callback_on_step_end=run_a_inside_b)
    assert np.array_equal(inner["a"], alone_a)
    assert np.array_equal(nested_b, alone_b)
    assert not np.array_equal(alone_a, alone_b)


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_no_stale_features_across_calls(name, caplog):
    tag = CACHING_TAG[name]
    pipe = diffcache.accelerate(build_pipeline(name), tag)
    first = run(pipe, name)
    assert np.array_equal(run(pipe, name), first), "second generation with the same seed differs"
    # New step count, then new batch size, each compared with a freshly accelerated pipe.
    for overrides in ({"steps": 4}, {"batch_size": 2}):
        got = run(pipe, name, **overrides)
        want = run(diffcache.accelerate(build_pipeline(name), tag), name, **overrides)
        assert np.array_equal(got, want), overrides
    if name not in ("dit", "unet2d"):  # these two generate at a fixed resolution
        size = {"flux": 48, "sd3": 48}.get(name, 48)
        got = run(pipe, name, height=size, width=size)
        want = run(diffcache.accelerate(build_pipeline(name), tag), name, height=size, width=size)
        assert got.shape[1] == size and np.array_equal(got, want)
    assert "changed within a generation" not in caplog.text


def test_searched_schedule_is_resampled_with_a_warning(caplog):
    pipe = build_pipeline("dit")
    adapter = resolve_adapter(pipe.transformer)
    bits = from_tag("fora:interval=3", adapter, 9).recompute.copy()
    searched = Schedule(bits, adapter.layout("component").units, adapter.component_names, method="ecad")
    diffcache.accelerate(pipe, searched)
    with caplog.at_level(logging.WARNING, logger="diffcache"):
        got = run(pipe, "dit", steps=STEPS)
    assert "made for 9 steps and is resampled to 6" in caplog.text
    want = run(diffcache.accelerate(build_pipeline("dit"), resample(searched, STEPS)), "dit")
    assert np.array_equal(got, want)


# ------------------------------------------------------------------------------------ what really runs
def ran_per_step(pipe, name: str, leaves: list[torch.nn.Module], steps: int) -> np.ndarray:
    """(steps, len(leaves)) bool: did each leaf's weight really compute at each denoiser call."""
    snapshots = []
    with WeightCalls(leaves) as calls:
        handle = denoiser(pipe).register_forward_hook(lambda *_: snapshots.append(list(calls.counts)))
        run(pipe, name, steps=steps)
        handle.remove()
    counts = np.diff(np.array([[0] * len(leaves)] + snapshots), axis=0)
    assert counts.shape[0] == steps and counts.max() == 1
    return counts.astype(bool)


@pytest.mark.parametrize(
    "name, tag, num_units",
    [
        ("sd", "deepcache:interval=3,branch=0", 13),  # SD1.5 layout: conv_in, 3 per block x 3, 2 in the last
        ("sd", "deepcache:interval=3,branch=-1", 13),  # the whole body: only the output head runs
        ("sd", "uniform:interval=3", 13),  # the same on a UNet
        ("sd", "deepcache:interval=3,branch=3", 13),
        ("sd", "deepcache:interval=3,branch=11", 13),  # mid block only
        ("sd", "deepcache:interval=2,mode=quadratic,branch=1", 13),
        ("sdxl", "deepcache:interval=3,branch=4", 10),  # SDXL: 3 blocks of 2 layers
        ("unet2d", "deepcache:interval=3,branch=2", 10),
    ],
)
def test_deepcache_recomputes_exactly_the_branch_asked(name, tag, num_units):
    steps = 7
    pipe = build_pipeline(name)
    adapter = resolve_adapter(pipe.unet)
    assert len(adapter.units) == num_units
    modules = dict(pipe.unet.named_modules())
    leaves = [first_weight_leaf(modules[unit]) for unit in adapter.units]
    # The decoder side of each shell: the resnet consuming skip u belongs to unit u (the mid block has none).
    consumers = {layer.consumes: first_weight_leaf(layer.module) for layer in adapter.layers
                 if layer.consumes is not None}
    ref = run(pipe, name, steps=steps)
    diffcache.accelerate(pipe, tag)
    ran = ran_per_step(pipe, name, leaves + [consumers[u] for u in range(num_units - 1)], steps=steps)
    plan = from_tag(tag, adapter, steps).recompute[:, :, 0]
    assert np.array_equal(ran[:, :num_units], plan) and np.array_equal(ran[:, num_units:], plan[:, :-1])
    unit = from_tag(tag, adapter, steps).params.get("branch", -1) + 1  # units[0] is conv_in's shell
    partial = int(np.flatnonzero(~plan.all(axis=1))[0])
    assert ran[partial, :unit].all() and not ran[partial, unit:num_units].any()
    out = run(pipe, name, steps=steps)
    quality = psnr(out, ref)
    # Random weights: the deep feature drifts between steps, so reuse costs some dB; a no-op would give inf.
    # The pixel-space random UNet2DModel amplifies any change through DDIM's sample clipping.
    floor = 5 if name == "unet2d" else 15
    assert floor < quality < 200, f"{name} {tag}: PSNR vs full {quality:.1f} dB"
    summary = diffcache.summary(pipe)
    assert summary.reused.sum() == (~plan).sum()
    assert "mid_block" in str(summary)


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_reuse_with_unchanged_inputs_is_exact(name):
    """Two steps with identical denoiser inputs: the reuse step must reproduce the full step's output.

    This isolates the cache plumbing from the approximation: a feature injected at the wrong place, a stale
    or another branch's cache, or a wrong residual all change the output."""
    pipe = build_pipeline(name)
    model = denoiser(pipe)
    args, kwargs = first_call_inputs(model, lambda: run(pipe, name, steps=1))
    tags = ["deepcache:interval=2,branch=0", "deepcache:interval=2,branch=5", "deepcache:interval=2,branch=-1"
            ] if name in UNET_PIPELINES else [
        "fora:interval=2", "uniform:interval=2"]
    assert_reuse_reproduces_full(pipe, model, args, kwargs, tags)


def test_second_order_scheduler_counts_network_calls():
    from diffusers import HeunDiscreteScheduler

    pipe = build_pipeline("sd")
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    ref = run(pipe, "sd", steps=4)
    diffcache.accelerate(pipe, "deepcache:interval=2,branch=0")
    out = run(pipe, "sd", steps=4)
    # Heun repeats timesteps: 4 steps are 7 network calls, each its own schedule step.
    summary = diffcache.summary(pipe)
    assert summary.num_steps == len(pipe.scheduler.timesteps) == 7
    assert summary.denoiser_calls == 7
    assert summary.reused[:, 1].tolist() == [0, 1, 0, 1, 0, 1, 0]  # units[1]: branch 0
    assert 15 < psnr(out, ref) < 200
    assert np.array_equal(run(pipe, "sd", steps=4), out)


@pytest.mark.parametrize("name", TRANSFORMER_PIPELINES)
@pytest.mark.parametrize("granularity", ["component", "block"])
def test_transformer_caching_runs_what_the_plan_says(name, granularity):
    pipe = build_pipeline(name)
    adapter = resolve_adapter(denoiser(pipe))
    ref = run(pipe, name)
    tag = "fora:interval=2" if granularity == "component" else "uniform:interval=3"
    plan = from_tag(tag, adapter, STEPS)
    leaves, expected = plan_leaves(adapter, plan)
    diffcache.accelerate(pipe, tag)
    assert np.array_equal(ran_per_step(pipe, name, leaves, STEPS), expected)
    quality = psnr(run(pipe, name), ref)
    assert 25 < quality < 200, f"{name} {tag}: PSNR vs full {quality:.1f} dB"


def test_units_override_caches_chosen_blocks():
    pipe = build_pipeline("dit")
    ref = run(pipe, "dit")
    diffcache.accelerate(pipe, "uniform:interval=2", units="transformer_blocks.*")
    summary_units = diffcache.summary(pipe).units
    assert summary_units == [f"transformer_blocks.{i}" for i in range(len(pipe.transformer.transformer_blocks))]
    out = run(pipe, "dit")
    assert 25 < psnr(out, ref) < 200
    # Only the first block cached: a different, closer output.
    diffcache.accelerate(pipe, "uniform:interval=2", units=["transformer_blocks.0"])
    assert diffcache.summary(pipe).units == ["transformer_blocks.0"]
    assert psnr(run(pipe, "dit"), ref) > psnr(out, ref)


# ------------------------------------------------------------------------------------------------ CFG
def manual_cfg_loop(pipe, split: bool, steps: int = 7) -> torch.Tensor:
    """A denoising loop on the SD pipeline's parts, running cond/uncond in one batch or as two calls."""
    generator = torch.Generator("cpu").manual_seed(0)
    embeds = pipe.encode_prompt("a red car", "cpu", 1, True, "")
    cond, uncond = embeds
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            if split:
                noise_c = pipe.unet(latents, t, encoder_hidden_states=cond).sample
                noise_u = pipe.unet(latents, t, encoder_hidden_states=uncond).sample
            else:
                noise_u, noise_c = pipe.unet(torch.cat([latents] * 2), t, torch.cat([uncond, cond])).sample.chunk(2)
            noise = noise_u + 5.0 * (noise_c - noise_u)
            latents = pipe.scheduler.step(noise, t, latents).prev_sample
    return latents


def test_split_cfg_calls_get_their_own_caches():
    # Batch-2 and batch-1 convolutions round differently: ~4e-5 apart after 7 uncached steps. Caching moves the
    # latents by ~1.4 and an uncond call reading the cond cache lands ~0.9 away from the batched result, so
    # 1e-3 separates right from wrong by orders of magnitude.
    pipe = build_pipeline("sd")
    full_split, full_batched = manual_cfg_loop(pipe, True), manual_cfg_loop(pipe, False)
    torch.testing.assert_close(full_split, full_batched, rtol=0, atol=1e-3)
    diffcache.accelerate(pipe, "deepcache:interval=3,branch=0")
    batched = manual_cfg_loop(pipe, False)
    split = manual_cfg_loop(pipe, True)
    assert (batched - full_batched).abs().max() > 0.1
    torch.testing.assert_close(split, batched, rtol=0, atol=1e-3)
    assert diffcache.summary(pipe).denoiser_calls == 14


def test_cache_context_names_split_cfg_caches():
    pipe = build_pipeline("flux")
    kwargs = {"true_cfg_scale": 2.0, "negative_prompt": "a blurry photo"}
    ref = run(pipe, "flux", **kwargs)
    diffcache.accelerate(pipe, "fora:interval=2")
    seen = []

    def snapshot(_pipe, i, _t, tensors):
        executor = find_attachment(pipe.transformer).executor
        seen.append({name: store.values[(0, 0)][0] for name, store in executor.stores.items()})
        return tensors

    out = run(pipe, "flux", callback_on_step_end=snapshot, **kwargs)
    assert set(seen[0]) == {"cond", "uncond"}
    assert not torch.equal(seen[0]["cond"], seen[0]["uncond"])
    assert 25 < psnr(out, ref) < 200
    assert diffcache.summary(pipe).denoiser_calls == 2 * STEPS


def test_batch_change_within_a_generation_recomputes(caplog):
    pipe = build_pipeline("sd")
    diffcache.accelerate(pipe, "deepcache:interval=3,branch=0")
    cond = pipe.encode_prompt("a red car", "cpu", 1, False)[0]
    pipe.scheduler.set_timesteps(6)
    t0, t1 = pipe.scheduler.timesteps[:2]
    with torch.no_grad():
        pipe.unet(torch.randn(1, 4, 8, 8), t0, cond)
        pipe.scheduler.step(torch.zeros(1, 4, 8, 8), t0, torch.zeros(1, 4, 8, 8))
        x = torch.randn(2, 4, 8, 8)
        with caplog.at_level(logging.WARNING, logger="diffcache"):
            got = pipe.unet(x, t1, cond.repeat(2, 1, 1)).sample
    assert "changed within a generation" in caplog.text
    diffcache.restore(pipe)
    with torch.no_grad():
        assert torch.equal(got, pipe.unet(x, t1, cond.repeat(2, 1, 1)).sample)


# ------------------------------------------------------------------------------------ API behaviour
def test_accelerated_context_restores_previous_plan():
    pipe = build_pipeline("dit")
    ref = run(pipe, "dit")
    with diffcache.accelerated(pipe, "fora:interval=2"):
        inside = run(pipe, "dit")
    assert np.array_equal(run(pipe, "dit"), ref) and not np.array_equal(inside, ref)
    diffcache.accelerate(pipe, "uniform:interval=3")
    before = run(pipe, "dit")
    with diffcache.accelerated(pipe, "fora:interval=2"):
        run(pipe, "dit")
    assert np.array_equal(run(pipe, "dit"), before)
    assert diffcache.summary(pipe).tag == "uniform:interval=3"


def test_summary_reports_hits_and_memory():
    pipe = diffcache.accelerate(build_pipeline("dit"), "fora:interval=3")
    run(pipe, "dit")
    summary = diffcache.summary(pipe)
    plan = from_tag("fora:interval=3", pipe.transformer, STEPS)
    assert summary.reused.sum() == (~plan.recompute).sum()
    assert summary.computed.sum() == plan.recompute.sum()
    assert summary.cache_usage_ratio == pytest.approx(plan.cache_usage_ratio)
    assert summary.peak_cache_bytes > 0 and summary.cache_bytes == 0  # freed after the last step
    text = str(summary)
    assert "fora:interval=3" in text and "transformer_blocks.0" in text and "CrrCrr" in text
    with pytest.raises(diffcache.DiffcacheError, match="not accelerated"):
        diffcache.summary(build_pipeline("dit"))


def test_replaced_scheduler_is_reported():
    pipe = diffcache.accelerate(build_pipeline("dit"), "fora:interval=2")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    with pytest.raises(diffcache.AccelerationStateError, match="accelerate\\(pipe, schedule\\) again"):
        run(pipe, "dit")
