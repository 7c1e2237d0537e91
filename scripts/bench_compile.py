"""diffcache with torch.compile on CPU: does caching still pay once the denoiser is compiled?

Four copies of the same pipeline (identical seeded weights, ``size="bench"`` test pipelines): eager, eager +
cache, compiled (inductor), compiled + cache. Each is compiled/warmed up with two generations (compile time
reported), then the four are timed in alternation, median of ``--repeats`` runs, one torch thread. Separate
copies, because switching one compiled module between cached and uncached forwards recompiles it.

    python scripts/bench_compile.py                      # sd and dit, ~10 min on 2 cores
    python scripts/bench_compile.py --models dit --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse

import torch
from side_by_side import time_side_by_side  # scripts/side_by_side.py
from torch._dynamo.utils import counters

import diffcache
from diffcache.adapters import denoiser_of
from diffcache.eval.metrics import psnr
from diffcache.testing import build_pipeline, call_kwargs

TAGS = {"sd": "deepcache:interval=3,branch=1", "dit": "fora:interval=3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(TAGS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        print(bench(name, args.steps, args.repeats), flush=True)


def bench(name: str, steps: int, repeats: int) -> str:
    def kwargs() -> dict:
        return call_kwargs(name, num_inference_steps=steps, size="bench")

    variants = {}
    for cached in (False, True):
        for compiled in (False, True):
            pipe = build_pipeline(name, size="bench")
            if cached:
                diffcache.accelerate(pipe, TAGS[name])
            if compiled:
                denoiser_of(pipe).compile()
            label = ("compiled" if compiled else "eager") + (f" + {TAGS[name]}" if cached else "")
            variants[label] = pipe

    torch._dynamo.reset()
    counters.clear()
    timed = time_side_by_side({label: (lambda pipe=pipe: pipe(**kwargs()).images) for label, pipe in variants.items()},
                              repeats, warmups=2)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    median = {label: t.wall_s for label, t in timed.items()}
    eager, compiled = median["eager"], median["compiled"]
    denoiser = denoiser_of(variants["eager"])
    params = sum(p.numel() for p in denoiser.parameters()) / 1e6
    lines = [
        f"**{name}** ({type(variants['eager']).__name__}, {type(denoiser).__name__} {params:.1f}M, bench size, "
        f"{steps} steps, batch 1 + CFG, 1 thread, median of {repeats}; {graphs} dynamo graphs and {breaks} graph "
        "breaks over both compiled pipelines)",
        "",
        "| pipeline | warm-up s (2 runs, incl. compile) | median s | vs eager | vs compiled | PSNR vs eager dB |",
        "|---|---|---|---|---|---|",
    ]
    for label in variants:
        lines.append(f"| {label} | {timed[label].warmup_s:.1f} | {median[label]:.3f} | {eager / median[label]:.2f}x | "
                     f"{compiled / median[label]:.2f}x | {psnr(timed[label].images, timed['eager'].images):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
