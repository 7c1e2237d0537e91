"""A denoiser outside any pipeline: the caller marks generations and steps with `diffcache.runtime.generation`."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from diffusers import DDIMScheduler

import diffcache
from diffcache.errors import AccelerationStateError, DiffcacheError
from diffcache.runtime import generation
from diffcache.testing import build_pipeline

from ..adapters.test_generic import PolicyNet


def policy() -> PolicyNet:
    torch.manual_seed(0)
    return PolicyNet().eval()


def run(model, steps: int = 8, cfg: bool = False, driven: bool = True) -> torch.Tensor:
    """A diffusion-policy sampling loop with its own scheduler (the model never sees it); ``driven`` marks the
    generation and its steps for diffcache."""
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), generation(model, steps) if driven else contextlib.nullcontext() as gen:
        for t in scheduler.timesteps:
            eps = model(x, t)
            if cfg:  # a second call in the same step: another CFG branch
                eps = eps + 0.5 * (eps - model(0.9 * x, t))
            x = scheduler.step(eps, t, x).prev_sample
            if driven:
                gen.step()
    return x


def test_bare_module_none_is_bit_identical_and_restore_too():
    model = policy()
    ref = run(model, driven=False)
    diffcache.accelerate(model, "none", units="blocks.*")
    assert torch.equal(run(model), ref)
    diffcache.restore(model)
    assert not hasattr(model, "_diffusers_hook")
    assert torch.equal(run(model, driven=False), ref)


def test_bare_module_runs_the_plan_and_frees_the_cache():
    model = policy()
    ref = run(model, driven=False)
    diffcache.accelerate(model, "uniform:interval=3", units="blocks.*")
    calls = [0]
    model.blocks[2].mlp[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out = run(model)
    assert calls[0] == 3  # steps 0, 3, 6 of 8
    summary = diffcache.summary(model)
    assert summary.num_steps == 8 and summary.hits == 4 * 5
    assert summary.peak_cache_bytes > 0 and summary.cache_bytes == 0
    error = ((out - ref).abs().max() / ref.abs().max()).item()
    assert 0 < error < 0.3, error
    calls[0] = 0
    assert torch.equal(run(model), out)  # a second generation starts clean
    assert calls[0] == 3


def test_bare_module_cfg_branches_and_step_counts():
    model = policy()
    diffcache.accelerate(model, "uniform:interval=2", units="blocks.*")
    split = run(model, cfg=True)
    diffcache.accelerate(model, "none", units="blocks.*")
    full = run(model, cfg=True)
    error = ((split - full).abs().max() / full.abs().max()).item()
    assert 0 < error < 0.3, error  # a branch reading the other's cache would be far off
    diffcache.accelerate(model, "uniform:interval=2", units="blocks.*")
    assert run(model, steps=5).shape == full.shape
    assert diffcache.summary(model).num_steps == 5


def test_bare_module_misuse(caplog):
    model = policy()
    with pytest.raises(DiffcacheError, match="not accelerated"):
        with generation(model, 4):
            pass
    diffcache.accelerate(model, "uniform:interval=2", units="blocks.*")
    with pytest.raises(ValueError, match="positive"):
        with generation(model, 0):
            pass
    x, t = torch.randn(2, 10, 16), torch.tensor(500)
    with caplog.at_level(logging.WARNING, logger="diffcache"), torch.no_grad():
        outside = model(x, t)
    assert "outside a generation" in caplog.text
    diffcache.restore(model)
    with torch.no_grad():
        assert torch.equal(outside, model(x, t))
    diffcache.accelerate(model, "uniform:interval=2", units="blocks.*")
    with generation(model, 2) as gen, torch.no_grad():
        model(x, t)
        gen.step()
        model(x, t)
        gen.step()
        with pytest.raises(AccelerationStateError, match="after all 2 steps"):
            gen.step()


def test_bare_unet_loop_matches_the_accelerated_pipeline():
    # The same DeepCache plan driven by a pipeline's scheduler and by the caller's steps gives the same bits.
    pipe = build_pipeline("unet2d")
    diffcache.accelerate(pipe, "deepcache:interval=3,branch=1")
    by_pipeline = pipe(batch_size=1, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                       output_type="np").images
    diffcache.restore(pipe)
    unet = diffcache.accelerate(pipe.unet, "deepcache:interval=3,branch=1")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(6)
    size = pipe.unet.config.sample_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), generation(unet, 6) as gen:
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, generator=None).prev_sample
            gen.step()
    manual = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert (manual == by_pipeline).all()
    assert diffcache.summary(unet).hits > 0
