"""EfficientDM (He et al., ICLR 2024): data-free quantization-aware LoRA fine-tuning from a PTQ start.

    ptq = diffcache.quant.calibrate(pipe, labels, "w4a8")
    tuned = diffcache.quant.finetune(pipe, labels, ptq, epochs=40, checkpoint="w4a8-ft.ckpt.npz")
    tuned.save("w4a8-ft.npz")
    pipe = diffcache.accelerate(pipe, "uniform:interval=3", quant=tuned)

Each quantized layer keeps its PTQ integers frozen and learns a LoRA pair on top (QALoRA): the update is added to
the dequantized weight and the sum is fake-quantized, ``W' = s * clamp(round((s * W_int + B A) / s))``, so the
result is still ``bits``-bit integers with no float branch. Activations learn a step size and zero point per
sampling step (TALSQ), initialised from the calibrated ranges. The teacher is the float model itself: each
epoch samples a trajectory with it, and at every step the quantized student runs on the same input and takes one
AdamW step on the squared difference of the two outputs (the trajectory advances with the float prediction).

Choices of the released code (specs/algorithms.md section 8) kept here: rank 32, ``A`` Kaiming-uniform and ``B``
zero, LoRA learning rate per layer = its mean weight step size / 2500 (scale-aware), weight step sizes 1e-6,
zero points 5e-4, linear decay without warm-up, first and last layers at 8 bits (``QuantConfig.edge_bits``).
Differences, each for a reason:

- The loss is on the denoiser's raw output, both classifier-free-guidance halves, not on their combination: it
  needs no knowledge of the pipeline's guidance formula, and matching both halves matches any combination.
- Zero points are rounded with a straight-through estimator in training (the paper keeps them continuous until
  deployment), so what is trained is exactly what the integer kernels run.
- The schedule is shorter (the paper: 160 epochs of 100 DDIM steps on a GPU; here 80 of the deployed steps), and
  ``lr_scale`` (default 32) multiplies the LoRA rate to make up for it: an integer moves once its LoRA update
  reaches half a step.
- Activation step sizes learn at a rate relative to their size (`ACT_LR` of the layer's mean step per update),
  not the paper's absolute 5e-4: the digits models' steps span 0.002 to 0.1, and 5e-4 (or 5e-3, with the
  rates scaled) moved the small ones by a quarter or more per update and diverged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import ModelHook
from tqdm.auto import tqdm

from ..adapters import denoiser_of, resolve_adapter
from ..data import CalibrationData, conditions_from
from ..errors import QuantError
from ..files import load_npz, save_npz
from ..loading import generation_kwargs
from ..runtime import planned
from ..schedules.presets import build_from_tag
from .calibration import QuantCalibration, calibrate, temporal_modules
from .config import QuantConfig, quantizable_layers
from .hooks import quant_hooks
from .quantizers import weight_levels
from ..kernels.int8 import weight_codes

logger = logging.getLogger(__name__)

_CHECKPOINT_FORMAT = "diffcache.efficientdm-checkpoint/1"
LORA_LR_DIVISOR = 2500.0  # scale-aware LoRA learning rate: mean weight step size / 2500 (released code)
WEIGHT_SCALE_LR = 1e-6
ACT_LR = 5e-3  # activation step sizes: per step, this fraction of their mean size (see the module notes)
ZERO_LR = 5e-4  # zero points, in integer units


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class _Switch:
    """Whether the hooks run the student (quantized) or pass through to the float layers."""

    def __init__(self) -> None:
        self.student = False


class _QALoRA(ModelHook):
    """One quantized layer in training: frozen integer weights, a LoRA pair, learnable weight step sizes and
    per-step activation step size / zero point. Passes through to the float layer while the switch is off."""

    def __init__(self, module: torch.nn.Module, codes: torch.Tensor, scale: torch.Tensor, bits: int, rank: int,
                 act: tuple[torch.Tensor, torch.Tensor] | None, act_bits: int | None, switch: _Switch, name: str,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.name = name
        weight = module.weight
        fan_in = int(np.prod(weight.shape[1:]))
        rank = min(rank, weight.shape[0], fan_in)
        self.codes = codes.to(torch.float32)
        self.bits, (self.low, self.high) = bits, weight_levels(bits)
        self.scale = torch.nn.Parameter(scale.detach().float().clone())
        self.lora_a = torch.nn.Parameter(torch.empty(rank, fan_in))
        torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5), generator=generator)  # nn.Linear's, as LoRA
        self.lora_b = torch.nn.Parameter(torch.zeros(weight.shape[0], rank))
        self.act_scale = self.act_zero = None
        if act is not None:
            self.act_scale = torch.nn.Parameter(act[0].detach().float().clone())
            self.act_zero = torch.nn.Parameter(act[1].detach().float().clone())
        self.act_bits = act_bits
        self.switch = switch
        self.clock: Any = None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in (self.scale, self.lora_a, self.lora_b, self.act_scale, self.act_zero) if p is not None]

    def _shaped(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (self.codes.dim() - 1)))

    def _merged(self) -> torch.Tensor:
        """``s * W_int + B A``: the dequantized integers with the LoRA update added."""
        return self.codes * self._shaped(self.scale) + (self.lora_b @ self.lora_a).view_as(self.codes)

    def fake_weight(self) -> torch.Tensor:
        """``s * clamp(round((s * W_int + B A) / s))``: the merged weight, fake-quantized (gradients by STE)."""
        s = self._shaped(self.scale)
        return torch.clamp(_round_ste(self._merged() / s), self.low, self.high) * s

    def fake_act(self, x: torch.Tensor, step: int) -> torch.Tensor:
        s = self.act_scale[step].clamp_min(1e-12)
        z = torch.clamp(_round_ste(self.act_zero[step]), 0, 2**self.act_bits - 1)
        q = torch.clamp(_round_ste(x / s) + z, 0, 2**self.act_bits - 1)
        return (q - z) * s

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.switch.student:
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        if self.act_scale is not None:
            x = self.fake_act(x.float(), min(self.clock.step, len(self.act_scale) - 1)).to(x.dtype)
        weight = self.fake_weight().to(x.dtype)
        if isinstance(module, torch.nn.Linear):
            return F.linear(x, weight, module.bias)
        return module._conv_forward(x, weight, module.bias)

    @torch.no_grad()
    def merged(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The deployed integers (int8 array), the weight step sizes and the per-step ``(scale, zero)``."""
        codes = weight_codes(self._merged(), self.scale, self.bits).to(torch.int8).numpy()
        act = None
        if self.act_scale is not None:
            zero = torch.clamp(torch.round(self.act_zero), 0, 2**self.act_bits - 1)
            act = torch.stack([self.act_scale.clamp_min(1e-12), zero], dim=1).numpy().astype(np.float32)
        return codes, self.scale.detach().numpy().astype(np.float32).copy(), act


class _Gate(ModelHook):
    """A deployed hook (quantized layer or timestep table) that runs only while the switch is on."""

    def __init__(self, inner: ModelHook, switch: _Switch) -> None:
        super().__init__()
        self.inner, self.switch = inner, switch

    @property
    def clock(self) -> Any:
        return getattr(self.inner, "clock", None)

    @clock.setter
    def clock(self, value: Any) -> None:
        if hasattr(self.inner, "clock"):
            self.inner.clock = value

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.switch.student:
            return self.fn_ref.original_forward(*args, **kwargs)
        self.inner.fn_ref = self.fn_ref
        return self.inner.new_forward(module, *args, **kwargs)


def _output(result: Any) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, tuple):
        return result[0]
    return result.sample


class _Distill(ModelHook):
    """On the denoiser: runs the float model (whose output the trajectory follows) and, on the same input, the
    student; hands both outputs to ``on_step``."""

    def __init__(self, switch: _Switch, on_step: Any) -> None:
        super().__init__()
        self.switch, self.on_step = switch, on_step
        self.clock: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            target = self.fn_ref.original_forward(*args, **kwargs)
        self.switch.student = True
        try:
            self.on_step(lambda: _output(self.fn_ref.original_forward(*args, **kwargs)), _output(target).detach(),
                         self.clock.step)
        finally:
            self.switch.student = False
        return target


@dataclass(frozen=True)
class _Settings:
    epochs: int
    rank: int
    batch_size: int
    guidance_scale: float | None
    seed: int
    lr_scale: float

    def key(self, calibration: QuantCalibration, conditions: list) -> str:
        fields = [calibration.key, json.dumps(self.__dict__, sort_keys=True), conditions]
        return hashlib.sha1(json.dumps(fields, default=str).encode()).hexdigest()[:16]


def finetune(
    pipe: Any,
    prompts: Sequence[str | int] | str | os.PathLike,
    calibration: QuantCalibration | QuantConfig | str = "w4a8",
    *,
    epochs: int = 80,
    rank: int = 32,
    batch_size: int = 2,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    lr_scale: float = 32.0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    progress: bool = True,
) -> QuantCalibration:
    """Fine-tune ``pipe``'s quantized denoiser with EfficientDM; returns a calibration (``method="efficientdm"``)
    holding the learned integer weights and per-step activation quantizers, for ``accelerate(..., quant=)``.

    Args:
        prompts: the prompts or class ids the trajectories are sampled from (``batch_size`` of them per epoch).
        calibration: the PTQ start (`calibrate`'s result), or a config / preset name to calibrate first on
            ``prompts`` (with ``num_inference_steps``, ``guidance_scale`` and ``seed``).
        epochs: trajectories to train on (one optimizer step per denoising step of each). The paper runs 160 of
            100 steps on a GPU; 80 of 25 take 3-5 minutes per digits model on this 2-core CPU.
        rank: LoRA rank per layer (capped at the layer's sizes).
        lr_scale: multiplies the paper's scale-aware LoRA learning rate. An integer moves only once its LoRA
            update reaches half a step, which the paper's rate does in thousands of updates; on the digits models
            at 40 epochs x 25 steps, x16-x64 gave 34.5-34.9 dB PSNR vs fp32 (W4A8 UNet) against 31.9 dB at x1.
        checkpoint: a file to save the training state to every ``checkpoint_every`` epochs; if it exists and was
            made by the same call, training resumes from it (the result equals an uninterrupted run's).

    Raises:
        QuantError: an already fine-tuned or weight-only calibration, another model's, a step count other than
            the calibration's, or a checkpoint of another fine-tune.
    """
    if epochs < 1 or rank < 1 or batch_size < 1 or checkpoint_every < 1 or not lr_scale > 0:
        raise QuantError(f"epochs, rank, batch_size and checkpoint_every must be >= 1 and lr_scale > 0, got "
                         f"epochs={epochs}, rank={rank}, batch_size={batch_size}, "
                         f"checkpoint_every={checkpoint_every}, lr_scale={lr_scale}")
    denoiser = denoiser_of(pipe)
    adapter = resolve_adapter(denoiser)
    conditions = conditions_from(prompts, pipe)
    config = calibration.config if isinstance(calibration, QuantCalibration) else QuantConfig.parse(calibration)
    if config.act_bits is None:
        raise QuantError("EfficientDM trains activation quantizers; weight-only configs (w8) have none: use w4a8, "
                         "w4a4 or w8a8")
    if not isinstance(calibration, QuantCalibration):
        calibration = calibrate(pipe, conditions, calibration, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, seed=seed, progress=progress)
    calibration.check(adapter)
    if not calibration.made_on(adapter.denoiser):
        raise QuantError("the calibration was made on other weights of this architecture; calibrate this model "
                         "first (diffcache.quant.calibrate, or pass a config to finetune)")
    if calibration.method != "ptq":
        raise QuantError(f"this calibration is already fine-tuned ({calibration.method}); pass the PTQ calibration "
                         "it started from (resume an interrupted fine-tune with checkpoint=)")
    steps = calibration.num_steps
    if num_inference_steps is not None and num_inference_steps != steps:
        raise QuantError(f"the calibration is for {steps} steps, num_inference_steps is {num_inference_steps}; "
                         "calibrate for the step count you will deploy")
    settings = _Settings(epochs, rank, batch_size, guidance_scale, seed, lr_scale)
    key = settings.key(calibration, conditions)

    switch = _Switch()
    trained = _student_layers(adapter.denoiser, calibration, rank, switch, seed)
    optimizer = _optimizer(trained, lr_scale)
    bases = [group["lr"] for group in optimizer.param_groups]
    total = epochs * steps
    state = {"epoch": 0, "losses": [], "seconds": 0.0}
    if checkpoint is not None and os.path.exists(checkpoint):
        _resume(checkpoint, key, trained, optimizer, state)
        logger.info("diffcache: EfficientDM resumes at epoch %d of %d from %s", state["epoch"], epochs, checkpoint)

    counter = {"update": state["epoch"] * steps}
    epoch_losses: list[float] = []

    def on_step(student: Any, target: torch.Tensor, step: int) -> None:
        factor = 1.0 - counter["update"] / total  # linear decay, no warm-up
        for group, base in zip(optimizer.param_groups, bases):
            group["lr"] = base * factor
        with torch.enable_grad():
            loss = F.mse_loss(student().float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        counter["update"] += 1
        epoch_losses.append(loss.item())

    plan = build_from_tag("none", adapter, steps)
    hooks = [(module, hook) for module, hook in trained] + [(adapter.denoiser, _Distill(switch, on_step))]
    grads = {p: p.requires_grad for p in adapter.denoiser.parameters()}
    bar = tqdm(total=epochs, initial=state["epoch"], desc="EfficientDM", disable=not progress)
    try:
        for p in grads:
            p.requires_grad_(False)  # only the LoRA pairs and quantizer steps learn; the model stays as it was
        with planned(pipe, adapter, plan, hooks):
            while state["epoch"] < epochs:
                start = time.perf_counter()
                epoch_losses.clear()
                pipe(**_epoch_kwargs(pipe, conditions, settings, state["epoch"], steps))
                state["epoch"] += 1
                state["losses"].append(float(np.mean(epoch_losses)))
                state["seconds"] += time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{state['losses'][-1]:.3g}")
                logger.debug("diffcache: EfficientDM epoch %d loss %.4g", state["epoch"], state["losses"][-1])
                if checkpoint is not None and (state["epoch"] % checkpoint_every == 0 or state["epoch"] == epochs):
                    _save_checkpoint(checkpoint, key, trained, optimizer, state)
    finally:
        bar.close()
        for p, flag in grads.items():
            p.requires_grad_(flag)
    from ..memory import trim_heap

    trim_heap()  # (the training's freed activations and gradients, as after calibrate)
    logger.info("diffcache: EfficientDM %s: %d epochs in %.0f s, loss %.4g -> %.4g", calibration.config.name,
                epochs, state["seconds"], state["losses"][0], state["losses"][-1])
    return _result(calibration, trained, settings, state)


def _student_layers(denoiser: torch.nn.Module, calibration: QuantCalibration, rank: int, switch: _Switch,
                    seed: int) -> list[tuple[torch.nn.Module, _QALoRA]]:
    """A `_QALoRA` hook per quantized layer, started from the PTQ integers and ranges (the timestep MLPs served
    from the float table at deployment stay float here too)."""
    config = calibration.config
    layers = quantizable_layers(denoiser, config)
    served = {name for name, _ in temporal_modules(denoiser)} if config.temporal_lookup and calibration.temporal \
        else set()
    out = []
    generator = torch.Generator().manual_seed(seed)  # the LoRA init: a rerun (or a resume) starts the same
    with torch.no_grad():
        for index, (name, module) in enumerate(layers):
            if any(name.startswith(table + ".") for table in served):
                continue
            w_bits, a_bits = config.layer_bits(index, len(layers))
            scale = torch.as_tensor(calibration.scales[name]) if name in calibration.scales else None
            if scale is None:
                raise QuantError(f"the calibration has no weight scales for {name}; calibrate again (older files "
                                 "did not keep them)")
            up = calibration.rounding.get(name)
            codes = weight_codes(module.weight.detach().float(), scale, w_bits,
                                 None if up is None else torch.as_tensor(up))
            steps = torch.from_numpy(calibration.act_params(index))
            act = (steps[:, 0], steps[:, 1]) if a_bits is not None else None
            out.append((module, _QALoRA(module, codes, scale, w_bits, rank, act, a_bits, switch, name, generator)))
    return out


def _optimizer(trained: list[tuple[torch.nn.Module, _QALoRA]], lr_scale: float) -> torch.optim.AdamW:
    """AdamW with a group per layer: its LoRA pair at the layer's mean weight step / 2500 (scale-aware), its
    activation step sizes at `ACT_LR` of their mean size, its zero points at `ZERO_LR`; all weight steps at
    `WEIGHT_SCALE_LR`. ``lr_scale`` multiplies the LoRA rate."""
    groups = []
    for _, hook in trained:
        groups.append({"params": [hook.lora_a, hook.lora_b],
                       "lr": lr_scale * hook.scale.mean().item() / LORA_LR_DIVISOR})
        if hook.act_scale is not None:
            groups.append({"params": [hook.act_scale], "lr": ACT_LR * hook.act_scale.mean().item()})
            groups.append({"params": [hook.act_zero], "lr": ZERO_LR})
    groups.append({"params": [hook.scale for _, hook in trained], "lr": WEIGHT_SCALE_LR})
    return torch.optim.AdamW(groups)


def _epoch_kwargs(pipe: Any, conditions: list, settings: _Settings, epoch: int, steps: int) -> dict[str, Any]:
    """Epoch ``epoch``'s trajectory: ``batch_size`` conditions drawn and noise seeded from ``(seed, epoch)`` alone,
    so a resumed run sees what the uninterrupted one did."""
    rng = np.random.default_rng([settings.seed, epoch])
    picked = rng.choice(len(conditions), settings.batch_size, replace=len(conditions) < settings.batch_size)
    seed = int(rng.integers(2**31))
    return generation_kwargs(pipe, [conditions[i] for i in picked], seed, steps, settings.guidance_scale)


def _tensors(trained: list[tuple[torch.nn.Module, _QALoRA]]) -> list[torch.nn.Parameter]:
    return [p for _, hook in trained for p in hook.parameters()]


def _save_checkpoint(path: str | os.PathLike, key: str, trained: list, optimizer: torch.optim.Optimizer,
                     state: dict) -> None:
    """Parameters, AdamW moments and progress in one ``.npz`` (no pickle), written atomically."""
    params = _tensors(trained)
    arrays = {f"p{i}": p.detach().numpy() for i, p in enumerate(params)}
    moments = optimizer.state
    for i, p in enumerate(params):
        if p in moments:
            arrays[f"m{i}"] = moments[p]["exp_avg"].numpy()
            arrays[f"v{i}"] = moments[p]["exp_avg_sq"].numpy()
            arrays[f"t{i}"] = np.asarray(float(moments[p]["step"]))
    save_npz(path, _CHECKPOINT_FORMAT, {"key": key, **state}, arrays)


def _resume(path: str | os.PathLike, key: str, trained: list, optimizer: torch.optim.Optimizer, state: dict) -> None:
    try:
        header, arrays = load_npz(path, _CHECKPOINT_FORMAT)
    except ValueError as err:
        raise QuantError(f"{os.fspath(path)!r} is not an EfficientDM checkpoint ({err}); delete it or pass another "
                         "checkpoint path") from None
    if header.get("key") != key:
        raise QuantError(f"{os.fspath(path)!r} is the checkpoint of another fine-tune (other calibration, prompts or "
                         "settings); pass another checkpoint path, or delete it to start over")
    params = _tensors(trained)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(torch.from_numpy(arrays[f"p{i}"]))
            if f"m{i}" in arrays:
                optimizer.state[p] = {"step": torch.tensor(float(arrays[f"t{i}"])),
                                      "exp_avg": torch.from_numpy(arrays[f"m{i}"].copy()),
                                      "exp_avg_sq": torch.from_numpy(arrays[f"v{i}"].copy())}
    state.update(epoch=int(header["epoch"]), losses=list(header["losses"]), seconds=float(header["seconds"]))


def _result(calibration: QuantCalibration, trained: list, settings: _Settings, state: dict) -> QuantCalibration:
    """The PTQ calibration with the learned integers, weight steps and per-step activation quantizers."""
    names = calibration.layers
    codes, scales = {}, dict(calibration.scales)
    act = None  # the trained layers' learned quantizers, the PTQ ones for the rest (the table-served MLP)
    if calibration.config.act_bits is not None:
        act = np.stack([calibration.act_params(index) for index in range(len(names))])
    by_name = {hook.name: hook for _, hook in trained}
    for index, name in enumerate(names):
        if name in by_name:
            codes[name], scales[name], layer_act = by_name[name].merged()
            if layer_act is not None:
                act[index] = layer_act
    training = {**settings.__dict__, "epochs_done": state["epoch"], "losses": state["losses"],
                "seconds": round(state["seconds"], 1)}
    return replace(calibration, codes=codes, scales=scales, act=act, method="efficientdm", training=training)


def distillation_loss(
    pipe: Any,
    quant: QuantCalibration,
    prompts: Sequence[str | int] | str | os.PathLike,
    *,
    seed: int = 1000,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """EfficientDM's objective on other conditions: along the float model's trajectories of ``prompts`` (batches
    of ``batch_size``, batch ``i`` seeded ``seed + i``), the mean squared difference between the deployed
    quantized denoiser's output (``quant``, its real kernels) and the float one at each step.
    Returns ``[batch, step]``."""
    denoiser = denoiser_of(pipe)
    adapter = resolve_adapter(denoiser)
    conditions = conditions_from(prompts, pipe)
    steps = quant.num_steps
    switch = _Switch()
    deployed, _ = quant_hooks(adapter, quant, None)
    rows: list[list[float]] = []

    def on_step(student: Any, target: torch.Tensor, step: int) -> None:
        with torch.no_grad():
            rows[-1].append(F.mse_loss(student().float(), target.float()).item())

    hooks = [(module, _Gate(hook, switch)) for module, hook in deployed]
    hooks.append((adapter.denoiser, _Distill(switch, on_step)))
    batches = CalibrationData(conditions, steps, guidance_scale, seed, batch_size).batches(pipe)
    with planned(pipe, adapter, build_from_tag("none", adapter, steps), hooks):
        for kwargs in tqdm(batches, desc="distillation loss", disable=not progress):
            rows.append([])
            pipe(**kwargs)
    return np.asarray(rows)


__all__ = ["distillation_loss", "finetune"]
