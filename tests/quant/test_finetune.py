"""EfficientDM fine-tuning: merged weights on the grid, per-step activation quantizers, save/load, resume, held-out
loss, bad input; and the packed 4-bit kernels end to end."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffcache
from diffcache.errors import AccelerationStateError, QuantError
from diffcache.models import GUIDANCE_SCALE, load_pipeline
from diffcache.quant import QuantCalibration, QuantConfig, calibrate, distillation_loss, finetune
from diffcache.quant import efficientdm
from diffcache.quant import hooks as hooks_module
from diffcache.quant.efficientdm import _QALoRA, _Switch
from diffcache.quant.hooks import QuantLayerHook, layer_hook

STEPS = 4
TRAIN = [0, 1, 2, 3, 4]
HELD_OUT = [5, 6, 7, 8, 9]
LR = 1
EPOCHS = 10
W4A8 = QuantConfig(4, 8, edge_bits=8, time_reconstruction=0)  # (no TIAR: seconds, not a minute)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # module fixtures are made before conftest's per-test single thread: the same thread count for both, or
    # float sums (and a training's trajectory) differ between the fixture's run and a test's
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def unet():
    pipe = load_pipeline("digits-unet")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ptq(unet):
    return calibrate(unet, list(range(10)), W4A8, num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE,
                     batch_size=10, progress=False)


@pytest.fixture(scope="module")
def tuned(unet, ptq):
    return finetune(unet, TRAIN, ptq, epochs=EPOCHS, guidance_scale=GUIDANCE_SCALE, lr_scale=LR, progress=False)


def generate(pipe, labels=HELD_OUT) -> np.ndarray:
    return pipe(class_labels=labels, num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE, output_type="np",
                generator=torch.Generator().manual_seed(1000)).images


def test_merged_qalora_weights_are_exactly_the_trained_fake_quantized_ones():
    torch.manual_seed(0)
    for module in (torch.nn.Linear(24, 16), torch.nn.Conv2d(6, 8, 3, padding=1)):
        scale = module.weight.detach().flatten(1).abs().amax(1) / 7
        codes = torch.clamp(torch.round(module.weight.detach() / scale.view(-1, *[1] * (module.weight.dim() - 1))),
                            -8, 7)
        hook = _QALoRA(module, codes, scale, 4, 32, None, None, _Switch(), "layer")
        with torch.no_grad():
            hook.lora_b.normal_(0, 0.3)  # a trained update, large enough to move many weights across a rounding
            hook.scale.mul_(1.1)
        trained = hook.fake_weight().detach()
        merged, scales, _ = hook.merged()
        assert merged.dtype == np.int8 and merged.min() >= -8 and merged.max() <= 7
        assert (merged != codes.numpy()).mean() > 0.2
        grid = torch.from_numpy(merged).float() * torch.from_numpy(scales).view(-1, *[1] * (merged.ndim - 1))
        assert torch.equal(grid, trained)
        # what the kernels run: the same integers
        calibration = QuantCalibration(QuantConfig(4, None, temporal_lookup=False), {}, ["layer"],
                                       np.zeros((1, 1, 2), np.float32), scales={"layer": scales},
                                       codes={"layer": merged})
        deployed, _ = layer_hook(module, "layer", 0, 1, calibration, None)
        assert torch.equal(deployed.weight, trained)


def test_finetuned_integers_are_low_bit_and_moved_and_step_quantizers_learned(unet, ptq, tuned):
    assert tuned.method == "efficientdm" and tuned.training["epochs_done"] == EPOCHS
    bits = tuned.layer_bits()
    assert bits[0] == (8, 8) and bits[-1] == (8, 8) and bits[1] == (4, 8)
    # a LoRA update must reach half a step to move an integer: 12 updates do that at a large learning rate
    fast = finetune(unet, TRAIN, ptq, epochs=1, guidance_scale=GUIDANCE_SCALE, lr_scale=3000, progress=False)
    modules = dict(unet.unet.named_modules())
    moved = 0
    for index, name in enumerate(fast.layers):
        if name not in fast.codes:
            continue
        codes, (w_bits, _) = fast.codes[name], bits[index]
        assert codes.dtype == np.int8
        assert codes.min() >= -(2 ** (w_bits - 1)) and codes.max() <= 2 ** (w_bits - 1) - 1
        scale = torch.as_tensor(ptq.scales[name]).view(-1, *[1] * (codes.ndim - 1))
        start = torch.clamp(torch.round(modules[name].weight.detach() / scale), -(2 ** (w_bits - 1)),
                            2 ** (w_bits - 1) - 1)
        moved += int((torch.from_numpy(codes).float() != start).sum())
    assert moved > 100  # training changed integers, not only scales
    # TALSQ: each layer's step sizes differ between steps and moved away from the calibrated ones
    assert tuned.act.shape == (len(tuned.layers), STEPS, 2)
    assert (np.ptp(tuned.act[:, :, 0], axis=1) > 0).mean() > 0.9
    assert not np.allclose(tuned.act[:, :, 0], ptq_act(ptq)[:, :, 0])
    assert (tuned.act[:, :, 1] == np.round(tuned.act[:, :, 1])).all()


def ptq_act(calibration: QuantCalibration) -> np.ndarray:
    from diffcache.quant.quantizers import act_params

    ranges = torch.as_tensor(calibration.ranges)
    scale, zero = act_params(ranges[..., 0], ranges[..., 1], 8)
    return torch.stack([scale, zero], dim=-1).numpy()


def test_step_quantizers_are_used_at_their_step(unet, tuned, monkeypatch):
    simulated = replace(tuned, config=replace(tuned.config, backend="fake"))
    calling, seen = [], []
    real_forward, real_act = QuantLayerHook.new_forward, hooks_module.fake_quant_act

    def forward(self, module, *args, **kwargs):
        calling.append((self.name, self.clock.step))
        return real_forward(self, module, *args, **kwargs)

    def act(x, scale, zero, bits=8):
        seen.append((calling[-1], scale.item(), zero.item()))
        return real_act(x, scale, zero, bits)

    monkeypatch.setattr(QuantLayerHook, "new_forward", forward)
    monkeypatch.setattr(hooks_module, "fake_quant_act", act)
    with diffcache.accelerated(unet, "none", quant=simulated):
        generate(unet, [5])
    index = {name: i for i, name in enumerate(tuned.layers)}
    assert len(seen) > STEPS * (len(tuned.layers) - 2) - 1  # every layer but the table-served MLP, every step
    assert {step for (_, step), _, _ in seen} == set(range(STEPS))
    for (name, step), scale, zero in seen:
        assert scale == pytest.approx(tuned.act[index[name], step, 0], rel=1e-6)
        assert zero == tuned.act[index[name], step, 1]


def test_finetuned_calibration_saves_and_loads_bit_for_bit(unet, tuned, tmp_path):
    tuned.save(tmp_path / "ft.npz")
    loaded = QuantCalibration.load(tmp_path / "ft.npz")
    assert loaded.key == tuned.key and loaded.method == "efficientdm"
    assert all(np.array_equal(loaded.codes[n], tuned.codes[n]) for n in tuned.codes)
    with diffcache.accelerated(unet, "none", quant=tuned):
        direct = generate(unet)
        note = diffcache.summary(unet).quant
    with diffcache.accelerated(unet, "none", quant=tmp_path / "ft.npz"):
        reloaded = generate(unet)
    assert np.array_equal(direct, reloaded)
    assert "efficientdm" in note and "packed int4" in note
    # A file from before the packing moved to kernels.int4 (no layout mark) is refused, not misread.
    with np.load(tmp_path / "ft.npz") as data:
        arrays = dict(data)
    header = json.loads(str(arrays["header"]))
    del header["int4_layout"]
    np.savez(tmp_path / "old.npz", **(arrays | {"header": np.array(json.dumps(header))}))
    with pytest.raises(QuantError, match="older packing"):
        QuantCalibration.load(tmp_path / "old.npz")


def test_finetuning_lowers_the_distillation_loss_on_held_out_labels(unet, ptq, tuned):
    before = distillation_loss(unet, ptq, HELD_OUT, seed=2000, guidance_scale=GUIDANCE_SCALE)
    after = distillation_loss(unet, tuned, HELD_OUT, seed=2000, guidance_scale=GUIDANCE_SCALE)
    assert before.shape == after.shape == (1, STEPS)
    assert (after < before).all() and after.mean() < 0.96 * before.mean()  # 40 updates: -6% measured


def test_resume_reproduces_the_uninterrupted_run(unet, ptq, tuned, tmp_path, monkeypatch):
    path = tmp_path / "ft.ckpt.npz"
    real = efficientdm._epoch_kwargs

    def interrupted(pipe, conditions, settings, epoch, steps):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(pipe, conditions, settings, epoch, steps)

    weights = {n: (p.detach().clone(), p.requires_grad) for n, p in unet.unet.named_parameters()}
    hooked = [hasattr(m, "_diffusers_hook") for m in unet.unet.modules()]
    monkeypatch.setattr(efficientdm, "_epoch_kwargs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(unet, TRAIN, ptq, epochs=EPOCHS, guidance_scale=GUIDANCE_SCALE, lr_scale=LR, checkpoint=path,
                 progress=False)
    monkeypatch.setattr(efficientdm, "_epoch_kwargs", real)
    # the interrupted run left the model as it was: weights, gradient flags, no hooks
    assert all(torch.equal(p, weights[n][0]) and p.requires_grad == weights[n][1]
               for n, p in unet.unet.named_parameters())
    assert [hasattr(m, "_diffusers_hook") for m in unet.unet.modules()] == hooked
    resumed = finetune(unet, TRAIN, ptq, epochs=EPOCHS, guidance_scale=GUIDANCE_SCALE, lr_scale=LR, checkpoint=path,
                       progress=False)
    assert resumed.training["epochs_done"] == EPOCHS and resumed.training["losses"] == tuned.training["losses"]
    assert resumed.key == tuned.key  # the same integers, step sizes and activation quantizers, bit for bit
    with pytest.raises(QuantError, match="another fine-tune"):
        finetune(unet, TRAIN, ptq, epochs=EPOCHS + 1, guidance_scale=GUIDANCE_SCALE, checkpoint=path, progress=False)


def test_bad_finetune_input(unet, ptq, tuned):
    dit = load_pipeline("digits-dit")
    with pytest.raises(QuantError, match="made for"):
        finetune(dit, TRAIN, ptq, epochs=1, progress=False)
    with pytest.raises(QuantError, match="made for"):
        diffcache.accelerate(dit, "none", quant=tuned)
    with pytest.raises(QuantError, match="4 steps"):
        finetune(unet, TRAIN, ptq, epochs=1, num_inference_steps=6, progress=False)
    with pytest.raises(QuantError, match="already fine-tuned"):
        finetune(unet, TRAIN, tuned, epochs=1, progress=False)
    with pytest.raises(QuantError, match="weight-only"):
        finetune(unet, TRAIN, "w8", epochs=1, progress=False)
    with pytest.raises(QuantError, match="epochs"):
        finetune(unet, TRAIN, ptq, epochs=0, progress=False)
    with diffcache.accelerated(unet, "none", quant=tuned):
        with pytest.raises(AccelerationStateError, match="calibrated for 4 steps"):
            unet(class_labels=[1], num_inference_steps=6, output_type="np")


def test_four_bit_activations_run_packed_or_are_labelled_simulated(unet):
    w4a4 = calibrate(unet, list(range(10)), QuantConfig(4, 4, edge_bits=8, act_range="mse", time_reconstruction=0),
                     num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE, batch_size=10, progress=False)
    with diffcache.accelerated(unet, "none", quant=w4a4):
        generate(unet)
        note = diffcache.summary(unet).quant
    # Linear layers run packed int4 (W4A4 clamps the u8 codes), convolutions with 4-bit inputs are simulated
    assert "packed int4" in note and "simulated" in note and "0 simulated" not in note
    # layer by layer on the inputs of a real generation, the kernels compute the simulation's numbers (end to
    # end, 4-bit activations turn float-rounding differences into other levels, step after step)
    modules = dict(unet.unet.named_modules())
    inputs = {}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach().clone()))
               for n in w4a4.layers]
    generate(unet, [3])
    for handle in handles:
        handle.remove()
    simulated = replace(w4a4, config=replace(w4a4.config, backend="fake"))
    clock = SimpleNamespace(plan=SimpleNamespace(num_steps=STEPS), step_index=torch.tensor(0))
    kernels = Counter()
    for index, name in enumerate(w4a4.layers):
        if name not in inputs:
            continue  # (the timestep MLP, served from its table)
        real, backend = layer_hook(modules[name], name, index, len(w4a4.layers), w4a4, clock)
        fake, _ = layer_hook(modules[name], name, index, len(w4a4.layers), simulated, clock)
        kernels[backend] += 1
        y, expected = real.new_forward(modules[name], inputs[name]), fake.new_forward(modules[name], inputs[name])
        assert (y - expected).abs().max() <= 1e-4 * expected.abs().max(), name
    assert kernels["int4"] > 10 and kernels[None] > 10
    forced = replace(w4a4, config=replace(w4a4.config, backend="onednn"))
    with pytest.raises(QuantError, match="4-bit activations"):
        diffcache.accelerate(unet, "none", quant=forced)


def test_search_and_cache_schedules_take_the_finetuned_model(unet, tuned, tmp_path):
    found = diffcache.search(unet, [0, 1], "dp", "recompute:0.6", num_inference_steps=STEPS,
                             guidance_scale=GUIDANCE_SCALE, batch_size=2, quant=tuned, progress=False,
                             out_dir=tmp_path, presets=False)
    assert found.recompute_fraction <= 0.6 + 1e-9
    with diffcache.accelerated(unet, "deepcache:interval=2", quant=tuned):
        cached = generate(unet)
        assert "efficientdm" in diffcache.summary(unet).quant
    with diffcache.accelerated(unet, "none", quant=tuned):
        alone = generate(unet)
    assert 0 < np.abs(cached - alone).mean() < 0.1  # the cache changes the quantized model's images, a little
