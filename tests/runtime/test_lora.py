"""LoRA loaded or fused before or after `accelerate`: the same outputs either way (a tiny LoRA made here)."""

from __future__ import annotations

import numpy as np
import pytest
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import diffcache
from diffcache.testing import build_pipeline

from ..conftest import psnr, run

TAGS = {"sd": "deepcache:interval=3,branch=1", "sd3": "fora:interval=2"}
DENOISER = {"sd": "unet", "sd3": "transformer"}


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory) -> dict[str, str]:
    """A saved random LoRA (attention projections, rank 4) for each pipeline, in diffusers' file format."""
    dirs = {}
    for name, denoiser in DENOISER.items():
        donor = build_pipeline(name, seed=3)
        getattr(donor, denoiser).add_adapter(
            LoraConfig(r=4, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
        )
        path = tmp_path_factory.mktemp(f"lora-{name}")
        layers = get_peft_model_state_dict(getattr(donor, denoiser))
        type(donor).save_lora_weights(str(path), **{f"{denoiser}_lora_layers": layers})
        dirs[name] = str(path)
    return dirs


@pytest.mark.parametrize("name", list(TAGS))
def test_lora_before_or_after_accelerate(name, lora_dirs):
    base = build_pipeline(name)
    plain = run(base, name)

    before = build_pipeline(name)
    before.load_lora_weights(lora_dirs[name])
    lora_full = run(before, name)
    assert psnr(lora_full, plain) < 50  # the LoRA really changes the model (bit-level checks follow)
    diffcache.accelerate(before, TAGS[name])
    cached_before = run(before, name)
    assert 15 < psnr(cached_before, lora_full) < 100

    after = diffcache.accelerate(build_pipeline(name), TAGS[name])
    run(after, name)  # caches of a generation without the LoRA must not leak into the next
    after.load_lora_weights(lora_dirs[name])
    assert np.array_equal(run(after, name), cached_before)

    diffcache.restore(after)
    assert np.array_equal(run(after, name), lora_full)


@pytest.mark.parametrize("name", list(TAGS))
def test_fuse_and_unload_after_accelerate(name, lora_dirs):
    pipe = build_pipeline(name)
    pipe.load_lora_weights(lora_dirs[name])
    diffcache.accelerate(pipe, TAGS[name])
    cached = run(pipe, name)
    pipe.fuse_lora()
    assert psnr(run(pipe, name), cached) > 60  # fusing only reorders float additions
    pipe.unfuse_lora()
    assert psnr(run(pipe, name), cached) > 60

    pipe = build_pipeline(name)
    pipe.load_lora_weights(lora_dirs[name])
    diffcache.accelerate(pipe, TAGS[name])
    run(pipe, name)
    pipe.unload_lora_weights()
    reference = diffcache.accelerate(build_pipeline(name), TAGS[name])
    assert np.array_equal(run(pipe, name), run(reference, name))
    assert diffcache.summary(pipe).hits > 0
