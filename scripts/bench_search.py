"""Searched schedules vs presets vs diffusers' own caches on the embedded digits models (CPU, one process).

For each model: search dp / bac / ecad / router (DiT) schedules at two latency budgets on calibration labels
(seed 0), then generate a held-out set (other seeds) with every method, time the methods side by side (one
warm-up, then alternated runs, median), and score quality: Fréchet distance of the digit classifier's features to
real held-out digits, classifier accuracy, PSNR vs the full model. Search cost is reported per method.

    python scripts/bench_search.py                      # both models, ~25 min on 2 cores
    python scripts/bench_search.py --models digits-unet --per-class 5 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import diffcache
from diffcache.eval.baselines import BaselineUnavailable, diffusers_cache
from diffcache.eval.metrics import accuracy, fid, psnr
from diffcache.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, load_classifier, load_pipeline, real_digits

PRESETS = {
    "digits-dit": ["fora:interval=2", "fora:interval=3", "uniform:interval=2", "uniform:interval=3",
                   "uniform:interval=3,warmup=2,forecast=1", "uniform:interval=4,warmup=2,forecast=1"],
    "digits-unet": ["deepcache:interval=2", "deepcache:interval=3", "deepcache:interval=4",
                    "deepcache:interval=3,warmup=2,forecast=1", "deepcache:interval=4,warmup=2,forecast=1"],
}
# (method, forecast): reuse steps copy the cache (0) or serve its first-order forecast (1)
SEARCHES = {
    "digits-dit": [("dp", 0), ("bac", 0), ("ecad", 0), ("router", 0), ("dp", 1), ("ecad", 1)],
    "digits-unet": [("dp", 0), ("bac", 0), ("ecad", 0), ("dp", 1), ("ecad", 1)],
}
# diffusers' hooks with settings that skip about 2x and 3x of the deep blocks at 25 steps (measured by counting
# calls of the last block); FasterCache is listed to show why it is missing.
BASELINES = {
    "digits-dit": [("first_block_cache", {"threshold": 0.10}), ("first_block_cache", {"threshold": 0.16}),
                   ("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 2}),
                   ("taylorseer", {"cache_interval": 4, "disable_cache_before_step": 2}), ("faster_cache", {})],
    "digits-unet": [("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 2}),
                    ("taylorseer", {"cache_interval": 4, "disable_cache_before_step": 2}),
                    ("first_block_cache", {"threshold": 0.1}), ("faster_cache", {})],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(PRESETS))
    parser.add_argument("--budgets", nargs="+", default=["latency:2x", "latency:3x"])
    parser.add_argument("--per-class", type=int, default=10, help="held-out images per class (default 10)")
    parser.add_argument("--calibration", type=int, default=20, help="calibration labels (default 20)")
    parser.add_argument("--generations", type=int, default=10, help="ECAD generations (default 10)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method (default 2)")
    parser.add_argument("--work", default="bench-search", help="folder for calibrations/checkpoints (resumable)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    classifier = load_classifier()
    real, _ = real_digits("test")
    for name in args.models:
        print(bench_model(name, args, classifier, real), flush=True)


def bench_model(name: str, args: argparse.Namespace, classifier, real) -> str:
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(10 * args.per_class)]
    calibration = [i % 10 for i in range(args.calibration)]
    methods: dict[str, Callable[[], contextlib.AbstractContextManager]] = {"full": contextlib.nullcontext}
    notes, search_cost = [], {}
    for tag in PRESETS[name]:
        methods[tag] = lambda tag=tag: diffcache.accelerated(pipe, tag)
    for method, forecast in SEARCHES[name]:
        for budget in args.budgets:
            options = {"generations": args.generations} if method == "ecad" else {}
            label = f"{method}{',forecast=1' if forecast else ''} ({budget})"
            start = time.perf_counter()
            schedule = diffcache.search(
                pipe, calibration, method, budget, num_inference_steps=NUM_INFERENCE_STEPS,
                guidance_scale=GUIDANCE_SCALE, batch_size=10, forecast=forecast, resume=True, progress=False,
                out_dir=Path(args.work) / name / f"{method}-f{forecast}", **options,
            )
            search_cost[label] = time.perf_counter() - start
            methods[label] = lambda s=schedule: diffcache.accelerated(pipe, s)
    for baseline, params in BASELINES[name]:
        label = f"diffusers {baseline} " + ",".join(f"{k}={v}" for k, v in params.items())
        try:
            with diffusers_cache(pipe, baseline, **params):
                pipe(**call(labels[:2], 2))
            methods[label] = lambda b=baseline, p=params: diffusers_cache(pipe, b, **p)
        except BaselineUnavailable as err:
            notes.append(f"- {label}: not applicable ({err})")

    images, wall, cpu = {}, {m: [] for m in methods}, {m: [] for m in methods}
    for round_index in range(args.repeats + 1):  # round 0 warms up and keeps the images
        for method, enter in methods.items():
            with enter():
                w0, c0 = time.perf_counter(), time.process_time()
                out = pipe(**call(labels, NUM_INFERENCE_STEPS)).images
                w1, c1 = time.perf_counter(), time.process_time()
            if round_index == 0:
                images[method] = np.asarray(out)
            else:
                wall[method].append(w1 - w0)
                cpu[method].append(c1 - c0)
    full_wall, full_cpu = statistics.median(wall["full"]), statistics.median(cpu["full"])
    rows = []
    for method in methods:
        rows.append((
            method, full_wall / statistics.median(wall[method]), full_cpu / statistics.median(cpu[method]),
            fid(images[method], real, classifier), accuracy(images[method], labels, classifier),
            float(np.mean(psnr(images[method], images["full"]))),
        ))
    lines = [
        f"**{name}** ({len(labels)} held-out images per method, seed 1000, {NUM_INFERENCE_STEPS} DDIM steps, "
        f"guidance {GUIDANCE_SCALE}; search on {len(calibration)} labels at seed 0; 1 thread)",
        "",
        "| method | measured speedup | CPU-time speedup | FID (digits) | accuracy | PSNR vs full dB |",
        "|---|---|---|---|---|---|",
    ]
    for method, speed, cpu_speed, frechet, acc, db in sorted(rows, key=lambda r: r[1]):
        lines.append(f"| {method} | {speed:.2f}x | {cpu_speed:.2f}x | {frechet:.2f} | {acc:.1%} | {db:.1f} |")
    lines += ["", "Search cost (2 cores shared, 1 torch thread; calibration reused across budgets): "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in search_cost.items()),
              "(a budget's second search reuses the first's calibration, ECAD front or nothing: router retrains)"]
    return "\n".join(lines + notes) + "\n"


def call(labels: list[int], steps: int) -> dict:
    return {"class_labels": labels, "num_inference_steps": steps, "guidance_scale": GUIDANCE_SCALE,
            "output_type": "np", "generator": torch.Generator("cpu").manual_seed(1000)}


if __name__ == "__main__":
    main()
