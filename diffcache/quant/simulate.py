"""Fake-quantized execution (simulation): each quantized layer's hook rounds its input with the current step's
activation range and runs the layer with weights rounded once, in floating point. The numbers are exactly those
of the deployed int8 scheme; the speed is not (it is slower than float), and every report says so."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import ModelHook

from ..adapters import Adapter
from ..errors import AccelerationStateError, QuantError
from ..runtime import Executor
from .calibration import QuantCalibration, quantizable_layers, temporal_modules
from .config import QuantConfig
from .quantizers import act_params, fake_quant_act, fake_quant_weight, weight_scales

logger = logging.getLogger(__name__)


class FakeQuantHook(ModelHook):
    """Replaces a Linear/Conv2d forward with its fake-quantized version at the executor's current step."""

    def __init__(self, clock: Executor, weight: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
                 name: str) -> None:
        super().__init__()
        self.clock, self.weight, self.scale, self.zero, self.name = clock, weight, scale, zero, name

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["input"]
        if self.scale is not None:
            step, steps = self.clock.step, len(self.scale)
            if self.clock.plan is None or self.clock.plan.num_steps != steps or step >= steps:
                planned = self.clock.plan.num_steps if self.clock.plan is not None else "no"
                raise AccelerationStateError(
                    f"{self.name}: activation ranges were calibrated for {steps} steps, but this generation runs "
                    f"{planned} (step {step}); calibrate the quantization for this num_inference_steps"
                )
            x = fake_quant_act(x, self.scale[step], self.zero[step])
        if isinstance(module, torch.nn.Linear):
            return F.linear(x, self.weight, module.bias)
        return module._conv_forward(x, self.weight, module.bias)


class TemporalLookupHook(ModelHook):
    """Serves a timestep MLP's full-precision output for an input row seen at calibration; anything else runs the
    (quantized) module and warns once."""

    def __init__(self, inputs, outputs, name: str, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.table = {row.tobytes(): torch.as_tensor(out, dtype=dtype, device=device) for row, out in
                      zip(inputs, outputs)}
        self.name, self.warned = name, False

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["sample"]
        values = x.detach().float().cpu().numpy()
        if (values == values[:1]).all():  # one timestep for the whole batch: one lookup
            row = self.table.get(values[0].tobytes())
            if row is not None:
                return row.to(x.dtype).expand(len(values), -1)
        else:
            rows = [self.table.get(v.tobytes()) for v in values]
            if all(row is not None for row in rows):
                return torch.stack(rows).to(x.dtype)
        if not self.warned:
            self.warned = True
            logger.warning("diffcache: %s got a timestep its calibration did not see (another step count or "
                           "scheduler?); computing it quantized", self.name)
        return self.fn_ref.original_forward(*args, **kwargs)


def fake_quant_hooks(adapter: Adapter, quant: QuantConfig | QuantCalibration, clock: Executor
                     ) -> list[tuple[torch.nn.Module, FakeQuantHook]]:
    """One hook per quantized layer. A config without a calibration only works weight-only."""
    if isinstance(quant, QuantCalibration):
        quant.check(adapter)
        config = quant.config
    else:
        config = quant
        if config.act_bits is not None:
            raise QuantError(
                f"{config.name} quantizes activations, which needs their ranges: run "
                "diffcache.quant.calibrate(pipe, prompts, config) (or `diffcache quantize`) and pass the result, or "
                "use the weight-only preset 'w8'"
            )
    hooks = []
    for index, (name, module) in enumerate(quantizable_layers(adapter.denoiser, config)):
        with torch.no_grad():
            weight = fake_quant_weight(module.weight, weight_scales(module.weight, config.weight_bits,
                                                                    config.weight_range), config.weight_bits)
        scale = zero = None
        if config.act_bits is not None:
            ranges = torch.as_tensor(quant.ranges[index], dtype=module.weight.dtype, device=module.weight.device)
            scale, zero = act_params(ranges[:, 0], ranges[:, 1], config.act_bits)
        hooks.append((module, FakeQuantHook(clock, weight, scale, zero, name)))
    if isinstance(quant, QuantCalibration) and config.temporal_lookup:
        modules = dict(temporal_modules(adapter.denoiser))
        for name, (inputs, outputs) in quant.temporal.items():
            parameter = next(modules[name].parameters())
            hooks.append((modules[name], TemporalLookupHook(inputs, outputs, name, parameter.dtype, parameter.device)))
    return hooks


__all__ = ["FakeQuantHook", "fake_quant_hooks"]
