"""Quantization in simulation: quantizer math, per-step activation ranges, quant + cache, save/load, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffcache
from diffcache.errors import AccelerationStateError, QuantError
from diffcache.kernels import OneDNNLinear, onednn_available
from diffcache.models import GUIDANCE_SCALE, load_pipeline
from diffcache.quant import QuantCalibration, QuantConfig, calibrate
from diffcache.quant.quantizers import act_params, fake_quant_act, fake_quant_weight, weight_scales
from diffcache.testing import build_pipeline

from ..conftest import psnr, run

LABELS = list(range(10))
CALIBRATION = [i % 10 for i in range(40)]  # per-step ranges need enough samples per step to cover unseen inputs
STEPS = 10


def test_weight_quantizer_round_trips_within_half_a_step():
    weight = torch.randn(16, 32) * torch.linspace(0.1, 3, 16)[:, None]
    for bits in (8, 4):
        scale = weight_scales(weight, bits, "minmax")
        error = (fake_quant_weight(weight, scale, bits) - weight).abs()
        assert (error <= scale[:, None] / 2 + 1e-6).all()
        mse = weight_scales(weight, bits, "mse")
        assert (mse <= scale + 1e-9).all()  # clipping only ever shrinks the range
        mse_error = (fake_quant_weight(weight, mse, bits) - weight).pow(2).sum(1)
        assert (mse_error <= error.pow(2).sum(1) + 1e-9).all()


def test_activation_quantizer_round_trips_within_half_a_step():
    x = torch.rand(1000) * 5 - 1
    scale, zero = act_params(torch.tensor(-1.0), torch.tensor(4.0))
    error = (fake_quant_act(x, scale, zero) - x).abs()
    assert (error <= scale / 2 + 1e-6).all()
    assert fake_quant_act(torch.zeros(3), scale, zero).eq(0).all()  # zero is exact
    clipped = fake_quant_act(torch.tensor([10.0, -10.0]), scale, zero)
    assert clipped[0] == pytest.approx(4.0, abs=scale.item()) and clipped[1] == pytest.approx(-1.0, abs=scale.item())


@pytest.fixture(scope="module")
def dit():
    pipe = load_pipeline("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, labels=LABELS, steps=STEPS) -> np.ndarray:
    return pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, output_type="np",
                generator=torch.Generator().manual_seed(1000)).images


@pytest.fixture(scope="module")
def calibrations(dit):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    shared = calibrate(dit, CALIBRATION, QuantConfig(per_step=False), num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE_SCALE, batch_size=20, progress=False)
    per_step = calibrate(dit, CALIBRATION, "w8a8", num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE,
                         batch_size=20, progress=False)
    torch.set_num_threads(previous)
    return shared, per_step


def test_per_step_ranges_differ_and_beat_one_shared_range(dit, calibrations):
    shared, per_step = calibrations
    widths = per_step.ranges[:, :, 1] - per_step.ranges[:, :, 0]
    assert (widths.max(1) > 1.5 * widths.min(1)).mean() > 0.3  # many layers see much wider inputs at some steps
    full = generate(dit)
    quality = {}
    for name, calibration in (("shared", shared), ("per-step", per_step)):
        with diffcache.accelerated(dit, "none", quant=calibration):
            quality[name] = psnr(generate(dit), full)
    assert 20 < quality["shared"] < quality["per-step"] < 80, quality


def test_quant_with_cache_stays_close_and_save_load_is_exact(dit, calibrations, tmp_path):
    _, per_step = calibrations
    full = generate(dit)
    with diffcache.accelerated(dit, "uniform:interval=2", quant=per_step):
        both = generate(dit)
        summary = diffcache.summary(dit)
    assert summary.hits > 0
    assert 20 < psnr(both, full) < 60
    per_step.save(tmp_path / "w8a8.npz")
    loaded = QuantCalibration.load(tmp_path / "w8a8.npz")
    assert np.array_equal(loaded.ranges, per_step.ranges) and loaded.config == per_step.config
    with diffcache.accelerated(dit, "uniform:interval=2", quant=str(tmp_path / "w8a8.npz")):
        assert np.array_equal(generate(dit), both)
    assert np.array_equal(generate(dit), full)  # leaving the block restores the float model bit for bit


def test_weight_only_preset_needs_no_calibration():
    pipe = build_pipeline("dit")
    full = run(pipe, "dit")
    diffcache.accelerate(pipe, "none", quant="w8")
    out = run(pipe, "dit")
    assert 30 < psnr(out, full) < 100
    diffcache.restore(pipe)
    assert np.array_equal(run(pipe, "dit"), full)


def test_bad_quant_input(dit, calibrations, tmp_path):
    _, per_step = calibrations
    with pytest.raises(QuantError, match="weight_bits must be one of"):
        QuantConfig(weight_bits=3)
    with pytest.raises(QuantError, match="unknown quantization preset"):
        QuantConfig.parse("w2a2")
    with pytest.raises(QuantError, match="needs their ranges"):
        diffcache.accelerate(build_pipeline("dit"), "none", quant="w8a8")
    with pytest.raises(QuantError, match="made for DiTTransformer2DModel"):
        diffcache.accelerate(build_pipeline("dit"), "none", quant=per_step)
    (tmp_path / "bad.npz").write_text("not a calibration")
    with pytest.raises(QuantError, match="not a readable"):
        diffcache.accelerate(dit, "none", quant=str(tmp_path / "bad.npz"))
    with pytest.raises(QuantError, match="no quantization calibration"):
        diffcache.accelerate(dit, "none", quant=str(tmp_path / "missing.npz"))
    with diffcache.accelerated(dit, "none", quant=per_step):
        with pytest.raises(AccelerationStateError, match="calibrated for 10 steps"):
            generate(dit, steps=12)


def test_temporal_lookup_serves_full_precision_time_features(dit, calibrations):
    _, per_step = calibrations
    name = next(iter(per_step.temporal))
    module = dict(dit.transformer.named_modules())[name]
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    try:
        generate(dit, labels=[3])
        with diffcache.accelerated(dit, "none", quant=per_step):
            generate(dit, labels=[3])
        without = QuantCalibration(QuantConfig(temporal_lookup=False), per_step.model, per_step.layers,
                                   per_step.ranges)
        with diffcache.accelerated(dit, "none", quant=without):
            generate(dit, labels=[3])
    finally:
        handle.remove()
    calls = len(seen) // 3  # (DiT also calls block 0's embedder for its output layer)
    full, looked_up, quantized = seen[:calls], seen[calls : 2 * calls], seen[2 * calls :]
    # Recorded in full precision (at another batch size: BLAS may round the last bit differently) vs quantized:
    assert max((a - b).abs().max().item() for a, b in zip(full, looked_up)) < 1e-5
    assert min((a - b).abs().max().item() for a, b in zip(full, quantized)) > 1e-3
    assert len(per_step.temporal) == len(dit.transformer.transformer_blocks)
    assert per_step.temporal[name][0].shape[0] == STEPS  # one row per distinct timestep


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN int8 linear")
def test_onednn_int8_linear_matches_the_simulation():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64) * 2
    w_scale = weight_scales(linear.weight, 8, "mse")
    x_scale, x_zero = act_params(x.min(), x.max())
    kernel = OneDNNLinear(linear.weight, w_scale, linear.bias)
    simulated = torch.nn.functional.linear(fake_quant_act(x, x_scale, x_zero),
                                           fake_quant_weight(linear.weight, w_scale, 8), linear.bias)
    real = kernel(x, x_scale, x_zero)
    assert real.shape == simulated.shape
    assert (real - simulated).abs().max() < 1e-5 * simulated.abs().max()  # same integers, float rounding only
    assert kernel.nbytes < linear.weight.numel() * 4 / 3  # int8 weights plus per-channel scales


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN int8 linear")
def test_real_int8_and_simulation_agree_end_to_end(dit, calibrations):
    _, per_step = calibrations
    outputs = {}
    for backend in ("fake", "onednn"):
        calibration = QuantCalibration(QuantConfig(backend=backend), per_step.model, per_step.layers,
                                       per_step.ranges, temporal=per_step.temporal)
        with diffcache.accelerated(dit, "uniform:interval=2", quant=calibration):
            outputs[backend] = generate(dit)
            note = diffcache.summary(dit).quant
        assert ("0 layers int8" in note) == (backend == "fake") and "simulated" in note
    # Layer by layer they agree to float rounding; over 10 steps a rounding flip at a .5 boundary now and then moves
    # the images about as much as quantization itself, so the two are equally close to the float model.
    full = generate(dit)
    assert psnr(outputs["onednn"], outputs["fake"]) > 38
    assert abs(psnr(outputs["onednn"], full) - psnr(outputs["fake"], full)) < 1.5


def test_search_for_the_quantized_model(dit, calibrations, tmp_path):
    _, per_step = calibrations
    found = {}
    for name, quant in (("float", None), ("w8a8", per_step)):
        found[name] = diffcache.search(dit, LABELS[:4], "ecad", "recompute:0.6", num_inference_steps=STEPS,
                                       guidance_scale=GUIDANCE_SCALE, batch_size=4, quant=quant, progress=False,
                                       out_dir=tmp_path / name, generations=1, population=8, key_steps=1)
        assert found[name].recompute_fraction <= 0.6 + 1e-9
    # The quantized search saw other features and other images: its own calibration, its own ECAD front.
    float_cal, quant_cal = (next((tmp_path / n / "calibration").glob("*.npz")) for n in ("float", "w8a8"))
    assert float_cal.name != quant_cal.name
    assert found["w8a8"].meta["quality"] < found["float"].meta["quality"]
    with pytest.raises(diffcache.SearchError, match="dp, bac or ecad"):
        diffcache.search(dit, LABELS[:2], "router", "2x", num_inference_steps=STEPS, quant=per_step, progress=False)


def test_a_bad_quantization_keeps_the_previous_plan():
    pipe = diffcache.accelerate(build_pipeline("dit"), "fora:interval=2")
    before = run(pipe, "dit")
    with pytest.raises(QuantError, match="needs their ranges"):
        diffcache.accelerate(pipe, "uniform:interval=3", quant="w8a8")
    assert diffcache.summary(pipe).tag == "fora:interval=2"
    assert np.array_equal(run(pipe, "dit"), before)
