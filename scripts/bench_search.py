"""Searched schedules vs presets vs diffusers' own caches on the embedded digits models (CPU, one process).

For each model: profile the per-slot latency once on the first calibration batch (one profile per granularity,
which prices every search and diffusers' TaylorSeer compute pattern alike), search dp / bac / ecad / router (DiT)
schedules at two latency budgets plus, for the forecasting searches, at each TaylorSeer setting's exact price,
all on calibration labels (seed 0). Then generate a held-out set (another seed) with every method,
time the methods side by side with `diffcache.eval.bench.compare_methods` (one warm-up, then alternated runs,
median), and score quality: Fréchet distance of the digit classifier's features to real held-out digits,
classifier accuracy, PSNR vs the full model. A second table pairs each baseline with the best-PSNR diffcache
schedule that runs at least as fast (measured). Search cost is reported per method.

    python scripts/bench_search.py                      # both models, ~60 min on 2 cores
    python scripts/bench_search.py --models digits-unet --per-class 5 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from digits_bench import held_out, run_models  # scripts/digits_bench.py

import diffcache
from diffcache.adapters import denoiser_of, resolve_adapter
from diffcache.eval.baselines import BaselineUnavailable, diffusers_cache
from diffcache.eval.bench import compare_methods, label
from diffcache.eval.metrics import accuracy, fid
from diffcache.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, load_pipeline
from diffcache.schedules.budget import Budget, CostModel
from diffcache.data import CalibrationData, conditions_from
from diffcache.schedules.evolution import taylorseer_key_steps
from diffcache.schedules.search import default_granularity

PRESETS = {
    "digits-dit": ["fora:interval=2", "fora:interval=3", "uniform:interval=2", "uniform:interval=3",
                   "uniform:interval=3,warmup=2,forecast=1", "uniform:interval=4,warmup=2,forecast=1"],
    "digits-unet": ["deepcache:interval=2", "deepcache:interval=3", "deepcache:interval=4",
                    "deepcache:interval=3,warmup=2,forecast=1", "deepcache:interval=4,warmup=2,forecast=1"],
}
# (method, forecast, options): reuse steps copy the cache (0) or serve its Taylor forecast of order 1 or 2; ECAD over
# all bits, or over the key steps only (one bit per step, every slot follows: 24 bits here; on the UNet reuse steps
# reuse DeepCache's branch 0, or with BODY_KEYS the whole body: TaylorSeer's cut)
KEYS = {"key_steps": 1}
BODY_KEYS = {"key_steps": 1, "branch": -1}
SPEED_NOISE = 0.03  # timings repeat within about this on the shared 2-core machine
BATCH = 10  # calibration batch size
# The searches that also run at each TaylorSeer setting's exact price (its compute pattern, priced by their cost model)
MATCHED = [("dp", 1, {}), ("ecad", 1, {}), ("ecad", 1, KEYS), ("ecad", 2, KEYS), ("ecad", 1, BODY_KEYS),
           ("ecad", 2, BODY_KEYS)]
SEARCHES = {
    "digits-dit": [("dp", 0, {}), ("bac", 0, {}), ("ecad", 0, {}), ("router", 0, {}), ("dp", 1, {}),
                   ("ecad", 1, {}), ("ecad", 1, KEYS)],
    "digits-unet": [("dp", 0, {}), ("bac", 0, {}), ("ecad", 0, {}), ("dp", 1, {}), ("ecad", 1, {}),
                    ("ecad", 1, BODY_KEYS), ("ecad", 2, BODY_KEYS)],
}
# diffusers' hooks with settings that skip about 2x and 3x of the deep blocks at 25 steps (measured by counting
# calls of the last block); TaylorSeer at its default order 1 and at max_order=2; FasterCache is listed to show why
# it is missing.
TAYLORSEER = [("taylorseer", {"cache_interval": n, "disable_cache_before_step": 2} | order)
              for n in (2, 4) for order in ({}, {"max_order": 2})]
BASELINES = {
    "digits-dit": [("first_block_cache", {"threshold": 0.10}), ("first_block_cache", {"threshold": 0.16}),
                   *TAYLORSEER, ("faster_cache", {})],
    "digits-unet": [*TAYLORSEER, ("first_block_cache", {"threshold": 0.1}), ("faster_cache", {})],
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
    run_models(parser.parse_args(), bench_model)


def taylorseer_budgets(adapter, cost_models: dict[str, CostModel], settings: list[dict]) -> dict[str, list[Budget]]:
    """Per granularity, the latency budgets at diffusers' TaylorSeer settings: its compute pattern (its key steps
    compute everything, the other steps reuse every slot) priced with the cost model the searches use, so a
    search gets exactly its cost, without timing noise."""
    budgets: dict[str, list[Budget]] = {}
    patterns = dict.fromkeys((p["cache_interval"], p["disable_cache_before_step"]) for p in settings)  # any order
    for granularity, cost_model in cost_models.items():
        layout = adapter.layout(granularity)
        present = layout.present if layout.present is not None else True
        for interval, warmup in patterns:
            key = taylorseer_key_steps(NUM_INFERENCE_STEPS, interval, warmup)
            bits = np.broadcast_to(key[:, None, None] | ~np.asarray(present)[None],
                                   (NUM_INFERENCE_STEPS, len(layout.units), len(layout.components)))
            plan = diffcache.Schedule(bits, layout.units, layout.components, "taylorseer", present=layout.present)
            budgets.setdefault(granularity, []).append(Budget("latency", cost_model.fraction(plan)))
    return budgets


def bench_model(name: str, args: argparse.Namespace, classifier, real) -> str:
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(10 * args.per_class)]
    calibration = [i % 10 for i in range(args.calibration)]
    methods: list[str | diffcache.Schedule] = list(PRESETS[name])
    notes, search_cost = [], {}
    baselines: dict[str, Callable[[], contextlib.AbstractContextManager]] = {}
    for baseline, params in BASELINES[name]:
        title = _title(baseline, params)
        try:
            with diffusers_cache(pipe, baseline, **params):
                pipe(**held_out(labels[:2], 2))
            baselines[title] = lambda b=baseline, p=params: diffusers_cache(pipe, b, **p)
        except BaselineUnavailable as err:
            notes.append(f"- {title}: not applicable ({err})")
    # One latency profile per granularity, on the searches' first calibration batch, prices every search and
    # TaylorSeer's pattern alike.
    adapter = resolve_adapter(denoiser_of(pipe))
    first_batch = CalibrationData(conditions_from(calibration, pipe), NUM_INFERENCE_STEPS, GUIDANCE_SCALE, 0,
                                  BATCH).batches(pipe)[0]
    cost_models = {g: CostModel.measure_on(pipe, first_batch, "latency", g) for g in adapter.granularities}
    matched = taylorseer_budgets(adapter, cost_models, [p for b, p in BASELINES[name] if b == "taylorseer"])
    for method, forecast, extra in SEARCHES[name]:
        granularity = default_granularity(method, adapter, bool(extra.get("key_steps")))
        for budget in args.budgets + (matched[granularity] if (method, forecast, extra) in MATCHED else []):
            options = extra | ({"generations": args.generations} if method == "ecad" else {})
            start = time.perf_counter()
            schedule = diffcache.search(
                pipe, calibration, method, budget, num_inference_steps=NUM_INFERENCE_STEPS,
                guidance_scale=GUIDANCE_SCALE, batch_size=BATCH, forecast=forecast, resume=True, progress=False,
                granularity=granularity, cost_model=cost_models[granularity],
                out_dir=Path(args.work) / name / (f"{method}-f{forecast}{'-keys' if extra else ''}"
                                                  f"{extra.get('branch', '')}"),
                **options,
            )
            search_cost[label(schedule)] = time.perf_counter() - start
            methods.append(schedule)
    rows = compare_methods(pipe, lambda: held_out(labels, NUM_INFERENCE_STEPS), methods, args.repeats, progress=False,
                           others=baselines)
    lines = [
        f"**{name}** ({len(labels)} held-out images per method, seed 1000, {NUM_INFERENCE_STEPS} DDIM steps, "
        f"guidance {GUIDANCE_SCALE}; search on {len(calibration)} labels at seed 0; 1 thread)",
        "",
        "| method | measured speedup | CPU-time speedup | MACs speedup | FID (digits) | accuracy | PSNR vs full dB |",
        "|---|---|---|---|---|---|---|",
    ]
    scores = {r.method: (fid(r.images, real, classifier), accuracy(r.images, labels, classifier)) for r in rows}
    for r in sorted(rows, key=lambda r: r.speedup):
        macs = "n/a" if math.isnan(r.macs_speedup) else f"{r.macs_speedup:.2f}x"  # diffusers' own caches
        lines.append(f"| {r.method} | {r.speedup:.2f}x | {r.cpu_speedup:.2f}x | {macs} | "
                     f"{scores[r.method][0]:.2f} | {scores[r.method][1]:.1%} | {r.psnr_db:.1f} |")
    lines += ["", "At equal measured speed: each diffusers cache against the best-PSNR diffcache schedule that runs "
              f"at least as fast, within {SPEED_NOISE:.0%} (this machine's run-to-run noise) (FID / accuracy / PSNR)",
              "",
              "| diffusers cache | speedup | its FID / acc / PSNR | best diffcache at >= its speed | speedup "
              "| FID / acc / PSNR | PSNR gain |", "|---|---|---|---|---|---|---|"]
    ours = [r for r in rows if r.method not in baselines and r.method != "full"]
    for base in (r for r in rows if r.method in baselines):
        faster = [r for r in ours if r.speedup >= (1 - SPEED_NOISE) * base.speedup]
        if not faster:
            lines.append(f"| {base.method} | {base.speedup:.2f}x | | none as fast | | | |")
            continue
        best = max(faster, key=lambda r: r.psnr_db)
        lines.append(f"| {base.method} | {base.speedup:.2f}x | {_quality(scores[base.method], base.psnr_db)} | "
                     f"{best.method} | {best.speedup:.2f}x | {_quality(scores[best.method], best.psnr_db)} | "
                     f"{best.psnr_db - base.psnr_db:+.1f} dB |")
    lines += ["", "Search cost (2 cores shared, 1 torch thread; calibration reused across budgets): "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in search_cost.items()),
              "(a budget's second search reuses the first's calibration, ECAD front or nothing: router retrains)"]
    return "\n".join(lines + notes) + "\n"


def _title(baseline: str, params: dict) -> str:
    return f"diffusers {baseline} " + ",".join(f"{k}={v}" for k, v in params.items())


def _quality(score: tuple[float, float], psnr_db: float) -> str:
    return f"{score[0]:.2f} / {score[1]:.0%} / {psnr_db:.1f} dB"


if __name__ == "__main__":
    main()
