"""Real int8 execution backends, chosen per layer at run time (ARCHITECTURE section 6).

``onednn`` (CPU): int8 GEMMs and convolutions through oneDNN's ``qlinear`` / ``qconv`` (u8 activations x s8
per-channel weights, fused dequant and bias; AMX-INT8 / VNNI where the CPU has them), in float32 or bf16 models.
``intmm`` (CUDA): Linear layers on ``torch._int_mm`` (cuBLASLt int8 tensor cores) with the dequantization in
tensor ops that ``torch.compile`` fuses. Both take the activation scale as a tensor, so one prepared weight serves
every step's own activation range, and both compute the integers of diffcache's simulation (tested).
"""

from __future__ import annotations

import torch

from .int4 import Int4Linear, int4_supports, pack_int4, unpack_int4
from .intmm import IntMMLinear, intmm_supports
from .onednn import OneDNNConv2d, OneDNNLinear, onednn_available, onednn_supports

BACKENDS = ("onednn", "intmm")

Int8Kernel = OneDNNLinear | OneDNNConv2d | IntMMLinear


def int8_backend(module: torch.nn.Module) -> str | None:
    """The backend that runs ``module`` in int8 on its device, or ``None`` (then it is simulated)."""
    if module.weight.device.type == "cpu":
        return "onednn" if onednn_available() and onednn_supports(module) else None
    return "intmm" if module.weight.device.type == "cuda" and intmm_supports(module) else None


def int8_layer(module: torch.nn.Module, scale: torch.Tensor, bits: int = 8, backend: str = "onednn",
               up: torch.Tensor | None = None) -> Int8Kernel:
    """``module``'s weight quantized with the per-channel ``scale`` (and learned rounding ``up``, if given) and
    prepared for ``backend``."""
    if backend == "intmm":
        return IntMMLinear(module.weight, scale, module.bias, bits, up)
    if isinstance(module, torch.nn.Conv2d):
        return OneDNNConv2d(module, scale, bits, up)
    return OneDNNLinear(module.weight, scale, module.bias, bits, up)


__all__ = ["BACKENDS", "Int4Linear", "Int8Kernel", "IntMMLinear", "OneDNNConv2d", "OneDNNLinear", "int4_supports",
           "int8_backend", "int8_layer", "onednn_available", "pack_int4", "unpack_int4"]
