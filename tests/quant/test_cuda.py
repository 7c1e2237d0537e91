"""The CUDA int8 path (`torch._int_mm`); skipped where no GPU is present (CI), run on a lent GPU machine."""

from __future__ import annotations

import pytest
import torch

import diffcache
from diffcache.kernels import int8_layer
from diffcache.quant import QuantCalibration, QuantConfig, calibrate
from diffcache.quant.quantizers import act_params, fake_quant_act, fake_quant_weight, weight_scales
from diffcache.testing import build_pipeline, call_kwargs

from ..conftest import psnr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("rows", [5, 600])  # under 17 rows the kernel pads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_intmm_linear_matches_the_simulation_on_cuda(rows, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).cuda()
    x = torch.randn(rows, 64, device="cuda") * 2 + 1
    w_scale = weight_scales(linear.weight, 8, "mse")
    x_scale, x_zero = act_params(x.min(), x.max())
    simulated = torch.nn.functional.linear(fake_quant_act(x, x_scale, x_zero),
                                           fake_quant_weight(linear.weight, w_scale, 8), linear.bias)
    real = int8_layer(linear.to(dtype), w_scale, backend="intmm")(x.to(dtype), x_scale, x_zero)
    assert real.dtype == dtype and real.shape == simulated.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (real.float() - simulated).abs().max() < tolerance * simulated.abs().max()


def test_quantized_dit_on_cuda_eager_and_compiled():
    pipe = build_pipeline("dit").to("cuda")
    kwargs = call_kwargs("dit", num_inference_steps=6, batch_size=2)
    quant = calibrate(pipe, [1, 2, 3, 4], "w8a8", num_inference_steps=6, guidance_scale=kwargs["guidance_scale"],
                      batch_size=4, progress=False)
    full = pipe(**call_kwargs("dit", num_inference_steps=6, batch_size=2)).images
    fake = QuantCalibration(QuantConfig(backend="fake"), quant.model, quant.layers, quant.ranges,
                            temporal=quant.temporal)
    with diffcache.accelerated(pipe, "none", quant=fake):
        simulated = pipe(**call_kwargs("dit", num_inference_steps=6, batch_size=2)).images
    diffcache.accelerate(pipe, "uniform:interval=2", quant=quant)
    eager = pipe(**call_kwargs("dit", num_inference_steps=6, batch_size=2)).images
    note = diffcache.summary(pipe).quant
    assert "int8 (torch._int_mm)" in note
    pipe.transformer.compile()
    compiled = pipe(**call_kwargs("dit", num_inference_steps=6, batch_size=2)).images
    print(note, psnr(simulated, full), psnr(eager, full), psnr(compiled, eager))
    assert 25 < psnr(simulated, full) < 100 and 25 < psnr(eager, full) < 100
    assert psnr(compiled, eager) > 40
