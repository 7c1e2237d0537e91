"""Peak memory and time of `accelerate(..., memory="sliced")` (Feature Slicer + Operator Grouping) on video denoisers.

    python scripts/bench_slicing.py                  # AnimateDiff-layout UNet and a Wan transformer, 3 rounds
    python scripts/bench_slicing.py --rounds 5 --frames 16 --size 32

Each measurement is one denoiser call (a CFG batch of 2 clips) in a *fresh* process, so no freed heap of another
run hides a peak: the process's peak RSS during the call above its RSS before it (`diffcache.memory.PeakRSS`, the
kernel's high-water mark), and the call's wall time (after one warm-up call in the same process). Modes alternate
round by round; the table gives medians and the sliced / unsliced ratios. One thread (``torch.set_num_threads(1)``).
Random weights: speed and memory only. The sliced output is checked against the unsliced one in each process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODELS = ("animatediff-unet", "wan-transformer")


def build(model: str, frames: int, size: int):
    import torch

    torch.manual_seed(0)
    if model == "animatediff-unet":
        from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

        channels = (64, 128, 256)
        unet2d = UNet2DConditionModel(
            sample_size=size, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
        )
        adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=2, motion_norm_num_groups=32,
                                motion_num_attention_heads=4, motion_max_seq_length=32)
        net = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
        x = torch.randn(2, 4, frames, size, size)
        inputs = (x, torch.tensor(500)), {"encoder_hidden_states": torch.randn(2 * frames, 8, 64)}  # per frame, as the pipeline passes it
    else:
        from diffusers import WanTransformer3DModel

        net = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=64, freq_dim=64, ffn_dim=1024, num_layers=4, rope_max_seq_len=64,
        ).eval()
        x = torch.randn(2, 4, frames, size, size)
        inputs = (x, torch.tensor([500, 500]), torch.randn(2, 8, 64)), {}
    return net, inputs


def child(model: str, mode: str, frames: int, size: int) -> None:
    """One fresh-process measurement; prints a JSON line."""
    from contextlib import nullcontext

    import torch

    import diffcache
    from diffcache.memory import PeakRSS, trim_heap
    from diffcache.runtime import generation

    torch.set_num_threads(1)
    net, (args, kwargs) = build(model, frames, size)
    with torch.no_grad():
        reference = net(*args, **kwargs, return_dict=False)[0] if mode == "sliced" else None
        if mode == "sliced":
            diffcache.accelerate(net, "none", memory="sliced")
        marked = (lambda: generation(net, 1)) if mode == "sliced" else nullcontext
        with marked():
            net(*args, **kwargs, return_dict=False)  # warm-up
        trim_heap()
        with marked(), PeakRSS() as peak:
            start = time.perf_counter()
            out = net(*args, **kwargs, return_dict=False)[0]
            seconds = time.perf_counter() - start
    error = float((out - reference).abs().max()) if mode == "sliced" else 0.0
    print(json.dumps({"peak": peak.bytes - peak.start, "method": peak.method, "seconds": seconds,
                      "max_abs_error": error}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.frames, args.size)
        return
    print(f"| model ({args.frames} frames, {args.size}x{args.size} latents, CFG batch 2) | unsliced peak MiB | "
          "sliced peak MiB | peak ratio | unsliced s | sliced s | time ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        runs: dict[str, list[dict]] = {"unsliced": [], "sliced": []}
        for _ in range(args.rounds):
            for mode in runs:
                line = subprocess.run([sys.executable, __file__, "--child", model, mode, "--frames", str(args.frames),
                                       "--size", str(args.size)], capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(line.stdout.strip().splitlines()[-1]))
        peak = {m: statistics.median(r["peak"] for r in rs) / 2**20 for m, rs in runs.items()}
        secs = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
        err = max(r["max_abs_error"] for r in runs["sliced"])
        print(f"| {model} | {peak['unsliced']:.0f} | {peak['sliced']:.0f} | {peak['unsliced'] / peak['sliced']:.2f}x "
              f"less | {secs['unsliced']:.2f} | {secs['sliced']:.2f} | {secs['sliced'] / secs['unsliced']:.2f} | "
              f"{err:.1e} |")


if __name__ == "__main__":
    main()
