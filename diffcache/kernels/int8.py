"""What every int8 kernel shares: the scheme diffcache calibrates and simulates (`diffcache.quant.quantizers`),
s8 symmetric per-output-channel weights and u8 asymmetric per-tensor activations."""

from __future__ import annotations

import torch


def weight_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int, up: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The signed ``bits`` integers (as floats) of ``weight`` on the grid ``scale[c] * k`` of its output channel:
    rounded to nearest, or, given ``up`` (a learned rounding, e.g. AdaRound's), floored plus ``up``."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    ratio = weight / scale.view((-1,) + (1,) * (weight.dim() - 1)).to(weight.dtype)
    codes = torch.round(ratio) if up is None else torch.floor(ratio) + up.to(ratio.dtype)
    return torch.clamp(codes, low, high)


class Int8Layer:
    """A layer's weight rounded once to signed ``bits`` per output channel (``scale`` per channel; ``up``: a
    learned rounding, see `weight_codes`), plus the rounding of its input with a ``(scale, zero_point)`` given at
    each call (0-d tensors: the current step's)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
                 up: torch.Tensor | None = None) -> None:
        self.qweight = weight_codes(weight.detach().float(), scale.float(), bits, up).to(torch.int8)
        self.scale = scale.detach().float().contiguous()
        self.zero = torch.zeros_like(self.scale, dtype=torch.int64)
        self.bias = bias
        self.out_features = weight.shape[0]
        self.nbytes = self.qweight.numel() + self.scale.numel() * 4

    def inputs(self, x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, dtypes: tuple[torch.dtype, ...],
               offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
        """The input's u8 codes minus ``offset`` (128 gives int8), the bias and the output dtype (the input's if
        the kernel can give it, else float32)."""
        dtype = x.dtype if x.dtype in dtypes else torch.float32
        # Rounded in float32 (a bf16 x / scale would lose the fraction that decides the rounding).
        codes = torch.clamp(torch.round(x.float() / x_scale) + x_zero, 0, 255) - offset
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        return codes.to(torch.int8 if offset else torch.uint8), bias, dtype


__all__ = ["Int8Layer", "weight_codes"]
