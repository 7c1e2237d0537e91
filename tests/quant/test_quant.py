"""Quantization in simulation: quantizer math, per-step activation ranges, quant + cache, save/load, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import diffcache
from diffcache.errors import AccelerationStateError, QuantError
from diffcache.kernels import int8_layer, onednn_available
from diffcache.models import GUIDANCE_SCALE, load_pipeline
from diffcache.quant import QuantCalibration, QuantConfig, calibrate
from diffcache.quant.hooks import QuantLayerHook
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


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN int8 kernels")
@pytest.mark.parametrize("layer", ["linear", "conv", "strided grouped conv", "linear intmm"])
def test_int8_kernels_match_the_simulation(layer):
    torch.manual_seed(0)
    backend = "intmm" if layer.endswith("intmm") else "onednn"
    if layer.startswith("linear"):
        module, x = torch.nn.Linear(64, 48), torch.randn(3, 5, 64) * 2 + 1
    else:
        stride, groups = (1, 1) if layer == "conv" else (2, 4)
        module, x = torch.nn.Conv2d(16, 24, 3, stride=stride, padding=1, groups=groups), torch.randn(2, 16, 9, 9) + 1
    w_scale = weight_scales(module.weight, 8, "mse")
    kernel = int8_layer(module, w_scale, backend=backend)
    # bf16 models get bf16 out of the same integers (int8 GEMMs, bf16 everywhere else)
    low_precision = int8_layer(copy.deepcopy(module).to(torch.bfloat16), w_scale, backend=backend)
    # Two activation ranges with one prepacked kernel: the range is a run-time input (one per step).
    for low, high in ((x.min(), x.max()), (x.min() / 2, x.max() * 3)):
        x_scale, x_zero = act_params(low, high)
        simulated = QuantLayerHook(None, fake_quant_weight(module.weight, w_scale, 8), None, None, layer).new_forward(
            module, fake_quant_act(x, x_scale, x_zero))
        real = kernel(x, x_scale, x_zero)
        assert real.shape == simulated.shape and real.dtype == torch.float32
        assert (real - simulated).abs().max() < 1e-5 * simulated.abs().max()  # same integers, float rounding only
        out = low_precision(x.to(torch.bfloat16), x_scale, x_zero)
        assert out.dtype == torch.bfloat16
        assert (out.float() - simulated).abs().max() < 0.02 * simulated.abs().max()
    assert kernel.nbytes < module.weight.numel() * 4 / 3  # int8 weights plus per-channel scales


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


def test_bf16_model_runs_int8_with_its_float32_calibration(dit, calibrations):
    """int8 GEMMs and convolutions with bf16 everywhere else: the calibration made on the float32 pipeline
    serves the bf16 copy, every layer runs a kernel, and the timestep MLPs still come from the table."""
    _, per_step = calibrations
    low = copy.deepcopy(dit).to(torch.bfloat16)
    name = next(iter(per_step.temporal))
    mlp_calls = []
    inner = dict(low.transformer.named_modules())[name].linear_1
    handle = inner.register_forward_hook(lambda *_: mlp_calls.append(1))
    with diffcache.accelerated(dit, "none", quant=per_step):
        float32 = generate(dit)
    with diffcache.accelerated(low, "uniform:interval=2", quant=per_step):
        cached = generate(low)
    try:
        with diffcache.accelerated(low, "none", quant=per_step):
            bf16 = generate(low)
            note = diffcache.summary(low).quant
    finally:
        handle.remove()
    assert bf16.dtype == np.float32 and f"{len(per_step.layers)} layers int8" in note and "0 simulated" in note
    assert not mlp_calls  # served from the table (its rows rounded to bf16 as the model rounds its inputs)
    assert 30 < psnr(bf16, float32) < 100  # bf16 rounding on top of the same integers
    assert 20 < psnr(cached, bf16) < 100


def test_search_for_the_quantized_model(dit, calibrations, tmp_path):
    _, per_step = calibrations
    found = {}
    for name, quant in (("float", None), ("w8a8", per_step)):
        found[name] = diffcache.search(dit, LABELS[:4], "ecad", "recompute:0.6", num_inference_steps=STEPS,
                                       guidance_scale=GUIDANCE_SCALE, batch_size=4, quant=quant, progress=False,
                                       out_dir=tmp_path / name, generations=1, population=8, key_steps=1,
                                       presets=False)
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


def test_quantized_layers_survive_a_nested_accelerated_block(dit, calibrations):
    """`accelerated` (and searches, calibrations) suspend the plan and put it back: the quantized layers too."""
    _, per_step = calibrations
    full = generate(dit)
    with diffcache.accelerated(dit, "none", quant=per_step):
        quantized = generate(dit)
        with diffcache.accelerated(dit, "uniform:interval=2"):
            assert diffcache.summary(dit).quant is None
            generate(dit)
        assert np.array_equal(generate(dit), quantized)
        assert "int8" in diffcache.summary(dit).quant
    assert np.array_equal(generate(dit), full)


def test_released_float_weights_shrink_the_model_and_forbid_restore(dit, calibrations):
    _, per_step = calibrations
    pipe = copy.deepcopy(dit)
    with diffcache.accelerated(dit, "uniform:interval=2", quant=per_step):
        kept = generate(dit)

    def weight_bytes():
        tensors = [p for p in pipe.transformer.parameters()]
        for module in pipe.transformer.modules():  # int8 kernels hang off the quantized layers' hooks
            hook = getattr(module, "_diffusers_hook", None)
            kernel = getattr(hook.get_hook("diffcache.quant"), "kernel", None) if hook is not None else None
            tensors += [] if kernel is None else [kernel.packed, kernel.scale]
        return sum(t.numel() * t.element_size() for t in tensors)

    float_bytes = weight_bytes()
    diffcache.accelerate(pipe, "uniform:interval=2", quant=per_step, keep_float_weights=False)
    assert np.array_equal(generate(pipe), kept)  # the float weights were not used
    quantized = sum(dit.transformer.get_submodule(name).weight.numel() for name in per_step.layers)
    assert weight_bytes() < float_bytes - 2.5 * quantized  # 4 bytes per weight -> 1 (+ oneDNN's packing)
    assert "MiB freed" in diffcache.summary(pipe).quant
    for undo in (diffcache.restore, lambda p: diffcache.accelerate(p, "none")):
        with pytest.raises(AccelerationStateError, match="released"):
            undo(pipe)
        assert np.array_equal(generate(pipe), kept)  # the refusal changed nothing


def test_time_reconstruction_learns_the_rounding_of_the_temporal_layers(dit, tmp_path):
    """TFMQ-DM's TIAR with AdaRound at W4A8 on the trained digits DiT: every temporal layer (the timestep MLP and
    each block's adaptive-norm linear) reconstructs its calibration rows better than rounding to nearest, and the
    images get closer to the float model (measured: 26.4 -> 29.0 dB)."""
    from diffcache.quant.reconstruction import temporal_layers

    settings = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE, batch_size=20, progress=False)
    nearest = calibrate(dit, CALIBRATION, QuantConfig(4, 8, time_reconstruction=0), **settings)
    learned = calibrate(dit, CALIBRATION, QuantConfig(4, 8), **settings)
    names = [name for name, _ in temporal_layers(dit.transformer, learned.config)]
    assert not nearest.rounding and sorted(learned.rounding) == sorted(names) and len(names) > 8
    assert any("norm1.linear" in name for name in names) and any("linear_1" in name for name in names)
    full = generate(dit)
    quality = {}
    for label, calibration in (("nearest", nearest), ("learned", learned)):
        with diffcache.accelerated(dit, "none", quant=calibration):
            quality[label] = psnr(generate(dit), full)
    assert quality["learned"] > quality["nearest"] + 1, quality
    learned.save(tmp_path / "w4a8.npz")
    loaded = QuantCalibration.load(tmp_path / "w4a8.npz")
    assert all(np.array_equal(loaded.rounding[name], up) for name, up in learned.rounding.items())
    assert loaded.key == learned.key != nearest.key
    with diffcache.accelerated(dit, "none", quant=loaded):
        assert psnr(generate(dit), full) == quality["learned"]


def test_one_call_quantization_equals_the_two_call_form(dit):
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE_SCALE}
    two = calibrate(dit, LABELS[:4], "w8a8", schedule="uniform:interval=2", progress=False, **kwargs)
    with diffcache.accelerated(dit, "uniform:interval=2", quant=two):
        expected = generate(dit)
    with diffcache.accelerated(dit, "uniform:interval=2", quant="w8a8", calibration=LABELS[:4], **kwargs):
        one = generate(dit)
    assert np.array_equal(one, expected)
    with pytest.raises(QuantError, match="pass quant= too"):
        diffcache.accelerate(dit, "uniform:interval=2", calibration=LABELS[:4])
    with pytest.raises(QuantError, match="already a calibration"):
        diffcache.accelerate(dit, "uniform:interval=2", quant=two, calibration=LABELS[:4])
    assert diffcache.api.find_attachment(dit.transformer) is None  # refused before anything changed
