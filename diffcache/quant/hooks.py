"""Quantized execution: each quantized layer's hook runs it with the current step's activation range.

Real integer kernels (`diffcache.kernels`: ``onednn`` for Linear and Conv2d on CPU, ``intmm`` for Linear on CUDA,
``int4``, packed 4-bit Linear weights on CPU) and ``fake`` give the same numbers: ``fake`` simulates (rounds the
input, runs the layer with weights rounded once, in floating point: slower than float, and reported as simulation).
4-bit Conv2d weights run in the int8 convolution as values in [-8, 7]; 4-bit activations run only in `Int4Linear`
(Conv2d layers with them, and weight-only configs, are simulated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import ModelHook

from ..adapters import Adapter
from ..errors import AccelerationStateError, QuantError
from ..kernels import BACKENDS, Int4Linear, Int8Kernel, int4_supports, int8_backend, int8_layer
from ..runtime import Executor
from .calibration import QuantCalibration, temporal_modules
from .config import quantizable_layers
from .config import QuantConfig
from .quantizers import fake_quant_act, fake_quant_weight, weight_scales

logger = logging.getLogger(__name__)


class QuantLayerHook(ModelHook):
    """Replaces a Linear/Conv2d forward with its quantized version at the executor's current step: a real int8
    ``kernel`` when given, else the fake-quantized ``weight``. ``out_fix`` (CacheQuant's quantization-error
    correction) maps the output per step and channel, ``alpha[step] * y + beta[step]``."""

    def __init__(self, clock: Executor, weight: torch.Tensor | None, scale: torch.Tensor | None,
                 zero: torch.Tensor | None, name: str, kernel: Int8Kernel | None = None, act_bits: int = 8,
                 weight_bits: int = 8) -> None:
        super().__init__()
        self.clock, self.weight, self.scale, self.zero, self.name = clock, weight, scale, zero, name
        self.kernel, self.act_bits, self.weight_bits = kernel, act_bits, weight_bits
        self.out_fix: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the weight this hook runs (int8 codes and scales, or the rounded float copy)."""
        return self.kernel.nbytes if self.kernel is not None else self.weight.numel() * self.weight.element_size()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["input"]
        if self.scale is None:
            return _float_layer(module, x, self.weight)
        steps, plan = len(self.scale), self.clock.plan
        if plan is None or plan.num_steps != steps:
            raise AccelerationStateError(
                f"{self.name}: activation ranges were calibrated for {steps} steps, but this generation runs "
                f"{plan.num_steps if plan is not None else 'no'}; calibrate the quantization for this "
                "num_inference_steps"
            )
        # The step as a tensor (a compiled denoiser needs no graph per step); past the end, the last range.
        index = self.clock.step_index.clamp(max=steps - 1).view(1)
        scale, zero = self.scale.index_select(0, index)[0], self.zero.index_select(0, index)[0]
        if self.kernel is not None:
            y = self.kernel(x, scale, zero)
        else:
            y = _float_layer(module, fake_quant_act(x, scale, zero, self.act_bits).to(x.dtype), self.weight)
        if self.out_fix is None:
            return y
        shape = (1, -1) + (1,) * (y.dim() - 2)
        alpha, beta = (t.index_select(0, index).view(shape).to(y.dtype) for t in self.out_fix)
        return y * alpha + beta


def _float_layer(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, torch.nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


class TemporalLookupHook(ModelHook):
    """Serves a timestep MLP's full-precision output for the input rows seen at calibration (matched exactly, row
    by row, with tensor ops so a compiled denoiser traces it); other rows run the (quantized) module."""

    def __init__(self, inputs: np.ndarray, outputs: np.ndarray, name: str, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        # Matched as the module sees them: a bf16 model gets the float32-recorded rows rounded to bf16.
        self.inputs = torch.as_tensor(inputs, dtype=torch.float32, device=device).to(dtype).float()
        self.outputs = torch.as_tensor(outputs, dtype=dtype, device=device)
        self.name = name

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["sample"]
        match = (x.detach().float()[:, None, :] == self.inputs[None]).all(dim=-1)  # (batch, table rows)
        found = match.any(dim=-1, keepdim=True)
        table = self.outputs[match.int().argmax(dim=-1)].to(x.dtype)
        if not torch.compiler.is_compiling() and bool(found.all()):
            return table  # eager: the time path costs nothing
        return torch.where(found, table, self.fn_ref.original_forward(*args, **kwargs))


def quant_hooks(adapter: Adapter, quant: QuantConfig | QuantCalibration, clock: Executor | None
                ) -> tuple[list[tuple[torch.nn.Module, ModelHook]], str]:
    """One hook per quantized layer (plus the temporal lookups), and a line saying what runs how. A config
    without a calibration only works weight-only."""
    if isinstance(quant, QuantCalibration):
        quant = _for_these_weights(quant, adapter)
        config = quant.config
    else:
        config = quant
        if config.act_bits is not None:
            raise QuantError(
                f"{config.name} quantizes activations, which needs their ranges: run "
                "diffcache.quant.calibrate(pipe, prompts, config) (or `diffcache quantize`) and pass the result, or "
                "use the weight-only preset 'w8'"
            )
    hooks: list[tuple[torch.nn.Module, ModelHook]] = []
    counts: Counter[str] = Counter()
    layers = quantizable_layers(adapter.denoiser, config)
    for index, (name, module) in enumerate(layers):
        hook, backend = layer_hook(module, name, index, len(layers), quant, clock)
        counts[backend or "fake"] += 1
        counts["w4"] += backend in BACKENDS and hook.weight_bits == 4
        hooks.append((module, hook))
    if isinstance(quant, QuantCalibration) and config.temporal_lookup:
        modules = dict(temporal_modules(adapter.denoiser))
        for name, (inputs, outputs) in quant.temporal.items():
            parameter = next(modules[name].parameters())
            hooks.append((modules[name], TemporalLookupHook(inputs, outputs, name, parameter.dtype, parameter.device)))
    lookups = len(hooks) - len(layers)
    real = ", ".join(f"{counts[b]} layers int8 ({_KERNEL_NAMES[b]})" for b in BACKENDS if counts[b])
    real += f" ({counts['w4']} of them 4-bit weights in int8 kernels)" if counts["w4"] else ""
    if counts["int4"]:
        real += (", " if real else "") + f"{counts['int4']} packed int4 (torch._int_mm)"
    mib = sum(hook.nbytes for _, hook in hooks if isinstance(hook, QuantLayerHook)) / 2**20
    method = "" if not isinstance(quant, QuantCalibration) or quant.method == "ptq" else f" {quant.method}"
    note = (f"{config.name}{method}: {real or '0 layers int8'}, {counts['fake']} simulated (fake quantization)"
            + (f", {lookups} timestep MLPs from a full-precision table" if lookups else "")
            + f"; quantized weights {mib:.1f} MiB")
    return hooks, note


def _for_these_weights(calibration: QuantCalibration, adapter: Adapter) -> QuantCalibration:
    """``calibration``, checked against ``adapter``'s denoiser; made on other weights of the architecture, a PTQ
    calibration loses what it derived from them (scales, learned rounding: recomputed by rounding to nearest) with a
    warning, and a fine-tuned one, whose integers replace those weights, is refused."""
    calibration.check(adapter)
    if calibration.made_on(adapter.denoiser):
        return calibration
    if calibration.codes:
        raise QuantError(
            f"this {calibration.method} calibration was fine-tuned on other weights of {adapter.model_info['class']}; "
            "its integer weights would replace this model's. Fine-tune again on this model "
            "(diffcache.quant.finetune or `diffcache quantize --finetune`)")
    logger.warning("diffcache: this quantization calibration was made on other weights of %s; its activation ranges "
                   "are kept, its weight scales and learned rounding are recomputed (calibrate on this model for the "
                   "best quality)", adapter.model_info["class"])
    return dataclasses.replace(calibration, scales={}, rounding={}, weights=None)


def float_weight_bytes(hooks: list[tuple[torch.nn.Module, ModelHook]]) -> int:
    """Bytes of the float weights of the layers the quantized ``hooks`` run (what `release_float_weights` frees)."""
    return sum(module.weight.numel() * module.weight.element_size()
               for module, hook in hooks if isinstance(hook, QuantLayerHook))


def release_float_weights(hooks: list[tuple[torch.nn.Module, ModelHook]]) -> int:
    """Free the float weights of the layers the quantized ``hooks`` run (their hooks hold what runs: an int8 kernel
    or the rounded weight); returns the bytes freed. The parameters stay, empty, so dtype/device moves still work."""
    freed = float_weight_bytes(hooks)
    for module, hook in hooks:
        if isinstance(hook, QuantLayerHook):
            module.weight.data = module.weight.data.new_empty(0)
    return freed


def layer_hook(module: torch.nn.Module, name: str, index: int, count: int, quant: QuantConfig | QuantCalibration,
               clock: Executor | None) -> tuple[QuantLayerHook, str | None]:
    """The hook running quantizable layer number ``index`` of ``count`` (``name``), and its int8 backend (None:
    simulated)."""
    calibration = quant if isinstance(quant, QuantCalibration) else None
    config = quant.config if calibration is not None else quant
    device = module.weight.device
    w_bits, a_bits = config.layer_bits(index, count)
    with torch.no_grad():
        cached = calibration.scales.get(name) if calibration is not None else None
        if cached is not None and cached.shape == (module.weight.shape[0],):
            scales = torch.as_tensor(cached, device=device)
        else:
            scales = weight_scales(module.weight, w_bits, config.weight_range)
        scale = zero = kernel = weight = None
        if a_bits is not None:
            steps = torch.as_tensor(quant.act_params(index), device=device)
            scale, zero = steps[:, 0].contiguous(), steps[:, 1].contiguous()
        codes = calibration.codes.get(name) if calibration is not None else None
        # a fine-tuned layer runs its learned integers: codes * scale is exactly on the grid, so both the
        # kernels' and the simulation's rounding give those integers back
        source = module.weight if codes is None else _on_grid(codes, scales, module.weight)
        backend = _backend(config, module, w_bits, a_bits) if scale is not None else None
        learned = calibration.rounding.get(name) if calibration is not None and codes is None else None
        up = None if learned is None else torch.as_tensor(learned, device=device)
        if backend == "int4":
            kernel = Int4Linear(source, scales, module.bias, w_bits, up, act_bits=a_bits)
        elif backend is not None:
            with _weight_swapped(module, source) as holder:
                kernel = int8_layer(holder, scales, w_bits, backend, up)
        else:
            weight = fake_quant_weight(source, scales, w_bits, up)
    return QuantLayerHook(clock, weight, scale, zero, name, kernel, a_bits or 8, w_bits), backend


@contextlib.contextmanager
def _weight_swapped(module: torch.nn.Module, weight: torch.Tensor) -> Iterator[torch.nn.Module]:
    """``module`` holding ``weight`` for the block (a kernel reads its weight, bias and geometry from it)."""
    original = module.weight.data
    module.weight.data = weight
    try:
        yield module
    finally:
        module.weight.data = original


def _on_grid(codes: np.ndarray, scales: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    grid = torch.as_tensor(codes, device=weight.device).to(torch.float32)
    return (grid * scales.float().view(-1, *([1] * (grid.dim() - 1)))).to(weight.dtype)


_KERNEL_NAMES = {"onednn": "oneDNN", "intmm": "torch._int_mm"}


def _backend(config: QuantConfig, module: torch.nn.Module, weight_bits: int, act_bits: int) -> str | None:
    """The integer kernel for a layer on its device (``config.backend`` permitting), or ``None`` to simulate.

    With ``"auto"``, 4-bit Linear weights on CPU run packed in `Int4Linear` (half of int8's bytes; with 8- or
    4-bit activations), other 4-bit weights in the int8 kernels as values in [-8, 7]; 4-bit activations have
    no other kernel. A forced ``"onednn"``/``"intmm"`` runs 4-bit weights in int8 storage."""
    if config.backend == "fake":
        return None
    if config.backend == "auto" and weight_bits == 4 and int4_supports(module):
        return "int4"
    if act_bits != 8:
        if config.backend != "auto":
            raise QuantError(
                f"backend {config.backend!r} cannot run {act_bits}-bit activations: no CPU or CUDA int8 kernel takes "
                f"them (only the packed 4-bit Linear of backend='auto' does). Use backend='auto' (other layers are "
                "then simulated, and diffcache.summary says so) or 'fake'")
        return None
    found = int8_backend(module)
    if config.backend != "auto" and found != config.backend:
        raise QuantError(
            f"backend {config.backend!r} cannot run this {weight_bits}-bit {type(module).__name__} "
            f"({module.weight.dtype} on {module.weight.device}): 'onednn' runs Linear and zero-padded Conv2d "
            "layers on CPU, 'intmm' Linear layers with sizes divisible by 8 on CUDA. Use backend='auto' "
            "(int8 where it runs, simulation elsewhere) or 'fake'")
    return found


__all__ = ["QuantLayerHook", "TemporalLookupHook", "layer_hook", "quant_hooks", "release_float_weights"]
