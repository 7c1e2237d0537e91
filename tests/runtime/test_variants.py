"""Pipeline variants users run next: img2img / inpaint (``strength``), an SDXL refiner (``denoising_start``),
ControlNet, several images per prompt, prompt lists, no CFG. Each against the same pipeline unaccelerated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

import diffcache
from diffcache import Schedule
from diffcache.errors import UnsupportedModelError
from diffcache.testing import build_pipeline, call_kwargs
from diffcache.schedules.presets import resample

from ..conftest import psnr

IMAGE = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
MASK = (torch.arange(64)[None, None, :, None] < 32).float().expand(1, 1, 64, 64)


def variant(cls, name: str = "sd", **extra):
    pipe = cls(**build_pipeline(name).components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_kwargs(name: str, steps: int, **extra) -> dict:
    kwargs = call_kwargs(name, num_inference_steps=steps)
    kwargs.pop("height"), kwargs.pop("width")
    return kwargs | {"image": IMAGE} | extra


def keys_run(pipe) -> list[int]:
    """Steps at which the last generation computed the deepest unit."""
    return np.flatnonzero(diffcache.summary(pipe).computed[:, -1]).tolist()


# ------------------------------------------------------------------------------------------ strength
def test_img2img_maps_the_schedule_to_the_steps_that_run():
    pipe = variant(StableDiffusionImg2ImgPipeline)
    full = pipe(**image_kwargs("sd", 8, strength=0.5)).images
    diffcache.accelerate(pipe, "none")
    assert np.array_equal(pipe(**image_kwargs("sd", 8, strength=0.5)).images, full)

    # A 4-step plan (key steps 0 and 3): strength 0.5 of 8 steps runs 4, so it is used as it is; the 8-step
    # resample that set_timesteps(8) asked for first would have put the second key step elsewhere.
    units = diffcache.summary(pipe).units
    bits = np.ones((4, len(units), 1), dtype=bool)
    bits[[1, 2]] = False
    plan = Schedule(bits, units, ["block"], "searched")
    assert np.flatnonzero(resample(plan, 8).recompute[:4, -1, 0]).tolist() != [0, 3]
    diffcache.accelerate(pipe, plan)
    cached = pipe(**image_kwargs("sd", 8, strength=0.5)).images
    summary = diffcache.summary(pipe)
    assert summary.num_steps == 4 and keys_run(pipe) == [0, 3]
    assert summary.cache_bytes == 0 and summary.peak_cache_bytes > 0  # freed after the last step that ran
    assert 20 < psnr(cached, full) < 100


def test_inpaint_with_strength():
    pipe = variant(StableDiffusionInpaintPipeline)
    kwargs = {"mask_image": MASK, "strength": 0.75}
    full = pipe(**image_kwargs("sd", 8, **kwargs)).images
    diffcache.accelerate(pipe, "none")
    assert np.array_equal(pipe(**image_kwargs("sd", 8, **kwargs)).images, full)
    diffcache.accelerate(pipe, "deepcache:interval=2,branch=0")
    cached = pipe(**image_kwargs("sd", 8, **kwargs)).images
    assert diffcache.summary(pipe).num_steps == 6 and keys_run(pipe) == [0, 2, 4]
    assert 20 < psnr(cached, full) < 100
    kept = MASK[0, 0].numpy() < 0.5  # the unmasked half is pasted back from the init image in both runs
    assert np.abs(cached[0][kept] - full[0][kept]).max() < 0.1


def test_sdxl_refiner_denoising_start():
    pipe = variant(StableDiffusionXLImg2ImgPipeline, "sdxl")
    kwargs = {"denoising_start": 0.5}
    full = pipe(**image_kwargs("sdxl", 8, **kwargs)).images
    diffcache.accelerate(pipe, "none")
    assert np.array_equal(pipe(**image_kwargs("sdxl", 8, **kwargs)).images, full)
    diffcache.accelerate(pipe, "deepcache:interval=2,branch=0")
    cached = pipe(**image_kwargs("sdxl", 8, **kwargs)).images
    assert diffcache.summary(pipe).num_steps == 4 and keys_run(pipe) == [0, 2]
    assert 15 < psnr(cached, full) < 100  # random weights: DeepCache branch 0 loses more than on a trained UNet


# ------------------------------------------------------------------------------------------ ControlNet
def controlnet_pipe() -> StableDiffusionControlNetPipeline:
    sd = build_pipeline("sd")
    torch.manual_seed(5)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    with torch.no_grad():  # its zero convolutions start at zero: give them weights so the control matters
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.1)
        for conv in controlnet.controlnet_cond_embedding.modules():  # and let the image through its 8 convs
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    pipe = StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_controlnet_pipeline():
    pipe = controlnet_pipe()
    control = {"image": MASK.expand(1, 3, 64, 64)}  # left half bright
    other = {"image": 1 - MASK.expand(1, 3, 64, 64)}
    full = pipe(**call_kwargs("sd", 6), **control).images
    assert psnr(pipe(**call_kwargs("sd", 6), **other).images, full) < 45  # the control is not negligible
    diffcache.accelerate(pipe, "none")
    assert np.array_equal(pipe(**call_kwargs("sd", 6), **control).images, full)
    diffcache.accelerate(pipe, "deepcache:interval=3,branch=2")
    cached = pipe(**call_kwargs("sd", 6), **control).images
    assert 30 < psnr(cached, full) < 100
    assert diffcache.summary(pipe).hits > 0
    assert psnr(pipe(**call_kwargs("sd", 6), **other).images, cached) < 45  # cached runs follow the control
    diffcache.restore(pipe)
    assert np.array_equal(pipe(**call_kwargs("sd", 6), **control).images, full)


def test_controlnet_residuals_on_a_cached_step():
    """A cached step with unchanged inputs reproduces the full step exactly (so the fresh shallow residuals were
    added where the UNet adds them), and only residuals of skips the step computes can change its output."""
    pipe = controlnet_pipe()
    branch = 4
    diffcache.accelerate(pipe, f"deepcache:interval=6,branch={branch}")
    cond = pipe.encode_prompt("a red car", "cpu", 1, False)[0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(6)
    t = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        down, mid = pipe.controlnet(x, t, cond, controlnet_cond=IMAGE, return_dict=False)

        def call(down_residuals, mid_residual):
            return pipe.unet(x, t, cond, down_block_additional_residuals=down_residuals,
                             mid_block_additional_residual=mid_residual).sample

        outputs = []
        for residuals in (  # step 0 computes everything, steps 1-3 reuse branch 4 of step 0
            (down, mid),
            (down, mid),
            (tuple(r if j <= branch else r + 1 for j, r in enumerate(down)), mid + 1),
            (tuple(r + 1 if j == branch else r for j, r in enumerate(down)), mid),
        ):
            outputs.append(call(*residuals))
            pipe.scheduler.step(torch.zeros_like(x), t, x)
        key, same, deep_changed, shallow_changed = outputs
    assert len(down) > branch + 1
    assert torch.equal(same, key)
    assert torch.equal(deep_changed, key)
    assert (shallow_changed - key).abs().max() > 1e-3


def test_t2i_adapter_residuals_are_refused_on_cached_steps():
    pipe = diffcache.accelerate(build_pipeline("sd"), "deepcache:interval=2,branch=0")
    cond = pipe.encode_prompt("a red car", "cpu", 1, False)[0]
    x = torch.randn(1, 4, 8, 8)
    adapter = [torch.zeros(1, 32, 8, 8)]
    pipe.scheduler.set_timesteps(4)
    t0, t1 = pipe.scheduler.timesteps[:2]
    with torch.no_grad():
        pipe.unet(x, t0, cond, down_intrablock_additional_residuals=list(adapter))  # full step: fine
        pipe.scheduler.step(torch.zeros_like(x), t0, x)
        with pytest.raises(UnsupportedModelError, match="T2I-Adapter"):
            pipe.unet(x, t1, cond, down_intrablock_additional_residuals=list(adapter))


# ---------------------------------------------------------------------------------- batches and CFG
@pytest.mark.parametrize("extra", [{"num_images_per_prompt": 2}, {"prompt": ["a red car", "a blue bird"]},
                                   {"guidance_scale": 1.0}])
def test_batches_and_guidance(extra):
    pipe = build_pipeline("sd")
    kwargs = call_kwargs("sd", 6)
    full = pipe(**kwargs | extra).images
    diffcache.accelerate(pipe, "none")
    assert np.array_equal(pipe(**call_kwargs("sd", 6) | extra).images, full)
    diffcache.accelerate(pipe, "deepcache:interval=3,branch=0")
    cached = pipe(**call_kwargs("sd", 6) | extra).images
    assert len(cached) == len(full)
    for image, reference in zip(cached, full):
        assert 20 < psnr(image, reference) < 100
    assert diffcache.summary(pipe).denoiser_calls == 6  # CFG batched in one call, or no CFG at all
