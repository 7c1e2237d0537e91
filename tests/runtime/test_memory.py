"""Cache memory: exactly the features the plan reuses, reported in `summary`, and freed by `restore`."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import torch

import diffcache
from diffcache import Schedule
from diffcache.runtime import find_attachment
from diffcache.testing import build_pipeline
from diffcache.schedules.presets import from_tag

from ..conftest import STEPS, run


def output_bytes(pipe, name: str, modules: list[torch.nn.Module], inputs: bool = False) -> list[int]:
    """Bytes of each module's first output (or first input) in the first denoiser call of an uncached run."""
    seen: dict[int, int] = {}

    def record(i):
        def hook(_module, args, output):
            tensor = args[0] if inputs else (output[0] if isinstance(output, tuple) else output)
            seen.setdefault(i, tensor.numel() * tensor.element_size())
        return hook

    handles = [m.register_forward_hook(record(i)) for i, m in enumerate(modules)]
    try:
        run(pipe, name, steps=1)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in range(len(modules))]


def test_unet_cache_holds_one_branch_feature():
    pipe = build_pipeline("sd")
    consumer = pipe.unet.up_blocks[-1].resnets[-1]  # consumes skip 0: its hidden input is F_0
    hidden_and_skip = output_bytes(pipe, "sd", [consumer], inputs=True)[0]
    skip = pipe.unet.conv_in.out_channels / consumer.in_channels
    diffcache.accelerate(pipe, "deepcache:interval=3,branch=0")
    run(pipe, "sd")
    summary = diffcache.summary(pipe)
    expected = hidden_and_skip * (1 - skip)  # CFG batched: one tensor of batch 2
    assert summary.peak_cache_bytes == expected
    assert summary.cache_bytes == 0
    assert f"cache memory now 0.00 MiB, peak {expected / 2**20:.2f} MiB" in str(summary)


def test_transformer_cache_holds_only_the_reused_components():
    pipe = build_pipeline("dit")
    blocks = pipe.transformer.transformer_blocks
    ff = output_bytes(pipe, "dit", [b.ff for b in blocks])
    attn = output_bytes(pipe, "dit", [b.attn1 for b in blocks])
    plan = from_tag("fora:interval=2", pipe.transformer, STEPS)
    only_ff = plan.recompute.copy()
    only_ff[:, :, plan.components.index("attn1")] = True  # attention recomputes every step
    for bits, expected in ((plan.recompute, sum(ff) + sum(attn)), (only_ff, sum(ff))):
        diffcache.accelerate(pipe, Schedule(bits, plan.units, plan.components, "custom", model=plan.model))
        run(pipe, "dit")
        assert diffcache.summary(pipe).peak_cache_bytes == expected


def test_restore_frees_the_cache_mid_generation():
    pipe = diffcache.accelerate(build_pipeline("sd"), "deepcache:interval=3,branch=0")
    cond = pipe.encode_prompt("a red car", "cpu", 1, False)[0]
    x = torch.randn(1, 4, 8, 8)
    pipe.scheduler.set_timesteps(6)
    with torch.no_grad():
        t = pipe.scheduler.timesteps[0]
        pipe.unet(x, t, cond)
        pipe.scheduler.step(torch.zeros_like(x), t, x)
    executor = find_attachment(pipe.unet).executor
    held = [weakref.ref(value[0]) for store in executor.stores.values() for value in store.values.values()]
    assert held and executor.cache_bytes > 0
    diffcache.restore(pipe)
    gc.collect()
    assert executor.cache_bytes == 0
    assert all(ref() is None for ref in held)
    assert np.isfinite(run(pipe, "sd")).all()
