"""Benchmark: full vs cache presets on a UNet-dominated SD pipeline and a DiT pipeline (CPU, one process).

    python scripts/bench_cache.py [--steps 20] [--repeats 5] [--threads 1]

Runs are alternated and warmed up; the table gives median wall time, CPU-time speedup beside wall-clock
speedup (the machine is shared), the ideal speedups from the cost model (MACs and measured latency of the
reused modules), and PSNR against the full pipeline at the same seed.
"""

from __future__ import annotations

import argparse
import platform

import torch

from diffcache.eval.bench import run_suites

SUITES = {
    "sd": ["deepcache:interval=2", "deepcache:interval=3", "deepcache:interval=5", "deepcache:interval=3,branch=3"],
    "dit": ["none", "fora:interval=2", "fora:interval=3", "uniform:interval=2", "uniform:interval=3"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pipelines", nargs="+", default=list(SUITES), choices=list(SUITES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s)\n")
    suites = {name: SUITES[name] for name in args.pipelines}
    for table in run_suites(suites, args.steps, args.repeats):
        print(table + "\n")


if __name__ == "__main__":
    main()
