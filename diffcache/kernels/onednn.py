"""oneDNN int8 Linear and Conv2d: u8 asymmetric per-tensor activations, s8 symmetric per-channel weights, output in
the input's dtype (float32 or bfloat16, so int8 GEMMs mix with bf16 everywhere else)."""

from __future__ import annotations

import functools

import torch

from .int8 import Int8Layer

_OUTPUT_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's quantized linear and convolution ops (x86 CPU builds do)."""
    try:
        ops = torch.ops.onednn
        return torch.backends.mkldnn.is_available() and all(
            hasattr(ops, op) for op in ("qlinear_prepack", "qlinear_pointwise", "qconv_prepack", "qconv_pointwise"))
    except (AttributeError, RuntimeError):
        return False


# The oneDNN calls go through opaque custom ops: inductor then fuses the activation rounding into the ops before
# them, while its own lowering of onednn.qlinear_pointwise (written for PT2E graphs) would insist on frozen,
# constant weights and a Python-float scale, which per-step scales are not.
@torch.library.custom_op("diffcache::onednn_qlinear", mutates_args=())
def _qlinear(qx: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, packed: torch.Tensor,
             w_scale: torch.Tensor, w_zero: torch.Tensor, bias: torch.Tensor | None, out_features: int,
             dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise.tensor(qx, x_scale, x_zero, packed, w_scale, w_zero, bias, 1.0, 0,
                                                     dtype, "none", [], "")


@_qlinear.register_fake
def _(qx, x_scale, x_zero, packed, w_scale, w_zero, bias, out_features, dtype):
    return qx.new_empty((qx.shape[0], out_features), dtype=dtype)


@torch.library.custom_op("diffcache::onednn_qconv", mutates_args=())
def _qconv(qx: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, packed: torch.Tensor,
           w_scale: torch.Tensor, w_zero: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
           padding: list[int], dilation: list[int], groups: int, weight_shape: list[int],
           dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.onednn.qconv_pointwise.tensor(qx, x_scale, x_zero, packed, w_scale, w_zero, bias, stride,
                                                   padding, dilation, groups, 1.0, 0, dtype, "none", [], "")


@_qconv.register_fake
def _(qx, x_scale, x_zero, packed, w_scale, w_zero, bias, stride, padding, dilation, groups, weight_shape, dtype):
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(qx.shape[2:], weight_shape[2:], stride, padding, dilation, strict=True)]
    return qx.new_empty((qx.shape[0], weight_shape[0], *size), dtype=dtype).contiguous(
        memory_format=torch.channels_last)


class OneDNNLinear(Int8Layer):
    """A Linear layer's weight quantized and prepacked once; :meth:`__call__` runs it with the given activation
    range, so one prepacked weight serves every step."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int = 8,
                 up: torch.Tensor | None = None) -> None:
        super().__init__(weight, scale, bias, bits, up)
        self.packed = torch.ops.onednn.qlinear_prepack(self.qweight, None)
        del self.qweight  # the packed copy is the one that runs

    def __call__(self, x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor) -> torch.Tensor:
        qx, bias, dtype = self.inputs(x, x_scale, x_zero, _OUTPUT_DTYPES)
        y = _qlinear(qx.reshape(-1, qx.shape[-1]), x_scale.float(), x_zero.to(torch.int64), self.packed, self.scale,
                     self.zero, bias, self.out_features, dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class OneDNNConv2d(Int8Layer):
    """A Conv2d (zero padding) likewise. The activation scale the prepack asks for is only a layout hint: the run
    takes the step's own (checked in the tests). Output is channels-last, as oneDNN computes it."""

    def __init__(self, conv: torch.nn.Conv2d, scale: torch.Tensor, bits: int = 8, up: torch.Tensor | None = None
                 ) -> None:
        super().__init__(conv.weight, scale, conv.bias, bits, up)
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        stride, padding, dilation, groups = self.geometry
        self.packed = torch.ops.onednn.qconv_prepack(self.qweight, self.scale, 1.0, 0, stride, padding, dilation,
                                                     groups, None)
        del self.qweight  # the packed copy is the one that runs
        self.weight_shape = list(conv.weight.shape)

    def __call__(self, x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor) -> torch.Tensor:
        qx, bias, dtype = self.inputs(x, x_scale, x_zero, _OUTPUT_DTYPES)
        return _qconv(qx.contiguous(memory_format=torch.channels_last), x_scale.float(), x_zero.to(torch.int64),
                      self.packed, self.scale, self.zero, bias, *self.geometry, self.weight_shape, dtype)


def onednn_supports(module: torch.nn.Module) -> bool:
    """Whether :class:`OneDNNLinear` / :class:`OneDNNConv2d` can run ``module``: a CPU float32/bf16 Linear, or such
    a zero-padded 2-d convolution."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type != "cpu" or weight.dtype not in _OUTPUT_DTYPES:
        return False
    if isinstance(module, torch.nn.Conv2d):
        return module.padding_mode == "zeros" and isinstance(module.padding, tuple)  # not "same"/"valid" strings
    return isinstance(module, torch.nn.Linear)


__all__ = ["OneDNNConv2d", "OneDNNLinear", "onednn_available", "onednn_supports"]
