"""Uniform quantizers in simulation (quantize -> dequantize in floating point), exactly the deployed scheme:
weights symmetric per output channel (signed ``bits``), activations asymmetric per tensor (unsigned 8 bit)."""

from __future__ import annotations

import torch

from ..kernels.int8 import weight_codes

MSE_RATIOS = torch.linspace(0.5, 1.0, 26)  # clipping ratios of the channel's absmax tried by the MSE search


def weight_levels(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int, up: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Round ``weight`` to the symmetric grid ``scale[c] * {-2^(b-1) .. 2^(b-1)-1}`` of its output channel (to
    nearest, or with the learned rounding ``up``: see `diffcache.kernels.int8.weight_codes`)."""
    s = scale.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)
    return weight_codes(weight, scale, bits, up) * s


def weight_scales(weight: torch.Tensor, bits: int, method: str = "mse") -> torch.Tensor:
    """Per-output-channel scales: absmax / qmax (``"minmax"``), or the clipping of the absmax with the least
    squared rounding error (``"mse"``, a grid search over `MSE_RATIOS`)."""
    w = weight.detach().float().flatten(1)
    high = weight_levels(bits)[1]
    absmax = w.abs().amax(dim=1).clamp_min(1e-12)
    if method == "minmax":
        return absmax / high
    best = absmax / high
    best_error = torch.full_like(absmax, float("inf"))
    for ratio in MSE_RATIOS:
        scale = absmax * ratio / high
        error = (fake_quant_weight(w, scale, bits) - w).pow(2).sum(dim=1)
        better = error < best_error
        best = torch.where(better, scale, best)
        best_error = torch.where(better, error, best_error)
    return best


def act_params(low: torch.Tensor, high: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric ``(scale, zero_point)`` covering ``[low, high]`` (widened to include 0, so zero padding and ReLU
    zeros stay exact). Works element-wise, e.g. on one range per step."""
    levels = 2**bits - 1
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    scale = ((high - low) / levels).clamp_min(1e-12)
    zero = torch.clamp(torch.round(-low / scale), 0, levels)
    return scale, zero


def mse_act_range(values: torch.Tensor, low: float, high: float, bits: int) -> tuple[float, float]:
    """The range ``ratio * (low, high)`` (ratio 1.0 down to 0.21 by 0.01) whose rounding of ``values`` has the
    least L2.4 error: the search EfficientDM's naive PTQ start runs per tensor (after LAPQ)."""
    values = values.float()
    best, best_error = (low, high), float("inf")
    for i in range(80):
        ratio = 1.0 - 0.01 * i
        scale, zero = act_params(torch.tensor(low * ratio), torch.tensor(high * ratio), bits)
        error = (fake_quant_act(values, scale, zero, bits) - values).abs().pow(2.4).mean().item()
        if error < best_error:
            best, best_error = (low * ratio, high * ratio), error
    return best


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``(clamp(round(x / s) + z, 0, 2^b - 1) - z) * s`` with per-tensor ``s, z``."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


__all__ = ["act_params", "fake_quant_act", "mse_act_range", "fake_quant_weight", "weight_levels", "weight_scales"]
