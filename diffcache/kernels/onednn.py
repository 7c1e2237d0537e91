"""oneDNN int8 linear: u8 asymmetric per-tensor activations, s8 symmetric per-channel weights, float output."""

from __future__ import annotations

import functools

import torch


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's quantized linear ops (x86 CPU builds do)."""
    try:
        ops = torch.ops.onednn
        return torch.backends.mkldnn.is_available() and hasattr(ops, "qlinear_prepack") and hasattr(
            ops, "qlinear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class OneDNNLinear:
    """A Linear layer's weight quantized and prepacked once; :meth:`__call__` runs it on a float input with the
    given activation ``(scale, zero_point)`` (0-d tensors, e.g. the current step's)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int = 8) -> None:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        q = torch.clamp(torch.round(weight.detach().float() / scale[:, None]), low, high).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.scale = scale.detach().float().contiguous()
        self.zero = torch.zeros_like(self.scale, dtype=torch.int64)
        self.bias = bias
        self.out_features = weight.shape[0]
        self.nbytes = q.numel() * q.element_size() + self.scale.numel() * 4

    def __call__(self, x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor) -> torch.Tensor:
        qx = torch.clamp(torch.round(x / x_scale) + x_zero, 0, 255).to(torch.uint8)
        flat = qx.reshape(-1, qx.shape[-1])
        bias = None if self.bias is None else self.bias.detach().float()
        y = torch.ops.onednn.qlinear_pointwise.tensor(
            flat, x_scale.float(), x_zero.to(torch.int64), self.packed, self.scale, self.zero, bias, 1.0, 0,
            torch.float32, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


__all__ = ["OneDNNLinear", "onednn_available"]
