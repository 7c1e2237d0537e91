"""4-bit weights on CPU: every 4-bit GEMM this torch build runs, against fp32, bf16 and diffcache's int8 kernels, on
the Linear shapes of DiT-XL/2 and the SD1.5 UNet, side by side in one process (warm-up, then the ways alternated
round by round, medians; one thread unless --threads).

Ways (W4A8 = diffcache's scheme: s8 symmetric per-channel weights in [-8, 7], u8 per-tensor activations):

* ``fp32`` / ``bf16``: ``F.linear`` (bf16 on tensors already converted).
* ``int8 oneDNN``: `diffcache.kernels.OneDNNLinear`, W8A8 (the reference of the "vs int8" column).
* ``W4A8 oneDNN``: the same kernel with 4-bit values in its int8 weight (what diffcache ran 4-bit layers in).
* ``W4A8 _int_mm``: `diffcache.kernels.IntMMLinear` with 4-bit values, int8 storage (`Int4Linear` minus unpacking).
* ``W4A8 packed``: `diffcache.kernels.Int4Linear`, the weight packed two codes a byte, unpacked at each call.
* ``int4pack_mm``: ``aten._weight_int4pack_mm_for_cpu`` (tinygemm layout, packed int4, group-wise bf16 scales and
  zeros; torchao's CPU int4 weight-only config calls it), fed the activation codes ``q - z`` in bf16 (exact) with
  scale 1 and zero 0, rescaled in fp32 afterwards: the W4A8 integers, rounded once to bf16 at its output.
* ``int8pack_mm``: ``aten._weight_int8pack_mm`` (weight-only int8 storage) fed the same way.
* ``--slow``: ``int4pack_mm fp32`` (the same kernel on fp32 input) and ``dyn_quant_4bit``
  (``aten._dyn_quant_matmul_4bit``: KleidiAI on ARM, a scalar reference loop elsewhere; per-row dynamic s8
  activations, so its error is only against fp32). Each takes seconds per call at these sizes.
* ``--compile``: ``int8 oneDNN`` and ``W4A8 packed`` under ``torch.compile`` (inductor fuses the activation
  rounding and the dequantization around the GEMM, as in a compiled denoiser).
* torchao, when importable (not a diffcache dependency): ``ao int8 dyn`` (Int8DynamicActivationInt8WeightConfig,
  fp32 model), ``ao int4 wo`` (PrototypeInt4WeightOnlyConfig, group 128, on a bf16 model: the tinygemm kernel),
  ``ao int8-int4 dyn`` (Int8DynamicActivationIntxWeightConfig, int4 per channel). They choose their own scales,
  so their error is only against fp32.

Weight bytes count what each way keeps for the weight (packed codes, scales, zeros, row sums; oneDNN's prepacked
buffer as allocated), not the bias. Errors: relative L2 of the output against diffcache's simulation of the same
scheme in float64 (``codes * scale`` weights, fake-quantized activations), and against fp32.

    python scripts/bench_int4.py                      # ~5 min on one core
    python scripts/bench_int4.py --shapes 1152x4608 --tokens 256 --repeats 3 --slow
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from side_by_side import time_side_by_side  # scripts/side_by_side.py

from diffcache.kernels import Int4Linear, IntMMLinear, OneDNNLinear
from diffcache.kernels.int8 import weight_codes
from diffcache.quant.quantizers import act_params, fake_quant_act, fake_quant_weight, weight_scales

logger = logging.getLogger("bench_int4")

# (in_features, out_features): DiT-XL/2 attention and FFN; SD1.5 time embedding / FFN out / GEGLU-sized / attention
SHAPES = {"1152x1152": "DiT-XL attn", "1152x4608": "DiT-XL FFN up", "4608x1152": "DiT-XL FFN down",
          "320x1280": "SD1.5 320->1280", "1280x320": "SD1.5 FFN out 1280->320", "640x2560": "SD1.5 640->2560",
          "2560x640": "SD1.5 FFN out 2560->640", "1280x1280": "SD1.5 attn 1280"}
INT8 = "int8 oneDNN"


@dataclass
class Way:
    run: Callable[[], torch.Tensor]
    nbytes: int
    bits: int | None  # the simulation it is compared with (None: only fp32)


@dataclass
class Row:
    shape: str
    rows: int
    way: str
    nbytes: int
    numel: int
    ms: float
    vs_fp32: float  # speed-up: fp32 time / this time
    vs_int8: float
    err_sim: float | None
    err_fp32: float


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return ((y - ref).norm() / ref.norm()).item()


def int4pack_group(k: int) -> int:
    """The largest group size ``_weight_int4pack_mm_for_cpu`` takes that divides ``k`` (fewest scale rows)."""
    groups = [g for g in (256, 128, 64, 32) if k % g == 0]
    if not groups:
        raise ValueError(f"in_features {k} is not a multiple of 32")
    return groups[0]


def ways(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor,
         scales: dict[int, torch.Tensor], slow: bool, torchao: bool, compile_: bool) -> dict[str, Way]:
    """Every way of running ``F.linear(x, weight, bias)`` measured, prepared once."""
    n, k = weight.shape
    xb, wb, bb = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    found: dict[str, Way] = {
        "fp32": Way(lambda: F.linear(x, weight, bias), weight.numel() * 4, None),
        "bf16": Way(lambda: F.linear(xb, wb, bb), weight.numel() * 2, None),
    }
    for label, bits in ((INT8, 8), ("W4A8 oneDNN", 4)):
        kernel = OneDNNLinear(weight, scales[bits], bias, bits)
        packed = torch.ops.mkldnn._nbytes(kernel.packed) if kernel.packed.is_mkldnn else kernel.packed.nbytes
        found[label] = Way(lambda kernel=kernel: kernel(x, x_scale, x_zero), packed + kernel.scale.nbytes, bits)
    intmm = IntMMLinear(weight, scales[4], bias, 4)
    found["W4A8 _int_mm"] = Way(lambda: intmm(x, x_scale, x_zero),
                                intmm.qweight.nbytes + intmm.scale.nbytes + intmm.row_sums.nbytes, 4)
    packed4 = Int4Linear(weight, scales[4], bias)
    found["W4A8 packed"] = Way(lambda: packed4(x, x_scale, x_zero), packed4.nbytes, 4)

    codes = weight_codes(weight, scales[4], 4)
    w_scale = scales[4].float()
    # Activation codes minus the zero point lie in [-255, 255]: exact in bf16, so the weight-only kernels see the
    # W4A8 integers; the scales are applied in fp32 afterwards, as in the int8 kernels.
    centered = (torch.clamp(torch.round(x / x_scale) + x_zero, 0, 255) - x_zero)

    def rescale(acc: torch.Tensor) -> torch.Tensor:
        return acc.float() * (x_scale * w_scale) + bias

    if k % 32 == 0 and n % 16 == 0:
        group = int4pack_group(k)
        tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes + 8).to(torch.int32), 1)
        unit = torch.stack([torch.ones(k // group, n), torch.zeros(k // group, n)], dim=-1)
        unit_bf16, centered_bf16 = unit.bfloat16(), centered.bfloat16()
        found["int4pack_mm"] = Way(
            lambda: rescale(torch.ops.aten._weight_int4pack_mm_for_cpu(centered_bf16, tiles, group, unit_bf16)),
            tiles.nbytes + unit_bf16.nbytes + w_scale.nbytes, 4)
        if slow:
            found["int4pack_mm fp32"] = Way(
                lambda: rescale(torch.ops.aten._weight_int4pack_mm_for_cpu(centered, tiles, group, unit)),
                tiles.nbytes + unit.nbytes + w_scale.nbytes, 4)
    else:
        logger.info("%dx%d: int4pack_mm needs in_features % 32 == 0 and out_features % 16 == 0", k, n)
    int8_codes, ones = codes.to(torch.int8), torch.ones(n, dtype=torch.bfloat16)
    centered_bf16 = centered.bfloat16()
    found["int8pack_mm"] = Way(
        lambda: rescale(torch.ops.aten._weight_int8pack_mm(centered_bf16, int8_codes, ones)),
        int8_codes.nbytes + ones.nbytes + w_scale.nbytes, 4)
    if compile_:
        torch._dynamo.reset()  # one lambda compiled per shape and way: past dynamo's recompile limit otherwise
        for label in (INT8, "W4A8 packed"):
            compiled = torch.compile(lambda way=found[label]: way.run(), fullgraph=True)
            found[f"{label} compiled"] = Way(compiled, found[label].nbytes, found[label].bits)
    if slow:
        # the reference path's layout: rows of K/2 bytes, code 2j in the low nibble of byte j, stored +8
        nibbles = (codes + 8).to(torch.uint8)
        rows = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        dyn = torch.ops.aten._dyn_quant_pack_4bit_weight(rows, w_scale, bias, k, k, n)
        found["dyn_quant_4bit"] = Way(lambda: torch.ops.aten._dyn_quant_matmul_4bit(x, dyn, k, k, n),
                                      dyn.nbytes - bias.nbytes, None)
    if torchao:
        found.update(torchao_ways(weight, bias, x))
    return found


def torchao_ways(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> dict[str, Way]:
    """torchao's CPU configs that run on this build (others are logged and left out)."""
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerAxis

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    configs = {
        "ao int8 dyn": (Int8DynamicActivationInt8WeightConfig(), torch.float32),
        "ao int4 wo": (PrototypeInt4WeightOnlyConfig(group_size=128), torch.bfloat16),
        "ao int8-int4 dyn": (Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                   weight_granularity=PerAxis(0)), torch.float32),
    }
    found = {}
    for label, (config, dtype) in configs.items():
        module = copy.deepcopy(linear).to(dtype)
        try:
            quantize_(module, config)
        except (AssertionError, ImportError, RuntimeError, ValueError) as error:
            logger.info("%s does not run here: %s", label, error)
            continue
        inputs = x.to(dtype)
        found[label] = Way(lambda module=module, inputs=inputs: module(inputs), subclass_bytes(module.weight), None)
    return found


def subclass_bytes(weight: torch.Tensor) -> int:
    """Bytes of a torchao tensor subclass's inner tensors (codes, scales, zeros)."""
    if not hasattr(weight, "__tensor_flatten__"):
        return weight.nbytes
    names, _ = weight.__tensor_flatten__()
    return sum(getattr(weight, name).nbytes for name in names)


def bench_shape(shape: str, rows: int, args: argparse.Namespace) -> list[Row]:
    k, n = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n)  # default init: uniform weights, the case the int8 bench measured
    weight, bias = linear.weight.detach(), linear.bias.detach()
    x = torch.randn(rows, k)
    x_scale, x_zero = act_params(x.min(), x.max())
    scales = {bits: weight_scales(weight, bits, "mse") for bits in (8, 4)}
    with torch.no_grad():
        prepared = ways(weight, bias, x, x_scale, x_zero, scales, args.slow, args.torchao, args.compile)
        simulated = {bits: F.linear(fake_quant_act(x, x_scale, x_zero).double(),
                                    fake_quant_weight(weight, scales[bits], bits).double(), bias.double())
                     for bits in (8, 4)}
        reference = F.linear(x.double(), weight.double(), bias.double())
        outputs = {label: way.run() for label, way in prepared.items()}
        timed = time_side_by_side({label: _timed(way.run) for label, way in prepared.items()}, args.repeats,
                                  args.warmups)
    base, int8 = timed["fp32"].wall_s, timed[INT8].wall_s
    return [Row(shape, rows, label, way.nbytes, weight.numel(), timed[label].wall_s * 1e3,
                base / timed[label].wall_s, int8 / timed[label].wall_s,
                None if way.bits is None else rel(outputs[label], simulated[way.bits]),
                rel(outputs[label], reference))
            for label, way in prepared.items()]


def _timed(run: Callable[[], torch.Tensor]) -> Callable[[], np.ndarray]:
    def call() -> np.ndarray:
        run()
        return np.empty(0)  # time_side_by_side keeps the last output; the outputs are compared separately
    return call


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(rows: list[Row]) -> str:
    """Per way: bytes per weight, geometric-mean speed-ups and the largest errors over all shapes."""
    lines = [("| way | bytes / weight | speed-up vs fp32 (geomean) | vs int8 oneDNN (geomean) | range vs fp32 | "
              "max err vs simulation | max err vs fp32 |"), "|---|---|---|---|---|---|---|"]
    for way in dict.fromkeys(r.way for r in rows):
        mine = [r for r in rows if r.way == way]
        sims = [r.err_sim for r in mine if r.err_sim is not None]
        lines.append(
            f"| {way} | {sum(r.nbytes for r in mine) / sum(r.numel for r in mine):.3f} "
            f"| {geomean([r.vs_fp32 for r in mine]):.2f}x | {geomean([r.vs_int8 for r in mine]):.2f}x "
            f"| {min(r.vs_fp32 for r in mine):.2f}-{max(r.vs_fp32 for r in mine):.2f}x "
            f"| {f'{max(sims):.1e}' if sims else '-'} | {max(r.err_fp32 for r in mine):.1e} |")
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    lines = [("| shape (in x out) | layer | rows | way | weight KiB | ms | vs fp32 | vs int8 | err vs sim | "
              "err vs fp32 |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err_sim = "-" if r.err_sim is None else f"{r.err_sim:.1e}"
        lines.append(f"| {r.shape} | {SHAPES.get(r.shape, '')} | {r.rows} | {r.way} | {r.nbytes / 1024:.0f} "
                     f"| {r.ms:.2f} | {r.vs_fp32:.2f}x | {r.vs_int8:.2f}x | {err_sim} | {r.err_fp32:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="in_features x out_features")
    parser.add_argument("--tokens", nargs="+", type=int, default=[256, 1024], help="per image (rows: x --batch)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slow", action="store_true", help="also the seconds-per-call fp32 and reference paths")
    parser.add_argument("--compile", action="store_true", help="also int8 and W4A8 packed under torch.compile")
    parser.add_argument("--no-torchao", dest="torchao", action="store_false",
                        help="leave out torchao's configs even where it is installed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.torchao and importlib.util.find_spec("torchao") is None:
        logger.info("torchao is not installed: its configs are left out")
        args.torchao = False
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    for shape in args.shapes:
        for tokens in args.tokens:
            logger.info("%s, %d rows", shape, tokens * args.batch)
            rows += bench_shape(shape, tokens * args.batch, args)
    versions = f"torch {torch.__version__}"
    if args.torchao:
        import torchao
        versions += f", torchao {torchao.__version__}"
    print(f"{versions}; {args.threads} thread(s); median of {args.repeats} alternated rounds\n")
    print(summary(rows) + "\n\n" + table(rows), flush=True)


if __name__ == "__main__":
    main()
