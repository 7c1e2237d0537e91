"""CacheQuant's cache-error correction of reused UNet branch features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffcache
from diffcache.errors import QuantError, UnsupportedModelError
from diffcache.quant import CacheCorrection, fit_cache_correction
from diffcache.quant.correction import ChannelFit
from diffcache.testing import build_pipeline

from ..conftest import STEPS, psnr, run

TAG = "deepcache:interval=3,branch=1"


def test_channel_fit_is_least_squares():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=generator)
    y = x * torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([1.0, 0.0, -3.0]).view(1, 3, 1, 1)
    fit = ChannelFit()
    fit.add(x[:2], y[:2])
    fit.add(x[2:], y[2:])  # running sums over batches give the pooled solution
    alpha, beta = fit.solve()
    np.testing.assert_allclose(alpha, [2.0, -1.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(beta, [1.0, 0.0, -3.0], atol=1e-6)
    noisy = y + 0.3 * torch.randn(y.shape, generator=generator)
    fit = ChannelFit()
    fit.add(x, noisy)
    alpha, beta = (torch.tensor(v).view(1, 3, 1, 1) for v in fit.solve())
    fitted = ((x * alpha + beta - noisy) ** 2).mean((0, 2, 3))
    for scale in (0.9, 1.1):  # perturbing the solution only makes the residual worse
        assert (((x * alpha * scale + beta - noisy) ** 2).mean((0, 2, 3)) > fitted).all()


@pytest.mark.parametrize("tag", [TAG, "deepcache:interval=3,branch=-1"])  # a skip branch; the body's output
def test_correction_runs_saves_and_checks(tmp_path, tag):
    pipe = build_pipeline("sd")
    prompts = ["a red car", "a blue bird"]
    correction = fit_cache_correction(pipe, prompts, tag, num_inference_steps=STEPS, guidance_scale=5.0,
                                      batch_size=2, progress=False)
    reused = [k for k in range(STEPS) if k % 3]
    assert [k for k, a in enumerate(correction.alpha) if a is not None] == reused
    assert all(not np.allclose(correction.alpha[k], 1) for k in reused)
    full = run(pipe, "sd")
    with diffcache.accelerated(pipe, tag):
        plain = run(pipe, "sd")
    with diffcache.accelerated(pipe, tag, correction=correction):
        fixed = run(pipe, "sd")
    assert not np.array_equal(fixed, plain)
    assert 20 < psnr(fixed, full) < 100
    correction.save(tmp_path / "fix.npz")
    with diffcache.accelerated(pipe, tag, correction=str(tmp_path / "fix.npz")):
        assert np.array_equal(run(pipe, "sd"), fixed)
    with pytest.raises(QuantError, match="another schedule or step count"):
        diffcache.accelerate(pipe, "deepcache:interval=2,branch=1", correction=correction)
    with pytest.raises(QuantError, match="forecast=1"):
        diffcache.accelerate(pipe, tag + ",forecast=1", correction=correction)
    with diffcache.accelerated(pipe, tag, correction=correction):
        with pytest.raises(QuantError, match="another schedule or step count"):
            run(pipe, "sd", steps=STEPS + 2)
    with pytest.raises(QuantError, match="not a readable"):
        CacheCorrection.load(tmp_path / "missing.npz")
    with pytest.raises(UnsupportedModelError, match="not a UNet"):
        fit_cache_correction(build_pipeline("dit"), [1], "uniform:interval=2", num_inference_steps=4,
                             progress=False)


def test_quantization_error_correction_of_the_layers_reading_the_cache(tmp_path):
    """CacheQuant's second half on the trained digits UNet, W8A8 with DeepCache 1-in-3: the convolutions reading the
    reused feature get per-step, per-channel output maps, fitted on calibration labels, that bring their outputs
    closer to the float layer's on held-out labels."""
    from diffcache.models import GUIDANCE_SCALE, load_pipeline
    from diffcache.quant import calibrate

    pipe = load_pipeline("digits-unet")
    pipe.set_progress_bar_config(disable=True)
    tag, steps, labels = "deepcache:interval=3", 10, list(range(10)) * 2
    settings = dict(num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, batch_size=20, progress=False)
    quant = calibrate(pipe, labels, "w8a8", schedule=tag, **settings)
    cache_only = fit_cache_correction(pipe, labels, tag, **settings)
    both = fit_cache_correction(pipe, labels, tag, quant=quant, **settings)
    assert sorted(both.layers) == ["up_blocks.1.resnets.2.conv1", "up_blocks.1.resnets.2.conv_shortcut"]
    alpha, beta = both.layers["up_blocks.1.resnets.2.conv1"]
    assert alpha.shape == beta.shape == (steps, 32) and 0.9 < alpha.mean() < 1.1 and np.abs(alpha - 1).max() > 1e-3
    conv = pipe.unet.get_submodule("up_blocks.1.resnets.2.conv1")

    def generate():
        return pipe(class_labels=[3, 7, 1, 9, 0, 5, 2, 8] * 2, num_inference_steps=steps, output_type="np",
                    guidance_scale=GUIDANCE_SCALE, generator=torch.Generator().manual_seed(1000)).images

    def layer_error(correction) -> float:
        """Squared error of the quantized conv1 against the float conv1 on the same inputs, over a generation."""
        errors = []

        def measure(module, args, output):
            errors.append((output - module._conv_forward(args[0], module.weight, module.bias)).pow(2).mean().item())

        handle = conv.register_forward_hook(measure)
        try:
            with diffcache.accelerated(pipe, tag, quant=quant, correction=correction):
                images = generate()
        finally:
            handle.remove()
        return float(np.mean(errors)), images

    (plain, _), (fixed, images) = layer_error(cache_only), layer_error(both)
    assert fixed < 0.95 * plain, (fixed, plain)
    both.save(tmp_path / "both.npz")
    with diffcache.accelerated(pipe, tag, quant=quant, correction=str(tmp_path / "both.npz")):
        assert np.array_equal(generate(), images)
    full = generate()
    with pytest.raises(QuantError, match="fitted for a quantized model"):
        diffcache.accelerate(pipe, tag, correction=both)
    other = calibrate(pipe, labels[:10], "w8a8", schedule=tag, **settings)
    with pytest.raises(QuantError, match="another quantization calibration"):
        diffcache.accelerate(pipe, tag, quant=other, correction=both)
    assert np.array_equal(generate(), full)  # the refused calls left the pipeline as it was
