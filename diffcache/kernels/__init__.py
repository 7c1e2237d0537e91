"""Real low-bit execution backends, chosen at run time (ARCHITECTURE section 6).

``onednn``: int8 GEMMs through oneDNN's ``qlinear`` (u8 activations x s8 per-channel weights, fused dequant and
bias; AMX-INT8 / VNNI where the CPU has them). It takes the activation scale as a tensor, so one prepacked
weight serves every step's own activation range. Its output matches diffcache's fake-quant simulation to float
rounding (the same scheme), which the tests check.
"""

from .onednn import OneDNNLinear, onednn_available

__all__ = ["OneDNNLinear", "onednn_available"]
