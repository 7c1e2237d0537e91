"""4-bit weights stored packed, two codes a byte: `pack_int4` / `unpack_int4` (the format of saved files and of
`Int4Linear`), and `Int4Linear`, a W4A8 Linear whose weight stays packed and runs on ``torch._int_mm``.

Why this kernel (scripts/bench_int4.py; ARCHITECTURE section 6): on this x86 CPU torch's own 4-bit GEMMs are built
for few-row LLM decoding. ``_weight_int4pack_mm_for_cpu`` (the tinygemm layout, which torchao's CPU int4 configs
also call) runs at 0.8-1.1x fp32 speed at diffusion's 512-2048 rows with bf16 input and 50-100x slower with fp32
input, and ``_dyn_quant_matmul_4bit`` is a scalar reference loop off ARM. oneDNN's qlinear takes s8 weights only,
and re-prepacking them at each call costs more than the GEMM. Unpacking the nibbles to int8 (two shifts, about half
a millisecond for a DiT-XL FFN weight) and running ``torch._int_mm`` keeps half the bytes of int8 and computes the
simulation's integers: 2.5x fp32 and 0.86x oneDNN int8 eager, 3.5x fp32 and ~0.93x oneDNN int8 compiled
(geometric means over DiT-XL and SD1.5 Linear shapes, one thread).
"""

from __future__ import annotations

import torch

from .int8 import Int8Layer
from .intmm import _OUTPUT_DTYPES, IntMMLinear

_LOW, _HIGH = -8, 7


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit ``codes`` (any shape; integers, or floats holding integers, in [-8, 7]) packed into
    ``ceil(n / 2)`` bytes (uint8, flat): byte ``i`` holds flat code ``i`` in its low nibble and code
    ``i + ceil(n / 2)`` in its high one (an odd count pads one zero code). `unpack_int4` inverts it exactly.

    The two halves of the tensor share a byte, not neighbouring codes, so unpacking writes two contiguous runs
    (no interleaving: several times faster, which matters when a kernel unpacks at every call)."""
    flat = codes.detach().reshape(-1)
    if flat.is_floating_point() and not torch.equal(flat, torch.round(flat)):
        raise ValueError("pack_int4 takes integer codes; round them first (see diffcache.kernels.int8.weight_codes)")
    if flat.numel() and (flat.min() < _LOW or flat.max() > _HIGH):
        raise ValueError(f"pack_int4 takes codes in [{_LOW}, {_HIGH}], got [{flat.min().item()}, "
                         f"{flat.max().item()}]")
    flat = flat.to(torch.int8)
    half = (flat.numel() + 1) // 2
    low, high = flat[:half], flat[half:]
    if high.numel() < half:
        high = torch.cat([high, high.new_zeros(half - high.numel())])
    return ((high << 4) | (low & 0xF)).view(torch.uint8)


def unpack_int4(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The int8 codes of ``shape`` that `pack_int4` packed into ``packed``."""
    shape = torch.Size(shape)
    count = shape.numel()
    half = (count + 1) // 2
    if packed.numel() != half:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold shape {tuple(shape)} ({half} bytes)")
    signed = packed.reshape(-1).view(torch.int8)
    out = torch.empty(2 * half, dtype=torch.int8, device=packed.device)
    # Arithmetic shifts of int8 sign-extend a nibble: (b << 4) >> 4 is the low code, b >> 4 the high one.
    torch.bitwise_left_shift(signed, 4, out=out[:half]).bitwise_right_shift_(4)
    torch.bitwise_right_shift(signed, 4, out=out[half:])
    return out[:count].view(shape)


# Inductor compiles unpack_int4's shifts into slices of one buffer ~100x slower than eager (77 ms against 0.5 ms
# for a DiT-XL FFN weight); as an opaque op the compiled graph calls the eager code and still fuses the rest.
@torch.library.custom_op("diffcache::unpack_int4", mutates_args=())
def _unpack(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return unpack_int4(packed, shape)


@_unpack.register_fake
def _(packed, shape):
    return packed.new_empty(shape, dtype=torch.int8)


class Int4Linear(IntMMLinear):
    """A Linear layer's weight rounded to signed ``bits`` <= 4 per output channel and kept packed (`pack_int4`),
    unpacked to int8 at each call for `IntMMLinear`'s ``torch._int_mm`` path (u8 activations with the call's
    ``(scale, zero_point)``, exact integers, dequantized in tensor ops). ``act_bits`` below 8 clamps the activation
    codes to ``[0, 2^act_bits - 1]`` as the simulation does, so W4A4 runs here too (at W4A8 speed).

    Tested on CPU (any sizes). On CUDA it would run `IntMMLinear`'s path (sizes divisible by 8), not yet tried on
    a GPU, so `int4_supports` says CPU only."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int = 4,
                 up: torch.Tensor | None = None, act_bits: int = 8) -> None:
        if not 1 <= bits <= 4:
            raise ValueError(f"Int4Linear packs weights of at most 4 bits, got bits={bits}; 8-bit weights run in "
                             "the int8 kernels")
        if not 1 <= act_bits <= 8:
            raise ValueError(f"act_bits must be 1 to 8, got {act_bits}")
        # IntMMLinear's constructor would keep an int8 transposed copy; build only what its __call__ reads.
        Int8Layer.__init__(self, weight, scale, bias, bits, up)
        self.weight_shape = self.qweight.shape
        self.row_sums = self.qweight.sum(dim=1, dtype=torch.int32)
        self.packed = pack_int4(self.qweight)
        del self.qweight  # the packed copy is the one that runs
        self.act_bits = act_bits
        self.nbytes = self.packed.numel() + (self.scale.numel() + self.row_sums.numel()) * 4

    @property
    def weight_t(self) -> torch.Tensor:
        """The int8 weight, transposed, unpacked for this call (IntMMLinear's __call__ reads it)."""
        return _unpack(self.packed, list(self.weight_shape)).t()

    def inputs(self, x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, dtypes: tuple[torch.dtype, ...],
               offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
        codes, bias, dtype = super().inputs(x, x_scale, x_zero, dtypes, offset)
        if self.act_bits < 8:  # clamping the u8 codes again to the narrower top is clamping once to it
            codes = codes.clamp(max=2**self.act_bits - 1 - offset)
        return codes, bias, dtype


def int4_supports(module: torch.nn.Module) -> bool:
    """Whether :class:`Int4Linear` runs ``module``: a float32/bf16/fp16 Linear on CPU."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, torch.nn.Linear) and weight is not None and weight.device.type == "cpu"
            and weight.dtype in _OUTPUT_DTYPES)


__all__ = ["Int4Linear", "int4_supports", "pack_int4", "unpack_int4"]
