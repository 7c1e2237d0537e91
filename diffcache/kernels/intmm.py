"""int8 Linear on ``torch._int_mm`` (s8 x s8 -> s32): cuBLASLt's int8 tensor-core GEMM on CUDA, oneDNN on CPU.

The u8 activation codes of diffcache's scheme are shifted to s8 (``u - 128``); the shift and the zero point come
back as one exact int32 term per output channel, ``(128 - z) * sum_k w[n, k]``, so the integers are those of the
simulation. The dequantization is plain tensor arithmetic, which ``torch.compile`` fuses into the GEMM's
neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .int8 import Int8Layer

_OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_ROWS = 17  # CUDA's _int_mm wants more than 16 rows


class IntMMLinear(Int8Layer):
    """A Linear layer's int8 weight (stored transposed, column-major as cuBLASLt wants) and its row sums."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int = 8,
                 up: torch.Tensor | None = None) -> None:
        super().__init__(weight, scale, bias, bits, up)
        self.weight_t = self.qweight.t()
        self.row_sums = self.qweight.sum(dim=1, dtype=torch.int32)

    def __call__(self, x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor) -> torch.Tensor:
        codes, bias, dtype = self.inputs(x, x_scale, x_zero, _OUTPUT_DTYPES, offset=128)
        flat = codes.reshape(-1, codes.shape[-1])
        rows = flat.shape[0]
        if rows < _MIN_ROWS:
            flat = F.pad(flat, (0, 0, 0, _MIN_ROWS - rows))
        acc = torch._int_mm(flat, self.weight_t)[:rows]
        acc = acc + (128 - x_zero).to(torch.int32) * self.row_sums
        y = acc.float() * (x_scale * self.scale)
        if bias is not None:
            y = y + bias.float()
        return y.to(dtype).reshape(*x.shape[:-1], self.out_features)


def intmm_supports(module: torch.nn.Module) -> bool:
    """A float Linear whose sizes suit ``_int_mm`` on CUDA (both multiples of 8)."""
    return (isinstance(module, torch.nn.Linear) and module.weight.dtype in _OUTPUT_DTYPES
            and module.in_features % 8 == 0 and module.out_features % 8 == 0)


__all__ = ["IntMMLinear", "intmm_supports"]
